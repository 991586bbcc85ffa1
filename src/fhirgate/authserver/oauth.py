"""The OAuth 2.0 core: Authlib's framework-neutral `AuthorizationServer`, configured for SMART.

Authlib's server core is synchronous; the store is asynchronous. The ASGI adapter (`app.py`) runs
each Authlib call in a worker thread (`anyio.to_thread`), and every model method below that needs
the store calls back into the event loop through `Bridge.call` (`anyio.from_thread.run`), so all
database work stays on the loop, on the project's one storage stack.

What Authlib allows and SMART / this server forbid is overridden here:

- client authentication is exactly one method per request (RFC 6749 §2.3), the one the client
  registered; a client that used the Authorization header gets 401 with `WWW-Authenticate: Basic`;
- `private_key_jwt` (RFC 7523, SMART Backend Services): RS256/RS384/ES256/ES384 only, the key by
  `kid` from the client's `jwks` or `jwks_uri`, `iss` = `sub` = client_id, `aud` = the token
  endpoint URL, `exp` at most 5 minutes ahead, `jti` recorded in the store (once, ever, across
  restarts and nodes);
- `client_credentials` grants `system/` scopes only, and only those the client registered.

Access tokens are RFC 9068 JWTs (`typ: at+jwt`) signed with the store's active key (`keys.py`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote

import anyio.from_thread
from authlib.oauth2.rfc6749 import (
    AuthorizationServer,
    ClientMixin,
    InvalidClientError,
    InvalidRequestError,
    InvalidScopeError,
    OAuth2Request,
    UnauthorizedClientError,
    UnsupportedGrantTypeError,
)
from authlib.oauth2.rfc6749.grants import ClientCredentialsGrant
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from fhirgate import clock
from fhirgate.authserver.clients import CLIENT_ASSERTION_ALGS, secret_matches
from fhirgate.authserver.keys import SigningKey
from fhirgate.authserver.redirects import redirect_uri_matches
from fhirgate.authserver.replay import ReplayRegistry, StoreReplay
from fhirgate.authserver.store import AuthSession, AuthStore, StoredClient

__all__ = [
    "ASSERTION_MAX_LIFETIME",
    "Bridge",
    "ClientKeys",
    "OAuthClient",
    "OAuthServer",
    "ServerConfig",
    "TokenRequest",
    "claimed_client_id",
]

T = TypeVar("T")

#: SMART Backend Services: a client assertion's `exp` is at most five minutes after now.
ASSERTION_MAX_LIFETIME = 300
#: Clock skew tolerated on an assertion that has just expired (never on the five-minute ceiling).
ASSERTION_LEEWAY = 30
ASSERTION_TYPE = JWTBearerClientAssertion.CLIENT_ASSERTION_TYPE

_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")  # RFC 6749 §3.3


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """What the server says about itself and how long things live (seconds)."""

    issuer: str
    fhir_base: str
    access_token_lifetime: int = 3600
    code_lifetime: int = 60
    refresh_token_lifetime: int = 90 * 24 * 3600
    login_lifetime: int = 8 * 3600
    #: The FHIR server the patient picker searches, as this server reaches it (None: the patients
    #: linked to users in the store).
    patient_search_url: str | None = None

    @property
    def token_endpoint(self) -> str:
        return self.issuer + "/token"


class Bridge:
    """Runs the store's coroutines on the event loop from Authlib's worker thread."""

    @staticmethod
    def call(fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        return anyio.from_thread.run(fn, *args)


def _q(value: object) -> str:
    """A value inside an `error_description` (RFC 6749 §5.2 allows no double quote or backslash)."""
    text = str(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return "'" + "".join(c if 0x20 <= ord(c) <= 0x7E and c not in "\"\\'" else "?" for c in text) + "'"


class OAuthClient(ClientMixin):  # type: ignore[misc]
    """A registered client as Authlib sees it (`ClientMixin`), from one `auth_client` row."""

    def __init__(self, stored: StoredClient) -> None:
        self.stored = stored
        self.client_id = stored.client_id
        self.metadata: dict[str, Any] = json.loads(stored.metadata)

    @property
    def auth_method(self) -> str:
        return str(self.metadata["token_endpoint_auth_method"])

    @property
    def registered_scopes(self) -> list[str] | None:
        scope = self.metadata.get("scope")
        return None if scope is None else str(scope).split()

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        uris = self.metadata.get("redirect_uris") or []
        return str(uris[0]) if len(uris) == 1 else None

    def get_allowed_scope(self, scope: str | None) -> str:
        return scope or ""

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return any(
            redirect_uri_matches(str(r), redirect_uri) for r in self.metadata.get("redirect_uris") or []
        )

    def check_client_secret(self, client_secret: str) -> bool:
        return secret_matches(self.stored.secret_hash, client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == self.auth_method

    def check_response_type(self, response_type: str) -> bool:
        return response_type in (self.metadata.get("response_types") or [])

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in (self.metadata.get("grant_types") or [])


class ClientKeys:
    """The public keys a `private_key_jwt` client verifies with: its registered `jwks`, or its
    `jwks_uri` fetched (TLS verified, size-capped) and cached for `ttl` seconds. `refresh` (an
    assertion's `kid` is not in the cached set: the client rotated its keys) fetches again, at most
    once per `refetch_cooldown` seconds and URI, so unknown `kid`s cannot make the server hammer a
    client's host."""

    def __init__(
        self,
        fetch: Callable[[str], Awaitable[bytes]] | None = None,
        ttl: float = 300.0,
        refetch_cooldown: float = 30.0,
        failure_cooldown: float = 10.0,
    ) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self.refetch_cooldown = refetch_cooldown
        self.failure_cooldown = failure_cooldown
        self._cache: dict[str, tuple[float, KeySet]] = {}
        self._failed: dict[str, tuple[float, str]] = {}  # uri -> (retry not before, description)
        self._registered: dict[str, KeySet] = {}
        self._refetched: dict[str, float] = {}  # uri -> when an unknown kid last caused a fetch

    def is_fetched(self, client: OAuthClient) -> bool:
        return client.metadata.get("jwks") is None

    async def keys(self, client: OAuthClient, refresh: bool = False) -> KeySet:
        jwks = client.metadata.get("jwks")
        if jwks is not None:  # parsed once per registered set (the row's JSON is the cache key)
            parsed = self._registered.get(client.stored.metadata)
            if parsed is None:
                parsed = KeySet.import_key_set(jwks)
                if len(self._registered) >= 1024:
                    self._registered.pop(next(iter(self._registered)))
                self._registered[client.stored.metadata] = parsed
            return parsed
        uri = str(client.metadata.get("jwks_uri") or "")
        cached = self._cache.get(uri)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            if not refresh or now - self._refetched.get(uri, -self.refetch_cooldown) < self.refetch_cooldown:
                return cached[1]
            self._refetched[uri] = now
        failed = self._failed.get(uri)
        if failed is not None and failed[0] > now:  # a failing host is not asked again at once
            raise InvalidClientError(description=failed[1])
        if self._fetch is None:
            from fhirgate.tokens.jwks_cache import HttpFetcher

            fetcher = HttpFetcher()

            async def fetch(url: str) -> bytes:
                return (await fetcher(url)).body

            self._fetch = fetch
        try:
            body = await self._fetch(uri)
            keyset = KeySet.import_key_set(json.loads(body))
        except Exception as exc:  # network, JSON or JWK errors: the client cannot be verified
            description = (
                f"could not read the client's jwks_uri {_q(uri)}: {type(exc).__name__} "
                f"(not fetched again for {self.failure_cooldown:g} seconds)"
            )
            self._failed[uri] = (now + self.failure_cooldown, description)
            if len(self._failed) > 10_000:
                self._failed.pop(next(iter(self._failed)))
            raise InvalidClientError(description=description) from None
        self._failed.pop(uri, None)
        self._cache[uri] = (now + self._ttl, keyset)
        return keyset


class PrivateKeyJwt(JWTBearerClientAssertion):  # type: ignore[misc]
    """RFC 7523 client authentication with the rules of SMART Backend Services."""

    CLIENT_AUTH_METHOD = "private_key_jwt"

    def __init__(self, server: OAuthServer) -> None:
        super().__init__(validate_jti=True, leeway=ASSERTION_LEEWAY)
        self.server = server

    def get_audiences(self) -> list[str]:
        return [self.server.config.token_endpoint]

    def __call__(self, query_client: Callable[[str], OAuthClient | None], request: OAuth2Request) -> Any:
        assertion = request.form.get("client_assertion")
        if request.form.get("client_assertion_type") != ASSERTION_TYPE:
            raise InvalidClientError(
                description=f"client_assertion_type must be {ASSERTION_TYPE} (RFC 7523 section 2.2)"
            )
        if not assertion:
            raise InvalidClientError(description="client_assertion is missing")
        headers, claims = self.extract_assertion(assertion)
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise InvalidClientError(
                description="the client assertion has no sub claim (it must be the client_id)"
            )
        form_id = request.form.get("client_id")
        if form_id is not None and form_id != sub:
            raise InvalidClientError(description="client_id differs from the client assertion's sub")
        client = query_client(sub)
        if client is None:
            raise InvalidClientError(description=f"unknown client {_q(sub)}")
        if client.auth_method != self.CLIENT_AUTH_METHOD:
            raise InvalidClientError(
                description=f"client {_q(sub)} is registered with token_endpoint_auth_method "
                f"{client.auth_method}, not private_key_jwt"
            )
        alg = headers.get("alg")
        if alg not in CLIENT_ASSERTION_ALGS:
            raise InvalidClientError(
                description=f"client assertion alg {_q(alg)} is not accepted: use one of "
                + ", ".join(sorted(CLIENT_ASSERTION_ALGS))
            )
        keyset = getattr(request, "preloaded_keys", {}).get(client.client_id)
        if keyset is None:
            keyset = Bridge.call(self.server.client_keys.keys, client)
        kid = headers.get("kid")
        candidates = [k for k in keyset.keys if kid is None or k.kid == kid]
        if not candidates and kid is not None and self.server.client_keys.is_fetched(client):
            keyset = Bridge.call(self.server.client_keys.keys, client, True)  # rotated keys?
            candidates = [k for k in keyset.keys if k.kid == kid]
        if kid is None and len(candidates) != 1:
            raise InvalidClientError(
                description="the client assertion has no kid and the client has several keys: set kid"
            )
        if not candidates:
            raise InvalidClientError(description=f"no key with kid {_q(kid)} in the client's JWK Set")
        key = candidates[0]
        if key.alg is not None and key.alg != alg:
            raise InvalidClientError(description=f"key {_q(kid)} is registered for {key.alg}, not {alg}")
        try:
            token = jwt.decode(assertion, key, algorithms=[str(alg)])
        except JoseError as exc:
            raise InvalidClientError(
                description=f"the client assertion's signature does not verify ({exc.error})"
            ) from None
        request.client = client
        self.verify_claims(token.claims)
        return client

    def verify_claims(self, claims: Mapping[str, Any]) -> None:
        now = clock.now()
        iss = claims.get("iss")
        if iss != claims.get("sub"):
            raise InvalidClientError(
                description="the client assertion's iss and sub must both be the client_id"
            )
        aud = claims.get("aud")
        if aud is None:
            raise InvalidClientError(
                description=f"the client assertion has no aud claim: it must be the token endpoint "
                f"{self.server.config.token_endpoint}"
            )
        audiences = aud if isinstance(aud, list) else [aud]
        if self.server.config.token_endpoint not in audiences:
            raise InvalidClientError(
                description=f"the client assertion's aud must be the token endpoint "
                f"{self.server.config.token_endpoint}, not {_q(aud)}"
            )
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise InvalidClientError(description="the client assertion has no numeric exp claim")
        if exp + ASSERTION_LEEWAY <= now:
            raise InvalidClientError(description="the client assertion has expired (exp is in the past)")
        if exp > now + ASSERTION_MAX_LIFETIME:
            raise InvalidClientError(
                description=f"the client assertion's exp is more than {ASSERTION_MAX_LIFETIME} seconds ahead"
            )
        for name in ("nbf", "iat"):
            value = claims.get(name)
            if value is not None and (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or value > now + ASSERTION_LEEWAY
            ):
                raise InvalidClientError(description=f"the client assertion's {name} is in the future")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise InvalidClientError(description="the client assertion has no jti claim")
        if len(jti) > 256:
            raise InvalidClientError(description="the client assertion's jti is longer than 256 characters")
        if not Bridge.call(self.server.remember_jti, str(iss), jti, exp):
            raise InvalidClientError(description="the client assertion's jti was used before")


_PRESENTED = {
    "client_secret_basic": "HTTP Basic (client_secret_basic)",
    "client_secret_post": "client_secret in the body (client_secret_post)",
    "private_key_jwt": "client_assertion (private_key_jwt)",
}


def presented_methods(request: OAuth2Request) -> list[str]:
    """The client authentication methods a request carries."""
    found = []
    if request.headers.get("Authorization") is not None:
        found.append("client_secret_basic")
    if "client_secret" in request.form:
        found.append("client_secret_post")
    if "client_assertion" in request.form or "client_assertion_type" in request.form:
        found.append("private_key_jwt")
    return found


def basic_credentials(header: str) -> tuple[str, str]:
    """RFC 6749 §2.3.1: base64 of `client_id:secret`, each form-urlencoded first."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        raise InvalidClientError(
            status_code=401,
            description="the Authorization header must be HTTP Basic client credentials here",
        )
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidClientError(
            status_code=401, description="the Authorization header is not valid base64 of client_id:secret"
        ) from None
    client_id, sep, secret = decoded.partition(":")
    if not sep or not client_id or not secret:
        raise InvalidClientError(
            status_code=401, description="the Authorization header must carry client_id:secret"
        )
    return unquote(client_id.replace("+", " ")), unquote(secret.replace("+", " "))


def claimed_client_id(authorization: str | None, form: Mapping[str, str]) -> str:
    """The client_id a token request claims, unverified (for counting failures, never for trust):
    from the Basic header, else the `client_id` parameter, else the client assertion's `sub`."""
    if authorization is not None:
        try:
            return basic_credentials(authorization)[0]
        except InvalidClientError:
            return ""
    if form.get("client_id"):
        return form["client_id"]
    parts = form.get("client_assertion", "").split(".")
    if len(parts) == 3:
        try:
            claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        except (ValueError, binascii.Error):
            return ""
        if isinstance(claims, dict) and isinstance(claims.get("sub"), str):
            return str(claims["sub"])
    return ""


@dataclass
class TokenRequest:
    """What the adapter hands the core: method, public URL, headers and single-valued form, and
    what the adapter already read on the event loop (`OAuthServer.preload`): the claimed client
    (None: no such client) and its registered JWK Set, so the worker thread need not call back."""

    method: str
    uri: str
    headers: dict[str, str]
    form: dict[str, str]
    query: dict[str, str] = field(default_factory=dict)
    clients: dict[str, OAuthClient | None] = field(default_factory=dict)
    keys: dict[str, KeySet] = field(default_factory=dict)


class _Payload:
    def __init__(self, data: dict[str, str]) -> None:
        self._data = data

    @property
    def data(self) -> dict[str, str]:
        return self._data

    @property
    def datalist(self) -> dict[str, list[str]]:
        return {k: [v] for k, v in self._data.items()}

    client_id = property(lambda self: self._data.get("client_id"))
    response_type = property(lambda self: self._data.get("response_type"))
    grant_type = property(lambda self: self._data.get("grant_type"))
    redirect_uri = property(lambda self: self._data.get("redirect_uri"))
    scope = property(lambda self: self._data.get("scope"))
    state = property(lambda self: self._data.get("state"))


class _Request(OAuth2Request):  # type: ignore[misc]
    """Authlib's request without its https check: the transport is the gateway's concern, and the
    issuer may be `http://localhost` in development."""

    def __init__(self, req: TokenRequest) -> None:
        self.method = req.method
        self.uri = req.uri
        self.headers = req.headers
        self._body = None
        self._form = req.form
        self._args = req.query
        self.payload = _Payload(req.form if req.method == "POST" else req.query)
        self.preloaded_clients = req.clients
        self.preloaded_keys = req.keys
        self.client = None
        self.auth_method = None
        self.user = None
        self.authorization_code = None
        self.refresh_token = None
        self.credential = None
        self._scope = None

    @property
    def form(self) -> dict[str, str]:
        return self._form

    @property
    def args(self) -> dict[str, str]:
        return self._args


def scope_list(scope: str | None) -> list[str]:
    return [] if not scope else scope.split(" ")


def check_scope_syntax(scope: str | None) -> list[str]:
    """The scopes of a request, refusing what RFC 6749 §3.3 does not allow."""
    if scope is None:
        return []
    scopes = scope.split(" ")
    if not scope or any(not _SCOPE_TOKEN.match(s) for s in scopes):
        raise InvalidScopeError(description="scope must be scope tokens separated by single spaces")
    if len(set(scopes)) != len(scopes):
        raise InvalidScopeError(description="scope lists a scope twice")
    return scopes


def check_registered(client: OAuthClient, scopes: Sequence[str]) -> None:
    """Every requested scope within what the client registered (when it registered a `scope`)."""
    allowed = client.registered_scopes
    if allowed is None:
        return
    extra = [s for s in scopes if s not in allowed]
    if extra:
        raise InvalidScopeError(
            description=f"scope {_q(extra[0])} is not registered for client {_q(client.client_id)}"
        )


class ClientCredentials(ClientCredentialsGrant):  # type: ignore[misc]
    """SMART Backend Services: a confidential client, `system/` scopes only."""

    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "private_key_jwt"]

    def validate_token_request(self) -> None:
        client = self.authenticate_token_endpoint_client()
        if not client.check_grant_type(self.GRANT_TYPE):
            raise UnauthorizedClientError(
                description=f"client {_q(client.client_id)} is not registered for client_credentials"
            )
        self.request.client = client
        scope = self.request.payload.scope
        if scope is None:
            raise InvalidScopeError(description="scope is required: ask for system/ scopes")
        scopes = check_scope_syntax(scope)
        for s in scopes:
            if not s.startswith("system/"):
                raise InvalidScopeError(
                    description=f"scope {_q(s)} is not a system/ scope: "
                    "client_credentials grants system/ scopes only"
                )
        check_registered(client, scopes)


#: Members of a user grant's context that the token response carries (SMART App Launch 2.2).
def launch_context_applies(scopes: Sequence[str]) -> bool:
    """Whether a grant's scopes still carry its patient/encounter context: a launch scope or a
    `patient/` scope (a refresh that narrowed them all away drops the context too)."""
    return any(
        s in ("launch", "launch/patient", "launch/encounter") or s.startswith("patient/") for s in scopes
    )


CONTEXT_RESPONSE_MEMBERS = ("patient", "encounter", "fhirContext", "need_patient_banner", "smart_style_url")


@dataclass(frozen=True, slots=True)
class Grantee:
    """Who a token is for and what context comes with it (`user` of Authlib's grants)."""

    sub: str
    fhir_user: str | None = None
    family: str | None = None
    context: Mapping[str, Any] = field(default_factory=dict)


class OAuthServer(AuthorizationServer):  # type: ignore[misc]
    """Authlib's authorization server on the fhirgate store. Call `create_token_response` (and the
    other endpoint methods) from a worker thread with a `TokenRequest`; they return
    (status, body, headers)."""

    def __init__(self, config: ServerConfig, store: AuthStore, signing_key: Callable[[], SigningKey]) -> None:
        super().__init__(scopes_supported=None)
        self.config = config
        self.store = store
        self.signing_key = signing_key
        self.client_keys = ClientKeys()
        self.replay: ReplayRegistry = StoreReplay(store)
        self._private_key_jwt = PrivateKeyJwt(self)
        #: Persists what a user grant issued (`flows.install` sets it): the code or refresh token
        #: consumed, the new refresh token, the access token's row in its family.
        self.token_saver: Callable[[OAuth2Request, dict[str, Any], str, int, str], None] | None = None
        self.register_token_generator("default", self.generate_access_token)
        self.register_grant(ClientCredentials)

    # --- Authlib's framework hooks -----------------------------------------------------------

    def create_oauth2_request(self, request: TokenRequest | OAuth2Request) -> OAuth2Request:
        return request if isinstance(request, OAuth2Request) else _Request(request)

    def handle_response(self, status: int, body: Any, headers: Sequence[tuple[str, str]]) -> Any:
        return status, body, list(headers)

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        return None

    # --- models --------------------------------------------------------------------------------

    async def load_client(self, client_id: str) -> OAuthClient | None:
        # one statement, no snapshot to share: one round trip on PostgreSQL, not BEGIN/SELECT/COMMIT
        async with self.store.backend.statement() as conn:
            stored = await AuthSession(conn).client(client_id)
        return None if stored is None else OAuthClient(stored)

    def query_client(self, client_id: str) -> OAuthClient | None:
        return Bridge.call(self.load_client, client_id)

    async def preload(self, req: TokenRequest, client_id: str) -> None:
        """On the event loop, before the worker thread: read the client a request claims (and the
        JWK Set it registered, for private_key_jwt), so `authenticate_client` finds them in the
        request instead of calling back into the loop. Only a lookup: every check still runs in
        the thread, on what was read here."""
        if not client_id:
            return
        client = await self.load_client(client_id)
        req.clients[client_id] = client
        if client is None or client.auth_method != "private_key_jwt" or self.client_keys.is_fetched(client):
            return  # a jwks_uri is fetched (and its errors reported) in the thread, as before
        with contextlib.suppress(Exception):  # else the thread reads them and reports the error
            req.keys[client_id] = await self.client_keys.keys(client)

    def request_client(self, request: OAuth2Request, client_id: str) -> OAuthClient | None:
        """The client `preload` read for this request, or a lookup through the bridge."""
        preloaded: dict[str, OAuthClient | None] = getattr(request, "preloaded_clients", {})
        if client_id in preloaded:
            return preloaded[client_id]
        return self.query_client(client_id)

    async def remember_jti(self, client_id: str, jti: str, exp: float) -> bool:
        return await self.replay.remember(client_id, jti, int(exp * 1000) + ASSERTION_LEEWAY * 1000)

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        jti = token.pop("_jti", None)
        exp = token.pop("_exp", None)
        family = token.pop("_family", None)
        if family is not None and self.token_saver is not None:
            self.token_saver(request, token, str(jti), int(exp), str(family))

    def get_token_grant(self, request: OAuth2Request) -> Any:
        """Authlib's, with the `error_description` Authlib leaves out, and `invalid_request` (RFC
        6749 §5.2: a required parameter is missing) when there is no grant_type at all."""
        try:
            return super().get_token_grant(request)
        except UnsupportedGrantTypeError:
            grant_type = request.payload.grant_type
            error = UnsupportedGrantTypeError(grant_type)
            if grant_type is None:
                error.error = "invalid_request"
                error.description = "grant_type is missing"
            else:
                supported = ", ".join(grant.GRANT_TYPE for grant, _ in self._token_grants)
                error.description = f"grant_type {_q(grant_type)} is not supported; use {supported}"
            raise error from None

    def authenticate_client(
        self, request: OAuth2Request, methods: Sequence[str], endpoint: str = "token"
    ) -> Any:
        """Exactly one client authentication method, the client's registered one."""
        presented = presented_methods(request)
        if len(presented) > 1:
            raise InvalidRequestError(
                description="use exactly one client authentication method; this request used "
                + " and ".join(_PRESENTED[m] for m in presented)
            )
        method = presented[0] if presented else "none"
        status = 401 if method == "client_secret_basic" else 400
        if method not in methods:
            allowed = ", ".join(m for m in methods)
            raise InvalidClientError(
                status_code=status,
                description=f"client authentication {method} is not accepted here; use one of {allowed}",
            )
        if method == "private_key_jwt":
            client = self._private_key_jwt(lambda cid: self.request_client(request, cid), request)
        else:
            if method == "client_secret_basic":
                client_id, secret = basic_credentials(request.headers["Authorization"])
                form_id = request.form.get("client_id")
                if form_id is not None and form_id != client_id:
                    raise InvalidClientError(
                        status_code=401,
                        description="client_id in the body differs from the Authorization header",
                    )
            else:
                client_id = request.form.get("client_id") or ""
                secret = request.form.get("client_secret", "")
                if not client_id:
                    raise InvalidClientError(description="client_id is missing")
            client = self.request_client(request, client_id)
            if client is None:
                secret_matches(None, secret)  # the same work as for a known client
                raise InvalidClientError(status_code=status, description=f"unknown client {_q(client_id)}")
            if client.auth_method != method:
                raise InvalidClientError(
                    status_code=status,
                    description=f"client {_q(client_id)} is registered with token_endpoint_auth_method "
                    f"{client.auth_method}, not {method}",
                )
            if method != "none" and not client.check_client_secret(secret):
                raise InvalidClientError(status_code=status, description="wrong client secret")
        request.auth_method = method
        request.client = client
        return client

    # --- tokens --------------------------------------------------------------------------------

    def access_token_claims(
        self, client: OAuthClient, grantee: Grantee | None, scope: str, now: int, lifetime: int
    ) -> dict[str, Any]:
        claims: dict[str, Any] = {
            "iss": self.config.issuer,
            "sub": client.client_id if grantee is None else grantee.sub,
            "aud": self.config.fhir_base,
            "client_id": client.client_id,
            "scope": scope,
            "iat": now,
            "exp": now + lifetime,
            "jti": secrets.token_urlsafe(24),
        }
        if grantee is not None:
            scopes = scope_list(scope)
            if launch_context_applies(scopes):
                for name in ("patient", "encounter"):
                    if grantee.context.get(name):
                        claims[name] = grantee.context[name]
            # who the user is travels with `fhirUser`, and with every `user/` scope (access "as
            # this user" means nothing to the resource server without knowing the user)
            if grantee.fhir_user and ("fhirUser" in scopes or any(s.startswith("user/") for s in scopes)):
                claims["fhirUser"] = f"{self.config.fhir_base}/{grantee.fhir_user}"
        return claims

    def generate_access_token(
        self,
        grant_type: str,
        client: OAuthClient,
        user: Grantee | None = None,
        scope: str | None = None,
        expires_in: int | None = None,
        include_refresh_token: bool = True,
    ) -> dict[str, Any]:
        lifetime = min(expires_in or self.config.access_token_lifetime, self.config.access_token_lifetime)
        now = int(clock.now())
        claims = self.access_token_claims(client, user, scope or "", now, lifetime)
        token: dict[str, Any] = {
            "access_token": self.signing_key().sign(claims, typ="at+jwt"),
            "token_type": "Bearer",
            "expires_in": lifetime,
            "scope": scope or "",
            "_jti": claims["jti"],
            "_exp": claims["exp"],
        }
        if user is not None and user.family is not None:
            # a user grant: a refresh token when offline_access or online_access was granted (and
            # the grant asks for one: the client is registered for refresh_token), and the SMART
            # launch context (App Launch 2.2 "Launch context arrives with your access_token")
            token["_family"] = user.family
            granted = scope_list(scope)
            if include_refresh_token and ("offline_access" in granted or "online_access" in granted):
                token["refresh_token"] = secrets.token_urlsafe(32)
            with_context = launch_context_applies(granted)
            for name in CONTEXT_RESPONSE_MEMBERS:
                if name in user.context and (with_context or name not in ("patient", "encounter")):
                    token[name] = user.context[name]
        return token
