"""JWT claim checks (RFC 7519 §4.1), each a separate function raising `ClaimError`.

Time comes from `fhirgate.clock` unless `now` is given; `leeway` (seconds) absorbs clock skew
(RFC 7519 §4.1.4/§4.1.5 "some small leeway"). The messages for `exp` and `nbf` are Kong's
(`kong/plugins/jwt/jwt_parser.lua`, `registered_claims`), so the `jwt` plugin can show them as is.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from functools import lru_cache
from typing import Any

from fhirgate import clock
from fhirgate.tokens.errors import ClaimError

__all__ = [
    "DEFAULT_TYP",
    "check_aud",
    "check_exp",
    "check_iat",
    "check_iss",
    "check_maximum_expiration",
    "check_nbf",
    "check_typ",
    "is_number",
]

MSG_NOT_A_NUMBER = "must be a number"
MSG_EXPIRED = "token expired"
MSG_NOT_YET_VALID = "token not valid yet"
MSG_EXCEEDS_MAXIMUM = "exceeds maximum allowed expiration"

#: `typ` values accepted by default for access tokens (DECISIONS.md: `at+jwt`, `JWT` or none;
#: RFC 9068 §2.1, RFC 7519 §5.1), compared after normalisation (see `check_typ`).
DEFAULT_TYP: frozenset[str | None] = frozenset({"at+jwt", "jwt", None})


def is_number(value: Any) -> bool:
    """A JSON number usable as a NumericDate (RFC 7519 §2): int or float, not bool, finite."""
    t = type(value)
    return t is int or (t is float and math.isfinite(value))


def _numeric(claims: Mapping[str, Any], name: str, required: bool) -> float | None:
    value: Any = claims.get(name)
    if value is None and not required and name not in claims:
        return None
    if not is_number(value):
        raise ClaimError(name, "not_a_number" if name in claims else "missing", MSG_NOT_A_NUMBER)
    number: float = value
    return number


def check_exp(
    claims: Mapping[str, Any], *, now: float | None = None, leeway: float = 0, required: bool = True
) -> None:
    """RFC 7519 §4.1.4: the token is expired when `exp` <= now - leeway."""
    exp = _numeric(claims, "exp", required)
    if exp is not None and exp <= (clock.now() if now is None else now) - leeway:
        raise ClaimError("exp", "expired", MSG_EXPIRED)


def check_nbf(
    claims: Mapping[str, Any], *, now: float | None = None, leeway: float = 0, required: bool = False
) -> None:
    """RFC 7519 §4.1.5: the token is not valid yet when `nbf` > now + leeway."""
    nbf = _numeric(claims, "nbf", required)
    if nbf is not None and nbf > (clock.now() if now is None else now) + leeway:
        raise ClaimError("nbf", "not_yet_valid", MSG_NOT_YET_VALID)


def check_iat(
    claims: Mapping[str, Any],
    *,
    now: float | None = None,
    leeway: float = 0,
    max_age: float | None = None,
    required: bool = False,
) -> None:
    """RFC 7519 §4.1.6: `iat` must be a number, not in the future (beyond leeway), and, with
    `max_age`, not older than that."""
    iat = _numeric(claims, "iat", required)
    if iat is None:
        return
    current = clock.now() if now is None else now
    if iat > current + leeway:
        raise ClaimError("iat", "issued_in_future", "token issued in the future")
    if max_age is not None and current - iat > max_age + leeway:
        raise ClaimError("iat", "too_old", "token too old")


def check_maximum_expiration(claims: Mapping[str, Any], maximum: float, *, now: float | None = None) -> None:
    """Kong's `check_maximum_expiration`: `exp` present and at most `maximum` seconds ahead."""
    exp: Any = claims.get("exp")
    current = clock.now() if now is None else now
    if not is_number(exp) or exp - current > maximum:
        raise ClaimError("exp", "exceeds_maximum", MSG_EXCEEDS_MAXIMUM)


def check_iss(claims: Mapping[str, Any], issuers: str | Collection[str]) -> None:
    """RFC 7519 §4.1.1: `iss` compared exactly (case-sensitive, no normalisation) with the
    expected issuer or one of the allowed issuers."""
    iss = claims.get("iss")
    if iss is None:
        raise ClaimError("iss", "missing", "no 'iss' claim")
    if not isinstance(iss, str):
        raise ClaimError("iss", "not_a_string", "'iss' is not a string")
    if iss != issuers if isinstance(issuers, str) else iss not in issuers:
        raise ClaimError("iss", "issuer_mismatch", "token issued by an unexpected issuer")


def check_aud(claims: Mapping[str, Any], audiences: str | Collection[str]) -> None:
    """RFC 7519 §4.1.3: `aud` is a string or an array of strings; one of them must be an accepted
    audience (exact comparison)."""
    aud = claims.get("aud")
    if type(aud) is str and (aud == audiences if type(audiences) is str else aud in audiences):
        return  # the common case, without building anything
    if aud is None:
        raise ClaimError("aud", "missing", "no 'aud' claim")
    accepted = {audiences} if isinstance(audiences, str) else audiences
    values = [aud] if isinstance(aud, str) else aud
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ClaimError("aud", "not_a_string", "'aud' is neither a string nor an array of strings")
    if not any(v in accepted for v in values):
        raise ClaimError("aud", "audience_mismatch", "token not intended for this audience")


@lru_cache(maxsize=64)
def _normal_typ(typ: str) -> str:
    # RFC 7515 §4.1.9: a media type, compared case-insensitively; "application/" may be omitted.
    typ = typ.lower()
    return typ[12:] if typ.startswith("application/") else typ


def check_typ(header: Mapping[str, Any], allowed: Collection[str | None] = DEFAULT_TYP) -> None:
    """The JOSE `typ` policy (RFC 8725 §3.11, RFC 9068 §4): `allowed` lists normalised values
    (`at+jwt`, `jwt`, ...); `None` in it accepts a token without `typ`."""
    typ = header.get("typ")
    if typ is None:
        if None in allowed:
            return
        raise ClaimError("typ", "typ_not_allowed", "token has no 'typ'")
    if not isinstance(typ, str):
        raise ClaimError("typ", "typ_not_allowed", "'typ' is not a string")
    normal = _normal_typ(typ)
    if not any(a is not None and _normal_typ(a) == normal for a in allowed):
        raise ClaimError("typ", "typ_not_allowed", f"token type '{typ}' is not accepted")
