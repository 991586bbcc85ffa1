"""The login, patient picker and consent pages on both stores: security headers, CSRF, the sealed
request, cookies, consent and denial, escaping, login rate limiting, no 307."""

from __future__ import annotations

import hashlib

import pytest

from tests.authserver.browser import REDIRECT, Browser, auth_params, parse_form, pkce, public_client, query_of
from tests.authserver.harness import RunningAuth, auth

__all__ = ["auth"]

PASSWORD = "pages password"
SCOPE = "openid fhirUser launch/patient patient/Observation.rs"


@pytest.fixture(scope="module", autouse=True)
def users(auth: RunningAuth) -> None:
    auth.add_user("dave", PASSWORD, "Patient/d1")


def _start(
    auth: RunningAuth, browser: Browser, scope: str = SCOPE, **extra: str
) -> tuple[str, dict[str, str]]:
    client_id = public_client(auth)
    _, challenge = pkce()
    return client_id, auth_params(client_id, challenge, scope, **extra)


def _check_headers(page_headers: dict[str, str] | object) -> None:
    headers = page_headers
    assert headers["x-frame-options"] == "DENY"  # type: ignore[index]
    csp = headers["content-security-policy"]  # type: ignore[index]
    assert "default-src 'none'" in csp
    assert "frame-ancestors 'none'" in csp
    assert "form-action 'self'" in csp
    assert "style-src 'sha256-" in csp
    assert "script-src" not in csp
    assert headers["cache-control"] == "no-store"  # type: ignore[index]
    assert headers["content-type"].startswith("text/html")  # type: ignore[index]


def test_pages_carry_security_headers_csrf_and_escape(auth: RunningAuth) -> None:
    with Browser(auth) as browser:
        _, params = _start(auth, browser, state="<script>alert(1)</script>")
        login = browser.authorize(params)
        assert login.status_code == 200
        _check_headers(login.headers)
        assert "Test &lt;App&gt;" in login.text
        assert "<script>" not in login.text
        form = parse_form(login.text)
        assert set(form.hidden) == {"csrf", "request"}
        assert form.fields == ["username", "password"]
        browser_cookie = login.headers["set-cookie"]
        assert "HttpOnly" in browser_cookie
        assert "SameSite=lax" in browser_cookie or "SameSite=Lax" in browser_cookie
        assert "Path=/" in browser_cookie
        consent = browser.login(login, "dave", PASSWORD)
        assert consent.status_code == 200
        _check_headers(consent.headers)
        assert "form-action 'self' https://app.example" in consent.headers["content-security-policy"]
        cookie = next(c for c in consent.headers.get_list("set-cookie") if c.startswith("fhirgate_session="))
        assert "HttpOnly" in cookie
        assert "Secure" not in cookie  # the test issuer is http
        value = cookie.split(";", 1)[0].split("=", 1)[1]
        rows = auth.query(
            "SELECT username FROM auth_login WHERE session_hash = ?",
            (hashlib.sha256(value.encode()).hexdigest(),),
        )
        assert rows == [("dave",)]
        assert not auth.query("SELECT 1 FROM auth_login WHERE session_hash = ?", (value,))
        form = parse_form(consent.text)
        assert form.checkboxes == SCOPE.split(" ")
        assert form.buttons == [("decision", "allow"), ("decision", "deny")]


def test_csrf_missing_or_wrong_and_tampered_request(auth: RunningAuth) -> None:
    with Browser(auth) as browser:
        _, params = _start(auth, browser)
        login = browser.authorize(params)
        form = parse_form(login.text)
        creds = {"username": "dave", "password": PASSWORD}
        missing = browser.post_form(form.action, {"request": form.hidden["request"], **creds})
        assert missing.status_code == 403
        _check_headers(missing.headers)
        assert "CSRF token is missing or wrong" in missing.text
        wrong = browser.post_form(form.action, {"csrf": "x" * 43, "request": form.hidden["request"], **creds})
        assert wrong.status_code == 403
        blob = form.hidden["request"]
        tampered = browser.post_form(
            form.action, {"csrf": form.hidden["csrf"], "request": "A" + blob[1:], **creds}
        )
        assert tampered.status_code == 403
        # another browser cannot replay this browser's form
        with Browser(auth) as other:
            other.authorize(params)
            stolen = other.post_form(form.action, {**form.hidden, **creds})
            assert stolen.status_code == 403
        # no browser cookie at all
        with Browser(auth) as fresh:
            none = fresh.post_form(form.action, {**form.hidden, **creds})
            assert none.status_code == 403
            assert "no session cookie" in none.text
    assert not auth.query("SELECT 1 FROM auth_login WHERE username = 'nobody'")


def test_deny_redirects_access_denied_with_state(auth: RunningAuth) -> None:
    with Browser(auth) as browser:
        _, params = _start(auth, browser)
        consent = browser.login(browser.authorize(params), "dave", PASSWORD)
        denied = browser.consent(consent, decision="deny")
    assert denied.status_code == 303
    location = denied.headers["location"]
    assert location.startswith(REDIRECT + "?")
    q = query_of(location)
    assert q["error"] == "access_denied"
    assert q["state"] == params["state"]
    assert "code" not in q


def test_consent_unticking_reduces_the_scope_and_unrequested_is_refused(auth: RunningAuth) -> None:
    with Browser(auth) as browser:
        _client_id, params = _start(auth, browser)
        consent = browser.login(browser.authorize(params), "dave", PASSWORD)
        extra = browser.consent(consent, scopes=["openid", "patient/*.cruds"])
        assert extra.status_code == 400
        assert "was not requested" in extra.text
        none = browser.consent(consent, scopes=[])
        assert query_of(none.headers["location"])["error"] == "access_denied"
        # a fresh consent page (the failed posts above issued nothing)
        consent = browser.authorize(params)
        assert "Allow access" in consent.text  # signed in already: no login page
        done = browser.consent(consent, scopes=["launch/patient", "patient/Observation.rs"])
    assert done.status_code == 303
    code = query_of(done.headers["location"])["code"]
    assert code


def test_code_response_is_a_303_and_never_307(auth: RunningAuth) -> None:
    with Browser(auth) as browser:
        _, params = _start(auth, browser)
        first = browser.authorize(params)
        consent = browser.login(first, "dave", PASSWORD)
        done = browser.consent(consent)
        err = browser.authorize({**params, "aud": "https://x.example"})
    assert done.status_code == 303
    assert err.status_code == 302
    post_err = Browser(auth)
    try:
        r = post_err.authorize({**params, "aud": "https://x.example"}, post=True)
    finally:
        post_err.close()
    assert r.status_code == 303


def test_prompt_none_and_prompt_login(auth: RunningAuth) -> None:
    with Browser(auth) as browser:
        _, params = _start(auth, browser, prompt="none")
        r = browser.authorize(params)
        assert query_of(r.headers["location"])["error"] == "login_required"
        _, params = _start(auth, browser)
        browser.login(browser.authorize(params), "dave", PASSWORD)
        again = browser.authorize({**params, "prompt": "login"})
        assert "Sign in" in again.text
        skipped = browser.authorize(params)
        assert "Allow access" in skipped.text


def test_login_failures_are_limited_and_successes_are_not(auth: RunningAuth) -> None:
    auth.add_user("erin", PASSWORD, "Patient/e1")
    with Browser(auth) as browser:
        _, params = _start(auth, browser)
        login = browser.authorize(params)
        for _ in range(3):  # successes do not count
            ok = browser.login(login, "erin", PASSWORD)
            assert "Allow access" in ok.text
        limit = 10
        for _ in range(limit):
            bad = browser.login(login, "erin", "wrong")
            assert bad.status_code == 200
            assert "wrong username or password" in bad.text
            assert "Sign in" in bad.text
        blocked = browser.login(login, "erin", PASSWORD)
        assert blocked.status_code == 429
        _check_headers(blocked.headers)
        assert int(blocked.headers["retry-after"]) > 0
        # another username is not affected
        other = browser.login(login, "dave", PASSWORD)
        assert "Allow access" in other.text


def test_form_must_be_urlencoded_and_fields_once(auth: RunningAuth) -> None:
    with Browser(auth) as browser:
        _, params = _start(auth, browser)
        login = browser.authorize(params)
        form = parse_form(login.text)
        as_json = browser.http.post(
            form.action, json={**form.hidden, "username": "dave", "password": PASSWORD}
        )
        assert as_json.status_code == 415
        twice = browser.post_form(
            form.action,
            [*form.hidden.items(), ("username", "dave"), ("username", "x"), ("password", PASSWORD)],
        )
        assert twice.status_code == 400
        assert "field username is repeated" in twice.text


def test_a_form_expires(auth: RunningAuth) -> None:
    from fhirgate import clock

    with Browser(auth) as browser:
        _, params = _start(auth, browser)
        login = browser.authorize(params)
        real = clock.now()
        clock.set_clock(lambda: real + 1801)
        try:
            late = browser.login(login, "dave", PASSWORD)
        finally:
            clock.set_clock(None)
    assert late.status_code == 400
    assert "this form has expired" in late.text
    _check_headers(late.headers)


def test_pages_need_a_session_after_login(auth: RunningAuth) -> None:
    with Browser(auth) as browser:
        _, params = _start(auth, browser)
        consent = browser.login(browser.authorize(params), "dave", PASSWORD)
        browser.http.cookies.delete("fhirgate_session")
        again = browser.consent(consent)
    assert again.status_code == 200
    assert "Sign in" in again.text  # no code without a signed-in user
