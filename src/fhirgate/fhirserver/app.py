"""ASGI entry point: `create_app()` builds the FHIR server from the node settings
(`FHIRGATE_FHIR_*` environment variables, `fhirgate.toml`), so every uvicorn worker process
builds the same one."""

from __future__ import annotations

import os
from pathlib import Path

from fhirgate.fhirserver.api import FhirServer
from fhirgate.settings import Settings, load_settings


def server_from_settings(settings: Settings) -> FhirServer:
    return FhirServer(
        database_url=settings.fhir_database(),
        base_url=settings.fhir_base(),
        default_count=settings.fhir_default_count,
        max_count=settings.fhir_max_count,
        max_body=settings.fhir_max_body,
        auth_issuer=settings.fhir_auth_issuer,
    )


def create_app() -> FhirServer:
    settings_file = os.environ.get("FHIRGATE_SETTINGS_FILE")
    return server_from_settings(load_settings(Path(settings_file) if settings_file else None))
