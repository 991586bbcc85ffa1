"""`fhirgate keys rotate|list` on a temporary data directory (SQLite `auth.db`) and on PostgreSQL:
output, exit codes, and the state the authorization server will read."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.fhirserver.harness import database

from fhirgate import clock
from fhirgate.authserver.keys import KeyRing
from fhirgate.authserver.store import AuthStore
from fhirgate.cli.main import main

KID = r"[A-Za-z0-9_-]{43}"  # base64url SHA-256 (RFC 7638 thumbprint)


@pytest.fixture
def fixed_clock() -> Iterator[None]:
    clock.set_clock(lambda: 1_800_000_000.0)  # 2027-01-15T08:00:00Z
    try:
        yield
    finally:
        clock.set_clock(None)


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no ./fhirgate.toml
    for name in (
        "FHIRGATE_DATABASE_URL",
        "FHIRGATE_AUTH_DATABASE_URL",
        "FHIRGATE_AUTH_ACCESS_TOKEN_LIFETIME",
    ):
        monkeypatch.delenv(name, raising=False)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _stored(url: str) -> list[tuple[str, str, bool]]:
    async def run() -> list[tuple[str, str, bool]]:
        store = await AuthStore.open(url)
        try:
            return [(k.kid, k.alg, k.active) for k in await KeyRing(store).keys()]
        finally:
            await store.close()

    return asyncio.run(run())


@pytest.mark.usefixtures("fixed_clock")
def test_rotate_then_list_on_a_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = str(tmp_path / "state")
    code, out, err = _run(capsys, "keys", "list", "--data-dir", data)
    assert (code, err) == (0, "")
    assert out.startswith("no keys yet")

    code, out, err = _run(capsys, "keys", "rotate", "--data-dir", data)
    assert (code, err) == (0, "")
    first = re.fullmatch(rf"new RS256 key: ({KID})\nretired: none \(the first RS256 key\)\n", out)
    assert first is not None, out

    code, out, err = _run(capsys, "keys", "rotate", "--data-dir", data)
    assert (code, err) == (0, "")
    second = re.fullmatch(
        rf"new RS256 key: ({KID})\nretired: {first[1]} \(published until 2027-01-15T09:00:00Z\)\n", out
    )
    assert second is not None, out

    code, out, err = _run(capsys, "keys", "rotate", "--alg", "ES256", "--data-dir", data)
    assert code == 0
    third = re.match(rf"new ES256 key: ({KID})\n", out)
    assert third is not None, out

    code, out, err = _run(capsys, "keys", "list", "--data-dir", data)
    assert (code, err) == (0, "")
    lines = [line.split() for line in out.splitlines()]
    assert lines[0] == ["kid", "alg", "state", "created", "published", "until"]
    rows = {row[0]: row[1:] for row in lines[1:]}
    assert rows == {
        second[1]: ["RS256", "active", "2027-01-15T08:00:00Z", "-"],
        third[1]: ["ES256", "active", "2027-01-15T08:00:00Z", "-"],
        first[1]: ["RS256", "retired", "2027-01-15T08:00:00Z", "2027-01-15T09:00:00Z"],
    }
    # the state the authorization server reads: auth.db under the data dir
    assert sorted(_stored(f"sqlite:///{tmp_path / 'state' / 'auth.db'}")) == sorted(
        [(second[1], "RS256", True), (third[1], "ES256", True), (first[1], "RS256", False)]
    )


@pytest.mark.usefixtures("fixed_clock")
def test_the_published_until_follows_the_token_lifetime_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FHIRGATE_AUTH_ACCESS_TOKEN_LIFETIME", "600")
    _run(capsys, "keys", "rotate", "--data-dir", str(tmp_path))
    code, out, _ = _run(capsys, "keys", "rotate", "--data-dir", str(tmp_path))
    assert code == 0
    assert "(published until 2027-01-15T08:10:00Z)" in out


def test_rotate_and_list_on_postgresql(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with database("postgresql", tmp_path) as url:
        code, out, err = _run(capsys, "keys", "rotate", "--alg", "ES384", "--database", url)
        assert (code, err) == (0, "")
        kid = out.split()[3]
        code, out, err = _run(capsys, "keys", "list", "--database", url)
        assert (code, err) == (0, "")
        assert out.splitlines()[1].split()[:3] == [kid, "ES384", "active"]
        assert _stored(url) == [(kid, "ES384", True)]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ("keys", "rotate", "--alg", "HS256"),
            "error: unsupported signing algorithm 'HS256': use one of RS256, RS384, ES256, ES384\n",
        ),
        (
            ("keys", "list", "--database", "mysql://x/y"),
            "error: database mysql://x/y: unsupported database URL",
        ),
        (
            ("keys", "list", "--database", "postgresql://nobody:secret@127.0.0.1:1/none"),
            "error: database postgresql://nobody:***@127.0.0.1:1/none: ",
        ),
    ],
)
def test_errors_are_one_line_and_exit_1(
    argv: tuple[str, ...], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, *argv, "--data-dir", str(tmp_path))
    assert code == 1
    assert out == ""
    assert err.startswith(message)
    assert err.count("\n") == 1
    assert "secret" not in err
    assert not (tmp_path / "auth.db").exists()  # a refused algorithm creates no database


def test_an_out_of_range_token_lifetime_is_a_settings_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FHIRGATE_AUTH_ACCESS_TOKEN_LIFETIME", "7200")
    code, out, err = _run(capsys, "keys", "list", "--data-dir", str(tmp_path))
    assert code == 1
    assert out == ""
    assert err.startswith("error: settings: auth_access_token_lifetime: ")
    assert err.count("\n") == 1
