"""Introspection (RFC 7662), revocation (RFC 7009) and the revocation feed, on both stores, as an
attacker would try them: other clients' tokens, forged and expired JWTs, garbage, repeated
parameters, JSON bodies, missing client authentication."""

from __future__ import annotations

import base64
import json
import secrets
import time
from typing import Any

import httpx
from joserfc import jwt
from joserfc.jwk import OctKey, RSAKey

from fhirgate.authserver.endpoints import refresh_token_hash
from fhirgate.authserver.store import AuthStore
from tests.authserver.harness import (
    ASSERTION_TYPE,
    FHIR_BASE,
    RunningAuth,
    assertion,
    auth,
    backend_client,
)

__all__ = ["auth"]

SCOPE = "system/*.read"


def _client(auth: RunningAuth, method: str = "client_secret_basic") -> tuple[str, str]:
    client_id, secret = auth.register(
        {"grant_types": ["client_credentials"], "token_endpoint_auth_method": method, "scope": SCOPE}
    )
    assert secret is not None
    return client_id, secret


def _token(auth: RunningAuth, client: tuple[str, str]) -> str:
    r = auth.client.post("/token", data={"grant_type": "client_credentials", "scope": SCOPE}, auth=client)
    assert r.status_code == 200, r.text
    token: str = r.json()["access_token"]
    return token


def _introspect(auth: RunningAuth, token: str, client: tuple[str, str], **form: str) -> httpx.Response:
    return auth.client.post("/introspect", data={"token": token, **form}, auth=client)


def _revoke(auth: RunningAuth, token: str, client: tuple[str, str], **form: str) -> httpx.Response:
    return auth.client.post("/revoke", data={"token": token, **form}, auth=client)


def _active(auth: RunningAuth, token: str, client: tuple[str, str]) -> bool:
    r = _introspect(auth, token, client)
    assert r.status_code == 200, r.text
    active: bool = r.json()["active"]
    return active


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    result: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return result


def _sign(auth: RunningAuth, client_id: str, **overrides: Any) -> str:
    """An access token signed with the server's own active key (claims as /token makes them)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": auth.issuer,
        "sub": client_id,
        "aud": FHIR_BASE,
        "client_id": client_id,
        "scope": SCOPE,
        "iat": now,
        "exp": now + 600,
        "jti": secrets.token_urlsafe(24),
    }
    claims.update(overrides)
    assert auth.app.keys is not None
    return auth.app.keys.current().sign({k: v for k, v in claims.items() if v is not None}, typ="at+jwt")


def _write(auth: RunningAuth, sql: str, args: tuple[Any, ...]) -> None:
    async def go(store: AuthStore) -> None:
        async with store.write() as s:
            await s.conn.execute(sql, args)

    auth._store(go)


def _grant(
    auth: RunningAuth, client_id: str, *, used: bool = False, expired: bool = False
) -> tuple[str, str]:
    """A grant (family) with one refresh token, as the refresh flow stores them: (family, token)."""
    family = secrets.token_urlsafe(12)
    token = secrets.token_urlsafe(32)
    now = int(time.time() * 1000)
    _write(
        auth,
        "INSERT INTO auth_grant (family, client_id, username, login, scope, context, created_at) "
        "VALUES (?, ?, ?, NULL, ?, ?, ?)",
        (family, client_id, "alice", "launch/patient patient/*.rs offline_access", '{"patient": "p1"}', now),
    )
    _write(
        auth,
        "INSERT INTO auth_refresh (token_hash, family, scope, created_at, expires_at, used_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (
            refresh_token_hash(token),
            family,
            "launch/patient patient/*.rs offline_access",
            now,
            now - 1000 if expired else now + 3_600_000,
            now if used else None,
        ),
    )
    return family, token


def _family_access_token(auth: RunningAuth, client_id: str, family: str) -> str:
    token = _sign(auth, client_id, sub="alice", patient="p1", scope="launch/patient patient/*.rs")
    claims = _claims(token)
    _write(
        auth,
        "INSERT INTO auth_token (jti, family, client_id, expires_at) VALUES (?, ?, ?, ?)",
        (claims["jti"], family, client_id, claims["exp"] * 1000),
    )
    return token


def _feed(auth: RunningAuth, **params: Any) -> dict[str, Any]:
    r = auth.client.get("/revocations", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body: dict[str, Any] = r.json()
    return body


def _feed_jtis(auth: RunningAuth) -> set[str]:
    return {entry["jti"] for entry in _feed(auth, since=0, limit=1000)["revoked"]}


# --- introspection ------------------------------------------------------------------------------


def test_introspection_describes_the_callers_own_active_token(auth: RunningAuth) -> None:
    client = _client(auth)
    token = _token(auth, client)
    claims = _claims(token)
    r = _introspect(auth, token, client, token_type_hint="access_token")
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {
        "active": True,
        "scope": SCOPE,
        "client_id": client[0],
        "sub": client[0],
        "exp": claims["exp"],
        "iat": claims["iat"],
        "iss": auth.issuer,
        "aud": FHIR_BASE,
        "token_type": "Bearer",
        "jti": claims["jti"],
    }
    # RFC 7662 §2.1: the hint is only a hint, a wrong or unknown one changes nothing
    assert _introspect(auth, token, client, token_type_hint="refresh_token").json()["active"] is True
    assert _introspect(auth, token, client, token_type_hint="id_token").json()["active"] is True


def test_introspection_with_launch_context_and_private_key_jwt(auth: RunningAuth) -> None:
    client_id, key = backend_client(auth)
    token = _sign(auth, client_id, patient="p1", encounter="e1", fhirUser=f"{FHIR_BASE}/Patient/p1")
    signed = assertion(auth, key, client_id, lifetime=60)
    r = auth.client.post(
        "/introspect",
        data={"token": token, "client_assertion_type": ASSERTION_TYPE, "client_assertion": signed},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["active"] is True
    assert (body["patient"], body["encounter"], body["fhirUser"]) == ("p1", "e1", f"{FHIR_BASE}/Patient/p1")


def test_a_client_learns_nothing_about_another_clients_token(auth: RunningAuth) -> None:
    owner, other = _client(auth), _client(auth)
    token = _token(auth, owner)
    r = _introspect(auth, token, other)
    assert r.status_code == 200
    assert r.json() == {"active": False}
    assert _active(auth, token, owner)


def test_introspection_requires_a_confidential_client(auth: RunningAuth) -> None:
    client = _client(auth)
    token = _token(auth, client)
    anonymous = auth.client.post("/introspect", data={"token": token})
    assert anonymous.status_code == 400
    assert anonymous.json()["error"] == "invalid_client"
    wrong = _introspect(auth, token, (client[0], "not-the-secret"))
    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"].startswith("Basic ")
    assert wrong.json() == {"error": "invalid_client", "error_description": "wrong client secret"}
    public_id, _ = auth.register(
        {"redirect_uris": ["https://app.example/cb"], "token_endpoint_auth_method": "none"}
    )
    public = auth.client.post("/introspect", data={"token": token, "client_id": public_id})
    assert public.status_code == 400
    assert public.json()["error"] == "invalid_client"
    assert "not accepted here" in public.json()["error_description"]
    both = auth.client.post(
        "/introspect", data={"token": token, "client_id": client[0], "client_secret": client[1]}, auth=client
    )
    assert both.status_code == 400
    assert both.json()["error"] == "invalid_request"


def test_forged_expired_and_foreign_tokens_are_inactive(auth: RunningAuth) -> None:
    client = _client(auth)
    cid = client[0]
    genuine = _token(auth, client)
    header = json.loads(base64.urlsafe_b64decode(genuine.split(".")[0] + "=="))
    claims = _claims(genuine)
    kid = header["kid"]
    assert _active(auth, genuine, client)

    other_key = RSAKey.generate_key(2048, private=True)
    forged = jwt.encode(
        {"alg": "RS256", "kid": kid, "typ": "at+jwt"}, claims, other_key, algorithms=["RS256"]
    )
    unsigned = (
        base64.urlsafe_b64encode(json.dumps({"alg": "none", "kid": kid, "typ": "at+jwt"}).encode())
        .rstrip(b"=")
        .decode()
        + "."
        + genuine.split(".")[1]
        + "."
    )
    public_pem = auth.client.get("/jwks").json()["keys"][0]
    hs256 = jwt.encode(
        {"alg": "HS256", "kid": kid, "typ": "at+jwt"},
        claims,
        OctKey.import_key(json.dumps(public_pem).encode()),
        algorithms=["HS256"],
    )
    payload = dict(claims, scope="system/*.cruds")
    tampered = (
        genuine.split(".")[0]
        + "."
        + base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
        + "."
        + genuine.split(".")[2]
    )
    inactive = [
        forged,
        unsigned,
        hs256,
        tampered,
        _sign(auth, cid, exp=int(time.time()) - 1),
        _sign(auth, cid, aud="https://other.example/fhir"),
        _sign(auth, cid, iss="https://evil.example"),
        _sign(auth, cid, jti=None),
        _sign(auth, cid, exp="tomorrow"),
        "garbage",
        "a.b.c",
        "x" * 10_000,
        genuine + "x",
    ]
    for token in inactive:
        r = _introspect(auth, token, client)
        assert r.status_code == 200, r.text
        assert r.json() == {"active": False}, token[:60]
    # the server key, but typ JWT (an ID token shape) is not an access token of ours
    id_like = auth.app.keys.current().sign(claims, typ="JWT") if auth.app.keys else ""
    assert _introspect(auth, id_like, client).json() == {"active": False}


def test_form_rules_at_introspection_and_revocation(auth: RunningAuth) -> None:
    client = _client(auth)
    token = _token(auth, client)
    for path in ("/introspect", "/revoke"):
        as_json = auth.client.post(path, json={"token": token}, auth=client)
        assert as_json.status_code == 400
        assert as_json.json()["error"] == "invalid_request"
        repeated = auth.client.post(
            path,
            content=f"token={token}&token=other",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            auth=client,
        )
        assert repeated.status_code == 400
        assert repeated.json() == {
            "error": "invalid_request",
            "error_description": "parameter token is repeated: send each parameter once",
        }
        missing = auth.client.post(path, data={"token_type_hint": "access_token"}, auth=client)
        assert missing.status_code == 400
        assert missing.json()["error"] == "invalid_request"
        assert missing.headers["cache-control"] == "no-store"
        get = auth.client.get(path, params={"token": token}, auth=client)
        assert get.status_code == 405
        assert get.json()["error"] == "invalid_request"
        for r in (as_json, repeated, missing, get):
            description = r.json()["error_description"]
            assert '"' not in description
            assert "\\" not in description
    assert _active(auth, token, client)


# --- revocation ---------------------------------------------------------------------------------


def test_revoking_an_access_token(auth: RunningAuth) -> None:
    client = _client(auth)
    token = _token(auth, client)
    jti, exp = _claims(token)["jti"], _claims(token)["exp"]
    r = _revoke(auth, token, client, token_type_hint="access_token")
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    assert _introspect(auth, token, client).json() == {"active": False}
    assert auth.query("SELECT client_id, revoked_at IS NOT NULL FROM auth_token WHERE jti = ?", (jti,)) == [
        (client[0], True)
    ]
    entries = [e for e in _feed(auth, since=0, limit=1000)["revoked"] if e["jti"] == jti]
    assert len(entries) == 1
    assert entries[0]["exp"] == exp
    assert isinstance(entries[0]["revoked_at"], int)
    again = _revoke(auth, token, client)
    assert again.status_code == 200
    assert len([e for e in _feed(auth, since=0, limit=1000)["revoked"] if e["jti"] == jti]) == 1


def test_another_clients_token_is_not_revoked(auth: RunningAuth) -> None:
    owner, other = _client(auth), _client(auth)
    token = _token(auth, owner)
    r = _revoke(auth, token, other)
    assert r.status_code == 400
    assert r.json() == {
        "error": "unauthorized_client",
        "error_description": "the token was not issued to this client; it is not revoked",
    }
    assert _active(auth, token, owner)
    assert _claims(token)["jti"] not in _feed_jtis(auth)


def test_revocation_of_unknown_tokens_and_bad_requests(auth: RunningAuth) -> None:
    client = _client(auth)
    before = _feed_jtis(auth)
    forged = jwt.encode(
        {"alg": "RS256", "kid": "x", "typ": "at+jwt"},
        {"jti": "victim", "client_id": client[0], "exp": int(time.time()) + 60},
        RSAKey.generate_key(2048, private=True),
        algorithms=["RS256"],
    )
    for token in ("garbage", "a.b.c", forged, _sign(auth, client[0], exp=int(time.time()) - 5)):
        r = _revoke(auth, token, client)
        assert r.status_code == 200, r.text  # RFC 7009 §2.2
    assert _feed_jtis(auth) == before
    hint = _revoke(auth, "garbage", client, token_type_hint="id_token")
    assert hint.status_code == 400
    assert hint.json() == {
        "error": "unsupported_token_type",
        "error_description": "token_type_hint must be access_token or refresh_token",
    }
    anonymous = auth.client.post("/revoke", data={"token": _token(auth, client)})
    assert anonymous.status_code == 400
    assert anonymous.json()["error"] == "invalid_client"
    wrong = _revoke(auth, "garbage", (client[0], "nope"))
    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"].startswith("Basic ")


def test_refresh_tokens_introspected_and_revoked_with_their_family(auth: RunningAuth) -> None:
    client = _client(auth)
    family, refresh = _grant(auth, client[0])
    access = _family_access_token(auth, client[0], family)
    body = _introspect(auth, refresh, client, token_type_hint="refresh_token").json()
    assert body == {
        "active": True,
        "scope": "launch/patient patient/*.rs offline_access",
        "client_id": client[0],
        "iss": auth.issuer,
    }
    assert _introspect(auth, refresh, _client(auth)).json() == {"active": False}
    assert _active(auth, access, client)
    _, used = _grant(auth, client[0], used=True)
    _, expired = _grant(auth, client[0], expired=True)
    assert _introspect(auth, used, client).json() == {"active": False}
    assert _introspect(auth, expired, client).json() == {"active": False}

    other = _client(auth)
    refused = _revoke(auth, refresh, other, token_type_hint="refresh_token")
    assert refused.status_code == 400
    assert refused.json()["error"] == "unauthorized_client"
    assert _introspect(auth, refresh, client).json()["active"] is True

    assert _revoke(auth, refresh, client, token_type_hint="refresh_token").status_code == 200
    assert _introspect(auth, refresh, client).json() == {"active": False}
    assert _introspect(auth, access, client).json() == {"active": False}  # the family went with it
    assert auth.query("SELECT revoked_at IS NOT NULL FROM auth_grant WHERE family = ?", (family,)) == [
        (True,)
    ]
    assert _claims(access)["jti"] in _feed_jtis(auth)


def test_revoking_an_access_token_revokes_its_family(auth: RunningAuth) -> None:
    client = _client(auth)
    family, refresh = _grant(auth, client[0])
    access = _family_access_token(auth, client[0], family)
    assert _revoke(auth, access, client).status_code == 200
    assert _introspect(auth, refresh, client).json() == {"active": False}


def test_a_public_client_revokes_its_own_refresh_token(auth: RunningAuth) -> None:
    public_id, _ = auth.register(
        {
            "redirect_uris": ["https://app.example/cb"],
            "grant_types": ["authorization_code", "refresh_token"],
            "token_endpoint_auth_method": "none",
        }
    )
    family, refresh = _grant(auth, public_id)
    other_public, _ = auth.register(
        {"redirect_uris": ["https://app.example/cb"], "token_endpoint_auth_method": "none"}
    )
    stolen = auth.client.post("/revoke", data={"token": refresh, "client_id": other_public})
    assert stolen.status_code == 400
    assert stolen.json()["error"] == "unauthorized_client"
    r = auth.client.post("/revoke", data={"token": refresh, "client_id": public_id})
    assert r.status_code == 200, r.text
    assert auth.query("SELECT revoked_at IS NOT NULL FROM auth_grant WHERE family = ?", (family,)) == [
        (True,)
    ]


# --- the revocation feed ------------------------------------------------------------------------


def test_feed_pages_through_every_revocation(auth: RunningAuth) -> None:
    client = _client(auth)
    tokens = [_token(auth, client) for _ in range(5)]
    for token in tokens:
        assert _revoke(auth, token, client).status_code == 200
    wanted = {_claims(t)["jti"] for t in tokens}
    seen: set[str] = set()
    params: dict[str, Any] = {"since": 0, "limit": 2}
    for _ in range(100):
        page = _feed(auth, **params)
        assert set(page) <= {"revoked", "next", "more", "after"}
        assert len(page["revoked"]) <= 2
        seen |= {e["jti"] for e in page["revoked"]}
        if not page["more"]:
            break
        params = {"since": page["next"], "after": page["after"], "limit": 2}
    assert wanted <= seen
    last = _feed(auth, since=page["next"])
    assert last["next"] <= int(time.time() * 1000)
    # the cursor stays behind now: what was revoked in the last seconds is listed again
    assert wanted <= {e["jti"] for e in last["revoked"]}


def test_feed_refuses_bad_parameters(auth: RunningAuth) -> None:
    for query in ("since=-1", "since=abc", "since=1&since=2", "limit=0", "limit=100000", "since=1e3"):
        r = auth.client.get("/revocations?" + query)
        assert r.status_code == 400, query
        assert r.json()["error"] == "invalid_request"
    assert auth.client.post("/revocations").status_code == 405
    assert auth.client.get("/revocations?after=" + "x" * 300).status_code == 400


def test_metadata_names_the_endpoints(auth: RunningAuth) -> None:
    for path in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
        doc = auth.client.get(path).json()
        assert doc["introspection_endpoint"] == auth.issuer + "/introspect"
        assert doc["revocation_endpoint"] == auth.issuer + "/revoke"
        assert doc["registration_endpoint"] == auth.issuer + "/register"
        assert "none" not in doc["introspection_endpoint_auth_methods_supported"]
        assert "none" in doc["revocation_endpoint_auth_methods_supported"]
        assert "ES384" in doc["revocation_endpoint_auth_signing_alg_values_supported"]


def test_a_real_code_flow_family_introspected_rotated_and_revoked(auth: RunningAuth) -> None:
    from tests.authserver.browser import REDIRECT, code_flow

    auth.add_user("dora", "dora's password", "Patient/d1")
    client_id, secret = auth.register(
        {
            "redirect_uris": [REDIRECT],
            "grant_types": ["authorization_code", "refresh_token"],
            "token_endpoint_auth_method": "client_secret_basic",
        }
    )
    assert secret is not None
    client = (client_id, secret)
    scope = "launch/patient patient/Patient.rs offline_access"
    flow = code_flow(auth, client_id, "dora", "dora's password", scope, token=False)
    issued = auth.client.post(
        "/token",
        data={
            "grant_type": "authorization_code",
            "code": flow["code"],
            "redirect_uri": REDIRECT,
            "code_verifier": flow["verifier"],
        },
        auth=client,
    )
    assert issued.status_code == 200, issued.text
    first = issued.json()
    access = _introspect(auth, first["access_token"], client).json()
    assert access["active"] is True
    assert access["patient"] == "d1"
    assert access["sub"] != client_id
    refresh = _introspect(auth, first["refresh_token"], client).json()
    assert refresh["active"] is True
    assert refresh["client_id"] == client_id

    rotated = auth.client.post(
        "/token", data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}, auth=client
    )
    assert rotated.status_code == 200, rotated.text
    second = rotated.json()
    assert _introspect(auth, first["refresh_token"], client).json() == {"active": False}  # used
    assert _active(auth, second["refresh_token"], client)

    assert _revoke(auth, second["refresh_token"], client).status_code == 200
    for token in (second["refresh_token"], second["access_token"], first["access_token"]):
        assert _introspect(auth, token, client).json() == {"active": False}
    feed = _feed_jtis(auth)
    assert _claims(first["access_token"])["jti"] in feed
    assert _claims(second["access_token"])["jti"] in feed
    again = auth.client.post(
        "/token", data={"grant_type": "refresh_token", "refresh_token": second["refresh_token"]}, auth=client
    )
    assert again.status_code == 400


def test_an_online_access_refresh_token_ends_with_its_login_session(auth: RunningAuth) -> None:
    client = _client(auth)
    now = int(time.time() * 1000)
    states = {"running": None, "ended": now - 1}
    tokens = {}
    for name, ended in states.items():
        session, family, token = secrets.token_hex(16), secrets.token_urlsafe(12), secrets.token_urlsafe(32)
        _write(
            auth,
            "INSERT INTO auth_login (session_hash, username, created_at, expires_at, ended_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (session, "alice", now, now + 3_600_000, ended),
        )
        _write(
            auth,
            "INSERT INTO auth_grant (family, client_id, username, login, scope, context, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (family, client[0], "alice", session, "patient/*.rs online_access", "{}", now),
        )
        _write(
            auth,
            "INSERT INTO auth_refresh (token_hash, family, scope, created_at, expires_at, used_at) "
            "VALUES (?, ?, ?, ?, NULL, NULL)",
            (refresh_token_hash(token), family, "patient/*.rs online_access", now),
        )
        tokens[name] = token
    assert _active(auth, tokens["running"], client)
    assert not _active(auth, tokens["ended"], client)


def test_failed_client_authentication_is_rate_limited_like_the_token_endpoint(auth: RunningAuth) -> None:
    client = _client(auth)
    limit = auth.app.token_limiter.limit
    for _ in range(limit):
        assert _introspect(auth, "x", (client[0], "wrong")).status_code == 401
    for path in ("/introspect", "/revoke"):
        r = auth.client.post(path, data={"token": "x"}, auth=client)  # even the right secret now
        assert r.status_code == 429
        assert r.json()["error"] == "slow_down"
        assert int(r.headers["retry-after"]) >= 1
    assert (
        auth.client.post(
            "/token", data={"grant_type": "client_credentials", "scope": SCOPE}, auth=client
        ).status_code
        == 429
    )


def test_a_token_signed_by_a_retired_key_stays_active_while_the_key_is_published(auth: RunningAuth) -> None:
    from fhirgate.authserver.keys import KeyRing

    client = _client(auth)
    token = _token(auth, client)
    old_kid = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))["kid"]

    async def rotate(store: AuthStore) -> None:
        await KeyRing(store).rotate("RS256", 3600)

    auth._store(rotate)
    published = [k["kid"] for k in auth.client.get("/jwks").json()["keys"]]
    assert old_kid in published
    assert len(published) >= 2
    assert _active(auth, token, client)
