"""The hand-written fast path against joserfc (an independent JOSE implementation): for every
algorithm, valid tokens verify in both, and every token of a catalogue of invalid ones fails in
both. Tokens are signed by joserfc for the valid vectors, so signing is independent too."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from joserfc import jwt as jose_jwt
from joserfc.jwk import ECKey, OctKey, OKPKey, RSAKey

from fhirgate.tokens import (
    TokenError,
    VerificationKey,
    hmac_key,
    parse_jwt,
    public_key_from_pem,
    verify_signature,
)
from tests.tokens.jwtkit import ALG_KEYS, HS_SECRET, b64, keypair, other_key_name, segment, sign, signing_key

pytestmark = pytest.mark.filterwarnings("ignore::joserfc.errors.SecurityWarning")

CLAIMS = {"iss": "k", "sub": "alice", "exp": 4_000_000_000, "aud": ["api"], "n": 1.5, "u": "é✓"}
JoseKey = OctKey | RSAKey | ECKey | OKPKey


def jose_key(key_name: str, private: bool = False) -> JoseKey:
    if key_name == "hs":
        return OctKey.import_key(HS_SECRET)
    pair = keypair(key_name)
    cls: Any = {"rsa": RSAKey, "rsa2": RSAKey, "ed25519": OKPKey, "ed448": OKPKey}.get(key_name, ECKey)
    return cls.import_key(pair.private if private else pair.public_pem)  # type: ignore[no-any-return]


def our_key(key_name: str) -> VerificationKey:
    return hmac_key(HS_SECRET) if key_name == "hs" else public_key_from_pem(keypair(key_name).public_pem)


def ours_accepts(token: str, key_name: str) -> bool:
    try:
        verify_signature(parse_jwt(token), our_key(key_name))
    except TokenError:
        return False
    return True


def jose_accepts(token: str, key_name: str, alg: str) -> bool:
    try:
        jose_jwt.decode(token, jose_key(key_name), algorithms=[alg])
    except Exception:
        return False
    return True


def jose_sign(alg: str, key_name: str, claims: Any = CLAIMS, header: dict[str, Any] | None = None) -> str:
    return jose_jwt.encode(
        header or {"alg": alg, "typ": "JWT"}, claims, jose_key(key_name, private=True), algorithms=[alg]
    )


@pytest.mark.parametrize(("alg", "key_name"), ALG_KEYS)
def test_valid_tokens_verify_in_both(alg: str, key_name: str) -> None:
    for token in (
        jose_sign(alg, key_name),
        jose_sign(alg, key_name, header={"alg": alg, "kid": "k1", "typ": "at+jwt"}),
        sign(CLAIMS, alg, signing_key(key_name)),  # our test signer, cross-checked by joserfc
        sign({}, alg, signing_key(key_name)),
    ):
        assert jose_accepts(token, key_name, alg)
        assert ours_accepts(token, key_name)
        assert parse_jwt(token).claims == json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))


def _swap(token: str, index: int, value: str) -> str:
    parts = token.split(".")
    parts[index] = value
    return ".".join(parts)


def _flip_a_char(s: str) -> str:
    return s[:5] + ("A" if s[5] != "A" else "B") + s[6:]


def _catalogue(alg: str, key_name: str) -> dict[str, Callable[[str], str]]:
    other_alg = {"HS": "HS512" if alg != "HS512" else "HS256"}.get(alg[:2], "HS256")
    return {
        "tampered payload": lambda t: _swap(t, 1, segment({**CLAIMS, "sub": "mallory"})),
        "tampered header": lambda t: _swap(t, 0, segment({"alg": alg, "typ": "JWT", "kid": "x"})),
        "tampered signature": lambda t: _swap(t, 2, _flip_a_char(t.split(".")[2])),
        "signature dropped": lambda t: _swap(t, 2, ""),
        "signature of another token": lambda t: _swap(t, 2, jose_sign(alg, key_name, {"x": 1}).split(".")[2]),
        "alg none": lambda t: f"{segment({'alg': 'none'})}.{t.split('.')[1]}.",
        "alg none with signature": lambda t: _swap(t, 0, segment({"alg": "none"})),
        "alg swapped": lambda t: _swap(t, 0, segment({"alg": other_alg})),
        "alg confusion (HS256 keyed with the public PEM)": lambda t: sign(
            CLAIMS, "HS256", (keypair(key_name).public_pem if key_name != "hs" else "x").encode()
        ),
        "wrong key": lambda t: sign(
            CLAIMS,
            alg,
            b"another-secret-of-64-bytes-" * 3 if key_name == "hs" else signing_key(other_key_name(key_name)),
        ),
        "truncated to two segments": lambda t: t.rsplit(".", 1)[0],
        "truncated to one segment": lambda t: t.split(".")[0],
        "four segments": lambda t: t + ".AAAA",
        "empty": lambda t: "",
        "non-base64 header": lambda t: _swap(t, 0, "***"),
        "non-base64 payload": lambda t: _swap(t, 1, "%%%"),
        "non-base64 signature": lambda t: _swap(t, 2, "@@@@"),
        "header not JSON": lambda t: _swap(t, 0, b64(b"{alg:HS256}")),
        "payload not JSON": lambda t: _swap(t, 1, b64(b"not json")),
        "header is an array": lambda t: _swap(t, 0, segment([alg])),
        "unknown crit": lambda t: _swap(t, 0, segment({"alg": alg, "crit": ["x-unknown"], "x-unknown": 1})),
        "oversize": lambda t: sign({"pad": "x" * 20000}, alg, signing_key(key_name)),
    }


CASES = [(alg, key_name, name) for alg, key_name in ALG_KEYS for name in _catalogue(alg, key_name)]


@pytest.mark.parametrize(("alg", "key_name", "case"), CASES)
def test_invalid_tokens_fail_in_both(alg: str, key_name: str, case: str) -> None:
    valid = jose_sign(alg, key_name)
    token = _catalogue(alg, key_name)[case](valid)
    assert token != valid
    assert not ours_accepts(token, key_name)
    if case == "oversize":
        return  # joserfc has no size cap: the cap is ours alone (tested in test_parser.py)
    assert not jose_accepts(token, key_name, alg)


@pytest.mark.parametrize(("alg", "key_name"), [("RS256", "rsa"), ("HS256", "hs"), ("ES256", "p256")])
def test_non_canonical_signature_encoding_is_refused(alg: str, key_name: str) -> None:
    """A signature whose last character has non-zero spare bits (RFC 4648 §3.5) decodes to the
    same bytes with a lax decoder; both refuse it, so a signed token has exactly one form."""
    token = jose_sign(alg, key_name)
    sig = token.split(".")[2]
    spare = {2: 0b1111, 3: 0b11}[len(sig) % 4]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = sig[:-1] + alphabet[alphabet.index(sig[-1]) ^ 1 if spare else 0]
    malleable = _swap(token, 2, twin)
    assert malleable != token
    assert not jose_accepts(malleable, key_name, alg)
    assert not ours_accepts(malleable, key_name)
