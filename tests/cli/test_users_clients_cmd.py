"""`fhirgate users ...` and `fhirgate clients ...` on a temporary data directory and on PostgreSQL:
output, exit codes, passwords never echoed, secrets shown once and never listed."""

from __future__ import annotations

import asyncio
import io
import json
import re
from pathlib import Path

import pytest
from joserfc.jwk import ECKey
from tests.fhirserver.harness import database

from fhirgate.authserver.clients import Clients
from fhirgate.authserver.store import AuthStore
from fhirgate.authserver.users import Users
from fhirgate.cli.main import main


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no ./fhirgate.toml
    for name in ("FHIRGATE_DATABASE_URL", "FHIRGATE_AUTH_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _stdin(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(text))


def _verify(url: str, username: str, password: str) -> bool:
    async def run() -> bool:
        store = await AuthStore.open(url)
        try:
            return await Users(store).verify_password(username, password) is not None
        finally:
            await store.close()

    return asyncio.run(run())


def _secret_ok(url: str, client_id: str, secret: str) -> bool:
    async def run() -> bool:
        store = await AuthStore.open(url)
        try:
            return await Clients(store).verify_secret(client_id, secret) is not None
        finally:
            await store.close()

    return asyncio.run(run())


def test_users_create_list_delete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = str(tmp_path / "state")
    url = f"sqlite:///{tmp_path / 'state' / 'auth.db'}"
    assert _run(capsys, "users", "list", "--data-dir", data) == (
        0,
        "no users yet (fhirgate users create USERNAME)\n",
        "",
    )
    _stdin(monkeypatch, "s3cret pass\n")
    code, out, err = _run(
        capsys,
        "users",
        "create",
        "alice",
        "--fhir-user",
        "Patient/123",
        "--password-stdin",
        "--data-dir",
        data,
    )
    assert (code, out, err) == (0, "created user alice (Patient/123)\n", "")
    assert _verify(url, "alice", "s3cret pass")
    assert not _verify(url, "alice", "s3cret pass\n")

    prompts: list[str] = []

    def fake_getpass(prompt: str) -> str:
        prompts.append(prompt)
        return "typed pw"

    monkeypatch.setattr("getpass.getpass", fake_getpass)
    code, out, err = _run(capsys, "users", "create", "bob", "--data-dir", data)
    assert (code, out, err) == (0, "created user bob\n", "")
    assert prompts == ["Password: ", "Repeat password: "]
    assert _verify(url, "bob", "typed pw")

    _stdin(monkeypatch, "other\n")
    code, out, err = _run(capsys, "users", "create", "alice", "--password-stdin", "--data-dir", data)
    assert (code, out, err) == (1, "", "error: user 'alice' already exists\n")

    code, out, err = _run(capsys, "users", "list", "--data-dir", data)
    assert code == 0
    assert "s3cret" not in out
    assert "scrypt" not in out
    assert [line.split()[:2] for line in out.splitlines()] == [
        ["username", "fhirUser"],
        ["alice", "Patient/123"],
        ["bob", "-"],
    ]

    assert _run(capsys, "users", "delete", "bob", "--data-dir", data) == (0, "deleted user bob\n", "")
    assert _run(capsys, "users", "delete", "bob", "--data-dir", data) == (1, "", "error: no user 'bob'\n")


def test_mismatched_prompted_passwords_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = iter(["one", "two"])
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(answers))
    code, out, err = _run(capsys, "users", "create", "carol", "--data-dir", str(tmp_path))
    assert (code, out, err) == (1, "", "error: the passwords do not match\n")
    assert not (tmp_path / "auth.db").exists()


@pytest.mark.parametrize(
    ("argv", "stdin", "message"),
    [
        (("users", "create", "a b", "--password-stdin"), "pw\n", "error: invalid username 'a b': "),
        (
            ("users", "create", "dave", "--fhir-user", "Observation/1", "--password-stdin"),
            "pw\n",
            "error: invalid fhir_user 'Observation/1': ",
        ),
        (("users", "create", "dave", "--password-stdin"), "\n", "error: the password is empty\n"),
        (("users", "create", "dave", "--password-stdin"), "", "error: the password is empty\n"),
    ],
)
def test_bad_user_input_is_one_error_line_and_creates_no_database(
    argv: tuple[str, ...],
    stdin: str,
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _stdin(monkeypatch, stdin)
    code, out, err = _run(capsys, *argv, "--data-dir", str(tmp_path))
    assert code == 1
    assert out == ""
    assert err.startswith(message)
    assert err.count("\n") == 1
    assert not (tmp_path / "auth.db").exists()


CLIENT_ID = r"[A-Za-z0-9_-]{32}"


def test_clients_create_list_delete(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = str(tmp_path)
    url = f"sqlite:///{tmp_path / 'auth.db'}"
    assert _run(capsys, "clients", "list", "--data-dir", data)[1].startswith("no clients yet")

    code, out, err = _run(
        capsys,
        "clients",
        "create",
        "--name",
        "My App",
        "--redirect-uri",
        "https://app.example/cb",
        "--redirect-uri",
        "http://127.0.0.1:9000/cb",
        "--grant-type",
        "authorization_code",
        "--grant-type",
        "refresh_token",
        "--scope",
        "openid fhirUser launch/patient",
        "--data-dir",
        data,
    )
    assert code == 0
    match = re.fullmatch(rf"client_id: ({CLIENT_ID})\nclient_secret: ([A-Za-z0-9_-]{{43}})\n", out)
    assert match is not None, out
    app_id, secret = match[1], match[2]
    assert err == "warning: the client secret is not shown again and cannot be recovered; store it now\n"
    assert _secret_ok(url, app_id, secret)

    key = ECKey.generate_key("P-384", private=True).as_dict(private=False)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [key]}))
    code, out, err = _run(
        capsys,
        "clients",
        "create",
        "--name",
        "Backend",
        "--grant-type",
        "client_credentials",
        "--auth-method",
        "private_key_jwt",
        "--jwks",
        str(jwks),
        "--scope",
        "system/*.rs",
        "--data-dir",
        data,
    )
    assert (code, err) == (0, "")
    backend = re.fullmatch(rf"client_id: ({CLIENT_ID})\n", out)
    assert backend is not None, out

    code, out, err = _run(
        capsys,
        "clients",
        "create",
        "--name",
        "Public",
        "--redirect-uri",
        "https://p.example/cb",
        "--auth-method",
        "none",
        "--data-dir",
        data,
    )
    assert (code, err) == (0, "")
    assert "client_secret" not in out

    code, out, err = _run(capsys, "clients", "list", "--data-dir", data)
    assert (code, err) == (0, "")
    assert secret not in out
    assert "sha256" not in out
    lines = out.splitlines()
    assert lines[0].split() == ["client_id", "name", "auth", "method", "grant", "types", "created"]
    assert lines[1].split()[:4] == [app_id, '"My', 'App"', "client_secret_basic"]
    assert lines[1].split()[4] == "authorization_code,refresh_token"
    assert lines[2].split()[:4] == [backend[1], '"Backend"', "private_key_jwt", "client_credentials"]
    assert len(lines) == 4

    assert _run(capsys, "clients", "delete", app_id, "--data-dir", data) == (
        0,
        f"deleted client {app_id}\n",
        "",
    )
    assert _run(capsys, "clients", "delete", app_id, "--data-dir", data) == (
        1,
        "",
        f'error: no client "{app_id}"\n',
    )
    assert not _secret_ok(url, app_id, secret)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ("--redirect-uri", "http://app.example/cb"),
            'error: redirect_uris: "http://app.example/cb" must use https',
        ),
        (("--grant-type", "implicit"), 'error: grant_types: "implicit" is not supported'),
        (
            ("--redirect-uri", "https://a.example/cb", "--auth-method", "basic"),
            'error: token_endpoint_auth_method: "basic"',
        ),
        (
            ("--grant-type", "client_credentials", "--auth-method", "none"),
            "error: token_endpoint_auth_method: none ",
        ),
        (
            ("--grant-type", "client_credentials", "--auth-method", "private_key_jwt"),
            "error: jwks: private_key_jwt needs the client's public keys",
        ),
        (
            (
                "--grant-type",
                "client_credentials",
                "--auth-method",
                "private_key_jwt",
                "--jwks",
                "missing.json",
            ),
            "error: --jwks missing.json: ",
        ),
    ],
)
def test_bad_client_input_is_one_error_line_and_creates_no_database(
    argv: tuple[str, ...], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, "clients", "create", "--name", "X", *argv, "--data-dir", str(tmp_path))
    assert code == 1
    assert out == ""
    assert err.startswith(message), err
    assert err.count("\n") == 1
    assert not (tmp_path / "auth.db").exists()


def test_users_and_clients_on_postgresql(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with database("postgresql", tmp_path) as url:
        _stdin(monkeypatch, "pg pass\n")
        assert _run(capsys, "users", "create", "pat", "--password-stdin", "--database", url)[0] == 0
        assert _verify(url, "pat", "pg pass")
        code, out, _ = _run(
            capsys,
            "clients",
            "create",
            "--name",
            "PG",
            "--redirect-uri",
            "https://a.example/cb",
            "--auth-method",
            "client_secret_post",
            "--database",
            url,
        )
        assert code == 0
        client_id, secret = out.split()[1], out.split()[3]
        assert _secret_ok(url, client_id, secret)
        code, out, _ = _run(capsys, "clients", "list", "--database", url)
        assert code == 0
        assert client_id in out
        assert secret not in out
        assert _run(capsys, "users", "list", "--database", url)[1].splitlines()[1].split()[0] == "pat"
