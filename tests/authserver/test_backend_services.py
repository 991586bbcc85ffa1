"""SMART Backend Services on both stores: client_credentials with private_key_jwt and with a secret."""

from __future__ import annotations

from typing import Any

from joserfc import jwt

from tests.authserver.harness import ASSERTION_TYPE, FHIR_BASE, RunningAuth, assertion, auth, backend_client

__all__ = ["auth"]


def test_private_key_jwt_issues_an_rfc9068_token_and_refuses_a_replayed_jti(auth: RunningAuth) -> None:
    client_id, key = backend_client(auth, scope="system/*.read")
    form = {
        "grant_type": "client_credentials",
        "scope": "system/*.read",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion(auth, key, client_id),
    }
    r = auth.client.post("/token", data=form)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "system/*.read"
    jwks = auth.client.get("/jwks").json()
    token = jwt.decode(body["access_token"], _server_key(jwks))
    assert token.header["typ"] == "at+jwt"
    claims = token.claims
    assert claims["iss"] == auth.issuer
    assert claims["aud"] == FHIR_BASE
    assert claims["sub"] == claims["client_id"] == client_id
    assert claims["exp"] - claims["iat"] == body["expires_in"] <= 3600
    assert set(claims) == {"iss", "sub", "aud", "client_id", "scope", "iat", "exp", "jti"}

    replay = auth.client.post("/token", data=form)
    assert replay.status_code == 400
    assert replay.json() == {
        "error": "invalid_client",
        "error_description": "the client assertion's jti was used before",
    }


def _server_key(jwks: dict[str, Any]) -> Any:
    from joserfc.jwk import KeySet

    return KeySet.import_key_set(jwks)


def test_client_secret_basic_and_a_wrong_secret(auth: RunningAuth) -> None:
    client_id, secret = auth.register(
        {"grant_types": ["client_credentials"], "token_endpoint_auth_method": "client_secret_basic"}
    )
    assert secret is not None
    ok = auth.client.post(
        "/token",
        data={"grant_type": "client_credentials", "scope": "system/*.read"},
        auth=(client_id, secret),
    )
    assert ok.status_code == 200, ok.text
    bad = auth.client.post(
        "/token", data={"grant_type": "client_credentials", "scope": "system/*.read"}, auth=(client_id, "x")
    )
    assert bad.status_code == 401
    assert bad.headers["www-authenticate"].startswith("Basic ")
    assert bad.json() == {"error": "invalid_client", "error_description": "wrong client secret"}
