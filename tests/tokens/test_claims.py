"""Claim checks (RFC 7519 §4.1): exp/nbf/iat with leeway, iss exact, aud string or array, typ
policy, Kong's maximum expiration; time from `fhirgate.clock` unless given."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fhirgate import clock
from fhirgate.tokens import (
    ClaimError,
    check_aud,
    check_exp,
    check_iat,
    check_iss,
    check_maximum_expiration,
    check_nbf,
    check_typ,
)

NOW = 1_700_000_000


@pytest.fixture(autouse=True)
def frozen_clock() -> Iterator[None]:
    clock.set_clock(lambda: float(NOW))
    try:
        yield
    finally:
        clock.set_clock(None)


def _fails(fn: object, *args: object, **kw: object) -> tuple[str, str, str]:
    with pytest.raises(ClaimError) as info:
        fn(*args, **kw)  # type: ignore[operator]
    return info.value.claim, info.value.code, info.value.message


def test_exp_is_expired_at_the_second_it_names() -> None:
    check_exp({"exp": NOW + 1})
    assert _fails(check_exp, {"exp": NOW}) == ("exp", "expired", "token expired")
    assert _fails(check_exp, {"exp": NOW - 1})[1] == "expired"


def test_exp_leeway_and_explicit_now() -> None:
    check_exp({"exp": NOW - 5}, leeway=10)
    assert _fails(check_exp, {"exp": NOW - 10}, leeway=10)[1] == "expired"
    check_exp({"exp": NOW}, now=NOW - 1)


@pytest.mark.parametrize("value", ["1700000000", True, None, [1], {"a": 1}, float("inf"), float("nan")])
def test_exp_must_be_a_finite_number(value: object) -> None:
    assert _fails(check_exp, {"exp": value}) == ("exp", "not_a_number", "must be a number")


def test_exp_required_or_optional() -> None:
    assert _fails(check_exp, {}) == ("exp", "missing", "must be a number")
    check_exp({}, required=False)


def test_nbf() -> None:
    check_nbf({"nbf": NOW})
    check_nbf({})
    assert _fails(check_nbf, {"nbf": NOW + 1}) == ("nbf", "not_yet_valid", "token not valid yet")
    check_nbf({"nbf": NOW + 30}, leeway=30)
    assert _fails(check_nbf, {"nbf": "soon"})[1] == "not_a_number"
    assert _fails(check_nbf, {}, required=True)[1] == "missing"


def test_iat() -> None:
    check_iat({"iat": NOW})
    check_iat({})
    assert _fails(check_iat, {"iat": NOW + 61}, leeway=60)[1] == "issued_in_future"
    check_iat({"iat": NOW + 60}, leeway=60)
    assert _fails(check_iat, {"iat": NOW - 3601}, max_age=3600)[1] == "too_old"
    assert _fails(check_iat, {"iat": "x"})[1] == "not_a_number"


def test_maximum_expiration_is_kongs() -> None:
    check_maximum_expiration({"exp": NOW + 300}, 300)
    msg = "exceeds maximum allowed expiration"
    assert _fails(check_maximum_expiration, {"exp": NOW + 301}, 300) == ("exp", "exceeds_maximum", msg)
    assert _fails(check_maximum_expiration, {}, 300)[1] == "exceeds_maximum"


def test_iss_is_compared_exactly() -> None:
    check_iss({"iss": "https://idp.example"}, "https://idp.example")
    check_iss({"iss": "b"}, ["a", "b"])
    for other in ("https://idp.example/", "HTTPS://idp.example", "https://idp.example "):
        assert _fails(check_iss, {"iss": other}, "https://idp.example")[1] == "issuer_mismatch"
    assert _fails(check_iss, {}, "a")[1] == "missing"
    assert _fails(check_iss, {"iss": ["a"]}, "a")[1] == "not_a_string"
    # a substring of an allowed issuer string is not an allowed issuer
    assert _fails(check_iss, {"iss": "idp"}, "https://idp")[1] == "issuer_mismatch"


def test_aud_string_or_array() -> None:
    check_aud({"aud": "api"}, "api")
    check_aud({"aud": ["other", "api"]}, "api")
    check_aud({"aud": "api"}, ["x", "api"])
    assert _fails(check_aud, {"aud": "other"}, "api")[1] == "audience_mismatch"
    assert _fails(check_aud, {"aud": []}, "api")[1] == "audience_mismatch"
    assert _fails(check_aud, {}, "api")[1] == "missing"
    assert _fails(check_aud, {"aud": [1]}, "api")[1] == "not_a_string"
    assert _fails(check_aud, {"aud": {"api": 1}}, "api")[1] == "not_a_string"
    assert _fails(check_aud, {"aud": "ap"}, "api")[1] == "audience_mismatch"


def test_typ_policy() -> None:
    for typ in ("JWT", "jwt", "at+jwt", "AT+JWT", "application/at+jwt", None):
        check_typ({} if typ is None else {"typ": typ})
    assert _fails(check_typ, {"typ": "id_token+jwt"})[1] == "typ_not_allowed"
    assert _fails(check_typ, {"typ": 1})[1] == "typ_not_allowed"
    strict = {"at+jwt"}
    check_typ({"typ": "at+JWT"}, strict)
    assert _fails(check_typ, {"typ": "JWT"}, strict)[1] == "typ_not_allowed"
    assert _fails(check_typ, {}, strict)[1] == "typ_not_allowed"
