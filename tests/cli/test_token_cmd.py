"""`fhirgate token` in-process (`main()`) against a real authorization server (SQLite): secrets
(basic, form-encoded; post), private keys (PEM and JWK, kid from the JWK or its thumbprint),
discovery and `--token-url`, and the one-line errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, RSAKey
from tests.authserver.harness import FHIR_BASE, RunningAuth, database, running_auth

from fhirgate.cli.main import main


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAuth]:
    tmp = tmp_path_factory.mktemp("token-cmd")
    with database("sqlite", tmp) as url, running_auth(url, "sqlite") as running:
        yield running


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["token", *args])
    out, err = capsys.readouterr()
    return code, out, err


def claims_of(server: RunningAuth, token: str) -> dict[str, Any]:
    keys = KeySet.import_key_set(server.client.get("/jwks").json())
    return dict(jwt.decode(token, keys).claims)


def key_client(server: RunningAuth, key: ECKey | RSAKey, kid: str, alg: str) -> str:
    client_id, _ = server.register(
        {
            "grant_types": ["client_credentials"],
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": {"keys": [{**key.as_dict(private=False), "kid": kid, "alg": alg}]},
            "scope": "system/*.read system/Patient.rs",
        }
    )
    return client_id


def test_client_secret_basic_and_post(server: RunningAuth, capsys: pytest.CaptureFixture[str]) -> None:
    for method in ("client_secret_basic", "client_secret_post"):
        client_id, secret = server.register(
            {"grant_types": ["client_credentials"], "token_endpoint_auth_method": method}
        )
        assert secret is not None
        extra = ["--secret-method", "post"] if method == "client_secret_post" else []
        code, out, err = run(
            capsys, "--client-id", client_id, "--client-secret", secret, "--issuer", server.issuer, *extra
        )
        assert (code, err) == (0, "")
        token = out.strip()
        assert out == token + "\n"
        claims = claims_of(server, token)
        assert (claims["client_id"], claims["scope"], claims["aud"]) == (
            client_id,
            "system/*.read",
            FHIR_BASE,
        )


def test_private_key_pem_and_jwk(
    server: RunningAuth, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ec = ECKey.generate_key("P-384", private=True)
    client_id = key_client(server, ec, "pem-kid", "ES384")
    pem = tmp_path / "ec.pem"
    pem.write_bytes(ec.as_pem(private=True))
    code, out, err = run(
        capsys,
        "--client-id",
        client_id,
        "--private-key",
        str(pem),
        "--kid",
        "pem-kid",
        "--scope",
        "system/Patient.rs",
        "--issuer",
        server.issuer,
    )
    assert (code, err) == (0, ""), err
    assert claims_of(server, out.strip())["scope"] == "system/Patient.rs"

    rsa = RSAKey.generate_key(2048, private=True)
    client_id = key_client(server, rsa, "jwk-kid", "RS384")
    jwk_file = tmp_path / "rsa.json"
    jwk_file.write_text(json.dumps({**rsa.as_dict(private=True), "kid": "jwk-kid"}))
    code, out, err = run(
        capsys, "--client-id", client_id, "--private-key", str(jwk_file), "--issuer", server.issuer
    )
    assert (code, err) == (0, ""), err
    assert claims_of(server, out.strip())["sub"] == client_id

    # no kid anywhere: the RFC 7638 thumbprint; ES256 from the P-256 curve; a JWK Set of one key
    p256 = ECKey.generate_key("P-256", private=True)
    client_id = key_client(server, p256, p256.thumbprint(), "ES256")
    jwks_file = tmp_path / "p256.json"
    jwks_file.write_text(json.dumps({"keys": [p256.as_dict(private=True)]}))
    code, out, err = run(
        capsys, "--client-id", client_id, "--private-key", str(jwks_file), "--token-url", server.token_url
    )
    assert (code, err) == (0, ""), err


def test_errors_are_one_line_on_stderr(
    server: RunningAuth, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    client_id, secret = server.register({"grant_types": ["client_credentials"]})
    assert secret is not None
    issuer = ["--issuer", server.issuer]
    cases: list[tuple[list[str], str]] = [
        (
            ["--client-id", client_id, "--client-secret", "wrong", *issuer],
            "error: invalid_client: wrong client secret\n",
        ),
        (
            ["--client-id", "nobody", "--client-secret", "x", "--secret-method", "post", *issuer],
            "error: invalid_client: unknown client 'nobody'\n",
        ),
        (
            ["--client-id", client_id, "--client-secret", secret, "--scope", "patient/*.read", *issuer],
            "error: invalid_scope: scope 'patient/*.read' is not a system/ scope: "
            "client_credentials grants system/ scopes only\n",
        ),
        (
            ["--client-id", client_id, "--client-secret", "x", "--issuer", server.issuer + "/nope"],
            "error: no authorization server metadata at "
            f"{server.issuer}/nope/.well-known/openid-configuration (HTTP 404), "
            f"{server.issuer}/.well-known/oauth-authorization-server/nope (HTTP 404)\n",
        ),
        (
            ["--client-id", client_id, "--private-key", str(tmp_path / "missing.pem"), *issuer],
            f"error: --private-key {tmp_path / 'missing.pem'}: No such file or directory\n",
        ),
        (
            ["--client-id", client_id, "--client-secret", "x", "--kid", "k", *issuer],
            "error: --kid and --alg go with --private-key\n",
        ),
    ]
    for args, expected in cases:
        assert run(capsys, *args) == (1, "", expected)

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    code, out, err = run(capsys, "--client-id", client_id, "--private-key", str(garbage), *issuer)
    assert (code, out) == (1, "")
    assert err.startswith(f"error: --private-key {garbage}: ")
    assert err.count("\n") == 1

    public = tmp_path / "public.json"
    public.write_text(json.dumps(ECKey.generate_key("P-384", private=True).as_dict(private=False)))
    code, out, err = run(capsys, "--client-id", client_id, "--private-key", str(public), *issuer)
    assert (code, out, err) == (
        1,
        "",
        f"error: --private-key {public}: this is a public key; the private key is needed\n",
    )


def test_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.e2e.procs import free_ports

    (port,) = free_ports(1)
    code, out, err = run(
        capsys, "--client-id", "c", "--client-secret", "s", "--token-url", f"http://127.0.0.1:{port}/token"
    )
    assert (code, out) == (1, "")
    assert err.startswith(f"error: cannot reach http://127.0.0.1:{port}/token: ConnectError")
    assert err.count("\n") == 1
