"""The pages' forms accept posts from this server's own pages only: a browser that says a form
came from another site or origin, or that carries one of our cookies twice (one planted for the
parent domain), is refused before anything is looked at; nothing is issued."""

from __future__ import annotations

import pytest

from tests.authserver.browser import Browser, auth_params, parse_form, pkce, public_client, query_of
from tests.authserver.harness import RunningAuth, auth

__all__ = ["auth"]

PASSWORD = "cross site password"
SCOPE = "launch/patient patient/Observation.rs"


@pytest.fixture(scope="module", autouse=True)
def users(auth: RunningAuth) -> None:
    auth.add_user("xsite", PASSWORD, "Patient/x1")


def _consent_page(auth: RunningAuth, browser: Browser, client_id: str) -> tuple[object, dict[str, str]]:
    _, challenge = pkce()
    params = auth_params(client_id, challenge, SCOPE)
    page = browser.login(browser.authorize(params), "xsite", PASSWORD)
    assert "scope" in page.text
    return page, params


def _codes(auth: RunningAuth) -> int:
    return int(auth.query("SELECT count(*) FROM auth_code")[0][0])


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},  # a sibling subdomain: SameSite=Lax would let its cookies through
    ],
)
def test_a_consent_posted_from_another_site_is_refused(auth: RunningAuth, headers: dict[str, str]) -> None:
    client_id = public_client(auth)
    with Browser(auth) as browser:
        page, _ = _consent_page(auth, browser, client_id)
        form = parse_form(page.text)  # type: ignore[attr-defined]
        body = [*form.hidden.items(), *(("scope", s) for s in form.checkboxes), ("decision", "allow")]
        before = _codes(auth)
        from urllib.parse import urlencode

        r = browser.http.post(
            form.action,
            content=urlencode(body),
            headers={"Content-Type": "application/x-www-form-urlencoded", **headers},
        )
        assert r.status_code == 403
        assert "posted from another site" in r.text
        assert r.headers["x-frame-options"] == "DENY"
        assert "location" not in r.headers
        assert _codes(auth) == before


def test_the_same_origin_post_goes_through(auth: RunningAuth) -> None:
    client_id = public_client(auth)
    with Browser(auth) as browser:
        browser.http.headers["Origin"] = auth.issuer
        browser.http.headers["Sec-Fetch-Site"] = "same-origin"
        page, params = _consent_page(auth, browser, client_id)
        done = browser.consent(page)
    assert done.status_code == 303
    assert query_of(done.headers["location"])["state"] == params["state"]


def test_a_planted_second_browser_cookie_is_refused(auth: RunningAuth) -> None:
    client_id = public_client(auth)
    with Browser(auth) as browser:
        page, _ = _consent_page(auth, browser, client_id)
        form = parse_form(page.text)  # type: ignore[attr-defined]
        from urllib.parse import urlencode

        own = browser.http.cookies.get("fhirgate_browser")
        assert own
        before = _codes(auth)
        r = browser.http.post(
            form.action,
            content=urlencode([*form.hidden.items(), ("decision", "allow")]),
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Cookie": f"fhirgate_browser={own}; fhirgate_browser=attacker-chosen",
            },
        )
        assert r.status_code == 400
        assert "cookie fhirgate_browser twice" in r.text
        assert _codes(auth) == before


def test_authorize_post_from_the_app_is_still_cross_site(auth: RunningAuth) -> None:
    """SMART authorize-post: the app's own page posts the request to /authorize."""
    client_id = public_client(auth)
    _, challenge = pkce()
    with Browser(auth) as browser:
        from urllib.parse import urlencode

        r = browser.http.post(
            "/authorize",
            content=urlencode(auth_params(client_id, challenge, SCOPE)),
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Origin": "https://app.example",
                "Sec-Fetch-Site": "cross-site",
            },
        )
    assert r.status_code == 200
    assert "Sign in" in r.text
