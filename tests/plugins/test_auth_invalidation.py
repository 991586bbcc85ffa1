"""Kong's invalidation cases (`spec/03-plugins/16-jwt/04-invalidations_spec.lua` and key-auth's
counterpart, kong-anchor.md §1.5) for DB-less reloads: one running gateway, keep-alive clients
opened before the reload and used after it, the configuration swapped in place as SIGHUP does.

After a credential or consumer is removed or changed, requests on the already-open connections are
refused with Kong's exact answer and never reach the upstream; a token verified (and cached) before
the reload is not accepted on the strength of that cache."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import httpx
import pytest

from fhirgate.gateway.plugins.jwt.handler import Handler
from tests.harness import GatewayHandle, Reply, Upstream, running_gateway
from tests.tokens.jwtkit import keypair, sign

ALICE_ID = "5b0c1d2e-0000-4000-8000-0000000a11ce"
BOB_ID = "5b0c1d2e-0000-4000-8000-000000000b0b"
JWT_CRED_ID = "5b0c1d2e-0000-4000-8000-00000000c001"
KEY_CRED_ID = "5b0c1d2e-0000-4000-8000-00000000c002"
SECRET = "invalidation-secret-of-32-bytes-at-least"
RS_KEY = "rs-issuer"
BEARER_INVALID = 'Bearer error="invalid_token"'
NO_CREDENTIALS = {"message": "No credentials found for given 'iss'"}
KEY_INVALID = {"message": "Unauthorized"}
CONSUMER_HEADERS = (
    "x-consumer-id",
    "x-consumer-custom-id",
    "x-consumer-username",
    "x-credential-identifier",
    "x-anonymous-consumer",
)


def base_config(upstream_url: str) -> dict[str, Any]:
    """Two routes (`/jwt`, `/key`), two consumers: alice holds a jwt HS256 credential, an RS256
    credential and a key-auth key; bob holds only a key-auth key (and stays throughout)."""
    return {
        "_format_version": "3.0",
        "services": [
            {
                "name": "s1",
                "url": upstream_url,
                "routes": [
                    {"name": "jwt", "paths": ["/jwt"], "plugins": [{"name": "jwt"}]},
                    {"name": "key", "paths": ["/key"], "plugins": [{"name": "key-auth"}]},
                ],
            }
        ],
        "consumers": [
            {
                "id": ALICE_ID,
                "username": "alice",
                "custom_id": "alice-custom",
                "jwt_secrets": [
                    {"id": JWT_CRED_ID, "key": "alice-iss", "secret": SECRET},
                    {"key": RS_KEY, "algorithm": "RS256", "rsa_public_key": keypair("rsa").public_pem},
                ],
                "keyauth_credentials": [{"id": KEY_CRED_ID, "key": "alice-key"}],
            },
            {"id": BOB_ID, "username": "bob", "keyauth_credentials": [{"key": "bob-key"}]},
        ],
    }


def alice(cfg: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in cfg["consumers"] if c["username"] == "alice")
    return found


def hs_token(iss: str = "alice-iss") -> str:
    now = int(time.time())
    return sign({"iss": iss, "iat": now, "exp": now + 3600}, key=SECRET.encode())


def rs_token() -> str:
    now = int(time.time())
    return sign({"iss": RS_KEY, "iat": now, "exp": now + 3600}, "RS256", keypair("rsa").private)


class Clients:
    """Keep-alive clients opened before the reload; each request checks what the upstream saw."""

    def __init__(self, gw: GatewayHandle, upstream: Upstream) -> None:
        self.gw = gw
        self.upstream = upstream
        self.clients = [httpx.Client(base_url=gw.url, timeout=5) for _ in range(2)]
        self.local_addresses: list[set[Any]] = [set() for _ in self.clients]

    def close(self) -> None:
        for c in self.clients:
            c.close()

    def get(self, path: str, client: int = 0, **headers: str) -> httpx.Response:
        res = self.clients[client].get(path, headers=headers)
        stream = res.extensions["network_stream"]
        self.local_addresses[client].add(stream.get_extra_info("client_addr"))
        return res

    def jwt(self, token: str, client: int = 0) -> httpx.Response:
        return self.get("/jwt/Patient/1", client, Authorization=f"Bearer {token}")

    def key(self, key: str, client: int = 0) -> httpx.Response:
        return self.get("/key/Patient/1", client, apikey=key)

    def accepted(self, send: Any, username: str, credential: str) -> None:
        before = len(self.upstream.requests)
        res: httpx.Response = send()
        assert res.status_code == 200, res.text
        assert len(self.upstream.requests) == before + 1
        seen = self.upstream.requests[-1]
        assert seen.header("x-consumer-username") == username
        assert seen.header("x-credential-identifier") == credential
        assert seen.header("x-anonymous-consumer") is None

    def refused(self, send: Any, body: dict[str, str], www: str | None) -> None:
        before = len(self.upstream.requests)
        res: httpx.Response = send()
        assert len(self.upstream.requests) == before, "the upstream must see nothing"
        assert res.status_code == 401, res.text
        assert res.json() == body
        assert res.headers.get("www-authenticate") == www
        assert res.headers["content-type"].startswith("application/json")


@pytest.fixture
def echo(upstream: Upstream) -> Upstream:
    upstream.handler = lambda req: Reply(body=json.dumps({"path": req.target}).encode())
    return upstream


@pytest.fixture
def setup(echo: Upstream) -> Iterator[tuple[GatewayHandle, Clients, dict[str, Any]]]:
    cfg = base_config(echo.url)
    with running_gateway(copy.deepcopy(cfg)) as gw:
        clients = Clients(gw, echo)
        try:
            yield gw, clients, cfg
        finally:
            clients.close()


def connections_reused(clients: Clients) -> None:
    """Every request of each client went over the one keep-alive connection it opened before the
    reload (the same local address throughout: no reconnect)."""
    assert [len(addresses) for addresses in clients.local_addresses] == [1, 1]


def jwt_handler(gw: GatewayHandle) -> Handler:
    found = [s.handler for s in gw.gateway.state.pipeline.specs if isinstance(s.handler, Handler)]
    assert len(found) == 1
    return found[0]


# --- jwt ---------------------------------------------------------------------------------------


def test_jwt_credential_deleted(setup: tuple[GatewayHandle, Clients, dict[str, Any]]) -> None:
    gw, api, cfg = setup
    token = hs_token()
    for i in (0, 1):
        api.accepted(partial(api.jwt, token, i), "alice", "alice-iss")
    alice(cfg)["jwt_secrets"] = [s for s in alice(cfg)["jwt_secrets"] if s["key"] != "alice-iss"]
    gw.reload(copy.deepcopy(cfg))
    for i in (0, 1):
        api.refused(partial(api.jwt, token, i), NO_CREDENTIALS, BEARER_INVALID)
    # the other credential of the same consumer is untouched
    api.accepted(partial(api.jwt, rs_token()), "alice", RS_KEY)
    connections_reused(api)


def test_jwt_credential_key_changed(setup: tuple[GatewayHandle, Clients, dict[str, Any]]) -> None:
    gw, api, cfg = setup
    old, new = hs_token("alice-iss"), hs_token("alice-iss-2")
    api.accepted(partial(api.jwt, old), "alice", "alice-iss")
    api.refused(partial(api.jwt, new, 1), NO_CREDENTIALS, BEARER_INVALID)
    alice(cfg)["jwt_secrets"][0]["key"] = "alice-iss-2"  # Kong's PATCH of the key: same id, new key
    gw.reload(copy.deepcopy(cfg))
    for i in (0, 1):
        api.refused(partial(api.jwt, old, i), NO_CREDENTIALS, BEARER_INVALID)
        api.accepted(partial(api.jwt, new, i), "alice", "alice-iss-2")
    connections_reused(api)


def test_jwt_consumer_deleted(setup: tuple[GatewayHandle, Clients, dict[str, Any]]) -> None:
    gw, api, cfg = setup
    hs, rs = hs_token(), rs_token()
    api.accepted(partial(api.jwt, hs), "alice", "alice-iss")
    api.accepted(partial(api.jwt, rs, 1), "alice", RS_KEY)
    cfg["consumers"] = [c for c in cfg["consumers"] if c["username"] != "alice"]  # cascades
    gw.reload(copy.deepcopy(cfg))
    for i in (0, 1):
        api.refused(partial(api.jwt, hs, i), NO_CREDENTIALS, BEARER_INVALID)
        api.refused(partial(api.jwt, rs, i), NO_CREDENTIALS, BEARER_INVALID)
    connections_reused(api)


def test_a_cached_token_does_not_outlive_its_credential(
    setup: tuple[GatewayHandle, Clients, dict[str, Any]],
) -> None:
    """An RS256 token verified twice (the second a cache hit) is refused once its credential is gone,
    and again once a credential with the same key but another public key replaces it."""
    gw, api, cfg = setup
    token = rs_token()
    api.accepted(partial(api.jwt, token), "alice", RS_KEY)
    api.accepted(partial(api.jwt, token, 1), "alice", RS_KEY)
    assert token in jwt_handler(gw).token_cache
    assert jwt_handler(gw).token_cache.hits == 1
    alice(cfg)["jwt_secrets"] = [s for s in alice(cfg)["jwt_secrets"] if s["key"] != RS_KEY]
    gw.reload(copy.deepcopy(cfg))
    for i in (0, 1):
        api.refused(partial(api.jwt, token, i), NO_CREDENTIALS, BEARER_INVALID)
    # the key comes back, bound to another public key: the old token's signature no longer verifies
    alice(cfg)["jwt_secrets"].append(
        {"key": RS_KEY, "algorithm": "RS256", "rsa_public_key": keypair("rsa#2").public_pem}
    )
    gw.reload(copy.deepcopy(cfg))
    api.refused(partial(api.jwt, token), {"message": "Invalid signature"}, BEARER_INVALID)
    connections_reused(api)


def test_a_cached_token_does_not_outlive_its_consumer(
    setup: tuple[GatewayHandle, Clients, dict[str, Any]],
) -> None:
    """The credential moves to another consumer: the cached identity (alice) is not served."""
    gw, api, cfg = setup
    token = rs_token()
    api.accepted(partial(api.jwt, token), "alice", RS_KEY)
    api.accepted(partial(api.jwt, token, 1), "alice", RS_KEY)
    assert jwt_handler(gw).token_cache.hits == 1
    moved = [s for s in alice(cfg)["jwt_secrets"] if s["key"] == RS_KEY]
    alice(cfg)["jwt_secrets"] = [s for s in alice(cfg)["jwt_secrets"] if s["key"] != RS_KEY]
    next(c for c in cfg["consumers"] if c["username"] == "bob")["jwt_secrets"] = moved
    gw.reload(copy.deepcopy(cfg))
    api.accepted(partial(api.jwt, token, 1), "bob", RS_KEY)
    assert api.upstream.requests[-1].header("x-consumer-id") == BOB_ID
    api.accepted(partial(api.jwt, token), "bob", RS_KEY)
    connections_reused(api)


# --- key-auth ------------------------------------------------------------------------------------


def test_key_auth_key_deleted(setup: tuple[GatewayHandle, Clients, dict[str, Any]]) -> None:
    gw, api, cfg = setup
    for i in (0, 1):
        api.accepted(partial(api.key, "alice-key", i), "alice", KEY_CRED_ID)
    alice(cfg)["keyauth_credentials"] = []
    gw.reload(copy.deepcopy(cfg))
    for i in (0, 1):
        api.refused(partial(api.key, "alice-key", i), KEY_INVALID, "Key")
    # alice's jwt credential and bob's key still work
    api.accepted(partial(api.jwt, hs_token()), "alice", "alice-iss")
    bob = api.key("bob-key", 1)
    assert bob.status_code == 200
    assert api.upstream.requests[-1].header("x-consumer-username") == "bob"
    connections_reused(api)


def test_key_auth_key_changed(setup: tuple[GatewayHandle, Clients, dict[str, Any]]) -> None:
    gw, api, cfg = setup
    api.accepted(partial(api.key, "alice-key"), "alice", KEY_CRED_ID)
    api.refused(partial(api.key, "alice-key-2", 1), KEY_INVALID, "Key")
    alice(cfg)["keyauth_credentials"][0]["key"] = "alice-key-2"  # same credential id, new key
    gw.reload(copy.deepcopy(cfg))
    for i in (0, 1):
        api.refused(partial(api.key, "alice-key", i), KEY_INVALID, "Key")
        api.accepted(partial(api.key, "alice-key-2", i), "alice", KEY_CRED_ID)
    connections_reused(api)


def test_key_auth_consumer_deleted(setup: tuple[GatewayHandle, Clients, dict[str, Any]]) -> None:
    gw, api, cfg = setup
    api.accepted(partial(api.key, "alice-key"), "alice", KEY_CRED_ID)
    api.accepted(partial(api.key, "alice-key", 1), "alice", KEY_CRED_ID)
    cfg["consumers"] = [c for c in cfg["consumers"] if c["username"] != "alice"]
    gw.reload(copy.deepcopy(cfg))
    for i in (0, 1):
        api.refused(partial(api.key, "alice-key", i), KEY_INVALID, "Key")
    assert api.key("bob-key").status_code == 200
    assert api.upstream.requests[-1].header("x-consumer-id") == BOB_ID
    connections_reused(api)
