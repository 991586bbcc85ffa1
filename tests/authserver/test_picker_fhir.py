"""The patient picker over a real FHIR server (`auth_patient_search_url`): it lists the server's
Patients by name and birth date, searching with a short-lived system token of its own; a chosen
patient must exist there; an unreachable FHIR server is a page that says so, not a crash."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.authserver.browser import Browser, auth_params, exchange, parse_form, pkce, public_client
from tests.authserver.harness import RunningAuth, database, running_auth
from tests.fhirserver.harness import RunningFhir, running_fhir

PASSWORD = "picker password"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningAuth, RunningFhir, list[str]]]:
    tmp: Path = tmp_path_factory.mktemp("picker")
    with database("sqlite", tmp) as fhir_url, running_fhir(fhir_url) as fhir:
        ids = [
            fhir.create(
                {"resourceType": "Patient", "name": [{"given": [given], "family": family}], "birthDate": born}
            )["id"]
            for given, family, born in (
                ("Ada", "Lovelace", "1815-12-10"),
                ("Alan", "Turing", "1912-06-23"),
                ("Grace", "Hopper", "1906-12-09"),
            )
        ]
        with (
            database("sqlite", tmp) as auth_url,
            running_auth(auth_url, patient_search_url=fhir.base) as auth,
        ):
            auth.add_user("drpick", PASSWORD, "Practitioner/7")
            yield auth, fhir, ids


def _picker(auth: RunningAuth, browser: Browser, ok: bool = True) -> tuple[Any, str, str]:
    """The page after signing in as the practitioner: (page, client_id, PKCE verifier)."""
    client_id = public_client(auth)
    verifier, challenge = pkce()
    page = browser.login(
        browser.authorize(auth_params(client_id, challenge, "launch/patient patient/*.rs")),
        "drpick",
        PASSWORD,
    )
    if ok:
        assert page.status_code == 200, page.text
    return page, client_id, verifier


def test_the_picker_lists_the_fhir_servers_patients_and_the_choice_becomes_the_context(
    stack: tuple[RunningAuth, RunningFhir, list[str]],
) -> None:
    auth, _, ids = stack
    with Browser(auth) as browser:
        page, client_id, verifier = _picker(auth, browser)
        assert "Choose a patient" in page.text
        assert "Ada Lovelace, born 1815-12-10" in page.text
        assert "Alan Turing, born 1912-06-23" in page.text
        assert set(parse_form(page.text).radios) == set(ids)
        consent = browser.submit(page, {"patient": ids[1]})
        done = browser.consent(consent)
    token = exchange(auth, client_id, done, verifier)
    assert token["patient"] == ids[1]


def test_a_patient_that_does_not_exist_cannot_be_chosen(
    stack: tuple[RunningAuth, RunningFhir, list[str]],
) -> None:
    auth, _, _ = stack
    with Browser(auth) as browser:
        page, _, _ = _picker(auth, browser)
        for forged in ("does-not-exist", "../Observation/1", "a" * 65):
            r = browser.submit(page, {"patient": forged})
            assert r.status_code == 400
            assert "choose one of the patients offered" in r.text


def test_an_unreachable_fhir_server_is_a_page_that_says_so(tmp_path: Path) -> None:
    with (
        database("sqlite", tmp_path) as url,
        running_auth(url, patient_search_url="http://127.0.0.1:9") as auth,
    ):
        auth.add_user("drpick", PASSWORD, "Practitioner/7")
        with Browser(auth) as browser:
            page, _, _ = _picker(auth, browser, ok=False)
    assert page.status_code == 502
    assert "could not be reached" in page.text
    assert "Traceback" not in page.text
