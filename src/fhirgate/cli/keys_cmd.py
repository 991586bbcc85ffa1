"""`fhirgate keys rotate|list`: the authorization server's signing keys (issue 5 §3)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from fhirgate.errors import ConfigError, FhirgateError
from fhirgate.settings import Settings, load_settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "keys",
        help="the authorization server's signing keys: rotate, list",
        description=(
            "Manage the authorization server's signing keys. A rotated-out key stays published in "
            "the JWKS until the tokens it signed have expired (auth_access_token_lifetime)."
        ),
    )
    actions = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    rotate = actions.add_parser("rotate", help="create a new signing key and retire the current one")
    rotate.add_argument("--alg", default="RS256", help="RS256 (default), RS384, ES256 or ES384")
    listing = actions.add_parser("list", help="every stored key: kid, alg, state, created, published until")
    for action in (rotate, listing):
        action.add_argument("--data-dir", dest="data_dir", type=Path, help="where auth.db lives (.fhirgate)")
        action.add_argument(
            "--database",
            dest="auth_database_url",
            metavar="URL",
            help="sqlite:///path/auth.db or postgresql://user@host/db",
        )
        action.add_argument("--settings", type=Path, help="node settings file (default ./fhirgate.toml)")
    rotate.set_defaults(func=lambda args: _run(args, _rotate))
    listing.set_defaults(func=lambda args: _run(args, _list))


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def _run(args: argparse.Namespace, action: Callable[..., Coroutine[Any, Any, None]]) -> int:
    try:
        settings = load_settings(
            args.settings, data_dir=args.data_dir, auth_database_url=args.auth_database_url
        )
    except ConfigError as exc:
        print(f"error: settings: {'; '.join(str(issue) for issue in exc.issues)}", file=sys.stderr)
        return 1
    from fhirgate.authserver.keys import UnsupportedAlgorithmError
    from fhirgate.cli.fhir_cmd import _redact

    database = _redact(settings.auth_database())
    try:
        asyncio.run(action(settings, args))
    except UnsupportedAlgorithmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (FhirgateError, OSError) as exc:
        print(f"error: database {database}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # asyncpg's errors (authentication, missing database) and the like
        if type(exc).__module__.split(".")[0] != "asyncpg":
            raise
        print(f"error: database {database}: {exc}", file=sys.stderr)
        return 1
    return 0


async def _rotate(settings: Settings, args: argparse.Namespace) -> None:
    from fhirgate.authserver.keys import KeyRing, check_alg
    from fhirgate.authserver.store import AuthStore

    alg = check_alg(args.alg)  # before opening (and perhaps creating) the database
    store = await AuthStore.open(settings.auth_database())
    try:
        result = await KeyRing(store).rotate(alg, settings.auth_access_token_lifetime)
    finally:
        await store.close()
    print(f"new {alg} key: {result.new.kid}")
    if not result.retired:
        print(f"retired: none (the first {alg} key)")
    for key in result.retired:
        print(f"retired: {key.kid} (published until {_when(result.published_until)})")


async def _list(settings: Settings, args: argparse.Namespace) -> None:
    from fhirgate.authserver.keys import KeyRing, published_until
    from fhirgate.authserver.store import AuthStore

    store = await AuthStore.open(settings.auth_database())
    try:
        keys = await KeyRing(store).keys()
    finally:
        await store.close()
    if not keys:
        print("no keys yet (the authorization server creates one on first start; or: fhirgate keys rotate)")
        return
    rows = [("kid", "alg", "state", "created", "published until")]
    for key in keys:
        until = published_until(key, settings.auth_access_token_lifetime)
        rows.append(
            (key.kid, key.alg, "active" if key.active else "retired", _when(key.created_at), _when(until))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
