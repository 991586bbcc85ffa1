"""Verification keys: the key decides which algorithms may be used, never the token.

RFC 8725 §3.1 and §3.2: each key is bound to an allow-list derived from its type, so `alg: none`
and algorithm confusion (a token signed with HS256 using an RSA public key's PEM as the secret)
cannot succeed. The allow-lists (RFC 7518 §3.1, RFC 8037 §3.1):

- HMAC secret: HS256, HS384, HS512 (RFC 7518 §3.2);
- RSA public key (2048 bits or more, RFC 7518 §3.3): RS256/384/512 and PS256/384/512 (§3.5);
- EC public key: only the algorithm of its curve, P-256 → ES256, P-384 → ES384, P-521 → ES512
  (RFC 7518 §3.4);
- Ed25519 / Ed448 public key: EdDSA (RFC 8037 §3.1).

A key is parsed once (at configuration time); `verify` is what runs per request. Signatures are
checked with `cryptography` directly; ECDSA's raw R||S (RFC 7518 §3.4) is converted to DER, HMAC
tags are compared in constant time (`hmac.compare_digest`).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from fhirgate.tokens.errors import AlgorithmNotAllowedError, InvalidKeyError

__all__ = [
    "HMAC_ALGORITHMS",
    "MIN_RSA_BITS",
    "VerificationKey",
    "hmac_key",
    "public_key",
    "public_key_from_pem",
]

Verifier = Callable[[bytes, bytes], bool]
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey

HMAC_ALGORITHMS: frozenset[str] = frozenset({"HS256", "HS384", "HS512"})
RSA_ALGORITHMS: frozenset[str] = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
#: RFC 7518 §3.3 and §3.5: "A key of size 2048 bits or larger MUST be used".
MIN_RSA_BITS = 2048

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
# Curve name -> (its only JWS algorithm, bytes per coordinate), RFC 7518 §3.4.
_CURVES: dict[str, tuple[str, int]] = {
    "secp256r1": ("ES256", 32),
    "secp384r1": ("ES384", 48),
    "secp521r1": ("ES512", 66),
}
# Public keys pasted as a symmetric secret: the alg-confusion attack (RFC 8725 §2.1).
_KEY_MARKERS = (b"-----BEGIN", b"ssh-rsa", b"ssh-ed25519", b"ecdsa-sha2-")


class VerificationKey:
    """A parsed key with the algorithms it may verify. Immutable after construction."""

    __slots__ = ("_verifiers", "algorithms", "kind")

    def __init__(self, kind: str, verifiers: dict[str, Verifier]) -> None:
        #: ``"oct"``, ``"RSA"``, ``"EC"`` or ``"OKP"`` (RFC 7518 §6.1 / RFC 8037 §2 names).
        self.kind = kind
        self._verifiers = verifiers
        #: The algorithms this key may verify.
        self.algorithms: frozenset[str] = frozenset(verifiers)

    def verify(self, alg: str, signing_input: bytes, signature: bytes) -> bool:
        """True if `signature` is a valid `alg` signature of `signing_input` under this key.
        Raises `AlgorithmNotAllowedError` if `alg` is not one this key allows."""
        fn = self._verifiers.get(alg)
        if fn is None:
            message = f"'{alg}' is not allowed for this {self.kind} key"
            raise AlgorithmNotAllowedError("alg_not_allowed", message)
        return fn(signing_input, signature)

    def restricted(self, algorithms: Iterable[str]) -> VerificationKey:
        """This key limited to `algorithms` (e.g. a credential's one algorithm). Raises
        `InvalidKeyError` (code ``alg_mismatch``) if none of them suits the key."""
        wanted = set(algorithms)
        kept = {a: f for a, f in self._verifiers.items() if a in wanted}
        if not kept:
            raise InvalidKeyError(
                "alg_mismatch",
                f"a {self.kind} key cannot verify {', '.join(sorted(wanted))} "
                f"(it allows {', '.join(sorted(self.algorithms))})",
            )
        return VerificationKey(self.kind, kept)

    def __repr__(self) -> str:
        return f"<VerificationKey {self.kind} {sorted(self.algorithms)}>"


def _restrict(key: VerificationKey, algorithms: Iterable[str] | None) -> VerificationKey:
    return key if algorithms is None else key.restricted(algorithms)


# -- HMAC ---------------------------------------------------------------------------------------


def _hmac_verifier(secret: bytes, digest: str) -> Verifier:
    def verify(data: bytes, signature: bytes) -> bool:
        return hmac.compare_digest(hmac.digest(secret, data, digest), signature)

    return verify


def hmac_key(secret: bytes, algorithms: Iterable[str] | None = None) -> VerificationKey:
    """An HMAC key (RFC 7518 §3.2). Refuses an empty secret and one that is a public key in PEM
    or OpenSSH form (RFC 8725 §2.1, algorithm confusion)."""
    if not secret:
        raise InvalidKeyError("key_invalid", "an HMAC secret cannot be empty")
    if secret.lstrip().startswith(_KEY_MARKERS):
        raise InvalidKeyError("key_invalid", "an HMAC secret cannot be a public key (algorithm confusion)")
    verifiers = {f"HS{bits}": _hmac_verifier(secret, f"sha{bits}") for bits in ("256", "384", "512")}
    return _restrict(VerificationKey("oct", verifiers), algorithms)


# -- public keys --------------------------------------------------------------------------------


def _rsa_verifier(
    key: rsa.RSAPublicKey, pad: padding.AsymmetricPadding, hash_alg: hashes.HashAlgorithm
) -> Verifier:
    size = (key.key_size + 7) // 8
    verify_fn = key.verify

    def verify(data: bytes, signature: bytes) -> bool:
        # RFC 8017 §8.2.2 step 1: the signature is exactly k octets.
        if len(signature) != size:
            return False
        try:
            verify_fn(signature, data, pad, hash_alg)
        except InvalidSignature:
            return False
        return True

    return verify


def _ec_verifier(key: ec.EllipticCurvePublicKey, hash_alg: hashes.HashAlgorithm, size: int) -> Verifier:
    algorithm = ec.ECDSA(hash_alg)
    verify_fn = key.verify

    def verify(data: bytes, signature: bytes) -> bool:
        # RFC 7518 §3.4: R and S as fixed-size big-endian octet strings, concatenated.
        if len(signature) != 2 * size:
            return False
        r = int.from_bytes(signature[:size], "big")
        s = int.from_bytes(signature[size:], "big")
        try:
            verify_fn(encode_dss_signature(r, s), data, algorithm)
        except (InvalidSignature, ValueError):
            return False
        return True

    return verify


def _ed_verifier(key: ed25519.Ed25519PublicKey | ed448.Ed448PublicKey) -> Verifier:
    verify_fn = key.verify

    def verify(data: bytes, signature: bytes) -> bool:
        try:
            verify_fn(signature, data)
        except InvalidSignature:
            return False
        return True

    return verify


def public_key(key: Any, algorithms: Iterable[str] | None = None) -> VerificationKey:
    """A `VerificationKey` from a `cryptography` public key object, with the algorithms its type
    allows (optionally restricted to `algorithms`). Raises `InvalidKeyError`."""
    verifiers: dict[str, Verifier] = {}
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise InvalidKeyError(
                "key_too_small", f"RSA key of {key.key_size} bits; at least {MIN_RSA_BITS} are required"
            )
        for bits, hash_cls in _HASHES.items():
            hash_alg = hash_cls()
            verifiers[f"RS{bits}"] = _rsa_verifier(key, padding.PKCS1v15(), hash_alg)
            # RFC 7518 §3.5: MGF1 with the same hash, salt as long as the hash output.
            pss = padding.PSS(mgf=padding.MGF1(hash_cls()), salt_length=hash_alg.digest_size)
            verifiers[f"PS{bits}"] = _rsa_verifier(key, pss, hash_alg)
        kind = "RSA"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        curve = _CURVES.get(key.curve.name)
        if curve is None:
            raise InvalidKeyError("key_unsupported", f"EC curve {key.curve.name} has no JWS algorithm here")
        alg, size = curve
        verifiers[alg] = _ec_verifier(key, _HASHES[alg[2:]](), size)
        kind = "EC"
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        verifiers["EdDSA"] = _ed_verifier(key)
        kind = "OKP"
    else:
        raise InvalidKeyError("key_unsupported", f"unsupported key type {type(key).__name__}")
    return _restrict(VerificationKey(kind, verifiers), algorithms)


def public_key_from_pem(pem: str | bytes, algorithms: Iterable[str] | None = None) -> VerificationKey:
    """Parse a PEM public key (SubjectPublicKeyInfo `BEGIN PUBLIC KEY`, or PKCS#1
    `BEGIN RSA PUBLIC KEY`; RFC 7468) into a `VerificationKey`. Raises `InvalidKeyError`."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        loaded = serialization.load_pem_public_key(data.strip())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InvalidKeyError("key_invalid", f"not a PEM public key ({exc})") from None
    return public_key(loaded, algorithms)
