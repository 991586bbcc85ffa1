"""`make run`: the gateway in front of the built-in FHIR server, ready to try with curl.

This is the demo until `fhirgate up` exists. It starts `fhirgate fhir-server` on 127.0.0.1:9080
(SQLite under `.fhirgate/demo/`, its links pointing through the gateway), loads ten generated
patients on first start (`fhirgate demo-data` + `fhirgate load`), then runs
`fhirgate gateway --config examples/demo.yaml` on :8000 with its status listener (Prometheus
metrics) on 127.0.0.1:8100. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

#: FHIR server, gateway and status ports; `FHIRGATE_DEMO_PORTS=9080,8000,8100` (tests move them)
PORTS = tuple(int(p) for p in os.environ.get("FHIRGATE_DEMO_PORTS", "9080,8000,8100").split(","))


def _fhirgate(*args: str) -> list[str]:
    return [sys.executable, "-m", "fhirgate.cli.main", *args]


def _wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: {url} exited with status {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"demo: {url} did not answer within {timeout:.0f} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(data_dir: Path = Path(".fhirgate/demo")) -> int:
    fhir_port, gateway_port, status_port = PORTS
    fhir_url = f"http://127.0.0.1:{fhir_port}"
    gateway_fhir = f"http://localhost:{gateway_port}/fhir"
    config = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"
    if not config.exists():
        config = Path("examples/demo.yaml")
    data_dir.mkdir(parents=True, exist_ok=True)
    if fhir_port != 9080:
        moved = data_dir / "demo.yaml"
        moved.write_text(config.read_text().replace("127.0.0.1:9080", f"127.0.0.1:{fhir_port}"))
        config = moved
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRGATE_")}
    fhir = subprocess.Popen(
        _fhirgate(
            "fhir-server",
            "--listen",
            f"127.0.0.1:{fhir_port}",
            "--base-url",
            gateway_fhir,
            "--data-dir",
            str(data_dir),
            "--workers",
            "1",
        ),
        env=env,
    )
    gateway: subprocess.Popen[bytes] | None = None
    try:
        _wait_ready(fhir, f"{fhir_url}/metadata")
        total = httpx.get(f"{fhir_url}/Patient", params={"_summary": "count"}).json()["total"]
        if total == 0:
            out = data_dir / "demo-data"
            subprocess.run(
                _fhirgate("demo-data", "--patients", "10", "--seed", "1", "--out", str(out)),
                check=True,
                env=env,
            )
            subprocess.run(_fhirgate("load", str(out), "--fhir", fhir_url), check=True, env=env)
        patient = httpx.get(f"{fhir_url}/Patient", params={"_count": 1, "_sort": "_id"}).json()["entry"][0][
            "resource"
        ]
        pid = patient["id"]
        print(f"\nbuilt-in FHIR server on {fhir_url} (SQLite under {data_dir})")
        print(f"behind the gateway at {gateway_fhir}")
        print("try:")
        print(f"  curl -i {gateway_fhir}/Patient/{pid}")
        print(f"  curl -s '{gateway_fhir}/Observation?patient={pid}&category=laboratory&_count=5'")
        print(f"  curl -s '{gateway_fhir}/Patient/{pid}/$everything?_count=20'")
        print(f"  curl -i http://localhost:{gateway_port}/nowhere              # 404, Kong-style JSON")
        print(f"  curl -s http://127.0.0.1:{status_port}/metrics | grep kong_http_requests_total")
        print("Ctrl-C stops everything.\n", flush=True)
        gateway = subprocess.Popen(
            _fhirgate(
                "gateway",
                "--config",
                str(config),
                "--listen",
                f"0.0.0.0:{gateway_port}",
                "--status-listen",
                f"127.0.0.1:{status_port}",
                "--access-log",
                "stdout",
            ),
            env=env,
        )
        return gateway.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if gateway is not None:
            _stop(gateway)
        _stop(fhir)


if __name__ == "__main__":
    sys.exit(main())
