"""What the commands that run an ASGI service share (`fhirgate fhir-server`, `fhirgate auth-server`):
settings from flags over the environment and `fhirgate.toml`, the listener, the database URL as
printed (no password), and uvicorn with the project's fast stack."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fhirgate.errors import ConfigError
from fhirgate.settings import Settings, load_settings, parse_hostport

__all__ = ["redact", "serve", "service_settings"]


def service_settings(
    args: argparse.Namespace, flags: Sequence[str], listen: str
) -> tuple[Settings, str, int] | None:
    """The settings with `flags` (argparse destinations named like settings) applied, and the host
    and port of the `listen` setting; None after printing the error."""
    try:
        settings = load_settings(args.settings, **{name: getattr(args, name) for name in flags})
        host, port = parse_hostport(getattr(settings, listen), "127.0.0.1")
    except ConfigError as exc:
        print(exc.describe(), file=sys.stderr)
        return None
    except ValueError as exc:
        print(f"error: {listen}: {exc}", file=sys.stderr)
        return None
    return settings, host, port


def redact(url: str) -> str:
    """A database URL as it may be printed: never its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url


def serve(factory: str, host: str, port: int, workers: int) -> None:
    """uvicorn (httptools, uvloop) with `workers` processes, each building the app with
    `factory` ("module:function") from the environment the command prepared."""
    import uvicorn

    uvicorn.run(
        factory,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        server_header=False,
    )
