"""`file-log`: schema (Kong's fields and path validation) and access through a running gateway
(one JSON line per request, credentials redacted, reopen for rotation, no interleaving)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from fhirgate.config import load_config_dict
from fhirgate.errors import ConfigError
from fhirgate.gateway.plugins.file_log.handler import LineWriter
from fhirgate.gateway.plugins.file_log.schema import FileLogConfig
from tests.harness import Upstream, running_gateway, service_config


def _cfg(upstream: Upstream, config: dict[str, Any]) -> dict[str, Any]:
    cfg = service_config(upstream.url)
    cfg["plugins"] = [{"name": "file-log", "config": config}]
    return cfg


def _issues(config: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_config_dict({"_format_version": "3.0", "plugins": [{"name": "file-log", "config": config}]})
    return [(i.location, i.message) for i in info.value.issues]


def _lines(path: Path, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The file's records once it holds `count` lines (the log phase runs after the response)."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        if text.count("\n") >= count or time.monotonic() > deadline:
            return [json.loads(line) for line in text.splitlines()]
        time.sleep(0.01)


# --- schema ----------------------------------------------------------------------------------


def test_defaults_are_kongs(tmp_path: Path) -> None:
    cfg = load_config_dict(
        {
            "_format_version": "3.0",
            "plugins": [{"name": "file-log", "config": {"path": str(tmp_path / "a.log")}}],
        }
    )
    conf = cfg.plugins[0].config
    assert isinstance(conf, FileLogConfig)
    assert conf.path == str(tmp_path / "a.log")
    assert conf.reopen is False
    assert conf.custom_fields_by_lua is None


def test_path_is_required() -> None:
    assert _issues({}) == [("plugins[0].config.path", "required field missing")]


@pytest.mark.parametrize("path", ["/tmp/*.log", "/tmp/a&b", "/tmp/100%", "/tmp/`id`"])
def test_path_must_be_a_valid_filename(path: str) -> None:
    assert _issues({"path": path}) == [("plugins[0].config.path", "not a valid filename")]


def test_path_must_not_be_empty() -> None:
    assert _issues({"path": ""}) == [("plugins[0].config.path", "length must be at least 1")]


def test_custom_fields_by_lua_is_refused() -> None:
    assert _issues({"path": "/tmp/x.log", "custom_fields_by_lua": {"route": "return nil"}}) == [
        (
            "plugins[0].config.custom_fields_by_lua",
            "custom_fields_by_lua is not supported: fhirgate does not run Lua code; remove it (the record "
            "is Kong's kong.log.serialize() without custom fields)",
        )
    ]


def test_an_empty_custom_fields_by_lua_is_accepted() -> None:
    cfg = load_config_dict(
        {
            "_format_version": "3.0",
            "plugins": [{"name": "file-log", "config": {"path": "/tmp/x.log", "custom_fields_by_lua": {}}}],
        }
    )
    assert cfg.plugins[0].config.model_dump()["custom_fields_by_lua"] == {}


def test_unknown_fields_are_refused() -> None:
    assert _issues({"path": "/tmp/x.log", "rotate": True}) == [("plugins[0].config.rotate", "unknown field")]


# --- access ----------------------------------------------------------------------------------


def test_one_json_line_per_request_with_kongs_record(upstream: Upstream, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    with running_gateway(_cfg(upstream, {"path": str(path)})) as gw:
        assert httpx.get(gw.url + "/one?x=1").status_code == 200
        assert httpx.post(gw.url + "/two", content=b"abc").status_code == 200
        records = _lines(path, 2)
    assert len(records) == 2
    first = records[0]
    assert first["request"]["method"] == "GET"
    assert first["request"]["uri"] == "/one?x=1"
    assert first["request"]["querystring"] == {"x": "1"}
    assert first["response"]["status"] == 200
    assert first["upstream_uri"] == "/one?x=1"
    assert first["service"]["name"] == "s1"
    assert first["route"]["name"] == "r1"
    assert first["source"] == "upstream"
    assert set(first) >= {"latencies", "client_ip", "started_at", "tries", "workspace"}
    assert records[1]["request"]["method"] == "POST"
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_credentials_are_redacted(upstream: Upstream, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    headers = {
        "Authorization": "Bearer secret-token",
        "Proxy-Authorization": "Basic c2VjcmV0",
        "Cookie": "session=secret",
        "X-Other": "visible",
    }
    with running_gateway(_cfg(upstream, {"path": str(path)})) as gw:
        httpx.get(gw.url, headers=headers)
        [record] = _lines(path, 1)
    logged = record["request"]["headers"]
    assert logged["authorization"] == "REDACTED"
    assert logged["proxy-authorization"] == "REDACTED"
    assert logged["cookie"] == "REDACTED"
    assert logged["x-other"] == "visible"
    assert "secret" not in path.read_text()


def test_refused_requests_are_logged_too(upstream: Upstream, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    cfg = _cfg(upstream, {"path": str(path)})
    cfg["plugins"].append({"name": "rate-limiting", "config": {"hour": 1}})
    with running_gateway(cfg) as gw:
        httpx.get(gw.url)
        httpx.get(gw.url)
        records = _lines(path, 2)
    assert [r["response"]["status"] for r in records] == [200, 429]
    assert records[1]["source"] == "kong"


def test_reopen_follows_a_rotated_file(upstream: Upstream, tmp_path: Path) -> None:
    path, rotated = tmp_path / "access.log", tmp_path / "access.log.1"
    with running_gateway(_cfg(upstream, {"path": str(path), "reopen": True})) as gw:
        httpx.get(gw.url + "/before")
        _lines(path, 1)
        path.rename(rotated)
        httpx.get(gw.url + "/after")
        after = _lines(path, 1)
    assert [r["request"]["uri"] for r in _lines(rotated, 1)] == ["/before"]
    assert [r["request"]["uri"] for r in after] == ["/after"]


def test_without_reopen_a_rotated_file_keeps_receiving(upstream: Upstream, tmp_path: Path) -> None:
    path, rotated = tmp_path / "access.log", tmp_path / "access.log.1"
    with running_gateway(_cfg(upstream, {"path": str(path)})) as gw:
        httpx.get(gw.url + "/before")
        _lines(path, 1)
        path.rename(rotated)
        httpx.get(gw.url + "/after")
        records = _lines(rotated, 2)
    assert [r["request"]["uri"] for r in records] == ["/before", "/after"]
    assert not path.exists()


def test_an_unwritable_path_does_not_break_requests(upstream: Upstream, tmp_path: Path) -> None:
    path = tmp_path / "missing-dir" / "access.log"
    with running_gateway(_cfg(upstream, {"path": str(path)})) as gw:
        assert [httpx.get(gw.url).status_code for _ in range(2)] == [200, 200]
    assert not path.exists()


def test_lines_of_several_processes_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "shared.log"
    n, pad = 2000, "x" * 3000
    pids = []
    for worker in range(2):
        pid = os.fork()
        if pid == 0:  # child: a worker with its own writer on the same file
            code = 0
            try:
                writer = LineWriter(str(path), reopen=False)
                for i in range(n):
                    writer.put((json.dumps({"worker": worker, "i": i, "pad": pad}) + "\n").encode())
                writer.close()
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 2 * n
    for worker in range(2):
        assert [r["i"] for r in records if r["worker"] == worker] == list(range(n))
