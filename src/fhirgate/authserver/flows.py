"""The browser flows: `/authorize`, the login, patient picker and consent pages, the
authorization_code grant with PKCE, refresh tokens, OpenID Connect and SMART launch context.

Authlib's grants do the OAuth work, subclassed where SMART App Launch 2.2 is stricter:

- `CodeGrant` (`AuthorizationCodeGrant`): `redirect_uri` required and matched exactly (loopback:
  the port alone may vary); `aud` must be the FHIR base; SMART scope rules (v1 and v2 resource
  scopes, `system/` never in a user flow, within the client's registered `scope`); EHR `launch`
  values; codes of 256 random bits stored as SHA-256, single-use (a replay revokes the family).
- `S256Challenge` (`CodeChallenge`): PKCE required for every client, S256 only (Authlib's accepts
  `plain` and is optional for confidential clients).
- `RefreshGrant` (`RefreshTokenGrant`): bound to its client, no scope escalation, rotated at every
  use, a reused refresh token revokes its whole family; `online_access` ends with the login.
- `OpenIDConnect` (`OpenIDCode`): an RS256 ID token (`iss`, `sub`, `aud`, `iat`, `exp`, `nonce`,
  `auth_time`, `at_hash`, `fhirUser`) signed with the store's RS256 key; `RefreshGrant` issues a
  new one (same `sub`, `fhirUser`, `auth_time`; no `nonce`) when `openid` was granted.

The pages carry the pending authorization request in a hidden field, sealed (HMAC-SHA-256 with a
server secret shared by every node, bound to the browser's cookie, expiring), and every POST
validates the whole request again through Authlib; the CSRF token is an HMAC of the browser cookie.
A login session is a random cookie whose SHA-256 is kept in `auth_login`.

`/logout` (GET: a form; POST with the CSRF token) ends the login session, so the `online_access`
refresh tokens issued in it stop working at once. `/manage` (SMART's `management_endpoint`) lists
the signed-in user's authorizations that still give access, each with a revoke form (POST with the
CSRF token and the family; only the user's own), which revokes the whole family.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import anyio.to_thread
import orjson
from authlib.oauth2.rfc6749 import (
    AccessDeniedError,
    InvalidGrantError,
    InvalidRequestError,
    InvalidScopeError,
    OAuth2Error,
    OAuth2Request,
)
from authlib.oauth2.rfc6749.grants import AuthorizationCodeGrant, RefreshTokenGrant
from authlib.oauth2.rfc7636 import CodeChallenge, create_s256_code_challenge
from authlib.oidc.core.errors import ConsentRequiredError, LoginRequiredError
from authlib.oidc.core.grants import OpenIDCode
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from fhirgate import clock
from fhirgate.authserver import pages
from fhirgate.authserver.access import inspect_access_token
from fhirgate.authserver.keys import KeyRing, SigningKey
from fhirgate.authserver.launch import digest
from fhirgate.authserver.oauth import (
    Bridge,
    Grantee,
    OAuthClient,
    OAuthServer,
    TokenRequest,
    _q,
    check_scope_syntax,
    scope_list,
)
from fhirgate.authserver.ratelimit import FailureLimiter
from fhirgate.authserver.store import StoredCode, StoredGrant, StoredRefresh

if TYPE_CHECKING:
    import httpx

    from fhirgate.authserver.app import AuthApp

__all__ = [
    "FIXED_SCOPES",
    "TOKEN_AUTH_METHODS",
    "CodeGrant",
    "OpenIDConnect",
    "RefreshGrant",
    "S256Challenge",
    "check_user_scopes",
    "install",
    "routes",
]

log = logging.getLogger("fhirgate.authserver.flows")

TOKEN_AUTH_METHODS = ["none", "client_secret_basic", "client_secret_post", "private_key_jwt"]

#: The scopes a user flow grants besides resource scopes.
FIXED_SCOPES = frozenset(
    {
        "openid",
        "fhirUser",
        "launch",
        "launch/patient",
        "launch/encounter",
        "offline_access",
        "online_access",
    }
)
#: SMART resource scopes: v1 `.read`/`.write`/`.*`; v2 `.cruds` (at least one letter, each at most
#: once, in that order) with an optional granular restriction `?param=value(&param=value)*`
#: (SMART App Launch 2.2 §"Scopes": `patient/Observation.rs?category=http://...|laboratory`): a
#: search parameter name (modifiers such as `code:in` allowed) and a non-empty value without
#: `&`, `=` or `?`.
_RESOURCE = r"(patient|user)/(\*|[A-Z][A-Za-z]{0,63})\."
_PARAM = r"[A-Za-z_][A-Za-z0-9_\-.:]{0,63}=[^\s&=?]+"
_V1_SCOPE = re.compile(_RESOURCE + r"(read|write|\*)")
_V2_SCOPE = re.compile(_RESOURCE + rf"(?=[cruds])c?r?u?d?s?(\?{_PARAM}(&{_PARAM})*)?")
_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")
_VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")
_PATIENT_REF = re.compile(r"Patient/([A-Za-z0-9\-.]{1,64})")

CODE_REUSED = "the authorization code was already used: every token issued with it is now revoked"
COOKIE_BROWSER = "fhirgate_browser"
COOKIE_SESSION = "fhirgate_session"
#: How long a page's form may wait for its answer (seconds).
FORM_LIFETIME = 1800
#: At most this many patients in the picker.
PICKER_LIMIT = 200
#: At most this many authorizations on the management page.
MANAGE_LIMIT = 500
STYLE = {
    "color_background": "#f7f7f5",
    "color_error": "#a00000",
    "color_highlight": "#1f5fa8",
    "color_modal_backdrop": "",
    "color_success": "#2e7d32",
    "color_text": "#1b1b1b",
    "dim_border_radius": "4px",
    "dim_font_size": "14px",
    "dim_spacing_size": "16px",
    "font_family_body": "system-ui, sans-serif",
    "font_family_heading": "system-ui, sans-serif",
}


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _now_ms() -> int:
    return _ms(clock.now())


# --- scopes -------------------------------------------------------------------------------------


def check_user_scopes(scopes: Sequence[str]) -> None:
    """The scopes a user flow (authorization_code) may ask for; `InvalidScopeError` otherwise."""
    for s in scopes:
        if s in FIXED_SCOPES:
            continue
        if s.startswith("system/"):
            raise InvalidScopeError(
                description=f"scope {_q(s)} is refused: system/ scopes are only granted to "
                "SMART Backend Services (client_credentials), never in a user flow"
            )
        if not (_V1_SCOPE.fullmatch(s) or _V2_SCOPE.fullmatch(s)):
            raise InvalidScopeError(
                description=f"scope {_q(s)} is not supported: use openid, fhirUser, launch, "
                "launch/patient, launch/encounter, offline_access, online_access and patient/ or "
                "user/ resource scopes (v1 .read .write .*, v2 .cruds in that order, optionally "
                "?param=value&...)"
            )
    if "offline_access" in scopes and "online_access" in scopes:
        raise InvalidScopeError(description="ask for offline_access or online_access, not both")


_PERMISSIONS = {"read": "rs", "write": "cud", "*": "cruds"}


def _resource_scope(scope: str) -> tuple[str, str, str, str] | None:
    """(context, resource type, permission letters, restriction) of a SMART resource scope."""
    match = _V1_SCOPE.fullmatch(scope)
    if match:
        return match[1], match[2], _PERMISSIONS[match[3]], ""
    match = _V2_SCOPE.fullmatch(scope)
    if match:
        action = scope[len(match[1]) + len(match[2]) + 2 :]
        letters, _, query = action.partition("?")
        return match[1], match[2], letters, query
    return None


def covers(registered: str, requested: str) -> bool:
    """Whether a client that registered the scope `registered` may ask for `requested`: the same
    scope, or a resource scope within it (same context, the same type or `*`, fewer
    permissions, a restriction only added: `patient/*.rs` covers `patient/Observation.rs?...`)."""
    if registered == requested:
        return True
    wide, narrow = _resource_scope(registered), _resource_scope(requested)
    if wide is None or narrow is None or wide[3]:
        return False
    return wide[0] == narrow[0] and wide[1] in ("*", narrow[1]) and set(narrow[2]) <= set(wide[2])


def check_registered_user(client: OAuthClient, scopes: Sequence[str]) -> None:
    """Every requested scope within what the client registered (when it registered a `scope`)."""
    allowed = client.registered_scopes
    if allowed is None:
        return
    for s in scopes:
        if not any(covers(r, s) for r in allowed):
            raise InvalidScopeError(
                description=f"scope {_q(s)} is not registered for client {_q(client.client_id)}"
            )


_PATIENT_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def _patient_label(patient: Mapping[str, Any]) -> str:
    """A Patient's first name entry and birth date, as the picker shows them."""
    label = "Patient"
    names = patient.get("name")
    if isinstance(names, list) and names and isinstance(names[0], dict):
        name = names[0]
        given = name.get("given")
        parts = [str(g) for g in given if isinstance(g, str)] if isinstance(given, list) else []
        if isinstance(name.get("family"), str):
            parts.append(name["family"])
        if not parts and isinstance(name.get("text"), str):
            parts.append(name["text"])
        if parts:
            label = " ".join(parts)[:120]
    birth = patient.get("birthDate")
    if isinstance(birth, str) and len(birth) <= 10:
        label += f", born {birth}"
    return label


def _patient_id(fhir_user: str | None) -> str | None:
    match = _PATIENT_REF.fullmatch(fhir_user or "")
    return match[1] if match else None


# --- the records Authlib's grants handle --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Approval:
    """What the user approved on the consent page (the `grant_user` of Authlib's code grant)."""

    username: str
    fhir_user: str | None
    login: str
    auth_time: int
    scope: str
    context: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class CodeRecord:
    """An authorization code as Authlib's grant and its extensions see it."""

    code_hash: str
    code: StoredCode
    grant: StoredGrant

    def get_redirect_uri(self) -> str:
        return self.code.redirect_uri

    def get_scope(self) -> str:
        return self.grant.scope

    def get_nonce(self) -> str | None:
        return self.code.nonce

    def get_auth_time(self) -> int | None:
        return self.grant.auth_time

    @property
    def code_challenge(self) -> str:
        return self.code.code_challenge


@dataclass(frozen=True, slots=True)
class RefreshRecord:
    """A refresh token as Authlib's refresh grant sees it."""

    token_hash: str
    refresh: StoredRefresh
    grant: StoredGrant

    def get_scope(self) -> str:
        return self.refresh.scope

    def check_client(self, client: OAuthClient) -> bool:
        return self.grant.client_id == client.client_id


def _grantee(grant: StoredGrant) -> Grantee:
    context = json.loads(grant.context)
    return Grantee(
        sub=grant.username, fhir_user=context.get("fhir_user"), family=grant.family, context=context
    )


# --- the model: store access from Authlib's worker thread ---------------------------------------


class Model:
    """What the grants read and write, as coroutines run on the loop through `Bridge`."""

    def __init__(self, server: OAuthServer) -> None:
        self.server = server
        self.store = server.store
        self.config = server.config
        self.ring = KeyRing(server.store)

    async def launch_context(self, value: str, client_id: str) -> tuple[str, dict[str, Any]]:
        """(hash, context) of a launch value this client may use; `InvalidRequestError` if not."""
        launch_hash = digest(value)
        async with self.store.read() as s:
            row = await s.launch(launch_hash)
        if row is None:
            raise InvalidRequestError(description="the launch value is unknown")
        owner, context, expires_at, used_at = row
        if owner != client_id:
            raise InvalidRequestError(description="the launch value was minted for another client")
        if used_at is not None:
            raise InvalidRequestError(description="the launch value was already used")
        if expires_at <= _now_ms():
            raise InvalidRequestError(description="the launch value has expired")
        return launch_hash, dict(json.loads(context))

    async def save_code(
        self,
        code_hash: str,
        client_id: str,
        approval: Approval,
        payload: Mapping[str, str],
        launch_hash: str | None,
    ) -> str | None:
        """Store a new grant and its code (consuming the launch); an error description if not."""
        now = _now_ms()
        family = secrets.token_urlsafe(18)
        context = dict(approval.context)
        if approval.fhir_user:
            context["fhir_user"] = approval.fhir_user
        async with self.store.write() as s:
            if launch_hash is not None and not await s.use_launch(launch_hash, now):
                return "the launch value was already used"
            await s.insert_grant(
                StoredGrant(
                    family,
                    client_id,
                    approval.username,
                    approval.login,
                    approval.scope,
                    json.dumps(context, separators=(",", ":")),
                    approval.auth_time,
                    now,
                )
            )
            await s.insert_code(
                StoredCode(
                    code_hash,
                    family,
                    payload["redirect_uri"],
                    payload["code_challenge"],
                    payload.get("nonce"),
                    now + self.config.code_lifetime * 1000,
                )
            )
        return None

    async def load_code(self, code: str) -> CodeRecord | None:
        code_hash = digest(code)
        async with self.store.read() as s:
            stored = await s.code(code_hash)
            grant = None if stored is None else await s.grant(stored.family)
        return None if stored is None or grant is None else CodeRecord(code_hash, stored, grant)

    async def load_refresh(self, token: str) -> tuple[RefreshRecord | None, bool]:
        """(the refresh token, whether the login session it depends on still runs)."""
        token_hash = digest(token)
        async with self.store.read() as s:
            stored = await s.refresh(token_hash)
            grant = None if stored is None else await s.grant(stored.family)
            online = True
            if grant is not None and "online_access" in scope_list(grant.scope):
                online = grant.login is not None and await s.login(grant.login, _now_ms()) is not None
        if stored is None or grant is None:
            return None, online
        return RefreshRecord(token_hash, stored, grant), online

    async def revoke_family(self, family: str) -> None:
        async with self.store.write() as s:
            await s.revoke_family(family, _now_ms())

    async def persist_tokens(
        self,
        grant: StoredGrant,
        code: CodeRecord | None,
        refresh: RefreshRecord | None,
        new_refresh: str | None,
        scope: str,
        jti: str,
        exp: int,
    ) -> str | None:
        """Consume the code or refresh token, store the new refresh token and record the access
        token in its family, atomically; an error description (and the family revoked when the
        code or refresh token was used meanwhile) if that cannot be."""
        now = _now_ms()
        async with self.store.write() as s:
            if await s.family_revoked(grant.family, lock=True):
                return "this authorization was revoked"
            if code is not None and not await s.use_code(code.code_hash, now):
                await s.revoke_family(grant.family, now)
                return CODE_REUSED
            if refresh is not None and not await s.use_refresh(refresh.token_hash, now):
                await s.revoke_family(grant.family, now)
                return "the refresh token was already used: every token of this authorization is now revoked"
            if new_refresh is not None:
                if "online_access" in scope_list(scope):
                    login = None if grant.login is None else await s.login(grant.login, now)
                    if login is None:
                        return "the login session this online_access authorization depends on has ended"
                    expires: int | None = login[2]
                else:
                    expires = now + self.config.refresh_token_lifetime * 1000
                await s.insert_refresh(StoredRefresh(digest(new_refresh), grant.family, scope, now, expires))
            await s.record_tokens([(jti, grant.family, grant.client_id, exp * 1000)])
        return None

    async def id_token_key(self) -> SigningKey:
        return await self.ring.ensure_active("RS256")


_MODELS: weakref.WeakKeyDictionary[OAuthServer, Model] = weakref.WeakKeyDictionary()


def model(server: OAuthServer) -> Model:
    found = _MODELS.get(server)
    if found is None:
        found = _MODELS[server] = Model(server)
    return found


# --- Authlib grants and extensions --------------------------------------------------------------


class S256Challenge(CodeChallenge):  # type: ignore[misc]
    """PKCE (RFC 7636) as SMART App Launch 2.2 requires it: for every client, S256 only."""

    DEFAULT_CODE_CHALLENGE_METHOD = "S256"
    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]
    CODE_CHALLENGE_METHODS = {"S256": lambda verifier, challenge: False}  # never used: see below

    def __init__(self) -> None:
        super().__init__(required=True)

    def validate_code_challenge(self, grant: AuthorizationCodeGrant, redirect_uri: str) -> None:
        data = grant.request.payload.data
        challenge = data.get("code_challenge")
        method = data.get("code_challenge_method")
        if not challenge:
            raise InvalidRequestError(
                description="code_challenge is missing: PKCE with S256 is required for every client"
            )
        if method is None:
            raise InvalidRequestError(
                description="code_challenge_method is missing: it must be S256 (plain is not accepted)"
            )
        if method != "S256":
            raise InvalidRequestError(
                description=f"code_challenge_method {_q(method)} is not accepted: use S256"
            )
        if not _CHALLENGE.fullmatch(challenge):
            raise InvalidRequestError(
                description="code_challenge must be the base64url SHA-256 of the code_verifier "
                "(43 characters)"
            )

    def validate_code_verifier(self, grant: AuthorizationCodeGrant, result: Any) -> None:
        verifier = grant.request.form.get("code_verifier")
        if not verifier:
            raise InvalidRequestError(description="code_verifier is missing (PKCE is required)")
        if not _VERIFIER.fullmatch(verifier):
            raise InvalidRequestError(
                description="code_verifier must be 43 to 128 characters of A-Z a-z 0-9 - . _ ~"
            )
        code: CodeRecord = grant.request.authorization_code
        expected = create_s256_code_challenge(verifier)
        if not hmac.compare_digest(expected.encode(), code.code_challenge.encode()):
            raise InvalidGrantError(description="code_verifier does not match the code_challenge (S256)")


class CodeGrant(AuthorizationCodeGrant):  # type: ignore[misc]
    """The authorization_code grant with SMART App Launch 2.2's rules."""

    TOKEN_ENDPOINT_AUTH_METHODS = TOKEN_AUTH_METHODS

    def __init__(self, request: OAuth2Request, server: OAuthServer) -> None:
        super().__init__(request, server)
        self.scopes: list[str] = []
        self.launch_hash: str | None = None
        self.launch_context: dict[str, Any] | None = None

    @property
    def model(self) -> Model:
        return model(self.server)

    # --- the authorization endpoint ---

    @staticmethod
    def validate_authorization_redirect_uri(request: OAuth2Request, client: OAuthClient) -> str:
        uri = request.payload.redirect_uri
        if not uri:
            raise InvalidRequestError(description="redirect_uri is missing")
        if not client.check_redirect_uri(uri):
            raise InvalidRequestError(
                description=f"redirect_uri {_q(uri)} is not registered for client {_q(client.client_id)}"
            )
        return str(uri)

    def validate_authorization_request(self) -> str:
        redirect_uri: str = super().validate_authorization_request()
        try:
            self.validate_smart()
        except OAuth2Error as error:
            error.redirect_uri = redirect_uri
            raise
        return redirect_uri

    def validate_smart(self) -> None:
        data = self.request.payload.data
        client: OAuthClient = self.request.client
        for name in ("request", "request_uri"):
            if name in data:
                raise InvalidRequestError(description=f"{name} is not supported: send plain parameters")
        mode = data.get("response_mode")
        if mode is not None and mode != "query":
            raise InvalidRequestError(description=f"response_mode {_q(mode)} is not supported: use query")
        aud = data.get("aud")
        fhir_base = self.server.config.fhir_base
        if aud is None:
            raise InvalidRequestError(description=f"aud is missing: it must be the FHIR base {fhir_base}")
        if aud.rstrip("/") != fhir_base:
            raise InvalidRequestError(
                description=f"aud {_q(aud)} is not the FHIR base this server protects ({fhir_base})"
            )
        scope = data.get("scope")
        if scope is None:
            raise InvalidScopeError(description="scope is missing")
        self.scopes = check_scope_syntax(scope)
        check_user_scopes(self.scopes)
        check_registered_user(client, self.scopes)
        launch = data.get("launch")
        if launch is not None:
            if "launch" not in self.scopes:
                raise InvalidScopeError(description="the launch parameter needs the launch scope")
            self.launch_hash, self.launch_context = Bridge.call(
                self.model.launch_context, launch, client.client_id
            )
        elif "launch" in self.scopes:
            raise InvalidRequestError(
                description="the launch scope needs the launch parameter the EHR gave the app "
                "(a standalone launch asks for launch/patient)"
            )
        prompt = data.get("prompt")
        if prompt is not None and "none" in prompt.split(" ") and prompt != "none":
            raise InvalidRequestError(description="prompt=none cannot be combined with other values")
        max_age = data.get("max_age")
        if max_age is not None and not (max_age.isascii() and max_age.isdigit() and len(max_age) <= 10):
            raise InvalidRequestError(description="max_age must be a number of seconds")
        if prompt is not None and "none" in prompt.split(" "):
            if self.request.user is None:
                raise LoginRequiredError()
            raise ConsentRequiredError()

    def create_authorization_response(self, redirect_uri: str, grant_user: Approval | None) -> Any:
        if grant_user is None:
            raise AccessDeniedError(description="the user denied the request", redirect_uri=redirect_uri)
        self.request.user = grant_user
        code = secrets.token_urlsafe(32)  # 256 bits
        error = Bridge.call(
            self.model.save_code,
            digest(code),
            self.request.client.client_id,
            grant_user,
            self.request.payload.data,
            self.launch_hash,
        )
        if error is not None:
            raise InvalidRequestError(description=error, redirect_uri=redirect_uri)
        params = [("code", code)]
        state = self.request.payload.state
        if state is not None:
            params.append(("state", state))
        return 303, "", [("Location", with_params(redirect_uri, params))]

    # --- the token endpoint ---

    def query_authorization_code(self, code: str, client: OAuthClient) -> CodeRecord:
        record: CodeRecord | None = Bridge.call(self.model.load_code, code)
        if record is None:
            raise InvalidGrantError(description="the authorization code is unknown")
        if record.code.used_at is not None:
            Bridge.call(self.model.revoke_family, record.grant.family)
            raise InvalidGrantError(description=CODE_REUSED)
        if record.grant.client_id != client.client_id:
            raise InvalidGrantError(description="the authorization code was issued to another client")
        if record.code.expires_at <= _now_ms():
            raise InvalidGrantError(description="the authorization code has expired")
        if record.grant.revoked_at is not None:
            raise InvalidGrantError(description="this authorization was revoked")
        return record

    def validate_token_request(self) -> None:
        if not self.request.form.get("redirect_uri"):
            # before Authlib's generic message; a code is always bound to its redirect_uri here
            self.authenticate_token_endpoint_client()
            raise InvalidRequestError(
                description="redirect_uri is missing: send the one of the authorization"
            )
        super().validate_token_request()

    def authenticate_user(self, authorization_code: CodeRecord) -> Grantee:
        return _grantee(authorization_code.grant)

    def delete_authorization_code(self, authorization_code: CodeRecord) -> None:
        """Nothing: the code is marked used when its tokens are saved (`Model.persist_tokens`)."""

    def save_authorization_code(self, code: str, request: OAuth2Request) -> None:  # pragma: no cover
        raise NotImplementedError("create_authorization_response stores the code")


class RefreshGrant(RefreshTokenGrant):  # type: ignore[misc]
    """refresh_token: bound to its client, no scope escalation, rotated at every use; a reused
    refresh token revokes its family."""

    TOKEN_ENDPOINT_AUTH_METHODS = TOKEN_AUTH_METHODS
    INCLUDE_NEW_REFRESH_TOKEN = True

    @property
    def model(self) -> Model:
        return model(self.server)

    def _validate_request_token(self, client: OAuthClient) -> RefreshRecord:
        value = self.request.form.get("refresh_token")
        if not value:
            raise InvalidRequestError(description="refresh_token is missing")
        record, online = Bridge.call(self.model.load_refresh, value)
        if record is None:
            raise InvalidGrantError(description="the refresh token is unknown")
        if record.refresh.used_at is not None:
            Bridge.call(self.model.revoke_family, record.grant.family)
            raise InvalidGrantError(
                description="the refresh token was already used (it is rotated at every use): "
                "every token of this authorization is now revoked"
            )
        if not record.check_client(client):
            raise InvalidGrantError(description="the refresh token was issued to another client")
        if record.grant.revoked_at is not None:
            raise InvalidGrantError(description="this authorization was revoked")
        if not online:
            raise InvalidGrantError(
                description="the login session this online_access refresh token depends on has ended"
            )
        if record.refresh.expires_at is not None and record.refresh.expires_at <= _now_ms():
            raise InvalidGrantError(description="the refresh token has expired")
        return record

    def _validate_token_scope(self, token: RefreshRecord) -> None:
        scope = self.request.payload.scope
        if scope is None:
            return
        granted = scope_list(token.get_scope())
        for s in check_scope_syntax(scope):
            if s not in granted:
                raise InvalidScopeError(
                    description=f"scope {_q(s)} was not granted to this refresh token: "
                    "ask for the granted scopes or fewer"
                )

    def authenticate_user(self, refresh_token: RefreshRecord) -> Grantee:
        return _grantee(refresh_token.grant)

    def revoke_old_credential(self, refresh_token: RefreshRecord) -> None:
        """Nothing: the old refresh token is marked used when the new one is saved."""

    def create_token_response(self) -> Any:
        """Authlib's response, plus a new ID token when the authorization included `openid`
        (OpenID Connect Core 1.0 §12.2: same `sub`, `fhirUser` and `auth_time`, no `nonce`)."""
        status, token, headers = super().create_token_response()
        record: RefreshRecord = self.request.refresh_token
        if "openid" in scope_list(record.grant.scope) and "openid" in scope_list(token.get("scope")):
            token["id_token"] = make_id_token(self.server, self.request, token, record.grant.auth_time, None)
        return status, token, headers


class OpenIDConnect(OpenIDCode):  # type: ignore[misc]
    """OpenID Connect Core 1.0 §3.1 with the code flow: an RS256 ID token when `openid` was granted."""

    def __init__(self) -> None:
        super().__init__(require_nonce=False)

    def exists_nonce(self, nonce: str, request: OAuth2Request) -> bool:
        return False  # the nonce protects the client; it is bound to the code and echoed once

    def generate_user_info(self, user: Grantee, scope: str) -> dict[str, Any]:
        return {}

    def process_token(self, grant: Any, response: Any) -> Any:
        """Add the ID token when `openid` was granted (this extension object is shared by every
        request: nothing request-specific is kept on it)."""
        _, token, _ = response
        if "openid" in scope_list(token.get("scope")):
            token["id_token"] = self.id_token(grant.server, token, grant.request)
        return token

    def encode_id_token(self, token: Mapping[str, Any], request: OAuth2Request) -> str:  # pragma: no cover
        raise NotImplementedError("process_token calls id_token")

    def id_token(self, server: OAuthServer, token: Mapping[str, Any], request: OAuth2Request) -> str:
        code: CodeRecord = request.authorization_code
        return make_id_token(server, request, token, code.get_auth_time(), code.get_nonce())


def make_id_token(
    server: OAuthServer,
    request: OAuth2Request,
    token: Mapping[str, Any],
    auth_time_ms: int | None,
    nonce: str | None,
) -> str:
    """An RS256 ID token for the user of `request` (its `Grantee`) and the token response `token`."""
    grantee: Grantee = request.user
    now = int(clock.now())
    claims: dict[str, Any] = {
        "iss": server.config.issuer,
        "sub": grantee.sub,
        "aud": request.client.client_id,
        "iat": now,
        "exp": now + server.config.access_token_lifetime,
    }
    if auth_time_ms is not None:
        claims["auth_time"] = int(auth_time_ms) // 1000
    if nonce:
        claims["nonce"] = nonce
    digest_ = hashlib.sha256(str(token["access_token"]).encode()).digest()
    claims["at_hash"] = base64.urlsafe_b64encode(digest_[:16]).rstrip(b"=").decode()
    if grantee.fhir_user and "fhirUser" in scope_list(token.get("scope")):
        claims["fhirUser"] = f"{server.config.fhir_base}/{grantee.fhir_user}"
    key: SigningKey = Bridge.call(model(server).id_token_key)
    return key.sign(claims, typ="JWT")


def install(server: OAuthServer) -> None:
    """Register this module's grants with the Authlib server."""
    # Authlib's grants log every token they issue at DEBUG ("Issue token %r to %r"): never let a
    # debug configuration write tokens to a log
    for name in ("authlib.oauth2.rfc6749.grants", "authlib.oauth2.rfc7636", "authlib.oidc.core.grants"):
        logging.getLogger(name).setLevel(logging.INFO)
    model(server)
    server.register_grant(CodeGrant, [S256Challenge(), OpenIDConnect()])
    server.register_grant(RefreshGrant)

    def save(request: OAuth2Request, token: dict[str, Any], jti: str, exp: int, family: str) -> None:
        grant: StoredGrant
        code: CodeRecord | None = request.authorization_code
        refresh: RefreshRecord | None = request.refresh_token
        if code is not None:
            grant = code.grant
        elif refresh is not None:
            grant = refresh.grant
        else:  # pragma: no cover - only the two grants above carry a family
            raise InvalidGrantError(description="no authorization for this token")
        error = Bridge.call(
            model(server).persist_tokens,
            grant,
            code,
            refresh,
            token.get("refresh_token"),
            str(token.get("scope", "")),
            jti,
            exp,
        )
        if error is not None:
            raise InvalidGrantError(description=error)

    server.token_saver = save


# --- HTTP: /authorize and the pages ------------------------------------------------------------


def with_params(uri: str, params: Sequence[tuple[str, str]]) -> str:
    """`uri` with `params` appended to its query (the registered query kept byte for byte)."""
    query = urlencode(params)
    if "?" not in uri:
        return f"{uri}?{query}"
    return uri + ("" if uri.endswith(("?", "&")) else "&") + query


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class PageError(Exception):
    """A problem shown as an HTML page (never a redirect)."""

    def __init__(
        self, status: int, title: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        self.message = message
        self.headers = dict(headers or {})


@dataclass
class Pending:
    """One authorization request on its way through the pages."""

    params: dict[str, str]
    method: str
    browser: str
    new_browser: bool = False
    state: dict[str, Any] = field(default_factory=dict)
    cookies: list[tuple[str, str, int | None]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Session:
    username: str
    fhir_user: str | None
    session_hash: str
    auth_time: int


class Browser:
    """The HTTP side of the browser flows on one `AuthApp`."""

    def __init__(self, app: AuthApp) -> None:
        self.app = app
        limit = app.settings.auth_rate_limit if app.settings is not None else 10
        self.limiter = FailureLimiter(limit, 60.0)
        issuer = urlsplit(app.config.issuer)
        self.path = issuer.path.rstrip("/")
        self.cookie_path = self.path or "/"
        self.secure = issuer.scheme == "https"
        self._key: bytes | None = None

    # --- secrets, cookies, CSRF ---

    async def key(self) -> bytes:
        if self._key is None:
            assert self.app.store is not None
            async with self.app.store.write() as s:
                value = await s.secret("csrf", secrets.token_urlsafe(32), _now_ms())
            self._key = value.encode()
        return self._key

    async def mac(self, *parts: str) -> str:
        return _b64(hmac.new(await self.key(), "\0".join(parts).encode(), hashlib.sha256).digest())

    async def csrf(self, browser: str) -> str:
        return await self.mac("csrf", browser)

    async def seal(self, pending: Pending) -> str:
        body = {"p": pending.params, "s": pending.state, "exp": int(clock.now()) + FORM_LIFETIME}
        payload = _b64(orjson.dumps(body))
        return payload + "." + await self.mac("request", pending.browser, payload)

    async def unseal(self, browser: str, blob: str) -> tuple[dict[str, str], dict[str, Any]]:
        payload, _, mac = blob.partition(".")
        if not hmac.compare_digest(mac.encode(), (await self.mac("request", browser, payload)).encode()):
            raise PageError(
                403, "Form refused", "the form was altered or belongs to another browser: start again"
            )
        body = orjson.loads(_unb64(payload))
        if int(body["exp"]) <= clock.now():
            raise PageError(400, "Form expired", "this form has expired: start again from the application")
        return dict(body["p"]), dict(body["s"])

    def set_cookie(self, response: Response, name: str, value: str, max_age: int | None) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path=self.cookie_path,
            secure=self.secure,
            httponly=True,
            samesite="lax",
        )

    async def session(self, request: Request) -> Session | None:
        value = request.cookies.get(COOKIE_SESSION)
        if not value:
            return None
        assert self.app.store is not None
        session_hash = digest(value)
        async with self.app.store.read() as s:
            login = await s.login(session_hash, _now_ms())
            user = None if login is None else await s.user(login[0])
        if login is None or user is None:
            return None
        return Session(user.username, user.fhir_user, session_hash, login[1])

    # --- the Authlib side ---

    async def validate(self, params: Mapping[str, str], user: Any) -> CodeGrant:
        """The request validated by Authlib's grant (with ours), or the OAuth2Error it raised."""
        assert self.app.oauth is not None
        req = TokenRequest("GET", self.app.config.issuer + "/authorize", {}, {}, dict(params))

        def call() -> CodeGrant:
            assert self.app.oauth is not None
            grant: CodeGrant = self.app.oauth.get_consent_grant(req, user)
            return grant

        return await anyio.to_thread.run_sync(call)

    def oauth_error(self, error: OAuth2Error, pending: Pending) -> Response:
        if not error.redirect_uri:
            raise PageError(
                400, "Authorization request refused", error.get_error_description() or error.error
            )
        params = [("error", str(error.error))]
        if error.description:
            params.append(("error_description", str(error.description)))
        state = pending.params.get("state")
        if state is not None:
            params.append(("state", state))
        return self.redirect(with_params(str(error.redirect_uri), params), pending)

    def redirect(self, location: str, pending: Pending) -> Response:
        response = RedirectResponse(location, 302 if pending.method == "GET" else 303)
        response.headers["Cache-Control"] = "no-store"
        self.add_cookies(response, pending)
        return response

    def add_cookies(self, response: Response, pending: Pending) -> None:
        if pending.new_browser:
            self.set_cookie(response, COOKIE_BROWSER, pending.browser, None)
        for name, value, max_age in pending.cookies:
            self.set_cookie(response, name, value, max_age)

    async def render(
        self, pending: Pending, title: str, body: Callable[[dict[str, str]], str], origins: Sequence[str] = ()
    ) -> Response:
        hidden = {"csrf": await self.csrf(pending.browser), "request": await self.seal(pending)}
        response = pages.page(title, body(hidden), form_origins=origins)
        self.add_cookies(response, pending)
        return response

    # --- the request's steps ---

    async def precheck(self, params: Mapping[str, str], repeated: set[str]) -> OAuthClient:
        """The client and redirect URI, or a page: nothing redirects until both are trusted."""
        for name in ("client_id", "redirect_uri"):
            if name in repeated:
                raise PageError(400, "Authorization request refused", f"{name} is repeated: send it once")
        client_id = params.get("client_id")
        if not client_id:
            raise PageError(400, "Authorization request refused", "client_id is missing")
        assert self.app.oauth is not None
        client = await self.app.oauth.load_client(client_id)
        if client is None:
            raise PageError(400, "Authorization request refused", f"unknown client {_q(client_id)}")
        redirect_uri = params.get("redirect_uri")
        if not redirect_uri:
            raise PageError(400, "Authorization request refused", "redirect_uri is missing")
        if not client.check_redirect_uri(redirect_uri):
            raise PageError(
                400,
                "Authorization request refused",
                f"redirect_uri {_q(redirect_uri)} is not registered for client {_q(client_id)}: "
                "it must be one of the client's redirect URIs exactly",
            )
        return client

    async def patients(self) -> list[tuple[str, str]]:
        """The patients the picker offers: (id, label)."""
        if self.app.config.patient_search_url is not None:
            return await self.fhir_patients()
        assert self.app.store is not None
        async with self.app.store.read() as s:
            refs = await s.patient_users(PICKER_LIMIT)
        return [(pid, "Patient") for pid in (_patient_id(r) for r in refs) if pid is not None]

    async def patient_allowed(self, patient: str) -> bool:
        """Whether `patient` may be chosen: it exists on the FHIR server searched, or is linked to
        a user."""
        if self.app.config.patient_search_url is None:
            return patient in {pid for pid, _ in await self.patients()}
        if not _PATIENT_ID.fullmatch(patient):
            return False
        response = await self.fhir_get(f"/Patient/{patient}")
        return response.status_code == 200

    async def fhir_get(self, path: str) -> httpx.Response:
        """GET on the FHIR server the picker searches, with a one-minute system token of this
        server's own (so a gateway in front of it lets the request in)."""
        import httpx

        assert self.app.keys is not None
        config = self.app.config
        now = int(clock.now())
        token = self.app.keys.current().sign(
            {
                "iss": config.issuer,
                "sub": config.issuer,
                "aud": config.fhir_base,
                "client_id": config.issuer,
                "scope": "system/Patient.rs",
                "iat": now,
                "exp": now + 60,
                "jti": secrets.token_urlsafe(18),
            },
            typ="at+jwt",
        )
        url = f"{config.patient_search_url}{path}"
        try:
            async with httpx.AsyncClient(timeout=5.0) as http:
                return await http.get(
                    url, headers={"Accept": "application/fhir+json", "Authorization": f"Bearer {token}"}
                )
        except httpx.HTTPError as exc:
            raise PageError(
                502,
                "Patients unavailable",
                f"the FHIR server {url} could not be reached ({type(exc).__name__})",
            ) from None

    async def fhir_patients(self) -> list[tuple[str, str]]:
        response = await self.fhir_get(f"/Patient?_count={PICKER_LIMIT}&_elements=name,birthDate")
        try:
            bundle = response.json() if response.status_code == 200 else None
        except ValueError:
            bundle = None
        if not isinstance(bundle, dict):
            raise PageError(
                502,
                "Patients unavailable",
                f"the FHIR server answered {response.status_code} to the patient search",
            )
        found: list[tuple[str, str]] = []
        for entry in bundle.get("entry") or []:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict) or resource.get("resourceType") != "Patient":
                continue
            pid = resource.get("id")
            if isinstance(pid, str) and _PATIENT_ID.fullmatch(pid):
                found.append((pid, _patient_label(resource)))
        return found

    async def patient_for(
        self, grant: CodeGrant, session: Session, pending: Pending
    ) -> tuple[str | None, bool]:
        """(the patient of this authorization or None, whether the picker must be shown)."""
        own = _patient_id(session.fhir_user)
        if grant.launch_context is not None:
            patient = str(grant.launch_context["patient"])
            if own is not None and own != patient:
                raise AccessDeniedError(
                    description="the EHR launch is for another patient than the signed-in user",
                    redirect_uri=grant.redirect_uri,
                )
            return patient, False
        if own is not None:
            return own, False
        wants = "launch/patient" in grant.scopes
        if not wants:
            if any(s.startswith("patient/") for s in grant.scopes):
                raise InvalidScopeError(
                    description="patient/ scopes need a patient: ask for launch/patient too",
                    redirect_uri=grant.redirect_uri,
                )
            return None, False
        chosen = pending.state.get("pt")
        if chosen is not None:
            if not await self.patient_allowed(str(chosen)):
                raise PageError(400, "Patient refused", "that patient cannot be chosen: start again")
            return str(chosen), False
        candidates = await self.patients()
        if not candidates:
            raise AccessDeniedError(
                description="there is no patient to choose", redirect_uri=grant.redirect_uri
            )
        if len(candidates) == 1:
            return candidates[0][0], False
        return None, True

    async def proceed(self, pending: Pending, session: Session | None) -> Response:
        """Validate the request again, then show the page it needs next."""
        try:
            grant = await self.validate(pending.params, session)
            client: OAuthClient = grant.request.client
            name = str(client.metadata.get("client_name") or client.client_id)
            prompt = (pending.params.get("prompt") or "").split(" ")
            max_age = pending.params.get("max_age")
            too_old = (
                session is not None
                and max_age is not None
                and _now_ms() - session.auth_time > int(max_age) * 1000
                and not pending.state.get("li")
            )  # OpenID Connect Core 3.1.2.1: sign in again when the login is older than max_age
            if session is None or too_old or ("login" in prompt and not pending.state.get("li")):
                return await self.render(
                    pending, "Sign in", lambda h: pages.login_page(self.path + "/authorize/login", h, name)
                )
            patient, pick = await self.patient_for(grant, session, pending)
        except OAuth2Error as error:
            return self.oauth_error(error, pending)
        if pick:
            candidates = await self.patients()
            return await self.render(
                pending,
                "Choose a patient",
                lambda h: pages.picker_page(self.path + "/authorize/patient", h, name, candidates),
            )
        origin = "{0.scheme}://{0.netloc}".format(urlsplit(grant.redirect_uri))
        return await self.render(
            pending,
            "Allow access",
            lambda h: pages.consent_page(
                self.path + "/authorize/consent", h, name, grant.scopes, session.username, patient
            ),
            origins=[origin],
        )

    async def pending_from_form(
        self, request: Request, multi: frozenset[str] = frozenset()
    ) -> tuple[Pending, dict[str, str], list[str]]:
        """The page form's fields, checked: the browser cookie, the CSRF token, the sealed request."""
        form, lists = await page_form(request, multi)
        browser = request.cookies.get(COOKIE_BROWSER)
        if not browser:
            raise PageError(
                403, "Form refused", "this browser sent no session cookie: enable cookies and start again"
            )
        if not hmac.compare_digest(form.get("csrf", "").encode(), (await self.csrf(browser)).encode()):
            raise PageError(403, "Form refused", "the form's CSRF token is missing or wrong: start again")
        blob = form.get("request")
        if not blob:
            raise PageError(400, "Form refused", "the form carries no authorization request: start again")
        try:
            params, state = await self.unseal(browser, blob)
        except (ValueError, KeyError, TypeError):
            raise PageError(403, "Form refused", "the form was altered: start again") from None
        return Pending(params, "POST", browser, state=state), form, lists

    # --- routes ---

    async def authorize(self, request: Request) -> Response:
        try:
            if request.method == "GET":
                pairs = parse_qsl(request.url.query, keep_blank_values=True)
            else:
                pairs = await form_pairs(request)
            params: dict[str, str] = {}
            repeated: set[str] = set()
            for name, value in pairs:
                if name in params or (name in repeated):
                    repeated.add(name)
                params.setdefault(name, value)
            params = {k: v for k, v in params.items() if v != ""}
            await self.precheck(params, repeated)
            browser = request.cookies.get(COOKIE_BROWSER)
            pending = Pending(params, request.method, browser or secrets.token_urlsafe(24), browser is None)
            problem = None
            if repeated:
                problem = (
                    "invalid_request",
                    f"parameter {_q(sorted(repeated)[0])} is repeated: send each once",
                )
                if "state" in repeated:
                    pending.params.pop("state", None)
            elif "response_type" not in params:
                problem = ("invalid_request", "response_type is missing: it must be code")
            elif params["response_type"] != "code":
                problem = (
                    "unsupported_response_type",
                    f"response_type {_q(params['response_type'])} is not supported: the only one is code",
                )
            if problem is not None:
                out = [("error", problem[0]), ("error_description", problem[1])]
                if "state" in pending.params:
                    out.append(("state", pending.params["state"]))
                return self.redirect(with_params(params["redirect_uri"], out), pending)
            return await self.proceed(pending, await self.session(request))
        except PageError as exc:
            return pages.error_page(exc.status, exc.title, exc.message, exc.headers)

    async def login(self, request: Request) -> Response:
        try:
            pending, form, _ = await self.pending_from_form(request)
            try:
                grant = await self.validate(pending.params, None)
            except OAuth2Error as error:
                return self.oauth_error(error, pending)
            client: OAuthClient = grant.request.client
            name = str(client.metadata.get("client_name") or client.client_id)
            username = form.get("username", "")
            signed_in = await self.sign_in(request, username, form.get("password", ""))
            if signed_in is None:
                return await self.render(
                    pending,
                    "Sign in",
                    lambda h: pages.login_page(
                        self.path + "/authorize/login", h, name, username, "wrong username or password"
                    ),
                )
            session, value = signed_in
            pending.cookies.append((COOKIE_SESSION, value, self.app.config.login_lifetime))
            pending.state["li"] = 1
            pending.state.pop("pt", None)
            return await self.proceed(pending, session)
        except PageError as exc:
            return pages.error_page(exc.status, exc.title, exc.message, exc.headers)

    async def sign_in(self, request: Request, username: str, password: str) -> tuple[Session, str] | None:
        """Check the password (rate-limited) and start a login session: (the session, the cookie
        value), or None when the username or password is wrong. A new sign-in ends the
        browser's previous session (no fixation)."""
        address = request.client.host if request.client else "-"
        keys = ["login:" + username, f"login:{username}|{address}"]
        wait = max(self.limiter.retry_after(k) for k in keys)
        if wait:
            raise PageError(
                429,
                "Too many attempts",
                f"too many failed sign-ins for this user: try again in {wait} seconds",
                {"Retry-After": str(wait)},
            )
        from fhirgate.authserver.users import Users

        assert self.app.store is not None
        user = (
            await Users(self.app.store).verify_password(username, password) if username and password else None
        )
        if user is None:
            for k in keys:
                self.limiter.failed(k)
            # not the username itself: people type their password into that field
            log.info("sign-in failed for username sha256:%s from %s", digest(username)[:12], address)
            return None
        value = secrets.token_urlsafe(32)
        now = _now_ms()
        lifetime = self.app.config.login_lifetime
        previous = request.cookies.get(COOKIE_SESSION)
        async with self.app.store.write() as s:
            if previous:
                await s.end_login(digest(previous), now)
            await s.insert_login(digest(value), user.username, now, now + lifetime * 1000)
        return Session(user.username, user.fhir_user, digest(value), now), value

    async def pick(self, request: Request) -> Response:
        try:
            pending, form, _ = await self.pending_from_form(request)
            session = await self.session(request)
            if session is None:
                return await self.proceed(pending, None)
            patient = form.get("patient")
            if not patient or not await self.patient_allowed(patient):
                raise PageError(400, "Patient refused", "choose one of the patients offered")
            pending.state["pt"] = patient
            return await self.proceed(pending, session)
        except PageError as exc:
            return pages.error_page(exc.status, exc.title, exc.message, exc.headers)

    async def consent(self, request: Request) -> Response:
        try:
            pending, form, ticked = await self.pending_from_form(request, frozenset({"scope"}))
            session = await self.session(request)
            if session is None:
                return await self.proceed(pending, None)
            decision = form.get("decision")
            if decision not in ("allow", "deny"):
                raise PageError(400, "Answer refused", "decision must be allow or deny")
            try:
                grant = await self.validate(pending.params, session)
                patient, pick = await self.patient_for(grant, session, pending)
                if pick:
                    return await self.proceed(pending, session)
                approval = None
                if decision == "allow":
                    approval = self.approval(grant, session, ticked, patient)
                assert self.app.oauth is not None
                redirect_uri = str(grant.redirect_uri)
                _, _, headers = await anyio.to_thread.run_sync(
                    grant.create_authorization_response, redirect_uri, approval
                )
            except OAuth2Error as error:
                return self.oauth_error(error, pending)
            return self.redirect(dict(headers)["Location"], pending)
        except PageError as exc:
            return pages.error_page(exc.status, exc.title, exc.message, exc.headers)

    def approval(
        self, grant: CodeGrant, session: Session, ticked: Sequence[str], patient: str | None
    ) -> Approval:
        for s in ticked:
            if s not in grant.scopes:
                raise PageError(400, "Answer refused", f"scope {s} was not requested")
        granted = [s for s in grant.scopes if s in ticked]
        if not granted:
            raise AccessDeniedError(description="the user allowed no scope", redirect_uri=grant.redirect_uri)
        context: dict[str, Any] = {"smart_style_url": self.app.config.issuer + "/smart-style.json"}
        launch = grant.launch_context or {}
        patient_granted = any(s in granted for s in ("launch", "launch/patient")) or any(
            s.startswith("patient/") for s in granted
        )
        if patient is not None and patient_granted:
            context["patient"] = patient
            context["need_patient_banner"] = grant.launch_context is None
        if ("launch" in granted or "launch/encounter" in granted) and launch.get("encounter"):
            context["encounter"] = launch["encounter"]
        if "launch" in granted and launch.get("fhirContext"):
            context["fhirContext"] = launch["fhirContext"]
        return Approval(
            session.username,
            session.fhir_user,
            session.session_hash,
            session.auth_time,
            " ".join(granted),
            context,
        )

    # --- sign-out and the management page (no authorization request behind them) ---

    def browser_cookie(self, request: Request) -> tuple[str, bool]:
        """(the browser cookie's value, whether it is new and must be set)."""
        value = request.cookies.get(COOKIE_BROWSER)
        return (value, False) if value else (secrets.token_urlsafe(24), True)

    async def plain_form(self, request: Request) -> dict[str, str]:
        """A POSTed form of a page with no authorization request: the browser cookie and the
        CSRF token checked."""
        form, _ = await page_form(request, frozenset())
        browser = request.cookies.get(COOKIE_BROWSER)
        if not browser:
            raise PageError(
                403, "Form refused", "this browser sent no session cookie: enable cookies and start again"
            )
        if not hmac.compare_digest(form.get("csrf", "").encode(), (await self.csrf(browser)).encode()):
            raise PageError(403, "Form refused", "the form's CSRF token is missing or wrong: start again")
        return form

    async def plain_page(
        self, request: Request, title: str, body: Callable[[dict[str, str]], str], status: int = 200
    ) -> Response:
        browser, new = self.browser_cookie(request)
        response = pages.page(title, body({"csrf": await self.csrf(browser)}), status)
        if new:
            self.set_cookie(response, COOKIE_BROWSER, browser, None)
        return response

    def see_other(self, path: str) -> Response:
        return RedirectResponse(self.path + path, 303, {"Cache-Control": "no-store"})

    def clear_session(self, response: Response) -> None:
        response.delete_cookie(
            COOKIE_SESSION, path=self.cookie_path, secure=self.secure, httponly=True, samesite="lax"
        )

    async def logout(self, request: Request) -> Response:
        """GET: the sign-out form; POST (CSRF-checked): end the login session, so the
        online_access refresh tokens issued in it stop working, and clear the cookie."""
        try:
            if request.method == "GET":
                session = await self.session(request)
                return await self.plain_page(
                    request,
                    "Sign out",
                    lambda h: pages.logout_page(
                        self.path + "/logout", h, None if session is None else session.username
                    ),
                )
            await self.plain_form(request)
            value = request.cookies.get(COOKIE_SESSION)
            if value:
                assert self.app.store is not None
                async with self.app.store.write() as s:
                    await s.end_login(digest(value), _now_ms())
            response = pages.page("Signed out", "<p>You are signed out.</p>")
            self.clear_session(response)
            return response
        except PageError as exc:
            return pages.error_page(exc.status, exc.title, exc.message, exc.headers)

    async def manage(self, request: Request) -> Response:
        """GET: the applications the signed-in user authorized (the login form first); POST
        (CSRF-checked, `family`, `action=revoke`): revoke one of the user's own authorizations."""
        try:
            if request.method == "GET":
                session = await self.session(request)
                if session is None:
                    return await self.manage_login_page(request)
                return await self.manage_list(request, session)
            form = await self.plain_form(request)
            session = await self.session(request)
            if session is None:
                raise PageError(403, "Not signed in", "sign in again to manage your applications")
            if form.get("action", "revoke") != "revoke":
                raise PageError(400, "Request refused", "action must be revoke")
            family = form.get("family", "")
            assert self.app.store is not None
            async with self.app.store.write() as s:
                grant = await s.grant(family) if family else None
                if grant is None or grant.username != session.username or grant.revoked_at is not None:
                    grant = None
                else:
                    await s.revoke_family(grant.family, _now_ms())
            if grant is None:
                raise PageError(404, "Not found", "you have no such authorization")
            log.info("user %r revoked authorization of client %r", session.username, grant.client_id)
            return self.see_other("/manage")
        except PageError as exc:
            return pages.error_page(exc.status, exc.title, exc.message, exc.headers)

    async def manage_login_page(
        self, request: Request, username: str = "", error: str | None = None, status: int = 200
    ) -> Response:
        return await self.plain_page(
            request,
            "Sign in",
            lambda h: pages.login_page(self.path + "/manage/login", h, None, username, error),
            status,
        )

    async def manage_login(self, request: Request) -> Response:
        try:
            form = await self.plain_form(request)
            username = form.get("username", "")
            signed_in = await self.sign_in(request, username, form.get("password", ""))
            if signed_in is None:
                return await self.manage_login_page(request, username, "wrong username or password")
            _, value = signed_in
            response = self.see_other("/manage")
            self.set_cookie(response, COOKIE_SESSION, value, self.app.config.login_lifetime)
            return response
        except PageError as exc:
            return pages.error_page(exc.status, exc.title, exc.message, exc.headers)

    async def manage_list(self, request: Request, session: Session) -> Response:
        assert self.app.store is not None
        views: list[pages.GrantView] = []
        async with self.app.store.read() as s:
            grants = await s.active_grants(session.username, _now_ms(), MANAGE_LIMIT)
            names: dict[str, str] = {}
            for g in grants:
                if g.client_id not in names:
                    client = await s.client(g.client_id)
                    meta = json.loads(client.metadata) if client is not None else {}
                    names[g.client_id] = str(meta.get("client_name") or g.client_id)
                scopes = scope_list(g.scope)
                access = (
                    "offline access (until you revoke it)"
                    if "offline_access" in scopes
                    else "online access (while you stay signed in)"
                    if "online_access" in scopes
                    else "no refresh (until its access token expires)"
                )
                when = datetime.fromtimestamp(g.created_at / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")
                patient = json.loads(g.context).get("patient")
                views.append(
                    pages.GrantView(
                        g.family,
                        names[g.client_id],
                        g.client_id,
                        scopes,
                        None if patient is None else str(patient),
                        when,
                        access,
                    )
                )
        return await self.plain_page(
            request,
            "Your applications",
            lambda h: pages.manage_page(self.path + "/manage", h, session.username, views),
        )

    # --- userinfo and the style ---

    async def userinfo(self, request: Request) -> Response:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return bearer_error(401, None, "send the access token as Authorization: Bearer")
        assert self.app.store is not None
        assert self.app.keys is not None
        found = await inspect_access_token(self.app.store, self.app.keys.ring, self.app.config, token.strip())
        if found is None:
            return bearer_error(401, "invalid_token", "the access token is not a token this server signed")
        if found.problem is not None:
            return bearer_error(401, "invalid_token", found.problem)
        claims = found.claims
        if "openid" not in scope_list(str(claims.get("scope", ""))):
            return bearer_error(403, "insufficient_scope", "the access token was not granted openid")
        body: dict[str, Any] = {"sub": claims["sub"]}
        if "fhirUser" in claims:
            body["fhirUser"] = claims["fhirUser"]
        return Response(orjson.dumps(body), 200, {"Cache-Control": "no-store"}, media_type="application/json")

    async def style(self, _request: Request) -> Response:
        return Response(
            orjson.dumps(STYLE),
            200,
            {"Cache-Control": "public, max-age=3600", "Access-Control-Allow-Origin": "*"},
            media_type="application/json",
        )


def bearer_error(status: int, error: str | None, description: str) -> Response:
    """RFC 6750 §3 error."""
    challenge = "Bearer"
    if error is not None:
        challenge += f' error="{error}", error_description="{description}"'
    body = {"error": error or "invalid_request", "error_description": description}
    return Response(
        orjson.dumps(body),
        status,
        {"WWW-Authenticate": challenge, "Cache-Control": "no-store"},
        media_type="application/json",
    )


MAX_PAGE_FORM = 64 * 1024


async def form_pairs(request: Request) -> list[tuple[str, str]]:
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise PageError(415, "Request refused", "the body must be application/x-www-form-urlencoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_PAGE_FORM:
            raise PageError(413, "Request refused", "the form is too large")
    try:
        return parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise PageError(400, "Request refused", "the form is not valid UTF-8 form encoding") from None


async def page_form(request: Request, multi: frozenset[str]) -> tuple[dict[str, str], list[str]]:
    """A page's form: each field once, except the names in `multi` (their values in order)."""
    form: dict[str, str] = {}
    lists: list[str] = []
    for name, value in await form_pairs(request):
        if name in multi:
            lists.append(value)
            continue
        if name in form:
            raise PageError(400, "Form refused", f"field {name} is repeated")
        form[name] = value
    return form, lists


def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """An unexpected error is logged and answered with a page that says so, never a stack trace."""

    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception:
            log.exception("authorization server: unexpected error at %s", request.url.path)
            return pages.error_page(
                500, "Server error", "the authorization server failed; the error is in its log"
            )

    return run


MSG_CROSS_SITE = (
    "this form was posted from another site ({origin}); the authorization server accepts its own "
    "pages' forms only: start again from the application"
)
MSG_COOKIE_TWICE = (
    "the browser sent the cookie {name} twice (one may have been set by another site under this "
    "domain): clear this site's cookies and start again from the application"
)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def own_pages_only(
    handler: Callable[[Request], Awaitable[Response]], issuer: str
) -> Callable[[Request], Awaitable[Response]]:
    """For the forms of this server's own pages (login, picker, consent, sign-out, /manage): a POST
    that a browser says came from another site or origin (`Sec-Fetch-Site`, `Origin`; a sibling
    subdomain counts as another origin here, though SameSite cookies let it through) is refused,
    and so is a request carrying one of our cookies twice (a cookie planted for the parent domain
    beside ours). CSRF tokens are bound to the browser cookie; these checks keep another site from
    planting that cookie and posting with it. Clients that send neither header (scripts, tests)
    are not browsers and get the CSRF checks only."""
    own = _origin(issuer)

    async def run(request: Request) -> Response:
        raw = request.headers.get("cookie", "")
        names = [part.split("=", 1)[0].strip() for part in raw.split(";")]
        for name in (COOKIE_BROWSER, COOKIE_SESSION):
            if names.count(name) > 1:
                return pages.error_page(400, "Conflicting cookies", MSG_COOKIE_TWICE.format(name=name))
        if request.method == "POST":
            site = request.headers.get("sec-fetch-site")
            origin = request.headers.get("origin")
            if site is not None and site not in ("same-origin", "none"):
                return pages.error_page(403, "Cross-site form", MSG_CROSS_SITE.format(origin=site))
            if origin is not None and origin.lower() != own:
                return pages.error_page(403, "Cross-site form", MSG_CROSS_SITE.format(origin=origin[:100]))
        return await handler(request)

    return run


def routes(app: AuthApp) -> list[Route]:
    """This module's HTTP routes."""
    browser = Browser(app)
    issuer = app.config.issuer

    def own(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        return guarded(own_pages_only(handler, issuer))

    return [
        # the initial request may come from the app's own page (SMART authorize-post): any origin
        Route("/authorize", guarded(browser.authorize), methods=["GET", "POST"]),
        Route("/authorize/login", own(browser.login), methods=["POST"]),
        Route("/authorize/patient", own(browser.pick), methods=["POST"]),
        Route("/authorize/consent", own(browser.consent), methods=["POST"]),
        Route("/logout", own(browser.logout), methods=["GET", "POST"]),
        Route("/manage", own(browser.manage), methods=["GET", "POST"]),
        Route("/manage/login", own(browser.manage_login), methods=["POST"]),
        Route("/userinfo", guarded(browser.userinfo), methods=["GET", "POST"]),
        Route("/smart-style.json", browser.style, methods=["GET"]),
    ]
