"""Exact cost of a request through the gateway, in CPU instructions (user space), per configuration.

Wall-clock benchmarks on a shared 2-core VM move by ±20 % between runs; this does not. It runs one
gateway worker in-process under `valgrind --tool=callgrind` with instrumentation off, sends a
warm-up, switches instrumentation on around a fixed number of keep-alive requests from a small
asyncio client, and divides. Use it to compare two versions of the hot path, or the cost of a
plugin; use `proxy_bench.py` for throughput against nginx.

    python bench/instructions.py [--requests N] [--config none|plugins|all|NAME ...]

`none` is the plain proxy, `plugins` the five plugins of proxy_bench.py, a plugin NAME that plugin
alone with a benchmark-friendly config. Needs valgrind (installed with apt if missing). Kernel time
(system calls) is not counted: callgrind sees user space only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

PLUGIN_CONFIGS: dict[str, dict[str, Any]] = {
    "cors": {"name": "cors"},
    "correlation-id": {"name": "correlation-id"},
    "rate-limiting": {"name": "rate-limiting", "config": {"minute": 100000000}},
    "prometheus": {"name": "prometheus"},
    "file-log": {"name": "file-log", "config": {"path": "{tmp}/access.log"}},
}

BODY = json.dumps(
    {"resourceType": "Patient", "id": "example", "text": {"status": "generated", "div": "x" * 2300}}
).encode()

RUNNER = r"""
import asyncio, os, sys, uvloop
from fhirgate.config import load_config_file
from fhirgate.gateway import hooks
from fhirgate.gateway.node import Listener, WorkerRuntime
from fhirgate.settings import Settings

async def main():
    settings = Settings(workers=1)
    hooks.run_before_fork(settings)
    hooks.run_after_fork(settings)
    runtime = WorkerRuntime(settings, load_config_file(sys.argv[1]))
    await runtime.start([Listener("proxy", "127.0.0.1", int(sys.argv[2]))])
    open(sys.argv[3] + ".ready", "w").close()
    while not os.path.exists(sys.argv[3] + ".stop"):
        await asyncio.sleep(0.05)
    await runtime.shutdown(1.0)

uvloop.install()
asyncio.run(main())
"""


class _Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def client(port: int, requests: int, connections: int = 8) -> None:
    request = (
        f"GET /fhir/Patient/example HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: bench\r\n\r\n"
    ).encode()

    async def one(n: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(n):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        writer.close()

    await asyncio.gather(*(one(requests // connections) for _ in range(connections)))


def measure(name: str, plugins: list[dict[str, Any]], requests: int, upstream_port: int, tmp: Path) -> int:
    config = {
        "_format_version": "3.0",
        "services": [
            {
                "name": "fhir",
                "url": f"http://127.0.0.1:{upstream_port}/fhir",
                "routes": [{"name": "fhir", "paths": ["/fhir"]}],
            }
        ],
        "plugins": json.loads(json.dumps(plugins).replace("{tmp}", str(tmp))),
    }
    conf_file = tmp / f"{name}.json"
    conf_file.write_text(json.dumps(config))
    runner = tmp / "runner.py"
    runner.write_text(RUNNER)
    flag = tmp / name
    out = tmp / f"callgrind.{name}"
    port = free_port()
    proc = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
            sys.executable,
            str(runner),
            str(conf_file),
            str(port),
            str(flag),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not Path(str(flag) + ".ready").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name}: the gateway did not start under valgrind")
            time.sleep(0.2)
        asyncio.run(client(port, max(400, requests // 5)))  # warm-up: caches, pools, JIT-free paths
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True)
        asyncio.run(client(port, requests))
        subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True, capture_output=True)
    finally:
        Path(str(flag) + ".stop").touch()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    totals = next(line for line in out.read_text().splitlines() if line.startswith("totals:"))
    return int(totals.split()[1]) // requests


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--config", nargs="+", default=["none", "plugins"])
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is missing: apt-get install -y valgrind", flush=True)
        subprocess.run(["apt-get", "install", "-y", "valgrind"], check=True)
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    up_port = upstream.server_address[1]
    with tempfile.TemporaryDirectory(prefix="fhirgate-instr-") as d:
        tmp = Path(d)
        os.chmod(tmp, 0o755)
        base = None
        for name in args.config:
            if name == "none":
                plugins: list[dict[str, Any]] = []
            elif name in ("plugins", "all"):
                plugins = list(PLUGIN_CONFIGS.values())
            elif name in PLUGIN_CONFIGS:
                plugins = [PLUGIN_CONFIGS[name]]
            else:
                print(f"unknown config {name!r}: none, plugins or one of {', '.join(PLUGIN_CONFIGS)}")
                return 2
            per_request = measure(name, plugins, args.requests, up_port, tmp)
            if name == "none":
                base = per_request
            extra = f"  (+{per_request - base:,} over none)" if base is not None and name != "none" else ""
            print(f"{name:16} {per_request:>10,} instructions per request{extra}", flush=True)
    upstream.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
