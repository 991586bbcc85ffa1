"""Kong's `jwt` plugin (`kong/plugins/jwt/handler.lua`, `jwt_parser.lua`, Kong 3.x), on the
shared verification core `fhirgate.tokens`.

Flow (Kong's `do_authentication`): collect the tokens (query parameters, cookies, the first
occurrence of each configured header as `Bearer <token>`; duplicates collapse), decode, find the
credential named by `key_claim_name` (payload first, then JOSE header), check the token's `alg` is
the credential's, verify the signature, then `claims_to_verify` and `maximum_expiration`. Every
refusal is Kong's status, body and `WWW-Authenticate` (see the MSG_* constants).

Verified tokens are cached (`fhirgate.tokens.cache.VerifiedTokenCache`, keyed by the exact token
string, one cache per plugin instance, so a configuration reload starts empty): a hit skips
parsing, credential lookup and signature verification, and still applies what depends on the
time or the configuration (`claims_to_verify`, `maximum_expiration`) before setting the same
consumer headers. A token whose `jti` is in the revocation set is refused (a fhirgate addition;
Kong has no revocation).

Where Kong is unsafe, this is not (DECISIONS.md, docs/kong-compatibility.md): HMAC tags are
compared in constant time; a malformed token, key or signature is a 401, never a 500; credentials
are parsed and validated once, when the configuration is loaded (an unknown algorithm, or a
public-key algorithm, ES* included, without a parseable `rsa_public_key` refuses the configuration,
naming the consumer and credential); RSA keys under 2048 bits are refused (RFC 7518 §3.3).
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

from fhirgate.config.model import Consumer
from fhirgate.errors import ConfigError, ConfigIssue
from fhirgate.gateway.plugins._auth import authenticate_or_anonymous, set_consumer
from fhirgate.gateway.plugins.base import Plugin
from fhirgate.gateway.plugins.jwt.schema import JwtConfig
from fhirgate.tokens import (
    ClaimError,
    InvalidKeyError,
    MalformedTokenError,
    ParsedJWT,
    TokenError,
    VerificationKey,
    check_exp,
    check_maximum_expiration,
    check_nbf,
    hmac_key,
    parse_jwt,
    public_key_from_pem,
)
from fhirgate.tokens.cache import VerifiedTokenCache

if TYPE_CHECKING:
    from fhirgate.config import GatewayConfig
    from fhirgate.gateway.pdk import PDK

__all__ = ["ALGORITHMS", "Handler", "JwtCredential", "compile_credentials", "validate_jwt_secrets"]

#: Kong's `jwt_secrets.algorithm` values (`kong/plugins/jwt/daos.lua`).
ALGORITHMS: tuple[str, ...] = (
    "HS256",
    "HS384",
    "HS512",
    "RS256",
    "RS384",
    "RS512",
    "ES256",
    "ES384",
    "ES512",
    "PS256",
    "PS384",
    "PS512",
    "EdDSA",
)
DEFAULT_ALGORITHM = "HS256"
CREDENTIALS = "jwt_secrets"

# Kong's messages (handler.lua, jwt_parser.lua).
MSG_UNAUTHORIZED = "Unauthorized"
MSG_MULTIPLE_TOKENS = "Multiple tokens provided"
MSG_BAD_JSON = "Bad token; invalid JSON"
MSG_BAD_ALG = "Bad token; invalid alg"
MSG_BAD_CLAIMS = "Bad token; invalid claims"
MSG_BAD_SIGNATURE_ENCODING = "Bad token; invalid signature"
MSG_NO_KEY_CLAIM = "No mandatory '{claim}' in claims"
MSG_INVALID_KEY_CLAIM = "Invalid '{claim}' in claims"
MSG_NO_CREDENTIALS = "No credentials found for given '{claim}'"
MSG_INVALID_ALGORITHM = "Invalid algorithm"
MSG_INVALID_KEY = "Invalid key/secret"
MSG_INVALID_SIGNATURE = "Invalid signature"
MSG_REVOKED = "Token revoked"  # fhirgate: Kong has no revocation
SHARED_TOKEN = "authenticated_jwt_token"  # noqa: S105 - a kong.ctx.shared key

# parse_jwt's codes -> Kong's "Bad token; ..." messages (jwt_parser.lua `decode_token`).
_PARSE_MESSAGES: Mapping[str, str] = {
    "alg_invalid": MSG_BAD_ALG,
    "crit_unsupported": MSG_BAD_ALG,
    "claims_not_object": MSG_BAD_CLAIMS,
    "signature_encoding": MSG_BAD_SIGNATURE_ENCODING,
    "extra_segments": MSG_BAD_SIGNATURE_ENCODING,
}

# RFC 6750 §2.1 / RFC 7235 §2.1: the scheme is case-insensitive.
# The token group ends on a non-space, so no lazy backtracking over the whole token (14 us -> 0.4 us).
_BEARER = re.compile(r"\s*bearer\s+(\S(?:.*\S)?)\s*", re.IGNORECASE)


@dataclass(frozen=True, slots=True, eq=False)
class JwtCredential:
    """A consumer's `jwt_secrets` entry, validated (what `kong.client.get_credential()` returns)."""

    id: str
    key: str
    algorithm: str
    consumer_id: str
    #: Where it was declared, e.g. ``consumers[0].jwt_secrets[1]``.
    location: str


@dataclass(frozen=True, slots=True)
class _Entry:
    credential: JwtCredential
    consumer: Consumer
    #: None when the credential has no usable secret (Kong: "Invalid key/secret").
    key: VerificationKey | None


def _decode_base64(value: str) -> bytes | None:
    """Kong's `base64_decode`: standard or URL-safe alphabet, padding optional."""
    value = value.strip()
    try:
        return base64.b64decode(
            value.replace("-", "+").replace("_", "/") + "=" * (-len(value) % 4), validate=True
        )
    except (binascii.Error, ValueError):
        return None


def _who(consumer: Consumer, key: object) -> str:
    name = consumer.username or consumer.custom_id or consumer.id
    return f"consumer '{name}', credential '{key}'"


def compile_credentials(
    consumers: Sequence[Consumer], secret_is_base64: bool = False
) -> tuple[dict[str, _Entry], list[ConfigIssue]]:
    """Every consumer's `jwt_secrets`, parsed once: the index by `key`, and the problems that make
    the configuration unusable (each located at ``consumers[i].jwt_secrets[j].<field>``)."""
    index: dict[str, _Entry] = {}
    issues: list[ConfigIssue] = []
    for i, consumer in enumerate(consumers):
        for j, raw in enumerate(consumer.credentials.get(CREDENTIALS, ())):
            loc = f"consumers[{i}].{CREDENTIALS}[{j}]"
            entry = _compile_one(consumer, raw, loc, secret_is_base64, issues)
            if entry is None:
                continue
            first = index.get(entry.credential.key)
            if first is not None:
                issues.append(
                    ConfigIssue(
                        f"{loc}.key",
                        f"{_who(consumer, entry.credential.key)}: duplicate key "
                        f"(first at {first.credential.location}); keys are unique across consumers",
                    )
                )
                continue
            index[entry.credential.key] = entry
    return index, issues


def _compile_one(
    consumer: Consumer,
    raw: Mapping[str, Any],
    loc: str,
    secret_is_base64: bool,
    issues: list[ConfigIssue],
) -> _Entry | None:
    key_value = raw.get("key")
    algorithm = raw.get("algorithm") or DEFAULT_ALGORITHM
    who = _who(consumer, key_value)
    if algorithm not in ALGORITHMS:
        issues.append(ConfigIssue(f"{loc}.algorithm", f"{who}: expected one of: {', '.join(ALGORITHMS)}"))
        return None
    if key_value is None:
        return None  # Kong generates a random key nobody knows: the credential can never match
    if not isinstance(key_value, str) or not key_value:
        issues.append(ConfigIssue(f"{loc}.key", f"{who}: expected a non-empty string"))
        return None
    key: VerificationKey | None = None
    if algorithm.startswith("HS"):
        secret = raw.get("secret")
        if secret is not None and not isinstance(secret, str):
            issues.append(ConfigIssue(f"{loc}.secret", f"{who}: expected a string"))
            return None
        if isinstance(secret, str) and secret:
            material = _decode_base64(secret) if secret_is_base64 else secret.encode()
            if material:
                try:
                    key = hmac_key(material, [algorithm])
                except InvalidKeyError as exc:
                    if not secret_is_base64:
                        issues.append(ConfigIssue(f"{loc}.secret", f"{who}: {exc.message}"))
                        return None
    else:
        pem = raw.get("rsa_public_key")
        if not isinstance(pem, str) or not pem.strip():
            issues.append(
                ConfigIssue(
                    f"{loc}.rsa_public_key",
                    f"{who}: required field missing (algorithm {algorithm} needs a PEM public key)",
                )
            )
            return None
        try:
            key = public_key_from_pem(pem, [algorithm])
        except InvalidKeyError as exc:
            issues.append(
                ConfigIssue(f"{loc}.rsa_public_key", f"{who}: invalid key for {algorithm}: {exc.message}")
            )
            return None
    raw_id = raw.get("id")
    cred_id = (
        raw_id
        if isinstance(raw_id, str) and raw_id
        else str(uuid.uuid5(uuid.NAMESPACE_URL, f"jwt:{key_value}"))
    )
    credential = JwtCredential(cred_id, key_value, algorithm, consumer.id, loc)
    return _Entry(credential, consumer, key)


def validate_jwt_secrets(consumers: Sequence[Consumer]) -> list[ConfigIssue]:
    """The load-time problems of every `jwt_secrets` credential (for the configuration loader)."""
    return compile_credentials(consumers)[1]


class Handler(Plugin):
    name: ClassVar[str] = "jwt"
    priority: ClassVar[int] = 1450
    version: ClassVar[str] = "3.10.0"
    Config: ClassVar[type[JwtConfig]] = JwtConfig
    no_consumer: ClassVar[bool] = True
    description: ClassVar[str] = "Verify JWTs signed with consumers' jwt_secrets (Kong's jwt plugin)."

    config: JwtConfig

    #: Entries of the verified-token cache of each instance (0 disables it).
    token_cache_size: ClassVar[int] = 10_000

    def __init__(self, config: JwtConfig, instance_id: str = "") -> None:
        super().__init__(config, instance_id)
        self._credentials: dict[str, _Entry] = {}
        #: Verified tokens -> (credential entry, claims); new with every instance, so with every
        #: configuration (keys, credentials, consumers): nothing survives a reload.
        self.token_cache: VerifiedTokenCache[tuple[_Entry, dict[str, Any]]] = VerifiedTokenCache(
            self.token_cache_size
        )
        base = f'Bearer realm="{config.realm}"' if config.realm is not None else "Bearer"
        self._www_base = {"WWW-Authenticate": base}
        # Kong appends ' error="invalid_token"'; RFC 7235 §2.1 separates auth-params with a comma.
        self._www_error = {
            "WWW-Authenticate": f'{base}, error="invalid_token"'
            if config.realm is not None
            else f'{base} error="invalid_token"'
        }
        self._claim = config.key_claim_name
        self._messages = {
            "no_key": MSG_NO_KEY_CLAIM.format(claim=self._claim),
            "bad_key": MSG_INVALID_KEY_CLAIM.format(claim=self._claim),
            "no_credentials": MSG_NO_CREDENTIALS.format(claim=self._claim),
        }
        self._verify_claims = tuple(config.claims_to_verify or ())
        self._cookie_names = tuple(config.cookie_names)
        self._header_names = tuple(config.header_names)
        self._uri_param_names = tuple(config.uri_param_names)

    def bind_config(self, config: GatewayConfig) -> None:
        index, issues = compile_credentials(config.consumers, self.config.secret_is_base64)
        if issues:
            raise ConfigError(issues, source=config.source)
        self._credentials = index
        self.token_cache.clear()

    # -- access ---------------------------------------------------------------------------------

    def access(self, kong: PDK) -> None:
        if not self.config.run_on_preflight and kong.request.get_method() == "OPTIONS":
            return
        authenticate_or_anonymous(kong, self.config.anonymous, lambda: self._authenticate(kong))

    def _refuse(self, kong: PDK, body: Any, www: Mapping[str, str] | None = None) -> NoReturn:
        kong.response.exit(401, body, www if www is not None else self._www_error, fhir_code="login")

    def _collect(self, kong: PDK) -> set[str]:
        """Kong's `retrieve_tokens`: query parameters (every value), cookies, then the first
        occurrence of each configured header that carries `Bearer <token>`."""
        found: set[str] = set()
        request = kong.request
        if self._uri_param_names and request.get_raw_query():
            args = request.get_query()
            for name in self._uri_param_names:
                found.update(v for v in args.get(name, ()) if v)
        if self._cookie_names:
            cookies = _cookies(request.get_headers().get("cookie", ()))
            for name in self._cookie_names:
                value = cookies.get(name)
                if value:
                    found.add(value)
        for name in self._header_names:
            value = request.get_header(name)
            if value:
                match = _BEARER.fullmatch(value)
                if match is not None:
                    found.add(match.group(1))
        return found

    def _authenticate(self, kong: PDK) -> None:
        tokens = self._collect(kong)
        if not tokens:
            self._refuse(kong, {"message": MSG_UNAUTHORIZED}, self._www_base)
        if len(tokens) > 1:
            self._refuse(kong, {"message": MSG_MULTIPLE_TOKENS})
        token = tokens.pop()
        cache = self.token_cache
        cached = cache.get(token)
        if cached is not None:
            # Verified before with this configuration: only what depends on the time or the
            # configuration is checked again (the cache already refused an expired token).
            entry, claims = cached
            self._check_claims(kong, claims)
            set_consumer(kong, entry.consumer, entry.credential, identifier=entry.credential.key)
            kong.ctx.shared[SHARED_TOKEN] = token
            return
        try:
            jwt = parse_jwt(token)
        except MalformedTokenError as exc:
            self._refuse(kong, {"message": _PARSE_MESSAGES.get(exc.code, MSG_BAD_JSON)})
        entry = self._credential(kong, jwt)
        if jwt.header["alg"] != entry.credential.algorithm:
            self._refuse(kong, {"message": MSG_INVALID_ALGORITHM})
        if entry.key is None:
            self._refuse(kong, {"message": MSG_INVALID_KEY})
        try:
            ok = entry.key.verify(jwt.header["alg"], jwt.signing_input, jwt.signature)
        except TokenError:
            ok = False
        if not ok:
            self._refuse(kong, {"message": MSG_INVALID_SIGNATURE})
        claims = jwt.claims
        self._check_claims(kong, claims)
        if cache.is_revoked(claims):
            self._refuse(kong, {"message": MSG_REVOKED})
        cache.put(token, (entry, claims), claims)
        set_consumer(kong, entry.consumer, entry.credential, identifier=entry.credential.key)
        kong.ctx.shared[SHARED_TOKEN] = token

    def _credential(self, kong: PDK, jwt: ParsedJWT) -> _Entry:
        claim = self._claim
        value = jwt.claims.get(claim)
        if value is None or value is False:  # Lua's `claims[k] or header[k]`
            value = jwt.header.get(claim)
        if value is None or value is False:
            self._refuse(kong, {"message": self._messages["no_key"]})
        if not isinstance(value, str) or not value:
            # Kong: "" is invalid; a number or an array would make Kong fail with a 500.
            self._refuse(kong, {"message": self._messages["bad_key"]})
        entry = self._credentials.get(value)
        if entry is None:
            self._refuse(kong, {"message": self._messages["no_credentials"]})
        return entry

    def _check_claims(self, kong: PDK, claims: Mapping[str, Any]) -> None:
        """Kong's `verify_registered_claims` (every listed claim, errors collected into a map),
        then `check_maximum_expiration`. No leeway, as in Kong."""
        errors: dict[str, str] = {}
        for name in self._verify_claims:
            try:
                if name == "exp":
                    check_exp(claims)
                else:
                    check_nbf(claims, required=True)
            except ClaimError as exc:
                errors[name] = exc.message
        if errors:
            self._refuse(kong, errors)
        maximum = self.config.maximum_expiration
        if maximum > 0:
            try:
                check_maximum_expiration(claims, maximum)
            except ClaimError as exc:
                self._refuse(kong, {"exp": exc.message})


def _cookies(headers: Sequence[str]) -> dict[str, str]:
    """Cookie pairs (RFC 6265 §5.4 `cookie-string`), first occurrence of a name wins (nginx's
    `$cookie_<name>`)."""
    out: dict[str, str] = {}
    for header in headers:
        for part in header.split(";"):
            name, sep, value = part.strip().partition("=")
            if sep and name not in out:
                out[name] = value.strip()
    return out
