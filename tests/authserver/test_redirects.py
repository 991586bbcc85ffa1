"""Redirect URI matching: exact, except the port of a loopback http URI; never with whitespace or
control characters (URL parsers drop tabs and newlines, so `c\\tb` would otherwise match `cb`)."""

from __future__ import annotations

import pytest

from fhirgate.authserver.redirects import redirect_uri_matches

REGISTERED = "http://127.0.0.1:8080/cb"


@pytest.mark.parametrize(
    "requested", ["http://127.0.0.1:8080/cb", "http://127.0.0.1:9/cb", "http://127.0.0.1/cb"]
)
def test_loopback_may_vary_the_port_only(requested: str) -> None:
    assert redirect_uri_matches(REGISTERED, requested)


@pytest.mark.parametrize(
    "requested",
    [
        "http://127.0.0.1:9/c\tb",
        "http://127.0.0.1:9/cb\n",
        "http://127.0.0.1:9/c\rb",
        "http://127.0.0.1:9/cb ",
        "http://127.0.0.1:8080/cb\x00",
        "http://127.0.0.1:9/cb/",
        "http://127.0.0.1:9/cb?x",
        "http://127.0.0.1:9/cb#f",
        "http://localhost:9/cb",
        "https://127.0.0.1:9/cb",
        "http://127.0.0.1:9@evil.example/cb",
    ],
)
def test_everything_else_differs(requested: str) -> None:
    assert not redirect_uri_matches(REGISTERED, requested)


def test_non_loopback_must_be_identical() -> None:
    assert redirect_uri_matches("https://app.example/cb", "https://app.example/cb")
    assert not redirect_uri_matches("https://app.example/cb", "https://app.example:443/cb")
    assert not redirect_uri_matches("https://app.example/cb", "https://app.example/c\tb")
