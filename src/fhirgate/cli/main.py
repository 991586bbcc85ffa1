"""Entry point of the `fhirgate` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fhirgate import __version__


def build_parser() -> argparse.ArgumentParser:
    from fhirgate.cli import (
        auth_cmd,
        clients_cmd,
        config_cmd,
        data_cmd,
        fhir_cmd,
        gateway_cmd,
        jwks_cmd,
        keys_cmd,
        launch_cmd,
        token_cmd,
        users_cmd,
    )

    parser = argparse.ArgumentParser(
        prog="fhirgate",
        description="fhirgate: secure any FHIR server with OAuth 2.0 and SMART on FHIR.",
    )
    parser.add_argument("--version", action="version", version=f"fhirgate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    gateway_cmd.register(sub)
    config_cmd.register(sub)
    jwks_cmd.register(sub)
    data_cmd.register(sub)
    fhir_cmd.register(sub)
    keys_cmd.register(sub)
    users_cmd.register(sub)
    clients_cmd.register(sub)
    auth_cmd.register(sub)
    launch_cmd.register(sub)
    token_cmd.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    result: int = func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
