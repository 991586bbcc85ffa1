"""The authorization code flow with PKCE on both stores, walked as a browser and a client would:
tokens and ID token, PKCE downgrades, code replay, redirect URI variants, `aud`, scopes, repeated
parameters, state, client authentication, and Authlib's own client as interop."""

from __future__ import annotations

import secrets
import warnings
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from tests.authserver.browser import (
    REDIRECT,
    Browser,
    auth_params,
    code_flow,
    pkce,
    public_client,
    query_of,
)
from tests.authserver.harness import ASSERTION_TYPE, FHIR_BASE, RunningAuth, assertion, auth, backend_client

__all__ = ["auth"]

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def users(auth: RunningAuth) -> dict[str, str]:
    auth.add_user("alice", PASSWORD, "Patient/123")
    auth.add_user("drbob", PASSWORD, "Practitioner/9")
    return {"patient": "alice", "practitioner": "drbob"}


def _keys(auth: RunningAuth) -> KeySet:
    return KeySet.import_key_set(auth.client.get("/jwks").json())


def _token(auth: RunningAuth, client_id: str, code: str, verifier: str, **extra: str) -> Any:
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "client_id": client_id,
        "code_verifier": verifier,
    }
    data.update(extra)
    return auth.client.post("/token", data={k: v for k, v in data.items() if v != ""})


def test_code_flow_issues_tokens_and_an_id_token(auth: RunningAuth, users: dict[str, str]) -> None:
    client_id = public_client(auth)
    scope = "openid fhirUser launch/patient patient/Observation.rs patient/Patient.read offline_access"
    flow = code_flow(auth, client_id, users["patient"], PASSWORD, scope, nonce="n-0S6_WzA2Mj")
    body = flow["token"]
    assert body["token_type"] == "Bearer"
    assert body["scope"] == scope
    assert body["patient"] == "123"
    assert body["need_patient_banner"] is True
    assert body["smart_style_url"] == auth.issuer + "/smart-style.json"
    assert "refresh_token" in body
    keys = _keys(auth)
    access = jwt.decode(body["access_token"], keys)
    assert access.header["typ"] == "at+jwt"
    claims = access.claims
    assert claims["aud"] == FHIR_BASE
    assert claims["sub"] == "alice"
    assert claims["client_id"] == client_id
    assert claims["patient"] == "123"
    assert claims["fhirUser"] == f"{FHIR_BASE}/Patient/123"
    assert claims["scope"] == scope
    id_token = jwt.decode(body["id_token"], keys)
    assert id_token.header["alg"] == "RS256"
    idc = id_token.claims
    assert idc["iss"] == auth.issuer
    assert idc["aud"] == client_id
    assert idc["sub"] == "alice"
    assert idc["nonce"] == "n-0S6_WzA2Mj"
    assert idc["fhirUser"] == f"{FHIR_BASE}/Patient/123"
    assert isinstance(idc["auth_time"], int)
    assert idc["exp"] > idc["iat"]
    rows = auth.query("SELECT family, revoked_at FROM auth_token WHERE jti = ?", (claims["jti"],))
    assert len(rows) == 1
    assert rows[0][1] is None
    # the code is stored only as its SHA-256
    assert not auth.query("SELECT 1 FROM auth_code WHERE code_hash = ?", (flow["code"],))
    info = auth.client.get("/userinfo", headers={"Authorization": "Bearer " + body["access_token"]})
    assert info.status_code == 200, info.text
    assert info.json() == {"sub": "alice", "fhirUser": f"{FHIR_BASE}/Patient/123"}


def test_v1_and_v2_scopes_are_echoed_and_no_refresh_token_without_offline(
    auth: RunningAuth, users: dict[str, str]
) -> None:
    client_id = public_client(auth)
    scope = "launch/patient patient/Observation.read patient/Condition.rs?category=problem-list-item"
    body = code_flow(auth, client_id, users["patient"], PASSWORD, scope)["token"]
    assert body["scope"] == scope
    assert "refresh_token" not in body
    assert "id_token" not in body


def test_code_replay_fails_and_revokes_what_the_first_use_issued(
    auth: RunningAuth, users: dict[str, str]
) -> None:
    client_id = public_client(auth)
    flow = code_flow(
        auth, client_id, users["patient"], PASSWORD, "launch/patient patient/*.rs offline_access"
    )
    first = flow["token"]
    again = _token(auth, client_id, flow["code"], flow["verifier"])
    assert again.status_code == 400
    assert again.json()["error"] == "invalid_grant"
    assert "already used" in again.json()["error_description"]
    jti = jwt.decode(first["access_token"], _keys(auth)).claims["jti"]
    assert auth.query("SELECT revoked_at FROM auth_token WHERE jti = ?", (jti,))[0][0] is not None
    refreshed = auth.client.post(
        "/token",
        data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"], "client_id": client_id},
    )
    assert refreshed.status_code == 400
    assert refreshed.json()["error"] == "invalid_grant"
    info = auth.client.get("/userinfo", headers={"Authorization": "Bearer " + first["access_token"]})
    assert info.status_code == 401


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"code_challenge_method": "plain"}, "code_challenge_method 'plain' is not accepted: use S256"),
        ({"code_challenge_method": ""}, "code_challenge_method is missing"),
        ({"code_challenge": "", "code_challenge_method": ""}, "code_challenge is missing"),
        ({"code_challenge": ""}, "code_challenge is missing"),
        ({"code_challenge": "short"}, "code_challenge must be the base64url SHA-256"),
    ],
)
def test_pkce_downgrades_are_refused_with_a_redirect(
    auth: RunningAuth, change: dict[str, str], message: str
) -> None:
    client_id = public_client(auth)
    _, challenge = pkce()
    params = {k: v for k, v in {**auth_params(client_id, challenge, "launch/patient"), **change}.items() if v}
    with Browser(auth) as browser:
        r = browser.authorize(params)
    assert r.status_code == 302
    q = query_of(r.headers["location"])
    assert r.headers["location"].startswith(REDIRECT + "?")
    assert q["error"] == "invalid_request"
    assert q["error_description"].startswith(message)
    assert q["state"] == params["state"]


def test_wrong_or_missing_code_verifier(auth: RunningAuth, users: dict[str, str]) -> None:
    client_id = public_client(auth)
    flow = code_flow(auth, client_id, users["patient"], PASSWORD, "launch/patient", token=False)
    missing = _token(auth, client_id, flow["code"], "")
    assert missing.status_code == 400
    assert missing.json()["error"] == "invalid_request"
    short = _token(auth, client_id, flow["code"], "abc")
    assert short.json()["error"] == "invalid_request"
    wrong = _token(auth, client_id, flow["code"], secrets.token_urlsafe(48))
    assert wrong.status_code == 400
    assert wrong.json() == {
        "error": "invalid_grant",
        "error_description": "code_verifier does not match the code_challenge (S256)",
    }
    ok = _token(auth, client_id, flow["code"], flow["verifier"])
    assert ok.status_code == 200, ok.text


def test_code_is_bound_to_client_and_redirect_uri(auth: RunningAuth, users: dict[str, str]) -> None:
    client_id = public_client(auth, redirect_uris=[REDIRECT, "https://app.example/other"])
    other = public_client(auth)
    flow = code_flow(auth, client_id, users["patient"], PASSWORD, "launch/patient", token=False)
    cross = _token(auth, other, flow["code"], flow["verifier"])
    assert cross.status_code == 400
    assert cross.json() == {
        "error": "invalid_grant",
        "error_description": "the authorization code was issued to another client",
    }
    wrong_uri = _token(
        auth, client_id, flow["code"], flow["verifier"], redirect_uri="https://app.example/other"
    )
    assert wrong_uri.json()["error"] == "invalid_grant"
    no_uri = _token(auth, client_id, flow["code"], flow["verifier"], redirect_uri="")
    assert no_uri.json()["error"] == "invalid_request"
    ok = _token(auth, client_id, flow["code"], flow["verifier"])
    assert ok.status_code == 200, ok.text


def test_confidential_client_authenticates_at_the_token_endpoint(
    auth: RunningAuth, users: dict[str, str]
) -> None:
    client_id, secret = auth.register(
        {
            "redirect_uris": [REDIRECT],
            "grant_types": ["authorization_code"],
            "token_endpoint_auth_method": "client_secret_basic",
        }
    )
    assert secret is not None
    flow = code_flow(auth, client_id, users["patient"], PASSWORD, "launch/patient", token=False)
    form = {
        "grant_type": "authorization_code",
        "code": flow["code"],
        "redirect_uri": REDIRECT,
        "code_verifier": flow["verifier"],
    }
    unauthenticated = auth.client.post("/token", data={**form, "client_id": client_id})
    assert unauthenticated.json()["error"] == "invalid_client"
    ok = auth.client.post("/token", data=form, auth=(client_id, secret))
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    "redirect_uri",
    [
        "https://app.example/cb/",
        "https://app.example/cb?x",
        "https://app.example/cb?",
        "https://app.example.evil.com/cb",
        "https://app.example@evil.com/cb",
        "https://app.example%40evil.com/cb",
        "https://app.example/%63b",
        "https://app.example/cb%2F",
        "https://APP.example/cb",
        "https://app.example:8443/cb",
        "http://app.example/cb",
        "https://app.example/cb#x",
    ],
)
def test_redirect_uri_variants_never_redirect(auth: RunningAuth, redirect_uri: str) -> None:
    client_id = public_client(auth)
    _, challenge = pkce()
    params = auth_params(client_id, challenge, "launch/patient", redirect_uri=redirect_uri)
    with Browser(auth) as browser:
        r = browser.authorize(params)
    assert r.status_code == 400
    assert "location" not in r.headers
    assert "is not registered for client" in r.text


def test_errors_before_a_trusted_redirect_uri_are_pages(auth: RunningAuth) -> None:
    client_id = public_client(auth)
    _, challenge = pkce()
    base = auth_params(client_id, challenge, "launch/patient")
    with Browser(auth) as browser:
        unknown = browser.authorize({**base, "client_id": "nobody"})
        assert unknown.status_code == 400
        assert "unknown client &#x27;nobody&#x27;" in unknown.text
        no_client = browser.authorize({k: v for k, v in base.items() if k != "client_id"})
        assert "client_id is missing" in no_client.text
        no_uri = browser.authorize({k: v for k, v in base.items() if k != "redirect_uri"})
        assert no_uri.status_code == 400
        assert "redirect_uri is missing" in no_uri.text
        twice = browser.authorize([*base.items(), ("redirect_uri", REDIRECT)])
        assert twice.status_code == 400
        assert "redirect_uri is repeated" in twice.text
    for r in (unknown, no_client, no_uri, twice):
        assert "location" not in r.headers


def test_loopback_redirect_may_vary_the_port_only(auth: RunningAuth, users: dict[str, str]) -> None:
    client_id = public_client(auth, redirect_uris=["http://127.0.0.1:4000/cb"])
    _, challenge = pkce()
    with Browser(auth) as browser:
        ok = browser.authorize(
            auth_params(client_id, challenge, "launch/patient", redirect_uri="http://127.0.0.1:5173/cb")
        )
        assert ok.status_code == 200
        assert "Sign in" in ok.text
        bad = browser.authorize(
            auth_params(client_id, challenge, "launch/patient", redirect_uri="http://127.0.0.1:5173/cb2")
        )
        assert bad.status_code == 400


@pytest.mark.parametrize(
    ("aud", "message"),
    [
        (None, "aud is missing"),
        ("https://evil.example/fhir", "aud 'https://evil.example/fhir' is not the FHIR base"),
        (FHIR_BASE + "/Patient", "is not the FHIR base"),
    ],
)
def test_wrong_or_missing_aud(auth: RunningAuth, aud: str | None, message: str) -> None:
    client_id = public_client(auth)
    _, challenge = pkce()
    params = auth_params(client_id, challenge, "launch/patient")
    if aud is None:
        del params["aud"]
    else:
        params["aud"] = aud
    with Browser(auth) as browser:
        r = browser.authorize(params)
    assert r.status_code == 302
    q = query_of(r.headers["location"])
    assert q["error"] == "invalid_request"
    assert message in q["error_description"]
    assert q["state"] == params["state"]


@pytest.mark.parametrize(
    ("scope", "message"),
    [
        ("system/*.read", "system/ scopes are only granted"),
        ("launch/patient patient/Observation.read system/Patient.rs", "system/ scopes"),
        ("patient/observation.read", "is not supported"),
        ("launch/patient offline_access online_access", "not both"),
        ("launch", "the launch scope needs the launch parameter"),
        ("launch/patient  patient/*.rs", "scope tokens separated by single spaces"),
    ],
)
def test_scopes_refused_in_a_user_flow(auth: RunningAuth, scope: str, message: str) -> None:
    client_id = public_client(auth)
    _, challenge = pkce()
    params = auth_params(client_id, challenge, scope)
    with Browser(auth) as browser:
        r = browser.authorize(params)
    assert r.status_code == 302
    q = query_of(r.headers["location"])
    assert q["error"] in ("invalid_scope", "invalid_request")
    assert message in q["error_description"]


def test_scopes_beyond_the_clients_registered_scope(auth: RunningAuth) -> None:
    client_id = public_client(auth, scope="launch/patient patient/*.rs")
    _, challenge = pkce()
    with Browser(auth) as browser:
        r = browser.authorize(auth_params(client_id, challenge, "launch/patient patient/*.cruds"))
    q = query_of(r.headers["location"])
    assert q["error"] == "invalid_scope"
    assert "is not registered for client" in q["error_description"]


def test_repeated_parameters_are_refused(auth: RunningAuth) -> None:
    client_id = public_client(auth)
    _, challenge = pkce()
    params = auth_params(client_id, challenge, "launch/patient")
    with Browser(auth) as browser:
        r = browser.authorize([*params.items(), ("scope", "patient/*.rs")])
    assert r.status_code == 302
    q = query_of(r.headers["location"])
    assert q["error"] == "invalid_request"
    assert q["error_description"] == "parameter 'scope' is repeated: send each once"
    assert q["state"] == params["state"]


def test_state_is_echoed_byte_for_byte(auth: RunningAuth, users: dict[str, str]) -> None:
    client_id = public_client(auth)
    state = "a b+c/d?e=f&g%20h~é\"'<>"
    flow = code_flow(auth, client_id, users["patient"], PASSWORD, "launch/patient", token=False, state=state)
    assert flow["state"] == state


def test_authorize_post_and_unsupported_response_type(auth: RunningAuth, users: dict[str, str]) -> None:
    client_id = public_client(auth)
    _, challenge = pkce()
    with Browser(auth) as browser:
        page = browser.authorize(auth_params(client_id, challenge, "launch/patient"), post=True)
        assert page.status_code == 200
        assert "Sign in" in page.text
        token = browser.authorize(auth_params(client_id, challenge, "launch/patient", response_type="token"))
    assert token.status_code == 302
    assert query_of(token.headers["location"])["error"] == "unsupported_response_type"


def test_authlib_client_performs_code_and_pkce(auth: RunningAuth, users: dict[str, str]) -> None:
    with warnings.catch_warnings():  # Authlib 1.9 deprecates its httpx module in favour of httpx2
        warnings.simplefilter("ignore")
        from authlib.integrations.httpx_client import OAuth2Client

    client_id = public_client(auth)
    scope = "openid fhirUser launch/patient patient/*.rs offline_access"
    with OAuth2Client(
        client_id=client_id,
        redirect_uri=REDIRECT,
        scope=scope,
        code_challenge_method="S256",
        token_endpoint_auth_method="none",
    ) as oauth:
        verifier = secrets.token_urlsafe(48)
        url, _state = oauth.create_authorization_url(
            auth.issuer + "/authorize", code_verifier=verifier, aud=FHIR_BASE
        )
        with Browser(auth) as browser:
            page = browser.http.get(url)
            page = browser.login(page, users["patient"], PASSWORD)
            done = browser.consent(page)
        assert done.status_code == 303
        token = oauth.fetch_token(
            auth.token_url, authorization_response=done.headers["location"], code_verifier=verifier
        )
    assert token["scope"] == scope
    assert token["patient"] == "123"
    assert "id_token" in token
    assert "refresh_token" in token


def test_no_password_code_or_token_reaches_the_log(
    auth: RunningAuth, users: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    client_id = public_client(auth)
    flow = code_flow(auth, client_id, users["patient"], PASSWORD, "openid launch/patient offline_access")
    with Browser(auth) as browser:
        _, challenge = pkce()
        browser.login(
            browser.authorize(auth_params(client_id, challenge, "launch/patient")), "alice", "guess-1"
        )
    server_side = ("fhirgate", "authlib", "uvicorn", "starlette", "asyncpg", "anyio")
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.split(".")[0] in server_side)
    from fhirgate.authserver.launch import digest

    assert f"sign-in failed for username sha256:{digest('alice')[:12]}" in text
    with Browser(auth) as browser:  # a password typed into the username field stays out too
        _, challenge = pkce()
        browser.login(
            browser.authorize(auth_params(client_id, challenge, "launch/patient")), "hunter2-password", "x"
        )
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.split(".")[0] in server_side)
    for secret in (
        PASSWORD,
        "guess-1",
        "hunter2-password",
        flow["code"],
        *(flow["token"][k] for k in ("access_token", "refresh_token", "id_token")),
    ):
        assert secret not in text


def test_an_expired_code_is_refused(auth: RunningAuth, users: dict[str, str]) -> None:
    from fhirgate import clock

    client_id = public_client(auth)
    flow = code_flow(auth, client_id, users["patient"], PASSWORD, "launch/patient", token=False)
    real = clock.now()
    clock.set_clock(lambda: real + auth.app.config.code_lifetime + 1)
    try:
        late = _token(auth, client_id, flow["code"], flow["verifier"])
    finally:
        clock.set_clock(None)
    assert late.status_code == 400
    assert late.json() == {
        "error": "invalid_grant",
        "error_description": "the authorization code has expired",
    }


def test_an_unknown_code_and_a_practitioner_user(auth: RunningAuth, users: dict[str, str]) -> None:
    client_id = public_client(auth)
    unknown = _token(auth, client_id, "x" * 43, "v" * 43)
    assert unknown.json() == {
        "error": "invalid_grant",
        "error_description": "the authorization code is unknown",
    }
    body = code_flow(auth, client_id, users["practitioner"], PASSWORD, "openid fhirUser user/*.rs")["token"]
    claims = jwt.decode(body["access_token"], _keys(auth)).claims
    assert claims["fhirUser"] == f"{FHIR_BASE}/Practitioner/9"
    assert "patient" not in claims
    assert "patient" not in body


@pytest.mark.parametrize(
    ("response_type", "error"),
    [
        (None, "invalid_request"),
        ("token", "unsupported_response_type"),
        ('co"de\\', "unsupported_response_type"),
    ],
)
def test_missing_or_unsupported_response_type(
    auth: RunningAuth, response_type: str | None, error: str
) -> None:
    client_id = public_client(auth)
    _, challenge = pkce()
    params = auth_params(client_id, challenge, "launch/patient")
    if response_type is None:
        del params["response_type"]
    else:
        params["response_type"] = response_type
    with Browser(auth) as browser:
        r = browser.authorize(params)
    assert r.status_code == 302
    q = query_of(r.headers["location"])
    assert q["error"] == error
    assert '"' not in q["error_description"]
    assert "\\" not in q["error_description"]
    assert q["state"] == params["state"]


def test_concurrent_exchanges_of_one_code_issue_at_most_one_live_token(
    auth: RunningAuth, users: dict[str, str]
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    client_id = public_client(auth)
    flow = code_flow(
        auth, client_id, users["patient"], PASSWORD, "launch/patient offline_access", token=False
    )
    form = {
        "grant_type": "authorization_code",
        "code": flow["code"],
        "redirect_uri": REDIRECT,
        "client_id": client_id,
        "code_verifier": flow["verifier"],
    }

    def exchange(_: int) -> httpx.Response:
        with httpx.Client(base_url=auth.base, timeout=30) as http:
            return http.post("/token", data=form)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(exchange, range(4)))
    ok = [r for r in results if r.status_code == 200]
    assert len(ok) <= 1
    assert all(r.json()["error"] == "invalid_grant" for r in results if r.status_code != 200)
    # whatever was issued belongs to a revoked family: the replay revoked it
    for r in ok:
        jti = jwt.decode(r.json()["access_token"], _keys(auth)).claims["jti"]
        assert auth.query("SELECT revoked_at FROM auth_token WHERE jti = ?", (jti,))[0][0] is not None


def test_private_key_jwt_client_exchanges_a_code(auth: RunningAuth, users: dict[str, str]) -> None:
    client_id, key = backend_client(auth, redirect_uris=[REDIRECT], grant_types=["authorization_code"])
    flow = code_flow(auth, client_id, users["patient"], PASSWORD, "launch/patient", token=False)
    signed = assertion(auth, key, client_id, lifetime=120)
    r = auth.client.post(
        "/token",
        data={
            "grant_type": "authorization_code",
            "code": flow["code"],
            "redirect_uri": REDIRECT,
            "code_verifier": flow["verifier"],
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": signed,
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["patient"] == "123"


def test_max_age_asks_for_a_fresh_sign_in_and_prompt_none_stands_alone(
    auth: RunningAuth, users: dict[str, str]
) -> None:
    """OpenID Connect Core 3.1.2.1: `max_age` older than the login means signing in again;
    `prompt=none` combined with another value is `invalid_request`."""
    client_id = public_client(auth)
    with Browser(auth) as browser:
        _, challenge = pkce()
        first = browser.login(
            browser.authorize(auth_params(client_id, challenge, "launch/patient")), users["patient"], PASSWORD
        )
        assert "Sign in" not in first.text  # signed in: on to consent
        from fhirgate import clock

        real = clock.now()
        clock.set_clock(lambda: real + 5)  # the login is now 5 seconds old
        try:
            again = browser.authorize(auth_params(client_id, challenge, "launch/patient", max_age="2"))
        finally:
            clock.set_clock(None)
        assert again.status_code == 200
        assert "Sign in" in again.text
        recent = browser.authorize(auth_params(client_id, challenge, "launch/patient", max_age="3600"))
        assert "Sign in" not in recent.text
        for bad in ("x", "-1", "1.5"):
            r = browser.authorize(auth_params(client_id, challenge, "launch/patient", max_age=bad))
            assert r.status_code in (302, 303)
            assert query_of(r.headers["location"])["error"] == "invalid_request"
        mixed = browser.authorize(auth_params(client_id, challenge, "launch/patient", prompt="none login"))
    assert mixed.status_code in (302, 303)
    query = query_of(mixed.headers["location"])
    assert query["error"] == "invalid_request"
    assert query["error_description"] == "prompt=none cannot be combined with other values"
