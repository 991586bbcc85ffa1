"""SMART launch context on both stores: EHR launch values minted by `fhirgate launch` (bound to one
client, single-use, expiring), standalone launch/patient with the picker, OpenID Connect's
fhirUser and /userinfo."""

from __future__ import annotations

from pathlib import Path

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from fhirgate import clock
from fhirgate.cli.main import main
from tests.authserver.browser import (
    Browser,
    auth_params,
    code_flow,
    parse_form,
    pkce,
    public_client,
    query_of,
)
from tests.authserver.harness import FHIR_BASE, RunningAuth, auth

__all__ = ["auth"]

PASSWORD = "launch password"


@pytest.fixture(scope="module")
def users(auth: RunningAuth) -> None:
    auth.add_user("nurse", PASSWORD, "Practitioner/7")
    auth.add_user("pat1", PASSWORD, "Patient/p1")
    auth.add_user("pat2", PASSWORD, "Patient/p2")


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no ./fhirgate.toml
    for name in ("FHIRGATE_DATABASE_URL", "FHIRGATE_AUTH_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)


def _mint(auth: RunningAuth, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["launch", *args, "--database", auth.database_url])
    out, err = capsys.readouterr()
    return code, out.strip(), err


@pytest.mark.usefixtures("users")
def test_ehr_launch_gives_patient_and_encounter_without_a_picker(
    auth: RunningAuth, capsys: pytest.CaptureFixture[str]
) -> None:
    client_id = public_client(auth)
    code, launch, err = _mint(
        auth,
        capsys,
        "--patient",
        "p2",
        "--encounter",
        "e9",
        f"--client-id={client_id}",
        "--fhir-context",
        "Appointment/a1",
    )
    assert code == 0, err
    assert len(launch) >= 43
    assert not auth.query("SELECT 1 FROM auth_launch WHERE launch_hash = ?", (launch,))
    scope = "launch openid fhirUser patient/*.rs"
    flow = code_flow(auth, client_id, "nurse", PASSWORD, scope, launch=launch)
    body = flow["token"]
    assert body["patient"] == "p2"
    assert body["encounter"] == "e9"
    assert body["fhirContext"] == [{"reference": "Appointment/a1"}]
    assert body["need_patient_banner"] is False
    keys = KeySet.import_key_set(auth.client.get("/jwks").json())
    claims = jwt.decode(body["access_token"], keys).claims
    assert claims["patient"] == "p2"
    assert claims["encounter"] == "e9"
    assert claims["fhirUser"] == f"{FHIR_BASE}/Practitioner/7"
    id_claims = jwt.decode(body["id_token"], keys).claims
    assert id_claims["fhirUser"] == f"{FHIR_BASE}/Practitioner/7"
    # single use
    _, challenge = pkce()
    with Browser(auth) as browser:
        again = browser.authorize(auth_params(client_id, challenge, scope, launch=launch))
    q = query_of(again.headers["location"])
    assert q["error"] == "invalid_request"
    assert q["error_description"] == "the launch value was already used"


@pytest.mark.usefixtures("users")
def test_launch_is_bound_to_its_client_and_expires(
    auth: RunningAuth, capsys: pytest.CaptureFixture[str]
) -> None:
    client_id = public_client(auth)
    other = public_client(auth)
    _, launch, _ = _mint(auth, capsys, "--patient", "p1", f"--client-id={client_id}")
    _, challenge = pkce()
    with Browser(auth) as browser:
        r = browser.authorize(auth_params(other, challenge, "launch patient/*.rs", launch=launch))
        assert query_of(r.headers["location"])["error_description"] == (
            "the launch value was minted for another client"
        )
        unknown = browser.authorize(auth_params(client_id, challenge, "launch", launch="nope"))
        assert query_of(unknown.headers["location"])["error_description"] == "the launch value is unknown"
        no_scope = browser.authorize(auth_params(client_id, challenge, "launch/patient", launch=launch))
        assert query_of(no_scope.headers["location"])["error"] == "invalid_scope"
        real = clock.now()
        clock.set_clock(lambda: real + 301)
        try:
            late = browser.authorize(auth_params(client_id, challenge, "launch", launch=launch))
        finally:
            clock.set_clock(None)
        assert query_of(late.headers["location"])["error_description"] == "the launch value has expired"


def test_launch_command_refuses_bad_input(auth: RunningAuth, capsys: pytest.CaptureFixture[str]) -> None:
    client_id = public_client(auth)
    code, _, err = _mint(auth, capsys, "--patient", "p 1", f"--client-id={client_id}")
    assert code == 1
    assert err.startswith("error: invalid patient id")
    code, _, err = _mint(auth, capsys, "--patient", "p1", "--client-id=nobody")
    assert code == 1
    assert err == 'error: no client "nobody"\n'
    backend, _ = auth.register({"grant_types": ["client_credentials"], "scope": "system/*.read"})
    code, _, err = _mint(auth, capsys, "--patient", "p1", f"--client-id={backend}")
    assert code == 1
    assert "is not registered for authorization_code" in err


@pytest.mark.usefixtures("users")
def test_standalone_launch_patient_shows_the_picker_for_a_practitioner(auth: RunningAuth) -> None:
    client_id = public_client(auth)
    verifier, challenge = pkce()
    params = auth_params(client_id, challenge, "launch/patient patient/*.rs")
    with Browser(auth) as browser:
        picker = browser.login(browser.authorize(params), "nurse", PASSWORD)
        assert picker.status_code == 200
        assert "Choose a patient" in picker.text
        form = parse_form(picker.text)
        assert form.radios == ["p1", "p2"]
        refused = browser.submit(picker, {"patient": "p3"})
        assert refused.status_code == 400
        consent = browser.submit(picker, {"patient": "p2"})
        assert "Allow access" in consent.text
        assert "p2" in consent.text
        done = browser.consent(consent)
    code = query_of(done.headers["location"])["code"]
    r = auth.client.post(
        "/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": params["redirect_uri"],
            "client_id": client_id,
            "code_verifier": verifier,
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["patient"] == "p2"


@pytest.mark.usefixtures("users")
def test_a_patient_user_skips_the_picker_and_gets_their_own_record(auth: RunningAuth) -> None:
    client_id = public_client(auth)
    body = code_flow(auth, client_id, "pat1", PASSWORD, "launch/patient patient/*.rs")["token"]
    assert body["patient"] == "p1"
    # without a launch scope a practitioner asking for patient/ scopes is told what to ask
    _, challenge = pkce()
    with Browser(auth) as browser:
        r = browser.login(
            browser.authorize(auth_params(client_id, challenge, "patient/*.rs")), "nurse", PASSWORD
        )
    assert r.status_code == 303
    assert query_of(r.headers["location"])["error"] == "invalid_scope"


@pytest.mark.usefixtures("users")
def test_userinfo(auth: RunningAuth) -> None:
    client_id = public_client(auth)
    body = code_flow(auth, client_id, "nurse", PASSWORD, "openid fhirUser user/*.rs")["token"]
    headers = {"Authorization": "Bearer " + body["access_token"]}
    got = auth.client.get("/userinfo", headers=headers)
    assert got.status_code == 200
    assert got.headers["cache-control"] == "no-store"
    assert got.json() == {"sub": "nurse", "fhirUser": f"{FHIR_BASE}/Practitioner/7"}
    posted = auth.client.post("/userinfo", headers=headers)
    assert posted.json()["sub"] == "nurse"
    missing = auth.client.get("/userinfo")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    bad = auth.client.get(
        "/userinfo", headers={"Authorization": "Bearer " + body["access_token"][:-4] + "AAAA"}
    )
    assert bad.status_code == 401
    assert bad.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    no_openid = code_flow(auth, client_id, "nurse", PASSWORD, "user/*.rs")["token"]
    r = auth.client.get("/userinfo", headers={"Authorization": "Bearer " + no_openid["access_token"]})
    assert r.status_code == 403
    assert r.json()["error"] == "insufficient_scope"


def test_smart_style(auth: RunningAuth) -> None:
    r = auth.client.get("/smart-style.json")
    assert r.status_code == 200
    assert "color_background" in r.json()


def test_metadata_lists_what_the_browser_flows_do(auth: RunningAuth) -> None:
    smart = auth.client.get("/.well-known/smart-configuration").json()
    assert smart["authorization_endpoint"] == auth.issuer + "/authorize"
    assert {"authorization_code", "refresh_token"} <= set(smart["grant_types_supported"])
    assert "none" in smart["token_endpoint_auth_methods_supported"]
    assert smart["code_challenge_methods_supported"] == ["S256"]
    for capability in (
        "launch-ehr",
        "launch-standalone",
        "client-public",
        "authorize-post",
        "context-banner",
        "context-style",
        "context-ehr-patient",
        "context-ehr-encounter",
        "context-standalone-patient",
        "permission-offline",
        "permission-online",
        "permission-patient",
        "permission-user",
        "sso-openid-connect",
    ):
        assert capability in smart["capabilities"]
    oidc = auth.client.get("/.well-known/openid-configuration").json()
    assert oidc["userinfo_endpoint"] == auth.issuer + "/userinfo"
    assert oidc["id_token_signing_alg_values_supported"] == ["RS256"]
    assert {"openid", "fhirUser", "launch/patient", "offline_access"} <= set(oidc["scopes_supported"])
