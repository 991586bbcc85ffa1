"""The authorization server's OAuth clients (issue 5 §2, §4): RFC 7591 client metadata, validated
before anything is stored, and the client secret.

Rules beyond RFC 7591, from SMART App Launch 2.2 and the issue:

- `redirect_uris`: absolute `https` URIs, or `http` only on a loopback host (`127.0.0.1`, `[::1]`,
  `localhost`, RFC 8252 §7.3); no fragment (RFC 6749 §3.1.2), no user information (it makes
  `https://app.example@evil.com/cb` look like `app.example`). Required with `authorization_code`.
- `grant_types` ⊆ {authorization_code, refresh_token, client_credentials}: no implicit, no password;
  `refresh_token` only with `authorization_code`. Default `["authorization_code"]`.
- `response_types` ⊆ {code}, `code` exactly when `authorization_code` is a grant type.
- `token_endpoint_auth_method` ∈ {none, client_secret_basic, client_secret_post, private_key_jwt}
  (default `client_secret_basic`, RFC 7591 §2). `client_credentials` needs a confidential method.
  `private_key_jwt` needs exactly one of `jwks` / `jwks_uri`; a `jwks` must hold at least one public
  signing key usable with RS256, RS384, ES256 or ES384 and no private key material; `jwks`/`jwks_uri`
  are refused with other methods.
- `scope`: space-separated RFC 6749 §3.3 scope tokens; `client_name`: one line of text.
- Members the server issues (`client_id`, `client_secret`, ...) are refused; other members are
  ignored and not stored (RFC 7591 §2: "MUST ignore any client metadata ... it does not understand").

A secret (for `client_secret_basic`/`client_secret_post`) is 256 random bits, returned once by
`create` and stored only as its SHA-256 (enough for a high-entropy random value); `verify_secret`
compares with `hmac.compare_digest` and does the same work whether or not the client exists.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fhirgate import clock
from fhirgate.authserver.store import AuthStore, StoredClient
from fhirgate.errors import FhirgateError
from fhirgate.tokens.jwk import JwkError, json_kind, parse_jwks, private_members, quote_value

__all__ = [
    "AUTH_METHODS",
    "CLIENT_ASSERTION_ALGS",
    "GRANT_TYPES",
    "LOOPBACK_HOSTS",
    "SECRET_METHODS",
    "Client",
    "ClientError",
    "ClientMetadataError",
    "Clients",
    "UnknownClientError",
    "secret_matches",
    "validate_metadata",
]

GRANT_TYPES = ("authorization_code", "refresh_token", "client_credentials")
RESPONSE_TYPES = ("code",)
AUTH_METHODS = ("none", "client_secret_basic", "client_secret_post", "private_key_jwt")
SECRET_METHODS = frozenset({"client_secret_basic", "client_secret_post"})
CLIENT_ASSERTION_ALGS = frozenset({"RS256", "RS384", "ES256", "ES384"})
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
#: Members the authorization server issues; a registration must not set them (RFC 7591 §3.2.1).
SERVER_ISSUED = ("client_id", "client_secret", "client_id_issued_at", "client_secret_expires_at")
DEFAULT_GRANT_TYPES = ("authorization_code",)
DEFAULT_AUTH_METHOD = "client_secret_basic"

_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 §3.3
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_NAME = 200
MAX_URI = 2000

MSG_TYPE = "must be {expected}, not a JSON {kind}"
MSG_EMPTY_LIST = "must not be empty"
MSG_DUPLICATE = "lists {value} twice"
MSG_SERVER_ISSUED = "is issued by the authorization server and cannot be registered"
MSG_URI_LONG = f"{{value}} is longer than {MAX_URI} characters"
MSG_URI_CHARS = "{value} contains whitespace or control characters"
MSG_URI_RELATIVE = "{value} is not an absolute URI"
MSG_URI_SCHEME = "{value} must use https (http only on a loopback host: 127.0.0.1, [::1], localhost)"
MSG_URI_FRAGMENT = "{value} must not have a fragment"
MSG_URI_USERINFO = "{value} must not have user information (user@host)"
MSG_REDIRECT_REQUIRED = "required with grant type authorization_code"
MSG_GRANT_REFUSED = "{value} is not supported: fhirgate has no implicit or password grant"
MSG_GRANT_UNKNOWN = "{value} is not supported; use authorization_code, refresh_token or client_credentials"
MSG_REFRESH_ALONE = "refresh_token needs authorization_code"
MSG_RESPONSE_UNKNOWN = "{value} is not supported; the only response type is code (no implicit flow)"
MSG_RESPONSE_CODE_MISSING = "must include code with grant type authorization_code"
MSG_RESPONSE_CODE_EXTRA = "code needs grant type authorization_code"
MSG_METHOD_UNKNOWN = (
    "{value} is not supported; use none, client_secret_basic, client_secret_post or private_key_jwt"
)
MSG_PUBLIC_CLIENT_CREDENTIALS = (
    "none cannot be used with grant type client_credentials: it needs a confidential client "
    "(client_secret_basic, client_secret_post or private_key_jwt)"
)
MSG_KEYS_BOTH = "jwks and jwks_uri are mutually exclusive: give one"
MSG_KEYS_MISSING = "private_key_jwt needs the client's public keys: give jwks or jwks_uri"
MSG_KEYS_UNUSED = "is only used with token_endpoint_auth_method private_key_jwt"
MSG_JWKS_INVALID = "{detail}"
MSG_JWKS_PRIVATE = "key {index} carries private members ({members}): register public keys only"
MSG_JWKS_NO_SIGNING_KEY = (
    "holds no public signing key usable with RS256, RS384, ES256 or ES384 "
    "(RSA of 2048+ bits, EC P-256 or P-384)"
)
MSG_SCOPE = "must be space-separated scope tokens (RFC 6749 §3.3)"
MSG_NAME = f"must be 1 to {MAX_NAME} characters on one line"
MSG_UNKNOWN_CLIENT = "no client {value}"


class ClientError(FhirgateError, ValueError):
    """A client operation that cannot be done; the message says why."""


class ClientMetadataError(ClientError):
    """Client metadata that cannot be registered. `field` names the member (RFC 7591 §3.2.2
    `invalid_redirect_uri` when it is `redirect_uris`, else `invalid_client_metadata`)."""

    def __init__(self, field: str, detail: str) -> None:
        self.field = field
        self.detail = detail
        super().__init__(f"{field}: {detail}")

    @property
    def error_code(self) -> str:
        return "invalid_redirect_uri" if self.field == "redirect_uris" else "invalid_client_metadata"


class UnknownClientError(ClientError):
    """No such client."""


def _strings(metadata: Mapping[str, Any], field: str) -> list[str] | None:
    """A non-empty array of distinct strings, or None when absent."""
    if field not in metadata:
        return None
    value = metadata[field]
    if not isinstance(value, list):
        raise ClientMetadataError(
            field, MSG_TYPE.format(expected="an array of strings", kind=json_kind(value))
        )
    if not value:
        raise ClientMetadataError(field, MSG_EMPTY_LIST)
    seen: set[str] = set()
    for item in value:
        if not isinstance(item, str):
            raise ClientMetadataError(
                field, MSG_TYPE.format(expected="an array of strings", kind=json_kind(item))
            )
        if item in seen:
            raise ClientMetadataError(field, MSG_DUPLICATE.format(value=quote_value(item)))
        seen.add(item)
    return list(value)


def _string(metadata: Mapping[str, Any], field: str) -> str | None:
    if field not in metadata:
        return None
    value = metadata[field]
    if not isinstance(value, str):
        raise ClientMetadataError(field, MSG_TYPE.format(expected="a string", kind=json_kind(value)))
    return value


def _check_uri(field: str, uri: str) -> None:
    shown = quote_value(uri)
    if len(uri) > MAX_URI:
        raise ClientMetadataError(field, MSG_URI_LONG.format(value=quote_value(uri[:40] + "...")))
    if _CONTROL.search(uri) or any(c.isspace() for c in uri):
        raise ClientMetadataError(field, MSG_URI_CHARS.format(value=shown))
    try:
        parts = urlsplit(uri)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise ClientMetadataError(field, MSG_URI_RELATIVE.format(value=shown)) from exc
    if not parts.scheme or not parts.netloc or not host:
        raise ClientMetadataError(field, MSG_URI_RELATIVE.format(value=shown))
    if "#" in uri:
        raise ClientMetadataError(field, MSG_URI_FRAGMENT.format(value=shown))
    if "@" in parts.netloc:
        raise ClientMetadataError(field, MSG_URI_USERINFO.format(value=shown))
    scheme = parts.scheme.lower()
    if scheme != "https" and not (scheme == "http" and host in LOOPBACK_HOSTS):
        raise ClientMetadataError(field, MSG_URI_SCHEME.format(value=shown))


def _check_jwks(jwks: Any) -> None:
    if not isinstance(jwks, dict):
        raise ClientMetadataError("jwks", MSG_TYPE.format(expected="a JWK Set object", kind=json_kind(jwks)))
    try:
        parsed = parse_jwks(jwks)
    except JwkError as exc:
        raise ClientMetadataError("jwks", MSG_JWKS_INVALID.format(detail=exc.message)) from exc
    for index, member in enumerate(jwks["keys"]):
        found = private_members(member) if isinstance(member, dict) else ()
        if found:
            raise ClientMetadataError("jwks", MSG_JWKS_PRIVATE.format(index=index, members=", ".join(found)))
    if not any(key.algorithms & CLIENT_ASSERTION_ALGS for key in parsed.keys):
        raise ClientMetadataError("jwks", MSG_JWKS_NO_SIGNING_KEY)


def validate_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The registrable metadata of `metadata` with RFC 7591 defaults filled in; raises
    `ClientMetadataError` naming the first bad member."""
    if not isinstance(metadata, Mapping):
        raise ClientMetadataError(
            "metadata", MSG_TYPE.format(expected="a JSON object", kind=json_kind(metadata))
        )
    for field in SERVER_ISSUED:
        if field in metadata:
            raise ClientMetadataError(field, MSG_SERVER_ISSUED)

    grant_types = _strings(metadata, "grant_types") or list(DEFAULT_GRANT_TYPES)
    for grant in grant_types:
        if grant in ("implicit", "password"):
            raise ClientMetadataError("grant_types", MSG_GRANT_REFUSED.format(value=quote_value(grant)))
        if grant not in GRANT_TYPES:
            raise ClientMetadataError("grant_types", MSG_GRANT_UNKNOWN.format(value=quote_value(grant)))
    code_flow = "authorization_code" in grant_types
    if "refresh_token" in grant_types and not code_flow:
        raise ClientMetadataError("grant_types", MSG_REFRESH_ALONE)

    if "response_types" in metadata:
        response_types = _strings(metadata, "response_types") or []
        for response in response_types:
            if response not in RESPONSE_TYPES:
                raise ClientMetadataError(
                    "response_types", MSG_RESPONSE_UNKNOWN.format(value=quote_value(response))
                )
        if code_flow and "code" not in response_types:
            raise ClientMetadataError("response_types", MSG_RESPONSE_CODE_MISSING)
        if not code_flow and "code" in response_types:
            raise ClientMetadataError("response_types", MSG_RESPONSE_CODE_EXTRA)
    else:
        response_types = ["code"] if code_flow else []

    redirect_uris = _strings(metadata, "redirect_uris")
    if redirect_uris is None and code_flow:
        raise ClientMetadataError("redirect_uris", MSG_REDIRECT_REQUIRED)
    for uri in redirect_uris or ():
        _check_uri("redirect_uris", uri)

    method = _string(metadata, "token_endpoint_auth_method")
    if method is None:
        method = DEFAULT_AUTH_METHOD
    if method not in AUTH_METHODS:
        raise ClientMetadataError(
            "token_endpoint_auth_method", MSG_METHOD_UNKNOWN.format(value=quote_value(method))
        )
    if method == "none" and "client_credentials" in grant_types:
        raise ClientMetadataError("token_endpoint_auth_method", MSG_PUBLIC_CLIENT_CREDENTIALS)

    has_jwks, has_jwks_uri = "jwks" in metadata, "jwks_uri" in metadata
    if method == "private_key_jwt":
        if has_jwks and has_jwks_uri:
            raise ClientMetadataError("jwks", MSG_KEYS_BOTH)
        if not has_jwks and not has_jwks_uri:
            raise ClientMetadataError("jwks", MSG_KEYS_MISSING)
    elif has_jwks or has_jwks_uri:
        raise ClientMetadataError("jwks" if has_jwks else "jwks_uri", MSG_KEYS_UNUSED)
    if has_jwks:
        _check_jwks(metadata["jwks"])
    jwks_uri = _string(metadata, "jwks_uri")
    if jwks_uri is not None:
        _check_uri("jwks_uri", jwks_uri)

    scope = _string(metadata, "scope")
    if scope is not None and not all(_SCOPE_TOKEN.fullmatch(t) for t in scope.split(" ")):
        raise ClientMetadataError("scope", MSG_SCOPE)
    name = _string(metadata, "client_name")
    if name is not None and (not name.strip() or len(name) > MAX_NAME or _CONTROL.search(name)):
        raise ClientMetadataError("client_name", MSG_NAME)

    out: dict[str, Any] = {}
    if redirect_uris is not None:
        out["redirect_uris"] = redirect_uris
    out["grant_types"] = grant_types
    out["response_types"] = response_types
    out["token_endpoint_auth_method"] = method
    if has_jwks:
        out["jwks"] = metadata["jwks"]
    if jwks_uri is not None:
        out["jwks_uri"] = jwks_uri
    if scope is not None:
        out["scope"] = scope
    if name is not None:
        out["client_name"] = name
    return out


def _secret_hash(secret: str) -> str:
    return "sha256$" + hashlib.sha256(secret.encode()).hexdigest()


#: Compared against when the client is unknown or has no secret, so every check does the same work.
_NO_SECRET = _secret_hash(secrets.token_urlsafe(32))


def command_line_safe(nbytes: int) -> str:
    """A random URL-safe string that does not start with `-`, so it can follow a command-line
    option (`fhirgate token --client-id ID --client-secret S`) without being taken for one."""
    while True:
        value = secrets.token_urlsafe(nbytes)
        if not value.startswith("-"):
            return value


def secret_matches(secret_hash: str | None, secret: str) -> bool:
    """Whether `secret` hashes to `secret_hash` (False when there is none): one hash and one
    constant-time comparison in every case."""
    ok = hmac.compare_digest(_secret_hash(secret), secret_hash if secret_hash is not None else _NO_SECRET)
    return ok and secret_hash is not None


@dataclass(frozen=True, slots=True)
class Client:
    """A registered client: its id, validated metadata, whether it has a secret. The secret's hash
    never leaves the module."""

    client_id: str
    metadata: dict[str, Any]
    has_secret: bool
    created_at: int

    @property
    def auth_method(self) -> str:
        return str(self.metadata["token_endpoint_auth_method"])

    @property
    def grant_types(self) -> list[str]:
        return list(self.metadata["grant_types"])

    @property
    def redirect_uris(self) -> list[str]:
        return list(self.metadata.get("redirect_uris", []))

    @property
    def name(self) -> str | None:
        name = self.metadata.get("client_name")
        return None if name is None else str(name)


def _public(stored: StoredClient) -> Client:
    return Client(
        stored.client_id, json.loads(stored.metadata), stored.secret_hash is not None, stored.created_at
    )


class Clients:
    """The OAuth clients in `store`."""

    def __init__(self, store: AuthStore) -> None:
        self.store = store

    async def create(self, metadata: Mapping[str, Any]) -> tuple[Client, str | None]:
        """Register a client: (the client, its secret or None). The secret is shown only here."""
        validated = validate_metadata(metadata)
        secret = command_line_safe(32) if validated["token_endpoint_auth_method"] in SECRET_METHODS else None
        text = json.dumps(validated, separators=(",", ":"), sort_keys=True)
        now = int(clock.now() * 1000)
        async with self.store.write() as s:
            while True:  # 192 random bits: a collision is practically impossible, but never overwrite
                stored = StoredClient(
                    command_line_safe(24), text, None if secret is None else _secret_hash(secret), now
                )
                if await s.insert_client(stored):
                    break
        return _public(stored), secret

    async def get(self, client_id: str) -> Client | None:
        async with self.store.read() as s:
            stored = await s.client(client_id)
        return None if stored is None else _public(stored)

    async def list(self) -> list[Client]:
        """Every client, oldest first."""
        async with self.store.read() as s:
            return [_public(c) for c in await s.clients()]

    async def delete(self, client_id: str) -> None:
        """Delete a client and revoke every authorization it holds (refresh tokens, the access
        tokens issued with them); `UnknownClientError` if there is none. Its client_credentials
        tokens were never recorded: they expire by themselves (at most one hour)."""
        async with self.store.write() as s:
            deleted = await s.delete_client(client_id)
            if deleted:  # its users' authorizations end with it
                await s.revoke_grants_of("client_id", client_id, int(clock.now() * 1000))
        if not deleted:
            raise UnknownClientError(MSG_UNKNOWN_CLIENT.format(value=quote_value(client_id)))

    async def verify_secret(self, client_id: str, secret: str) -> Client | None:
        """The client if `secret` is its secret, else None (unknown client, a client without a
        secret, a wrong secret): one hash and one constant-time comparison in every case."""
        async with self.store.read() as s:
            stored = await s.client(client_id)
        ok = secret_matches(None if stored is None else stored.secret_hash, secret)
        return _public(stored) if ok and stored is not None else None
