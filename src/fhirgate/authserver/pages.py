"""The HTML pages of the browser flows: login, patient picker, consent, sign-out, the management
page (the applications a user authorized) and the error page.

Plain forms that work without JavaScript. Everything echoed is HTML-escaped (`html.escape` with
quotes). Every page is sent with `X-Frame-Options: DENY`, `Cache-Control: no-store` and a strict
Content-Security-Policy: nothing loads from anywhere (`default-src 'none'`), the one inline style
sheet is allowed by its SHA-256, forms post only to this server (`form-action 'self'`, plus the
client's redirect origin on the consent page, whose answer is a redirect there: browsers apply
`form-action` to the redirects that follow a form submission), and no page can be framed.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape

from starlette.responses import HTMLResponse

__all__ = [
    "GrantView",
    "consent_page",
    "error_page",
    "login_page",
    "logout_page",
    "manage_page",
    "page",
    "page_headers",
    "picker_page",
    "scope_description",
]

STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:34rem;margin:3rem auto;padding:0 1rem;"
    "color:#1b1b1b}h1{font-size:1.4rem}label{display:block;margin:.6rem 0}"
    "input[type=text],input[type=password]{width:100%;padding:.4rem;box-sizing:border-box}"
    "button{padding:.5rem 1.2rem;margin:.8rem .6rem 0 0}.error{color:#a00000}"
    "code{background:#f2f2f2;padding:0 .2rem}"
)
STYLE_HASH = "sha256-" + base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()


def page_headers(form_origins: Sequence[str] = ()) -> dict[str, str]:
    """The security headers of every page (`form_origins`: origins a form's answer may redirect to)."""
    form_action = " ".join(["'self'", *form_origins])
    return {
        "Content-Security-Policy": (
            f"default-src 'none'; style-src '{STYLE_HASH}'; form-action {form_action}; "
            "frame-ancestors 'none'; base-uri 'none'"
        ),
        "X-Frame-Options": "DENY",
        "Cache-Control": "no-store",
        "Pragma": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


def page(
    title: str,
    body: str,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    form_origins: Sequence[str] = (),
) -> HTMLResponse:
    """A whole page; `body` is HTML already escaped by the caller."""
    text = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>"
        f"<body><h1>{escape(title)}</h1>\n{body}\n</body></html>\n"
    )
    all_headers = page_headers(form_origins)
    all_headers.update(headers or {})
    return HTMLResponse(text, status, all_headers)


def error_page(
    status: int, title: str, message: str, headers: Mapping[str, str] | None = None
) -> HTMLResponse:
    """An error shown to the user, never a redirect (the client's redirect URI is not trusted, or
    the problem is the browser's own: CSRF, an expired form)."""
    return page(title, f'<p class="error">{escape(message)}</p>', status, headers)


def _hidden(fields: Mapping[str, str]) -> str:
    return "".join(
        f'<input type="hidden" name="{escape(name)}" value="{escape(value)}">'
        for name, value in fields.items()
    )


def _client(client_name: str) -> str:
    return f"<p>Application <strong>{escape(client_name)}</strong> asks to access your health records.</p>"


def login_page(
    action: str,
    hidden: Mapping[str, str],
    client_name: str | None,
    username: str = "",
    error: str | None = None,
) -> str:
    """The login form; `client_name` None: signing in to the management page, not for a client."""
    error_html = f'<p class="error">{escape(error)}</p>' if error else ""
    intro = (
        _client(client_name)
        if client_name is not None
        else "<p>Sign in to see which applications can access your health records.</p>"
    )
    return (
        f"{intro}{error_html}"
        f'<form method="post" action="{escape(action)}">{_hidden(hidden)}'
        '<label>Username <input type="text" name="username" autocomplete="username" required '
        f'value="{escape(username)}"></label>'
        '<label>Password <input type="password" name="password" autocomplete="current-password" '
        "required></label>"
        '<button type="submit">Sign in</button></form>'
    )


def picker_page(
    action: str, hidden: Mapping[str, str], client_name: str, patients: Sequence[tuple[str, str]]
) -> str:
    """`patients`: (id, label) pairs; the label (a name and birth date, when known) is shown."""
    options = "".join(
        f'<label><input type="radio" name="patient" value="{escape(p)}"{" checked" if i == 0 else ""}> '
        f"{escape(label)} <code>Patient/{escape(p)}</code></label>"
        for i, (p, label) in enumerate(patients)
    )
    return (
        f"{_client(client_name)}<p>Choose the patient whose records the application may use.</p>"
        f'<form method="post" action="{escape(action)}">{_hidden(hidden)}{options}'
        '<button type="submit">Continue</button></form>'
    )


_FIXED = {
    "openid": "Confirm your identity to the application (OpenID Connect)",
    "fhirUser": "Tell the application who you are (your FHIR user record)",
    "profile": "Tell the application who you are",
    "launch": "Use the patient and encounter the EHR opened the application with",
    "launch/patient": "Use the patient you choose",
    "launch/encounter": "Use the encounter it is launched in",
    "offline_access": "Keep access after you sign out (offline access)",
    "online_access": "Keep access while you stay signed in (online access)",
}
_V1 = {"read": "read", "write": "write", "*": "read and write"}
_V2 = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}


def scope_description(scope: str) -> str:
    """A scope in words, for the consent page."""
    if scope in _FIXED:
        return _FIXED[scope]
    context, _, rest = scope.partition("/")
    resource, _, action = rest.partition(".")
    action, _, query = action.partition("?")
    whose = {"patient": "the patient's", "user": "your", "system": "all"}.get(context, context)
    what = "all resources" if resource == "*" else f"{resource} resources"
    verbs = _V1[action] if action in _V1 else ", ".join(_V2.get(c, c) for c in action)
    text = f"{verbs.capitalize()} {whose} {what}"
    return text + (f" where {query}" if query else "")


def consent_page(
    action: str,
    hidden: Mapping[str, str],
    client_name: str,
    scopes: Sequence[str],
    username: str,
    patient: str | None,
) -> str:
    who = f"<p>Signed in as <strong>{escape(username)}</strong>.</p>"
    about = f"<p>Patient: <code>{escape(patient)}</code></p>" if patient else ""
    boxes = "".join(
        f'<label><input type="checkbox" name="scope" value="{escape(s)}" checked> '
        f"{escape(scope_description(s))} <code>{escape(s)}</code></label>"
        for s in scopes
    )
    return (
        f"{_client(client_name)}{who}{about}"
        "<p>Untick what you do not want to allow.</p>"
        f'<form method="post" action="{escape(action)}">{_hidden(hidden)}{boxes}'
        '<button type="submit" name="decision" value="allow">Allow</button>'
        '<button type="submit" name="decision" value="deny">Deny</button></form>'
    )


def logout_page(action: str, hidden: Mapping[str, str], username: str | None) -> str:
    """The sign-out form (or, with no login session, a page that says so)."""
    if username is None:
        return "<p>You are not signed in.</p>"
    return (
        f"<p>Signed in as <strong>{escape(username)}</strong>.</p>"
        "<p>Signing out ends this login session: applications allowed online access only lose it.</p>"
        f'<form method="post" action="{escape(action)}">{_hidden(hidden)}'
        '<button type="submit">Sign out</button></form>'
    )


@dataclass(frozen=True, slots=True)
class GrantView:
    """One authorization as the management page shows it."""

    family: str
    client_name: str
    client_id: str
    scopes: Sequence[str]
    patient: str | None
    created: str
    access: str


def manage_page(
    action: str, hidden: Mapping[str, str], username: str, grants: Sequence[GrantView], notice: str = ""
) -> str:
    """The applications `username` authorized, each with a form that revokes it (hidden field
    `family`, submit `action=revoke`)."""
    parts = [f"<p>Signed in as <strong>{escape(username)}</strong>.</p>"]
    if notice:
        parts.append(f"<p>{escape(notice)}</p>")
    if not grants:
        parts.append("<p>No application has access to your health records.</p>")
    for g in grants:
        scopes = "".join(
            f"<li>{escape(scope_description(s))} <code>{escape(s)}</code></li>" for s in g.scopes
        )
        patient = f"<p>Patient: <code>{escape(g.patient)}</code></p>" if g.patient else ""
        fields = {**hidden, "family": g.family}
        parts.append(
            f"<section><h2>{escape(g.client_name)} <code>{escape(g.client_id)}</code></h2>"
            f"<p>Allowed {escape(g.created)}; {escape(g.access)}.</p>{patient}<ul>{scopes}</ul>"
            f'<form method="post" action="{escape(action)}">{_hidden(fields)}'
            '<button type="submit" name="action" value="revoke">Revoke access</button></form></section>'
        )
    return "".join(parts)
