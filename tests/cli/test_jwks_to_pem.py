"""`fhirgate jwks-to-pem SOURCE [--kid KID]`, run as the operator runs it: a subprocess reading a
file, stdin, or a real HTTP(S) server on 127.0.0.1. Exit codes, stdout and stderr exactly.

The last test replays the article fhirgate starts from: JWKS -> PEM -> a consumer's `jwt_secrets`
credential -> requests through `/fhir`.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from tests.gateway.test_tls import build_pki
from tests.harness import Upstream, running_gateway

from fhirgate.cli.jwks_cmd import jwks_to_pem
from fhirgate.cli.main import main

# --------------------------------------------------------------------------------------------
# Keys and documents


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def uint(value: int, length: int | None = None) -> str:
    return b64u(value.to_bytes(length or (value.bit_length() + 7) // 8, "big"))


def spki(key) -> str:
    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def rsa_jwk(key: rsa.RSAPrivateKey = RSA_KEY, **extra) -> dict:
    pub = key.public_key().public_numbers()
    return {"kty": "RSA", "n": uint(pub.n), "e": uint(pub.e), **extra}


def ec_jwk(**extra) -> dict:
    pub = EC_KEY.public_key().public_numbers()
    return {"kty": "EC", "crv": "P-256", "x": uint(pub.x, 32), "y": uint(pub.y, 32), **extra}


def ed_jwk(**extra) -> dict:
    raw = ED_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": b64u(raw), **extra}


JWKS = {
    "keys": [
        rsa_jwk(kid="rsa-1", alg="RS256", use="sig"),
        ec_jwk(kid="ec-1", alg="ES256"),
        ed_jwk(kid="ed-1", alg="EdDSA"),
    ]
}
JWKS_BYTES = json.dumps(JWKS).encode()
EXPECTED_STDOUT = (
    "kid=rsa-1 kty=RSA alg=RS256 use=sig bits=2048\n"
    + spki(RSA_KEY.public_key())
    + "\nkid=ec-1 kty=EC alg=ES256 crv=P-256\n"
    + spki(EC_KEY.public_key())
    + "\nkid=ed-1 kty=OKP alg=EdDSA crv=Ed25519\n"
    + spki(ED_KEY.public_key())
)


# --------------------------------------------------------------------------------------------
# Running the command


@dataclass
class Result:
    code: int
    out: str
    err: str


def clean_env(**extra: str) -> dict[str, str]:
    # A proxy from the developer's environment must not carry requests to 127.0.0.1 elsewhere.
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(extra)
    return env


def cli(*args: str, stdin: bytes | None = None, **env: str) -> Result:
    proc = subprocess.run(
        [sys.executable, "-m", "fhirgate.cli.main", "jwks-to-pem", *args],
        input=stdin,
        capture_output=True,
        timeout=30,
        env=clean_env(**env),
    )
    return Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


@pytest.fixture
def run(capsys, monkeypatch) -> Callable[..., Result]:
    """The same command in-process (faster than a subprocess; same argument parsing and output)."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)

    def _run(*args: str, stdin: bytes | None = None) -> Result:
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        code = main(["jwks-to-pem", *args])
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return _run


@pytest.fixture
def jwks_file(tmp_path: Path) -> Callable[[object], str]:
    def write(document: object, name: str = "jwks.json") -> str:
        path = tmp_path / name
        path.write_bytes(document if isinstance(document, bytes) else json.dumps(document).encode())
        return str(path)

    return write


# --------------------------------------------------------------------------------------------
# A real HTTP server on 127.0.0.1


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_length: bool = True  # False: the body ends when the connection closes (HTTP/1.0)
    delay: float = 0.0


class JwksServer:
    """Serves `routes` (path -> Route); records every path requested."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(self.path)
                route = outer.routes.get(self.path, Route(404, b"not found"))
                if route.delay:
                    time.sleep(route.delay)
                self.send_response(route.status)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                if route.content_length:
                    self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                try:
                    self.wfile.write(route.body)
                except OSError:
                    pass  # the client gave up (size cap, timeout): expected

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if ssl_context is not None:
            self.httpd.socket = ssl_context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.scheme = "https" if ssl_context is not None else "http"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[JwksServer]:
    srv = JwksServer()
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def other_server() -> Iterator[JwksServer]:
    srv = JwksServer()
    try:
        yield srv
    finally:
        srv.close()


# --------------------------------------------------------------------------------------------
# Files and stdin


def test_file_prints_each_key_after_a_line_naming_it(jwks_file):
    result = cli(jwks_file(JWKS))
    assert (result.code, result.err) == (0, "")
    assert result.out == EXPECTED_STDOUT


def test_kid_prints_only_that_keys_pem_armor(jwks_file):
    result = cli(jwks_file(JWKS), "--kid", "rsa-1")
    assert (result.code, result.err) == (0, "")
    assert result.out == spki(RSA_KEY.public_key())
    result = cli(jwks_file(JWKS), "--kid", "ed-1")
    assert result.out == spki(ED_KEY.public_key())


def test_stdin_is_read_with_a_dash():
    result = cli("-", "--kid", "ec-1", stdin=JWKS_BYTES)
    assert (result.code, result.out, result.err) == (0, spki(EC_KEY.public_key()), "")


def test_kid_not_found_names_the_kids_there_are(run, jwks_file):
    path = jwks_file(JWKS)
    result = run(path, "--kid", "rsa-2")
    assert (result.code, result.out) == (1, "")
    assert result.err == (
        f'error: {path}: no key with kid "rsa-2"; the kids in this JWKS are "rsa-1", "ec-1", "ed-1" '
        "(run without --kid to see them)\n"
    )


def test_kid_naming_two_keys_is_refused(run, jwks_file):
    path = jwks_file({"keys": [rsa_jwk(kid="k"), ec_jwk(kid="k")]})
    result = run(path, "--kid", "k")
    assert (result.code, result.out) == (1, "")
    assert result.err == (
        f'error: {path}: 2 keys have kid "k", so it does not name one key; '
        "run without --kid to see them all\n"
    )


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            b"<html>Sign in</html>",
            'not JSON (Expecting value at line 1 column 1); a JWKS is a JSON object such as {"keys": [...]}',
        ),
        (b'{"issuer": "x"}', 'no "keys" member; a JWKS is a JSON object with a "keys" array (RFC 7517 §5)'),
        (b'{"keys": []}', 'the "keys" array is empty: the JWKS holds no key'),
        (
            json.dumps(rsa_jwk(kid="a")).encode(),
            'this is a single JWK, not a JWKS; wrap it as {"keys": [ ... ]}',
        ),
    ],
    ids=["not-json", "no-keys", "empty-keys", "single-jwk"],
)
def test_bad_input_exits_1_with_one_error_line(run, jwks_file, document, message):
    path = jwks_file(document)
    result = run(path)
    assert (result.code, result.out) == (1, "")
    assert result.err == f"error: {path}: {message}\n"


def test_missing_file_says_what_source_can_be(run, tmp_path):
    path = str(tmp_path / "nope.json")
    result = run(path)
    assert (result.code, result.out) == (1, "")
    assert result.err == (
        f"error: {path}: no such file; give a path to a JWKS file, an http(s):// URL, or - for stdin\n"
    )


def test_only_unconvertible_keys_is_an_error(run, jwks_file):
    path = jwks_file({"keys": [{"kty": "oct", "kid": "h", "k": b64u(b"x" * 32)}]})
    result = run(path)
    assert (result.code, result.out) == (1, "")
    lines = result.err.splitlines()
    assert lines[0] == (
        'warning: key #0 (kid "h") carries private members (k): this JWKS exposes a private key; only '
        "public parts are printed. Publish only public members and replace (rotate) that key."
    )
    assert lines[1].startswith(
        'warning: skipping key #0 (kid "h"): kty "oct" is a symmetric (shared-secret) key'
    )
    assert lines[2] == (
        f"error: {path}: none of its 1 key(s) can be written as a PEM public key (see the warnings above); "
        "fhirgate reads RSA, EC (P-256, P-384, P-521) and OKP (Ed25519, Ed448) public keys"
    )
    assert len(lines) == 3


def test_unconvertible_keys_are_skipped_with_a_warning_when_others_exist(run, jwks_file):
    path = jwks_file({"keys": [{"kty": "OKP", "crv": "X25519", "x": b64u(b"\1" * 32)}, *JWKS["keys"]]})
    result = run(path)
    assert result.code == 0
    assert result.out == EXPECTED_STDOUT
    assert result.err == (
        'warning: skipping key #0: crv "X25519" is a key-agreement (encryption) curve, not a signature '
        "key; expected Ed25519 or Ed448\n"
    )


def test_kid_of_an_unconvertible_key_says_why(run, jwks_file):
    path = jwks_file({"keys": [{"kty": "oct", "kid": "h", "k": b64u(b"x" * 32)}, rsa_jwk(kid="r")]})
    result = run(path, "--kid", "h")
    assert (result.code, result.out) == (1, "")
    assert result.err.splitlines()[-1].startswith(
        f'error: {path}: key "h" cannot be converted: kty "oct" is a symmetric (shared-secret) key'
    )


def test_private_members_are_warned_about_and_never_printed(run, jwks_file):
    priv = RSA_KEY.private_numbers()
    leaky = rsa_jwk(kid="rsa-1", alg="RS256", use="sig") | {
        "d": uint(priv.d),
        "p": uint(priv.p),
        "q": uint(priv.q),
        "dp": uint(priv.dmp1),
        "dq": uint(priv.dmq1),
        "qi": uint(priv.iqmp),
    }
    path = jwks_file({"keys": [leaky]})
    for args in ((path,), (path, "--kid", "rsa-1")):
        result = run(*args)
        assert result.code == 0
        assert "PRIVATE" not in result.out
        assert result.out.endswith(spki(RSA_KEY.public_key()))
        assert result.err == (
            'warning: the RSA key (kid "rsa-1") carries private members (d, p, q, dp, dq, qi): this JWKS '
            "exposes a private key; only public parts are printed. Publish only public members and "
            "replace (rotate) that key.\n"
        )


def test_a_hostile_kid_cannot_forge_pem_lines(run, jwks_file):
    kid = "x\n-----END PUBLIC KEY-----\n-----BEGIN PUBLIC KEY-----\nAAAA"
    result = run(jwks_file({"keys": [rsa_jwk(kid=kid)]}))
    assert result.code == 0
    # PEM readers (RFC 7468 §2, OpenSSL) only take armor at the start of a line.
    assert [line for line in result.out.splitlines() if line.startswith("-----")] == [
        "-----BEGIN PUBLIC KEY-----",
        "-----END PUBLIC KEY-----",
    ]
    assert result.out.splitlines()[0] == (
        'kid="x\\n-----END PUBLIC KEY-----\\n-----BEGIN PUBLIC KEY-----\\nAAAA" kty=RSA alg=(none) bits=2048'
    )


def test_unsupported_url_scheme_is_refused(run):
    result = run("ftp://idp.example/jwks.json")
    assert (result.code, result.out) == (1, "")
    assert result.err == (
        "error: ftp://idp.example/jwks.json: unsupported URL scheme ftp://; "
        "give an http(s):// URL or a file path\n"
    )


# --------------------------------------------------------------------------------------------
# URLs


def test_url_prints_the_same_as_the_file(server):
    server.routes["/.well-known/jwks.json"] = Route(
        body=JWKS_BYTES, headers={"Content-Type": "application/json"}
    )
    result = cli(server.url("/.well-known/jwks.json"))
    assert (result.code, result.err) == (0, "")
    assert result.out == EXPECTED_STDOUT


def test_url_with_kid(run, server):
    server.routes["/jwks"] = Route(body=JWKS_BYTES)
    result = run(server.url("/jwks"), "--kid", "rsa-1")
    assert (result.code, result.out, result.err) == (0, spki(RSA_KEY.public_key()), "")


def test_redirect_on_the_same_host_is_followed(run, server):
    server.routes["/old"] = Route(status=301, headers={"Location": "/jwks"})
    server.routes["/jwks"] = Route(body=JWKS_BYTES)
    result = run(server.url("/old"), "--kid", "ec-1")
    assert (result.code, result.out, result.err) == (0, spki(EC_KEY.public_key()), "")
    assert server.requests == ["/old", "/jwks"]


def test_redirect_to_another_host_is_refused_and_not_followed(server, other_server):
    other_server.routes["/jwks"] = Route(body=JWKS_BYTES)
    target = other_server.url("/jwks", host="localhost")
    server.routes["/jwks"] = Route(status=302, headers={"Location": target})
    url = server.url("/jwks")
    result = cli(url)
    assert (result.code, result.out) == (1, "")
    assert result.err == (
        f"error: {url}: redirected (302) to another host, localhost, which is refused: a JWKS must come "
        f"from its issuer's host; use the final URL if you trust it ({target})\n"
    )
    assert other_server.requests == []


@pytest.mark.parametrize("content_length", [True, False], ids=["declared", "close-delimited"])
def test_oversized_body_is_refused(server, content_length):
    big = b'{"keys": [' + b" " * (1 << 20) + b"]}"
    server.routes["/jwks"] = Route(body=big, content_length=content_length)
    url = server.url("/jwks")
    result = cli(url)
    assert (result.code, result.out) == (1, "")
    if content_length:
        expected = f"the response is {len(big)} bytes, more than the 1 MiB allowed for a JWKS"
    else:
        expected = "the response is larger than the 1 MiB allowed for a JWKS"
    assert result.err == f"error: {url}: {expected}; check the URL points at the JWKS (jwks_uri)\n"


def test_http_error_status_is_reported(run, server):
    url = server.url("/missing")
    result = run(url)
    assert (result.code, result.out) == (1, "")
    assert result.err == (
        f"error: {url}: the server answered HTTP 404 Not Found; check the URL (the IdP's jwks_uri)\n"
    )


def test_unreachable_url_is_reported(run, server):
    url = server.url("/jwks")
    server.close()  # nothing listens on that port any more
    result = run(url)
    assert (result.code, result.out) == (1, "")
    assert result.err == (
        f"error: {url}: connection refused; check the URL (host and port) and that the server is running\n"
    )


def test_slow_server_times_out(server):
    # In-process with a short timeout: the command's default is 10 s.
    server.routes["/jwks"] = Route(body=JWKS_BYTES, delay=2)
    url = server.url("/jwks")
    out, err = io.StringIO(), io.StringIO()
    started = time.monotonic()
    assert jwks_to_pem(url, out=out, err=err, timeout=0.3) == 1
    assert time.monotonic() - started < 1.5
    assert out.getvalue() == ""
    assert err.getvalue() == (
        f"error: {url}: timed out after 0.3 s; check the URL and that the host is reachable\n"
    )


def test_credentials_in_the_url_are_refused_and_not_echoed(run):
    result = run("https://user:s3cret@idp.example/jwks")
    assert (result.code, result.out) == (1, "")
    assert result.err == (
        "error: https://user:***@idp.example/jwks: credentials in the URL are not supported (a JWKS is "
        "public); remove them, or download the JWKS and pass the file\n"
    )


def test_plain_http_to_another_machine_is_warned_about(server):
    # 0.0.0.0 is not a loopback address, yet connecting to it stays on this machine (and is refused
    # once the server is closed): no DNS, no network.
    url = server.url("/jwks", host="0.0.0.0")
    server.close()
    out, err = io.StringIO(), io.StringIO()
    assert jwks_to_pem(url, out=out, err=err, timeout=2) == 1
    assert err.getvalue().splitlines() == [
        "warning: fetching keys over plain http: anyone on the network path could substitute their own "
        "keys; use the https URL",
        f"error: {url}: connection refused; check the URL (host and port) and that the server is running",
    ]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return build_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_server(pki) -> Iterator[JwksServer]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.cert), str(pki.key))
    srv = JwksServer(ssl_context=ctx)
    srv.routes["/jwks"] = Route(body=JWKS_BYTES)
    try:
        yield srv
    finally:
        srv.close()


def test_https_certificate_is_verified(tls_server):
    url = tls_server.url("/jwks", host="localhost")
    result = cli(url)
    assert (result.code, result.out) == (1, "")
    assert result.err.startswith(f"error: {url}: the server's TLS certificate could not be verified (")
    assert result.err.endswith(
        "); fhirgate always verifies TLS: fix the certificate, or download the JWKS and pass the file\n"
    )


def test_https_with_a_trusted_certificate_works(tls_server, pki):
    result = cli(tls_server.url("/jwks", host="localhost"), "--kid", "rsa-1", SSL_CERT_FILE=str(pki.ca))
    assert (result.code, result.out, result.err) == (0, spki(RSA_KEY.public_key()), "")


def test_redirect_from_https_down_to_http_is_refused(run, tls_server, server, pki, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    server.routes["/jwks"] = Route(body=JWKS_BYTES)
    tls_server.routes["/old"] = Route(status=301, headers={"Location": server.url("/jwks", host="localhost")})
    url = tls_server.url("/old", host="localhost")
    result = run(url)
    assert (result.code, result.out) == (1, "")
    assert (
        result.err
        == f"error: {url}: redirected (301) from https to http, which is refused; use an https URL\n"
    )
    assert server.requests == []


# --------------------------------------------------------------------------------------------
# The article, end to end: JWKS -> PEM -> jwt_secrets credential -> requests through /fhir


def rs256_token(key: rsa.RSAPrivateKey, claims: dict) -> str:
    header = b64u(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    payload = b64u(json.dumps(claims).encode())
    signing_input = f"{header}.{payload}".encode()
    signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{header}.{payload}.{b64u(signature)}"


def test_article_workflow_pem_in_a_jwt_credential_verifies_tokens(jwks_file, upstream: Upstream):
    # 1. The operator converts the IdP's JWKS (this is what the article's script did by hand).
    result = cli(jwks_file(JWKS), "--kid", "rsa-1")
    assert result.code == 0
    pem = result.out
    assert pem == spki(RSA_KEY.public_key())

    from fhirgate.gateway.plugins.registry import get_plugin_class

    if get_plugin_class("jwt") is None:
        pytest.skip("the jwt plugin is not registered yet (issue 3 §1); the PEM above is what it will take")

    # 2. ... pastes it into a consumer's jwt_secrets credential, with the jwt plugin on /fhir.
    issuer = "https://tenant.auth0.example/"
    config = {
        "_format_version": "3.0",
        "services": [{"name": "fhir", "url": upstream.url, "routes": [{"name": "fhir", "paths": ["/fhir"]}]}],
        "consumers": [
            {
                "username": "auth0",
                "jwt_secrets": [{"key": issuer, "algorithm": "RS256", "rsa_public_key": pem}],
            }
        ],
        "plugins": [{"name": "jwt", "service": "fhir", "config": {"claims_to_verify": ["exp"]}}],
    }
    claims = {"iss": issuer, "sub": "app", "exp": int(time.time()) + 300}
    good = rs256_token(RSA_KEY, claims)
    forged = rs256_token(rsa.generate_private_key(public_exponent=65537, key_size=2048), claims)

    # 3. Requests through /fhir: the IdP's token passes, one signed with another key does not.
    with running_gateway(config) as gw:
        ok = httpx.get(f"{gw.url}/fhir/Patient/1", headers={"Authorization": f"Bearer {good}"}, timeout=5)
        assert ok.status_code == 200
        assert len(upstream.requests) == 1
        assert upstream.requests[0].header("x-consumer-username") == "auth0"
        refused = httpx.get(
            f"{gw.url}/fhir/Patient/1", headers={"Authorization": f"Bearer {forged}"}, timeout=5
        )
        assert refused.status_code == 401
        assert refused.json() == {"message": "Invalid signature"}
        assert len(upstream.requests) == 1
