"""Recognising this server's own access tokens (for `/introspect`, `/revoke` and `/userinfo`).

An access token is ours when it is an RFC 9068 JWT (`typ: at+jwt`) whose header `alg` and `kid`
name a key this server publishes in `/jwks` (a retired key too, while its tokens may live), whose
signature verifies with that key and its own algorithm only (no `alg: none`, no HS256 keyed with
a public key), and whose `iss`, `aud`, `client_id`, `jti` and `exp` are this server's and well
formed. Its state then comes from the store: revoked by `jti`, or with its whole family.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from fhirgate import clock
from fhirgate.authserver.keys import ALGORITHMS, KeyRing
from fhirgate.authserver.store import AuthStore

if TYPE_CHECKING:
    from fhirgate.authserver.oauth import OAuthClient, ServerConfig

__all__ = ["MAX_TOKEN_CHARS", "AccessToken", "inspect_access_token"]

MAX_TOKEN_CHARS = 8192


@dataclass(frozen=True, slots=True)
class AccessToken:
    """One of our access tokens, signature verified (`claims`); `revoked` by jti or family."""

    claims: Mapping[str, Any]
    expired: bool
    revoked: bool
    family: str | None = None

    @property
    def client_id(self) -> str:
        return str(self.claims["client_id"])

    @property
    def jti(self) -> str:
        return str(self.claims["jti"])

    @property
    def active(self) -> bool:
        return not self.expired and not self.revoked

    @property
    def problem(self) -> str | None:
        """Why the token may not be used (None when it may)."""
        if self.revoked:
            return "the access token was revoked"
        if self.expired:
            return "the access token has expired"
        return None

    def check_client(self, client: OAuthClient) -> bool:
        return bool(hmac.compare_digest(client.client_id.encode(), self.client_id.encode()))

    def introspection(self) -> dict[str, Any]:
        """RFC 7662 §2.2 members of an active token."""
        c = self.claims
        out: dict[str, Any] = {"active": True}
        for name in ("scope", "client_id", "sub", "exp", "iat", "iss", "aud"):
            if name in c:
                out[name] = c[name]
        out["token_type"] = "Bearer"  # noqa: S105 - RFC 7662 §2.2
        out["jti"] = c["jti"]
        for name in ("patient", "encounter", "fhirUser"):
            if c.get(name):
                out[name] = c[name]
        return out


def _b64json(segment: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


async def verified_claims(ring: KeyRing, config: ServerConfig, token: str) -> dict[str, Any] | None:
    """The claims of `token` if it is an access token this server signed, else None."""
    if not token or len(token) > MAX_TOKEN_CHARS or token.count(".") != 2:
        return None
    try:
        header = _b64json(token.split(".", 1)[0])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    alg, kid = header.get("alg"), header.get("kid")
    if alg not in ALGORITHMS or not isinstance(kid, str) or header.get("typ") != "at+jwt":
        return None
    jwks = await ring.jwks(config.access_token_lifetime)
    published = [k for k in jwks["keys"] if k.get("kid") == kid and k.get("alg") == alg]
    if len(published) != 1:
        return None
    try:
        key = KeySet.import_key_set({"keys": published}).keys[0]
        claims = dict(jwt.decode(token, key, algorithms=[str(alg)]).claims)
    except (JoseError, ValueError, TypeError):
        return None
    aud = claims.get("aud")
    audiences = aud if isinstance(aud, list) else [aud]
    if (
        claims.get("iss") != config.issuer
        or config.fhir_base not in audiences
        or not isinstance(claims.get("client_id"), str)
        or not isinstance(claims.get("jti"), str)
        or not _is_number(claims.get("exp"))
    ):
        return None
    return claims


async def inspect_access_token(
    store: AuthStore, ring: KeyRing, config: ServerConfig, token: str
) -> AccessToken | None:
    """`token` as one of our access tokens with its state, or None when it is not ours."""
    claims = await verified_claims(ring, config, token)
    if claims is None:
        return None
    expired = claims["exp"] <= clock.now()
    async with store.read() as s:
        status = await s.access_token_status(str(claims["jti"]))
    revoked, family = False, None
    if status is not None:
        token_revoked, family, family_revoked = status
        revoked = token_revoked is not None or family_revoked is not None
    return AccessToken(claims, expired, revoked, family)
