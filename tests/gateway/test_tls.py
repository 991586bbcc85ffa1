"""TLS on both sides: the TLS proxy listener (ssl_cert / ssl_cert_key) and HTTPS upstreams
(verification against ssl_trusted_certificate, SNI, tls_verify: false).

A throwaway CA and certificates are generated once per session with `cryptography`."""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.harness import Upstream, running_gateway, service_config

BAD_GATEWAY = {"message": "An invalid response was received from the upstream server"}


@dataclass(frozen=True)
class Pki:
    ca: Path  # the trusted CA's certificate
    cert: Path  # server certificate for localhost / 127.0.0.1, signed by `ca`
    key: Path
    wrong_name_cert: Path  # signed by `ca`, but for another name
    wrong_name_key: Path
    untrusted_cert: Path  # for localhost, signed by a CA nobody trusts
    untrusted_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _make_ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_leaf(
    ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, names: list[str], ips: list[str]
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    alt: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def build_pki(d: Path) -> Pki:
    """A CA, a certificate for localhost / 127.0.0.1 it signs, and two bad certificates, in `d`."""
    ca, ca_key = _make_ca("fhirgate test CA")
    leaf, leaf_key = _make_leaf(ca, ca_key, ["localhost"], ["127.0.0.1"])
    other, other_key = _make_leaf(ca, ca_key, ["not-this-host.example"], [])
    rogue_ca, rogue_key = _make_ca("untrusted CA")
    rogue, rogue_leaf_key = _make_leaf(rogue_ca, rogue_key, ["localhost"], ["127.0.0.1"])
    return Pki(
        ca=_write_cert(d / "ca.pem", ca),
        cert=_write_cert(d / "server.pem", leaf),
        key=_write_key(d / "server.key", leaf_key),
        wrong_name_cert=_write_cert(d / "wrong-name.pem", other),
        wrong_name_key=_write_key(d / "wrong-name.key", other_key),
        untrusted_cert=_write_cert(d / "untrusted.pem", rogue),
        untrusted_key=_write_key(d / "untrusted.key", rogue_leaf_key),
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return build_pki(tmp_path_factory.mktemp("pki"))


def _server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


@pytest.fixture
def tls_upstream(pki: Pki) -> Iterator[Upstream]:
    up = Upstream(ssl_context=_server_context(pki.cert, pki.key))
    try:
        yield up
    finally:
        up.close()


# --------------------------------------------------------------------------------------------
# The TLS proxy listener


def test_tls_listener_serves_https_and_forwards_proto_https(upstream: Upstream, pki: Pki) -> None:
    with (
        running_gateway(
            service_config(upstream.url), ssl=True, ssl_cert=pki.cert, ssl_cert_key=pki.key
        ) as gw,
        httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca))) as client,
    ):
        r = client.get(f"https://localhost:{gw.port('ssl')}/fhir/Patient")
        assert r.status_code == 200
        assert r.json() == {"path": "/fhir/Patient", "method": "GET"}
        assert r.http_version == "HTTP/1.1"
        # The plain listener is still plain, and says so.
        assert httpx.get(gw.url + "/plain").status_code == 200
    https_req, http_req = upstream.requests
    assert https_req.header("x-forwarded-proto") == "https"
    assert https_req.header("x-forwarded-port") == str(gw.port("ssl"))
    assert http_req.header("x-forwarded-proto") == "http"


def test_tls_listener_keeps_client_connections_alive(upstream: Upstream, pki: Pki) -> None:
    with (
        running_gateway(
            service_config(upstream.url), ssl=True, ssl_cert=pki.cert, ssl_cert_key=pki.key
        ) as gw,
        httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca))) as client,
    ):
        for i in range(3):
            assert client.get(f"https://127.0.0.1:{gw.port('ssl')}/k/{i}").status_code == 200
        assert len(gw.gateway.connections) == 1


def test_plain_http_to_the_tls_listener_fails_cleanly(upstream: Upstream, pki: Pki) -> None:
    with running_gateway(
        service_config(upstream.url), ssl=True, ssl_cert=pki.cert, ssl_cert_key=pki.key
    ) as gw:
        port = gw.port("ssl")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n")
            received = b""
            while chunk := sock.recv(4096):  # the gateway closes the connection; never a hang
                received += chunk
        assert not received.startswith(b"HTTP/")  # never answered as if it were plain HTTP
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/x", timeout=5)
        # The listener is unharmed: a TLS client right after is served.
        with httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca))) as client:
            assert client.get(f"https://localhost:{port}/after").status_code == 200
    assert [r.target for r in upstream.requests] == ["/after"]


# --------------------------------------------------------------------------------------------
# HTTPS upstreams


def test_https_upstream_is_verified_with_the_trusted_ca_and_gets_sni(
    tls_upstream: Upstream, pki: Pki
) -> None:
    assert tls_upstream.url.startswith("https://localhost:")
    with running_gateway(service_config(tls_upstream.url), ssl_trusted_certificate=pki.ca) as gw:
        r = httpx.get(gw.url + "/fhir/Observation?code=1234")
    assert r.status_code == 200
    assert r.json() == {"path": "/fhir/Observation?code=1234", "method": "GET"}
    assert tls_upstream.sni_names == ["localhost"]
    rec = tls_upstream.requests[0]
    assert rec.header("host") == f"localhost:{tls_upstream.port}"


def test_https_upstream_connections_are_pooled(tls_upstream: Upstream, pki: Pki) -> None:
    with running_gateway(service_config(tls_upstream.url), ssl_trusted_certificate=pki.ca) as gw:
        for _ in range(3):
            with httpx.Client() as client:
                assert client.get(gw.url + "/p").status_code == 200
    assert tls_upstream.connections == 1
    assert len(tls_upstream.requests) == 3


def test_https_upstream_is_not_trusted_without_the_ca(tls_upstream: Upstream) -> None:
    # Default trust store: the test CA is not in it.
    with running_gateway(service_config(tls_upstream.url)) as gw:
        r = httpx.get(gw.url + "/x")
    assert r.status_code == 502
    assert r.json() == BAD_GATEWAY
    assert tls_upstream.requests == []


@pytest.mark.parametrize("which", ["wrong_name", "untrusted"])
def test_https_upstream_with_a_bad_certificate_is_502(pki: Pki, which: str) -> None:
    cert, key = (
        (pki.wrong_name_cert, pki.wrong_name_key)
        if which == "wrong_name"
        else (pki.untrusted_cert, pki.untrusted_key)
    )
    up = Upstream(ssl_context=_server_context(cert, key))
    try:
        with running_gateway(service_config(up.url), ssl_trusted_certificate=pki.ca) as gw:
            r = httpx.get(gw.url + "/x")
            assert r.status_code == 502
            assert r.json() == BAD_GATEWAY
            assert r.headers["content-type"] == "application/json; charset=utf-8"
        assert up.requests == []  # the gateway refused the handshake: nothing was sent
        assert up.tls_failures >= 1
    finally:
        up.close()


def test_tls_verify_false_accepts_an_untrusted_upstream_certificate(pki: Pki) -> None:
    up = Upstream(ssl_context=_server_context(pki.untrusted_cert, pki.untrusted_key))
    try:
        config = service_config(up.url)
        config["services"][0]["tls_verify"] = False
        with running_gateway(config, ssl_trusted_certificate=pki.ca) as gw:
            r = httpx.get(gw.url + "/unverified")
        assert r.status_code == 200
        assert [rec.target for rec in up.requests] == ["/unverified"]
        assert up.sni_names == ["localhost"]  # SNI is still sent
    finally:
        up.close()


def test_verified_and_unverified_services_to_one_upstream_do_not_share_connections(pki: Pki) -> None:
    up = Upstream(ssl_context=_server_context(pki.untrusted_cert, pki.untrusted_key))
    try:
        config = {
            "_format_version": "3.0",
            "services": [
                {
                    "name": "lax",
                    "url": up.url,
                    "tls_verify": False,
                    "routes": [{"paths": ["/lax"], "strip_path": False}],
                },
                {"name": "strict", "url": up.url, "routes": [{"paths": ["/strict"], "strip_path": False}]},
            ],
        }
        with running_gateway(config, ssl_trusted_certificate=pki.ca) as gw, httpx.Client() as client:
            assert client.get(gw.url + "/lax").status_code == 200
            # A pooled connection opened without verification must never serve the strict service.
            assert client.get(gw.url + "/strict").status_code == 502
        assert [rec.target for rec in up.requests] == ["/lax"]
    finally:
        up.close()


# --------------------------------------------------------------------------------------------
# What the logs say about TLS


def test_json_access_log_records_the_negotiated_tls_version(
    upstream: Upstream, pki: Pki, tmp_path: Path
) -> None:
    log = tmp_path / "access.json"
    client_ctx = ssl.create_default_context(cafile=str(pki.ca))
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        running_gateway(
            service_config(upstream.url),
            ssl=True,
            ssl_cert=pki.cert,
            ssl_cert_key=pki.key,
            proxy_access_log=str(log),
            log_format="json",
        ) as gw,
        httpx.Client(verify=client_ctx) as client,
    ):
        assert client.get(f"https://localhost:{gw.port('ssl')}/x").status_code == 200
        deadline = time.monotonic() + 5
        while not log.read_text() and time.monotonic() < deadline:
            time.sleep(0.01)
    record = json.loads(log.read_text().splitlines()[0])
    assert record["request"]["tls"]["version"] == "TLSv1.2"
