"""JSON Web Keys (RFC 7517) and JWK Sets: public RSA, EC and OKP keys parsed into `cryptography`
objects, and written out as SubjectPublicKeyInfo PEM (RFC 7468), the form Kong's `jwt_secrets`
`rsa_public_key` takes.

Used by `fhirgate jwks-to-pem` and by the token-verification core (the `openid-connect` plugin's
JWKS). The document is never trusted:

- every member is type-checked; base64url is strict (RFC 7515 §2: URL-safe alphabet, no padding,
  canonical trailing bits); sizes are exact where the RFCs fix them (EC coordinates, OKP keys) and
  bounded where they do not (RSA modulus 2048..16384 bits, RFC 7518 §3.3);
- an EC point must lie on its curve (checked by `cryptography`);
- private members (`d`, `p`, `q`, `dp`, `dq`, `qi`, `oth`, and `k` of symmetric keys) are reported
  and never read, so a parsed key can only ever hold public material;
- in a JWK Set, a key that cannot be used is skipped and reported, not fatal (RFC 7517 §5:
  "implementations SHOULD ignore JWKs within a JWK Set that use kty values that are not understood
  by them, that are missing required members, or for which values are out of the supported ranges");
- duplicate JSON member names are refused (two different `n` would make the key ambiguous).

Whether a key may verify a token is the caller's decision; `Jwk.for_signatures` and
`Jwk.algorithms` give the facts (`use: enc` and `key_ops` without `verify` exclude a key; the
algorithm comes from the key, never from the token, RFC 8725 §3.1).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fhirgate.errors import FhirgateError
from fhirgate.tokens.keys import MIN_RSA_BITS

__all__ = [
    "PRIVATE_MEMBERS",
    "SUPPORTED_KEY_TYPES",
    "InvalidJwkError",
    "Jwk",
    "JwkError",
    "JwkSet",
    "JwksFormatError",
    "PublicKey",
    "SkippedKey",
    "UnsupportedJwkError",
    "describe",
    "parse_jwk",
    "parse_jwks",
    "private_members",
    "to_pem",
]

#: What a parsed key holds: only public key objects, never private ones.
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey

SUPPORTED_KEY_TYPES = ("RSA", "EC", "OKP")

#: Members that carry private key material (RFC 7518 §6.2.2, §6.3.2, §6.4.1; RFC 8037 §2), in the
#: order they are reported. Any of them, in any key type, is reported and ignored.
PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")

# RSA: RFC 7518 §3.3 requires at least 2048 bits (MIN_RSA_BITS, shared with the verification
# core); the upper bound keeps verification cost bounded.
RSA_MAX_BITS = 16384
# OpenSSL refuses public exponents over 64 bits for large moduli; real keys use 65537.
RSA_MAX_EXPONENT_BYTES = 8
# No legitimate member is longer than a 16384-bit modulus in base64url (2731 characters).
MAX_MEMBER_CHARS = 4096

# crv -> (curve, coordinate size in octets), RFC 7518 §6.2.1.1-§6.2.1.3.
_EC_CURVES: dict[str, tuple[ec.EllipticCurve, int]] = {
    "P-256": (ec.SECP256R1(), 32),
    "P-384": (ec.SECP384R1(), 48),
    "P-521": (ec.SECP521R1(), 66),
}
# crv -> public key size in octets, RFC 8037 §2 (RFC 8032 §5.1.5, §5.2.5).
_OKP_CURVES: dict[str, int] = {"Ed25519": 32, "Ed448": 57}
# OKP curves for key agreement (RFC 8037 §3.2), recognised so the message can say what they are.
_OKP_KEY_AGREEMENT = ("X25519", "X448")

# JWS algorithms each key can verify (RFC 7518 §3.1, RFC 8037 §3.1; the same allow-lists as
# `fhirgate.tokens.keys`). A key's own `alg` narrows this to one; a JWS `alg` of another key type is
# an error; any other `alg` (an encryption one such as RSA-OAEP) leaves the key no signature alg.
_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGS = {"P-256": frozenset({"ES256"}), "P-384": frozenset({"ES384"}), "P-521": frozenset({"ES512"})}
_OKP_ALGS = {"Ed25519": frozenset({"EdDSA"}), "Ed448": frozenset({"EdDSA"})}
_SIGNATURE_ALGS = frozenset().union(_RSA_ALGS, *_EC_ALGS.values(), *_OKP_ALGS.values(), {"ES256K"})

_B64URL = re.compile(r"[A-Za-z0-9_-]+")

# Error messages, one line each: what is wrong and, where it helps, how to fix it. Values taken from
# the document are JSON-quoted (`_q`) before they are formatted in.
MSG_NOT_JSON = 'not JSON ({detail}); a JWKS is a JSON object such as {{"keys": [...]}}'
MSG_DUPLICATE_MEMBER = "duplicate JSON member {name}; a JWK must not repeat a member"
MSG_NOT_OBJECT = 'a JWKS is a JSON object with a "keys" array (RFC 7517 §5), not a JSON {kind}'
MSG_SINGLE_JWK = 'this is a single JWK, not a JWKS; wrap it as {"keys": [ ... ]}'
MSG_DISCOVERY = (
    "this is an OpenID Provider / OAuth server metadata document, not a JWKS; its keys are at jwks_uri {uri}"
)
MSG_NO_KEYS = 'no "keys" member; a JWKS is a JSON object with a "keys" array (RFC 7517 §5)'
MSG_KEYS_NOT_ARRAY = '"keys" must be a JSON array of JWK objects, not a JSON {kind}'
MSG_KEYS_EMPTY = 'the "keys" array is empty: the JWKS holds no key'
MSG_KEY_NOT_OBJECT = "a JWK must be a JSON object, not a JSON {kind}"
MSG_MISSING = 'missing member "{name}" (required for kty {kty})'
MSG_NOT_STRING = 'member "{name}" must be a string, not a JSON {kind}'
MSG_KEY_OPS = '"key_ops" must be an array of distinct strings (RFC 7517 §4.3)'
MSG_NO_KTY = 'missing member "kty" (RFC 7517 §4.1); expected one of RSA, EC, OKP'
MSG_OCT = (
    'kty "oct" is a symmetric (shared-secret) key: it has no public part and no PEM form; '
    "for HS256/HS384/HS512 put the secret in a jwt_secrets credential's `secret` instead"
)
MSG_UNSUPPORTED_KTY = "unsupported kty {kty}; fhirgate reads RSA, EC and OKP public keys"
MSG_UNKNOWN_CRV = "unsupported crv {crv} for kty {kty}; expected one of {expected}"
MSG_KEY_AGREEMENT_CRV = (
    "crv {crv} is a key-agreement (encryption) curve, not a signature key; expected Ed25519 or Ed448"
)
MSG_B64_TYPE = 'member "{name}" must be a base64url string, not a JSON {kind}'
MSG_B64_EMPTY = 'member "{name}" is empty'
MSG_B64_LONG = 'member "{name}" is {length} characters long, more than any key needs ({limit})'
MSG_B64_PADDED = 'member "{name}" has "=" padding; base64url in JOSE has no padding (RFC 7515 §2)'
MSG_B64_ALPHABET = (
    'member "{name}" is not base64url: only A-Z a-z 0-9 "-" "_" are allowed (RFC 7515 §2; '
    'standard base64 "+" and "/" are not)'
)
MSG_B64_BAD = 'member "{name}" is not valid base64url ({detail})'
MSG_RSA_SMALL = "RSA modulus is {bits} bits; at least {limit} are required (RFC 7518 §3.3)"
MSG_RSA_LARGE = "RSA modulus is {bits} bits; fhirgate accepts at most {limit}"
MSG_RSA_EVEN = "RSA modulus is even, so it is not an RSA modulus"
MSG_RSA_EXPONENT = "RSA public exponent e={detail} is invalid: it must be odd, at least 3 and below n"
MSG_RSA_EXPONENT_LONG = (
    'member "e" is {length} octets; an RSA public exponent is at most {limit} (65537 is 3)'
)
MSG_EC_SIZE = 'member "{name}" is {length} octets; a {crv} coordinate is exactly {size} (RFC 7518 §6.2.1.2)'
MSG_EC_POINT = "the point (x, y) is not on curve {crv}: check that x, y and crv belong to one key"
MSG_OKP_SIZE = 'member "x" is {length} octets; an {crv} public key is exactly {size} (RFC 8037 §2)'
MSG_OKP_KEY = "invalid {crv} public key: {detail}"
MSG_ALG_MISMATCH = "alg {alg} cannot be used with {what}; expected {expected}"


def quote_value(value: object) -> str:
    """A value from a document, quoted and escaped so it can't break a message or a line."""
    return json.dumps(value, ensure_ascii=True)


_PLAIN = re.compile(r"[A-Za-z0-9._~+/=:-]{1,200}")


def _show(value: str | None) -> str:
    """A document value for display: as is when plainly safe, else JSON-quoted; `(none)` if absent."""
    if value is None:
        return "(none)"
    return value if _PLAIN.fullmatch(value) else quote_value(value)


def json_kind(value: object) -> str:
    """The JSON type of a parsed value, for messages ("expected a string, got an array")."""
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


class JwkError(FhirgateError):
    """A JWK or JWKS that fhirgate cannot use. `message` says what is wrong and how to fix it."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class JwksFormatError(JwkError):
    """The document as a whole is not a usable JWK Set (not JSON, no `keys` array, ...)."""


class UnsupportedJwkError(JwkError):
    """A well-formed key of a type or curve fhirgate does not read (`oct`, `X25519`, unknown)."""


class InvalidJwkError(JwkError):
    """A key of a supported type whose members are wrong (missing, bad base64url, wrong size,
    a point not on its curve, an `alg` that does not fit the key)."""


@dataclass(frozen=True, slots=True)
class Jwk:
    """One public key from a JWK, with the JWK's metadata.

    `private_members` names the private members the JWK carried (and that were ignored).
    """

    kty: str
    key: PublicKey
    kid: str | None = None
    alg: str | None = None
    use: str | None = None
    key_ops: tuple[str, ...] | None = None
    crv: str | None = None
    private_members: tuple[str, ...] = ()

    @property
    def for_signatures(self) -> bool:
        """False when the JWK says it is not for verifying signatures: `use` other than `sig`
        (e.g. `enc`, RFC 7517 §4.2) or `key_ops` without `verify` (§4.3)."""
        if self.use is not None and self.use != "sig":
            return False
        return self.key_ops is None or "verify" in self.key_ops

    @property
    def algorithms(self) -> frozenset[str]:
        """The JWS `alg` values this key may verify: those of its type and curve, narrowed to its
        own `alg` when it has one; empty for keys not meant for signatures."""
        if not self.for_signatures:
            return frozenset()
        allowed = _algorithms_for(self.kty, self.crv)
        return allowed if self.alg is None else allowed & {self.alg}

    @property
    def size(self) -> int:
        """Key size in bits (RSA modulus, EC curve, Ed25519 256 / Ed448 456)."""
        if isinstance(self.key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            return self.key.key_size
        return 256 if isinstance(self.key, ed25519.Ed25519PublicKey) else 456


@dataclass(frozen=True, slots=True)
class SkippedKey:
    """A member of a JWK Set that could not be parsed, with why and where."""

    index: int
    error: JwkError
    kid: str | None = None
    kty: str | None = None
    private_members: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class JwkSet:
    """A parsed JWK Set: the usable keys in document order, and the members that were skipped."""

    keys: tuple[Jwk, ...]
    skipped: tuple[SkippedKey, ...] = ()

    def by_kid(self, kid: str) -> list[Jwk]:
        """Keys whose `kid` is exactly `kid` (an opaque string: compared, never interpreted)."""
        return [key for key in self.keys if key.kid == kid]


def _algorithms_for(kty: str, crv: str | None) -> frozenset[str]:
    if kty == "RSA":
        return _RSA_ALGS
    if kty == "EC" and crv is not None:
        return _EC_ALGS.get(crv, frozenset())
    if kty == "OKP" and crv is not None:
        return _OKP_ALGS.get(crv, frozenset())
    return frozenset()


def private_members(jwk: Mapping[str, Any]) -> tuple[str, ...]:
    """Names of the private-key members present in `jwk`, in `PRIVATE_MEMBERS` order."""
    return tuple(name for name in PRIVATE_MEMBERS if name in jwk)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise JwksFormatError(MSG_DUPLICATE_MEMBER.format(name=quote_value(name)))
        out[name] = value
    return out


def _load_json(document: bytes | str) -> Any:
    try:
        return json.loads(document, object_pairs_hook=_reject_duplicates)
    except JwkError:
        raise
    except json.JSONDecodeError as exc:
        detail = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    except UnicodeDecodeError:
        detail = "not UTF-8 text"
    except (ValueError, RecursionError) as exc:  # huge numbers, absurd nesting
        detail = type(exc).__name__ if isinstance(exc, RecursionError) else str(exc).split("\n")[0]
    raise JwksFormatError(MSG_NOT_JSON.format(detail=detail))


def _string(jwk: Mapping[str, Any], name: str) -> str | None:
    value = jwk.get(name)
    if value is None and name not in jwk:
        return None
    if not isinstance(value, str):
        raise InvalidJwkError(MSG_NOT_STRING.format(name=name, kind=json_kind(value)))
    return value


def _required_string(jwk: Mapping[str, Any], name: str, kty: str) -> str:
    value = _string(jwk, name)
    if value is None:
        raise InvalidJwkError(MSG_MISSING.format(name=name, kty=kty))
    return value


def _b64url(jwk: Mapping[str, Any], name: str, kty: str) -> bytes:
    """Decode a base64url member strictly (RFC 7515 §2; RFC 7518 §2 Base64urlUInt)."""
    if name not in jwk:
        raise InvalidJwkError(MSG_MISSING.format(name=name, kty=kty))
    value = jwk[name]
    if not isinstance(value, str):
        raise InvalidJwkError(MSG_B64_TYPE.format(name=name, kind=json_kind(value)))
    if not value:
        raise InvalidJwkError(MSG_B64_EMPTY.format(name=name))
    if len(value) > MAX_MEMBER_CHARS:
        raise InvalidJwkError(MSG_B64_LONG.format(name=name, length=len(value), limit=MAX_MEMBER_CHARS))
    if value.endswith("="):
        raise InvalidJwkError(MSG_B64_PADDED.format(name=name))
    if not _B64URL.fullmatch(value):
        raise InvalidJwkError(MSG_B64_ALPHABET.format(name=name))
    if len(value) % 4 == 1:
        raise InvalidJwkError(MSG_B64_BAD.format(name=name, detail="impossible length"))
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError) as exc:  # pragma: no cover - excluded by the checks above
        raise InvalidJwkError(MSG_B64_BAD.format(name=name, detail=str(exc)))
    # Unused low bits in the last character must be zero: one key, one encoding.
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != value:
        raise InvalidJwkError(MSG_B64_BAD.format(name=name, detail="non-zero trailing bits"))
    return raw


def _parse_rsa(jwk: Mapping[str, Any]) -> tuple[PublicKey, str | None]:
    # RFC 7518 §6.3.1. `n` SHOULD have no leading zero octet; some libraries add one (§6.3.1.1
    # note), and the value is the same, so it is tolerated.
    n = int.from_bytes(_b64url(jwk, "n", "RSA"), "big")
    e_raw = _b64url(jwk, "e", "RSA")
    if len(e_raw.lstrip(b"\0")) > RSA_MAX_EXPONENT_BYTES:
        raise InvalidJwkError(MSG_RSA_EXPONENT_LONG.format(length=len(e_raw), limit=RSA_MAX_EXPONENT_BYTES))
    e = int.from_bytes(e_raw, "big")
    bits = n.bit_length()
    if bits < MIN_RSA_BITS:
        raise InvalidJwkError(MSG_RSA_SMALL.format(bits=bits, limit=MIN_RSA_BITS))
    if bits > RSA_MAX_BITS:
        raise InvalidJwkError(MSG_RSA_LARGE.format(bits=bits, limit=RSA_MAX_BITS))
    if n % 2 == 0:
        raise InvalidJwkError(MSG_RSA_EVEN)
    if e < 3 or e % 2 == 0 or e >= n:
        raise InvalidJwkError(MSG_RSA_EXPONENT.format(detail=e))
    try:
        return rsa.RSAPublicNumbers(e, n).public_key(), None
    except ValueError as exc:  # pragma: no cover - the checks above mirror cryptography's
        raise InvalidJwkError(MSG_RSA_EXPONENT.format(detail=f"{e} ({exc})"))


def _parse_ec(jwk: Mapping[str, Any]) -> tuple[PublicKey, str | None]:
    # RFC 7518 §6.2.1.
    crv = _required_string(jwk, "crv", "EC")
    if crv not in _EC_CURVES:
        raise UnsupportedJwkError(
            MSG_UNKNOWN_CRV.format(crv=quote_value(crv), kty="EC", expected=", ".join(_EC_CURVES))
        )
    curve, size = _EC_CURVES[crv]
    coordinates = []
    for name in ("x", "y"):
        raw = _b64url(jwk, name, "EC")
        if len(raw) != size:
            raise InvalidJwkError(MSG_EC_SIZE.format(name=name, length=len(raw), crv=crv, size=size))
        coordinates.append(int.from_bytes(raw, "big"))
    try:
        # cryptography (OpenSSL) refuses coordinates out of range and points not on the curve.
        key = ec.EllipticCurvePublicNumbers(coordinates[0], coordinates[1], curve).public_key()
    except ValueError:
        raise InvalidJwkError(MSG_EC_POINT.format(crv=crv))
    return key, crv


def _parse_okp(jwk: Mapping[str, Any]) -> tuple[PublicKey, str | None]:
    # RFC 8037 §2.
    crv = _required_string(jwk, "crv", "OKP")
    if crv in _OKP_KEY_AGREEMENT:
        raise UnsupportedJwkError(MSG_KEY_AGREEMENT_CRV.format(crv=quote_value(crv)))
    if crv not in _OKP_CURVES:
        raise UnsupportedJwkError(
            MSG_UNKNOWN_CRV.format(crv=quote_value(crv), kty="OKP", expected=", ".join(_OKP_CURVES))
        )
    size = _OKP_CURVES[crv]
    raw = _b64url(jwk, "x", "OKP")
    if len(raw) != size:
        raise InvalidJwkError(MSG_OKP_SIZE.format(length=len(raw), crv=crv, size=size))
    key: PublicKey
    try:
        if crv == "Ed25519":
            key = ed25519.Ed25519PublicKey.from_public_bytes(raw)
        else:
            key = ed448.Ed448PublicKey.from_public_bytes(raw)
    except ValueError as exc:  # pragma: no cover - sizes are checked above
        raise InvalidJwkError(MSG_OKP_KEY.format(crv=crv, detail=str(exc)))
    return key, crv


_PARSERS = {"RSA": _parse_rsa, "EC": _parse_ec, "OKP": _parse_okp}


def _key_ops(jwk: Mapping[str, Any]) -> tuple[str, ...] | None:
    if "key_ops" not in jwk:
        return None
    ops = jwk["key_ops"]
    if not isinstance(ops, list) or not all(isinstance(op, str) for op in ops) or len(set(ops)) != len(ops):
        raise InvalidJwkError(MSG_KEY_OPS)
    return tuple(ops)


def parse_jwk(jwk: Mapping[str, Any]) -> Jwk:
    """Parse one JWK (an already decoded JSON object) into its public key and metadata.

    Private members are ignored and listed in `Jwk.private_members`. Raises
    `UnsupportedJwkError` for key types and curves fhirgate does not read, `InvalidJwkError` for
    malformed members.
    """
    if not isinstance(jwk, Mapping):
        raise InvalidJwkError(MSG_KEY_NOT_OBJECT.format(kind=json_kind(jwk)))
    if "kty" not in jwk:
        raise InvalidJwkError(MSG_NO_KTY)
    kty = jwk["kty"]
    if not isinstance(kty, str):
        raise InvalidJwkError(MSG_NOT_STRING.format(name="kty", kind=json_kind(kty)))
    kid = _string(jwk, "kid")
    alg = _string(jwk, "alg")
    use = _string(jwk, "use")
    key_ops = _key_ops(jwk)
    if kty == "oct":
        raise UnsupportedJwkError(MSG_OCT)
    parser = _PARSERS.get(kty)
    if parser is None:
        raise UnsupportedJwkError(MSG_UNSUPPORTED_KTY.format(kty=quote_value(kty)))
    key, crv = parser(jwk)
    if alg is not None and alg in _SIGNATURE_ALGS:
        allowed = _algorithms_for(kty, crv)
        if alg not in allowed:
            what = "an RSA key" if kty == "RSA" else f"an {kty} {crv} key"
            raise InvalidJwkError(
                MSG_ALG_MISMATCH.format(
                    alg=quote_value(alg), what=what, expected=" or ".join(sorted(allowed))
                )
            )
    return Jwk(
        kty=kty,
        key=key,
        kid=kid,
        alg=alg,
        use=use,
        key_ops=key_ops,
        crv=crv,
        private_members=private_members(jwk),
    )


def parse_jwks(document: bytes | str | Mapping[str, Any]) -> JwkSet:
    """Parse a JWK Set (RFC 7517 §5) from JSON text or an already decoded object.

    Raises `JwksFormatError` when the document is not a JWK Set at all. Members that are not
    usable keys do not fail the set: they are returned in `JwkSet.skipped` with their error (the
    caller decides whether none usable is an error).
    """
    data: Any = document if isinstance(document, Mapping) else _load_json(document)
    if not isinstance(data, Mapping):
        raise JwksFormatError(MSG_NOT_OBJECT.format(kind=json_kind(data)))
    if "keys" not in data:
        if "kty" in data:
            raise JwksFormatError(MSG_SINGLE_JWK)
        if "jwks_uri" in data:
            raise JwksFormatError(MSG_DISCOVERY.format(uri=quote_value(data["jwks_uri"])))
        raise JwksFormatError(MSG_NO_KEYS)
    members = data["keys"]
    if not isinstance(members, list):
        raise JwksFormatError(MSG_KEYS_NOT_ARRAY.format(kind=json_kind(members)))
    if not members:
        raise JwksFormatError(MSG_KEYS_EMPTY)
    keys: list[Jwk] = []
    skipped: list[SkippedKey] = []
    for index, member in enumerate(members):
        try:
            keys.append(parse_jwk(member))
        except JwkError as exc:
            skipped.append(_skipped(index, member, exc))
    return JwkSet(keys=tuple(keys), skipped=tuple(skipped))


def _skipped(index: int, member: object, error: JwkError) -> SkippedKey:
    if not isinstance(member, Mapping):
        return SkippedKey(index=index, error=error)
    kid, kty = member.get("kid"), member.get("kty")
    return SkippedKey(
        index=index,
        error=error,
        kid=kid if isinstance(kid, str) else None,
        kty=kty if isinstance(kty, str) else None,
        private_members=private_members(member),
    )


def to_pem(key: Jwk | PublicKey) -> str:
    """The SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`, RFC 7468 §13) of a public key,
    exactly as `cryptography` serializes it (what Kong's `rsa_public_key` takes)."""
    public = key.key if isinstance(key, Jwk) else key
    return public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def describe(key: Jwk) -> str:
    """One line naming the key (kid, kty, alg, use, size or curve), safe to print: document values
    are JSON-quoted, so no control character or PEM armor can come through."""
    parts = [f"kid={_show(key.kid)}", f"kty={key.kty}", f"alg={_show(key.alg)}"]
    if key.use is not None:
        parts.append(f"use={_show(key.use)}")
    parts.append(f"crv={key.crv}" if key.crv is not None else f"bits={key.size}")
    return " ".join(parts)
