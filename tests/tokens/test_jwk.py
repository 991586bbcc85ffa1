"""`fhirgate.tokens.jwk`: JWKs and JWK Sets into `cryptography` public keys and PEM.

Every key is generated with `cryptography`, written as a JWK by hand from its numbers (RFC 7518
§6, RFC 8037 §2), parsed, and compared with the original: same public numbers, same PEM bytes.
"""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fhirgate.tokens.jwk import (
    PRIVATE_MEMBERS,
    InvalidJwkError,
    Jwk,
    JwkError,
    JwkSet,
    JwksFormatError,
    UnsupportedJwkError,
    describe,
    parse_jwk,
    parse_jwks,
    private_members,
    to_pem,
)


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def uint(value: int, length: int | None = None) -> str:
    """Base64urlUInt (RFC 7518 §2): minimal octets unless `length` is given."""
    length = length or max(1, (value.bit_length() + 7) // 8)
    return b64u(value.to_bytes(length, "big"))


def spki(key) -> str:
    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()


# Keys are slow to generate (RSA especially): once per module.
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_3072 = rsa.generate_private_key(public_exponent=65537, key_size=3072)
EC_KEYS = {
    "P-256": (ec.generate_private_key(ec.SECP256R1()), 32),
    "P-384": (ec.generate_private_key(ec.SECP384R1()), 48),
    "P-521": (ec.generate_private_key(ec.SECP521R1()), 66),
}
ED25519 = ed25519.Ed25519PrivateKey.generate()
ED448 = ed448.Ed448PrivateKey.generate()


def rsa_jwk(key: rsa.RSAPrivateKey = RSA_KEY, private: bool = False, **extra) -> dict:
    pub = key.public_key().public_numbers()
    jwk = {"kty": "RSA", "n": uint(pub.n), "e": uint(pub.e), **extra}
    if private:
        priv = key.private_numbers()
        jwk |= {
            "d": uint(priv.d),
            "p": uint(priv.p),
            "q": uint(priv.q),
            "dp": uint(priv.dmp1),
            "dq": uint(priv.dmq1),
            "qi": uint(priv.iqmp),
        }
    return jwk


def ec_jwk(crv: str, private: bool = False, **extra) -> dict:
    key, size = EC_KEYS[crv]
    pub = key.public_key().public_numbers()
    jwk = {"kty": "EC", "crv": crv, "x": uint(pub.x, size), "y": uint(pub.y, size), **extra}
    if private:
        jwk["d"] = uint(key.private_numbers().private_value, size)
    return jwk


def okp_jwk(key, crv: str, private: bool = False, **extra) -> dict:
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    jwk = {"kty": "OKP", "crv": crv, "x": b64u(raw), **extra}
    if private:
        from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

        jwk["d"] = b64u(key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))
    return jwk


# --------------------------------------------------------------------------------------------
# Round trips: numbers and PEM


@pytest.mark.parametrize("key", [RSA_KEY, RSA_3072], ids=["2048", "3072"])
def test_rsa_round_trip_keeps_public_numbers_and_pem(key):
    parsed = parse_jwk(rsa_jwk(key, kid="r1", alg="RS256", use="sig"))
    assert isinstance(parsed.key, rsa.RSAPublicKey)
    assert parsed.key.public_numbers() == key.public_key().public_numbers()
    assert to_pem(parsed) == spki(key.public_key())
    assert to_pem(parsed.key) == spki(key.public_key())
    assert (parsed.kty, parsed.kid, parsed.alg, parsed.use, parsed.crv) == ("RSA", "r1", "RS256", "sig", None)
    assert parsed.size == key.key_size
    assert parsed.private_members == ()


@pytest.mark.parametrize("crv", ["P-256", "P-384", "P-521"])
def test_ec_round_trip_keeps_public_numbers_and_pem(crv):
    key, _ = EC_KEYS[crv]
    alg = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}[crv]
    parsed = parse_jwk(ec_jwk(crv, kid=f"ec-{crv}", alg=alg))
    assert isinstance(parsed.key, ec.EllipticCurvePublicKey)
    assert parsed.key.public_numbers() == key.public_key().public_numbers()
    assert to_pem(parsed) == spki(key.public_key())
    assert (parsed.kty, parsed.crv, parsed.alg) == ("EC", crv, alg)
    assert parsed.algorithms == {alg}


@pytest.mark.parametrize(("key", "crv"), [(ED25519, "Ed25519"), (ED448, "Ed448")])
def test_okp_round_trip_keeps_public_bytes_and_pem(key, crv):
    parsed = parse_jwk(okp_jwk(key, crv, kid="ed", alg="EdDSA"))
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert parsed.key.public_bytes(Encoding.Raw, PublicFormat.Raw) == raw
    assert to_pem(parsed) == spki(key.public_key())
    assert (parsed.kty, parsed.crv) == ("OKP", crv)
    assert parsed.algorithms == {"EdDSA"}


def test_pem_is_spki_armor_only():
    pem = to_pem(parse_jwk(rsa_jwk()))
    assert pem.startswith("-----BEGIN PUBLIC KEY-----\n")
    assert pem.endswith("-----END PUBLIC KEY-----\n")


def test_rsa_modulus_with_a_leading_zero_octet_is_the_same_key():
    # RFC 7518 §6.3.1.1 notes some libraries emit 257 octets for a 2048-bit modulus.
    n = RSA_KEY.public_key().public_numbers().n
    jwk = rsa_jwk() | {"n": uint(n, 257)}
    assert to_pem(parse_jwk(jwk)) == spki(RSA_KEY.public_key())


# --------------------------------------------------------------------------------------------
# Metadata: kid, alg, use, key_ops and what a caller may verify with


def test_keys_without_use_or_alg_verify_every_algorithm_of_their_type():
    parsed = parse_jwk(rsa_jwk())
    assert parsed.for_signatures
    assert parsed.algorithms == {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
    assert parse_jwk(ec_jwk("P-384")).algorithms == {"ES384"}


def test_alg_narrows_the_algorithms_to_itself():
    assert parse_jwk(rsa_jwk(alg="PS384")).algorithms == {"PS384"}


def test_use_enc_key_is_recognisable_and_verifies_nothing():
    parsed = parse_jwk(rsa_jwk(use="enc", alg="RSA-OAEP", kid="enc-1"))
    assert parsed.use == "enc"
    assert not parsed.for_signatures
    assert parsed.algorithms == frozenset()
    assert to_pem(parsed) == spki(RSA_KEY.public_key())  # still convertible


def test_key_ops_without_verify_verifies_nothing():
    assert not parse_jwk(rsa_jwk(key_ops=["encrypt", "wrapKey"])).for_signatures
    parsed = parse_jwk(rsa_jwk(key_ops=["verify"]))
    assert parsed.for_signatures
    assert parsed.key_ops == ("verify",)


def test_non_signature_alg_leaves_no_algorithm():
    assert parse_jwk(rsa_jwk(alg="RSA-OAEP-256")).algorithms == frozenset()


@pytest.mark.parametrize(
    ("jwk", "message"),
    [
        (rsa_jwk(alg="ES256"), 'alg "ES256" cannot be used with an RSA key; expected PS256 or'),
        (ec_jwk("P-256", alg="ES384"), 'alg "ES384" cannot be used with an EC P-256 key; expected ES256'),
        (ec_jwk("P-521", alg="RS256"), 'alg "RS256" cannot be used with an EC P-521 key; expected ES512'),
        (okp_jwk(ED25519, "Ed25519", alg="ES256"), 'alg "ES256" cannot be used with an OKP Ed25519 key'),
    ],
)
def test_signature_alg_of_another_key_type_is_refused(jwk, message):
    with pytest.raises(InvalidJwkError) as info:
        parse_jwk(jwk)
    assert str(info.value).startswith(message)


def test_describe_names_kid_kty_alg_on_one_line():
    assert describe(parse_jwk(rsa_jwk(kid="abc", alg="RS256", use="sig"))) == (
        "kid=abc kty=RSA alg=RS256 use=sig bits=2048"
    )
    assert describe(parse_jwk(ec_jwk("P-256"))) == "kid=(none) kty=EC alg=(none) crv=P-256"
    hostile = parse_jwk(rsa_jwk(kid="x\n-----BEGIN PUBLIC KEY-----\n"))
    line = describe(hostile)
    assert "\n" not in line
    assert line.startswith('kid="x\\n-----BEGIN PUBLIC KEY-----\\n" kty=RSA')


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"kid": 7}, 'member "kid" must be a string, not a JSON number'),
        ({"alg": None}, 'member "alg" must be a string, not a JSON null'),
        ({"use": ["sig"]}, 'member "use" must be a string, not a JSON array'),
        ({"key_ops": "verify"}, '"key_ops" must be an array of distinct strings (RFC 7517 §4.3)'),
        ({"key_ops": ["verify", "verify"]}, '"key_ops" must be an array of distinct strings (RFC 7517 §4.3)'),
    ],
)
def test_metadata_of_the_wrong_type_is_refused(extra, message):
    with pytest.raises(InvalidJwkError) as info:
        parse_jwk(rsa_jwk(**extra))
    assert info.value.message == message


# --------------------------------------------------------------------------------------------
# Private members: detected, reported, never kept


@pytest.mark.parametrize(
    ("jwk", "names"),
    [
        (rsa_jwk(private=True), ("d", "p", "q", "dp", "dq", "qi")),
        (ec_jwk("P-256", private=True), ("d",)),
        (okp_jwk(ED25519, "Ed25519", private=True), ("d",)),
        (okp_jwk(ED448, "Ed448", private=True), ("d",)),
    ],
    ids=["RSA", "EC", "Ed25519", "Ed448"],
)
def test_private_members_are_reported_and_only_the_public_key_is_kept(jwk, names):
    parsed = parse_jwk(jwk)
    assert parsed.private_members == names
    assert private_members(jwk) == names
    assert "PRIVATE" not in to_pem(parsed)
    # Only public key types can come out of the parser.
    assert isinstance(
        parsed.key,
        rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey,
    )


def test_private_members_are_reported_even_when_malformed():
    # They are never decoded, so garbage there does not matter: it is reported all the same.
    parsed = parse_jwk(rsa_jwk() | {"d": "not base64 !", "oth": [{}]})
    assert parsed.private_members == ("d", "oth")


def test_private_member_names_cover_every_kty():
    assert set(PRIVATE_MEMBERS) == {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


# --------------------------------------------------------------------------------------------
# Unsupported key types and curves


@pytest.mark.parametrize(
    ("jwk", "message"),
    [
        (
            {"kty": "oct", "k": b64u(b"s" * 32)},
            'kty "oct" is a symmetric (shared-secret) key: it has no public part and no PEM form; '
            "for HS256/HS384/HS512 put the secret in a jwt_secrets credential's `secret` instead",
        ),
        (
            {"kty": "RSA-PSS", "n": "AQAB"},
            'unsupported kty "RSA-PSS"; fhirgate reads RSA, EC and OKP public keys',
        ),
        (
            {"kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA"},
            'unsupported crv "secp256k1" for kty EC; expected one of P-256, P-384, P-521',
        ),
        (
            {"kty": "OKP", "crv": "X25519", "x": b64u(b"\1" * 32)},
            'crv "X25519" is a key-agreement (encryption) curve, not a signature key; '
            "expected Ed25519 or Ed448",
        ),
        (
            {"kty": "OKP", "crv": "Ed1174", "x": "AA"},
            'unsupported crv "Ed1174" for kty OKP; expected one of Ed25519, Ed448',
        ),
    ],
    ids=["oct", "unknown-kty", "ec-secp256k1", "okp-X25519", "okp-unknown"],
)
def test_unsupported_key_types_and_curves(jwk, message):
    with pytest.raises(UnsupportedJwkError) as info:
        parse_jwk(jwk)
    assert info.value.message == message
    assert isinstance(info.value, JwkError)


# --------------------------------------------------------------------------------------------
# Malformed members


N = RSA_KEY.public_key().public_numbers().n
P256_X = EC_KEYS["P-256"][0].public_key().public_numbers().x


@pytest.mark.parametrize(
    ("jwk", "message"),
    [
        ({"n": "AQAB"}, 'missing member "kty" (RFC 7517 §4.1); expected one of RSA, EC, OKP'),
        ({"kty": 1}, 'member "kty" must be a string, not a JSON number'),
        ({"kty": "RSA", "e": "AQAB"}, 'missing member "n" (required for kty RSA)'),
        ({"kty": "RSA", "n": uint(N)}, 'missing member "e" (required for kty RSA)'),
        ({"kty": "RSA", "n": 12345, "e": "AQAB"}, 'member "n" must be a base64url string, not a JSON number'),
        ({"kty": "RSA", "n": "", "e": "AQAB"}, 'member "n" is empty'),
        (
            {"kty": "RSA", "n": uint(N) + "==", "e": "AQAB"},
            'member "n" has "=" padding; base64url in JOSE has no padding (RFC 7515 §2)',
        ),
        (
            {"kty": "RSA", "n": base64.b64encode(b"\xfb\xff" * 128).decode().rstrip("="), "e": "AQAB"},
            'member "n" is not base64url: only A-Z a-z 0-9 "-" "_" are allowed (RFC 7515 §2; '
            'standard base64 "+" and "/" are not)',
        ),
        (
            {"kty": "RSA", "n": uint(N)[:-1] + " ", "e": "AQAB"},
            'member "n" is not base64url: only A-Z a-z 0-9 "-" "_" are allowed (RFC 7515 §2; '
            'standard base64 "+" and "/" are not)',
        ),
        ({"kty": "RSA", "n": "AAAAA", "e": "AQAB"}, 'member "n" is not valid base64url (impossible length)'),
        (
            {"kty": "RSA", "n": uint(N), "e": "AR"},
            'member "e" is not valid base64url (non-zero trailing bits)',
        ),
        (
            {"kty": "RSA", "n": "A" * 5000, "e": "AQAB"},
            'member "n" is 5000 characters long, more than any key needs (4096)',
        ),
        (
            {
                "kty": "RSA",
                "n": uint(rsa.generate_private_key(65537, 1024).public_key().public_numbers().n),
                "e": "AQAB",
            },
            "RSA modulus is 1024 bits; at least 2048 are required (RFC 7518 §3.3)",
        ),
        (
            {"kty": "RSA", "n": uint((1 << 2048) - 2), "e": "AQAB"},
            "RSA modulus is even, so it is not an RSA modulus",
        ),
        (
            {"kty": "RSA", "n": uint(N), "e": uint(65536)},
            "RSA public exponent e=65536 is invalid: it must be odd, at least 3 and below n",
        ),
        (
            {"kty": "RSA", "n": uint(N), "e": uint(1)},
            "RSA public exponent e=1 is invalid: it must be odd, at least 3 and below n",
        ),
        (
            {"kty": "RSA", "n": uint(N), "e": uint((1 << 80) + 1)},
            'member "e" is 11 octets; an RSA public exponent is at most 8 (65537 is 3)',
        ),
        ({"kty": "EC", "x": "AA", "y": "AA"}, 'missing member "crv" (required for kty EC)'),
        (
            {"kty": "EC", "crv": "P-256", "x": uint(P256_X, 32), "y": uint(1, 32)},
            "the point (x, y) is not on curve P-256: check that x, y and crv belong to one key",
        ),
        (
            {"kty": "EC", "crv": "P-256", "x": uint(5, 31), "y": uint(1, 32)},
            'member "x" is 31 octets; a P-256 coordinate is exactly 32 (RFC 7518 §6.2.1.2)',
        ),
        (
            ec_jwk("P-521") | {"y": uint(1, 65)},
            'member "y" is 65 octets; a P-521 coordinate is exactly 66 (RFC 7518 §6.2.1.2)',
        ),
        (
            {"kty": "OKP", "crv": "Ed25519", "x": b64u(b"\1" * 31)},
            'member "x" is 31 octets; an Ed25519 public key is exactly 32 (RFC 8037 §2)',
        ),
        (
            {"kty": "OKP", "crv": "Ed448", "x": b64u(b"\1" * 32)},
            'member "x" is 32 octets; an Ed448 public key is exactly 57 (RFC 8037 §2)',
        ),
        ({"kty": "OKP", "crv": "Ed25519"}, 'missing member "x" (required for kty OKP)'),
        ({"kty": "OKP", "crv": ["Ed25519"], "x": "AA"}, 'member "crv" must be a string, not a JSON array'),
    ],
)
def test_malformed_members_are_refused_with_what_is_wrong(jwk, message):
    with pytest.raises(InvalidJwkError) as info:
        parse_jwk(jwk)
    assert info.value.message.startswith(message)
    assert "\n" not in info.value.message


def test_a_point_off_the_curve_is_refused_even_with_the_right_sizes():
    jwk = ec_jwk("P-384")
    y = int.from_bytes(base64.urlsafe_b64decode(jwk["y"] + "=="), "big")
    with pytest.raises(InvalidJwkError, match="not on curve P-384"):
        parse_jwk(jwk | {"y": uint(y ^ 1, 48)})


def test_a_jwk_that_is_not_an_object_is_refused():
    with pytest.raises(InvalidJwkError, match="a JWK must be a JSON object, not a JSON array"):
        parse_jwk([])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# JWK Sets


def jwks_text(*keys: dict) -> str:
    return json.dumps({"keys": list(keys)})


def test_jwks_keeps_every_key_in_order_with_its_metadata():
    document = jwks_text(
        rsa_jwk(kid="rsa", alg="RS256", use="sig"),
        ec_jwk("P-256", kid="ec", alg="ES256"),
        okp_jwk(ED25519, "Ed25519", kid="ed", alg="EdDSA", key_ops=["verify"]),
        rsa_jwk(RSA_3072, kid="enc", use="enc", alg="RSA-OAEP"),
    )
    for source in (document, document.encode(), json.loads(document)):
        jwks = parse_jwks(source)
        assert isinstance(jwks, JwkSet)
        assert [(k.kid, k.kty, k.alg, k.use) for k in jwks.keys] == [
            ("rsa", "RSA", "RS256", "sig"),
            ("ec", "EC", "ES256", None),
            ("ed", "OKP", "EdDSA", None),
            ("enc", "RSA", "RSA-OAEP", "enc"),
        ]
        assert jwks.skipped == ()
        assert [k.kid for k in jwks.keys if k.for_signatures] == ["rsa", "ec", "ed"]
        assert jwks.by_kid("ec") == [jwks.keys[1]]
        assert jwks.by_kid("EC") == []


def test_jwks_skips_unusable_members_and_says_why():
    document = jwks_text(
        {"kty": "oct", "kid": "hmac", "k": b64u(b"secret" * 6)},
        rsa_jwk(kid="good"),
        {"kty": "EC", "kid": "short", "crv": "P-256", "x": "AA", "y": "AA"},
    )
    raw = json.loads(document)
    raw["keys"].append("not-a-key")
    jwks = parse_jwks(raw)
    assert [k.kid for k in jwks.keys] == ["good"]
    assert [(s.index, s.kid, s.kty, type(s.error)) for s in jwks.skipped] == [
        (0, "hmac", "oct", UnsupportedJwkError),
        (2, "short", "EC", InvalidJwkError),
        (3, None, None, InvalidJwkError),
    ]
    assert jwks.skipped[0].private_members == ("k",)
    assert jwks.skipped[2].error.message == "a JWK must be a JSON object, not a JSON string"


def test_jwks_reports_private_members_per_key():
    jwks = parse_jwks(jwks_text(rsa_jwk(kid="leaky", private=True), ec_jwk("P-256", kid="fine")))
    assert {k.kid: k.private_members for k in jwks.keys} == {
        "leaky": ("d", "p", "q", "dp", "dq", "qi"),
        "fine": (),
    }


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            "<html>login</html>",
            "not JSON (Expecting value at line 1 column 1); a JWKS is a JSON object such as",
        ),
        (b"\xff\xfe{", "not JSON (not UTF-8 text)"),
        ("", "not JSON (Expecting value at line 1 column 1)"),
        ("[1, 2]", 'a JWKS is a JSON object with a "keys" array (RFC 7517 §5), not a JSON array'),
        ('"keys"', 'a JWKS is a JSON object with a "keys" array (RFC 7517 §5), not a JSON string'),
        ("{}", 'no "keys" member; a JWKS is a JSON object with a "keys" array (RFC 7517 §5)'),
        ('{"keys": {}}', '"keys" must be a JSON array of JWK objects, not a JSON object'),
        ('{"keys": []}', 'the "keys" array is empty: the JWKS holds no key'),
        (
            '{"kty": "RSA", "n": "AQAB", "e": "AQAB"}',
            'this is a single JWK, not a JWKS; wrap it as {"keys": [ ... ]}',
        ),
        (
            '{"issuer": "https://idp.example", "jwks_uri": "https://idp.example/jwks"}',
            "this is an OpenID Provider / OAuth server metadata document, not a JWKS; its keys are at "
            'jwks_uri "https://idp.example/jwks"',
        ),
        (
            '{"keys": [{"kty": "RSA", "kty": "EC"}]}',
            'duplicate JSON member "kty"; a JWK must not repeat a member',
        ),
        ("[" * 100000, "not JSON (RecursionError)"),
    ],
)
def test_documents_that_are_not_a_jwks_are_refused(document, message):
    with pytest.raises(JwksFormatError) as info:
        parse_jwks(document)
    assert info.value.message.startswith(message)


def test_all_errors_share_one_base():
    assert issubclass(JwksFormatError, JwkError)
    assert issubclass(UnsupportedJwkError, JwkError)
    assert issubclass(InvalidJwkError, JwkError)


def test_a_parsed_key_is_immutable():
    parsed = parse_jwk(rsa_jwk(kid="a"))
    with pytest.raises(AttributeError):
        parsed.kid = "b"  # type: ignore[misc]
    assert isinstance(parsed, Jwk)
