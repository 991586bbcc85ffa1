"""`fhirgate.tokens.parse_jwt`: compact JWS parsing, strict base64url, bounded sizes, `alg` and
`crit` policy, and the error codes (in Kong's order) that callers map to messages."""

from __future__ import annotations

import pytest

from fhirgate.tokens import (
    MAX_TOKEN_LENGTH,
    MalformedTokenError,
    b64url_decode,
    b64url_encode,
    parse_jwt,
)
from tests.tokens.jwtkit import b64, segment, sign

CLAIMS = {"iss": "k", "sub": "alice"}


def _code(token: str, **kw: object) -> str:
    with pytest.raises(MalformedTokenError) as info:
        parse_jwt(token, **kw)  # type: ignore[arg-type]
    return info.value.code


def test_parses_header_claims_signing_input_and_signature() -> None:
    token = sign(CLAIMS, "HS256", header={"alg": "HS256", "typ": "JWT", "kid": "k1"})
    jwt = parse_jwt(token)
    assert jwt.header == {"alg": "HS256", "typ": "JWT", "kid": "k1"}
    assert jwt.claims == CLAIMS
    assert jwt.alg == "HS256"
    assert jwt.kid == "k1"
    assert jwt.signing_input == token.rsplit(".", 1)[0].encode()
    assert b64(jwt.signature) == token.rsplit(".", 1)[1]
    assert jwt.token == token


@pytest.mark.parametrize("typ", ["jwt", None])
def test_accepts_lowercase_or_missing_typ(typ: str | None) -> None:
    header = {"alg": "HS256"} if typ is None else {"alg": "HS256", "typ": typ}
    assert parse_jwt(sign(CLAIMS, header=header)).claims == CLAIMS


def test_non_string_kid_is_not_a_kid() -> None:
    assert parse_jwt(sign(CLAIMS, header={"alg": "HS256", "kid": 7})).kid is None


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "none"},
        {"alg": "None"},
        {"alg": "NONE"},
        {"typ": "JWT"},
        {"alg": 256},
        {"alg": "HS1"},
        {"alg": ""},
    ],
)
def test_refuses_missing_unknown_and_none_alg(header: dict[str, object]) -> None:
    token = f"{segment(header)}.{segment(CLAIMS)}."
    assert _code(token) == "alg_invalid"


def test_alg_allow_list_can_be_narrowed() -> None:
    assert _code(sign(CLAIMS, "HS256"), algorithms={"RS256"}) == "alg_invalid"


@pytest.mark.parametrize(
    ("token", "code"),
    [
        ("", "truncated"),
        ("abc", "truncated"),
        ("abc.def", "truncated"),
        ("!!!.e30.", "header_json"),
        (f"{segment({'alg': 'HS256'})}.!!!.", "payload_json"),
        (f"{segment({'alg': 'HS256'})}.{b64(b'not json')}.", "payload_json"),
        (f"{b64(b'not json')}.e30.", "header_json"),
        (f"{segment([1, 2])}.e30.", "header_json"),
        (f"{segment({'alg': 'HS256'})}.{segment(None)}.", "claims_not_object"),
        (f"{segment({'alg': 'HS256'})}.{segment([1])}.", "claims_not_object"),
        (f"{segment({'alg': 'HS256'})}.{segment('str')}.", "claims_not_object"),
        (f"{segment({'alg': 'HS256'})}.e30.***", "signature_encoding"),
        (f"{segment({'alg': 'HS256'})}.e30.abc.def", "extra_segments"),
        (f"{segment({'alg': 'HS256'})}.e30.a", "signature_encoding"),  # impossible length
    ],
)
def test_malformed_tokens_get_a_code(token: str, code: str) -> None:
    assert _code(token) == code


def test_json_errors_come_before_alg_then_claims_then_signature() -> None:
    # Kong's jwt_parser order: JSON of both segments, then alg, then claims, then signature.
    none_header = segment({"alg": "none"})
    assert _code(f"{none_header}.!!!.***") == "payload_json"
    assert _code(f"{none_header}.{segment(None)}.***") == "alg_invalid"
    assert _code(f"{segment({'alg': 'HS256'})}.{segment(None)}.***") == "claims_not_object"


@pytest.mark.parametrize(
    "bad",
    [
        "e30=",  # padding is not part of base64url (RFC 7515 §2)
        "e3+0",  # '+' and '/' are the standard alphabet, not the URL-safe one
        "e3/0",
        "e3 0",
        "e30\n",
        "é30",
    ],
)
def test_base64url_is_strict(bad: str) -> None:
    with pytest.raises(ValueError):
        b64url_decode(bad)
    assert _code(f"{bad}.{segment(CLAIMS)}.") == "header_json"
    assert _code(f"{segment({'alg': 'HS256'})}.{bad}.") == "payload_json"


def test_b64url_round_trip() -> None:
    for n in range(0, 10):
        data = bytes(range(250, 250 - n, -1))
        assert b64url_decode(b64url_encode(data)) == data


@pytest.mark.parametrize(
    "raw",
    [b'{"alg":"HS256","x":NaN}', b'{"alg":"HS256","x":Infinity}', b'{"alg":"HS256"', b'{"alg":"\xff"}'],
)
def test_json_is_strict_rfc8259_utf8(raw: bytes) -> None:
    assert _code(f"{b64(raw)}.{segment(CLAIMS)}.") == "header_json"


def test_size_caps() -> None:
    big = sign({"iss": "k", "pad": "x" * MAX_TOKEN_LENGTH})
    assert _code(big) == "token_too_large"
    assert _code(sign(CLAIMS), max_length=20) == "token_too_large"
    header = {"alg": "HS256", "pad": "y" * 3000}
    assert _code(sign(CLAIMS, header=header)) == "header_too_large"
    assert _code(sign(CLAIMS), max_header_length=5) == "header_too_large"
    # the cap holds on the slow path too (a token that is malformed elsewhere)
    assert _code(sign(CLAIMS, header=header) + "!") == "header_too_large"


@pytest.mark.parametrize("crit", [["exp"], ["b64"], [], "b64", [1], ["x-custom"]])
def test_crit_is_refused_unless_understood(crit: object) -> None:
    token = sign(CLAIMS, header={"alg": "HS256", "crit": crit, "b64": True, "exp": 1, "x-custom": 1})
    assert _code(token) == "crit_unsupported"


def test_crit_names_the_caller_understands_are_accepted() -> None:
    token = sign(CLAIMS, header={"alg": "HS256", "crit": ["x-custom"], "x-custom": 1})
    assert parse_jwt(token, understood_crit={"x-custom"}).header["crit"] == ["x-custom"]


def test_key_pointing_headers_are_kept_as_data_only() -> None:
    header = {
        "alg": "HS256",
        "jku": "http://x/jwks",
        "x5u": "http://x/c",
        "jwk": {"kty": "oct"},
        "x5c": ["a"],
    }
    assert parse_jwt(sign(CLAIMS, header=header)).header == header


def test_error_carries_code_and_message() -> None:
    with pytest.raises(MalformedTokenError) as info:
        parse_jwt("a.b")
    assert info.value.code == "truncated"
    assert "three" in info.value.message
