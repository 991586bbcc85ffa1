"""Interop: Authlib's own OAuth 2.0 client (`authlib.integrations.httpx_client.OAuth2Client`) gets
a SMART Backend Services token from the server, with `private_key_jwt` (Authlib's
`PrivateKeyJWT`, ES384 and RS384 keys) and with `client_secret_basic` / `client_secret_post`, on
both stores.

Authlib's `PrivateKeyJWT` signs assertions valid for one hour by default, which SMART forbids (at
most five minutes): such an assertion is refused, and a client passes its own `exp` in `claims`.
A `claims` dict is filled with a `jti` by Authlib on first use and reused afterwards, so a fresh
`PrivateKeyJWT` is made for every token request here (as a real client must do)."""

from __future__ import annotations

import time
import warnings
from typing import Any

import pytest
from authlib.deprecate import AuthlibDeprecationWarning
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, RSAKey

from tests.authserver.harness import FHIR_BASE, RunningAuth, auth

with warnings.catch_warnings():  # Authlib 1.9 deprecates its httpx integration in favour of httpx2
    warnings.simplefilter("ignore", AuthlibDeprecationWarning)
    from authlib.integrations.httpx_client import OAuth2Client, OAuthError

__all__ = ["auth"]


def _key(alg: str) -> ECKey | RSAKey:
    if alg == "ES384":
        return ECKey.generate_key("P-384", private=True)
    return RSAKey.generate_key(2048, private=True)


def _smart_auth(auth: RunningAuth, alg: str, kid: str) -> PrivateKeyJWT:
    """Authlib's PrivateKeyJWT with a SMART-sized lifetime (exp at most five minutes ahead)."""
    return PrivateKeyJWT(
        auth.token_url, claims={"exp": int(time.time()) + 240}, headers={"kid": kid}, alg=alg
    )


def _check(auth: RunningAuth, token: dict[str, Any], client_id: str, scope: str) -> None:
    assert token["token_type"] == "Bearer"
    assert token["scope"] == scope
    keys = KeySet.import_key_set(auth.client.get("/jwks").json())
    claims = jwt.decode(token["access_token"], keys).claims
    assert (claims["iss"], claims["aud"], claims["sub"], claims["client_id"]) == (
        auth.issuer,
        FHIR_BASE,
        client_id,
        client_id,
    )


@pytest.mark.parametrize("alg", ["ES384", "RS384"])
def test_authlib_client_private_key_jwt(auth: RunningAuth, alg: str) -> None:
    key = _key(alg)
    kid = f"interop-{alg.lower()}"
    client_id, _ = auth.register(
        {
            "grant_types": ["client_credentials"],
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": {"keys": [{**key.as_dict(private=False), "kid": kid, "alg": alg}]},
            "scope": "system/*.read system/Observation.rs",
        }
    )
    for scope in ("system/*.read", "system/Observation.rs system/*.read"):
        with OAuth2Client(
            client_id,
            key,
            token_endpoint_auth_method=_smart_auth(auth, alg, kid),
            scope=scope,
        ) as client:
            token = client.fetch_token(auth.token_url, grant_type="client_credentials")
        _check(auth, token, client_id, scope)

    # Authlib's default assertion lifetime (one hour) is refused, as SMART requires
    with (
        OAuth2Client(
            client_id,
            key,
            token_endpoint_auth_method=PrivateKeyJWT(auth.token_url, headers={"kid": kid}, alg=alg),
            scope="system/*.read",
        ) as client,
        pytest.raises(OAuthError) as refused,
    ):
        client.fetch_token(auth.token_url, grant_type="client_credentials")
    assert refused.value.error == "invalid_client"
    assert refused.value.description == "the client assertion's exp is more than 300 seconds ahead"


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_authlib_client_with_a_client_secret(auth: RunningAuth, method: str) -> None:
    client_id, secret = auth.register(
        {
            "grant_types": ["client_credentials"],
            "token_endpoint_auth_method": method,
            "scope": "system/*.read",
        }
    )
    with OAuth2Client(client_id, secret, token_endpoint_auth_method=method, scope="system/*.read") as client:
        token = client.fetch_token(auth.token_url, grant_type="client_credentials")
        _check(auth, token, client_id, "system/*.read")
    with (
        OAuth2Client(client_id, "wrong", token_endpoint_auth_method=method, scope="system/*.read") as client,
        pytest.raises(OAuthError) as refused,
    ):
        client.fetch_token(auth.token_url, grant_type="client_credentials")
    assert refused.value.error == "invalid_client"
    assert refused.value.description == "wrong client secret"
