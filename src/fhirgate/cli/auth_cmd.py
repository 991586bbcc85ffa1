"""`fhirgate auth-server`: the built-in OAuth 2.0 / OpenID Connect / SMART authorization server."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from fhirgate.cli.auth_store_cmd import add_store_options
from fhirgate.cli.serve import redact, serve, service_settings

#: The settings a worker process must see as the parent resolved them.
_PASSED_ON = (
    ("FHIRGATE_AUTH_DATABASE_URL", "auth_database"),
    ("FHIRGATE_AUTH_ISSUER", "auth_issuer"),
    ("FHIRGATE_AUTH_FHIR_BASE", "auth_fhir_base"),
    ("FHIRGATE_AUTH_PATIENT_SEARCH_URL", "auth_patient_search_url"),
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "auth-server",
        help="run the built-in OAuth 2.0 / OpenID Connect / SMART App Launch authorization server",
        description=(
            "Run the built-in authorization server. It listens on loopback by default; the gateway "
            "reaches it through a route (/auth in the examples). Signing keys are created on first "
            "start. Settings: these flags, then FHIRGATE_* environment variables, then fhirgate.toml."
        ),
    )
    add_store_options(p)  # --data-dir, --database, --settings, as keys/users/clients take them
    p.add_argument("--listen", dest="auth_listen", metavar="HOST:PORT", help="default 127.0.0.1:9081")
    p.add_argument(
        "--issuer", dest="auth_issuer", metavar="URL", help="public issuer URL (http://localhost:8000/auth)"
    )
    p.add_argument(
        "--fhir-base",
        dest="auth_fhir_base",
        metavar="URL",
        help="the FHIR base the tokens are for (http://localhost:8000/fhir)",
    )
    p.add_argument(
        "--patient-search-url",
        dest="auth_patient_search_url",
        metavar="URL",
        help="FHIR server the patient picker lists Patients from (default: patients linked to users)",
    )
    p.add_argument("--workers", dest="auth_workers", type=int, help="worker processes (default: cores)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    prepared = service_settings(
        args,
        (
            "data_dir",
            "auth_database_url",
            "auth_listen",
            "auth_issuer",
            "auth_fhir_base",
            "auth_workers",
            "auth_patient_search_url",
        ),
        "auth_listen",
    )
    if prepared is None:
        return 1
    settings, host, port = prepared
    for env, name in _PASSED_ON:
        value = getattr(settings, name)
        value = value() if callable(value) else value
        if value is not None:
            os.environ[env] = str(value)
    if args.settings:
        os.environ["FHIRGATE_SETTINGS_FILE"] = str(args.settings)

    from fhirgate.authserver.keys import KeyRing
    from fhirgate.authserver.store import AuthStore
    from fhirgate.storage.backend import DatabaseUrlError

    async def prepare() -> list[str]:
        """Create or migrate the store and the signing keys once, before the workers start."""
        store = await AuthStore.open(settings.auth_database())
        try:
            ring = KeyRing(store)
            kids = [(await ring.ensure_active(settings.auth_signing_alg)).kid]
            if settings.auth_signing_alg != "RS256":  # ID tokens are RS256
                kids.append((await ring.ensure_active("RS256")).kid)
            await ring.prune(settings.auth_access_token_lifetime)
            return kids
        finally:
            await store.close()

    database = redact(settings.auth_database())
    try:
        kids = asyncio.run(prepare())
    except (DatabaseUrlError, OSError) as exc:
        print(f"error: database {database}: {exc}", file=sys.stderr)
        return 1
    print(
        f"fhirgate auth-server: issuer {settings.auth_issuer} on http://{host}:{port} "
        f"(database {database}, signing key {kids[0]}, {settings.auth_workers} worker(s))",
        flush=True,
    )
    serve("fhirgate.authserver.app:create_app", host, port, settings.auth_workers)
    return 0
