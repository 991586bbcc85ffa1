"""Token management endpoints: introspection (RFC 7662), revocation (RFC 7009), dynamic client
registration (RFC 7591) and the revocation feed the gateway polls.

`/introspect` and `/revoke` are Authlib endpoints (`IntrospectionEndpoint`, `RevocationEndpoint`)
on the same core as `/token`: the form is parsed by the adapter (`app.form_params`: form-encoded
only, each parameter once), the call runs in a worker thread, client authentication is
`OAuthServer.authenticate_client` (exactly one method, the client's registered one), and failed
client authentications count against the same limiter as the token endpoint's.

Which tokens are ours (`TokenInspector`):

- an access token is an RFC 9068 JWT (`typ: at+jwt`) whose header `alg` and `kid` name a key this
  server publishes in its JWKS now (active or retired but still published), whose signature
  verifies with that key and that algorithm only, and whose `iss` is this issuer and `aud` the FHIR
  base. It is active until `exp` unless its `jti` was revoked (`auth_token.revoked_at`) or its
  family (the authorization it came from) was revoked;
- a refresh token is looked up by its SHA-256 (`auth_refresh`, joined to its grant): active while
  not used, not expired, its grant not revoked and, for `online_access`, its login session alive;
- anything else is unknown: introspection answers `{"active": false}`, revocation 200.

Decisions (docs/auth-server.md):

- introspection needs a confidential client (`client_secret_basic`, `client_secret_post` or
  `private_key_jwt`), and a client learns only about tokens issued to itself: a token of another
  client is `{"active": false}`, exactly like an unknown one (the server has no resource-server
  clients; the gateway verifies JWTs itself and learns revocations from the feed);
- revocation accepts public clients too (`none`, identified by `client_id`, RFC 7009 §2.1: a
  public client may revoke its own tokens); a verified token of another client is refused with
  `unauthorized_client` and not revoked (RFC 7009 §2.1: "the request is refused and the client is
  informed of the error"); revoking an access token revokes its family (RFC 7009 §2.1 allows the
  refresh token to go with it), revoking a refresh token revokes its family;
- `/register` is open only while an initial access token is configured and presented;
- `/revocations` needs no authentication: it lists the `jti`, expiry and revocation time of
  revoked, unexpired access tokens, which grant nothing (a `jti` is not a token, the feed carries
  no client, subject or scope).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from authlib.oauth2.rfc6749 import (
    InvalidRequestError,
    OAuth2Error,
    OAuth2Request,
    UnauthorizedClientError,
)
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fhirgate import clock
from fhirgate.authserver.access import MAX_TOKEN_CHARS, AccessToken, inspect_access_token
from fhirgate.authserver.clients import ClientMetadataError, Clients
from fhirgate.authserver.keys import KeyRing
from fhirgate.authserver.launch import digest
from fhirgate.authserver.oauth import Bridge
from fhirgate.authserver.responses import json_response, method_not_allowed, oauth_error, single_valued

if TYPE_CHECKING:
    from fhirgate.authserver.app import AuthApp
    from fhirgate.authserver.oauth import OAuthClient, OAuthServer, TokenRequest

__all__ = [
    "FEED_MAX_LIMIT",
    "FEED_SETTLE_MS",
    "AccessToken",
    "Introspection",
    "RefreshToken",
    "Revocation",
    "TokenInspector",
    "install",
    "refresh_token_hash",
    "routes",
]

log = logging.getLogger("fhirgate.authserver")

#: Longest token string looked at (ours are well under 2 KiB); longer ones are simply unknown.
#: Largest registration request body.
MAX_REGISTRATION_BYTES = 64 * 1024
#: Revocation feed page sizes.
FEED_DEFAULT_LIMIT = 500
FEED_MAX_LIMIT = 1000
#: How far back the feed's `next` cursor stays behind now (ms): a revocation whose transaction
#: commits up to this long after its `revoked_at` was taken is still seen by every poller.
FEED_SETTLE_MS = 60_000
MAX_JTI = 256

ALL_AUTH_METHODS = ["none", "client_secret_basic", "client_secret_post", "private_key_jwt"]
CONFIDENTIAL_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "private_key_jwt"]

MSG_TOKEN_MISSING = "token is missing: send the token to {action} in the token parameter"  # noqa: S105
MSG_HINT = "token_type_hint must be access_token or refresh_token"
MSG_NOT_YOURS = "the token was not issued to this client; it is not revoked"
MSG_CLOSED = (
    "dynamic client registration is closed: the operator opens it by setting an initial access "
    "token (FHIRGATE_AUTH_REGISTRATION_TOKEN), which clients send as Authorization: Bearer"
)
MSG_NO_BEARER = "send the initial access token as Authorization: Bearer (RFC 7591 section 3)"
MSG_BAD_BEARER = "the initial access token is not valid"
MSG_JSON_TYPE = "the body must be application/json client metadata (RFC 7591 section 3.1)"
MSG_JSON_SIZE = f"the body is larger than {MAX_REGISTRATION_BYTES} bytes"
MSG_JSON_INVALID = "the body is not a valid UTF-8 JSON object"
MSG_JSON_DUPLICATE = "the JSON object repeats the member {name}"
MSG_JWKS_URI_HTTPS = (
    "jwks_uri must be an https URI of a public host when registering through /register (the server "
    "fetches it); register loopback or internal key sets with fhirgate clients create"
)


def public_https(uri: str) -> bool:
    """An https URI whose host is a name other than localhost, or a public IP address: /register
    never lets a caller aim the server's fetches at loopback, private or link-local addresses
    written as literals. (A public name that resolves to an internal address is not caught here:
    the operator controls who holds the registration token.)"""
    import ipaddress
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(uri)
        host = parts.hostname
    except ValueError:
        return False
    if parts.scheme.lower() != "https" or not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return True  # a name
    return address.is_global


def refresh_token_hash(token: str) -> str:
    """How `auth_refresh.token_hash` stores a refresh token (`launch.digest`: hex SHA-256)."""
    return digest(token)


# --- the tokens ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RefreshToken:
    """One of our refresh tokens, found by its hash."""

    family: str
    client_id: str
    scope: str
    active: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def check_client(self, client: OAuthClient) -> bool:
        return bool(hmac.compare_digest(client.client_id.encode(), self.client_id.encode()))

    def introspection(self) -> dict[str, Any]:
        return {"active": True, "scope": self.scope, "client_id": self.client_id, **self.extra}


Token = AccessToken | RefreshToken


class TokenInspector:
    """Finds out whether a token string is one of ours and in what state. Its methods run in
    Authlib's worker thread and reach the store through `Bridge`."""

    def __init__(self, server: OAuthServer) -> None:
        self.server = server
        self.ring = KeyRing(server.store)

    def find(self, token: str) -> Token | None:
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        if token.count(".") == 2:
            return self.access_token(token)
        return self.refresh_token(token)

    # access tokens

    def access_token(self, token: str) -> AccessToken | None:
        return Bridge.call(inspect_access_token, self.server.store, self.ring, self.server.config, token)

    # refresh tokens

    def refresh_token(self, token: str) -> RefreshToken | None:
        found = Bridge.call(self._refresh_status, refresh_token_hash(token))
        if found is None:
            return None
        family, client_id, scope, active = found
        return RefreshToken(family, client_id, scope, active, {"iss": self.server.config.issuer})

    async def _refresh_status(self, token_hash: str) -> tuple[str, str, str, bool] | None:
        """(family, client_id, scope, active) with the refresh grant's own rules (flows.py):
        active while not used, not expired, the grant not revoked and, for `online_access`, its
        login session running."""
        now_ms = int(clock.now() * 1000)
        async with self.server.store.read() as s:
            stored = await s.refresh(token_hash)
            grant = None if stored is None else await s.grant(stored.family)
            if stored is None or grant is None:
                return None
            active = (
                stored.used_at is None
                and grant.revoked_at is None
                and (stored.expires_at is None or stored.expires_at > now_ms)
            )
            if active and "online_access" in grant.scope.split():
                active = grant.login is not None and await s.login(grant.login, now_ms) is not None
        return grant.family, grant.client_id, stored.scope, active

    # revocation

    async def revoke(self, token: Token) -> None:
        now_ms = int(clock.now() * 1000)
        async with self.server.store.write() as s:
            if isinstance(token, AccessToken):
                exp_ms = int(float(token.claims["exp"]) * 1000)
                await s.revoke_token(token.jti, token.client_id, exp_ms, now_ms)
                if token.family is not None:
                    await s.revoke_family(token.family, now_ms)
            else:
                await s.revoke_family(token.family, now_ms)


class UnsupportedTokenType(OAuth2Error):  # type: ignore[misc]
    """RFC 7009 §2.2.1 `unsupported_token_type`, a 400 like every RFC 6749 §5.2 error (Authlib's
    own class answers 401)."""

    error = "unsupported_token_type"
    status_code = 400


def _check_params(request: OAuth2Request, action: str, strict_hint: bool) -> None:
    if "token" not in request.form:
        raise InvalidRequestError(description=MSG_TOKEN_MISSING.format(action=action))
    hint = request.form.get("token_type_hint")
    if strict_hint and hint is not None and hint not in ("access_token", "refresh_token"):
        raise UnsupportedTokenType(description=MSG_HINT)


class Introspection(IntrospectionEndpoint):  # type: ignore[misc]
    """RFC 7662 for confidential clients, about their own tokens only."""

    CLIENT_AUTH_METHODS = CONFIDENTIAL_AUTH_METHODS

    def __init__(self, server: OAuthServer, inspector: TokenInspector) -> None:
        super().__init__(server)
        self.inspector = inspector

    def check_params(self, request: OAuth2Request, client: OAuthClient) -> None:
        # RFC 7662 §2.1: the hint only speeds the search up; an unknown one changes nothing
        _check_params(request, "introspect", strict_hint=False)

    def query_token(self, token_string: str, token_type_hint: str | None) -> Token | None:
        return self.inspector.find(token_string)

    def check_permission(self, token: Token, client: OAuthClient, request: OAuth2Request) -> bool:
        return token.check_client(client)

    def create_introspection_payload(self, token: Token | None) -> dict[str, Any]:
        if token is None or not token.active:
            return {"active": False}
        return token.introspection()


class Revocation(RevocationEndpoint):  # type: ignore[misc]
    """RFC 7009: a client revokes its own access or refresh tokens (and their family)."""

    CLIENT_AUTH_METHODS = ALL_AUTH_METHODS

    def __init__(self, server: OAuthServer, inspector: TokenInspector) -> None:
        super().__init__(server)
        self.inspector = inspector

    def check_params(self, request: OAuth2Request, client: OAuthClient) -> None:
        _check_params(request, "revoke", strict_hint=True)

    def authenticate_token(self, request: OAuth2Request, client: OAuthClient) -> Token | None:
        self.check_params(request, client)
        token = self.inspector.find(request.form["token"])
        if token is None:
            return None  # RFC 7009 §2.2: an invalid token is answered 200
        if not token.check_client(client):
            raise UnauthorizedClientError(description=MSG_NOT_YOURS)
        if isinstance(token, AccessToken) and token.expired:
            return None  # nothing left to revoke
        return token

    def query_token(self, token_string: str, token_type_hint: str | None) -> Token | None:
        return self.inspector.find(token_string)

    def revoke_token(self, token: Token, request: OAuth2Request) -> None:
        Bridge.call(self.inspector.revoke, token)


def install(server: OAuthServer) -> None:
    """Register this module's endpoints with the Authlib server."""
    inspector = TokenInspector(server)
    server.register_endpoint(Introspection(server, inspector))
    server.register_endpoint(Revocation(server, inspector))


# --- HTTP ---------------------------------------------------------------------------------------


class _Endpoints:
    """The HTTP side of this module, bound to one `AuthApp`."""

    def __init__(self, app: AuthApp) -> None:
        self.app = app

    async def _authlib(self, request: Request, name: str) -> Response:
        call: Callable[[OAuthServer, TokenRequest], Any] = lambda server, req: (  # noqa: E731
            server.create_endpoint_response(name, req)
        )
        return await self.app.client_endpoint(request, f"the {name} endpoint", call)

    async def introspect(self, request: Request) -> Response:
        return await self._authlib(request, "introspection")

    async def revoke(self, request: Request) -> Response:
        return await self._authlib(request, "revocation")

    # registration (RFC 7591)

    def _registration_token(self) -> str | None:
        settings = self.app.settings
        token = getattr(settings, "auth_registration_token", None) if settings is not None else None
        return token or None

    async def register(self, request: Request) -> Response:
        if request.method != "POST":
            return method_not_allowed("POST")
        expected = self._registration_token()
        if expected is None:
            return oauth_error(403, "access_denied", MSG_CLOSED)
        values = request.headers.getlist("authorization")
        challenge = 'Bearer realm="register"'
        if not values:
            return oauth_error(401, "invalid_token", MSG_NO_BEARER, {"WWW-Authenticate": challenge})
        scheme, _, presented = values[0].partition(" ")
        if len(values) != 1 or scheme.lower() != "bearer" or not presented.strip():
            return oauth_error(
                400,
                "invalid_request",
                MSG_NO_BEARER,
                {"WWW-Authenticate": f'{challenge}, error="invalid_request"'},
            )
        digest = hashlib.sha256
        if not hmac.compare_digest(
            digest(presented.strip().encode()).digest(), digest(expected.encode()).digest()
        ):
            return oauth_error(
                401,
                "invalid_token",
                MSG_BAD_BEARER,
                {"WWW-Authenticate": f'{challenge}, error="invalid_token"'},
            )
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            return oauth_error(400, "invalid_client_metadata", MSG_JSON_TYPE)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_REGISTRATION_BYTES:
                return oauth_error(413, "invalid_client_metadata", MSG_JSON_SIZE)
        try:
            metadata = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except _DuplicateMember as exc:
            return oauth_error(400, "invalid_client_metadata", MSG_JSON_DUPLICATE.format(name=exc.name))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return oauth_error(400, "invalid_client_metadata", MSG_JSON_INVALID)
        if not isinstance(metadata, dict):
            return oauth_error(400, "invalid_client_metadata", MSG_JSON_INVALID)
        jwks_uri = metadata.get("jwks_uri")
        if isinstance(jwks_uri, str) and not public_https(jwks_uri):
            # the server fetches it: over /register only https, never a loopback service (SSRF)
            return oauth_error(400, "invalid_client_metadata", MSG_JWKS_URI_HTTPS)
        assert self.app.store is not None
        try:
            client, secret = await Clients(self.app.store).create(metadata)
        except ClientMetadataError as exc:
            return oauth_error(400, exc.error_code, str(exc))
        out: dict[str, Any] = {"client_id": client.client_id}
        if secret is not None:
            out["client_secret"] = secret
            out["client_secret_expires_at"] = 0
        out["client_id_issued_at"] = client.created_at // 1000
        out.update(client.metadata)
        log.info("registered client %s through /register", client.client_id)
        return json_response(201, out)

    # the revocation feed

    async def revocations(self, request: Request) -> Response:
        if request.method != "GET":
            return method_not_allowed("GET")
        try:
            params = single_valued(parse_qsl(request.url.query, keep_blank_values=True))
            since = _int_param(params, "since", 0, 0, 2**53)
            limit = _int_param(params, "limit", FEED_DEFAULT_LIMIT, 1, FEED_MAX_LIMIT)
        except ValueError as exc:
            return oauth_error(400, "invalid_request", str(exc))
        after = params.get("after")
        if after is not None and not 0 < len(after) <= MAX_JTI:
            return oauth_error(400, "invalid_request", f"after must be a jti of at most {MAX_JTI} characters")
        assert self.app.store is not None
        now_ms = int(clock.now() * 1000)
        async with self.app.store.read() as s:
            rows = await s.revoked_page(since, after, now_ms, limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        body: dict[str, Any] = {
            "revoked": [{"jti": j, "exp": -(-e // 1000), "revoked_at": r} for j, e, r in rows],
        }
        if more:
            body["next"], body["after"] = rows[-1][2], rows[-1][0]
        else:
            # every revocation committed so far has been listed; stay FEED_SETTLE_MS behind now
            # so a transaction still committing is seen on the next poll
            body["next"] = max(0, now_ms - FEED_SETTLE_MS)
        body["more"] = more
        return json_response(200, body)


class _DuplicateMember(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _no_duplicates(pairs: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise _DuplicateMember(name[:40])
        out[name] = value
    return out


def _int_param(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    text = params.get(name)
    if text is None:
        return default
    if not text.isascii() or not text.isdigit() or len(text) > 16 or not low <= int(text) <= high:
        raise ValueError(f"{name} must be a whole number from {low} to {high}")
    return int(text)


def routes(app: AuthApp) -> list[Route]:
    """This module's HTTP routes (every method routed, so a wrong one is a JSON 405)."""
    http = _Endpoints(app)
    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return [
        Route("/introspect", http.introspect, methods=methods),
        Route("/revoke", http.revoke, methods=methods),
        Route("/register", http.register, methods=methods),
        Route("/revocations", http.revocations, methods=methods),
    ]
