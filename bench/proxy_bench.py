#!/usr/bin/env python3
"""Proxy benchmark: fhirgate against nginx as a reverse proxy, on loopback.

One run starts a static FHIR upstream (nginx #1), nginx #2 as a plain reverse proxy in front of it, and
the fhirgate gateway (without plugins, and with five global plugins) in front of the same upstream;
then it loads every target with wrk in alternating rounds after a warm-up and reports the median of
the rounds, the ratios to nginx and the bars of the issue. It is a report, not a test: it never exits
non-zero because a bar is missed.

    python bench/proxy_bench.py [--duration S] [--runs N] [--connections C] [--workers W] [--quick]

Self-contained: standard library, plus matplotlib for the chart and rich for the table (both optional
at import time; without them the chart is skipped and the table is plain text). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import fcntl
import http.client
import importlib.metadata
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

# The other benchmarks (jwt_bench.py, fhir_bench.py, auth_bench.py) import this module for the pieces
# they share: processes, wrk, CPU accounting, machine facts and versions, PostgreSQL, py-spy stacks,
# the results files and charts. One copy of each lives here.
BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
REQUEST_PATH = "/fhir/Patient/example"
PATIENT_SIZE = 2500  # bytes of the upstream body
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
LOCK_FILE = Path(tempfile.gettempdir()) / "fhirgate-proxy-bench.lock"
NOISY_SHARE = 0.10  # "other" CPU above this share of the machine during a run marks the run noisy

# Bars of the issue: (target key, metric, comparison, factor, label)
BARS: tuple[tuple[str, str, str, float, str], ...] = (
    ("fhirgate-plain", "rps", ">=", 0.75, "fhirgate without plugins: req/s >= 0.75 x nginx proxy"),
    ("fhirgate-plugins", "rps", ">=", 0.60, "fhirgate with 5 plugins: req/s >= 0.60 x nginx proxy"),
    ("fhirgate-plain", "p99", "<=", 2.0, "fhirgate without plugins: p99 <= 2 x nginx proxy p99"),
    ("fhirgate-plugins", "p99", "<=", 2.0, "fhirgate with 5 plugins: p99 <= 2 x nginx proxy p99"),
)
BASELINE = "nginx-proxy"

try:  # optional pretty output
    from rich.console import Console
    from rich.table import Table

    # not a terminal (a log, CI): wide enough that the table and the run lines do not wrap
    _CONSOLE: Console | None = Console(highlight=False, width=None if sys.stdout.isatty() else 150)
except ImportError:  # pragma: no cover - plain fallback
    _CONSOLE = None


# --------------------------------------------------------------------------------------------- output


def say(msg: str = "", style: str | None = None) -> None:
    if _CONSOLE is not None:
        _CONSOLE.print(msg, style=style, markup=False)
    else:
        print(msg, flush=True)


def loud(msg: str) -> None:
    """A warning that must not be missed (errors in a run, skipped targets)."""
    banner = "!" * 100
    for line in (banner, *(f"!! {part}" for part in msg.splitlines()), banner):
        say(line, style="bold red")


# ------------------------------------------------------------------------------------------ the body


def patient_json(size: int = PATIENT_SIZE) -> bytes:
    """A fixed, realistic FHIR R4 Patient (US Core), compact JSON, padded to exactly `size` bytes.

    The padding goes into the narrative (`text.div`), deterministically, so every run serves the same
    bytes."""
    omb = "urn:oid:2.16.840.1.113883.6.238"
    v2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
    us_core = "http://hl7.org/fhir/us/core/StructureDefinition"
    resource_: dict[str, Any] = {
        "resourceType": "Patient",
        "id": "example",
        "meta": {
            "versionId": "3",
            "lastUpdated": "2024-05-14T09:21:37.000+00:00",
            "profile": [f"{us_core}/us-core-patient"],
        },
        "text": {"status": "generated", "div": ""},
        "extension": [
            {
                "url": f"{us_core}/us-core-race",
                "extension": [
                    {
                        "url": "ombCategory",
                        "valueCoding": {"system": omb, "code": "2106-3", "display": "White"},
                    },
                    {"url": "text", "valueString": "White"},
                ],
            },
            {
                "url": f"{us_core}/us-core-ethnicity",
                "extension": [
                    {
                        "url": "ombCategory",
                        "valueCoding": {"system": omb, "code": "2186-5", "display": "Not Hispanic or Latino"},
                    },
                    {"url": "text", "valueString": "Not Hispanic or Latino"},
                ],
            },
            {"url": f"{us_core}/us-core-birthsex", "valueCode": "F"},
        ],
        "identifier": [
            {
                "use": "usual",
                "type": {
                    "coding": [{"system": v2_0203, "code": "MR", "display": "Medical Record Number"}],
                    "text": "Medical Record Number",
                },
                "system": "http://hospital.smarthealthit.org",
                "value": "1032702",
            },
            {
                "use": "official",
                "type": {"coding": [{"system": v2_0203, "code": "SS", "display": "Social Security number"}]},
                "system": "http://hl7.org/fhir/sid/us-ssn",
                "value": "999-47-5984",
            },
        ],
        "active": True,
        "name": [
            {
                "use": "official",
                "family": "Shaw",
                "given": ["Amy", "V."],
                "prefix": ["Ms."],
                "period": {"start": "1987-02-20"},
            },
        ],
        "telecom": [
            {"system": "phone", "value": "555-555-5555", "use": "home"},
            {"system": "phone", "value": "555-555-1234", "use": "mobile", "rank": 1},
            {"system": "email", "value": "amy.shaw@example.com", "use": "home"},
        ],
        "gender": "female",
        "birthDate": "1987-02-20",
        "address": [
            {
                "use": "home",
                "type": "physical",
                "line": ["183 Mountain View St"],
                "city": "Mounds View",
                "district": "Ramsey",
                "state": "MN",
                "postalCode": "55112",
                "country": "US",
                "period": {"start": "2010-03-01"},
            }
        ],
        "maritalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
                    "code": "M",
                    "display": "Married",
                }
            ]
        },
        "communication": [
            {
                "language": {
                    "coding": [{"system": "urn:ietf:bcp:47", "code": "en-US", "display": "English (US)"}]
                },
                "preferred": True,
            }
        ],
        "generalPractitioner": [{"reference": "Practitioner/practitioner-1", "display": "Ronald Bone, MD"}],
        "managingOrganization": {"reference": "Organization/organization-1", "display": "Acme Healthcare"},
    }
    head = (
        '<div xmlns="http://www.w3.org/1999/xhtml"><p><b>Amy V. Shaw</b>, female, 1987-02-20,'
        " MRN 1032702</p><p>"
    )
    tail = "</p></div>"
    filler_src = (
        "Generated narrative for benchmarking: the upstream always returns these same bytes so that every "
        "run of the benchmark moves an identical payload through each proxy. "
    )

    def encode(div: str) -> bytes:
        resource_["text"]["div"] = div
        return json.dumps(resource_, separators=(",", ":"), ensure_ascii=True).encode()

    base = len(encode(head + tail))
    room = size - base
    if room < 0:
        raise ValueError(f"the Patient without padding is already {base} bytes (> {size})")
    filler = (filler_src * (room // len(filler_src) + 1))[:room]
    body = encode(head + filler + tail)
    assert len(body) == size, len(body)
    return body


# ------------------------------------------------------------------------------------------- helpers


def find_exe(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")


def ensure_tools() -> tuple[str, str]:
    """nginx and wrk on PATH, installing the Debian/Ubuntu packages with apt if either is missing."""
    missing = [name for name in ("nginx", "wrk") if find_exe(name) is None]
    if not missing:
        say(f"tools: nginx={find_exe('nginx')} wrk={find_exe('wrk')} (already installed)")
    else:
        if shutil.which("apt-get") is None:
            raise SystemExit(f"{', '.join(missing)} missing and apt-get is not available: install them first")
        if os.geteuid() != 0:
            raise SystemExit(
                f"{', '.join(missing)} missing; installing needs root: "
                f"sudo apt-get install -y {' '.join(missing)}"
            )
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        say(f"tools: {', '.join(missing)} missing -> running: apt-get update")
        subprocess.run(["apt-get", "update"], check=True, env=env)
        cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
        say(f"tools: running: {' '.join(cmd)}")
        subprocess.run(cmd, check=True, env=env)
    nginx, wrk = find_exe("nginx"), find_exe("wrk")
    if nginx is None or wrk is None:
        raise SystemExit("nginx or wrk still not found after installing")
    return nginx, wrk


def tool_version(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (bound together so they differ, then released)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http_get(
    port: int, path: str = REQUEST_PATH, timeout: float = 2.0, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Accept": "application/fhir+json", **(headers or {})})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def machine_info() -> dict[str, Any]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    uname = platform.uname()
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_mb": mem_kb // 1024,
        "kernel": f"{uname.system} {uname.release}",
        "machine": uname.machine,
        "hostname": uname.node,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_executable": sys.executable,
        "loadavg_at_start": read_loadavg(),
    }


def read_loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return ""


def repo_revision() -> str:
    """Read-only look at the checkout the gateway runs from."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "no commit (working tree)"


# ------------------------------------------------------------------------------ CPU accounting (/proc)

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_stats() -> Iterator[tuple[int, str, list[str]]]:
    """(pid, command name, the fields after the name) of every live process, from /proc/PID/stat.
    fields[0] is field 3 (state): pgrp is fields[2] (field 5), utime fields[11], stime fields[12]."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        yield int(entry.name), raw[raw.find("(") + 1 : raw.rfind(")")], raw[raw.rfind(")") + 2 :].split()


def group_cpu_seconds(pgid: int) -> float:
    """User+system CPU seconds of the live processes of process group `pgid`."""
    total = 0
    for _, _, fields in proc_stats():
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def named_cpu_seconds(comm: str) -> float:
    """User+system CPU seconds of the live processes whose command name is `comm`."""
    total = 0
    for _, name, fields in proc_stats():
        if name == comm:
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def group_pids(pgid: int) -> list[int]:
    """The live processes of process group `pgid`."""
    return [pid for pid, _, fields in proc_stats() if int(fields[2]) == pgid]


def system_busy_seconds() -> float:
    """CPU seconds spent not idle, summed over all CPUs, since boot."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    total = sum(parts[:8])  # guest time is already counted in user
    return (total - idle) / CLK_TCK


def children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# ------------------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Processes:
    """Every long-running process the benchmark starts, each in its own session (process group = its
    PID), so that stopping one stops its workers too and nothing else."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def start(self, name: str, cmd: Sequence[str], log: Path, cwd: Path, env: dict[str, str]) -> Proc:
        with log.open("wb") as fh:
            popen = subprocess.Popen(
                list(cmd),
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        say(f"started {name}: pid {popen.pid}: {' '.join(cmd)}")
        return proc

    def stop(self, proc: Proc) -> None:
        pgid = proc.pid  # start_new_session: the group is ours and carries the PID we started
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.popen.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                say(f"{proc.name} (pid {proc.pid}) ignored SIGTERM for {STOP_TIMEOUT_S:.0f}s: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                proc.popen.wait(timeout=STOP_TIMEOUT_S)
        # workers left behind by a master that exited: they are still in the group we created
        for sig, grace in ((0, 3.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            if sig:
                say(f"{proc.name}: workers outlived pid {proc.pid}: {signal.Signals(sig).name} to its group")
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            try:
                self.stop(proc)
                say(f"stopped {proc.name} (pid {proc.pid})")
            except Exception as exc:  # keep stopping the others
                say(f"could not stop {proc.name} (pid {proc.pid}): {exc}", style="red")


def wait_ready(
    proc: Proc, port: int, timeout: float = READY_TIMEOUT_S, headers: dict[str, str] | None = None
) -> str | None:
    """None when a GET through `port` (with `headers`) answers 200 within `timeout`, else why not."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            return f"{proc.name} exited with status {proc.popen.returncode} before it was ready"
        try:
            status, _, _ = http_get(port, timeout=1.0, headers=headers)
            if status == 200:
                return None
            last = f"HTTP {status}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.1)
    return f"{proc.name} not ready after {timeout:.0f}s (last: {last})"


# ------------------------------------------------------------------------------------ configuration


def nginx_common(d: Path) -> str:
    tmp = d / "tmp"
    return (
        f"daemon off;\n"
        f"pid {d}/nginx.pid;\n"
        f"error_log {d}/error.log warn;\n"
        "events { worker_connections 4096; }\n"
        "http {\n"
        "    access_log off;\n"
        f"    client_body_temp_path {tmp}/client_body;\n"
        f"    proxy_temp_path {tmp}/proxy;\n"
        f"    fastcgi_temp_path {tmp}/fastcgi;\n"
        f"    uwsgi_temp_path {tmp}/uwsgi;\n"
        f"    scgi_temp_path {tmp}/scgi;\n"
        "    keepalive_timeout 65s;\n"
        "    keepalive_requests 1000000;\n"
    )


def nginx_upstream_conf(d: Path, www: Path, port: int) -> str:
    return (
        "# fhirgate bench: nginx #1, the FHIR upstream (serves one static Patient for any /fhir/ path)\n"
        "worker_processes 1;\n"
        f"{nginx_common(d)}"
        "    sendfile on;\n"
        "    tcp_nopush on;\n"
        "    types { }\n"
        "    default_type application/fhir+json;\n"
        "    charset utf-8;\n"
        "    charset_types application/fhir+json;\n"
        "    server {\n"
        f"        listen 127.0.0.1:{port};\n"
        f"        root {www};\n"
        "        # evidence that correlation-id ran (it sets the header towards the upstream only):\n"
        "        # echoed back when present, absent otherwise (an empty add_header value is not sent)\n"
        "        add_header X-Echo-Kong-Request-Id $http_kong_request_id;\n"
        "        location /fhir/ {\n"
        "            try_files /patient.json =404;\n"
        "        }\n"
        "    }\n"
        "}\n"
    )


def nginx_proxy_conf(d: Path, port: int, upstream_port: int, workers: int) -> str:
    return (
        "# fhirgate bench: nginx #2, a plain reverse proxy in front of the upstream\n"
        f"worker_processes {workers};\n"
        f"{nginx_common(d)}"
        "    upstream fhir_upstream {\n"
        f"        server 127.0.0.1:{upstream_port};\n"
        "        keepalive 64;\n"
        "        keepalive_requests 1000000;\n"
        "    }\n"
        "    server {\n"
        f"        listen 127.0.0.1:{port};\n"
        "        location /fhir {\n"
        "            proxy_pass http://fhir_upstream;\n"
        "            proxy_http_version 1.1;\n"
        '            proxy_set_header Connection "";\n'
        "        }\n"
        "    }\n"
        "}\n"
    )


def service_yaml(upstream_port: int) -> str:
    """The declarative file's head every gateway target shares: one service, route `/fhir`."""
    return (
        '_format_version: "3.0"\n'
        "services:\n"
        "  - name: fhir-upstream\n"
        f"    url: http://127.0.0.1:{upstream_port}/fhir\n"
        "    routes:\n"
        "      - name: fhir\n"
        "        paths:\n"
        "          - /fhir\n"
        "        strip_path: true\n"
    )


def gateway_conf(upstream_port: int, plugins: bool, access_log: Path) -> str:
    text = service_yaml(upstream_port)
    if plugins:
        text += (
            "plugins:\n"
            "  - name: cors\n"
            "  - name: correlation-id\n"
            "  - name: rate-limiting\n"
            "    config:\n"
            "      minute: 100000000\n"
            "      policy: local\n"
            "  - name: prometheus\n"
            "  - name: file-log\n"
            "    config:\n"
            f"      path: {access_log}\n"
        )
    return text


# ---------------------------------------------------------------------------------------------- wrk

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def to_ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", value.strip())
    if not m:
        raise ValueError(f"not a wrk duration: {value!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    avg_ms: float
    max_ms: float
    requests: int
    socket_errors: dict[str, int]
    non_2xx_3xx: int

    @property
    def errors(self) -> int:
        return sum(self.socket_errors.values())


def parse_wrk(text: str) -> WrkResult:
    def need(pattern: str) -> re.Match[str]:
        m = re.search(pattern, text, re.MULTILINE)
        if not m:
            raise ValueError(f"wrk output lacks {pattern!r}:\n{text}")
        return m

    dist = {
        m.group(1): to_ms(m.group(2))
        for m in re.finditer(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", text, re.MULTILINE)
    }
    if "50" not in dist or "99" not in dist:
        raise ValueError(f"wrk output lacks the latency distribution (--latency):\n{text}")
    lat = need(r"^\s+Latency\s+(\S+)\s+(\S+)\s+(\S+)")
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(
        rps=float(need(r"^Requests/sec:\s+([\d.]+)").group(1)),
        p50_ms=dist["50"],
        p75_ms=dist.get("75", float("nan")),
        p90_ms=dist.get("90", float("nan")),
        p99_ms=dist["99"],
        avg_ms=to_ms(lat.group(1)),
        max_ms=to_ms(lat.group(3)),
        requests=int(need(r"^\s+(\d+) requests in").group(1)),
        socket_errors=dict(
            zip(
                ("connect", "read", "write", "timeout"),
                (int(x) for x in sock.groups()) if sock else (0, 0, 0, 0),
                strict=True,
            )
        ),
        non_2xx_3xx=int(non2xx.group(1)) if non2xx else 0,
    )


def wrk_cmd(wrk: str, args: argparse.Namespace, port: int, duration: float) -> list[str]:
    return [
        wrk,
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{duration:g}s",
        "--latency",
        f"http://127.0.0.1:{port}{REQUEST_PATH}",
    ]


class WrkRunner:
    def __init__(self, wrk: str) -> None:
        self.wrk = wrk
        self.current: subprocess.Popen[str] | None = None

    def run(self, cmd: list[str], duration: float) -> str:
        self.current = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = self.current.communicate(timeout=duration + 60)
        finally:
            self.kill()
        if self.current is not None and self.current.returncode != 0:
            raise RuntimeError(f"wrk failed ({self.current.returncode}): {err.strip() or out.strip()}")
        return out

    def kill(self) -> None:
        proc = self.current
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------ targets


@dataclass
class Run:
    round: int
    position: int
    wrk: dict[str, Any]
    flagged: bool
    wall_s: float
    cpu_target_s: float
    cpu_upstream_s: float
    cpu_wrk_s: float
    cpu_other_s: float
    noisy: bool  # the rest of the machine used more than NOISY_SHARE of its CPU during the run
    loadavg_before: str
    raw: str


@dataclass
class Target:
    key: str
    label: str
    role: str  # "baseline" | "gateway" | "reference"
    port: int
    description: str
    proc: Proc | None = None
    skipped: str | None = None
    command: list[str] = field(default_factory=list)
    config_file: str | None = None
    config_text: str | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)

    @property
    def pgid(self) -> int | None:
        return self.proc.pid if self.proc else None


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def summarize(t: Target) -> dict[str, Any]:
    rps = [r.wrk["rps"] for r in t.runs]
    p50 = [r.wrk["p50_ms"] for r in t.runs]
    p99 = [r.wrk["p99_ms"] for r in t.runs]
    cpu_per_k = [r.cpu_target_s * 1000.0 / r.wrk["requests"] * 1000.0 for r in t.runs if r.wrk["requests"]]
    return {
        "rounds": len(t.runs),
        "rps": median(rps),
        "rps_min": min(rps, default=float("nan")),
        "rps_max": max(rps, default=float("nan")),
        "p50_ms": median(p50),
        "p99_ms": median(p99),
        "p99_min_ms": min(p99, default=float("nan")),
        "p99_max_ms": max(p99, default=float("nan")),
        "cpu_ms_per_1k_requests": median(cpu_per_k),
        "flagged_runs": sum(1 for r in t.runs if r.flagged),
        "noisy_runs": sum(1 for r in t.runs if r.noisy),
        "errors": sum(sum(r.wrk["socket_errors"].values()) for r in t.runs),
        "non_2xx_3xx": sum(r.wrk["non_2xx_3xx"] for r in t.runs),
    }


# -------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=None, help="seconds per measured run (default 10)")
    p.add_argument("--warmup", type=float, default=None, help="seconds of the warm-up run per target (3)")
    p.add_argument("--runs", type=int, default=None, help="alternating rounds, at least 3 (default 3)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--workers", type=int, default=2, help="gateway workers = nginx proxy workers (2)")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 s runs, 1 s warm-up, 3 rounds")
    p.add_argument("--no-direct", action="store_true", help="skip the upstream-direct reference target")
    p.add_argument("--no-gateway", action="store_true", help="nginx targets only")
    p.add_argument(
        "--gateway-module",
        default="fhirgate.cli.main",
        help="run `python -m MODULE gateway ...` (default fhirgate.cli.main; to test the harness)",
    )
    p.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = p.parse_args(argv)
    quick_or_full = (3.0, 1.0, 3) if args.quick else (10.0, 3.0, 3)
    args.duration = args.duration if args.duration is not None else quick_or_full[0]
    args.warmup = args.warmup if args.warmup is not None else quick_or_full[1]
    args.runs = args.runs if args.runs is not None else quick_or_full[2]
    if args.runs < 3:
        p.error("--runs must be at least 3 (median of at least three alternating runs)")
    if args.duration <= 0 or args.warmup < 0 or args.connections < 1 or args.workers < 1:
        p.error("durations, connections and workers must be positive")
    return args


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def interrupt_on_term() -> Iterator[None]:
    """SIGTERM/SIGHUP behave like Ctrl-C, so the `finally` that stops every process always runs."""
    old = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def one_benchmark_at_a_time() -> Iterator[None]:
    """Two benchmarks on one machine would measure each other: the second waits for the first."""
    with LOCK_FILE.open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            say(f"another proxy benchmark is running on this machine (pid {holder}): waiting for it to end")
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_benchmark(
    prefix: str,
    keep_tmp: bool,
    find_wrk: Callable[[], str],
    body: Callable[[Processes, WrkRunner, str, Path], int],
    signals: Callable[[], contextlib.AbstractContextManager[None]] | None = None,
) -> int:
    """What every benchmark's `main` does around its body: one benchmark at a time, a temp dir,
    and whatever happens (error, Ctrl-C, SIGTERM), every process it started stopped and the
    temp dir removed (unless `keep_tmp`)."""
    procs = Processes()
    runner: WrkRunner | None = None
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    with (signals or interrupt_on_term)(), contextlib.ExitStack() as stack:
        try:
            stack.enter_context(one_benchmark_at_a_time())
            wrk = find_wrk()
            runner = WrkRunner(wrk)
            return body(procs, runner, wrk, tmp)
        except KeyboardInterrupt:
            loud("interrupted: stopping every process the benchmark started")
            return 130
        finally:
            if runner is not None:
                runner.kill()
            procs.stop_all()
            if keep_tmp:
                say(f"temp dir kept: {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tools: dict[str, str] = {}

    def find_wrk() -> str:
        tools["nginx"], wrk = ensure_tools()
        return wrk

    return run_benchmark(
        "fhirgate-bench-",
        args.keep_tmp,
        find_wrk,
        lambda procs, runner, wrk, tmp: bench(args, procs, runner, tools["nginx"], wrk, tmp),
    )


def start_nginx(procs: Processes, nginx: str, name: str, d: Path, conf: str) -> Proc:
    (d / "tmp").mkdir(parents=True, exist_ok=True)
    conf_path = d / "nginx.conf"
    conf_path.write_text(conf)
    cmd = [nginx, "-p", str(d), "-c", str(conf_path), "-e", str(d / "error.log")]
    return procs.start(name, cmd, d / "stdout.log", cwd=d, env=dict(os.environ))


def gateway_env() -> dict[str, str]:
    """The environment of the gateway: no FHIRGATE_* settings leak in from the caller's shell, and the
    package is imported from this checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRGATE_")}
    src = str(REPO_ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def gateway_available(module: str) -> str | None:
    """None when `fhirgate gateway --help` works, else why it does not."""
    cmd = [sys.executable, "-m", module, "gateway", "--help"]
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=30, env=gateway_env(), cwd=REPO_ROOT
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{' '.join(cmd)}: {exc}"
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines()
        return f"`python {' '.join(cmd[1:])}` exited {out.returncode}: {lines[-1] if lines else ''}"
    return None


def check_response(t: Target, expected: bytes) -> None:
    status, headers, body = http_get(t.port)
    t.checks["status"] = status
    t.checks["content_type"] = headers.get("content-type")
    t.checks["body_identical"] = body == expected
    t.checks["body_bytes"] = len(body)
    t.checks["response_headers"] = sorted(headers)
    problems = []
    if status != 200:
        problems.append(f"status {status}")
    if body != expected:
        problems.append(f"body differs from the upstream's ({len(body)} bytes, expected {len(expected)})")
    if "application/fhir+json" not in (headers.get("content-type") or ""):
        problems.append(f"content-type {headers.get('content-type')!r}")
    if problems:
        loud(f"{t.label}: response check failed: {'; '.join(problems)}")


def bench(
    args: argparse.Namespace,
    procs: Processes,
    runner: WrkRunner,
    nginx: str,
    wrk: str,
    tmp: Path,
) -> int:
    tmp.chmod(0o755)  # nginx workers run as `nobody` when started by root: they must read the body
    started = dt.datetime.now(dt.UTC)
    body = patient_json()
    www = tmp / "www"
    www.mkdir(mode=0o755)
    (www / "patient.json").write_bytes(body)
    (www / "patient.json").chmod(0o644)
    say(f"upstream body: FHIR R4 Patient, {len(body)} bytes, {www / 'patient.json'}")

    up_port, proxy_port, plain_port, plugins_port, status_port = free_ports(5)

    # nginx #1: the upstream
    up_dir = tmp / "nginx-upstream"
    up_conf = nginx_upstream_conf(up_dir, www, up_port)
    upstream = Target(
        "upstream-direct",
        "upstream direct (reference)",
        "reference",
        up_port,
        "nginx #1 itself, no proxy hop: the ceiling of this machine with this client",
        config_text=up_conf,
        config_file=str(up_dir / "nginx.conf"),
    )
    upstream.proc = start_nginx(procs, nginx, "nginx-upstream", up_dir, up_conf)
    upstream.command = list(upstream.proc.popen.args)  # type: ignore[arg-type]
    if (why := wait_ready(upstream.proc, up_port)) is not None:
        raise SystemExit(f"upstream nginx did not start: {why}\n{upstream.proc.log_tail()}")

    # nginx #2: the reverse proxy
    px_dir = tmp / "nginx-proxy"
    px_conf = nginx_proxy_conf(px_dir, proxy_port, up_port, args.workers)
    proxy = Target(
        BASELINE,
        f"nginx proxy ({args.workers}w)",
        "baseline",
        proxy_port,
        "nginx #2 as a plain reverse proxy (upstream keepalive 64) in front of nginx #1",
        config_text=px_conf,
        config_file=str(px_dir / "nginx.conf"),
    )
    proxy.proc = start_nginx(procs, nginx, "nginx-proxy", px_dir, px_conf)
    proxy.command = list(proxy.proc.popen.args)  # type: ignore[arg-type]
    if (why := wait_ready(proxy.proc, proxy_port)) is not None:
        raise SystemExit(f"nginx proxy did not start: {why}\n{proxy.proc.log_tail()}")

    # fhirgate, twice
    gw_dir = tmp / "fhirgate"
    gw_dir.mkdir()
    access_log = gw_dir / "access.log"
    plain = Target(
        "fhirgate-plain",
        f"fhirgate ({args.workers}w)",
        "gateway",
        plain_port,
        "fhirgate gateway, one service and route, no plugins",
    )
    with_plugins = Target(
        "fhirgate-plugins",
        f"fhirgate+5 plugins ({args.workers}w)",
        "gateway",
        plugins_port,
        "fhirgate gateway with global cors, correlation-id, rate-limiting (local), prometheus, file-log",
    )
    gateways = [plain, with_plugins]
    for t, plugins in ((plain, False), (with_plugins, True)):
        t.config_text = gateway_conf(up_port, plugins, access_log)
        t.config_file = str(gw_dir / f"{t.key}.yaml")
        Path(t.config_file).write_text(t.config_text)
        t.command = [
            sys.executable,
            "-m",
            args.gateway_module,
            "gateway",
            "--config",
            t.config_file,
            "--listen",
            f"127.0.0.1:{t.port}",
            "--workers",
            str(args.workers),
        ]
        if plugins:
            t.command += ["--status-listen", f"127.0.0.1:{status_port}"]

    if args.no_gateway:
        for t in gateways:
            t.skipped = "--no-gateway given"
    elif (why := gateway_available(args.gateway_module)) is not None:
        for t in gateways:
            t.skipped = f"the `fhirgate gateway` command is not available yet: {why}"
        loud(f"fhirgate targets SKIPPED: {why}")
    else:
        for t in gateways:
            t.proc = procs.start(t.key, t.command, gw_dir / f"{t.key}.log", cwd=gw_dir, env=gateway_env())
            if (why := wait_ready(t.proc, t.port)) is not None:
                tail = t.proc.log_tail()
                said = " | ".join(line.strip() for line in tail.splitlines()[-6:] if line.strip())
                t.skipped = f"{why}: {said}" if said else why
                t.checks["log_tail"] = tail
                loud(f"{t.label} SKIPPED: {why}\n{tail}")
                procs.stop(t.proc)
                t.proc = None

    targets = [proxy, plain, with_plugins]
    if not args.no_direct:
        targets.append(upstream)
    active = [t for t in targets if t.skipped is None]
    for t in active:
        check_response(t, body)

    wrk_example = " ".join(wrk_cmd("wrk", args, 0, args.duration)).replace(":0/", ":PORT/")
    say()
    say(
        f"method: wrk and every target share this machine's {os.cpu_count()} cores on loopback "
        "(client and servers compete for the same CPUs; that is the method, so compare ratios, not "
        "absolute figures)."
    )
    say(
        f"        {args.runs} alternating rounds of {args.duration:g}s per target after a {args.warmup:g}s "
        f"warm-up per target; command: {wrk_example}"
    )
    say()

    # warm-up
    if args.warmup > 0:
        for t in active:
            runner.run(wrk_cmd(wrk, args, t.port, args.warmup), args.warmup)
            say(f"warm-up {t.label}: done")

    # alternating rounds: round-robin, the starting target rotating each round
    for rnd in range(args.runs):
        order = active[rnd % len(active) :] + active[: rnd % len(active)]
        for pos, t in enumerate(order):
            run = measure(runner, wrk, args, t, upstream, rnd, pos)
            t.runs.append(run)
            r = run.wrk
            flag = ("  <-- ERRORS" if run.flagged else "") + ("  (noisy: other load)" if run.noisy else "")
            say(
                f"round {rnd + 1}/{args.runs} {t.label:<28} {r['rps']:>10.0f} req/s"
                f"  p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms"
                f"  cpu s: target {run.cpu_target_s:5.2f} upstream {run.cpu_upstream_s:5.2f}"
                f" wrk {run.cpu_wrk_s:5.2f} other {run.cpu_other_s:5.2f}s{flag}"
            )
            if run.flagged:
                loud(
                    f"{t.label} round {rnd + 1}: socket errors {r['socket_errors']}, "
                    f"non-2xx/3xx responses {r['non_2xx_3xx']}: this run is NOT a clean measurement"
                )

    noisy = sum(1 for t in active for r in t.runs if r.noisy)
    if noisy:
        say(
            f"warning: {noisy} of {sum(len(t.runs) for t in active)} runs had other load above "
            f"{NOISY_SHARE:.0%} of the machine (other processes or kernel work): the spread is wider; "
            "rerun on a quiet machine for figures to publish",
            style="yellow",
        )

    # evidence that the plugins ran
    if with_plugins.skipped is None:
        plugin_evidence(with_plugins, access_log, status_port)

    report = build_report(args, targets, started, nginx, wrk, wrk_example, body)
    print_report(report)
    write_results(args.results_dir, report, tmp)
    return 0


def measure(
    runner: WrkRunner, wrk: str, args: argparse.Namespace, t: Target, upstream: Target, rnd: int, pos: int
) -> Run:
    cmd = wrk_cmd(wrk, args, t.port, args.duration)
    return measure_cmd(runner, cmd, args.duration, t, upstream, rnd, pos)


def measure_cmd(
    runner: WrkRunner, cmd: list[str], duration: float, t: Target, upstream: Target, rnd: int, pos: int
) -> Run:
    """One wrk run of `cmd` with the CPU accounting: the target's group, the upstream's (unless it is
    the target), wrk and the rest of the machine."""
    loadavg = read_loadavg()
    up_pgid = upstream.pgid
    t_pgid = t.pgid
    if up_pgid is None or t_pgid is None:
        raise RuntimeError(f"{t.label}: no process to measure")
    same = up_pgid == t_pgid
    t0 = time.monotonic()
    cpu_t0 = group_cpu_seconds(t_pgid)
    cpu_u0 = 0.0 if same else group_cpu_seconds(up_pgid)
    cpu_w0 = children_cpu_seconds()
    busy0 = system_busy_seconds()
    raw = runner.run(cmd, duration)
    busy1 = system_busy_seconds()
    cpu_w1 = children_cpu_seconds()
    cpu_u1 = 0.0 if same else group_cpu_seconds(up_pgid)
    cpu_t1 = group_cpu_seconds(t_pgid)
    wall = time.monotonic() - t0
    res = parse_wrk(raw)
    cpu_target = cpu_t1 - cpu_t0
    cpu_up = cpu_u1 - cpu_u0
    cpu_wrk = cpu_w1 - cpu_w0
    other = (busy1 - busy0) - cpu_target - cpu_up - cpu_wrk
    return Run(
        round=rnd + 1,
        position=pos + 1,
        wrk={**asdict(res), "command": shlex.join(cmd)},
        flagged=res.errors > 0 or res.non_2xx_3xx > 0,
        wall_s=round(wall, 3),
        cpu_target_s=round(cpu_target, 3),
        cpu_upstream_s=round(cpu_up, 3),
        cpu_wrk_s=round(cpu_wrk, 3),
        cpu_other_s=round(other, 3),
        noisy=other > NOISY_SHARE * wall * (os.cpu_count() or 1),
        loadavg_before=loadavg,
        raw=raw,
    )


def plugin_evidence(t: Target, access_log: Path, status_port: int) -> None:
    """Record that the five plugins did run (headers, access log, metrics), so a fast result cannot
    come from plugins that were silently off."""
    ev: dict[str, Any] = {}
    try:
        conn = http.client.HTTPConnection("127.0.0.1", t.port, timeout=2)
        conn.request("GET", REQUEST_PATH, headers={"Origin": "https://app.example.org"})
        resp = conn.getresponse()
        resp.read()
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
        conn.close()
        ev["cors_header"] = hdrs.get("access-control-allow-origin")
        # Kong's default (echo_downstream false) sets the header towards the upstream only; the
        # upstream echoes what it received
        ev["correlation_id_header"] = hdrs.get("kong-request-id") or hdrs.get("x-echo-kong-request-id")
        ev["rate_limit_headers"] = {k: v for k, v in hdrs.items() if "ratelimit" in k}
    except OSError as exc:
        ev["request_error"] = str(exc)
    try:
        ev["access_log_bytes"] = access_log.stat().st_size
        with access_log.open("rb") as fh:
            ev["access_log_lines"] = sum(1 for _ in fh)
    except OSError as exc:
        ev["access_log_error"] = str(exc)
    try:
        status, _, metrics = http_get(status_port, "/metrics")
        ev["metrics_status"] = status
        ev["metrics_sample"] = [
            line for line in metrics.decode(errors="replace").splitlines() if line.startswith("kong_")
        ][:5]
    except OSError as exc:
        ev["metrics_error"] = str(exc)
    t.checks["plugin_evidence"] = ev
    missing = [
        name
        for name, ok in (
            ("cors", ev.get("cors_header")),
            ("correlation-id", ev.get("correlation_id_header")),
            ("rate-limiting", ev.get("rate_limit_headers")),
            ("file-log", ev.get("access_log_lines")),
            ("prometheus", ev.get("metrics_status") == 200),
        )
        if not ok
    ]
    if missing:
        loud(f"plugins with no visible effect: {', '.join(missing)} (evidence: {json.dumps(ev)[:600]})")
    else:
        say(f"plugins ran: all five left evidence ({ev.get('access_log_lines')} access-log lines)")


# ------------------------------------------------------------------------------------------ report


def target_record(t: Target) -> dict[str, Any]:
    """One target as written to the results JSON."""
    return {
        "key": t.key,
        "label": t.label,
        "role": t.role,
        "description": t.description,
        "port": t.port,
        "command": t.command,
        "config_file": t.config_file,
        "config": t.config_text,
        "skipped": t.skipped,
        "checks": t.checks,
        "runs": [asdict(r) for r in t.runs],
    }


def build_report(
    args: argparse.Namespace,
    targets: list[Target],
    started: dt.datetime,
    nginx: str,
    wrk: str,
    wrk_example: str,
    body: bytes,
) -> dict[str, Any]:
    summaries = {t.key: summarize(t) for t in targets if t.skipped is None}
    base = summaries.get(BASELINE)
    for s in summaries.values():
        s["rps_ratio_to_nginx"] = s["rps"] / base["rps"] if base and base["rps"] else float("nan")
        s["p99_ratio_to_nginx"] = s["p99_ms"] / base["p99_ms"] if base and base["p99_ms"] else float("nan")
    # paired per-round ratios (same round, so drift cancels): a cross-check of the ratio of medians
    by_round = {t.key: {r.round: r for r in t.runs} for t in targets}
    for t in targets:
        if t.skipped is None and base:
            pairs = [
                r.wrk["rps"] / by_round[BASELINE][r.round].wrk["rps"]
                for r in t.runs
                if r.round in by_round[BASELINE]
            ]
            summaries[t.key]["rps_ratio_paired_median"] = median(pairs)

    bars = []
    for key, metric, op, factor, label in BARS:
        gw = summaries.get(key)
        target = next(t for t in targets if t.key == key)
        if gw is None or base is None:
            bars.append({"bar": label, "result": "SKIPPED", "why": target.skipped or "no baseline"})
            continue
        ratio = gw["rps_ratio_to_nginx"] if metric == "rps" else gw["p99_ratio_to_nginx"]
        ok = ratio >= factor if op == ">=" else ratio <= factor
        dirty = gw["flagged_runs"] > 0 or summaries[BASELINE]["flagged_runs"] > 0
        bars.append(
            {
                "bar": label,
                "result": "PASS" if ok else "MISS",
                "ratio": ratio,
                "required": f"{op} {factor}",
                "runs_with_errors": dirty,
            }
        )

    return {
        "benchmark": "bench/proxy_bench.py",
        "timestamp": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "tools": {
            "nginx": tool_version([nginx, "-v"]),
            "nginx_path": nginx,
            "wrk": tool_version([wrk, "-v"]),
            "wrk_path": wrk,
            "fhirgate_revision": repo_revision(),
        },
        "method": {
            "note": (
                "wrk and the targets share the machine's cores on loopback; every target is loaded in "
                "alternating round-robin rounds (the first target rotating each round) after one warm-up "
                "run per target; figures are medians over rounds"
            ),
            "wrk_command": wrk_example,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.runs,
            "connections": args.connections,
            "wrk_threads": args.threads,
            "workers": args.workers,
            "request": f"GET {REQUEST_PATH}",
            "body_bytes": len(body),
            "quick": args.quick,
            "cpu_columns": (
                "cpu_target_s: user+sys CPU of the target's process group during the run; cpu_upstream_s: "
                "nginx #1; cpu_wrk_s: wrk; cpu_other_s: the rest of the machine's busy time (kernel softirq "
                "for loopback, other processes)"
            ),
        },
        "targets": [target_record(t) for t in targets],
        "medians": summaries,
        "bars": bars,
    }


def fmt(x: Any, spec: str) -> str:
    return "-" if x is None or x != x else format(x, spec)  # None, NaN -> "-"


def target_rows(
    report: dict[str, Any], specific: Callable[[dict[str, Any]], tuple[str, ...]], width: int
) -> list[tuple[str, ...]]:
    """One table row per target: label, req/s, min-max, p50, p99, then `specific(medians)` (each
    benchmark's own ratio and CPU columns), then errors. A skipped target says so."""
    rows: list[tuple[str, ...]] = []
    for t in report["targets"]:
        s = report["medians"].get(t["key"])
        if s is None:
            rows.append((t["label"], "SKIPPED", *([""] * (width - 2))))
            continue
        errs = s["errors"] + s["non_2xx_3xx"]
        rows.append(
            (
                t["label"],
                fmt(s["rps"], ",.0f"),
                f"{fmt(s['rps_min'], ',.0f')}-{fmt(s['rps_max'], ',.0f')}",
                fmt(s["p50_ms"], ".2f"),
                fmt(s["p99_ms"], ".2f"),
                *specific(s),
                f"{errs} FLAGGED" if errs else "0",
            )
        )
    return rows


def print_table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """The results table: rich when available, aligned plain text otherwise."""
    if _CONSOLE is not None:
        table = Table(title=title)
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row, style="bold red" if row[1] == "SKIPPED" or "FLAGGED" in row[-1] else None)
        _CONSOLE.print(table)
        return
    print(title)
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, *rows):
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )


def print_report(report: dict[str, Any]) -> None:
    m = report["method"]
    title = (
        f"median of {m['rounds']} rounds, {m['duration_s']:g}s each, {m['connections']} connections, "
        f"{m['workers']} workers - {report['machine']['cpu_model']}, {report['machine']['cores']} cores"
    )
    header = (
        "target",
        "req/s",
        "min-max",
        "p50 ms",
        "p99 ms",
        "rps / nginx",
        "p99 / nginx",
        "CPU ms/1k req",
        "errors",
    )
    rows = target_rows(
        report,
        lambda s: (
            fmt(s["rps_ratio_to_nginx"], ".2f") + "x",
            fmt(s["p99_ratio_to_nginx"], ".2f") + "x",
            fmt(s["cpu_ms_per_1k_requests"], ".0f"),
        ),
        len(header),
    )
    say()
    print_table(title, header, rows)
    say()
    say("bars (from the issue; a report, never an exit status):")
    shown: set[str] = set()
    for b in report["bars"]:
        extra = f"  ratio {b['ratio']:.2f} (required {b['required']})" if "ratio" in b else ""
        if b.get("runs_with_errors"):
            extra += "  -- runs had errors: not a valid measurement"
        style = {"PASS": "bold green", "MISS": "bold red"}.get(b["result"], "yellow")
        say(f"  {b['result']:<8} {b['bar']}{extra}", style=style)
        if b["result"] == "SKIPPED" and b["why"] not in shown:
            shown.add(b["why"])
            say(f"           why: {b['why'].splitlines()[0] if b['why'] else ''}", style="yellow")
    say()
    say(
        "note: wrk and the targets share the same cores; compare the ratios (same machine, same client, "
        "alternating rounds), not the absolute figures."
    )


def _portable(value: Any, replacements: list[tuple[str, str]]) -> Any:
    """The report without this machine's own paths (temp dir, interpreter, tool locations)."""
    if isinstance(value, dict):
        return {k: _portable(v, replacements) for k, v in value.items() if k != "hostname"}
    if isinstance(value, list):
        return [_portable(v, replacements) for v in value]
    if isinstance(value, str):
        for old, new in replacements:
            value = value.replace(old, new)
        return value
    return value


def save_report(
    results_dir: Path,
    stem: str,
    report: dict[str, Any],
    replacements: list[tuple[str, str]],
    plot: Callable[[dict[str, Any], Path], Path],
) -> None:
    """Write `report`, without this machine's paths, to RESULTS_DIR/STEM.json and its chart to
    STEM.png (none, loudly, without matplotlib)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    report = _portable(report, replacements)
    json_path = results_dir / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    say(f"wrote {json_path}")
    try:
        say(f"wrote {plot(report, results_dir / f'{stem}.png')}")
    except ImportError:
        loud("matplotlib is not installed: no chart (pip install matplotlib)")


def write_results(results_dir: Path, report: dict[str, Any], tmp: Path | None = None) -> None:
    replacements = [(sys.executable, "python")]
    if tmp is not None:
        replacements.append((str(tmp), "$TMP"))
    for tool in ("nginx", "wrk"):
        found = shutil.which(tool)
        if found:
            replacements.append((found, tool))
    save_report(results_dir, "latest", report, replacements, plot)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only); ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish_chart(
    fig: Any,
    path: Path,
    rect: tuple[float, float, float, float],
    footnote: str | None = None,
    footnote_y: float = 0.012,
) -> Path:
    """How every chart ends: an italic footnote centred at `footnote_y` (if any), the layout inside
    `rect`, the PNG written at 110 dpi, the figure closed."""
    import matplotlib.pyplot as plt

    if footnote is not None:
        fig.text(0.5, footnote_y, footnote, ha="center", fontsize=8, style="italic")
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(report: dict[str, Any], path: Path) -> Path:
    """Two panels: median requests/s (ratio to the nginx proxy on each bar, the issue's bars as red
    lines) and median p99; the dots are the individual rounds."""
    plt = pyplot()

    targets = report["targets"]
    med = report["medians"]
    base = med.get(BASELINE)
    colours = {"baseline": "#8c8c8c", "gateway": "#1f77b4", "reference": "#d0d0d0"}
    labels = [t["label"].replace(" (", "\n(") for t in targets]
    xs = list(range(len(targets)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 6.6))

    panels = (
        (ax1, "rps", "requests/s (median of rounds; higher is better)", "rps_ratio_to_nginx", "Throughput"),
        (ax2, "p99_ms", "p99 latency, ms (median of rounds; lower is better)", "p99_ratio_to_nginx", "p99"),
    )
    for ax, metric, ylabel, ratio_key, title in panels:
        heights = [med[t["key"]][metric] if t["key"] in med else 0.0 for t in targets]
        points = [[r["wrk"][metric] for r in t["runs"]] for t in targets]
        lines: list[tuple[float, str, str]] = []
        if base:
            if metric == "rps":
                lines = [
                    (base["rps"] * 0.75, "--", "bar: fhirgate >= 0.75x nginx req/s"),
                    (base["rps"] * 0.60, ":", "bar: fhirgate+plugins >= 0.60x nginx req/s"),
                ]
            else:
                lines = [(base["p99_ms"] * 2.0, "--", "bar: p99 <= 2x nginx p99")]
        top = max([1e-9, *heights, *(p for pts in points for p in pts), *(v for v, _, _ in lines)])
        bars = ax.bar(xs, heights, color=[colours[t["role"]] for t in targets], edgecolor="black", width=0.6)
        for i, t in enumerate(targets):
            if t["key"] not in med:
                ax.text(i, top * 0.03, "skipped", ha="center", va="bottom", color="#d62728", fontsize=10)
                continue
            ax.scatter([i] * len(points[i]), points[i], color="black", s=14, zorder=3)
            ratio = med[t["key"]][ratio_key]
            value = f"{heights[i]:,.0f} req/s" if metric == "rps" else f"{heights[i]:.2f} ms"
            ax.text(
                bars[i].get_x() + bars[i].get_width() / 2,
                max(heights[i], *points[i]) + top * 0.02,
                f"{value}\n{ratio:.2f}x nginx",
                ha="center",
                va="bottom",
                fontsize=9,
                fontweight="bold" if t["role"] == "gateway" else "normal",
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1.5},
                zorder=4,
            )
        for level, style, label in lines:
            ax.axhline(level, color="#d62728", linestyle=style, linewidth=1.2, label=label)
        if lines:
            ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=9)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("target (bars: median; dots: individual rounds)")
        ax.set_ylim(0, top * 1.3)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)

    mach = report["machine"]
    m = report["method"]
    day = report["timestamp"][:16].replace("T", " ")
    fig.suptitle(
        f"fhirgate vs nginx reverse proxy - {mach['cpu_model']}, {mach['cores']} cores, "
        f"{mach['kernel']}, {day} UTC\n"
        f"{m['wrk_command']}  |  median of {m['rounds']} alternating rounds after warm-up  |  "
        f"{m['workers']} workers  |  {m['body_bytes']} B FHIR Patient"
        f"{'  |  QUICK run' if m['quick'] else ''}",
        fontsize=11,
    )
    verdicts = "   ".join(
        f"{b['result']}: {b['bar'].split(': ', 1)[1]} ({b['bar'].split(':', 1)[0]})" for b in report["bars"]
    )
    fig.text(0.5, 0.045, verdicts, ha="center", fontsize=7.5, wrap=True)
    return finish_chart(
        fig,
        path,
        (0, 0.08, 1, 0.92),
        "wrk and all targets share the same cores on loopback: compare ratios, not absolute figures.",
        0.012,
    )


# -------------------------------------------- shared by the server benchmarks (auth_bench, fhir_bench)


def ensure_wrk() -> str:
    """wrk on PATH; installed with apt (wrk only, as root) when missing."""
    found = find_exe("wrk")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise SystemExit("wrk is missing: install it first (apt-get install -y wrk)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "wrk"]):
        say(f"tools: wrk missing -> running: {' '.join(cmd)}")
        subprocess.run(cmd, check=True, env=env)
    found = find_exe("wrk")
    if found is None:
        raise SystemExit("wrk still not found after installing it")
    return found


def wait_http_ready(proc: Proc, port: int, path: str, what: str, timeout: float) -> None:
    """Return once GET `path` on `port` answers 200; RuntimeError (naming `what`) if the process
    exits first (with its log's tail) or after `timeout` seconds (with the last answer)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{what} exited with status {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            status, _, _ = http_get(port, path, timeout=2.0)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s: {last}")


async def _pg(url: str, statements: Sequence[str], query: str | None) -> list[Any]:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10)
    try:
        for s in statements:
            await conn.execute(s)
        return [tuple(r) for r in await conn.fetch(query)] if query else []
    finally:
        await conn.close()


def pg(url: str, statements: Sequence[str] = (), query: str | None = None) -> list[Any]:
    """On one new PostgreSQL connection: `statements`, then `query`'s rows as tuples (none without)."""
    return asyncio.run(_pg(url, statements, query))


def with_schema(url: str, schema: str) -> str:
    """The database URL with `?schema=` (fhirgate's storage URLs)."""
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


def postgres_version(url: str) -> str:
    try:
        return str(pg(url, [], "SELECT version()")[0][0])
    except Exception as exc:
        return f"unavailable: {type(exc).__name__}: {exc}"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def base_versions(wrk: str) -> dict[str, Any]:
    """The versions every server benchmark records first: Python, SQLite, wrk, the checkout."""
    return {
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
        "wrk": tool_version([wrk, "-v"]),
        "fhirgate_revision": repo_revision(),
    }


def dirty_sources() -> bool | None:
    """Whether src/ has uncommitted changes (None when git cannot tell)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def warn_if_sources_changed(start: str, end: str) -> None:
    if end != start:
        loud(
            "the fhirgate sources changed while the benchmark ran (someone else's edit): figures mix versions"
        )


def report_head(script: str, started: dt.datetime, t_start: float, argv: Sequence[str]) -> dict[str, Any]:
    """The first members of a results JSON: which script, when, how long, the command line."""
    return {
        "benchmark": script,
        "timestamp": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "command": shlex.join(["python", script, *argv]),
    }


@dataclass
class LuaWrkResult:
    """wrk's output with one of bench/lua/'s scripts, which prints its own summary as `TAG {json}`."""

    stats: dict[str, Any]  # the script's summary: requests, latencies in us, error counts, ...
    rps: float
    non_2xx_3xx: int
    socket_errors: int  # connect + read + write errors + timeouts

    @property
    def requests(self) -> int:
        return int(self.stats["requests"])

    def ms(self, key: str) -> float:
        """A latency of the summary (`key`, in microseconds) in ms; NaN when nothing completed."""
        return float("nan") if self.requests == 0 else self.stats[key] / 1000.0


def parse_lua_wrk(raw: str, tag: str) -> LuaWrkResult:
    m = re.search(rf"^{tag} (\{{.*\}})$", raw, re.MULTILINE)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", raw, re.MULTILINE)
    if m is None or rps is None:
        raise RuntimeError(f"wrk output not understood:\n{raw}")
    s = json.loads(m.group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", raw)
    return LuaWrkResult(
        stats=s,
        rps=float(rps.group(1)),
        non_2xx_3xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=s["connect_errors"] + s["read_errors"] + s["write_errors"] + s["timeouts"],
    )


def pyspy_path() -> str:
    """py-spy on PATH or beside this interpreter (it may not exist: check)."""
    return shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


def pyspy_worker_stacks(path: Path, needle: str) -> tuple[list[tuple[str, list[str], int]], int]:
    """py-spy's collapsed stacks (`record --subprocesses --nolineno --format raw`) as (process, frames,
    samples), only those of the worker processes (the processes with a frame containing `needle`:
    uvicorn's supervisor only waits on its pipes), and how many worker processes there were."""
    stacks: list[tuple[str, list[str], int]] = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        proc = "?"  # child processes are nested: `process MASTER;process CHILD;frames...`
        while frames and frames[0].startswith("process "):
            proc = frames.pop(0)
        if frames:
            stacks.append((proc, frames, int(n)))
    workers = {p for p, frames, _ in stacks if any(needle in f for f in frames)}
    return [st for st in stacks if st[0] in workers], len(workers)


if __name__ == "__main__":
    sys.exit(main())
