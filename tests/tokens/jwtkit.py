"""Test keys and a token signer written directly on `cryptography` (independent of
`fhirgate.tokens`), shared by the token-core and `jwt` plugin tests.

Keys are generated once per process (RSA 2048, EC P-256/384/521, Ed25519, Ed448). `sign` can
produce what a correct issuer produces and what an attacker crafts (any header, any alg, any key).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from functools import cache
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

HS_SECRET = b"a-32-byte-secret-for-hs-tests-xx" * 2  # 64 bytes: long enough for HS512


@dataclass(frozen=True)
class KeyPair:
    name: str
    private: Any
    public_pem: str

    @property
    def public(self) -> Any:
        return self.private.public_key()


def _pem(public: Any) -> str:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


@cache
def keypair(name: str) -> KeyPair:
    """`rsa`, `p256`, `p384`, `p521`, `ed25519`, `ed448`; `<name>#2` is another key of the same
    type (see `other_key_name`)."""
    private: Any
    name = name.split("#")[0]
    if name.startswith("rsa"):
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif name in ("p256", "p384", "p521"):
        curve = {"p256": ec.SECP256R1(), "p384": ec.SECP384R1(), "p521": ec.SECP521R1()}[name]
        private = ec.generate_private_key(curve)
    elif name == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    elif name == "ed448":
        private = ed448.Ed448PrivateKey.generate()
    else:
        raise KeyError(name)
    return KeyPair(name, private, _pem(private.public_key()))


@cache
def rsa1024() -> KeyPair:
    private = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return KeyPair("rsa1024", private, _pem(private.public_key()))


#: The key each algorithm is tested with (EdDSA twice: Ed25519 and Ed448).
ALG_KEYS: list[tuple[str, str]] = [
    ("HS256", "hs"),
    ("HS384", "hs"),
    ("HS512", "hs"),
    ("RS256", "rsa"),
    ("RS384", "rsa"),
    ("RS512", "rsa"),
    ("PS256", "rsa"),
    ("PS384", "rsa"),
    ("PS512", "rsa"),
    ("ES256", "p256"),
    ("ES384", "p384"),
    ("ES512", "p521"),
    ("EdDSA", "ed25519"),
    ("EdDSA", "ed448"),
]


def other_key_name(key_name: str) -> str:
    """The name of a second key of the same type as `key_name`."""
    return key_name + "#2"


_HASH = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
_EC_SIZE = {"ES256": 32, "ES384": 48, "ES512": 66}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: Any) -> str:
    """A JSON value as a base64url segment (compact JSON)."""
    return b64(json.dumps(value, separators=(",", ":")).encode())


def raw_signature(alg: str, key: Any, data: bytes) -> bytes:
    """Sign `data` with `alg`: `key` is bytes (HMAC) or a `cryptography` private key."""
    if alg.startswith("HS"):
        return hmac.new(key, data, getattr(hashlib, f"sha{alg[2:]}")).digest()
    if alg.startswith("RS"):
        return key.sign(data, padding.PKCS1v15(), _HASH[alg[2:]]())
    if alg.startswith("PS"):
        h = _HASH[alg[2:]]
        return key.sign(data, padding.PSS(mgf=padding.MGF1(h()), salt_length=h.digest_size), h())
    if alg.startswith("ES"):
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(_HASH[alg[2:]]())))
        size = _EC_SIZE[alg]
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    if alg == "EdDSA":
        return key.sign(data)
    if alg == "none":
        return b""
    raise ValueError(alg)


def signing_key(key_name: str) -> Any:
    return HS_SECRET if key_name == "hs" else keypair(key_name).private


def sign(
    claims: Any,
    alg: str = "HS256",
    key: Any = None,
    header: dict[str, Any] | None = None,
    *,
    payload_segment: str | None = None,
    header_segment: str | None = None,
) -> str:
    """A compact JWS. `header` replaces the default `{"alg": alg, "typ": "JWT"}`; the segments can
    be given raw to craft malformed tokens."""
    if key is None:
        key = HS_SECRET
    h = header_segment if header_segment is not None else segment(header or {"typ": "JWT", "alg": alg})
    p = payload_segment if payload_segment is not None else segment(claims)
    signing_input = f"{h}.{p}".encode()
    return f"{h}.{p}.{b64(raw_signature(alg, key, signing_input))}"
