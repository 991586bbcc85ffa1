"""Signature verification, then claims (RFC 7515 §5.2, RFC 7519 §7.2, RFC 8725 §3).

`verify_signature` is the hot path: one dict lookup for the key's verifier of the token's `alg`
(refused if the key does not allow it), one `cryptography` call. `verify_jwt` chains parsing,
signature and the usual claim checks for callers that hold one key.
"""

from __future__ import annotations

from collections.abc import Collection

from fhirgate import clock
from fhirgate.tokens.claims import (
    DEFAULT_TYP,
    check_aud,
    check_exp,
    check_iat,
    check_iss,
    check_nbf,
    check_typ,
)
from fhirgate.tokens.errors import SignatureError
from fhirgate.tokens.jws import MAX_TOKEN_LENGTH, ParsedJWT, parse_jwt
from fhirgate.tokens.keys import VerificationKey

__all__ = ["verify_jwt", "verify_signature"]


def verify_signature(jwt: ParsedJWT, key: VerificationKey) -> None:
    """Check `jwt`'s signature with `key`. The algorithm must be one the key allows
    (`AlgorithmNotAllowedError`); a mismatch raises `SignatureError`."""
    if not key.verify(jwt.header["alg"], jwt.signing_input, jwt.signature):
        raise SignatureError("bad_signature", "signature verification failed")


def verify_jwt(
    token: str,
    key: VerificationKey,
    *,
    issuer: str | Collection[str] | None = None,
    audience: str | Collection[str] | None = None,
    leeway: float = 0,
    require_exp: bool = True,
    typ: Collection[str | None] | None = DEFAULT_TYP,
    now: float | None = None,
    max_length: int = MAX_TOKEN_LENGTH,
) -> ParsedJWT:
    """Parse `token`, verify its signature with `key`, then check `typ` (unless `typ` is None),
    `exp` (required unless `require_exp` is false), `nbf`, `iat`, and `iss` / `aud` when given.
    Returns the parsed token; raises a `TokenError` subclass."""
    jwt = parse_jwt(token, max_length=max_length)
    verify_signature(jwt, key)
    if typ is not None:
        check_typ(jwt.header, typ)
    claims = jwt.claims
    current = clock.now() if now is None else now
    check_exp(claims, now=current, leeway=leeway, required=require_exp)
    check_nbf(claims, now=current, leeway=leeway)
    check_iat(claims, now=current, leeway=leeway)
    if issuer is not None:
        check_iss(claims, issuer)
    if audience is not None:
        check_aud(claims, audience)
    return jwt
