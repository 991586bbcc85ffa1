"""Compact JWS parsing for JWTs (RFC 7515 §3.1 and §7.1, RFC 7519 §7.2), bounded and strict.

`parse_jwt` splits a token into its three segments, base64url-decodes them (RFC 7515 §2: no
padding, URL-safe alphabet only), JSON-decodes the JOSE header and the claims set, and checks the
header's `alg` against the algorithms this package implements (`none` is never one: RFC 8725
§3.1). It verifies nothing: `fhirgate.tokens.verify.verify_signature` does that with a key whose
type decides which algorithms may be used.

Header members that point at keys (`jku`, `x5u`, `jwk`, `x5c`: RFC 7515 §4.1.2-4.1.6) are kept as
data and never fetched or trusted (RFC 8725 §3.10); a `crit` member listing anything (this package
understands no extension) makes the token unacceptable (RFC 7515 §4.1.11).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Collection
from typing import Any, NoReturn

import orjson

from fhirgate.tokens.errors import MalformedTokenError

__all__ = [
    "ALGORITHMS",
    "MAX_HEADER_LENGTH",
    "MAX_TOKEN_LENGTH",
    "ParsedJWT",
    "b64url_decode",
    "b64url_encode",
    "parse_jwt",
]

#: Every JWS algorithm this package verifies (RFC 7518 §3.1, RFC 8037 §3.1). `none` is not one.
ALGORITHMS: frozenset[str] = frozenset(
    {
        "HS256",
        "HS384",
        "HS512",
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
        "ES256",
        "ES384",
        "ES512",
        "EdDSA",
    }
)

#: Longest token accepted, in characters (bounded memory and CPU before any decoding).
MAX_TOKEN_LENGTH = 8192
#: Longest encoded JOSE header accepted, in characters.
MAX_HEADER_LENGTH = 2048

_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def b64url_decode(segment: str) -> bytes:
    """Decode unpadded base64url (RFC 7515 §2, Appendix C). Raises `ValueError` on any character
    outside the URL-safe alphabet (padding included) and on impossible lengths."""
    if _B64URL.fullmatch(segment) is None or len(segment) % 4 == 1:
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except binascii.Error as exc:  # pragma: no cover - excluded by the checks above
        raise ValueError("not base64url") from exc


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class ParsedJWT:
    """A decoded, not yet verified, compact JWS whose payload is a JWT claims set. Treat it and
    its dicts as read-only (headers are shared between tokens through a cache)."""

    __slots__ = ("claims", "header", "signature", "signing_input", "token")

    def __init__(
        self,
        token: str,
        header: dict[str, Any],
        claims: dict[str, Any],
        signing_input: bytes,
        signature: bytes,
    ) -> None:
        self.token = token
        self.header = header
        self.claims = claims
        #: ASCII(BASE64URL(header) || '.' || BASE64URL(payload)), RFC 7515 §5.2 step 8.
        self.signing_input = signing_input
        self.signature = signature

    def __repr__(self) -> str:
        return f"<ParsedJWT alg={self.header.get('alg')!r} claims={sorted(self.claims)}>"

    @property
    def alg(self) -> str:
        alg: str = self.header["alg"]
        return alg

    @property
    def kid(self) -> str | None:
        """The `kid` header member if it is a string (an opaque lookup key, RFC 7515 §4.1.4)."""
        kid = self.header.get("kid")
        return kid if isinstance(kid, str) else None


#: Three base64url segments (RFC 7515 §7.1); anything else takes the slow path that says what
#: is wrong.
_SHAPE = re.compile(r"([A-Za-z0-9_-]*)\.([A-Za-z0-9_-]*)\.([A-Za-z0-9_-]*)")
_TO_STD = bytes.maketrans(b"-_", b"+/")
_PAD = ("", "", "==", "=")

# Decoded JOSE headers by their encoded segment: an issuer sends the same few headers again and
# again. Bounded; values are treated as read-only.
_HEADER_CACHE: dict[str, Any] = {}
_HEADER_CACHE_SIZE = 1024


_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# Bits of the last character that carry no data, by length % 4 (RFC 4648 §3.5: must be zero).
_SPARE_BITS = (0, 0, 0b1111, 0b11)
_INDEX = {c: i for i, c in enumerate(_ALPHABET)}


def _canonical(segment: str) -> bool:
    """RFC 4648 §3.5 canonical encoding: the unused low bits of the last character are zero, so
    one signature has exactly one textual form (no malleable tokens)."""
    spare = _SPARE_BITS[len(segment) % 4]
    return not spare or not _INDEX[segment[-1]] & spare


def _fast_b64(segment: str) -> bytes:
    # Only for segments already matched by _SHAPE: the alphabet is right, the length may not be.
    return binascii.a2b_base64((segment + _PAD[len(segment) % 4]).encode("ascii").translate(_TO_STD))


def parse_jwt(
    token: str,
    *,
    max_length: int = MAX_TOKEN_LENGTH,
    max_header_length: int = MAX_HEADER_LENGTH,
    algorithms: Collection[str] = ALGORITHMS,
    understood_crit: Collection[str] = (),
) -> ParsedJWT:
    """Parse a compact-serialized JWT without verifying it. Raises `MalformedTokenError`.

    The checks run in the order Kong's `jwt_parser.lua` reports them (both JSON segments, then
    `alg`, then the claims' type, then the signature's encoding) so callers can keep Kong's
    messages. JSON is decoded with orjson: strict RFC 8259 (no NaN, valid UTF-8 only).
    """
    if len(token) > max_length:
        raise MalformedTokenError("token_too_large", f"token longer than {max_length} characters")
    shape = _SHAPE.fullmatch(token)
    if shape is None:
        _diagnose(token, max_header_length, algorithms, understood_crit)
    header_b64, payload_b64, signature_b64 = shape.groups()
    if len(header_b64) > max_header_length:
        raise MalformedTokenError("header_too_large", f"JOSE header longer than {max_header_length}")
    header = _HEADER_CACHE.get(header_b64)
    if header is None:
        try:
            header = orjson.loads(_fast_b64(header_b64))
        except (ValueError, binascii.Error):  # orjson.JSONDecodeError is a ValueError
            raise MalformedTokenError("header_json", "JOSE header is not base64url-encoded JSON") from None
        if type(header) is dict:
            if len(_HEADER_CACHE) >= _HEADER_CACHE_SIZE:
                _HEADER_CACHE.clear()
            _HEADER_CACHE[header_b64] = header
    try:
        claims = orjson.loads(_fast_b64(payload_b64))
    except (ValueError, binascii.Error):
        raise MalformedTokenError("payload_json", "payload is not base64url-encoded JSON") from None
    _check_header(header, algorithms, understood_crit)
    if type(claims) is not dict:
        raise MalformedTokenError("claims_not_object", "the JWT claims set is not a JSON object")
    try:
        signature = _fast_b64(signature_b64)
    except binascii.Error:
        raise MalformedTokenError("signature_encoding", "signature is not base64url") from None
    if not _canonical(signature_b64):
        raise MalformedTokenError("signature_encoding", "signature is not canonical base64url")
    signing_input = token[: len(header_b64) + len(payload_b64) + 1].encode("ascii")
    return ParsedJWT(token, header, claims, signing_input, signature)


def _check_header(header: Any, algorithms: Collection[str], understood_crit: Collection[str]) -> None:
    if type(header) is not dict:
        raise MalformedTokenError("header_json", "JOSE header is not a JSON object")
    alg = header.get("alg")
    if type(alg) is not str or alg not in algorithms:
        raise MalformedTokenError("alg_invalid", "missing, unknown or disallowed 'alg'")
    if "crit" in header:
        _check_crit(header["crit"], understood_crit)


def _decode_json(segment: str) -> Any:
    return orjson.loads(b64url_decode(segment))


def _diagnose(
    token: str, max_header_length: int, algorithms: Collection[str], understood_crit: Collection[str]
) -> NoReturn:
    """The slow path for a token that is not three base64url segments: find and raise the first
    problem in Kong's order."""
    parts = token.split(".", 2)
    if len(parts) < 3:
        raise MalformedTokenError("truncated", "a JWS has three dot-separated segments")
    if len(parts[0]) > max_header_length:
        raise MalformedTokenError("header_too_large", f"JOSE header longer than {max_header_length}")
    try:
        header = _decode_json(parts[0])
    except ValueError:
        raise MalformedTokenError("header_json", "JOSE header is not base64url-encoded JSON") from None
    try:
        claims = _decode_json(parts[1])
    except ValueError:
        raise MalformedTokenError("payload_json", "payload is not base64url-encoded JSON") from None
    _check_header(header, algorithms, understood_crit)
    if type(claims) is not dict:
        raise MalformedTokenError("claims_not_object", "the JWT claims set is not a JSON object")
    if "." in parts[2]:
        raise MalformedTokenError("extra_segments", "more than three segments (JWE is not accepted)")
    raise MalformedTokenError("signature_encoding", "signature is not base64url")


def _check_crit(crit: Any, understood: Collection[str]) -> None:
    """RFC 7515 §4.1.11: a non-empty array of names, none of them defined by RFC 7515/7518, each
    understood by the recipient; otherwise the JWS is invalid."""
    if not isinstance(crit, list) or not crit or not all(isinstance(c, str) for c in crit):
        raise MalformedTokenError("crit_unsupported", "'crit' is not a non-empty array of names")
    unknown = [c for c in crit if c not in understood]
    if unknown:
        raise MalformedTokenError("crit_unsupported", f"unsupported critical header(s): {', '.join(unknown)}")
