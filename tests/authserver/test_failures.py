"""An unexpected failure inside the authorization server reaches the client as RFC 6749 JSON
(`server_error`), never as a stack trace, and nothing secret reaches the log."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from fhirgate.authserver.oauth import OAuthServer
from tests.authserver.harness import RunningAuth, database, running_auth


@pytest.fixture
def auth(tmp_path: Path) -> Iterator[RunningAuth]:
    with database("sqlite", tmp_path) as url, running_auth(url) as running:
        yield running


def test_an_exception_in_the_core_is_a_server_error_without_a_trace(
    auth: RunningAuth, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    client_id, secret = auth.register(
        {"grant_types": ["client_credentials"], "token_endpoint_auth_method": "client_secret_post"}
    )
    assert secret is not None

    async def broken(self: OAuthServer, client_id: str) -> None:
        raise RuntimeError("database on fire at /secret/path")

    monkeypatch.setattr(OAuthServer, "load_client", broken)
    with caplog.at_level(logging.ERROR, logger="fhirgate.authserver"):
        r = auth.client.post(
            "/token",
            data={
                "grant_type": "client_credentials",
                "scope": "system/*.read",
                "client_id": client_id,
                "client_secret": secret,
            },
        )
    assert r.status_code == 500
    assert r.headers["cache-control"] == "no-store"
    assert r.json() == {
        "error": "server_error",
        "error_description": "the authorization server failed; the error is in its log",
    }
    assert "Traceback" not in r.text
    assert "fire" not in r.text
    logged = "\n".join(rec.getMessage() + (rec.exc_text or "") for rec in caplog.records)
    assert "unexpected error at /token" in logged
    assert secret not in logged
