"""The real `fhirgate fhir-server` command: workers sharing one SQLite file, no lost update
across processes, and no committed write lost when the processes are killed (SIGKILL)."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.e2e.procs import free_ports, stop_group

pytestmark = pytest.mark.slow

FHIR_JSON = {"Content-Type": "application/fhir+json"}


@contextmanager
def fhir_server(tmp: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    (port,) = free_ports(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRGATE_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fhirgate.cli.main",
            "fhir-server",
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(tmp / "data"),
            *args,
        ],
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{base}/metadata", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise RuntimeError(f"fhir-server did not start: {out}")
            time.sleep(0.1)
        yield base, proc
    finally:
        stop_group(proc)


def test_workers_share_sqlite_without_losing_updates(tmp_path: Path) -> None:
    with fhir_server(tmp_path, "--workers", "2") as (base, _proc), httpx.Client(base_url=base) as client:
        created = client.post("/Patient", json={"resourceType": "Patient"}, headers=FHIR_JSON).json()
        pid = created["id"]

        def update(n: int) -> int:
            with httpx.Client(base_url=base, timeout=30) as c:
                r = c.put(f"/Patient/{pid}", json={**created, "birthDate": f"19{n:02d}"}, headers=FHIR_JSON)
                assert r.status_code == 200, r.text
                version: int = int(r.json()["meta"]["versionId"])
                return version

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            versions = list(pool.map(update, range(40)))
        assert sorted(versions) == list(range(2, 42))
        history = client.get(f"/Patient/{pid}/_history", params={"_count": 100}).json()
        assert history["total"] == 41


def test_sigkill_loses_no_committed_write(tmp_path: Path) -> None:
    ids: list[str] = []
    with fhir_server(tmp_path, "--workers", "2") as (base, proc), httpx.Client(base_url=base) as client:
        for n in range(25):
            r = client.post(
                "/Observation",
                headers=FHIR_JSON,
                json={"resourceType": "Observation", "status": "final", "code": {"text": f"crash {n}"}},
            )
            assert r.status_code == 201
            ids.append(r.json()["id"])
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    with fhir_server(tmp_path, "--workers", "1") as (base, _), httpx.Client(base_url=base) as client:
        for rid in ids:
            assert client.get(f"/Observation/{rid}").status_code == 200
        assert client.get("/Observation", params={"_summary": "count"}).json()["total"] == 25


def test_full_synchronous_mode_and_bad_database_url(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'durable.db'}?synchronous=full"
    with fhir_server(tmp_path, "--database", url) as (base, _), httpx.Client(base_url=base) as client:
        assert client.post("/Patient", json={"resourceType": "Patient"}, headers=FHIR_JSON).status_code == 201
    bad = subprocess.run(
        [sys.executable, "-m", "fhirgate.cli.main", "fhir-server", "--database", "mysql://nope/x"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 1
    assert "unsupported database URL" in bad.stderr


def test_readme_workflow_demo_data_then_load(tmp_path: Path) -> None:
    """`fhirgate demo-data`, `fhirgate fhir-server`, `fhirgate load`: the README's commands."""
    out = tmp_path / "demo"
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "fhirgate.cli.main",
            "demo-data",
            "--patients",
            "3",
            "--seed",
            "7",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    with fhir_server(tmp_path) as (base, _), httpx.Client(base_url=base) as client:
        loaded = subprocess.run(
            [sys.executable, "-m", "fhirgate.cli.main", "load", str(out), "--fhir", base],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert loaded.returncode == 0, loaded.stdout + loaded.stderr
        patients = client.get("/Patient", params={"_count": 10}).json()
        assert patients["total"] == 3
        pid = patients["entry"][0]["resource"]["id"]
        labs = client.get(
            "/Observation", params={"patient": f"Patient/{pid}", "category": "laboratory"}
        ).json()
        assert labs["entry"]
        vitals = client.get(
            f"/Patient/{pid}/Observation", params={"category": "vital-signs", "_count": 1}
        ).json()
        assert vitals["entry"][0]["resource"]["subject"]["reference"] == f"Patient/{pid}"
        # conditional references to the directory bundle were resolved to real ids
        enc = client.get("/Encounter", params={"patient": pid, "_count": 1}).json()["entry"][0]["resource"]
        assert enc["serviceProvider"]["reference"].startswith("Organization/")
        assert "?" not in enc["serviceProvider"]["reference"]
