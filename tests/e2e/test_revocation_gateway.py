"""Revocation end to end: a real authorization server issues a client_credentials token, a real
gateway (`openid-connect` with only `issuer`, `audience_required` and the revocation feed) admits
it in front of a real upstream; the client revokes it at `/revoke`; within seconds the gateway
answers 401 and the upstream sees nothing more."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fhirgate.gateway.plugins.openid_connect.handler import Handler
from tests.authserver.harness import FHIR_BASE, RunningAuth, running_auth
from tests.fhirserver.harness import database
from tests.harness import Upstream, running_gateway

WAIT = 10.0


@pytest.fixture
def auth(tmp_path: Path) -> Iterator[RunningAuth]:
    with database("sqlite", tmp_path) as url, running_auth(url) as running:
        yield running


def test_a_revoked_token_is_refused_by_the_gateway_within_seconds(auth: RunningAuth) -> None:
    upstream = Upstream()
    config = {
        "_format_version": "3.0",
        "services": [{"name": "fhir", "url": upstream.url, "routes": [{"name": "all", "paths": ["/"]}]}],
        "plugins": [
            {
                "name": "openid-connect",
                "config": {
                    "issuer": auth.issuer,
                    "audience_required": [FHIR_BASE],
                    "revocation_feed_url": auth.issuer + "/revocations",
                    "revocation_poll_interval": 0.2,
                },
            }
        ],
    }
    client_id, secret = auth.register(
        {"grant_types": ["client_credentials"], "token_endpoint_auth_method": "client_secret_basic"}
    )
    assert secret is not None
    issued = auth.client.post(
        "/token",
        data={"grant_type": "client_credentials", "scope": "system/*.read"},
        auth=(client_id, secret),
    )
    assert issued.status_code == 200, issued.text
    token = issued.json()["access_token"]
    other = auth.client.post(
        "/token",
        data={"grant_type": "client_credentials", "scope": "system/*.read"},
        auth=(client_id, secret),
    ).json()["access_token"]
    try:
        with running_gateway(config) as gw, httpx.Client(base_url=gw.url, timeout=10) as http:
            bearer = {"Authorization": f"Bearer {token}"}
            first = http.get("/Patient", headers=bearer)
            assert first.status_code == 200, first.text
            assert http.get("/Patient", headers=bearer).status_code == 200  # now from the token cache
            assert len(upstream.requests) == 2
            (handler,) = [
                s.handler for s in gw.gateway.state.pipeline.specs if isinstance(s.handler, Handler)
            ]
            assert handler.feed is not None

            revoked = auth.client.post("/revoke", data={"token": token}, auth=(client_id, secret))
            assert revoked.status_code == 200, revoked.text

            deadline = time.monotonic() + WAIT
            while True:
                r = http.get("/Patient", headers=bearer)
                if r.status_code == 401:
                    break
                assert r.status_code == 200, r.text
                assert time.monotonic() < deadline, "the gateway still admits the revoked token"
                time.sleep(0.05)
            assert r.headers["www-authenticate"].endswith(
                'error="invalid_token", error_description="the token has been revoked"'
            )
            seen = len(upstream.requests)
            for _ in range(3):
                assert http.get("/Patient", headers=bearer).status_code == 401
            assert len(upstream.requests) == seen, "the upstream must see nothing more"
            # the client's other token was not revoked
            assert http.get("/Patient", headers={"Authorization": f"Bearer {other}"}).status_code == 200
            assert handler.feed.failures == 0
            assert handler.feed.learned >= 1
    finally:
        upstream.close()
