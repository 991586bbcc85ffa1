"""`fhirgate config check FILE`: validate a declarative file, print every error with its location
and every unsafe-setting warning (see `DECISIONS.md`, "Kong compatibility versus safe defaults")."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from fhirgate.config.loader import load_config_file
from fhirgate.errors import ConfigError

__all__ = ["check", "register"]


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add `config` (with `check FILE`) to the `fhirgate` command line."""
    config = subparsers.add_parser("config", help="work with declarative configuration files")
    config_sub = config.add_subparsers(dest="config_command", metavar="COMMAND", required=True)
    check_parser = config_sub.add_parser(
        "check",
        help="validate a declarative file and warn about unsafe settings",
        description="Validate a Kong-format declarative file (YAML or JSON). Prints every error with "
        "its location and exits 1 if there is any; prints warnings for settings that are unsafe "
        "for patient data.",
    )
    check_parser.add_argument("file", metavar="FILE", help="declarative configuration (kong.yml)")
    check_parser.set_defaults(func=_run_check)


def _run_check(args: argparse.Namespace) -> int:
    return check(args.file)


def check(path: str, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Validate `path`; print the outcome. Returns the process exit status (0 valid, 1 invalid)."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        config = load_config_file(path)
    except ConfigError as exc:
        for issue in exc.issues:
            print(f"{path}: {issue}" if str(issue) else path, file=err)
        print(f"{path}: {len(exc.issues)} error(s)", file=err)
        return 1
    for warning in config.warnings:
        print(f"warning: {path}: {warning}", file=err)
    print(
        f"{path}: OK ({len(config.services)} services, {len(config.routes)} routes, "
        f"{len(config.consumers)} consumers, {len(config.plugins)} plugins"
        + (f", {len(config.warnings)} warnings)" if config.warnings else ")"),
        file=out,
    )
    return 0
