"""What the commands over the authorization server's store share (`fhirgate keys`, `users`,
`clients`): the store options, running an action with one `error:` line on failure, and output."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fhirgate.errors import ConfigError, FhirgateError
from fhirgate.settings import Settings, load_settings

if TYPE_CHECKING:
    from fhirgate.authserver.store import AuthStore


@asynccontextmanager
async def auth_store(settings: Settings) -> AsyncIterator[AuthStore]:
    """The auth store the settings name, closed whatever happens."""
    from fhirgate.authserver.store import AuthStore

    store = await AuthStore.open(settings.auth_database())
    try:
        yield store
    finally:
        await store.close()


def add_store_options(action: argparse.ArgumentParser) -> None:
    """`--data-dir`, `--database`, `--settings`, as `fhirgate keys` takes them."""
    action.add_argument("--data-dir", dest="data_dir", type=Path, help="where auth.db lives (.fhirgate)")
    action.add_argument(
        "--database",
        dest="auth_database_url",
        metavar="URL",
        help="sqlite:///path/auth.db or postgresql://user@host/db",
    )
    action.add_argument("--settings", type=Path, help="node settings file (default ./fhirgate.toml)")


def when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def run(args: argparse.Namespace, action: Callable[..., Coroutine[Any, Any, None]]) -> int:
    """Run `action(settings, args)`; a bad input or database is one `error:` line and exit 1."""
    try:
        settings = load_settings(
            args.settings, data_dir=args.data_dir, auth_database_url=args.auth_database_url
        )
    except ConfigError as exc:
        print(f"error: settings: {'; '.join(str(issue) for issue in exc.issues)}", file=sys.stderr)
        return 1
    from fhirgate.authserver.clients import ClientError
    from fhirgate.authserver.keys import UnsupportedAlgorithmError
    from fhirgate.authserver.users import UserError
    from fhirgate.cli.serve import redact

    database = redact(settings.auth_database())
    try:
        asyncio.run(action(settings, args))
    except (UserError, ClientError, UnsupportedAlgorithmError) as exc:
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
