#!/usr/bin/env python3
"""FHIR server benchmark: `fhirgate fhir-server` on SQLite (and with `synchronous=full`) and PostgreSQL.

For each backend it starts `fhirgate fhir-server` on a fresh database (loopback, a free port), then:

1. ingest: POSTs generated Synthea-shaped transaction Bundles (`fhirgate.fhirserver.demodata`,
   `--patients`, fixed `--seed`, cached under bench/results/tmp/) with several concurrent clients,
   then the Synthea sample bundles (`--synthea DIR`); validation and indexing are always on in the
   server. Every response must be 200 with every entry 200/201; anything else is counted as a failure.
2. read by id: wrk cycling through `GET /Observation/<id>` of ingested Observations.
3. US Core searches (`_count=50`): one wrk run per query shape, cycling over many patients.

The `synchronous=full` SQLite backend is measured for ingest only (its cost for power-loss durability).
It reports resources/s, requests/s and latency percentiles against the bars of the issue (a report,
not a test: it never exits non-zero because a bar is missed), writes bench/results/fhir_latest.json and
bench/results/fhir_latest.png and prints a table.

    python bench/fhir_bench.py --quick           # 100 patients, short runs (a few minutes)
    python bench/fhir_bench.py                   # 1,000 patients (about 15-20 minutes)

It reuses proxy_bench.py's pieces (processes, wrk runner, machine facts, path scrubbing, the lock that
keeps two benchmarks from measuring each other). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import hashlib
import json
import os
import random
import re
import resource
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))  # proxy_bench, imported as a module

import proxy_bench as pb

BENCH_DIR = pb.BENCH_DIR
REPO_ROOT = pb.REPO_ROOT
sys.path.insert(0, str(REPO_ROOT / "src"))  # fhirgate from this checkout, like the server we start

from fhirgate.fhirserver import demodata  # noqa: E402

say = pb.say
loud = pb.loud

# Set by SIGTERM/SIGHUP (and Ctrl-C): checked at every step as well, because a KeyboardInterrupt raised
# by the signal handler inside library code (an event loop closing, a finaliser) can be swallowed.
_STOP: list[str] = []


def _on_signal(signum: int, _frame: Any) -> None:
    _STOP.append(signal.Signals(signum).name)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def check_stop() -> None:
    if _STOP:
        raise KeyboardInterrupt(_STOP[0])


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM, SIGHUP and SIGINT stop the benchmark; the `finally` that stops every process runs."""
    sigs = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    old = {sig: signal.signal(sig, _on_signal) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


LUA_SCRIPT = BENCH_DIR / "lua" / "cycle_paths.lua"
DATA_DIR = BENCH_DIR / "results" / "tmp" / "fhir-data"  # git-ignored (bench/results/tmp/)
DEFAULT_SYNTHEA = REPO_ROOT.parent / "shared" / "data" / "synthea"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
READY_TIMEOUT_S = 60.0
BUNDLE_TIMEOUT_S = 300.0  # one transaction Bundle; a slower answer counts as a failure
WRK_TIMEOUT = "10s"  # wrk's per-request timeout (its default of 2 s would hide slow searches)
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
LOINC = "http://loinc.org"
MRN_SYSTEM = "http://hospital.smarthealthit.org"
FHIR_JSON = "application/fhir+json"
READ_IDS_MAX = 50_000  # distinct Observation ids the read-by-id run cycles through
SLOW_SHAPE_MS = 500.0  # a search shape slower than this alone gets no load run (see search_phase)

# The bars of the issue, on this 2-core machine.
BAR_INGEST_RPS = 2000.0
BAR_READ_RPS = 1500.0
BAR_SEARCH_P50_MS = 20.0
BAR_SEARCH_P95_MS = 60.0
BAR_BACKEND = "sqlite"  # the bars are stated for SQLite; the other backends are shown beside it


@dataclass(frozen=True)
class Backend:
    key: str
    label: str
    reads: bool  # read-by-id and search runs too (else ingest only)
    description: str


BACKENDS: tuple[Backend, ...] = (
    Backend("sqlite", "SQLite", True, "SQLite file in WAL mode, synchronous=NORMAL (the default)"),
    Backend(
        "sqlite-full",
        "SQLite sync=full",
        False,
        "SQLite file in WAL mode, ?synchronous=full (power-loss durability); ingest only",
    ),
    Backend(
        "postgresql",
        "PostgreSQL",
        True,
        "PostgreSQL on this machine (127.0.0.1), a fresh schema per run (?schema=...)",
    ),
)


@dataclass(frozen=True)
class Shape:
    key: str
    label: str
    query: str  # the template, for the report


SHAPES: tuple[Shape, ...] = (
    Shape(
        "obs-lab",
        "Obs patient+category=lab",
        f"Observation?patient=Patient/ID&category={OBS_CATEGORY}|laboratory&_count=50",
    ),
    Shape("obs-code", "Obs patient+code (vital)", f"Observation?patient=ID&code={LOINC}|CODE&_count=50"),
    Shape(
        "obs-vitals-date",
        "Obs patient+vital-signs+date",
        "Observation?patient=ID&category=vital-signs&date=geDATE&_count=50",
    ),
    Shape("pat-identifier", "Patient identifier", f"Patient?identifier={MRN_SYSTEM}|VALUE&_count=50"),
    Shape("pat-name", "Patient name", "Patient?name=FAMILY&_count=50"),
    Shape("pat-birthdate-name", "Patient birthdate+name", "Patient?birthdate=DATE&name=FAMILY&_count=50"),
    Shape("pat-gender-name", "Patient gender+name", "Patient?gender=GENDER&name=FAMILY&_count=50"),
)


# ------------------------------------------------------------------------------------- the data


@dataclass
class BundleFile:
    path: Path
    name: str
    resources: int
    first: bool = False  # posted alone, in order, before the others (the provider directory)


@dataclass
class DataSet:
    """The generated bundles on disk, plus what the searches need to know about each patient."""

    directory: Path
    meta: dict[str, Any]
    bundles: list[BundleFile]
    patients: list[dict[str, Any]]  # one per patient bundle: file, family, gender, birthDate, identifier


def source_fingerprint() -> str:
    """Hash of the fhirgate sources the server runs (other people may change them while we measure)."""
    h = hashlib.sha256()
    for f in sorted((REPO_ROOT / "src" / "fhirgate").rglob("*")):
        if f.is_file() and f.suffix in (".py", ".gz", ".json", ".yaml"):
            h.update(str(f.relative_to(REPO_ROOT)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def demodata_fingerprint() -> str:
    """The generator's source hash: a cached data set is reused only if the generator is unchanged."""
    return hashlib.sha256(Path(demodata.__file__).read_bytes()).hexdigest()[:16]


def _patient_summary(bundle: dict[str, Any]) -> tuple[dict[str, Any], collections.Counter[str], list[str]]:
    """The Patient's search keys, the vital-sign LOINC codes and the vital-sign dates of one bundle."""
    patient: dict[str, Any] = {}
    vitals: collections.Counter[str] = collections.Counter()
    dates: list[str] = []
    for entry in bundle.get("entry", []):
        res = entry.get("resource", {})
        rtype = res.get("resourceType")
        if rtype == "Patient" and not patient:
            name = (res.get("name") or [{}])[0]
            idents = res.get("identifier") or []
            mrn = next(
                (
                    i
                    for i in idents
                    if any(c.get("code") == "MR" for c in i.get("type", {}).get("coding", []))
                ),
                idents[0] if idents else {},
            )
            patient = {
                "family": name.get("family", ""),
                "given": (name.get("given") or [""])[0],
                "gender": res.get("gender", ""),
                "birthDate": res.get("birthDate", ""),
                "identifier": f"{mrn.get('system', '')}|{mrn.get('value', '')}",
            }
        elif rtype == "Observation":
            cats = {c.get("code") for cat in res.get("category", []) for c in cat.get("coding", [])}
            if "vital-signs" in cats:
                for c in res.get("code", {}).get("coding", []):
                    if c.get("system") == LOINC:
                        vitals[c["code"]] += 1
                        break
                when = res.get("effectiveDateTime")
                if isinstance(when, str):
                    dates.append(when[:10])
    return patient, vitals, dates


def ensure_data(directory: Path, patients: int, seed: int) -> DataSet:
    """Generate the bundles once per (seed, generator source) and keep them on disk; a later run
    that asks for as many patients or fewer reuses them (patient i depends on the seed alone)."""
    fingerprint = demodata_fingerprint()
    d = directory / f"seed{seed}-{fingerprint}"
    meta_file = d / "meta.json"
    meta: dict[str, Any] | None = None
    if meta_file.exists():
        with contextlib.suppress(ValueError, OSError):
            meta = json.loads(meta_file.read_text())
    if meta is None or meta.get("patients", -1) < patients:
        meta = _generate(d, patients, seed, fingerprint)
    else:
        say(f"data: reusing {meta['patients']} generated patients in {d}")
    files = meta["files"]
    bundles = [
        BundleFile(d / files[0]["file"], files[0]["name"], files[0]["resources"], first=True),
        *(BundleFile(d / f["file"], f["name"], f["resources"]) for f in files[1 : patients + 1]),
    ]
    return DataSet(d, meta, bundles, [f["patient"] for f in files[1 : patients + 1]])


def _generate(d: Path, patients: int, seed: int, fingerprint: str) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    files: list[dict[str, Any]] = []
    vitals: collections.Counter[str] = collections.Counter()
    types: collections.Counter[str] = collections.Counter()
    vital_dates: list[str] = []
    total_bytes = 0
    t0 = time.monotonic()
    progress = Progress(
        TextColumn("generating"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("bundles"),
        TimeElapsedColumn(),
        console=pb._CONSOLE,
        transient=True,
    )
    with progress:
        task = progress.add_task("gen", total=patients + 1)
        for index, (name, bundle) in enumerate(demodata.generate(patients, seed)):
            body = orjson.dumps(bundle)
            fname = f"{index:05d}-{name}"
            (d / fname).write_bytes(body)
            total_bytes += len(body)
            entries = bundle.get("entry", [])
            types.update(e.get("resource", {}).get("resourceType", "?") for e in entries)
            record: dict[str, Any] = {
                "file": fname,
                "name": name,
                "resources": len(entries),
                "bytes": len(body),
            }
            if index > 0:
                patient, v, dates = _patient_summary(bundle)
                record["patient"] = patient
                vitals.update(v)
                vital_dates.extend(dates)
            files.append(record)
            progress.update(task, advance=1)
    vital_dates.sort()
    meta = {
        "generator": "fhirgate.fhirserver.demodata.generate(patients, seed)",
        "generator_sha256_16": fingerprint,
        "patients": patients,
        "seed": seed,
        "bundles": len(files),
        "resources": sum(f["resources"] for f in files),
        "bytes": total_bytes,
        "resource_types": dict(types.most_common()),
        "vital_sign_codes": dict(vitals.most_common()),
        # the date from which about 30% of the vital signs are later (the `date=ge` searches)
        "vital_date_p70": vital_dates[int(len(vital_dates) * 0.7)] if vital_dates else "2020-01-01",
        "generation_s": round(time.monotonic() - t0, 2),
        "files": files,
    }
    (d / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    say(
        f"data: generated {patients} patients ({meta['resources']:,} resources, {total_bytes / 1e6:,.0f} MB) "
        f"in {meta['generation_s']:.1f}s into {d}"
    )
    return meta


def synthea_bundles(directory: Path) -> list[BundleFile]:
    """The Synthea sample: hospitalInformation* and practitionerInformation* first (in that order,
    alone), then the patient bundles."""

    def rank(p: Path) -> tuple[int, str]:
        for i, prefix in enumerate(("hospitalInformation", "practitionerInformation")):
            if p.name.startswith(prefix):
                return i, p.name
        return 2, p.name

    out = []
    for p in sorted(directory.glob("*.json"), key=rank):
        try:
            bundle = orjson.loads(p.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            loud(f"synthea: cannot read {p.name}: {exc}")
            continue
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            say(f"synthea: {p.name} is not a Bundle: left out")
            continue
        out.append(BundleFile(p, p.name, len(bundle.get("entry", [])), first=rank(p)[0] < 2))
    return out


# ------------------------------------------------------------------------------------------ ingest


@dataclass
class IngestResult:
    label: str
    bundles: int = 0
    bundles_ok: int = 0
    resources: int = 0  # entries of the bundles answered 200
    wall_s: float = 0.0
    resources_per_s: float = 0.0
    bytes_sent: int = 0
    clients: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    entry_statuses: dict[str, int] = field(default_factory=dict)
    bundle_latency_ms: dict[str, float] = field(default_factory=dict)
    rate_by_tenth: list[float] = field(default_factory=list)  # resources/s over each tenth of the bundles
    cpu_server_s: float = 0.0
    cpu_client_s: float = 0.0
    cpu_other_s: float = 0.0
    patient_ids: dict[str, str] = field(default_factory=dict)  # bundle name -> server Patient id
    observation_ids: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("patient_ids", "observation_ids")}
        out["failure_count"] = len(self.failures)
        out["failures"] = self.failures[:20]
        out["cpu_server_ms_per_1k_resources"] = (
            self.cpu_server_s * 1e6 / self.resources if self.resources else float("nan")
        )
        return out


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def _ingest(
    port: int, bundles: list[BundleFile], clients: int, label: str, result: IngestResult
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    total_resources = sum(b.resources for b in bundles)
    latencies: list[float] = []
    done_times: list[tuple[float, int]] = []
    statuses: collections.Counter[str] = collections.Counter()
    progress = Progress(
        TextColumn(f"ingest {label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("bundles  {task.fields[res]:>9,} resources  {task.fields[rate]:>7,.0f} res/s"),
        TimeElapsedColumn(),
        console=pb._CONSOLE,
        transient=False,
    )
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    timeout = httpx.Timeout(BUNDLE_TIMEOUT_S, connect=10.0)
    headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=timeout, headers=headers
    ) as client:
        t0 = time.monotonic()
        with progress:
            task = progress.add_task("ingest", total=len(bundles), res=0, rate=0.0)

            async def post(b: BundleFile) -> None:
                check_stop()
                body = b.path.read_bytes()
                start = time.monotonic()
                try:
                    resp = await client.post("/", content=body)
                except httpx.HTTPError as exc:
                    result.failures.append({"bundle": b.name, "error": f"{type(exc).__name__}: {exc}"})
                    progress.update(task, advance=1)
                    return
                now = time.monotonic()
                latencies.append((now - start) * 1000.0)
                result.bytes_sent += len(body)
                if resp.status_code != 200:
                    result.failures.append(
                        {"bundle": b.name, "status": resp.status_code, "body": resp.text[:1500]}
                    )
                    progress.update(task, advance=1)
                    return
                try:
                    entries = orjson.loads(resp.content).get("entry", [])
                except orjson.JSONDecodeError as exc:
                    result.failures.append({"bundle": b.name, "status": 200, "error": f"bad JSON: {exc}"})
                    progress.update(task, advance=1)
                    return
                bad = []
                for e in entries:
                    r = e.get("response", {})
                    status = str(r.get("status", "?")).split(" ", 1)[0]
                    statuses[status] += 1
                    if status not in ("200", "201"):
                        bad.append(r)
                    loc = r.get("location", "")
                    if loc.startswith("Observation/"):
                        result.observation_ids.append(loc.split("/")[1])
                    elif loc.startswith("Patient/"):
                        result.patient_ids[b.name] = loc.split("/")[1]
                if len(entries) != b.resources or bad:
                    result.failures.append(
                        {
                            "bundle": b.name,
                            "status": 200,
                            "error": f"{len(entries)} response entries for {b.resources} requests",
                            "bad_entries": bad[:5],
                        }
                    )
                result.bundles_ok += 1
                result.resources += b.resources
                done_times.append((now - t0, b.resources))
                elapsed = now - t0
                progress.update(
                    task, advance=1, res=result.resources, rate=result.resources / elapsed if elapsed else 0.0
                )

            for b in (b for b in bundles if b.first):
                await post(b)
            queue: asyncio.Queue[BundleFile] = asyncio.Queue()
            for b in bundles:
                if not b.first:
                    queue.put_nowait(b)

            async def worker() -> None:
                while True:
                    try:
                        b = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    await post(b)

            await asyncio.gather(*(worker() for _ in range(clients)))
        result.wall_s = time.monotonic() - t0
    result.bundles = len(bundles)
    result.clients = clients
    result.resources_per_s = result.resources / result.wall_s if result.wall_s else 0.0
    result.entry_statuses = dict(statuses)
    result.bundle_latency_ms = {
        "p50": _pct(latencies, 0.5),
        "p95": _pct(latencies, 0.95),
        "max": max(latencies, default=float("nan")),
    }
    # resources/s over each tenth of the bundles (in completion order): does ingest slow as the
    # database grows?
    n = len(done_times)
    if n >= 10:
        prev_t = 0.0
        for k in range(10):
            chunk = done_times[k * n // 10 : (k + 1) * n // 10]
            end_t = chunk[-1][0]
            result.rate_by_tenth.append(round(sum(r for _, r in chunk) / max(end_t - prev_t, 1e-9), 1))
            prev_t = end_t
    if total_resources != result.resources or result.failures:
        loud(
            f"ingest {label}: {len(result.failures)} FAILED bundle(s); {result.resources:,} of "
            f"{total_resources:,} resources accepted. First failures:\n"
            + "\n".join(json.dumps(f)[:600] for f in result.failures[:3])
        )


def ingest(server: Server, bundles: list[BundleFile], clients: int, label: str) -> IngestResult:
    """POST every bundle (the `first` ones alone and in order, then the rest with `clients` concurrent
    clients); resources/s = entries of the bundles answered 200 / wall time."""
    result = IngestResult(label)
    cpu = CpuMeter(server)
    asyncio.run(_ingest(server.port, bundles, clients, label, result))
    result.cpu_server_s, result.cpu_client_s, result.cpu_other_s = cpu.stop(client="self")
    say(
        f"ingest {label}: {result.resources:,} resources in {result.bundles_ok}/{result.bundles} bundles, "
        f"{result.wall_s:.1f}s = {result.resources_per_s:,.0f} resources/s"
        f"  (cpu s: server {result.cpu_server_s:.1f}, client {result.cpu_client_s:.1f}, "
        f"other {result.cpu_other_s:.1f}; bundle p50 {result.bundle_latency_ms['p50']:.0f} ms)"
    )
    return result


# -------------------------------------------------------------------------------------- processes


class CpuMeter:
    """CPU seconds used by the server's process group, by the client (this process, or wrk) and by
    the rest of the machine (PostgreSQL, the kernel, other load) between start and stop."""

    def __init__(self, server: Server) -> None:
        self.pgid = server.proc.pid
        self.t0 = time.monotonic()
        self.server0 = pb.group_cpu_seconds(self.pgid)
        self.self0 = _self_cpu()
        self.children0 = pb.children_cpu_seconds()
        self.busy0 = pb.system_busy_seconds()

    def stop(self, client: str) -> tuple[float, float, float]:
        busy = pb.system_busy_seconds() - self.busy0
        server = pb.group_cpu_seconds(self.pgid) - self.server0
        own = _self_cpu() - self.self0
        children = pb.children_cpu_seconds() - self.children0
        client_s = own if client == "self" else children
        other = busy - server - own - children
        return round(server, 2), round(client_s, 2), round(other, 2)


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@dataclass
class Server:
    backend: Backend
    port: int
    url: str  # the --database URL
    proc: pb.Proc
    command: list[str]
    workdir: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def server_env() -> dict[str, str]:
    return pb.gateway_env()  # no FHIRGATE_* from the caller's shell; fhirgate from this checkout


def start_server(procs: pb.Processes, backend: Backend, url: str, workdir: Path, workers: int) -> Server:
    (port,) = pb.free_ports(1)
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "fhirgate.cli.main",
        "fhir-server",
        "--database",
        url,
        "--listen",
        f"127.0.0.1:{port}",
        "--base-url",
        f"http://127.0.0.1:{port}",
        "--workers",
        str(workers),
    ]
    proc = procs.start(
        f"fhir-server-{backend.key}", cmd, workdir / "server.log", cwd=workdir, env=server_env()
    )
    server = Server(backend, port, url, proc, cmd, workdir)
    pb.wait_http_ready(proc, port, "/metadata", f"fhir-server ({backend.label})", READY_TIMEOUT_S)
    say(f"fhir-server {backend.label} ready on 127.0.0.1:{port}")
    return server


# ---------------------------------------------------------------------------------------- PostgreSQL


def pg_info(url: str) -> dict[str, Any]:
    rows = pb.pg(
        url,
        [],
        "SELECT name, setting, COALESCE(unit, '') FROM pg_settings WHERE name IN ('server_version', "
        "'fsync', 'synchronous_commit', 'full_page_writes', 'shared_buffers', 'work_mem', "
        "'max_connections', 'wal_level', 'effective_cache_size') ORDER BY name",
    )
    return {name: f"{setting}{' x ' + unit if unit else ''}" for name, setting, unit in rows}


def pg_schema_bytes(url: str, schema: str) -> int:
    rows = pb.pg(
        url,
        [],
        "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c JOIN pg_namespace n "
        f"ON n.oid = c.relnamespace WHERE n.nspname = '{schema}' AND c.relkind IN ('r', 'm')",
    )
    return int(rows[0][0]) if rows else 0


# ------------------------------------------------------------------------------------------------ wrk


def run_wrk(
    runner: pb.WrkRunner,
    wrk: str,
    server: Server,
    args: argparse.Namespace,
    paths_file: Path,
    connections: int,
    duration: float,
) -> dict[str, Any]:
    """One wrk run; then wait until the server has finished what the run left in flight."""
    check_stop()
    threads = args.threads
    cmd = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        WRK_TIMEOUT,
        "-s",
        str(LUA_SCRIPT),
        f"{server.base}/",
        "--",
        str(paths_file),
        str(threads),
    ]
    cpu = CpuMeter(server)
    loadavg = pb.read_loadavg()
    raw = runner.run(cmd, duration)
    cpu_server, cpu_wrk, cpu_other = cpu.stop(client="children")
    res = pb.parse_lua_wrk(raw, "FHIRBENCH")
    s, ms = res.stats, res.ms
    errors, non = res.socket_errors, res.non_2xx_3xx
    none = s["requests"] == 0  # nothing completed within the run: no latency figures at all
    drained = drain(server, args)
    return {
        "rps": res.rps,
        "requests": s["requests"],
        "p50_ms": ms("p50_us"),
        "p90_ms": ms("p90_us"),
        "p95_ms": ms("p95_us"),
        "p99_ms": ms("p99_us"),
        "mean_ms": ms("mean_us"),
        "max_ms": ms("max_us"),
        "socket_errors": errors,
        "non_2xx_3xx": non,
        "flagged": errors > 0 or non > 0 or none,
        "drain_s": drained,
        "cpu_server_s": cpu_server,
        "cpu_wrk_s": cpu_wrk,
        "cpu_other_s": cpu_other,
        "loadavg_before": loadavg,
        "command": shlex.join(cmd),
        "raw": raw,
    }


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(k: str) -> float:
        return float(statistics.median(r[k] for r in runs)) if runs else float("nan")

    return {
        "rounds": len(runs),
        "rps": med("rps"),
        "rps_min": min((r["rps"] for r in runs), default=float("nan")),
        "rps_max": max((r["rps"] for r in runs), default=float("nan")),
        "p50_ms": med("p50_ms"),
        "p95_ms": med("p95_ms"),
        "p99_ms": med("p99_ms"),
        "p95_max_ms": max((r["p95_ms"] for r in runs), default=float("nan")),
        "cpu_server_ms_per_request": float(
            statistics.median(r["cpu_server_s"] * 1000.0 / r["requests"] for r in runs if r["requests"])
        )
        if any(r["requests"] for r in runs)
        else float("nan"),
        "requests": sum(r["requests"] for r in runs),
        "errors": sum(r["socket_errors"] for r in runs),
        "non_2xx_3xx": sum(r["non_2xx_3xx"] for r in runs),
        "flagged_runs": sum(1 for r in runs if r["flagged"]),
    }


def log_run(what: str, rnd: int, runs: int, r: dict[str, Any]) -> None:
    flag = "  <-- ERRORS" if r["flagged"] else ""
    say(
        f"  round {rnd}/{runs} {what:<48} {r['rps']:>8,.0f} req/s  p50 {r['p50_ms']:6.2f}  "
        f"p95 {r['p95_ms']:6.2f}  p99 {r['p99_ms']:6.2f} ms  cpu s: server {r['cpu_server_s']:.1f} "
        f"wrk {r['cpu_wrk_s']:.1f} other {r['cpu_other_s']:.1f}{flag}"
    )
    if r["flagged"]:
        loud(
            f"{what} round {rnd}: socket errors {r['socket_errors']}, non-2xx/3xx {r['non_2xx_3xx']}: "
            "not a clean measurement"
        )


# -------------------------------------------------------------------------------- reads and searches


def search_paths(
    data: DataSet, patient_ids: dict[str, str], seed: int
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Per shape, one request path per generated patient (in a fixed shuffled order)."""
    vital_codes = data.meta.get("vital_sign_codes") or {"8867-4": 1}
    code = next(iter(vital_codes))  # the most frequent vital-sign code of the data
    date = data.meta.get("vital_date_p70", "2020-01-01")
    params = {"code": f"{LOINC}|{code}", "date": f"ge{date}"}
    files = data.meta["files"][1 : len(data.patients) + 1]
    people = []
    for f, p in zip(files, data.patients, strict=True):
        pid = patient_ids.get(f["name"])
        if pid:
            people.append({**p, "id": pid})
    random.Random(seed).shuffle(people)

    def q(resource_: str, items: list[tuple[str, str]]) -> str:
        return f"/{resource_}?" + urlencode([*items, ("_count", "50")], safe=":/")

    out: dict[str, list[str]] = {s.key: [] for s in SHAPES}
    for p in people:
        out["obs-lab"].append(
            q("Observation", [("patient", f"Patient/{p['id']}"), ("category", f"{OBS_CATEGORY}|laboratory")])
        )
        out["obs-code"].append(q("Observation", [("patient", p["id"]), ("code", params["code"])]))
        out["obs-vitals-date"].append(
            q("Observation", [("patient", p["id"]), ("category", "vital-signs"), ("date", params["date"])])
        )
        out["pat-identifier"].append(q("Patient", [("identifier", p["identifier"])]))
        out["pat-name"].append(q("Patient", [("name", p["family"])]))
        out["pat-birthdate-name"].append(q("Patient", [("birthdate", p["birthDate"]), ("name", p["family"])]))
        out["pat-gender-name"].append(q("Patient", [("gender", p["gender"]), ("name", p["family"])]))
    return out, params


def sample_check(
    server: Server, paths: list[str], n: int = 25, budget_s: float = 20.0, timeout_s: float = 60.0
) -> dict[str, Any]:
    """Send a sample of the paths one at a time (a single client): all must answer 200; how many
    entries do they return and how long does one take alone? Stops after `budget_s` (at least 3
    requests), so a shape whose searches take seconds costs a bounded time."""
    step = max(1, len(paths) // n)
    statuses: collections.Counter[int] = collections.Counter()
    entries: list[int] = []
    totals: list[int] = []
    errors: list[str] = []
    latencies: list[float] = []
    t0 = time.monotonic()
    with httpx.Client(base_url=server.base, timeout=timeout_s, headers={"Accept": FHIR_JSON}) as client:
        for path in paths[::step][:n]:
            check_stop()
            if len(latencies) >= 3 and time.monotonic() - t0 > budget_s:
                break
            start = time.monotonic()
            try:
                r = client.get(path)
            except httpx.HTTPError as exc:
                latencies.append((time.monotonic() - start) * 1000.0)
                statuses[0] += 1
                errors.append(f"{path} -> {type(exc).__name__}: {exc}")
                continue
            latencies.append((time.monotonic() - start) * 1000.0)
            statuses[r.status_code] += 1
            if r.status_code != 200:
                errors.append(f"{path} -> {r.status_code}: {r.text[:300]}")
                continue
            body = orjson.loads(r.content)
            if body.get("resourceType") == "Bundle":
                entries.append(len(body.get("entry", [])))
                if isinstance(body.get("total"), int):
                    totals.append(body["total"])
            else:
                entries.append(1)
    return {
        "sampled": sum(statuses.values()),
        "statuses": {str(k): v for k, v in statuses.items()},
        "entries_mean": round(statistics.mean(entries), 2) if entries else 0,
        "entries_min": min(entries, default=0),
        "entries_max": max(entries, default=0),
        "total_mean": round(statistics.mean(totals), 1) if totals else None,
        "single_client_ms": {
            "p50": round(statistics.median(latencies), 2) if latencies else float("nan"),
            "max": round(max(latencies), 2) if latencies else float("nan"),
            "all": [round(x, 1) for x in latencies],
        },
        "errors": errors[:5],
        "example": paths[0] if paths else None,
    }


def pg_client_ports(pgid: int, pg_port: int) -> list[int]:
    """Local ports of the server's connections to PostgreSQL (its workers' sockets, from /proc), so
    that pg_stat_activity can tell this server's queries from anyone else's."""
    inodes: set[str] = set()
    for pid in pb.group_pids(pgid):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                if len(parts) > 9 and parts[9] in inodes and int(parts[2].rsplit(":", 1)[1], 16) == pg_port:
                    ports.append(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def pg_active_queries(url: str, ports: list[int]) -> int:
    if not ports:
        return 0
    ports_sql = ",".join(str(p) for p in ports)
    rows = pb.pg(
        url,
        [],
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND pid <> pg_backend_pid() "
        f"AND client_port IN ({ports_sql})",
    )
    return int(rows[0][0])


def drain(server: Server, args: argparse.Namespace, limit_s: float = 90.0) -> float:
    """Wait until the server has finished the requests a load run left in flight (wrk closes its
    connections at the end of a run, but a search already running goes on in the server and, on
    PostgreSQL, in the database): its process group idle for 0.3 s and, on PostgreSQL, none of its
    queries active. Bounded by `limit_s`; returns the seconds waited."""
    t0 = time.monotonic()
    pg_port = None
    if server.backend.key == "postgresql":
        from urllib.parse import urlsplit

        pg_port = urlsplit(args.postgres).port or 5432
    while time.monotonic() - t0 < limit_s:
        check_stop()
        c0 = pb.group_cpu_seconds(server.proc.pid)
        time.sleep(0.3)
        busy = pb.group_cpu_seconds(server.proc.pid) - c0 > 0.03
        if not busy and pg_port is not None:
            with contextlib.suppress(Exception):
                busy = pg_active_queries(args.postgres, pg_client_ports(server.proc.pid, pg_port)) > 0
        if not busy:
            return round(time.monotonic() - t0, 2)
    loud(f"{server.backend.label}: the server was still busy {limit_s:.0f}s after the load run ended")
    return round(time.monotonic() - t0, 2)


def count(server: Server, rtype: str) -> int | None:
    try:
        status, _, body = pb.http_get(server.port, f"/{rtype}?_summary=count", timeout=60.0)
    except OSError:
        return None
    if status != 200:
        return None
    total = orjson.loads(body).get("total")
    return total if isinstance(total, int) else None


# ---------------------------------------------------------------------------------------- profile


def start_profile(server: Server, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    pyspy = pb.pyspy_path()
    if not Path(pyspy).exists():
        loud("--profile: py-spy not found (pip install py-spy): no profile")
        return None
    cmd = [
        pyspy,
        "record",
        "--pid",
        str(server.proc.pid),
        "--subprocesses",
        "--nolineno",
        "--format",
        "raw",
        "--duration",
        str(int(seconds)),
        "--rate",
        "200",
        "--output",
        str(out),
    ]
    say(f"profile: {shlex.join(cmd)}")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


_BLOCKING_LEAVES = ("Connection._recv ", "Condition.wait ", "Event.wait ", "main (multiprocessing/resource_")


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """From py-spy's collapsed stacks (`--subprocesses`: the first frame names the process): the
    functions most often on CPU (self) and on the stack (inclusive), as shares of the samples of the
    worker processes (those with FHIR server frames; uvicorn's supervisor only waits on its pipes)."""
    stacks, workers = pb.pyspy_worker_stacks(path, "fhirgate/fhirserver")
    self_c: collections.Counter[str] = collections.Counter()
    incl_c: collections.Counter[str] = collections.Counter()
    total = 0
    for _, frames, k in stacks:
        # each worker's health-check thread blocks in pipe reads, which py-spy does not always see
        # as idle: left out
        if frames[-1].startswith(_BLOCKING_LEAVES):
            continue
        total += k
        self_c[frames[-1]] += k
        for f in set(frames):
            incl_c[f] += k
    return {
        "samples": total,
        "processes": workers,
        "self": [(f, round(100.0 * c / total, 1)) for f, c in self_c.most_common(top)] if total else [],
        "inclusive": [(f, round(100.0 * c / total, 1)) for f, c in incl_c.most_common(top * 2)]
        if total
        else [],
    }


# ------------------------------------------------------------------------------------------ bench


def bench_backend(
    args: argparse.Namespace,
    backend: Backend,
    procs: pb.Processes,
    runner: pb.WrkRunner,
    wrk: str,
    data: DataSet,
    synthea: list[BundleFile],
    tmp: Path,
    cleanup: contextlib.ExitStack,
) -> dict[str, Any]:
    rec: dict[str, Any] = {"key": backend.key, "label": backend.label, "description": backend.description}
    workdir = tmp / backend.key
    if backend.key.startswith("sqlite"):
        db = workdir / "fhir.db"
        url = f"sqlite:///{db}" + ("?synchronous=full" if backend.key == "sqlite-full" else "")
    else:
        schema = f"fhirbench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        pb.pg(args.postgres, [f'CREATE SCHEMA "{schema}"'])
        say(f"postgresql: created schema {schema}")

        def drop(schema: str = schema) -> None:
            try:
                pb.pg(args.postgres, [f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'])
                say(f"postgresql: dropped schema {schema}")
            except Exception as exc:
                loud(f"postgresql: could not drop schema {schema}: {exc}")

        cleanup.callback(drop)
        url = pb.with_schema(args.postgres, schema)
        rec["postgres_settings"] = pg_info(args.postgres)
    rec["database_url"] = url
    server = start_server(procs, backend, url, workdir, args.workers)
    rec["command"] = server.command
    try:
        # ---- ingest: the generated data, then the Synthea sample
        profiler = None
        prof_out = workdir / "profile.txt"
        if args.profile:
            profiler = start_profile(server, args.profile, prof_out)
        gen = ingest(server, data.bundles, args.clients, f"{backend.label}: generated")
        rec["ingest_generated"] = gen.record()
        if profiler is not None:
            try:
                _, err = profiler.communicate(timeout=args.profile + 60)
            except subprocess.TimeoutExpired:
                profiler.kill()
                _, err = profiler.communicate()
            if prof_out.exists():
                rec["profile_ingest"] = summarize_profile(prof_out)
                rec["profile_ingest"]["command"] = (
                    f"py-spy record --pid SERVER --subprocesses ({args.profile}s)"
                )
                print_profile(backend.label, rec["profile_ingest"])
            else:
                loud(f"py-spy wrote no profile: {err.decode(errors='replace')[-800:]}")
        expected_obs = data.meta["resource_types"].get("Observation", 0)
        if len(data.patients) < data.meta["patients"]:
            expected_obs = None  # a subset of a larger cached set: not known per type
        rec["counts_after_generated"] = {
            "Patient": count(server, "Patient"),
            "Patient_expected": len(data.patients),
            "Observation": count(server, "Observation"),
            "Observation_expected": expected_obs,
        }
        if rec["counts_after_generated"]["Patient"] != len(data.patients):
            loud(
                f"{backend.label}: Patient count {rec['counts_after_generated']} differs from the "
                "bundles sent"
            )
        if synthea:
            syn = ingest(server, synthea, args.clients, f"{backend.label}: Synthea")
            rec["ingest_synthea"] = syn.record()
        if backend.key.startswith("sqlite"):
            # the main file and the WAL apart: a WAL that checkpoints never reset grows without bound
            rec["database_files_bytes"] = {
                p.name: p.stat().st_size for p in sorted(workdir.glob("fhir.db*")) if p.is_file()
            }
            rec["database_bytes"] = sum(rec["database_files_bytes"].values())
        else:
            rec["database_bytes"] = pg_schema_bytes(args.postgres, url.rsplit("schema=", 1)[1])
        files_ = rec.get("database_files_bytes", {})
        say(
            f"{backend.label}: database size {rec['database_bytes'] / 1e6:,.0f} MB"
            + (" (" + ", ".join(f"{k} {v / 1e6:,.0f} MB" for k, v in files_.items()) + ")" if files_ else "")
        )
        if not backend.reads:
            return rec

        # ---- read by id
        obs_ids = gen.observation_ids
        random.Random(args.seed).shuffle(obs_ids)
        obs_ids = obs_ids[:READ_IDS_MAX]
        read_file = workdir / "read-paths.txt"
        read_file.write_text("".join(f"/Observation/{i}\n" for i in obs_ids))
        read_paths = [f"/Observation/{i}" for i in obs_ids]
        rec["read_check"] = sample_check(server, read_paths)
        rec["read_ids"] = len(obs_ids)
        if not obs_ids or rec["read_check"]["statuses"].get("200", 0) != rec["read_check"]["sampled"]:
            loud(f"{backend.label}: read-by-id sample check failed: {rec['read_check']}")
        say(f"{backend.label}: read by id, {len(obs_ids):,} Observation ids")
        if obs_ids:
            if args.warmup > 0:
                run_wrk(runner, wrk, server, args, read_file, args.read_connections, args.warmup)
            runs = []
            for rnd in range(args.runs):
                r = run_wrk(runner, wrk, server, args, read_file, args.read_connections, args.read_duration)
                runs.append(r)
                log_run("GET /Observation/<id>", rnd + 1, args.runs, r)
            rec["read"] = {"runs": runs, "median": summarize_runs(runs)}

        # ---- US Core searches: as the server left the database after ingest (the bars), then after
        # ANALYZE (what statistics change; not part of the bars)
        paths, params = search_paths(data, gen.patient_ids, args.seed)
        rec["search_params"] = params
        files: dict[str, Path] = {}
        for shape in SHAPES:
            files[shape.key] = workdir / f"search-{shape.key}.txt"
            files[shape.key].write_text("".join(p + "\n" for p in paths[shape.key]))
        rec["search"] = search_phase(args, runner, wrk, server, paths, files, "as ingested")
        if args.analyze_phase:
            rec["analyze"] = analyze(args, server, workdir, url)
            rec["search_after_analyze"] = search_phase(
                args, runner, wrk, server, paths, files, "after ANALYZE"
            )
        return rec
    finally:
        if not server.proc.alive():
            rec["server_exit"] = server.proc.popen.returncode
            loud(
                f"fhir-server {backend.label} died (status {server.proc.popen.returncode}):\n"
                f"{server.proc.log_tail()}"
            )
        rec["server_log_tail"] = server.proc.log_tail(40)
        procs.stop(server.proc)
        say(f"stopped fhir-server {backend.label} (pid {server.proc.pid})")
        if backend.key.startswith("sqlite") and not args.keep_tmp:
            for p in workdir.glob("fhir.db*"):
                p.unlink(missing_ok=True)


def search_phase(
    args: argparse.Namespace,
    runner: pb.WrkRunner,
    wrk: str,
    server: Server,
    paths: dict[str, list[str]],
    files: dict[str, Path],
    phase: str,
) -> dict[str, Any]:
    """Every search shape: a single-client sample (status, hits, latency alone), then a warm-up and
    `--runs` rounds of wrk, round-robin over the shapes. A shape whose single-client median is above
    SLOW_SHAPE_MS gets no load run (it would complete next to no requests and keep the server busy
    long after): its single-client latencies are its figures, marked as such."""
    label = server.backend.label
    out: dict[str, Any] = {}
    for shape in SHAPES:
        check = sample_check(server, paths[shape.key])
        drain(server, args)
        single = check["single_client_ms"]
        out[shape.key] = {
            "label": shape.label,
            "query": shape.query,
            "phase": phase,
            "check": check,
            "paths": len(paths[shape.key]),
        }
        say(
            f"{label} ({phase}): {shape.label}: {check['sampled']} alone: statuses {check['statuses']}, "
            f"entries/page mean {check['entries_mean']} (min {check['entries_min']}, max "
            f"{check['entries_max']}), single-client p50 {single['p50']:.1f} ms max {single['max']:.1f} ms; "
            f"e.g. {check['example']}"
        )
        if check["statuses"].get("200", 0) != check["sampled"] or not paths[shape.key]:
            loud(f"{label}: {shape.label}: sample check failed: {check['errors']}")
        elif check["entries_max"] == 0:
            loud(f"{label}: {shape.label}: every sampled search returned no entries")
        if single["p50"] > SLOW_SHAPE_MS:
            out[shape.key]["too_slow_for_load"] = True
            lat = check["single_client_ms"]["all"]
            out[shape.key]["median"] = {
                "mode": "single client (too slow for the load run)",
                "rounds": 0,
                "rps": 1000.0 / single["p50"] if single["p50"] else float("nan"),
                "p50_ms": single["p50"],
                "p95_ms": _pct(lat, 0.95),
                "p99_ms": _pct(lat, 0.99),
                "requests": len(lat),
                "errors": 0,
                "non_2xx_3xx": sum(v for k, v in check["statuses"].items() if k != "200"),
                "flagged_runs": 0,
            }
            loud(
                f"{label} ({phase}): {shape.label}: one search alone takes {single['p50']:,.0f} ms "
                f"(median of {len(lat)}): no load run; the single-client latencies stand as its figures"
            )
    active = [s for s in SHAPES if paths[s.key] and not out[s.key].get("too_slow_for_load")]
    if args.warmup > 0:
        for shape in active:
            run_wrk(runner, wrk, server, args, files[shape.key], args.search_connections, args.warmup)
    runs: dict[str, list[dict[str, Any]]] = {s.key: [] for s in active}
    for rnd in range(args.runs):
        order = active[rnd % len(active) :] + active[: rnd % len(active)] if active else []
        for shape in order:
            r = run_wrk(
                runner, wrk, server, args, files[shape.key], args.search_connections, args.search_duration
            )
            runs[shape.key].append(r)
            log_run(f"{shape.label} ({phase})", rnd + 1, args.runs, r)
    for shape in active:
        out[shape.key]["runs"] = runs[shape.key]
        out[shape.key]["median"] = {"mode": "wrk", **summarize_runs(runs[shape.key])}
    return out


def analyze(args: argparse.Namespace, server: Server, workdir: Path, url: str) -> dict[str, Any]:
    """ANALYZE the database the server uses (SQLite: the file; PostgreSQL: each table of our schema,
    nothing else), as an operator or autovacuum would; the server does not do it itself."""
    t0 = time.monotonic()
    if server.backend.key.startswith("sqlite"):
        db = sqlite3.connect(workdir / "fhir.db", timeout=60)
        try:
            db.execute("ANALYZE")
            db.commit()
        finally:
            db.close()
        statement = "ANALYZE (sqlite3, a separate connection to the database file)"
    else:
        schema = url.rsplit("schema=", 1)[1]
        tables = pb.pg(args.postgres, [], f"SELECT tablename FROM pg_tables WHERE schemaname = '{schema}'")
        pb.pg(args.postgres, [f'ANALYZE "{schema}"."{t}"' for (t,) in tables])
        statement = f"ANALYZE on each of the {len(tables)} tables of the schema"
    took = round(time.monotonic() - t0, 2)
    say(f"{server.backend.label}: {statement}: {took:.1f}s")
    return {"statement": statement, "seconds": took}


def print_profile(label: str, prof: dict[str, Any]) -> None:
    say(
        f"profile of the server during ingest ({label}): {prof['samples']} on-CPU samples of "
        f"{prof.get('processes', '?')} worker processes"
    )
    say("  self (on CPU):")
    for f, share in prof["self"][:15]:
        say(f"    {share:5.1f}%  {f}")
    say("  inclusive (fhirgate functions):")
    shown = 0
    for f, share in prof["inclusive"]:
        if "fhirgate" in f and shown < 20:
            say(f"    {share:5.1f}%  {f}")
            shown += 1


def bars(backends: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(
        b: dict[str, Any],
        what: str,
        value: float | None,
        op: str,
        bar: float,
        dirty: bool,
        official: bool = True,
        note: str | None = None,
    ) -> None:
        if value is None or value != value:
            result = "SKIPPED"
        else:
            result = "PASS" if (value >= bar if op == ">=" else value <= bar) else "MISS"
        out.append(
            {
                "backend": b["key"],
                "backend_label": b["label"],
                "issue_bar": official and b["key"] == BAR_BACKEND,
                "note": note,
                "bar": what,
                "value": value,
                "required": f"{op} {bar:g}",
                "result": result,
                "with_errors": dirty,
            }
        )

    for b in backends:
        if b.get("error"):
            continue
        for part, name in (("ingest_generated", "generated"), ("ingest_synthea", "Synthea")):
            ing = b.get(part)
            if ing:
                add(
                    b,
                    f"ingest {name}: resources/s",
                    ing["resources_per_s"],
                    ">=",
                    BAR_INGEST_RPS,
                    ing["failure_count"] > 0,
                )
        if "read" in b:
            m = b["read"]["median"]
            add(b, "read by id: requests/s", m["rps"], ">=", BAR_READ_RPS, m["flagged_runs"] > 0)
        for phase, official, suffix in (("search", True, ""), ("search_after_analyze", False, " +ANALYZE")):
            for key, s in b.get(phase, {}).items():
                if "median" not in s:
                    continue
                m = s["median"]
                note = "single client: too slow for the load run" if s.get("too_slow_for_load") else None
                dirty = m["flagged_runs"] > 0
                for pct, bar in (("p50", BAR_SEARCH_P50_MS), ("p95", BAR_SEARCH_P95_MS)):
                    add(
                        b, f"search {key}{suffix}: {pct} ms", m[f"{pct}_ms"], "<=", bar, dirty, official, note
                    )
    return out


def versions(args: argparse.Namespace, wrk: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        **pb.base_versions(wrk),
        "fhirgate_working_tree_dirty": pb.dirty_sources(),
        **{
            name: pb.package_version(name)
            for name in ("uvicorn", "uvloop", "httptools", "asyncpg", "orjson", "httpx")
        },
    }
    if not args.no_postgres:
        out["postgres"] = pb.postgres_version(args.postgres)
    return out


def fs_type(path: Path) -> str:
    """The file system holding `path` (a SQLite fsync on tmpfs costs nothing)."""
    best = ("", "unknown")
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) >= len(best[0]):
                best = (parts[1], f"{parts[2]} ({parts[0]} on {parts[1]})")
    return best[1]


def bench(args: argparse.Namespace, procs: pb.Processes, runner: pb.WrkRunner, wrk: str, tmp: Path) -> int:
    started = dt.datetime.now(dt.UTC)
    t_start = time.monotonic()
    source_at_start = source_fingerprint()
    revision_at_start = pb.repo_revision()
    say(f"machine: {pb.machine_info()['cpu_model']}, {os.cpu_count()} cores; load {pb.read_loadavg()}")
    data = ensure_data(args.data_dir, args.patients, args.seed)
    resources = sum(b.resources for b in data.bundles)
    say(
        f"data: {len(data.bundles)} bundles, {resources:,} resources "
        f"({len(data.patients)} patients + directory)"
    )
    synthea: list[BundleFile] = []
    synthea_note = None
    if args.synthea is None or not args.synthea.is_dir():
        synthea_note = f"Synthea directory {args.synthea} not found: Synthea ingest skipped"
        say(synthea_note, style="yellow")
    else:
        synthea = synthea_bundles(args.synthea)
        say(
            f"synthea: {len(synthea)} bundles, {sum(b.resources for b in synthea):,} resources "
            f"in {args.synthea}"
        )

    selected = [b for b in BACKENDS if b.key in args.backends]
    if not args.no_postgres and any(b.key == "postgresql" for b in selected):
        try:
            pb.pg(args.postgres, [], "SELECT 1")
        except Exception as exc:
            loud(f"PostgreSQL at {args.postgres} unavailable ({type(exc).__name__}: {exc}): skipped")
            args.no_postgres = True
    records: list[dict[str, Any]] = []
    with contextlib.ExitStack() as cleanup:
        for backend in selected:
            check_stop()
            if backend.key == "postgresql" and args.no_postgres:
                records.append({"key": backend.key, "label": backend.label, "skipped": "PostgreSQL not used"})
                continue
            say()
            say(f"=== {backend.label}: {backend.description}", style="bold")
            t0 = time.monotonic()
            try:
                rec = bench_backend(args, backend, procs, runner, wrk, data, synthea, tmp, cleanup)
                check_stop()
            except (RuntimeError, OSError, httpx.HTTPError) as exc:
                loud(f"{backend.label}: FAILED: {type(exc).__name__}: {exc}")
                rec = {"key": backend.key, "label": backend.label, "error": f"{type(exc).__name__}: {exc}"}
            rec["elapsed_s"] = round(time.monotonic() - t0, 1)
            records.append(rec)
            say(f"=== {backend.label}: done in {rec['elapsed_s']:.0f}s")

    wrk_read = (
        f"wrk -t{args.threads} -c{args.read_connections} -d{args.read_duration:g}s --timeout {WRK_TIMEOUT} "
        "-s bench/lua/cycle_paths.lua http://127.0.0.1:PORT -- read-paths.txt "
        f"{args.threads}"
    )
    wrk_search = (
        f"wrk -t{args.threads} -c{args.search_connections} -d{args.search_duration:g}s "
        f"--timeout {WRK_TIMEOUT} "
        "-s bench/lua/cycle_paths.lua http://127.0.0.1:PORT -- search-SHAPE.txt "
        f"{args.threads}"
    )
    machine = pb.machine_info()
    source_at_end = source_fingerprint()
    pb.warn_if_sources_changed(source_at_start, source_at_end)
    report = {
        **pb.report_head("bench/fhir_bench.py", started, t_start, args.argv),
        "machine": {**machine, "tmp_filesystem": fs_type(tmp)},
        "versions": {
            **versions(args, wrk),
            "fhirgate_revision_at_start": revision_at_start,
            "fhirgate_source_sha256_16": {"start": source_at_start, "end": source_at_end},
        },
        "method": {
            "quick": args.quick,
            "workers": args.workers,
            "ingest": (
                f"each bundle POSTed to the server base as a transaction Bundle (application/fhir+json), the "
                f"provider-directory bundles first and alone, then the others by {args.clients} concurrent "
                "clients (asyncio + httpx, keep-alive); resources/s = entries of the bundles answered 200 "
                "/ wall time from the first request to the last answer; one pass per backend into a fresh "
                "database; validation and indexing are always on in the server"
            ),
            "ingest_clients": args.clients,
            "read": wrk_read,
            "search": wrk_search,
            "search_count": 50,
            "warmup_s": args.warmup,
            "rounds": args.runs,
            "rounds_note": (
                "reads and searches: one warm-up run per shape (discarded), then rounds; in each round every "
                "search shape gets one run, round-robin with the first shape rotating; figures are the "
                "medians over rounds"
            ),
            "lua_script": "bench/lua/cycle_paths.lua",
            "client_and_server_share_the_machine": (
                "the ingest client, wrk, the FHIR server and PostgreSQL all run on this machine's "
                f"{os.cpu_count()} cores on loopback"
            ),
        },
        "data": {
            **{k: v for k, v in data.meta.items() if k != "files"},
            "patients_used": len(data.patients),
            "bundles_used": len(data.bundles),
            "resources_used": resources,
            "cache_dir": str(data.directory),
            "synthea_dir": str(args.synthea) if args.synthea else None,
            "synthea_note": synthea_note,
            "synthea_files": [{"name": b.name, "resources": b.resources} for b in synthea],
        },
        "bars_text": {
            "ingest": f"ingest >= {BAR_INGEST_RPS:,.0f} resources/s on SQLite",
            "read": f"read by id >= {BAR_READ_RPS:,.0f} requests/s",
            "search": f"US Core searches (_count=50) median <= {BAR_SEARCH_P50_MS:g} ms and p95 <= "
            f"{BAR_SEARCH_P95_MS:g} ms at 1,000 patients",
            "anchors": (
                "IBM FHIR server about 940 resources/s on 9 PostgreSQL cores; Blaze about 4,100/s on 8 cores"
            ),
        },
        "backends": records,
        "bars": bars(records),
    }
    print_report(report)
    write_results(args, report, tmp)
    return 0


# ------------------------------------------------------------------------------------------ report


def print_report(report: dict[str, Any]) -> None:
    fmt = pb.fmt
    recs = [b for b in report["backends"]]
    header = ("", *(b["label"] for b in recs), "bar")
    rows: list[tuple[str, ...]] = []

    def row(name: str, bar: str, get: Any) -> None:
        cells = []
        for b in recs:
            if b.get("skipped") or b.get("error"):
                cells.append("SKIPPED" if b.get("skipped") else "FAILED")
                continue
            try:
                cells.append(get(b))
            except (KeyError, TypeError):
                cells.append("-")
        rows.append((name, *cells, bar))

    row(
        "ingest generated: resources/s",
        f">= {BAR_INGEST_RPS:,.0f}",
        lambda b: fmt(b["ingest_generated"]["resources_per_s"], ",.0f"),
    )
    row(
        "  resources (failed bundles)",
        "",
        lambda b: f"{b['ingest_generated']['resources']:,} ({b['ingest_generated']['failure_count']})",
    )
    row(
        "  server CPU ms / 1k resources",
        "",
        lambda b: fmt(b["ingest_generated"]["cpu_server_ms_per_1k_resources"], ",.0f"),
    )
    row(
        "  bundle latency p50 / p95 ms",
        "",
        lambda b: (
            f"{fmt(b['ingest_generated']['bundle_latency_ms']['p50'], '.0f')} / "
            f"{fmt(b['ingest_generated']['bundle_latency_ms']['p95'], '.0f')}"
        ),
    )
    row(
        "ingest Synthea: resources/s",
        f">= {BAR_INGEST_RPS:,.0f}",
        lambda b: (
            f"{fmt(b['ingest_synthea']['resources_per_s'], ',.0f')} "
            f"({b['ingest_synthea']['resources']:,} res)"
        ),
    )

    def size(b: dict[str, Any]) -> str:
        wal = b.get("database_files_bytes", {}).get("fhir.db-wal")
        total = fmt(b["database_bytes"] / 1e6, ",.0f")
        return f"{total} (WAL {wal / 1e6:,.0f})" if wal is not None else total

    row("database size MB", "", size)
    row("read by id: req/s", f">= {BAR_READ_RPS:,.0f}", lambda b: fmt(b["read"]["median"]["rps"], ",.0f"))
    row(
        "  p50 / p95 / p99 ms",
        "",
        lambda b: " / ".join(fmt(b["read"]["median"][k], ".1f") for k in ("p50_ms", "p95_ms", "p99_ms")),
    )

    def search_cell(b: dict[str, Any], phase: str, k: str) -> str:
        s = b[phase][k]
        m = s["median"]
        how = "alone" if s.get("too_slow_for_load") else f"{fmt(m['rps'], ',.0f')}/s"
        return (
            f"{fmt(m['p50_ms'], ',.1f')} / {fmt(m['p95_ms'], ',.1f')}  "
            f"({how}, {fmt(s['check']['entries_mean'], '.0f')} hits)"
        )

    for phase, title_ in (("search", "as ingested"), ("search_after_analyze", "after ANALYZE")):
        if not any(phase in b for b in recs):
            continue
        rows.append((f"searches, {title_} (p50 / p95 ms)", *([""] * len(recs)), ""))
        for shape in SHAPES:
            row(
                f"  {shape.label}",
                f"<= {BAR_SEARCH_P50_MS:g} / {BAR_SEARCH_P95_MS:g}" if phase == "search" else "(info)",
                lambda b, k=shape.key, ph=phase: search_cell(b, ph, k),
            )
    m = report["machine"]
    title = (
        f"fhirgate fhir-server, {report['data']['patients_used']} patients, "
        f"{report['method']['workers']} workers - "
        f"{m['cpu_model']}, {m['cores']} cores (medians of {report['method']['rounds']} rounds)"
    )
    say()
    pb.print_table(title, header, rows)
    say()
    say(
        "bars (from the issue; stated for SQLite, the others shown beside it; "
        "a report, never an exit status):"
    )
    for b in report["bars"]:
        value = b["value"]
        shown = fmt(value, ",.0f") if "/s" in b["bar"] else fmt(value, ".1f")
        extra = "  -- with errors: not a valid measurement" if b["with_errors"] else ""
        style = {"PASS": "bold green", "MISS": "bold red"}.get(b["result"], "yellow")
        if not b["issue_bar"]:
            style = {"PASS": "green", "MISS": "red"}.get(b["result"], "yellow")
        if b.get("note"):
            extra += f"  ({b['note']})"
        say(
            f"  {b['result']:<7} {b['backend_label']:<18} {b['bar']:<45} {shown:>8} "
            f"(required {b['required']}){extra}",
            style=style,
        )


def write_results(args: argparse.Namespace, report: dict[str, Any], tmp: Path) -> None:
    replacements = [(sys.executable, "python"), (str(tmp), "$TMP")]
    if args.synthea is not None:
        rel = os.path.relpath(args.synthea.resolve(), REPO_ROOT)
        replacements.append((str(args.synthea.resolve()), rel))
        replacements.append((str(args.synthea), rel))
    replacements.append((str(REPO_ROOT), "$REPO"))
    found = pb.find_exe("wrk")
    if found:
        replacements.append((found, "wrk"))
    pb.save_report(args.results_dir, "fhir_latest", report, replacements, plot)


def plot(report: dict[str, Any], path: Path) -> Path:
    """Ingest resources/s per backend (2,000 bar), read req/s (1,500 bar), search p50/p95 per shape
    (20 / 60 ms bars)."""
    plt = pb.pyplot()

    recs = [b for b in report["backends"] if not b.get("skipped") and not b.get("error")]
    colours = {"sqlite": "#1f77b4", "sqlite-full": "#9ecae1", "postgresql": "#2ca02c"}
    fig = plt.figure(figsize=(16, 11))
    gs = fig.add_gridspec(2, 2, height_ratios=(1, 1.15), width_ratios=(1.4, 1))
    ax_in, ax_rd, ax_se = fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[0, 1]), fig.add_subplot(gs[1, :])
    red = "#d62728"

    # ingest
    groups = [("ingest_generated", "generated"), ("ingest_synthea", "Synthea sample")]
    width = 0.8 / max(len(recs), 1)
    top = BAR_INGEST_RPS
    for i, b in enumerate(recs):
        xs, hs = [], []
        for g, (key, _) in enumerate(groups):
            if key in b:
                xs.append(g + (i - (len(recs) - 1) / 2) * width)
                hs.append(b[key]["resources_per_s"])
        bars_ = ax_in.bar(
            xs, hs, width * 0.92, color=colours.get(b["key"], "#888"), edgecolor="black", label=b["label"]
        )
        for bar, h in zip(bars_, hs, strict=True):
            ax_in.text(
                bar.get_x() + bar.get_width() / 2, h, f"{h:,.0f}", ha="center", va="bottom", fontsize=8
            )
        top = max(top, *hs) if hs else top
    ax_in.axhline(
        BAR_INGEST_RPS,
        color=red,
        linestyle="--",
        linewidth=1.2,
        label=f"bar: >= {BAR_INGEST_RPS:,.0f}/s (SQLite)",
    )
    ax_in.set_xticks(range(len(groups)))
    pats = report["data"]["patients_used"]
    res = report["data"]["resources_used"]
    ax_in.set_xticklabels(
        [f"generated: {pats:,} patients, {res:,} resources", "Synthea sample bundles"], fontsize=9
    )
    ax_in.set_ylabel("resources/s (higher is better)")
    ax_in.set_ylim(0, top * 1.25)
    ax_in.set_title(f"Ingest: transaction Bundles, {report['method']['ingest_clients']} concurrent clients")
    ax_in.legend(fontsize=8, loc="upper right")
    ax_in.grid(axis="y", alpha=0.3)

    # read by id
    rd = [b for b in recs if "read" in b]
    top = BAR_READ_RPS
    for i, b in enumerate(rd):
        m = b["read"]["median"]
        ax_rd.bar(i, m["rps"], 0.6, color=colours.get(b["key"], "#888"), edgecolor="black")
        pts = [r["rps"] for r in b["read"]["runs"]]
        ax_rd.scatter([i] * len(pts), pts, color="black", s=12, zorder=3)
        ax_rd.text(
            i,
            max(m["rps"], *pts),
            f"{m['rps']:,.0f}/s\np50 {m['p50_ms']:.1f} p95 {m['p95_ms']:.1f} ms",
            ha="center",
            va="bottom",
            fontsize=8,
        )
        top = max(top, m["rps"], *pts)
    ax_rd.axhline(
        BAR_READ_RPS, color=red, linestyle="--", linewidth=1.2, label=f"bar: >= {BAR_READ_RPS:,.0f} req/s"
    )
    ax_rd.set_xticks(range(len(rd)))
    ax_rd.set_xticklabels([b["label"] for b in rd])
    ax_rd.set_ylim(0, top * 1.3)
    ax_rd.set_ylabel("requests/s (median of rounds; dots: rounds)")
    ax_rd.set_title("Read by id: GET /Observation/<id>")
    ax_rd.legend(fontsize=8, loc="upper right")
    ax_rd.grid(axis="y", alpha=0.3)

    # searches: one series per (backend, phase); the phase after ANALYZE hatched
    series = [
        (b, phase)
        for b in recs
        for phase in ("search", "search_after_analyze")
        if b.get(phase) and any("median" in v for v in b[phase].values())
    ]
    shapes = [s for s in SHAPES if any("median" in b[ph].get(s.key, {}) for b, ph in series)]
    n = max(len(series), 1)
    width = 0.84 / n
    top = BAR_SEARCH_P95_MS
    for i, (b, phase) in enumerate(series):
        xs = [k + (i - (n - 1) / 2) * width for k in range(len(shapes))]
        got = [b[phase].get(s.key, {}) for s in shapes]
        p95 = [g["median"]["p95_ms"] if "median" in g else 0.0 for g in got]
        p50 = [g["median"]["p50_ms"] if "median" in g else 0.0 for g in got]
        p95 = [0.0 if v != v else v for v in p95]
        p50 = [0.0 if v != v else v for v in p50]
        c = colours.get(b["key"], "#888")
        hatch = "//" if phase == "search_after_analyze" else None
        name = b["label"] + (" +ANALYZE" if hatch else "")
        ax_se.bar(xs, p95, width * 0.92, color=c, alpha=0.3, edgecolor="black", hatch=hatch)
        ax_se.bar(xs, p50, width * 0.92, color=c, edgecolor="black", hatch=hatch, label=f"{name}")
        for x, a, q, g in zip(xs, p50, p95, got, strict=True):
            if q <= 0:
                ax_se.text(x, 0.4, "no\nresult", ha="center", va="bottom", fontsize=6, color=red)
            else:
                star = "*" if g.get("too_slow_for_load") else ""
                ax_se.text(
                    x,
                    q * 1.05,
                    f"{a:,.0f}\n{q:,.0f}{star}" if a >= 100 else f"{a:.1f}\n{q:.1f}{star}",
                    ha="center",
                    va="bottom",
                    fontsize=6,
                )
        top = max(top, *p95) if p95 else top
    ax_se.axhline(
        BAR_SEARCH_P50_MS,
        color=red,
        linestyle="--",
        linewidth=1.2,
        label=f"bar: p50 <= {BAR_SEARCH_P50_MS:g} ms",
    )
    ax_se.axhline(
        BAR_SEARCH_P95_MS,
        color=red,
        linestyle=":",
        linewidth=1.4,
        label=f"bar: p95 <= {BAR_SEARCH_P95_MS:g} ms",
    )
    ax_se.set_xticks(range(len(shapes)))
    ax_se.set_xticklabels([s.label.replace(" ", "\n", 1) for s in shapes], fontsize=8)
    ax_se.set_yscale("log")  # from about 1 ms to seconds: a linear axis hides the fast shapes
    ax_se.set_ylim(0.3, top * 4)
    ax_se.set_ylabel("latency ms, log scale (medians of rounds; solid p50, light p95)")
    conns = re.search(r"-c(\d+)", report["method"]["search"])
    ax_se.set_title(
        f"US Core searches, _count=50, {conns.group(1) if conns else '?'} concurrent connections "
        "(labels: p50 / p95 ms; * one request at a time: too slow for the load run; hatched: after ANALYZE)",
        fontsize=10,
    )
    ax_se.legend(fontsize=8, loc="upper left", ncol=4)
    ax_se.grid(axis="y", alpha=0.3)

    mach = report["machine"]
    fig.suptitle(
        f"fhirgate fhir-server ({report['method']['workers']} workers) - {mach['cpu_model']}, "
        f"{mach['cores']} cores, "
        f"{mach['kernel']}, {report['timestamp'][:16].replace('T', ' ')} UTC"
        f"{'  |  QUICK run' if report['method']['quick'] else ''}\n"
        f"Python {report['versions']['python']}, SQLite {report['versions']['sqlite']}, "
        f"{str(report['versions'].get('postgres', '')).split(' on ')[0]}, "
        f"{report['versions']['wrk'].split(' [')[0]}",
        fontsize=11,
    )
    return pb.finish_chart(
        fig,
        path,
        (0, 0.02, 1, 0.95),
        "client (httpx / wrk), FHIR server and PostgreSQL share the same cores on loopback; "
        "bars are the issue's, stated for SQLite",
        0.01,
    )


# -------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 100 patients, 3 s reads, 2 s searches")
    p.add_argument("--patients", type=int, default=None, help="generated patients (1000; 100 with --quick)")
    p.add_argument("--seed", type=int, default=42, help="generator seed (42)")
    p.add_argument("--clients", type=int, default=4, help="concurrent ingest clients (4)")
    p.add_argument("--workers", type=int, default=2, help="fhir-server workers (2, the machine's cores)")
    p.add_argument(
        "--backends",
        default="sqlite,sqlite-full,postgresql",
        help="comma-separated: sqlite, sqlite-full, postgresql (all three)",
    )
    p.add_argument("--postgres", default=DEFAULT_POSTGRES, help=f"PostgreSQL URL ({DEFAULT_POSTGRES})")
    p.add_argument("--no-postgres", action="store_true", help="leave PostgreSQL out")
    p.add_argument(
        "--synthea",
        type=Path,
        default=DEFAULT_SYNTHEA,
        help="Synthea bundles (../shared/data/synthea from the repository root)",
    )
    p.add_argument("--read-duration", type=float, default=None, help="seconds per read run (10; 3 quick)")
    p.add_argument("--search-duration", type=float, default=None, help="seconds per search run (5; 2 quick)")
    p.add_argument("--warmup", type=float, default=None, help="seconds of the warm-up run (3; 1 quick)")
    p.add_argument("--runs", type=int, default=3, help="rounds of reads and searches, at least 3 (3)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    p.add_argument("--read-connections", type=int, default=16, help="wrk connections for reads (16)")
    p.add_argument("--search-connections", type=int, default=8, help="wrk connections for searches (8)")
    p.add_argument(
        "--no-analyze-phase",
        dest="analyze_phase",
        action="store_false",
        help="skip the second search phase (after ANALYZE)",
    )
    p.add_argument("--profile", type=float, default=0, metavar="S", help="py-spy the server S s into ingest")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR, help="where generated bundles are cached")
    p.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (databases, logs, path lists)")
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.patients = args.patients if args.patients is not None else (100 if args.quick else 1000)
    args.read_duration = args.read_duration or (3.0 if args.quick else 10.0)
    args.search_duration = args.search_duration or (2.0 if args.quick else 5.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 3.0)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(args.backends) - {b.key for b in BACKENDS}
    if unknown:
        p.error(f"unknown backend(s): {', '.join(sorted(unknown))}")
    if args.runs < 3:
        p.error("--runs must be at least 3 (median of at least three rounds)")
    if args.patients < 1 or args.clients < 1 or args.workers < 1:
        p.error("--patients, --clients and --workers must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return pb.run_benchmark(
        "fhirgate-fhir-bench-",
        args.keep_tmp,
        pb.ensure_wrk,
        lambda procs, runner, wrk, tmp: bench(args, procs, runner, wrk, tmp),
        signals=stop_on_signals,
    )


if __name__ == "__main__":
    sys.exit(main())
