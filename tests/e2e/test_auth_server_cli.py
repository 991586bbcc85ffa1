"""The real `fhirgate auth-server` command (two workers, SQLite under --data-dir) with the real
`fhirgate clients`, `fhirgate token` and `fhirgate keys` commands: discovery (including the RFC 8414
path form for an issuer with a path), a signing key made on first start and kept across restarts,
a client_credentials token, `keys rotate` picked up by the running workers within seconds with the
old key still published, and a clean SIGTERM.

The issuer has the path `/auth` (as behind the gateway); the server itself serves at its root, so
the token endpoint is reached here with `--token-url`."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.procs import free_ports, stop_group

pytestmark = pytest.mark.slow

FHIR_BASE = "http://127.0.0.1:9/fhir"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRGATE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def fhirgate(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fhirgate.cli.main", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def start_auth_server(
    tmp: Path, port: int, *, workers: int = 2, issuer: str | None = None, fhir_base: str = FHIR_BASE
) -> tuple[subprocess.Popen[str], str]:
    """`fhirgate auth-server` on `port` with its data under `tmp/data`, once it answers; (process,
    its base URL). The issuer defaults to the base URL plus `/auth`."""
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fhirgate.cli.main",
            "auth-server",
            "--data-dir",
            str(tmp / "data"),
            "--listen",
            f"127.0.0.1:{port}",
            "--issuer",
            issuer or f"{base}/auth",
            "--fhir-base",
            fhir_base,
            "--workers",
            str(workers),
        ],
        cwd=tmp,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{base}/jwks", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_group(proc)  # type: ignore[arg-type]
            raise RuntimeError("auth-server did not start")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("auth-server")


@pytest.fixture(scope="module")
def server(tmp: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    (port,) = free_ports(1)
    proc, base = start_auth_server(tmp, port)
    try:
        yield proc, base
    finally:
        stop_group(proc)  # type: ignore[arg-type]


def kid_of(token: str) -> str:
    header = token.split(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"])


def published_kids(base: str) -> set[str]:
    return {k["kid"] for k in httpx.get(f"{base}/jwks").json()["keys"]}


def test_discovery_documents(server: tuple[subprocess.Popen[str], str]) -> None:
    _, base = server
    issuer = f"{base}/auth"
    for path in (
        "/.well-known/openid-configuration",
        "/.well-known/oauth-authorization-server",
        "/.well-known/oauth-authorization-server/auth",  # RFC 8414 §3.1 for an issuer with a path
        "/.well-known/smart-configuration",
    ):
        r = httpx.get(base + path)
        assert r.status_code == 200, path
        doc = r.json()
        assert doc["issuer"] == issuer
        assert doc["token_endpoint"] == f"{issuer}/token"
        assert doc["jwks_uri"] == f"{issuer}/jwks"
        assert "private_key_jwt" in doc["token_endpoint_auth_methods_supported"]
    assert httpx.get(f"{base}/.well-known/oauth-authorization-server/other").status_code == 404


@pytest.fixture(scope="module")
def client(tmp: Path, server: tuple[subprocess.Popen[str], str]) -> tuple[str, str]:
    """A backend client made with `fhirgate clients create` (while the server runs)."""
    created = fhirgate(
        tmp,
        "clients",
        "create",
        "--name",
        "e2e backend",
        "--grant-type",
        "client_credentials",
        "--scope",
        "system/*.read",
        "--data-dir",
        str(tmp / "data"),
    )
    assert created.returncode == 0, created.stderr
    fields = dict(line.split(": ", 1) for line in created.stdout.splitlines())
    return fields["client_id"], fields["client_secret"]


def _token(base: str, client: tuple[str, str]) -> str:
    r = httpx.post(
        f"{base}/token", data={"grant_type": "client_credentials", "scope": "system/*.read"}, auth=client
    )
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


def test_clients_create_then_fhirgate_token(
    tmp: Path, server: tuple[subprocess.Popen[str], str], client: tuple[str, str]
) -> None:
    _, base = server
    client_id, secret = client
    got = fhirgate(
        tmp, "token", "--client-id", client_id, "--client-secret", secret, "--token-url", f"{base}/token"
    )
    assert (got.returncode, got.stderr) == (0, "")
    token = got.stdout.strip()
    assert got.stdout == token + "\n"
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert (claims["iss"], claims["aud"], claims["sub"]) == (f"{base}/auth", FHIR_BASE, client_id)
    assert kid_of(token) in published_kids(base)


def test_keys_rotate_while_running(
    tmp: Path, server: tuple[subprocess.Popen[str], str], client: tuple[str, str]
) -> None:
    _, base = server
    old = kid_of(_token(base, client))
    rotated = fhirgate(tmp, "keys", "rotate", "--alg", "RS256", "--data-dir", str(tmp / "data"))
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.split("new RS256 key: ", 1)[1].split()[0]
    assert new != old
    # every worker signs with the new key within its 5 s recheck (a few tokens in a row, so both
    # workers of the two are seen)
    deadline = time.monotonic() + 12
    streak = 0
    while streak < 6:
        streak = streak + 1 if kid_of(_token(base, client)) == new else 0
        assert time.monotonic() < deadline, "the workers still sign with the retired key"
        time.sleep(0.05 if streak else 0.25)
    assert {old, new} <= published_kids(base)  # the old key stays until its tokens expire


def test_same_key_after_restart_and_clean_sigterm(
    tmp: Path, server: tuple[subprocess.Popen[str], str], client: tuple[str, str]
) -> None:
    proc, base = server
    kid = kid_of(_token(base, client))
    kids = published_kids(base)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    port = int(base.rsplit(":", 1)[1])
    again, base = start_auth_server(tmp, port, workers=1)
    try:
        assert kid_of(_token(base, client)) == kid  # no new key on a restart
        assert published_kids(base) == kids
    finally:
        stop_group(again)  # type: ignore[arg-type]
