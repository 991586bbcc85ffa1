"""Sign-out (`/logout`), the SMART management page (`/manage`) and the ID token on refresh, on
both stores, attacker-style: CSRF missing or wrong or from another browser, another user's
authorization, no login, framing headers."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from tests.authserver.browser import (
    Browser,
    Form,
    _Parser,
    auth_params,
    exchange,
    parse_form,
    pkce,
    public_client,
)
from tests.authserver.harness import RunningAuth, auth

__all__ = ["auth"]

PASSWORD = "manage password"
ONLINE = "launch/patient patient/Observation.rs online_access"
OFFLINE = "openid fhirUser launch/patient patient/Observation.rs offline_access"


@pytest.fixture(scope="module", autouse=True)
def users(auth: RunningAuth) -> None:
    auth.add_user("gina", PASSWORD, "Patient/g1")
    auth.add_user("mallory", PASSWORD, "Patient/m1")


def forms(html: str) -> list[Form]:
    parser = _Parser()
    parser.feed(html)
    return parser.forms


def check_headers(response: httpx.Response) -> None:
    assert response.headers["x-frame-options"] == "DENY"
    csp = response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp
    assert "default-src 'none'" in csp
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["content-type"].startswith("text/html")


def flow(auth: RunningAuth, browser: Browser, client_id: str, user: str, scope: str, **extra: str) -> Any:
    """One code flow in `browser` (signing in when it has no session): the token response."""
    verifier, challenge = pkce()
    params = auth_params(client_id, challenge, scope, **extra)
    page = browser.authorize(params)
    if "Sign in" in page.text:
        page = browser.login(page, user, PASSWORD)
    return exchange(auth, client_id, browser.consent(page), verifier)


def refresh(auth: RunningAuth, client_id: str, token: str) -> httpx.Response:
    return auth.client.post(
        "/token", data={"grant_type": "refresh_token", "refresh_token": token, "client_id": client_id}
    )


def claims(auth: RunningAuth, token: str) -> dict[str, Any]:
    keys = KeySet.import_key_set(auth.client.get("/jwks").json())
    return dict(jwt.decode(token, keys).claims)


def manage_login(browser: Browser, user: str) -> httpx.Response:
    """The management page, signing in first when the browser has no login session."""
    page = browser.http.get("/manage")
    assert page.status_code == 200
    if "Your applications" in page.text:
        return page
    form = parse_form(page.text)
    assert form.action == "/manage/login"
    r = browser.submit(page, {"username": user, "password": PASSWORD})
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/manage"
    listing = browser.http.get("/manage")
    assert listing.status_code == 200
    assert "Your applications" in listing.text
    return listing


def family_of(auth: RunningAuth, access_token: str) -> str:
    jti = claims(auth, access_token)["jti"]
    return str(auth.query("SELECT family FROM auth_token WHERE jti = ?", (jti,))[0][0])


def revoked(auth: RunningAuth, family: str) -> bool:
    return auth.query("SELECT revoked_at FROM auth_grant WHERE family = ?", (family,))[0][0] is not None


# --- /logout ------------------------------------------------------------------------------------


def test_logout_ends_the_login_session_and_online_access(auth: RunningAuth) -> None:
    client_id = public_client(auth)
    with Browser(auth) as browser:
        online = flow(auth, browser, client_id, "gina", ONLINE)
        offline = flow(auth, browser, client_id, "gina", OFFLINE)  # same session: no second sign-in
        page = browser.http.get("/logout")
        assert page.status_code == 200
        check_headers(page)
        assert "gina" in page.text
        form = parse_form(page.text)
        assert form.action == "/logout"
        assert set(form.hidden) == {"csrf"}
        # the attacks: no CSRF token, a wrong one, one from another browser, no browser cookie
        assert browser.post_form("/logout", {}).status_code == 403
        assert browser.post_form("/logout", {"csrf": "x" * 43}).status_code == 403
        with Browser(auth) as other:
            foreign = parse_form(other.http.get("/manage").text).hidden["csrf"]
        assert browser.post_form("/logout", {"csrf": foreign}).status_code == 403
        bare = httpx.post(
            auth.base + "/logout",
            content="csrf=" + form.hidden["csrf"],
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert bare.status_code == 403
        # none of them ended the session: online_access still refreshes
        still = refresh(auth, client_id, online["refresh_token"])
        assert still.status_code == 200, still.text
        online_refresh = still.json()["refresh_token"]
        done = browser.submit(page, {})
        assert done.status_code == 200, done.text
        check_headers(done)
        assert "signed out" in done.text
        cleared = done.headers["set-cookie"]
        assert cleared.startswith("fhirgate_session=")
        assert "Max-Age=0" in cleared
        assert "fhirgate_session" not in browser.http.cookies
        # online_access stops at once; offline_access goes on
        gone = refresh(auth, client_id, online_refresh)
        assert gone.status_code == 400
        assert gone.json()["error"] == "invalid_grant"
        assert "login session" in gone.json()["error_description"]
        assert refresh(auth, client_id, offline["refresh_token"]).status_code == 200
        # the next authorization asks to sign in again; the sign-out page says nobody is signed in
        _, challenge = pkce()
        assert "Sign in" in browser.authorize(auth_params(client_id, challenge, ONLINE)).text
        again = browser.http.get("/logout")
        assert "not signed in" in again.text
        assert not forms(again.text)


def test_logout_with_a_stolen_session_cookie_after_sign_out_does_nothing(auth: RunningAuth) -> None:
    client_id = public_client(auth)
    with Browser(auth) as browser:
        flow(auth, browser, client_id, "gina", ONLINE)
        stolen = browser.http.cookies["fhirgate_session"]
        page = browser.http.get("/logout")
        assert browser.submit(page, {}).status_code == 200
    with Browser(auth) as thief:
        thief.http.cookies.set("fhirgate_session", stolen)
        assert "Sign in" in thief.http.get("/manage").text
        _, challenge = pkce()
        assert "Sign in" in thief.authorize(auth_params(client_id, challenge, ONLINE)).text


# --- /manage ------------------------------------------------------------------------------------


def test_manage_needs_a_login_with_csrf_and_headers(auth: RunningAuth) -> None:
    with Browser(auth) as browser:
        page = browser.http.get("/manage")
        assert page.status_code == 200
        check_headers(page)
        assert "Sign in" in page.text
        assert "fhirgate_browser=" in page.headers["set-cookie"]
        form = parse_form(page.text)
        assert form.fields == ["username", "password"]
        assert set(form.hidden) == {"csrf"}
        assert (
            browser.post_form("/manage/login", {"username": "gina", "password": PASSWORD}).status_code == 403
        )
        wrong = browser.post_form(
            "/manage/login", {"csrf": "A" * 43, "username": "gina", "password": PASSWORD}
        )
        assert wrong.status_code == 403
        assert "fhirgate_session" not in browser.http.cookies
        bad = browser.submit(page, {"username": "gina", "password": "not it"})
        assert bad.status_code == 200
        assert "wrong username or password" in bad.text
        assert "fhirgate_session" not in browser.http.cookies
        # a POST to /manage without a login is refused, even with a good CSRF token
        refused = browser.post_form("/manage", {"csrf": form.hidden["csrf"], "family": "x"})
        assert refused.status_code == 403
        check_headers(refused)
        listing = manage_login(browser, "gina")
        check_headers(listing)
    with Browser(auth) as framed:  # the login form page itself cannot be framed either
        check_headers(framed.http.get("/manage"))


def test_manage_lists_and_revokes_only_the_users_own_authorizations(auth: RunningAuth) -> None:
    client_id = public_client(auth, client_name="Lab <Viewer>")
    with Browser(auth) as victim, Browser(auth) as attacker:
        mine = flow(auth, victim, client_id, "gina", OFFLINE)
        theirs = flow(auth, attacker, client_id, "mallory", OFFLINE)
        my_family = family_of(auth, mine["access_token"])
        their_family = family_of(auth, theirs["access_token"])
        listing = manage_login(victim, "gina")
        assert "Lab &lt;Viewer&gt;" in listing.text
        assert client_id in listing.text
        assert "<code>patient/Observation.rs</code>" in listing.text
        assert "<code>g1</code>" in listing.text
        assert "offline access" in listing.text
        own_forms = {f.hidden["family"]: f for f in forms(listing.text)}
        assert my_family in own_forms
        assert their_family not in own_forms
        assert "mallory" not in listing.text
        form = own_forms[my_family]
        assert form.action == "/manage"
        assert form.buttons == [("action", "revoke")]
        csrf = form.hidden["csrf"]
        # the attacks on the revoke form: another user's family (with a valid session and CSRF),
        # an unknown family, no CSRF token, a wrong one, the attacker's own token and cookie
        other = victim.post_form("/manage", {"csrf": csrf, "family": their_family, "action": "revoke"})
        assert other.status_code == 404
        check_headers(other)
        assert victim.post_form("/manage", {"csrf": csrf, "family": "nope"}).status_code == 404
        assert victim.post_form("/manage", {"family": my_family}).status_code == 403
        assert victim.post_form("/manage", {"csrf": "x", "family": my_family}).status_code == 403
        attacker_page = manage_login(attacker, "mallory")
        attacker_csrf = forms(attacker_page.text)[0].hidden["csrf"]
        assert victim.post_form("/manage", {"csrf": attacker_csrf, "family": my_family}).status_code == 403
        cross = attacker.post_form("/manage", {"csrf": attacker_csrf, "family": my_family})
        assert cross.status_code == 404
        assert not revoked(auth, my_family)
        assert not revoked(auth, their_family)
        assert (
            victim.post_form("/manage", {"csrf": csrf, "family": my_family, "action": "x"}).status_code == 400
        )
        # the real revoke: a 303 back to the list, the family revoked as a whole
        done = victim.post_form("/manage", {"csrf": csrf, "family": my_family, "action": "revoke"})
        assert done.status_code == 303
        assert done.headers["location"] == "/manage"
        assert revoked(auth, my_family)
        assert not revoked(auth, their_family)
        jti = claims(auth, mine["access_token"])["jti"]
        assert auth.query("SELECT revoked_at FROM auth_token WHERE jti = ?", (jti,))[0][0] is not None
        gone = refresh(auth, client_id, mine["refresh_token"])
        assert gone.status_code == 400
        assert gone.json()["error"] == "invalid_grant"
        assert my_family not in {f.hidden.get("family") for f in forms(victim.http.get("/manage").text)}
        # revoking it again is refused; the attacker's authorization still works
        assert victim.post_form("/manage", {"csrf": csrf, "family": my_family}).status_code == 404
        assert refresh(auth, client_id, theirs["refresh_token"]).status_code == 200


def test_metadata_advertises_management_but_no_end_session(auth: RunningAuth) -> None:
    smart = auth.client.get("/.well-known/smart-configuration").json()
    assert smart["management_endpoint"] == auth.issuer + "/manage"
    oidc = auth.client.get("/.well-known/openid-configuration").json()
    assert "end_session_endpoint" not in oidc
    assert "end_session_endpoint" not in smart


# --- the ID token on refresh (OpenID Connect Core 1.0 §12.2) ------------------------------------


def test_refresh_issues_a_new_id_token_without_nonce(auth: RunningAuth) -> None:
    client_id = public_client(auth)
    with Browser(auth) as browser:
        first = flow(auth, browser, client_id, "gina", OFFLINE, nonce="n-0S6_WzA2Mj")
    original = claims(auth, first["id_token"])
    assert original["nonce"] == "n-0S6_WzA2Mj"
    r = refresh(auth, client_id, first["refresh_token"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert "id_token" in body
    header = jwt.decode(body["id_token"], KeySet.import_key_set(auth.client.get("/jwks").json())).header
    assert header["alg"] == "RS256"
    renewed = claims(auth, body["id_token"])
    for name in ("iss", "sub", "aud", "fhirUser", "auth_time"):
        assert renewed[name] == original[name], name
    assert renewed["fhirUser"].endswith("/Patient/g1")
    assert "nonce" not in renewed
    assert renewed["iat"] >= original["iat"]
    digest = hashlib.sha256(body["access_token"].encode()).digest()[:16]
    assert renewed["at_hash"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    # no openid, no ID token on refresh
    with Browser(auth) as browser:
        plain = flow(auth, browser, client_id, "gina", ONLINE.replace("online_access", "offline_access"))
    assert "id_token" not in plain
    again = refresh(auth, client_id, plain["refresh_token"])
    assert again.status_code == 200
    assert "id_token" not in again.json()
