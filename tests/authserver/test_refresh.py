"""Refresh tokens on both stores: rotation, reuse detection revoking the family, client binding,
no scope escalation, offline_access lifetime and online_access ending with the login session."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from fhirgate import clock
from tests.authserver.browser import REDIRECT, code_flow, public_client
from tests.authserver.harness import RunningAuth, auth, with_store

__all__ = ["auth"]

PASSWORD = "refresh password"
SCOPE = "launch/patient patient/Observation.rs patient/Patient.rs offline_access"


@pytest.fixture(scope="module", autouse=True)
def users(auth: RunningAuth) -> None:
    auth.add_user("carol", PASSWORD, "Patient/c1")


@contextmanager
def later(seconds: float) -> Iterator[None]:
    real = clock.now()
    clock.set_clock(lambda: real + seconds)
    try:
        yield
    finally:
        clock.set_clock(None)


def _refresh(auth: RunningAuth, client_id: str, token: str, **extra: str) -> Any:
    return auth.client.post(
        "/token",
        data={"grant_type": "refresh_token", "refresh_token": token, "client_id": client_id, **extra},
    )


def _jti(auth: RunningAuth, access_token: str) -> str:
    keys = KeySet.import_key_set(auth.client.get("/jwks").json())
    return str(jwt.decode(access_token, keys).claims["jti"])


def test_rotation_and_reuse_revokes_the_family(auth: RunningAuth) -> None:
    client_id = public_client(auth)
    first = code_flow(auth, client_id, "carol", PASSWORD, SCOPE)["token"]
    second = _refresh(auth, client_id, first["refresh_token"])
    assert second.status_code == 200, second.text
    body = second.json()
    assert body["refresh_token"] != first["refresh_token"]
    assert body["scope"] == SCOPE
    assert body["patient"] == "c1"
    assert not auth.query("SELECT 1 FROM auth_refresh WHERE token_hash = ?", (body["refresh_token"],))
    # the old one is used: presenting it again is a reuse and revokes everything
    reuse = _refresh(auth, client_id, first["refresh_token"])
    assert reuse.status_code == 400
    assert reuse.json()["error"] == "invalid_grant"
    assert "already used" in reuse.json()["error_description"]
    for access in (first["access_token"], body["access_token"]):
        jti = _jti(auth, access)
        assert auth.query("SELECT revoked_at FROM auth_token WHERE jti = ?", (jti,))[0][0] is not None
    latest = _refresh(auth, client_id, body["refresh_token"])
    assert latest.status_code == 400
    assert latest.json() == {"error": "invalid_grant", "error_description": "this authorization was revoked"}


def test_refresh_token_is_bound_to_its_client(auth: RunningAuth) -> None:
    client_id = public_client(auth)
    other = public_client(auth)
    first = code_flow(auth, client_id, "carol", PASSWORD, SCOPE)["token"]
    cross = _refresh(auth, other, first["refresh_token"])
    assert cross.status_code == 400
    assert cross.json() == {
        "error": "invalid_grant",
        "error_description": "the refresh token was issued to another client",
    }
    ok = _refresh(auth, client_id, first["refresh_token"])
    assert ok.status_code == 200, ok.text
    unknown = _refresh(auth, client_id, "not-a-refresh-token")
    assert unknown.json()["error"] == "invalid_grant"


def test_no_scope_escalation_but_a_subset(auth: RunningAuth) -> None:
    client_id = public_client(auth)
    first = code_flow(auth, client_id, "carol", PASSWORD, SCOPE)["token"]
    more = _refresh(auth, client_id, first["refresh_token"], scope=SCOPE + " patient/Condition.rs")
    assert more.status_code == 400
    assert more.json()["error"] == "invalid_scope"
    assert "patient/Condition.rs" in more.json()["error_description"]
    less = _refresh(auth, client_id, first["refresh_token"], scope="patient/Observation.rs offline_access")
    assert less.status_code == 200, less.text
    assert less.json()["scope"] == "patient/Observation.rs offline_access"
    # the rotated token carries the narrower scope
    wider = _refresh(auth, client_id, less.json()["refresh_token"], scope="patient/Patient.rs offline_access")
    assert wider.json()["error"] == "invalid_scope"


def test_consent_unticking_offline_access_means_no_refresh_token(auth: RunningAuth) -> None:
    from tests.authserver.browser import Browser, auth_params, parse_form, pkce, query_of

    client_id = public_client(auth)
    verifier, challenge = pkce()
    with Browser(auth) as browser:
        page = browser.login(browser.authorize(auth_params(client_id, challenge, SCOPE)), "carol", PASSWORD)
        ticked = [s for s in parse_form(page.text).checkboxes if s != "offline_access"]
        done = browser.consent(page, scopes=ticked)
    code = query_of(done.headers["location"])["code"]
    r = auth.client.post(
        "/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_id": client_id,
            "code_verifier": verifier,
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["scope"] == "launch/patient patient/Observation.rs patient/Patient.rs"
    assert "refresh_token" not in r.json()


def test_client_without_refresh_grant_gets_no_refresh_token(auth: RunningAuth) -> None:
    client_id = public_client(auth, grant_types=["authorization_code"])
    body = code_flow(auth, client_id, "carol", PASSWORD, SCOPE)["token"]
    assert "refresh_token" not in body


def test_offline_access_expires(auth: RunningAuth) -> None:
    client_id = public_client(auth)
    first = code_flow(auth, client_id, "carol", PASSWORD, SCOPE)["token"]
    with later(auth.app.config.refresh_token_lifetime + 1):
        r = _refresh(auth, client_id, first["refresh_token"])
    assert r.json() == {"error": "invalid_grant", "error_description": "the refresh token has expired"}


def test_online_access_ends_with_the_login_session(auth: RunningAuth) -> None:
    client_id = public_client(auth)
    scope = "launch/patient patient/*.rs online_access"
    first = code_flow(auth, client_id, "carol", PASSWORD, scope)["token"]
    ok = _refresh(auth, client_id, first["refresh_token"])
    assert ok.status_code == 200, ok.text
    with later(auth.app.config.login_lifetime + 1):
        r = _refresh(auth, client_id, ok.json()["refresh_token"])
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_grant"
    assert "login session" in r.json()["error_description"]


def test_deleting_the_user_or_the_client_revokes_their_authorizations(auth: RunningAuth) -> None:
    """`fhirgate users delete` / `clients delete` end what the user or client authorized."""
    from fhirgate.authserver.clients import Clients
    from fhirgate.authserver.users import Users

    def run(action: Any) -> None:
        with_store(auth.database_url, action)

    auth.add_user("dora", PASSWORD, "Patient/d1")
    client_id = public_client(auth)
    token = code_flow(auth, client_id, "dora", PASSWORD, SCOPE)["token"]
    run(lambda store: Users(store).delete("dora"))
    r = _refresh(auth, client_id, token["refresh_token"])
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_grant"
    jti = _jti(auth, token["access_token"])
    assert auth.query("SELECT revoked_at IS NOT NULL FROM auth_token WHERE jti = ?", (jti,)) == [(True,)]
    assert auth.query("SELECT count(*) FROM auth_login WHERE username = 'dora' AND ended_at IS NULL") == [
        (0,)
    ]

    other = public_client(auth)
    kept = code_flow(auth, client_id := other, "carol", PASSWORD, SCOPE)["token"]
    run(lambda store: Clients(store).delete(client_id))
    gone = _refresh(auth, client_id, kept["refresh_token"])
    assert (gone.status_code, gone.json()["error"]) == (400, "invalid_client")  # the client is gone
    assert auth.query(
        "SELECT count(*) FROM auth_grant WHERE client_id = ? AND revoked_at IS NULL", (client_id,)
    ) == [(0,)]


def _claims(auth: RunningAuth, access_token: str) -> dict[str, Any]:
    keys = KeySet.import_key_set(auth.client.get("/jwks").json())
    return dict(jwt.decode(access_token, keys).claims)


def test_a_refresh_that_narrows_away_the_patient_scopes_drops_the_patient_context(auth: RunningAuth) -> None:
    client_id = public_client(auth)
    first = code_flow(auth, client_id, "carol", PASSWORD, SCOPE)["token"]
    assert first["patient"] == "c1"
    narrowed = _refresh(auth, client_id, first["refresh_token"], scope="offline_access")
    assert narrowed.status_code == 200, narrowed.text
    body = narrowed.json()
    assert body["scope"] == "offline_access"
    assert "patient" not in body
    assert "patient" not in _claims(auth, body["access_token"])


def test_user_scopes_carry_who_the_user_is(auth: RunningAuth) -> None:
    """A `user/` token says whose access it is (`fhirUser`), so the resource server can limit it."""
    client_id = public_client(auth)
    token = code_flow(auth, client_id, "carol", PASSWORD, "user/Observation.rs")["token"]
    claims = _claims(auth, token["access_token"])
    assert claims["fhirUser"] == "http://localhost:8000/fhir/Patient/c1"


def test_housekeeping_forgets_expired_codes_and_refresh_tokens_a_day_later(auth: RunningAuth) -> None:
    """The store does not grow with every code and refresh token ever issued."""
    client_id = public_client(auth)
    token = code_flow(auth, client_id, "carol", PASSWORD, SCOPE)["token"]
    family = auth.query("SELECT family FROM auth_refresh ORDER BY created_at DESC LIMIT 1")[0][0]
    assert auth.query("SELECT count(*) FROM auth_code WHERE family = ?", (family,)) == [(1,)]

    def sweep(at: float) -> None:
        clock.set_clock(lambda: at)
        try:
            auth.on_server(auth.app.housekeep())
        finally:
            clock.set_clock(None)

    sweep(clock.now() + 3600)  # the code expired, but less than a day ago: kept
    assert auth.query("SELECT count(*) FROM auth_code WHERE family = ?", (family,)) == [(1,)]
    sweep(clock.now() + 2 * 86400)
    assert auth.query("SELECT count(*) FROM auth_code WHERE family = ?", (family,)) == [(0,)]
    assert auth.query("SELECT count(*) FROM auth_refresh WHERE family = ?", (family,)) == [(1,)]  # 90 days
    sweep(clock.now() + 92 * 86400)
    assert auth.query("SELECT count(*) FROM auth_refresh WHERE family = ?", (family,)) == [(0,)]
    assert _refresh(auth, client_id, token["refresh_token"]).json()["error"] == "invalid_grant"
