"""The real `fhirgate gateway` command as a subprocess: workers, signals (SIGTERM drains, SIGHUP
reloads), worker supervision and start-up refusals.

Every wait is bounded; every process started is stopped in a `finally` (SIGTERM to the master,
then SIGKILL to its process group if it does not exit)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import yaml

from tests.gateway.test_tls import build_pki
from tests.harness import Reply, Upstream

pytestmark = pytest.mark.slow

READY_TIMEOUT = 15.0


# --------------------------------------------------------------------------------------------
# Helpers


def wait_until(cond: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    """Poll `cond` until it returns something truthy (returned) or `timeout` passes (None)."""
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if result:
            return result
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


class NodeProcess:
    """`python -m fhirgate.cli.main gateway ARGS` with its stdout and stderr collected."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRGATE_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fhirgate.cli.main", "gateway", *args],
            cwd=cwd,  # no ./fhirgate.toml there
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: workers can always be cleaned up
        )
        self.pid = self.proc.pid
        self._lock = threading.Lock()
        self._stdout: list[str] = []
        self._stderr: list[str] = []
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self._stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self._stderr), daemon=True),
        ]
        for t in self._readers:
            t.start()
        self.ports: dict[str, int] = {}

    def _read(self, stream: Any, into: list[str]) -> None:
        for line in stream:
            with self._lock:
                into.append(line)

    @property
    def stdout(self) -> str:
        with self._lock:
            return "".join(self._stdout)

    @property
    def stderr(self) -> str:
        with self._lock:
            return "".join(self._stderr)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"the gateway exited ({self.proc.returncode}):\n{self.stderr}")
            return "fhirgate gateway: ready (" in self.stdout

        assert wait_until(ready, timeout), f"no ready line within {timeout}s:\n{self.stdout}\n{self.stderr}"
        names = {"proxy": "proxy", "proxy (TLS)": "ssl", "status": "status"}
        for m in re.finditer(
            r"fhirgate gateway: (proxy|proxy \(TLS\)|status) listening on \S+:(\d+)", self.stdout
        ):
            self.ports[names[m.group(1)]] = int(m.group(2))

    def url(self, kind: str = "proxy") -> str:
        scheme = "https" if kind == "ssl" else "http"
        return f"{scheme}://127.0.0.1:{self.ports[kind]}"

    def wait_stderr(self, pattern: str, timeout: float = 5.0, count: int = 1) -> list[str]:
        found = wait_until(lambda: len(re.findall(pattern, self.stderr)) >= count, timeout)
        assert found, f"{pattern!r} not in the error log within {timeout}s:\n{self.stderr}"
        return list(re.findall(pattern, self.stderr))

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def cleanup(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(self.pid, signal.SIGKILL)
                    self.proc.wait(5)
        finally:
            # Workers left behind by a master that died abnormally share its process group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            for t in self._readers:
                t.join(5)
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()


@contextlib.contextmanager
def gateway_node(cwd: Path, *args: str, ready: bool = True) -> Iterator[NodeProcess]:
    node = NodeProcess(list(args), cwd)
    try:
        if ready:
            node.wait_ready()
        yield node
    finally:
        node.cleanup()


def write_config(path: Path, upstream_url: str, *paths: str) -> Path:
    config = {
        "_format_version": "3.0",
        "services": [
            {
                "name": "s1",
                "url": upstream_url,
                "routes": [{"name": f"r{i}", "paths": [p], "strip_path": False} for i, p in enumerate(paths)],
            }
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class RawClient:
    """One keep-alive client connection (h11), so a test knows it is the same connection."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.conn = h11.Connection(h11.CLIENT)

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        request = h11.Request(method="GET", target=path, headers=[("Host", "gateway.test")])
        self.sock.sendall(self.conn.send(request) + self.conn.send(h11.EndOfMessage()))
        status, headers, body = 0, {}, b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.conn.start_next_cycle()
                return status, headers, body
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the gateway closed the connection")

    def close(self) -> None:
        self.sock.close()


def fresh_get(url: str, timeout: float = 5.0) -> httpx.Response:
    """A request on a new connection (a new source port: the kernel may pick another worker)."""
    with httpx.Client(timeout=timeout) as client:
        return client.get(url)


def status_pid(node: NodeProcess) -> int | None:
    try:
        return int(fresh_get(node.url("status") + "/status", timeout=2).json()["worker"]["pid"])
    except httpx.TransportError:
        return None


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


@pytest.fixture
def config_path(tmp_path: Path, upstream: Upstream) -> Path:
    return write_config(tmp_path / "kong.yaml", upstream.url, "/a")


# --------------------------------------------------------------------------------------------
# Workers


def test_two_workers_share_the_listeners(tmp_path: Path, config_path: Path, upstream: Upstream) -> None:
    with gateway_node(
        tmp_path,
        "--config", str(config_path),
        "--listen", "127.0.0.1:0",
        "--status-listen", "127.0.0.1:0",
        "--workers", "2",
    ) as node:  # fmt: skip
        assert "ready (2 worker(s), 1 service(s), 1 route(s), 0 plugin(s))" in node.stdout
        pids: set[int] = set()
        for _ in range(400):
            pid = status_pid(node)
            assert pid is not None
            pids.add(pid)
            if len(pids) == 2:
                break
        assert len(pids) == 2, "fresh connections never reached a second worker"
        assert node.pid not in pids
        assert {parent_pid(p) for p in pids} == {node.pid}  # both forked by the master
        for i in range(20):
            r = fresh_get(f"{node.url()}/a/{i}")
            assert r.status_code == 200
            assert r.json() == {"path": f"/a/{i}", "method": "GET"}
    assert len(upstream.requests) == 20


# --------------------------------------------------------------------------------------------
# SIGTERM


def test_sigterm_finishes_the_request_in_flight_refuses_new_ones_and_exits_0(
    tmp_path: Path, config_path: Path, upstream: Upstream
) -> None:
    upstream.handler = lambda req: Reply(body=b'{"slow":true}', delay=1.0)
    with gateway_node(
        tmp_path, "--config", str(config_path), "--listen", "127.0.0.1:0", "--workers", "1"
    ) as node:
        port = node.ports["proxy"]
        result: dict[str, Any] = {}

        def slow_request() -> None:
            try:
                result["response"] = fresh_get(node.url() + "/a/slow", timeout=10)
            except Exception as exc:
                result["error"] = exc

        client = threading.Thread(target=slow_request)
        client.start()
        try:
            assert wait_until(lambda: upstream.requests, 5), "the request never reached the upstream"
            node.signal(signal.SIGTERM)
            assert wait_until(lambda: refused(port), 3), "new connections still accepted after SIGTERM"
            assert client.is_alive()  # refused while the request in flight is still being served
            assert node.proc.poll() is None
            client.join(10)
            assert not client.is_alive()
        finally:
            client.join(10)
        assert "error" not in result, result.get("error")
        response = result["response"]
        assert response.status_code == 200
        assert response.content == b'{"slow":true}'
        assert response.headers["connection"] == "close"
        assert node.wait(5) == 0
    assert len(upstream.requests) == 1


def test_sigterm_lets_a_response_already_written_reach_a_slow_client(
    tmp_path: Path, config_path: Path, upstream: Upstream
) -> None:
    body = bytes(range(256)) * 32768  # 8 MiB: more than the kernel buffers between us hold
    upstream.handler = lambda req: Reply(body=body, headers=[("Content-Type", "application/octet-stream")])
    access_log = tmp_path / "access.log"
    with gateway_node(
        tmp_path,
        "--config", str(config_path),
        "--listen", "127.0.0.1:0",
        "--workers", "1",
        "--access-log", str(access_log),
    ) as node:  # fmt: skip
        with socket.create_connection(("127.0.0.1", node.ports["proxy"]), timeout=10) as sock:
            sock.sendall(b"GET /a/big HTTP/1.1\r\nHost: x\r\n\r\n")
            # A slow client: it reads a little at a time, and stops reading as soon as the request
            # is logged, i.e. the worker has the whole response; the end of it is then still
            # queued in the worker (the kernel buffers are full), and must not be dropped at exit.
            received = b""
            while not (access_log.exists() and access_log.read_text()):
                chunk = sock.recv(65536)
                assert chunk, "the gateway closed the connection early"
                received += chunk
            node.signal(signal.SIGTERM)
            while chunk := sock.recv(1 << 20):
                received += chunk
        head, _, got = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"Content-Length: %d" % len(body) in head
        assert len(got) == len(body)
        assert got == body
        assert node.wait(5) == 0


# --------------------------------------------------------------------------------------------
# SIGHUP


def test_sighup_reloads_every_worker_and_keeps_open_connections(
    tmp_path: Path, config_path: Path, upstream: Upstream
) -> None:
    with gateway_node(
        tmp_path, "--config", str(config_path), "--listen", "127.0.0.1:0", "--workers", "2"
    ) as node:
        kept = RawClient(node.ports["proxy"])
        try:
            assert kept.get("/a/before")[0] == 200
            assert fresh_get(node.url() + "/b").status_code == 404
            write_config(config_path, upstream.url, "/a", "/b")
            node.signal(signal.SIGHUP)
            reloaded = node.wait_stderr(r"(\d+) fhirgate\.node: configuration reloaded", count=2)
            assert len(set(reloaded)) == 2  # once in each worker
            for i in range(20):  # whichever worker a new connection reaches
                assert fresh_get(f"{node.url()}/b/{i}").status_code == 200
            # The connection opened before the reload still works, with the new configuration.
            status, headers, _ = kept.get("/a/after")
            assert status == 200
            assert headers.get("connection") != "close"
            assert kept.get("/b/kept")[0] == 200
        finally:
            kept.close()
        assert "reload refused" not in node.stderr
    targets = [r.target for r in upstream.requests]
    assert targets[0] == "/a/before"
    assert targets[-2:] == ["/a/after", "/b/kept"]


@pytest.mark.parametrize(
    ("broken", "location"),
    [
        ("paths", r"services\[0\]\.routes\[1\]\.paths\[0\]: should start with"),
        ("yaml", r"line \d+, column \d+: invalid YAML"),
    ],
)
def test_sighup_with_a_broken_file_keeps_serving_the_old_configuration(
    tmp_path: Path, config_path: Path, upstream: Upstream, broken: str, location: str
) -> None:
    with gateway_node(
        tmp_path, "--config", str(config_path), "--listen", "127.0.0.1:0", "--workers", "1"
    ) as node:
        if broken == "paths":
            write_config(config_path, upstream.url, "/a", "no-slash")
        else:
            config_path.write_text(config_path.read_text() + "  - name: [unclosed\n")
        node.signal(signal.SIGHUP)
        node.wait_stderr(location)
        assert "configuration reload refused, still serving the previous one" in node.stderr
        assert str(config_path.name) in node.stderr
        assert fresh_get(node.url() + "/a").status_code == 200
        assert fresh_get(node.url() + "/no-slash").status_code == 404
        assert "configuration reloaded" not in node.stderr
        node.signal(signal.SIGTERM)
        assert node.wait(5) == 0


# --------------------------------------------------------------------------------------------
# Start-up refusals


def test_an_invalid_configuration_file_is_refused_at_start(tmp_path: Path, upstream: Upstream) -> None:
    bad = write_config(tmp_path / "bad.yaml", upstream.url, "/ok", "no-slash")
    with gateway_node(tmp_path, "--config", str(bad), "--listen", "127.0.0.1:0", ready=False) as node:
        assert node.wait(READY_TIMEOUT) == 1
        node.cleanup()  # joins the readers: all the output is in
        assert "bad.yaml: 1 error(s) in configuration" in node.stderr
        assert (
            "services[0].routes[1].paths[0]: should start with: / (fixed path) or ~/ (regex path)"
            in node.stderr
        )
        assert "Traceback" not in node.stderr
        assert "listening" not in node.stdout


def test_a_port_in_use_is_refused_even_by_another_node(tmp_path: Path, config_path: Path) -> None:
    with gateway_node(
        tmp_path, "--config", str(config_path), "--listen", "127.0.0.1:0", "--workers", "1"
    ) as first:
        port = first.ports["proxy"]
        with gateway_node(
            tmp_path, "--config", str(config_path), "--listen", f"127.0.0.1:{port}", ready=False
        ) as second:
            assert second.wait(READY_TIMEOUT) == 1
            second.cleanup()
            assert "error: cannot listen" in second.stderr
            assert "Traceback" not in second.stderr
        assert fresh_get(first.url() + "/a").status_code == 200


def test_an_unreadable_tls_certificate_is_refused_at_start(tmp_path: Path, config_path: Path) -> None:
    with gateway_node(
        tmp_path,
        "--config", str(config_path),
        "--listen", "127.0.0.1:0",
        "--listen-ssl", "127.0.0.1:0",
        "--ssl-cert", str(tmp_path / "missing.pem"),
        "--ssl-cert-key", str(tmp_path / "missing.key"),
        "--workers", "2",
        ready=False,
    ) as node:  # fmt: skip
        assert node.wait(READY_TIMEOUT) == 1
        node.cleanup()
        assert "error: cannot load the TLS certificate" in node.stderr
        assert "missing.pem" in node.stderr
        assert "Traceback" not in node.stderr


def test_the_tls_listener_from_the_command_line(
    tmp_path: Path, config_path: Path, upstream: Upstream
) -> None:
    pki = build_pki(tmp_path)
    with gateway_node(
        tmp_path,
        "--config", str(config_path),
        "--listen", "127.0.0.1:0",
        "--listen-ssl", "127.0.0.1:0",
        "--ssl-cert", str(pki.cert),
        "--ssl-cert-key", str(pki.key),
        "--workers", "1",
    ) as node:  # fmt: skip
        assert re.search(r"proxy \(TLS\) listening on https://127\.0\.0\.1:\d+", node.stdout)
        with httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca))) as client:
            r = client.get(f"https://localhost:{node.ports['ssl']}/a/tls")
        assert r.status_code == 200
    assert upstream.requests[0].header("x-forwarded-proto") == "https"


# --------------------------------------------------------------------------------------------
# Supervision


def test_a_killed_worker_is_restarted(tmp_path: Path, config_path: Path, upstream: Upstream) -> None:
    with gateway_node(
        tmp_path,
        "--config", str(config_path),
        "--listen", "127.0.0.1:0",
        "--status-listen", "127.0.0.1:0",
        "--workers", "1",
    ) as node:  # fmt: skip
        first = status_pid(node)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        second = wait_until(lambda: (pid := status_pid(node)) is not None and pid != first and pid, 5)
        assert second, "the worker was not restarted"
        assert parent_pid(second) == node.pid
        assert fresh_get(node.url() + "/a/again").status_code == 200
        node.wait_stderr(rf"worker 0 \(pid {first}\) was killed by signal 9 \(SIGKILL\); restarting it")
        node.signal(signal.SIGTERM)
        assert node.wait(5) == 0


def test_a_restarted_worker_serves_the_last_good_configuration(
    tmp_path: Path, config_path: Path, upstream: Upstream
) -> None:
    with gateway_node(
        tmp_path,
        "--config", str(config_path),
        "--listen", "127.0.0.1:0",
        "--status-listen", "127.0.0.1:0",
        "--workers", "1",
    ) as node:  # fmt: skip
        write_config(config_path, upstream.url, "/a", "/b")
        node.signal(signal.SIGHUP)
        node.wait_stderr("configuration reloaded")
        write_config(config_path, upstream.url, "no-slash")  # refused: /a and /b stay
        node.signal(signal.SIGHUP)
        node.wait_stderr("reload refused")
        first = status_pid(node)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert wait_until(lambda: (pid := status_pid(node)) is not None and pid != first, 5)
        assert fresh_get(node.url() + "/b").status_code == 200
        assert fresh_get(node.url() + "/a").status_code == 200
