"""The gateway accepts the authorization server's tokens: a real `fhirgate gateway` running
`examples/auth.yaml` (ports and URLs rewritten) in front of a recording upstream, and a real
`fhirgate auth-server` whose issuer is the gateway's `/auth` URL. The `openid-connect` plugin on
`/fhir` has only `issuer` and `audience_required`: it discovers the JWKS through the gateway itself.

A token from `fhirgate token` (private_key_jwt, the token endpoint discovered through the gateway)
reaches the upstream; no token, garbage, an expired token, a token for another audience and a
forged one are 401 and the upstream sees nothing."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from fhirgate.authserver.clients import Clients
from fhirgate.authserver.keys import KeyRing
from fhirgate.authserver.store import AuthStore
from tests.authserver.harness import with_store
from tests.e2e.procs import free_ports, stop_group
from tests.e2e.test_auth_server_cli import fhirgate, start_auth_server
from tests.harness import Upstream

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "auth.yaml"


@dataclass
class Stack:
    gateway: str
    issuer: str
    fhir_base: str
    upstream: Upstream
    database_url: str
    tmp: Path

    def store_call(self, action: Any) -> Any:
        return with_store(self.database_url, action)


def gateway_config(auth_port: int, upstream: str, issuer: str, fhir_base: str) -> dict[str, Any]:
    """examples/auth.yaml with this test's addresses."""
    config: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    auth_origin = f"http://127.0.0.1:{auth_port}"
    for service in config["services"]:
        if service["url"].startswith("http://127.0.0.1:9081"):
            service["url"] = service["url"].replace("http://127.0.0.1:9081", auth_origin)
        elif service["name"] == "fhir":
            service["url"] = upstream
            plugin = service["routes"][0]["plugins"][0]
            assert set(plugin["config"]) == {"issuer", "audience_required", "revocation_feed_url"}
            # issue 5 §3: the plugin accepts the tokens with only these two set
            plugin["config"] = {"issuer": issuer, "audience_required": [fhir_base]}
    return config


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("gateway-auth")
    gw_port, auth_port = free_ports(2)
    gateway = f"http://127.0.0.1:{gw_port}"
    issuer, fhir_base = f"{gateway}/auth", f"{gateway}/fhir"
    upstream = Upstream()
    config = tmp / "gateway.yaml"
    config.write_text(yaml.safe_dump(gateway_config(auth_port, upstream.url, issuer, fhir_base)))
    auth_proc, _ = start_auth_server(tmp, auth_port, workers=1, issuer=issuer, fhir_base=fhir_base)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRGATE_")}
    gw = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fhirgate.cli.main",
            "gateway",
            "--config",
            str(config),
            "--listen",
            f"127.0.0.1:{gw_port}",
            "--workers",
            "1",
        ],
        cwd=tmp,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{issuer}/jwks", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert gw.poll() is None, "the gateway exited"
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.05)
        yield Stack(gateway, issuer, fhir_base, upstream, f"sqlite:///{tmp / 'data' / 'auth.db'}", tmp)
    finally:
        stop_group(gw)
        stop_group(auth_proc)  # type: ignore[arg-type]
        upstream.close()


def test_metadata_through_the_gateway(stack: Stack) -> None:
    for path in (
        "/auth/.well-known/openid-configuration",
        "/.well-known/oauth-authorization-server/auth",
        "/fhir/.well-known/smart-configuration",  # open: the longer route wins over /fhir
    ):
        r = httpx.get(stack.gateway + path)
        assert r.status_code == 200, (path, r.text)
        assert r.json()["issuer"] == stack.issuer
        assert r.json()["token_endpoint"] == f"{stack.issuer}/token"
    assert stack.upstream.requests == []


def test_a_token_from_the_auth_server_passes(stack: Stack) -> None:
    key = ECKey.generate_key("P-384", private=True)

    async def register(store: AuthStore) -> str:
        client, _ = await Clients(store).create(
            {
                "grant_types": ["client_credentials"],
                "token_endpoint_auth_method": "private_key_jwt",
                "jwks": {"keys": [{**key.as_dict(private=False), "kid": "gw", "alg": "ES384"}]},
                "scope": "system/*.read",
            }
        )
        return client.client_id

    client_id = stack.store_call(register)
    key_file = stack.tmp / "client.jwk"
    key_file.write_text(json.dumps({**key.as_dict(private=True), "kid": "gw"}))
    got = fhirgate(
        stack.tmp, "token", "--client-id", client_id, "--private-key", str(key_file), "--issuer", stack.issuer
    )
    assert (got.returncode, got.stderr) == (0, "")
    token = got.stdout.strip()
    before = len(stack.upstream.requests)
    r = httpx.get(f"{stack.fhir_base}/Patient?_count=1", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    assert [q.target for q in stack.upstream.requests[before:]] == ["/Patient?_count=1"]


def _signed(stack: Stack, **changes: Any) -> str:
    """An access token signed with the auth server's own active key, claims changed."""

    async def sign(store: AuthStore) -> str:
        key = await KeyRing(store).active("RS256")
        assert key is not None
        now = int(time.time())
        claims = {
            "iss": stack.issuer,
            "sub": "c",
            "aud": stack.fhir_base,
            "client_id": "c",
            "scope": "system/*.read",
            "iat": now,
            "exp": now + 300,
            "jti": os.urandom(8).hex(),
        }
        claims.update(changes)
        return key.sign(claims, typ="at+jwt")

    token: str = stack.store_call(sign)
    return token


def _b64(obj: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def _part(token: str, index: int) -> dict[str, Any]:
    part = token.split(".")[index]
    value: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return value


@pytest.mark.parametrize(
    "case", ["no token", "garbage", "expired", "wrong aud", "wrong issuer", "forged", "alg none"]
)
def test_bad_tokens_are_refused_and_the_upstream_sees_nothing(stack: Stack, case: str) -> None:
    good = _signed(stack)
    now = int(time.time())
    token: str | None
    if case == "no token":
        token = None
    elif case == "garbage":
        token = "not-a-token"
    elif case == "expired":
        token = _signed(stack, iat=now - 7200, exp=now - 3600)
    elif case == "wrong aud":
        token = _signed(stack, aud="http://127.0.0.1:9/other")
    elif case == "wrong issuer":
        token = _signed(stack, iss="http://127.0.0.1:9/auth")
    elif case == "forged":  # the server's kid, another key
        other = RSAKey.generate_key(2048, private=True)
        token = jwt.encode(_part(good, 0), _part(good, 1), other, algorithms=["RS256"])
    else:
        token = f"{_b64({'alg': 'none', 'typ': 'at+jwt'})}.{_b64(_part(good, 1))}."
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    before = len(stack.upstream.requests)
    r = httpx.get(f"{stack.fhir_base}/Patient", headers=headers)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"].startswith("Bearer ")
    assert len(stack.upstream.requests) == before
    # the same request with the good token reaches the upstream
    assert (
        httpx.get(f"{stack.fhir_base}/Patient", headers={"Authorization": f"Bearer {good}"}).status_code
        == 200
    )
    assert len(stack.upstream.requests) == before + 1
