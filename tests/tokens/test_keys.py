"""Keys decide the algorithms (RFC 8725 §3.1): per-type allow-lists, alg confusion and `none`
refused, every algorithm verified with `cryptography`, bad keys refused when loaded."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fhirgate.tokens import (
    AlgorithmNotAllowedError,
    InvalidKeyError,
    SignatureError,
    VerificationKey,
    hmac_key,
    parse_jwt,
    public_key,
    public_key_from_pem,
    verify_signature,
)
from tests.tokens.jwtkit import ALG_KEYS, HS_SECRET, keypair, raw_signature, rsa1024, sign, signing_key

CLAIMS = {"iss": "k"}


def key_for(key_name: str) -> VerificationKey:
    return hmac_key(HS_SECRET) if key_name == "hs" else public_key_from_pem(keypair(key_name).public_pem)


@pytest.mark.parametrize(("alg", "key_name"), ALG_KEYS)
def test_every_algorithm_verifies(alg: str, key_name: str) -> None:
    token = sign(CLAIMS, alg, signing_key(key_name))
    verify_signature(parse_jwt(token), key_for(key_name))
    verify_signature(parse_jwt(token), key_for(key_name).restricted([alg]))


@pytest.mark.parametrize(("alg", "key_name"), ALG_KEYS)
def test_every_algorithm_refuses_a_tampered_payload(alg: str, key_name: str) -> None:
    h, _, s = sign(CLAIMS, alg, signing_key(key_name)).split(".")
    forged = f"{h}.{sign({'iss': 'k', 'admin': True}).split('.')[1]}.{s}"
    with pytest.raises(SignatureError):
        verify_signature(parse_jwt(forged), key_for(key_name))


@pytest.mark.parametrize(
    ("key_name", "allowed"),
    [
        ("hs", {"HS256", "HS384", "HS512"}),
        ("rsa", {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
        ("p256", {"ES256"}),
        ("p384", {"ES384"}),
        ("p521", {"ES512"}),
        ("ed25519", {"EdDSA"}),
        ("ed448", {"EdDSA"}),
    ],
)
def test_allow_list_per_key_type(key_name: str, allowed: set[str]) -> None:
    assert key_for(key_name).algorithms == allowed


def test_alg_confusion_hs256_with_the_rsa_public_key_fails() -> None:
    pem = keypair("rsa").public_pem.encode()
    token = sign(CLAIMS, "HS256", pem)  # HMAC keyed with the public key's PEM
    with pytest.raises(AlgorithmNotAllowedError):
        verify_signature(parse_jwt(token), public_key_from_pem(pem))
    # and the PEM can never become an HMAC secret
    with pytest.raises(InvalidKeyError):
        hmac_key(pem)
    with pytest.raises(InvalidKeyError):
        hmac_key(b"  " + pem)


def test_ecdsa_key_refuses_the_other_curves_algorithms() -> None:
    token = sign(CLAIMS, "ES384", signing_key("p384"))
    with pytest.raises(AlgorithmNotAllowedError):
        verify_signature(parse_jwt(token), key_for("p256"))


def test_restricted_key_refuses_other_algorithms_of_its_type() -> None:
    token = sign(CLAIMS, "PS256", signing_key("rsa"))
    with pytest.raises(AlgorithmNotAllowedError):
        verify_signature(parse_jwt(token), key_for("rsa").restricted(["RS256"]))
    with pytest.raises(InvalidKeyError) as info:
        key_for("p256").restricted(["RS256"])
    assert info.value.code == "alg_mismatch"
    with pytest.raises(InvalidKeyError):
        public_key_from_pem(keypair("ed25519").public_pem, ["ES256"])


def test_wrong_key_of_the_right_type_fails() -> None:
    token = sign(CLAIMS, "RS256", signing_key("rsa"))
    with pytest.raises(SignatureError):
        verify_signature(parse_jwt(token), key_for("rsa#2"))
    with pytest.raises(SignatureError):
        verify_signature(parse_jwt(sign(CLAIMS, "HS256", b"another-secret-of-32-bytes-xxxxx")), key_for("hs"))


@pytest.mark.parametrize(("alg", "key_name"), ALG_KEYS)
@pytest.mark.parametrize("mangle", ["empty", "short", "long", "zeros", "flip"])
def test_malformed_signatures_fail_cleanly(alg: str, key_name: str, mangle: str) -> None:
    h, p, _ = sign(CLAIMS, alg, signing_key(key_name)).split(".")
    sig = raw_signature(alg, signing_key(key_name), f"{h}.{p}".encode())
    bad = {
        "empty": b"",
        "short": sig[:-1],
        "long": sig + b"\0",
        "zeros": bytes(len(sig)),
        "flip": sig[:-1] + bytes([sig[-1] ^ 1]),
    }[mangle]
    token = f"{h}.{p}.{base64.urlsafe_b64encode(bad).rstrip(b'=').decode()}"
    with pytest.raises(SignatureError):
        verify_signature(parse_jwt(token), key_for(key_name))


def test_ecdsa_der_signature_instead_of_raw_fails() -> None:
    h, p, _ = sign(CLAIMS, "ES256", signing_key("p256")).split(".")
    der = signing_key("p256").sign(f"{h}.{p}".encode(), ec.ECDSA(hashes.SHA256()))
    token = f"{h}.{p}.{base64.urlsafe_b64encode(der).rstrip(b'=').decode()}"
    with pytest.raises(SignatureError):
        verify_signature(parse_jwt(token), key_for("p256"))


@pytest.mark.parametrize(
    "pem",
    [
        "",
        "not a key",
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        "-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n",
    ],
)
def test_unparseable_pem_is_refused_at_load(pem: str) -> None:
    with pytest.raises(InvalidKeyError) as info:
        public_key_from_pem(pem)
    assert info.value.code == "key_invalid"


def test_private_key_pem_is_not_a_public_key() -> None:
    private_pem = signing_key("rsa").private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(InvalidKeyError):
        public_key_from_pem(private_pem)


def test_pkcs1_rsa_public_key_pem_is_accepted() -> None:
    pem = keypair("rsa").public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
    assert pem.startswith(b"-----BEGIN RSA PUBLIC KEY-----")
    token = sign(CLAIMS, "RS256", signing_key("rsa"))
    verify_signature(parse_jwt(token), public_key_from_pem(pem))


def test_small_rsa_and_unsupported_curves_are_refused() -> None:
    with pytest.raises(InvalidKeyError) as info:
        public_key_from_pem(rsa1024().public_pem)
    assert info.value.code == "key_too_small"
    k1 = ec.generate_private_key(ec.SECP256K1()).public_key()
    with pytest.raises(InvalidKeyError) as info:
        public_key(k1)
    assert info.value.code == "key_unsupported"
    with pytest.raises(InvalidKeyError):
        public_key(object())


def test_empty_hmac_secret_is_refused() -> None:
    with pytest.raises(InvalidKeyError):
        hmac_key(b"")


def test_hmac_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import hmac as hmac_module

    calls: list[tuple[bytes, bytes]] = []
    real = hmac_module.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac_module, "compare_digest", spy)
    verify_signature(parse_jwt(sign(CLAIMS)), hmac_key(HS_SECRET))
    assert len(calls) == 1
