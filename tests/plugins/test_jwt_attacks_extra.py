"""More of the `jwt` plugin's attack catalogue (issue 3 §6), filling what `test_jwt.py` leaves out:
duplicate `Authorization` headers, a token in the header and the query string at once, duplicate
JSON members in the JOSE header and the claims, a 1 MB token, NUL bytes and non-ASCII characters,
and `kid` values shaped like paths, URLs or SQL. Every refusal asserts the exact status, body and
`WWW-Authenticate`, and that the upstream received nothing."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.harness import GatewayHandle, Reply, Upstream, parse_responses, raw_request, running_gateway
from tests.tokens.jwtkit import b64, raw_signature, sign

SECRET = b"attack-secret-one-of-at-least-32-bytes"
OTHER_SECRET = b"attack-secret-two-of-at-least-32-bytes"
INVALID = 'Bearer error="invalid_token"'
WWW = "www-authenticate"
MEGABYTE = 1_000_000


def config(upstream_url: str) -> dict[str, Any]:
    routes = [
        {"name": "iss", "hosts": ["iss.test"], "plugins": [{"name": "jwt"}]},
        {
            "name": "kid",
            "hosts": ["kid.test"],
            "plugins": [{"name": "jwt", "config": {"key_claim_name": "kid"}}],
        },
        {
            "name": "cookie",
            "hosts": ["cookie.test"],
            "plugins": [{"name": "jwt", "config": {"cookie_names": ["c"]}}],
        },
    ]
    return {
        "_format_version": "3.0",
        "services": [{"name": "s1", "url": upstream_url, "routes": routes}],
        "consumers": [
            {"username": "patient", "jwt_secrets": [{"key": "patient-key", "secret": SECRET.decode()}]},
            {"username": "admin", "jwt_secrets": [{"key": "admin-key", "secret": OTHER_SECRET.decode()}]},
        ],
    }


@pytest.fixture(scope="module")
def up() -> Iterator[Upstream]:
    upstream = Upstream()
    upstream.handler = lambda req: Reply(body=json.dumps({"headers": dict(req.headers)}).encode())
    try:
        yield upstream
    finally:
        upstream.close()


@pytest.fixture(scope="module")
def gw(up: Upstream) -> Iterator[GatewayHandle]:
    with running_gateway(config(up.url)) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(gw: GatewayHandle) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        yield c


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iat": now, "exp": now + 3600, **extra}


def patient_token() -> str:
    return sign(claims(iss="patient-key"), key=SECRET)


def forged_admin_token() -> str:
    """Claims to be the admin, signed with a key the attacker has (the patient's)."""
    return sign(claims(iss="admin-key", sub="admin"), key=SECRET)


def raw_token(header_json: bytes, claims_json: bytes, key: bytes) -> str:
    """An HS256 token over hand-written JSON (to carry duplicate members)."""
    signing_input = f"{b64(header_json)}.{b64(claims_json)}"
    return f"{signing_input}.{b64(raw_signature('HS256', key, signing_input.encode()))}"


def send(
    client: httpx.Client, up: Upstream, host: str, headers: list[tuple[str, str]], path: str = "/r"
) -> Any:
    """(response, number of requests the upstream received for it)."""
    before = len(up.requests)
    res = client.get(path, headers=[("Host", f"{host}.test"), *headers])
    return res, len(up.requests) - before


def assert_refused(
    res: httpx.Response, seen: int, body: Any, www: str | None = INVALID, status: int = 401
) -> None:
    assert seen == 0, "the upstream must see nothing"
    assert res.status_code == status, res.text
    assert res.json() == body
    assert res.headers.get(WWW) == www
    assert res.headers["content-type"].startswith("application/json")


def assert_identified(res: httpx.Response, seen: int, username: str, credential: str) -> None:
    assert res.status_code == 200, res.text
    assert seen == 1
    headers = res.json()["headers"]
    assert headers["x-consumer-username"] == username
    assert headers["x-credential-identifier"] == credential


def bearer(token: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")


# --- duplicate Authorization headers ------------------------------------------------------------


def test_duplicate_authorization_headers_use_the_first(client: httpx.Client, up: Upstream) -> None:
    """Kong reads only the first occurrence; a forged second token is never looked at."""
    res, seen = send(client, up, "iss", [bearer(patient_token()), bearer(forged_admin_token())])
    assert_identified(res, seen, "patient", "patient-key")
    res, seen = send(client, up, "iss", [bearer(forged_admin_token()), bearer(patient_token())])
    assert_refused(res, seen, {"message": "Invalid signature"})


def test_a_first_authorization_header_that_is_not_bearer_means_no_token(
    client: httpx.Client, up: Upstream
) -> None:
    res, seen = send(
        client, up, "iss", [("Authorization", "Basic cGF0aWVudDpwdw=="), bearer(patient_token())]
    )
    assert_refused(res, seen, {"message": "Unauthorized"}, "Bearer")


def test_folded_authorization_headers_are_one_bad_token(client: httpx.Client, up: Upstream) -> None:
    """Two values folded into one header by a proxy (`a, b`) are one value, whose signature segment
    is then not base64url."""
    value = f"Bearer {patient_token()}, Bearer {forged_admin_token()}"
    res, seen = send(client, up, "iss", [("Authorization", value)])
    assert_refused(res, seen, {"message": "Bad token; invalid signature"})


# --- token in header and query (or cookie) at once ------------------------------------------------


@pytest.mark.parametrize("query_token", ["forged", "garbage", "empty-signature"])
def test_token_in_header_and_query(client: httpx.Client, up: Upstream, query_token: str) -> None:
    """A valid header token plus any other query token is refused before either is decoded."""
    other = {
        "forged": forged_admin_token(),
        "garbage": "x",
        "empty-signature": patient_token().rsplit(".", 1)[0] + ".",
    }[query_token]
    res, seen = send(client, up, "iss", [bearer(patient_token())], path=f"/r?jwt={other}")
    assert_refused(res, seen, {"message": "Multiple tokens provided"})


def test_token_in_header_and_cookie(client: httpx.Client, up: Upstream) -> None:
    res, seen = send(client, up, "cookie", [bearer(patient_token()), ("Cookie", f"c={forged_admin_token()}")])
    assert_refused(res, seen, {"message": "Multiple tokens provided"})


def test_the_same_token_percent_encoded_in_the_query_collapses(client: httpx.Client, up: Upstream) -> None:
    """The query value is compared after decoding, as Kong's `get_uri_args` does."""
    token = patient_token()
    encoded = token.replace(".", "%2E", 1)
    res, seen = send(client, up, "iss", [bearer(token)], path=f"/r?jwt={encoded}")
    assert_identified(res, seen, "patient", "patient-key")


# --- duplicate JSON members -----------------------------------------------------------------------


def test_duplicate_alg_members_take_the_lexically_last(client: httpx.Client, up: Upstream) -> None:
    """RFC 7515 §4 allows rejecting duplicates or using the lexically last member (as Kong's cjson
    does); the gateway does the latter, consistently: the signature covers the exact bytes, and the
    `alg` that counts is the last one."""
    payload = json.dumps(claims(iss="patient-key")).encode()
    last_hs256 = raw_token(b'{"alg":"none","alg":"HS256"}', payload, SECRET)
    res, seen = send(client, up, "iss", [bearer(last_hs256)])
    assert_identified(res, seen, "patient", "patient-key")

    last_none = raw_token(b'{"alg":"HS256","alg":"none"}', payload, SECRET)
    res, seen = send(client, up, "iss", [bearer(last_none)])
    assert_refused(res, seen, {"message": "Bad token; invalid alg"})
    res, seen = send(client, up, "iss", [bearer(last_none.rsplit(".", 1)[0] + ".")])
    assert_refused(res, seen, {"message": "Bad token; invalid alg"})

    last_rs256 = raw_token(b'{"alg":"HS256","alg":"RS256"}', payload, SECRET)
    res, seen = send(client, up, "iss", [bearer(last_rs256)])
    assert_refused(res, seen, {"message": "Invalid algorithm"})


def test_duplicate_kid_members_take_the_lexically_last(client: httpx.Client, up: Upstream) -> None:
    payload = json.dumps(claims()).encode()
    header = b'{"alg":"HS256","kid":"admin-key","kid":"patient-key"}'
    res, seen = send(client, up, "kid", [bearer(raw_token(header, payload, SECRET))])
    assert_identified(res, seen, "patient", "patient-key")
    # signed with the first kid's secret: the first member is never the one looked up
    res, seen = send(client, up, "kid", [bearer(raw_token(header, payload, OTHER_SECRET))])
    assert_refused(res, seen, {"message": "Invalid signature"})


def test_duplicate_iss_members_take_the_lexically_last(client: httpx.Client, up: Upstream) -> None:
    now = int(time.time())
    payload = f'{{"iss":"admin-key","exp":{now + 3600},"iss":"patient-key"}}'.encode()
    header = b'{"alg":"HS256","typ":"JWT"}'
    res, seen = send(client, up, "iss", [bearer(raw_token(header, payload, SECRET))])
    assert_identified(res, seen, "patient", "patient-key")
    res, seen = send(client, up, "iss", [bearer(raw_token(header, payload, OTHER_SECRET))])
    assert_refused(res, seen, {"message": "Invalid signature"})


# --- a 1 MB token ---------------------------------------------------------------------------------


def big_token() -> str:
    return sign(claims(iss="patient-key", pad="x" * MEGABYTE), key=SECRET)


def test_a_megabyte_token_in_the_header_is_431(client: httpx.Client, up: Upstream) -> None:
    started = time.perf_counter()
    res, seen = send(client, up, "iss", [bearer(big_token())])
    assert time.perf_counter() - started < 1.0
    assert_refused(res, seen, {"message": "Request Header Fields Too Large"}, None, 431)


def test_a_megabyte_token_in_the_query_is_414(gw: GatewayHandle, up: Upstream) -> None:
    """Refused once the request line passes the server's limit, before the rest has been sent
    (sending all of it into a closed connection would only get a reset)."""
    before = len(up.requests)
    request = f"GET /r?jwt={big_token()} HTTP/1.1\r\nHost: iss.test\r\n\r\n".encode()
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", gw.port()), timeout=5) as sock:
        sock.sendall(request[: 64 * 1024])
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    [(status, headers, body)] = parse_responses(received)
    assert time.perf_counter() - started < 1.0
    assert len(up.requests) == before
    assert status == 414
    assert json.loads(body) == {"message": "Request-URI Too Long"}
    assert WWW not in headers


def test_a_megabyte_token_that_reaches_the_plugin_is_refused_fast(up: Upstream) -> None:
    """With the server's limits raised, the plugin's own length cap refuses it before decoding."""
    token = big_token()
    with (
        running_gateway(config(up.url), max_header_size=4 * MEGABYTE, max_request_line=4 * MEGABYTE) as big,
        httpx.Client(base_url=big.url, timeout=10) as c,
    ):
        started = time.perf_counter()
        res, seen = send(c, up, "iss", [bearer(token)])
        assert time.perf_counter() - started < 1.0
    assert_refused(res, seen, {"message": "Bad token; invalid JSON"})


# --- NUL bytes and non-ASCII ----------------------------------------------------------------------


@pytest.mark.parametrize("where", ["inside", "end"])
def test_a_nul_byte_in_the_header_is_a_bad_request(gw: GatewayHandle, up: Upstream, where: str) -> None:
    token = patient_token()
    token = token[:20] + "\x00" + token[20:] if where == "inside" else token + "\x00"
    before = len(up.requests)
    request = b"GET /r HTTP/1.1\r\nHost: iss.test\r\nAuthorization: Bearer " + token.encode() + b"\r\n\r\n"
    [(status, headers, body)] = parse_responses(raw_request(gw.port(), request))
    assert len(up.requests) == before
    assert status == 400
    assert json.loads(body) == {"message": "Bad request: Invalid header value char"}
    assert WWW not in headers
    assert headers["connection"] == "close"


def test_non_ascii_in_the_header_token(gw: GatewayHandle, up: Upstream) -> None:
    token = patient_token()
    token = token[:20] + "é" + token[20:]
    before = len(up.requests)
    request = b"GET /r HTTP/1.1\r\nHost: iss.test\r\nAuthorization: Bearer " + token.encode() + b"\r\n\r\n"
    [(status, headers, body)] = parse_responses(raw_request(gw.port(), request, read_until_close=False))
    assert len(up.requests) == before
    assert status == 401
    assert json.loads(body) == {"message": "Bad token; invalid JSON"}
    assert headers[WWW] == INVALID


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda t: t[:20] + "%00" + t[20:], "Bad token; invalid JSON"),
        (lambda t: t + "%00", "Bad token; invalid signature"),
        (lambda t: t[:20] + "%C3%A9" + t[20:], "Bad token; invalid JSON"),
        (lambda t: t + "%C3%A9", "Bad token; invalid signature"),
        (lambda t: t[:20] + "%FF" + t[20:], "Bad token; invalid JSON"),
    ],
)
def test_nul_and_non_ascii_in_the_query_token(
    client: httpx.Client, up: Upstream, mangle: Any, message: str
) -> None:
    res, seen = send(client, up, "iss", [], path=f"/r?jwt={mangle(patient_token())}")
    assert_refused(res, seen, {"message": message})


@pytest.mark.parametrize(
    "segment_bytes",
    [b'{"iss":"patient-key\xff"}', b'{"iss":"patient-key","x":"\x00"}', b'\xef\xbb\xbf{"iss":"patient-key"}'],
)
def test_invalid_utf8_control_chars_or_bom_in_the_claims(
    client: httpx.Client, up: Upstream, segment_bytes: bytes
) -> None:
    token = raw_token(b'{"alg":"HS256"}', segment_bytes, SECRET)
    res, seen = send(client, up, "iss", [bearer(token)])
    assert_refused(res, seen, {"message": "Bad token; invalid JSON"})


@pytest.mark.parametrize(
    "iss",
    ["pátient-key", "patient-key\u200b", "\uff50\uff41\uff54\uff49\uff45\uff4e\uff54-key", "patient-key\x00"],
)
def test_non_ascii_or_nul_key_claims_are_compared_exactly(
    client: httpx.Client, up: Upstream, iss: str
) -> None:
    res, seen = send(client, up, "iss", [bearer(sign(claims(iss=iss), key=SECRET))])
    assert_refused(res, seen, {"message": "No credentials found for given 'iss'"})


# --- kid shaped like paths, URLs or SQL ----------------------------------------------------------


@pytest.mark.parametrize(
    "kid",
    [
        "/etc/passwd",
        "..\\..\\patient-key",
        "./patient-key",
        "patient-key/.",
        "file:///dev/zero",
        "http://127.0.0.1:1/key",
        "patient-key' OR '1'='1",
        "patient-key'; DROP TABLE jwt_secrets;--",
        "' UNION SELECT secret FROM jwt_secrets --",
        "patient-key\n",
        "patient-key\r\nX-Injected: 1",
        "patient%2Dkey",
        "patient-*",
        ".*",
        "$(cat /etc/passwd)",
    ],
)
def test_kid_is_only_a_lookup_key(client: httpx.Client, up: Upstream, kid: str) -> None:
    """Signed with a real credential's secret, so any fuzzy or injectable lookup would let it in."""
    token = sign(claims(), key=SECRET, header={"alg": "HS256", "kid": kid})
    res, seen = send(client, up, "kid", [bearer(token)])
    assert_refused(res, seen, {"message": "No credentials found for given 'kid'"})
    assert "x-injected" not in res.headers


def test_a_huge_kid_is_refused_by_the_header_cap(client: httpx.Client, up: Upstream) -> None:
    token = sign(claims(), key=SECRET, header={"alg": "HS256", "kid": "patient-key" * 1000})
    res, seen = send(client, up, "kid", [bearer(token)])
    assert_refused(res, seen, {"message": "Bad token; invalid JSON"})


@pytest.mark.parametrize("kid", [{"$ne": None}, ["patient-key"], 1, None, True])
def test_non_string_kid(client: httpx.Client, up: Upstream, kid: Any) -> None:
    token = sign(claims(), key=SECRET, header={"alg": "HS256", "kid": kid})
    res, seen = send(client, up, "kid", [bearer(token)])
    message = "No mandatory 'kid' in claims" if kid is None else "Invalid 'kid' in claims"
    assert_refused(res, seen, {"message": message})
