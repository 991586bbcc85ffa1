"""Dynamic client registration (RFC 7591) on both stores: closed without an initial access token,
refused with a wrong one, bad metadata refused with RFC 7591 §3.2.2 errors, and a registered client
that really works at the token endpoint."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from joserfc.jwk import ECKey

from fhirgate.settings import Settings
from tests.authserver.harness import RunningAuth, auth

__all__ = ["auth"]

TOKEN = "initial-access-token-for-tests"


@pytest.fixture
def opened(auth: RunningAuth) -> Iterator[RunningAuth]:
    """Registration opened with TOKEN for one test."""
    before = auth.app.settings
    auth.app.settings = Settings(auth_registration_token=TOKEN)
    try:
        yield auth
    finally:
        auth.app.settings = before


def _register(auth: RunningAuth, metadata: Any, token: str | None = TOKEN, **kw: Any) -> httpx.Response:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    headers.update(kw.pop("headers", {}))
    if "content" in kw:
        headers.setdefault("Content-Type", "application/json")
        return auth.client.post("/register", headers=headers, **kw)
    return auth.client.post("/register", json=metadata, headers=headers, **kw)


def _assert_clean(body: dict[str, Any]) -> None:
    description = body["error_description"]
    assert '"' not in description
    assert "\\" not in description
    assert all(0x20 <= ord(c) <= 0x7E for c in description)


def test_registration_is_closed_without_an_initial_access_token(auth: RunningAuth) -> None:
    assert auth.app.settings is None or not auth.app.settings.auth_registration_token
    r = _register(auth, {"grant_types": ["client_credentials"]})
    assert r.status_code == 403
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["error"] == "access_denied"
    assert "FHIRGATE_AUTH_REGISTRATION_TOKEN" in body["error_description"]
    _assert_clean(body)
    assert _register(auth, {"grant_types": ["client_credentials"]}, token=None).status_code == 403
    assert auth.query("SELECT count(*) FROM auth_client WHERE metadata LIKE ?", ("%register-closed%",)) == [
        (0,)
    ]


def test_missing_or_wrong_initial_access_token(opened: RunningAuth) -> None:
    auth = opened
    metadata = {"grant_types": ["client_credentials"], "client_name": "register-wrong"}
    missing = _register(auth, metadata, token=None)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer ")
    assert missing.json()["error"] == "invalid_token"
    for wrong in (TOKEN + "x", TOKEN[:-1], "x", TOKEN.upper()):
        r = _register(auth, metadata, token=wrong)
        assert r.status_code == 401, wrong
        assert r.headers["www-authenticate"] == 'Bearer realm="register", error="invalid_token"'
        assert r.json() == {
            "error": "invalid_token",
            "error_description": "the initial access token is not valid",
        }
    basic = auth.client.post("/register", json=metadata, auth=("client", TOKEN))
    assert basic.status_code == 400
    assert basic.json()["error"] == "invalid_request"
    two = auth.client.post(
        "/register",
        json=metadata,
        headers=[("Authorization", f"Bearer {TOKEN}"), ("Authorization", f"Bearer {TOKEN}")],
    )
    assert two.status_code == 400
    assert auth.query("SELECT count(*) FROM auth_client WHERE metadata LIKE ?", ("%register-wrong%",)) == [
        (0,)
    ]


def test_a_registered_client_gets_its_credentials_and_works(opened: RunningAuth) -> None:
    auth = opened
    r = _register(
        auth,
        {
            "grant_types": ["client_credentials"],
            "token_endpoint_auth_method": "client_secret_post",
            "scope": "system/*.read",
            "client_name": "Backend",
            "logo_uri": "https://ignored.example/logo.png",
        },
    )
    assert r.status_code == 201, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert set(body) == {
        "client_id",
        "client_secret",
        "client_id_issued_at",
        "client_secret_expires_at",
        "grant_types",
        "response_types",
        "token_endpoint_auth_method",
        "scope",
        "client_name",
    }
    assert body["client_secret_expires_at"] == 0
    assert body["grant_types"] == ["client_credentials"]
    assert body["response_types"] == []
    assert isinstance(body["client_id_issued_at"], int)
    token = auth.client.post(
        "/token",
        data={
            "grant_type": "client_credentials",
            "scope": "system/*.read",
            "client_id": body["client_id"],
            "client_secret": body["client_secret"],
        },
    )
    assert token.status_code == 200, token.text


def test_public_and_private_key_jwt_clients_get_no_secret(opened: RunningAuth) -> None:
    auth = opened
    public = _register(
        auth, {"redirect_uris": ["http://127.0.0.1:9999/cb"], "token_endpoint_auth_method": "none"}
    )
    assert public.status_code == 201, public.text
    assert "client_secret" not in public.json()
    assert "client_secret_expires_at" not in public.json()
    assert public.json()["redirect_uris"] == ["http://127.0.0.1:9999/cb"]
    key = ECKey.generate_key("P-384", private=True)
    jwks = {"keys": [{**key.as_dict(private=False), "kid": "k1", "alg": "ES384"}]}
    signed = _register(
        auth,
        {
            "grant_types": ["client_credentials"],
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": jwks,
        },
    )
    assert signed.status_code == 201, signed.text
    assert "client_secret" not in signed.json()
    assert signed.json()["jwks"] == jwks


@pytest.mark.parametrize(
    ("metadata", "error", "fragment"),
    [
        ({"redirect_uris": ["http://app.example/cb"]}, "invalid_redirect_uri", "must use https"),
        ({"redirect_uris": ["https://app.example/cb#x"]}, "invalid_redirect_uri", "fragment"),
        ({"redirect_uris": ["https://app.example@evil.com/cb"]}, "invalid_redirect_uri", "user information"),
        ({"redirect_uris": ["/cb"]}, "invalid_redirect_uri", "absolute"),
        (
            {"redirect_uris": ["https://a.example/cb"], "grant_types": ["implicit"]},
            "invalid_client_metadata",
            "implicit",
        ),
        ({"grant_types": ["password"]}, "invalid_client_metadata", "password"),
        (
            {"redirect_uris": ["https://a.example/cb"], "response_types": ["token"]},
            "invalid_client_metadata",
            "response",
        ),
        (
            {"client_id": "chosen", "grant_types": ["client_credentials"]},
            "invalid_client_metadata",
            "client_id",
        ),
        (
            {"client_secret": "chosen", "grant_types": ["client_credentials"]},
            "invalid_client_metadata",
            "issued",
        ),
        (
            {"grant_types": ["client_credentials"], "client_secret_expires_at": 0},
            "invalid_client_metadata",
            "issued",
        ),
        (
            {"grant_types": ["client_credentials"], "token_endpoint_auth_method": "none"},
            "invalid_client_metadata",
            "confidential",
        ),
        ({"grant_types": ["client_credentials"], "scope": 'a "b'}, "invalid_client_metadata", "scope"),
        ([1, 2], "invalid_client_metadata", "JSON object"),
    ],
)
def test_bad_metadata_is_refused(opened: RunningAuth, metadata: Any, error: str, fragment: str) -> None:
    r = _register(opened, metadata)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"] == error
    assert fragment in body["error_description"]
    _assert_clean(body)


def test_private_keys_in_jwks_are_refused(opened: RunningAuth) -> None:
    key = ECKey.generate_key("P-384", private=True)
    r = _register(
        opened,
        {
            "grant_types": ["client_credentials"],
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": {"keys": [{**key.as_dict(private=True), "kid": "k1", "alg": "ES384"}]},
        },
    )
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_client_metadata"
    assert "private members" in r.json()["error_description"]
    _assert_clean(r.json())


def test_bodies_that_are_not_one_json_object(opened: RunningAuth) -> None:
    auth = opened
    form = auth.client.post(
        "/register", data={"grant_types": "client_credentials"}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert form.status_code == 400
    assert form.json()["error"] == "invalid_client_metadata"
    for content in (b"{", b"\xff\xfe", b'"text"', b"[" * 100_000):
        r = _register(auth, None, content=content)
        assert r.status_code in (400, 413), content[:10]
        assert r.json()["error"] == "invalid_client_metadata"
    duplicated = _register(
        auth,
        None,
        content=b'{"grant_types": ["client_credentials"], "token_endpoint_auth_method": "none", '
        b'"token_endpoint_auth_method": "client_secret_basic"}',
    )
    assert duplicated.status_code == 400
    assert "repeats the member token_endpoint_auth_method" in duplicated.json()["error_description"]
    huge = _register(auth, None, content=json.dumps({"client_name": "x" * 70_000}).encode())
    assert huge.status_code == 413
    assert auth.client.get("/register", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 405


@pytest.mark.parametrize(
    "uri",
    [
        "http://127.0.0.1:6379/jwks",
        "http://localhost/keys.json",
        "HTTP://[::1]/x",
        "file:///etc/passwd",
        "https://127.0.0.1/jwks",
        "https://localhost:8443/jwks",
        "https://[::1]/jwks",
        "https://169.254.169.254/latest/meta-data",
        "https://10.0.0.5/jwks",
        "https://192.168.1.1/jwks",
        "https://api.localhost/jwks",
    ],
)
def test_a_registered_jwks_uri_must_be_https(opened: RunningAuth, uri: str) -> None:
    """The server fetches a client's jwks_uri: /register never lets a caller aim it at a local
    service (fhirgate clients create may still register a loopback key set)."""
    metadata = {
        "grant_types": ["client_credentials"],
        "token_endpoint_auth_method": "private_key_jwt",
        "jwks_uri": uri,
        "client_name": "register-ssrf",
    }
    r = _register(opened, metadata)
    assert r.status_code == 400
    assert r.json() == {
        "error": "invalid_client_metadata",
        "error_description": "jwks_uri must be an https URI of a public host when registering through "
        "/register (the server fetches it); register loopback or internal key sets with fhirgate "
        "clients create",
    }
    assert opened.query("SELECT count(*) FROM auth_client WHERE metadata LIKE ?", ("%register-ssrf%",)) == [
        (0,)
    ]
