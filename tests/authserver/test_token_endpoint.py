"""The token endpoint under attack, on both stores: every refusal is exact (status, RFC 6749 error
and description, `Cache-Control: no-store`, `WWW-Authenticate` when the Authorization header was
used) and leaves nothing behind (no `auth_jti` row for a refused assertion, no token row).

SMART Backend Services (RFC 7523 client assertions): `aud`, `exp`, `jti`, signature, `kid`, `alg`,
`iss`/`sub`, the client's registered method; the four algorithms from `jwks` and from a `jwks_uri`
served by a local HTTP server; `system/` scopes only. Client secrets: Basic (form-encoded before
base64, RFC 6749 §2.3.1), post, wrong and unknown. Request shape: one authentication method,
parameters once, form bodies only (UTF-8, size-capped), POST only, no password/implicit/JWT-bearer
grants. Rate limiting: failures counted, successes not.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import http.server
import json
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from fhirgate.authserver.ratelimit import FailureLimiter
from fhirgate.authserver.store import AuthStore, StoredClient
from tests.authserver.harness import RunningAuth, auth, running_auth

__all__ = ["auth"]

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CURVES = {"ES256": "P-256", "ES384": "P-384"}
ALGS = ("RS384", "ES384", "RS256", "ES256")


@functools.cache
def private_key(alg: str, n: int = 0) -> ECKey | RSAKey:
    """One private key per (alg, n), made once per test run (RSA generation is slow)."""
    if alg.startswith("ES"):
        return ECKey.generate_key(CURVES[alg], private=True)
    return RSAKey.generate_key(2048, private=True)


def public_jwk(alg: str, kid: str, n: int = 0) -> dict[str, Any]:
    return {**private_key(alg, n).as_dict(private=False), "kid": kid, "alg": alg}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_for(auth: RunningAuth, client_id: str, **claims: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "iss": client_id,
        "sub": client_id,
        "aud": auth.token_url,
        "exp": int(time.time()) + 240,
        "jti": secrets.token_hex(12),
    }
    body.update(claims)
    return {k: v for k, v in body.items() if v is not None}


def sign(alg: str, claims: dict[str, Any], kid: str | None = "k1", n: int = 0) -> str:
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    return jwt.encode(header, claims, private_key(alg, n), algorithms=[alg])


def assertion_client(auth: RunningAuth, alg: str = "ES384", scope: str = "system/*.read") -> str:
    client_id, _ = auth.register(
        {
            "grant_types": ["client_credentials"],
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": {"keys": [public_jwk(alg, "k1")]},
            "scope": scope,
        }
    )
    return client_id


def secret_client(auth: RunningAuth, method: str = "client_secret_basic") -> tuple[str, str]:
    client_id, secret = auth.register(
        {
            "grant_types": ["client_credentials"],
            "token_endpoint_auth_method": method,
            "scope": "system/*.read",
        }
    )
    assert secret is not None
    return client_id, secret


def form(assertion: str, scope: str | None = "system/*.read", **extra: str) -> dict[str, str]:
    data = {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE}
    data["client_assertion"] = assertion
    if scope is not None:
        data["scope"] = scope
    data.update(extra)
    return data


def refused(r: httpx.Response, status: int, error: str, description: str, basic: bool = False) -> None:
    """An exact RFC 6749 §5.2 refusal."""
    assert (r.status_code, r.json()) == (status, {"error": error, "error_description": description})
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["content-type"] == "application/json"
    challenge = r.headers.get("www-authenticate")
    if basic:
        assert challenge == f'Basic error="{error}", error_description="{description}"'
    else:
        assert challenge is None


def recorded(auth: RunningAuth, client_id: str) -> tuple[int, int]:
    """(auth_jti rows, auth_token rows) of a client."""
    jtis = auth.query("SELECT count(*) FROM auth_jti WHERE client_id = ?", (client_id,))
    tokens = auth.query("SELECT count(*) FROM auth_token WHERE client_id = ?", (client_id,))
    return int(jtis[0][0]), int(tokens[0][0])


def granted(r: httpx.Response, scope: str = "system/*.read") -> dict[str, Any]:
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body: dict[str, Any] = r.json()
    assert body["token_type"] == "Bearer"
    assert body["scope"] == scope
    return body


# --------------------------------------------------------------------------------------------
# Client assertions (RFC 7523, SMART Backend Services)


def _aud_missing(auth: RunningAuth) -> str:
    return f"the client assertion has no aud claim: it must be the token endpoint {auth.token_url}"


BAD_CLAIMS: dict[str, tuple[dict[str, Any], Any]] = {
    "wrong aud": (
        {"aud": "https://evil.example/token"},
        lambda auth: (
            "the client assertion's aud must be the token endpoint "
            f"{auth.token_url}, not 'https://evil.example/token'"
        ),
    ),
    "aud is the issuer": (
        {"aud": "__issuer__"},
        lambda auth: (
            f"the client assertion's aud must be the token endpoint {auth.token_url}, not '{auth.issuer}'"
        ),
    ),
    "missing aud": ({"aud": None}, _aud_missing),
    "expired": ({"exp": -120}, "the client assertion has expired (exp is in the past)"),
    "exp too far ahead": ({"exp": 360}, "the client assertion's exp is more than 300 seconds ahead"),
    "missing exp": ({"exp": None}, "the client assertion has no numeric exp claim"),
    "string exp": ({"exp": "9999999999"}, "the client assertion has no numeric exp claim"),
    "missing jti": ({"jti": None}, "the client assertion has no jti claim"),
    "iss is not sub": (
        {"iss": "someone-else"},
        "the client assertion's iss and sub must both be the client_id",
    ),
    "nbf in the future": ({"nbf": 200}, "the client assertion's nbf is in the future"),
}


@pytest.mark.parametrize("case", list(BAD_CLAIMS))
def test_bad_assertion_claims_are_refused_and_nothing_is_recorded(auth: RunningAuth, case: str) -> None:
    changes, expected = BAD_CLAIMS[case]
    client_id = assertion_client(auth)
    now = int(time.time())
    claims = dict(changes)
    for name in ("exp", "nbf"):
        if isinstance(claims.get(name), int):
            claims[name] = now + claims[name]
    if claims.get("aud") == "__issuer__":
        claims["aud"] = auth.issuer
    r = auth.client.post("/token", data=form(sign("ES384", claims_for(auth, client_id, **claims))))
    description = expected(auth) if callable(expected) else expected
    refused(r, 400, "invalid_client", description)
    assert recorded(auth, client_id) == (0, 0)


def test_exp_at_the_five_minute_ceiling_is_accepted(auth: RunningAuth) -> None:
    client_id = assertion_client(auth)
    exp = int(time.time()) + 295
    granted(auth.client.post("/token", data=form(sign("ES384", claims_for(auth, client_id, exp=exp)))))
    assert recorded(auth, client_id)[0] == 1


def test_aud_as_a_list_naming_the_token_endpoint_is_accepted(auth: RunningAuth) -> None:
    client_id = assertion_client(auth)
    claims = claims_for(auth, client_id, aud=["https://other.example/token", auth.token_url])
    granted(auth.client.post("/token", data=form(sign("ES384", claims))))


def test_reused_jti_is_refused_on_this_node_and_on_a_second_server_on_the_same_database(
    auth: RunningAuth,
) -> None:
    client_id = assertion_client(auth)
    with running_auth(auth.database_url, auth.backend) as second:
        claims = claims_for(auth, client_id, aud=[auth.token_url, second.token_url])
        data = form(sign("ES384", claims))
        granted(auth.client.post("/token", data=data))
        refused(
            auth.client.post("/token", data=data),
            400,
            "invalid_client",
            "the client assertion's jti was used before",
        )
        refused(
            second.client.post("/token", data=data),
            400,
            "invalid_client",
            "the client assertion's jti was used before",
        )
        # the same jti in a new assertion (new exp) is a replay too
        again = form(sign("ES384", {**claims, "exp": claims["exp"] + 5}))
        refused(
            second.client.post("/token", data=again),
            400,
            "invalid_client",
            "the client assertion's jti was used before",
        )
    assert recorded(auth, client_id)[0] == 1


def test_a_jti_is_per_client(auth: RunningAuth) -> None:
    jti = secrets.token_hex(8)
    for _ in range(2):
        client_id = assertion_client(auth)
        granted(auth.client.post("/token", data=form(sign("ES384", claims_for(auth, client_id, jti=jti)))))


def test_bad_signature(auth: RunningAuth) -> None:
    client_id = assertion_client(auth)
    forged = sign("ES384", claims_for(auth, client_id), n=1)  # another P-384 key, same kid
    refused(
        auth.client.post("/token", data=form(forged)),
        400,
        "invalid_client",
        "the client assertion's signature does not verify (bad_signature)",
    )
    head, _body, sig = sign("ES384", claims_for(auth, client_id)).split(".")
    tampered = ".".join([head, b64(json.dumps(claims_for(auth, client_id, sub="x")).encode()), sig])
    r = auth.client.post("/token", data=form(tampered))
    refused(r, 400, "invalid_client", "unknown client 'x'")
    tampered = ".".join([head, b64(json.dumps(claims_for(auth, client_id)).encode()), sig])
    refused(
        auth.client.post("/token", data=form(tampered)),
        400,
        "invalid_client",
        "the client assertion's signature does not verify (bad_signature)",
    )
    assert recorded(auth, client_id) == (0, 0)


def test_unknown_kid_and_missing_kid(auth: RunningAuth) -> None:
    client_id = assertion_client(auth)
    r = auth.client.post("/token", data=form(sign("ES384", claims_for(auth, client_id), kid="k2")))
    refused(r, 400, "invalid_client", "no key with kid 'k2' in the client's JWK Set")
    # one registered key: an assertion without kid is verified with it
    granted(auth.client.post("/token", data=form(sign("ES384", claims_for(auth, client_id), kid=None))))


def test_alg_none_is_refused(auth: RunningAuth) -> None:
    client_id = assertion_client(auth)
    header = b64(json.dumps({"alg": "none", "kid": "k1"}).encode())
    token = f"{header}.{b64(json.dumps(claims_for(auth, client_id)).encode())}."
    refused(
        auth.client.post("/token", data=form(token)),
        400,
        "invalid_client",
        "client assertion alg 'none' is not accepted: use one of ES256, ES384, RS256, RS384",
    )
    assert recorded(auth, client_id) == (0, 0)


@pytest.mark.parametrize("alg", ["ES384", "RS384"])
def test_hs256_keyed_with_the_clients_public_key_is_refused(auth: RunningAuth, alg: str) -> None:
    client_id = assertion_client(auth, alg)
    key = private_key(alg)
    secrets_tried = [
        key.as_pem(private=False),
        json.dumps(key.as_dict(private=False)).encode(),
    ]
    for secret in secrets_tried:
        signing_input = (
            b64(json.dumps({"alg": "HS256", "kid": "k1"}).encode())
            + "."
            + b64(json.dumps(claims_for(auth, client_id)).encode())
        )
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        refused(
            auth.client.post("/token", data=form(f"{signing_input}.{b64(mac)}")),
            400,
            "invalid_client",
            "client assertion alg 'HS256' is not accepted: use one of ES256, ES384, RS256, RS384",
        )
    assert recorded(auth, client_id) == (0, 0)


def test_alg_other_than_the_keys_registered_alg_is_refused(auth: RunningAuth) -> None:
    client_id = assertion_client(auth, "RS384")
    r = auth.client.post("/token", data=form(sign("RS256", claims_for(auth, client_id))))
    refused(r, 400, "invalid_client", "key 'k1' is registered for RS384, not RS256")


def test_sub_of_an_unknown_client_and_a_client_with_another_method(auth: RunningAuth) -> None:
    r = auth.client.post("/token", data=form(sign("ES384", claims_for(auth, "nobody"))))
    refused(r, 400, "invalid_client", "unknown client 'nobody'")
    secret_id, _ = secret_client(auth)
    r = auth.client.post("/token", data=form(sign("ES384", claims_for(auth, secret_id))))
    refused(
        r,
        400,
        "invalid_client",
        f"client '{secret_id}' is registered with token_endpoint_auth_method "
        "client_secret_basic, not private_key_jwt",
    )
    assert recorded(auth, secret_id) == (0, 0)


def test_client_id_parameter_must_match_the_assertion(auth: RunningAuth) -> None:
    client_id = assertion_client(auth)
    other = assertion_client(auth)
    data = form(sign("ES384", claims_for(auth, client_id)), client_id=other)
    refused(
        auth.client.post("/token", data=data),
        400,
        "invalid_client",
        "client_id differs from the client assertion's sub",
    )
    data = form(sign("ES384", claims_for(auth, client_id)), client_id=client_id)
    granted(auth.client.post("/token", data=data))


def test_wrong_or_missing_assertion_type_and_missing_or_garbage_assertion(auth: RunningAuth) -> None:
    client_id = assertion_client(auth)
    good = sign("ES384", claims_for(auth, client_id))
    expected = (
        "client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer "
        "(RFC 7523 section 2.2)"
    )
    for value in ("urn:ietf:params:oauth:client-assertion-type:saml2-bearer", "jwt-bearer"):
        data = form(good, client_assertion_type=value)
        refused(auth.client.post("/token", data=data), 400, "invalid_client", expected)
    data = form(good)
    del data["client_assertion_type"]
    refused(auth.client.post("/token", data=data), 400, "invalid_client", expected)
    data = form(good)
    del data["client_assertion"]
    refused(auth.client.post("/token", data=data), 400, "invalid_client", "client_assertion is missing")
    refused(
        auth.client.post("/token", data=form("not.a.jwt")),
        400,
        "invalid_client",
        "Invalid JWT assertion.",
    )
    assert recorded(auth, client_id) == (0, 0)


# --------------------------------------------------------------------------------------------
# The four algorithms, from jwks and from jwks_uri


class JwksServer:
    """A tiny HTTP server publishing JWK Sets at /{name}.json (what a client's jwks_uri is)."""

    def __init__(self) -> None:
        self.docs: dict[str, bytes] = {}
        self.hits: dict[str, int] = {}
        docs, hits = self.docs, self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = docs.get(self.path)
                hits[self.path] = hits.get(self.path, 0) + 1
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def publish(self, name: str, keys: list[dict[str, Any]]) -> str:
        self.docs[f"/{name}.json"] = json.dumps({"keys": keys}).encode()
        return f"http://127.0.0.1:{self.server.server_address[1]}/{name}.json"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    try:
        yield server
    finally:
        server.close()


@pytest.mark.parametrize("alg", ALGS)
def test_every_assertion_algorithm_from_jwks_and_from_jwks_uri(
    auth: RunningAuth, jwks_server: JwksServer, alg: str
) -> None:
    from_jwks = assertion_client(auth, alg)
    granted(auth.client.post("/token", data=form(sign(alg, claims_for(auth, from_jwks)))))

    name = f"{auth.backend}-{alg}-{secrets.token_hex(4)}"
    # the client's set also holds an RSA key of another kid: the kid picks the key
    uri = jwks_server.publish(name, [public_jwk("RS256", "other", 1), public_jwk(alg, "k1")])
    from_uri, _ = auth.register(
        {
            "grant_types": ["client_credentials"],
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks_uri": uri,
            "scope": "system/*.read system/Patient.rs",
        }
    )
    for _ in range(2):  # the second request is served from the cached key set
        r = auth.client.post(
            "/token", data=form(sign(alg, claims_for(auth, from_uri)), scope="system/Patient.rs")
        )
        granted(r, "system/Patient.rs")
    assert jwks_server.hits[f"/{name}.json"] == 1
    r = auth.client.post("/token", data=form(sign(alg, claims_for(auth, from_uri), kid=None)))
    refused(
        r,
        400,
        "invalid_client",
        "the client assertion has no kid and the client has several keys: set kid",
    )


def test_jwks_uri_fetched_again_for_a_new_kid_at_most_once_per_cooldown(
    auth: RunningAuth, jwks_server: JwksServer
) -> None:
    name = f"rotating-{auth.backend}"
    uri = jwks_server.publish(name, [public_jwk("ES384", "k1")])
    client_id, _ = auth.register(
        {
            "grant_types": ["client_credentials"],
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks_uri": uri,
        }
    )
    granted(auth.client.post("/token", data=form(sign("ES384", claims_for(auth, client_id)))))
    # the client rotates: a new key (another kid) in its set, the old one gone
    jwks_server.publish(name, [public_jwk("ES384", "k2", 1)])
    granted(auth.client.post("/token", data=form(sign("ES384", claims_for(auth, client_id), kid="k2", n=1))))
    assert jwks_server.hits[f"/{name}.json"] == 2
    # unknown kids within the cooldown: refused without another fetch
    for kid in ("k3", "k4"):
        r = auth.client.post("/token", data=form(sign("ES384", claims_for(auth, client_id), kid=kid)))
        refused(r, 400, "invalid_client", f"no key with kid '{kid}' in the client's JWK Set")
    assert jwks_server.hits[f"/{name}.json"] == 2


def test_unreachable_jwks_uri_is_invalid_client(auth: RunningAuth, jwks_server: JwksServer) -> None:
    uri = jwks_server.publish("gone", [])
    del jwks_server.docs["/gone.json"]
    client_id, _ = auth.register(
        {
            "grant_types": ["client_credentials"],
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks_uri": uri,
        }
    )
    message = f"could not read the client's jwks_uri '{uri}': FetchError (not fetched again for 10 seconds)"
    r = auth.client.post("/token", data=form(sign("ES384", claims_for(auth, client_id))))
    refused(r, 400, "invalid_client", message)
    assert recorded(auth, client_id) == (0, 0)
    hits = jwks_server.hits["/gone.json"]
    # a failing jwks_uri is not fetched again at once: a stream of assertions cannot hold the
    # server's threads on a slow or dead host
    again = auth.client.post("/token", data=form(sign("ES384", claims_for(auth, client_id))))
    refused(again, 400, "invalid_client", message)
    assert jwks_server.hits["/gone.json"] == hits


# --------------------------------------------------------------------------------------------
# Scopes: system/ only


def test_scopes_system_only_registered_only_and_required(auth: RunningAuth) -> None:
    client_id = assertion_client(auth, scope="system/*.read system/Observation.rs")

    def ask(scope: str | None) -> httpx.Response:
        return auth.client.post("/token", data=form(sign("ES384", claims_for(auth, client_id)), scope=scope))

    for scope in ("patient/*.read", "user/Observation.rs", "system/*.read patient/Patient.read", "openid"):
        first = next(s for s in scope.split() if not s.startswith("system/"))
        refused(
            ask(scope),
            400,
            "invalid_scope",
            f"scope '{first}' is not a system/ scope: client_credentials grants system/ scopes only",
        )
    refused(
        ask("system/Patient.cruds"),
        400,
        "invalid_scope",
        f"scope 'system/Patient.cruds' is not registered for client '{client_id}'",
    )
    refused(ask(None), 400, "invalid_scope", "scope is required: ask for system/ scopes")
    refused(
        ask("system/*.read  system/Observation.rs"),
        400,
        "invalid_scope",
        "scope must be scope tokens separated by single spaces",
    )
    refused(ask("system/*.read system/*.read"), 400, "invalid_scope", "scope lists a scope twice")
    assert recorded(auth, client_id)[1] == 0
    granted(ask("system/*.read system/Observation.rs"), "system/*.read system/Observation.rs")


# --------------------------------------------------------------------------------------------
# Client secrets


def basic(client_id: str, secret: str, encode: bool = True) -> dict[str, str]:
    if encode:
        client_id, secret = quote(client_id, safe=""), quote(secret, safe="")
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


GRANT = {"grant_type": "client_credentials", "scope": "system/*.read"}


def known_secret_client(auth: RunningAuth, client_id: str, secret: str, method: str) -> None:
    """A client with an id and secret chosen here (generated secrets are URL-safe, so they cannot
    show the RFC 6749 §2.3.1 decoding), stored as `fhirgate clients create` stores one."""
    metadata = json.dumps(
        {
            "grant_types": ["client_credentials"],
            "response_types": [],
            "token_endpoint_auth_method": method,
            "scope": "system/*.read",
        }
    )
    secret_hash = "sha256$" + hashlib.sha256(secret.encode()).hexdigest()

    async def go(store: AuthStore) -> None:
        async with store.write() as s:
            assert await s.insert_client(StoredClient(client_id, metadata, secret_hash, 0))

    auth._store(go)


def test_client_secret_basic_is_form_decoded_after_base64(auth: RunningAuth) -> None:
    client_id = f"svc:{auth.backend} é+%/{secrets.token_hex(3)}"
    secret = "p@ss:w0rd+&=%/ ü?" + secrets.token_hex(4)
    known_secret_client(auth, client_id, secret, "client_secret_basic")
    granted(auth.client.post("/token", data=GRANT, headers=basic(client_id, secret)))
    # '+' is a space in form encoding (what Authlib's and requests' clients send for a space)
    plus_encoded = quote(client_id, safe="").replace("%20", "+"), quote(secret, safe="").replace("%20", "+")
    granted(auth.client.post("/token", data=GRANT, headers=basic(*plus_encoded, encode=False)))
    # unencoded: the ':' in the client_id splits it wrongly, so the client is unknown
    r = auth.client.post("/token", data=GRANT, headers=basic(client_id, secret, encode=False))
    refused(r, 401, "invalid_client", "unknown client 'svc'", basic=True)
    # client_secret_post carries the same values form-encoded by the body itself
    post_id = f"post {client_id}"
    known_secret_client(auth, post_id, secret, "client_secret_post")
    granted(auth.client.post("/token", data={**GRANT, "client_id": post_id, "client_secret": secret}))


def test_wrong_secret_unknown_client_and_bad_basic_headers(auth: RunningAuth) -> None:
    client_id, secret = secret_client(auth)
    r = auth.client.post("/token", data=GRANT, headers=basic(client_id, secret + "x"))
    refused(r, 401, "invalid_client", "wrong client secret", basic=True)
    r = auth.client.post("/token", data=GRANT, headers=basic("nobody", secret))
    refused(r, 401, "invalid_client", "unknown client 'nobody'", basic=True)
    r = auth.client.post("/token", data=GRANT, headers={"Authorization": "Bearer abc"})
    refused(
        r,
        401,
        "invalid_client",
        "the Authorization header must be HTTP Basic client credentials here",
        basic=True,
    )
    r = auth.client.post("/token", data=GRANT, headers={"Authorization": "Basic %%%"})
    refused(
        r,
        401,
        "invalid_client",
        "the Authorization header is not valid base64 of client_id:secret",
        basic=True,
    )
    r = auth.client.post("/token", data=GRANT, headers=basic(client_id, "", encode=False))
    refused(r, 401, "invalid_client", "the Authorization header must carry client_id:secret", basic=True)
    r = auth.client.post("/token", data={**GRANT, "client_id": "other"}, headers=basic(client_id, secret))
    refused(
        r, 401, "invalid_client", "client_id in the body differs from the Authorization header", basic=True
    )

    post_id, post_secret = secret_client(auth, "client_secret_post")
    r = auth.client.post("/token", data={**GRANT, "client_id": post_id, "client_secret": "nope"})
    refused(r, 400, "invalid_client", "wrong client secret")
    r = auth.client.post("/token", data={**GRANT, "client_id": "nobody", "client_secret": "nope"})
    refused(r, 400, "invalid_client", "unknown client 'nobody'")
    r = auth.client.post("/token", data={**GRANT, "client_secret": post_secret})
    refused(r, 400, "invalid_client", "client_id is missing")
    # each client only with the method it registered
    r = auth.client.post("/token", data=GRANT, headers=basic(post_id, post_secret))
    refused(
        r,
        401,
        "invalid_client",
        f"client '{post_id}' is registered with token_endpoint_auth_method client_secret_post, "
        "not client_secret_basic",
        basic=True,
    )
    r = auth.client.post("/token", data={**GRANT, "client_id": client_id, "client_secret": secret})
    refused(
        r,
        400,
        "invalid_client",
        f"client '{client_id}' is registered with token_endpoint_auth_method client_secret_basic, "
        "not client_secret_post",
    )
    r = auth.client.post("/token", data={**GRANT, "client_id": client_id})
    refused(
        r,
        400,
        "invalid_client",
        "client authentication none is not accepted here; use one of client_secret_basic, "
        "client_secret_post, private_key_jwt",
    )
    assert recorded(auth, client_id)[1] == 0


# --------------------------------------------------------------------------------------------
# Request shape


def test_two_client_authentication_methods_at_once(auth: RunningAuth) -> None:
    client_id, secret = secret_client(auth)
    jwt_client = assertion_client(auth)
    assertion = sign("ES384", claims_for(auth, jwt_client))
    basic_text = "HTTP Basic (client_secret_basic)"
    post_text = "client_secret in the body (client_secret_post)"
    jwt_text = "client_assertion (private_key_jwt)"
    cases = [
        (
            basic(client_id, secret),
            {**GRANT, "client_id": client_id, "client_secret": secret},
            [basic_text, post_text],
        ),
        (basic(client_id, secret), form(assertion), [basic_text, jwt_text]),
        ({}, {**form(assertion), "client_id": jwt_client, "client_secret": secret}, [post_text, jwt_text]),
        (
            basic(client_id, secret),
            {**form(assertion), "client_secret": secret},
            [basic_text, post_text, jwt_text],
        ),
    ]
    for headers, data, named in cases:
        r = auth.client.post("/token", data=data, headers=headers)
        refused(
            r,
            400,
            "invalid_request",
            "use exactly one client authentication method; this request used " + " and ".join(named),
        )
    assert recorded(auth, jwt_client) == (0, 0)
    granted(auth.client.post("/token", data=form(assertion)))  # the assertion was never consumed


def test_repeated_parameters_are_refused(auth: RunningAuth) -> None:
    client_id, secret = secret_client(auth)
    for body in (
        "grant_type=client_credentials&scope=system/*.read&scope=system/Patient.rs",
        "grant_type=client_credentials&grant_type=client_credentials&scope=system/*.read",
        "grant_type=client_credentials&scope=system%2F*.read&scope=",
    ):
        r = auth.client.post(
            "/token",
            content=body,
            headers={**basic(client_id, secret), "Content-Type": "application/x-www-form-urlencoded"},
        )
        name = "grant_type" if body.count("grant_type") == 2 else "scope"
        refused(r, 400, "invalid_request", f"parameter {name} is repeated: send each parameter once")
    jwt_client = assertion_client(auth)
    assertion = sign("ES384", claims_for(auth, jwt_client))
    body = (
        f"grant_type=client_credentials&scope=system/*.read&client_assertion_type={ASSERTION_TYPE}"
        f"&client_assertion={assertion}&client_assertion={sign('ES384', claims_for(auth, jwt_client))}"
    )
    r = auth.client.post(
        "/token", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    refused(r, 400, "invalid_request", "parameter client_assertion is repeated: send each parameter once")
    assert recorded(auth, jwt_client) == (0, 0)


@pytest.mark.parametrize(
    ("content_type", "body", "description"),
    [
        ("application/json", b'{"grant_type": "client_credentials"}', "not application/json"),
        ("text/plain", b"grant_type=client_credentials", "not text/plain"),
        (None, b"grant_type=client_credentials", "not none"),
        ("multipart/form-data; boundary=x", b"--x--", "not multipart/form-data"),
        ("application/x-www-form-urlencoded", b"grant_type=client_credentials&scope=\xff", "utf8"),
        ("application/x-www-form-urlencoded", b"grant_type=client_%ff", "utf8"),
        ("application/x-www-form-urlencoded", b"grant_type", "utf8"),
        ("application/x-www-form-urlencoded", b"a=" + b"x" * (64 * 1024 + 1), "big"),
    ],
)
def test_bodies_that_are_not_a_utf8_form(
    auth: RunningAuth, content_type: str | None, body: bytes, description: str
) -> None:
    client_id, secret = secret_client(auth)
    headers = basic(client_id, secret)
    if content_type is not None:
        headers["Content-Type"] = content_type
    r = auth.client.post("/token", content=body, headers=headers)
    expected = {
        "utf8": "the body is not valid UTF-8 form encoding",
        "big": "the body is larger than 65536 bytes",
    }.get(description, f"the body must be application/x-www-form-urlencoded, {description}")
    refused(r, 400, "invalid_request", expected)


def test_empty_body(auth: RunningAuth) -> None:
    r = auth.client.post("/token", content=b"", headers={"Content-Type": "application/x-www-form-urlencoded"})
    refused(r, 400, "invalid_request", "grant_type is missing")


@pytest.mark.parametrize(
    "grant_type",
    ["password", "implicit", "token", "urn:ietf:params:oauth:grant-type:jwt-bearer", "device_code"],
)
def test_unsupported_grant_types(auth: RunningAuth, grant_type: str) -> None:
    client_id, secret = secret_client(auth)
    data = {"grant_type": grant_type, "username": "u", "password": "p", "assertion": "x.y.z"}
    r = auth.client.post("/token", data=data, headers=basic(client_id, secret))
    assert r.status_code == 400
    description = r.json()["error_description"]
    supported = description.removeprefix(f"grant_type '{grant_type}' is not supported; use ").split(", ")
    assert "client_credentials" in supported
    assert not {"password", "implicit", "token", grant_type} & set(supported)
    refused(r, 400, "unsupported_grant_type", description)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_token_endpoint_takes_post_only(auth: RunningAuth, method: str) -> None:
    r = auth.client.request(method, "/token", params={"grant_type": "client_credentials"})
    assert r.headers["allow"] == "POST"
    refused(r, 405, "invalid_request", "the token endpoint takes POST only (RFC 6749 section 3.2)")


# --------------------------------------------------------------------------------------------
# Rate limiting: failed client authentications per client and address, successes never counted


@pytest.fixture
def limit_3(auth: RunningAuth) -> Iterator[FailureLimiter]:
    before = auth.app.token_limiter
    auth.app.token_limiter = FailureLimiter(3, 60.0)
    try:
        yield auth.app.token_limiter
    finally:
        auth.app.token_limiter = before


def test_failures_are_limited_per_client_successes_never_counted(
    auth: RunningAuth, limit_3: FailureLimiter
) -> None:
    client_id, secret = secret_client(auth)
    for _ in range(10):  # many successes count for nothing
        granted(auth.client.post("/token", data=GRANT, headers=basic(client_id, secret)))
    for _ in range(3):
        r = auth.client.post("/token", data=GRANT, headers=basic(client_id, "guess"))
        refused(r, 401, "invalid_client", "wrong client secret", basic=True)
    for headers in (basic(client_id, "guess"), basic(client_id, secret)):  # even the right secret now
        r = auth.client.post("/token", data=GRANT, headers=headers)
        assert r.status_code == 429
        wait = int(r.headers["retry-after"])
        assert 55 <= wait <= 60
        refused(
            r,
            429,
            "slow_down",
            "3 failed client authentications for this client from this address in the last 60 seconds: "
            f"retry after {wait} seconds",
        )
    # another client is not affected; errors other than invalid_client are not counted
    other_id, other_secret = secret_client(auth)
    for _ in range(5):
        r = auth.client.post(
            "/token", data={**GRANT, "scope": "patient/*.read"}, headers=basic(other_id, other_secret)
        )
        assert r.json()["error"] == "invalid_scope"
    granted(auth.client.post("/token", data=GRANT, headers=basic(other_id, other_secret)))


def test_assertion_failures_count_against_the_assertion_subject(
    auth: RunningAuth, limit_3: FailureLimiter
) -> None:
    client_id = assertion_client(auth)
    for _ in range(3):
        r = auth.client.post("/token", data=form(sign("ES384", claims_for(auth, client_id, aud="x"))))
        assert r.json()["error"] == "invalid_client"
    r = auth.client.post("/token", data=form(sign("ES384", claims_for(auth, client_id))))
    assert r.status_code == 429
    assert r.json()["error"] == "slow_down"
    assert recorded(auth, client_id) == (0, 0)  # a limited request is not even looked at
    limit_3._failures.clear()
    granted(auth.client.post("/token", data=form(sign("ES384", claims_for(auth, client_id)))))


def test_the_limit_comes_from_the_settings_or_the_constructor() -> None:
    from fhirgate.authserver.app import AuthApp
    from fhirgate.authserver.oauth import ServerConfig
    from fhirgate.settings import Settings

    config = ServerConfig(issuer="http://127.0.0.1:1", fhir_base="http://127.0.0.1:1/fhir")
    assert AuthApp("sqlite:///unused.db", config).token_limiter.limit == 10
    assert (
        AuthApp("sqlite:///unused.db", config, settings=Settings(auth_rate_limit=4)).token_limiter.limit == 4
    )
    assert AuthApp("sqlite:///unused.db", config, rate_limit=2).token_limiter.limit == 2
