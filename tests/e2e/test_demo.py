"""`make run` (python -m fhirgate.demo): the gateway in front of the built-in FHIR server with
generated data, on moved ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.procs import free_ports, stop_group

pytestmark = pytest.mark.slow


def test_demo_serves_generated_patients_through_the_gateway(tmp_path: Path) -> None:
    fhir_port, gw_port, status_port = free_ports(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRGATE_")}
    env["FHIRGATE_DEMO_PORTS"] = f"{fhir_port},{gw_port},{status_port}"
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fhirgate.demo"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://localhost:{gw_port}/fhir"
    try:
        deadline = time.monotonic() + 90
        bundle = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                r = httpx.get(f"{base}/Patient", params={"_count": 2}, timeout=5)
                if r.status_code == 200:
                    bundle = r.json()
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        assert bundle is not None, (
            proc.stdout.read().decode() if proc.stdout and proc.poll() is not None else ""
        )
        assert len(bundle["entry"]) == 2
        assert httpx.get(f"{base}/Patient", params={"_summary": "count"}).json()["total"] == 10
        # links point through the gateway
        assert bundle["link"][0]["url"].startswith(f"http://localhost:{gw_port}/fhir/Patient?")
        pid = bundle["entry"][0]["resource"]["id"]
        r = httpx.get(f"{base}/Patient/{pid}")
        assert r.status_code == 200
        assert "x-ratelimit-limit-minute" in r.headers
        labs = httpx.get(f"{base}/Observation", params={"patient": pid, "category": "laboratory"}).json()
        assert labs["entry"]
        missing = httpx.get(f"{base}/Patient/nope")
        assert missing.status_code == 404
        assert missing.json()["resourceType"] == "OperationOutcome"
    finally:
        stop_group(proc, signal.SIGINT, wait=20)
    assert (tmp_path / ".fhirgate" / "demo" / "fhir.db").exists()
