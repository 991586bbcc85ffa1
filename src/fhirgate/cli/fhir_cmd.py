"""`fhirgate fhir-server`: the built-in FHIR R4 server on its own."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from fhirgate.cli.serve import redact, serve, service_settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "fhir-server",
        help="run the built-in FHIR R4 server (SQLite by default, PostgreSQL at scale)",
        description=(
            "Run the built-in FHIR R4 server. It listens on loopback by default: put the gateway in "
            "front of it to decide who gets in. Settings: these flags, then FHIRGATE_* environment "
            "variables, then fhirgate.toml."
        ),
    )
    p.add_argument(
        "--database",
        dest="fhir_database_url",
        metavar="URL",
        help="sqlite:///path/fhir.db[?synchronous=full] or postgresql://user@host/db",
    )
    p.add_argument("--listen", dest="fhir_listen", metavar="HOST:PORT", help="default 127.0.0.1:8080")
    p.add_argument("--base-url", dest="fhir_base_url", metavar="URL", help="absolute base URL clients see")
    p.add_argument(
        "--auth-issuer",
        dest="fhir_auth_issuer",
        metavar="URL",
        help="the fhirgate authorization server protecting it: /metadata declares SMART security",
    )
    p.add_argument("--workers", dest="fhir_workers", type=int, help="worker processes (default: cores)")
    p.add_argument("--data-dir", dest="data_dir", type=Path, help="where the SQLite file lives (.fhirgate)")
    p.add_argument("--settings", type=Path, help="node settings file (default ./fhirgate.toml)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    prepared = service_settings(
        args,
        (
            "fhir_database_url",
            "fhir_listen",
            "fhir_base_url",
            "fhir_workers",
            "data_dir",
            "fhir_auth_issuer",
        ),
        "fhir_listen",
    )
    if prepared is None:
        return 1
    settings, host, port = prepared
    # Workers rebuild the server from the environment: pass the resolved settings on.
    os.environ["FHIRGATE_FHIR_DATABASE_URL"] = settings.fhir_database()
    os.environ["FHIRGATE_FHIR_BASE_URL"] = settings.fhir_base()
    if settings.fhir_auth_issuer:
        os.environ["FHIRGATE_FHIR_AUTH_ISSUER"] = settings.fhir_auth_issuer
    if args.settings:
        os.environ["FHIRGATE_SETTINGS_FILE"] = str(args.settings)
    # Create or migrate the schema once, before the workers start.
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from fhirgate.fhirserver.storage.store import FhirStore
    from fhirgate.storage.backend import DatabaseUrlError

    async def prepare() -> None:
        with Progress(
            TextColumn("reindexing"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=True,
        ) as bar:
            task = None

            def progress(done: int, total: int) -> None:
                nonlocal task
                if task is None:
                    task = bar.add_task("reindex", total=total)
                bar.update(task, completed=done)

            store = await FhirStore.open(settings.fhir_database(), progress=progress)
        await store.close()

    try:
        asyncio.run(prepare())
    except (DatabaseUrlError, OSError) as exc:
        print(f"error: database {settings.fhir_database()}: {exc}", file=sys.stderr)
        return 1
    print(
        f"fhirgate fhir-server: {settings.fhir_base()} (database {redact(settings.fhir_database())}, "
        f"{settings.fhir_workers} worker(s))",
        flush=True,
    )
    serve("fhirgate.fhirserver.app:create_app", host, port, settings.fhir_workers)
    return 0
