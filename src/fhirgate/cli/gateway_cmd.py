"""`fhirgate gateway`: the gateway alone, DB-less, from a declarative file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fhirgate.errors import ConfigError
from fhirgate.gateway.node import Listener, Node, load_or_empty, server_ssl_context, setup_logging
from fhirgate.settings import load_settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "gateway",
        help="run the gateway alone (DB-less) from a declarative file",
        description=(
            "Run the gateway alone, DB-less, from a Kong-format declarative file. Node settings come "
            "from these flags, then FHIRGATE_* environment variables, then fhirgate.toml."
        ),
    )
    p.add_argument("--config", type=Path, help="declarative file (Kong _format_version 3.0, YAML or JSON)")
    p.add_argument("--listen", action="append", metavar="HOST:PORT", help="proxy listener (repeatable)")
    p.add_argument("--listen-ssl", action="append", metavar="HOST:PORT", help="TLS proxy listener")
    p.add_argument("--ssl-cert", type=Path, help="PEM certificate for the TLS listener")
    p.add_argument("--ssl-cert-key", type=Path, help="PEM private key for the TLS listener")
    p.add_argument("--status-listen", metavar="HOST:PORT", help="status listener (/status, /metrics)")
    p.add_argument("--workers", type=int, help="worker processes (default: number of cores)")
    p.add_argument("--settings", type=Path, help="node settings file (default ./fhirgate.toml)")
    p.add_argument("--access-log", dest="proxy_access_log", help="access log: path, stdout, stderr or off")
    p.add_argument("--log-level", choices=["debug", "info", "notice", "warn", "error", "crit"])
    p.add_argument("--log-format", choices=["text", "json"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(
            args.settings,
            listen=args.listen,
            listen_ssl=args.listen_ssl,
            ssl_cert=args.ssl_cert,
            ssl_cert_key=args.ssl_cert_key,
            status_listen=args.status_listen,
            workers=args.workers,
            proxy_access_log=args.proxy_access_log,
            log_level=args.log_level,
            log_format=args.log_format,
        )
        config = load_or_empty(args.config)
    except ConfigError as exc:
        print(exc.describe(), file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if settings.ssl_cert is not None:
        # Checked here, once, rather than in every worker after the fork.
        try:
            server_ssl_context(settings)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            key = f" / ssl_cert_key {settings.ssl_cert_key}" if settings.ssl_cert_key else ""
            print(
                f"error: cannot load the TLS certificate (ssl_cert {settings.ssl_cert}{key}): {exc}",
                file=sys.stderr,
            )
            return 1
    setup_logging(settings)
    for issue in config.warnings:
        print(f"warning: {issue}", file=sys.stderr)

    def ready(listeners: list[Listener]) -> None:
        names = {"proxy": "proxy", "ssl": "proxy (TLS)", "status": "status"}
        for li in listeners:
            print(f"fhirgate gateway: {names[li.kind]} listening on {li.url}", flush=True)
        print(
            f"fhirgate gateway: ready ({settings.workers} worker(s), "
            f"{len(config.services)} service(s), {len(config.routes)} route(s), "
            f"{len(config.plugins)} plugin(s))",
            flush=True,
        )

    node = Node(settings, config, args.config)
    try:
        return node.run(on_ready=ready)
    except OSError as exc:
        print(f"error: cannot listen: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # a worker failed to start; the reason is in the error log
        print(f"error: {exc}", file=sys.stderr)
        return 1
