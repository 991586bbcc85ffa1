"""A scripted browser for the authorization server's pages: it keeps cookies, parses each page's
form with `html.parser` (action, hidden inputs, checkboxes, radios) and posts it back as a
browser would. Plus PKCE helpers and a whole code flow for the tests that need tokens."""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx

from tests.authserver.harness import FHIR_BASE, RunningAuth

__all__ = ["Browser", "Form", "code_flow", "pkce", "public_client", "query_of"]

REDIRECT = "https://app.example/cb"


@dataclass
class Form:
    action: str = ""
    hidden: dict[str, str] = field(default_factory=dict)
    checkboxes: list[str] = field(default_factory=list)
    radios: list[str] = field(default_factory=list)
    fields: list[str] = field(default_factory=list)
    buttons: list[tuple[str, str]] = field(default_factory=list)


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[Form] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append(Form(action=a.get("action", "")))
        elif tag == "input" and self.forms:
            form = self.forms[-1]
            kind = a.get("type", "text")
            if kind == "hidden":
                form.hidden[a["name"]] = a.get("value", "")
            elif kind == "checkbox":
                form.checkboxes.append(a.get("value", ""))
            elif kind == "radio":
                form.radios.append(a.get("value", ""))
            else:
                form.fields.append(a["name"])
        elif tag == "button" and self.forms and "name" in a:
            self.forms[-1].buttons.append((a["name"], a.get("value", "")))


def parse_form(html: str) -> Form:
    parser = _Parser()
    parser.feed(html)
    assert len(parser.forms) == 1, html
    return parser.forms[0]


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def query_of(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query, keep_blank_values=True).items()}


def public_client(auth: RunningAuth, **metadata: Any) -> str:
    meta: dict[str, Any] = {
        "redirect_uris": [REDIRECT],
        "grant_types": ["authorization_code", "refresh_token"],
        "token_endpoint_auth_method": "none",
        "client_name": "Test <App>",
    }
    meta.update(metadata)
    client_id, _ = auth.register(meta)
    return client_id


class Browser:
    """One browser: its own cookie jar."""

    def __init__(self, auth: RunningAuth) -> None:
        self.auth = auth
        self.http = httpx.Client(base_url=auth.base, timeout=30, follow_redirects=False)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def post_form(self, path: str, pairs: dict[str, str] | list[tuple[str, str]]) -> httpx.Response:
        items = list(pairs.items()) if isinstance(pairs, dict) else pairs
        return self.http.post(
            path,
            content=urlencode(items),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )

    def authorize(self, params: dict[str, str] | list[tuple[str, str]], post: bool = False) -> httpx.Response:
        if post:
            return self.post_form("/authorize", params)
        return self.http.get("/authorize", params=params)

    def submit(self, page: httpx.Response, data: dict[str, Any] | list[tuple[str, str]]) -> httpx.Response:
        form = parse_form(page.text)
        body: list[tuple[str, str]] = list(form.hidden.items())
        body += list(data.items()) if isinstance(data, dict) else list(data)
        return self.post_form(form.action, body)

    def login(self, page: httpx.Response, username: str, password: str) -> httpx.Response:
        assert page.status_code == 200, page.text
        assert "Sign in" in page.text
        return self.submit(page, {"username": username, "password": password})

    def consent(
        self, page: httpx.Response, decision: str = "allow", scopes: list[str] | None = None
    ) -> httpx.Response:
        assert page.status_code == 200, page.text
        form = parse_form(page.text)
        ticked = form.checkboxes if scopes is None else scopes
        return self.submit(page, [*(("scope", s) for s in ticked), ("decision", decision)])


def auth_params(client_id: str, challenge: str, scope: str, **extra: str) -> dict[str, str]:
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT,
        "scope": scope,
        "state": "st-" + secrets.token_hex(4),
        "aud": FHIR_BASE,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    params.update(extra)
    return params


def exchange(auth: RunningAuth, client_id: str, done: httpx.Response, verifier: str) -> Any:
    """The code in `done` (the consent's redirect) exchanged by a public client: the token response."""
    assert done.status_code == 303, done.text
    r = auth.client.post(
        "/token",
        data={
            "grant_type": "authorization_code",
            "code": query_of(done.headers["location"])["code"],
            "redirect_uri": REDIRECT,
            "client_id": client_id,
            "code_verifier": verifier,
        },
    )
    assert r.status_code == 200, r.text
    return r.json()


def code_flow(
    auth: RunningAuth,
    client_id: str,
    username: str,
    password: str,
    scope: str,
    token: bool = True,
    **extra: str,
) -> dict[str, Any]:
    """The whole flow: authorize, sign in, (pick the first patient), allow, exchange the code.
    Returns {"code", "verifier", "state", "location", "token" (the token response, if asked)}."""
    verifier, challenge = pkce()
    params = auth_params(client_id, challenge, scope, **extra)
    with Browser(auth) as browser:
        page = browser.login(browser.authorize(params), username, password)
        if "Choose a patient" in page.text:
            page = browser.submit(page, {"patient": parse_form(page.text).radios[0]})
        done = browser.consent(page)
    assert done.status_code in (302, 303), done.text
    location = done.headers["location"]
    query = query_of(location)
    assert query.get("state") == params["state"], location
    out: dict[str, Any] = {
        "code": query.get("code"),
        "verifier": verifier,
        "state": params["state"],
        "location": location,
    }
    if token:
        out["token"] = exchange(auth, client_id, done, verifier)
    return out
