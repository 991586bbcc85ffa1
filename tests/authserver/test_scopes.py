"""SMART scopes in the user flows on both stores: v2 granular scopes (SMART App Launch 2.2
§"Scopes", ONC (g)(10)) and v1 scopes accepted, shown on the consent page with the scope string
as the checkbox value, granted and echoed exactly; malformed ones refused before any page."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from tests.authserver.browser import (
    REDIRECT,
    Browser,
    auth_params,
    exchange,
    parse_form,
    pkce,
    public_client,
    query_of,
)
from tests.authserver.harness import RunningAuth, auth

__all__ = ["auth"]

PASSWORD = "scopes password"
LAB = "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory"
VITALS = (
    "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|vital-signs"
)
CONDITION = (
    "patient/Condition.rs?category=http://hl7.org/fhir/us/core/CodeSystem/condition-category|health-concern"
)


@pytest.fixture(scope="module")
def client_id(auth: RunningAuth) -> str:
    auth.add_user("hana", PASSWORD, "Patient/h1")
    return public_client(auth)


@pytest.fixture(scope="module")
def browser(auth: RunningAuth, client_id: str) -> Iterator[Browser]:
    """One browser signed in as hana for the whole module (one password hash, not one per test)."""
    with Browser(auth) as b:
        _, challenge = pkce()
        page = b.login(b.authorize(auth_params(client_id, challenge, "launch/patient")), "hana", PASSWORD)
        assert "Allow access" in page.text
        yield b


def consent_page(browser: Browser, client_id: str, scope: str) -> tuple[httpx.Response, str]:
    verifier, challenge = pkce()
    page = browser.authorize(auth_params(client_id, challenge, scope))
    assert page.status_code == 200, page.text
    assert "Allow access" in page.text, page.text
    return page, verifier


def scope_claim(auth: RunningAuth, access_token: str) -> str:
    keys = KeySet.import_key_set(auth.client.get("/jwks").json())
    return str(jwt.decode(access_token, keys).claims["scope"])


@pytest.mark.parametrize(
    "scope",
    [
        f"launch/patient {LAB} offline_access",
        f"openid fhirUser launch/patient {LAB} {VITALS} {CONDITION} patient/Patient.r",
        "launch/patient patient/Observation.rs?code:in=http://example.org/ValueSet/x&date=ge2020",
        "launch/patient patient/*.read user/Patient.write patient/Observation.*",
        "launch/patient patient/*.cruds user/Observation.s patient/Condition.crud",
    ],
)
def test_scopes_are_shown_granted_and_echoed_exactly(
    auth: RunningAuth, client_id: str, browser: Browser, scope: str
) -> None:
    page, verifier = consent_page(browser, client_id, scope)
    form = parse_form(page.text)
    assert form.checkboxes == scope.split(" ")  # the value is the scope string, byte for byte
    token = exchange(auth, client_id, browser.consent(page), verifier)
    assert token["scope"] == scope
    assert scope_claim(auth, token["access_token"]) == scope
    assert token["patient"] == "h1"


def test_unticked_granular_scope_is_not_granted_and_refresh_narrows(
    auth: RunningAuth, client_id: str, browser: Browser
) -> None:
    scope = f"launch/patient {LAB} {VITALS} offline_access"
    page, verifier = consent_page(browser, client_id, scope)
    assert "where category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory" in page.text
    token = exchange(
        auth, client_id, browser.consent(page, scopes=["launch/patient", LAB, "offline_access"]), verifier
    )
    assert token["scope"] == f"launch/patient {LAB} offline_access"
    # refresh: the granted granular scope may be asked for again, alone; the broader one and the
    # unticked one may not
    for wider in ("patient/Observation.rs", VITALS, LAB + "&code=1234-5"):
        r = auth.client.post(
            "/token",
            data={
                "grant_type": "refresh_token",
                "refresh_token": token["refresh_token"],
                "client_id": client_id,
                "scope": f"launch/patient {wider}",
            },
        )
        assert r.status_code == 400, wider
        assert r.json()["error"] == "invalid_scope"
    narrowed = auth.client.post(
        "/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": token["refresh_token"],
            "client_id": client_id,
            "scope": LAB,
        },
    )
    assert narrowed.status_code == 200, narrowed.text
    assert narrowed.json()["scope"] == LAB
    assert scope_claim(auth, narrowed.json()["access_token"]) == LAB


def test_a_forged_consent_cannot_add_a_broader_scope(
    auth: RunningAuth, client_id: str, browser: Browser
) -> None:
    page, _ = consent_page(browser, client_id, f"launch/patient {LAB}")
    done = browser.consent(page, scopes=["launch/patient", LAB, "patient/Observation.rs"])
    assert done.status_code == 400
    assert "was not requested" in done.text


@pytest.mark.parametrize(
    "bad",
    [
        "patient/Observation.sr",  # the letters out of order
        "patient/Observation.rr",  # a letter twice
        "patient/Observation.rx",  # an unknown letter
        "patient/Observation.crudsx",
        "patient/Observation.",  # no permission
        "patient/.rs",  # no resource type
        "patient/observation.rs",  # not a resource type
        "patient/Observation.rs?",  # ? without a parameter
        "patient/Observation.rs?category",  # a parameter without a value
        "patient/Observation.rs?category=",
        "patient/Observation.rs?=laboratory",
        "patient/Observation.rs?category=a&",
        "patient/Observation.rs?category=a&&code=b",
        "patient/Observation.rs?category=a?code=b",
        "patient/Observation.read?category=a",  # v1 has no restriction
        "patient/Observation.readwrite",
        "Patient/Observation.rs",
        "practitioner/Observation.rs",
        "system/Observation.rs",  # never in a user flow
        "system/*.read",
    ],
)
def test_malformed_scopes_are_refused_before_any_page(
    auth: RunningAuth, client_id: str, browser: Browser, bad: str
) -> None:
    _, challenge = pkce()
    params = auth_params(client_id, challenge, f"launch/patient {bad}")
    r = browser.authorize(params)
    assert r.status_code == 302, r.text
    query = query_of(r.headers["location"])
    assert r.headers["location"].startswith(REDIRECT + "?")
    assert query["error"] == "invalid_scope", query
    assert query["state"] == params["state"]
    assert "code" not in query


def test_a_client_registered_for_wider_scopes_may_ask_for_granular_ones(
    auth: RunningAuth, browser: Browser
) -> None:
    narrow = public_client(auth, scope="launch/patient patient/Observation.rs patient/*.read")
    page, verifier = consent_page(browser, narrow, f"launch/patient {LAB} patient/Condition.r")
    token = exchange(auth, narrow, browser.consent(page), verifier)
    assert token["scope"] == f"launch/patient {LAB} patient/Condition.r"
    for wider in ("patient/Observation.cruds", "user/Observation.rs", "offline_access"):
        _, challenge = pkce()
        r = browser.authorize(auth_params(narrow, challenge, f"launch/patient {wider}"))
        assert r.status_code == 302, wider
        assert query_of(r.headers["location"])["error"] == "invalid_scope", wider
    only_lab = public_client(auth, scope=f"launch/patient {LAB}")
    _, challenge = pkce()
    r = browser.authorize(auth_params(only_lab, challenge, "launch/patient patient/Observation.rs"))
    assert query_of(r.headers["location"])["error"] == "invalid_scope"
    page, _ = consent_page(browser, only_lab, f"launch/patient {LAB}")
    assert parse_form(page.text).checkboxes == ["launch/patient", LAB]
