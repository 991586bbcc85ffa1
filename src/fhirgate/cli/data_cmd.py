"""`fhirgate demo-data` (synthetic Synthea-shaped patients) and `fhirgate load` (send Bundles,
resources and NDJSON to a FHIR server).

`load` reads each PATH (a file, or every `*.json`, `*.ndjson` and their `.gz` in a directory,
sorted) and sends it to the FHIR base URL:

- a Bundle of type transaction or batch: POSTed to the base as it is (bytes unchanged);
- a Bundle of another type (collection, searchset, history...): its resources are sent as a
  transaction, each entry `PUT Type/id` when the resource has an id, else `POST Type`;
  document and message Bundles are resources in their own right and are stored as one;
- a single resource: `PUT Type/id` when it has an id, else `POST Type`;
- an NDJSON file (one resource a line, as FHIR Bulk Data exports them): transactions of up to
  `NDJSON_BATCH` resources, `PUT Type/id` or `POST Type` as above.

Order matters because patient bundles reference the provider directory: files run in tiers, each
finished before the next starts: (0) `hospitalInformation*` / `organizations*` bundles and
Organization/Location resources, (1) `practitionerInformation*` and Practitioner/PractitionerRole,
(2) Patient resources, (3) everything else. Within a tier, `--concurrency` files are in flight.

Transient failures (connection errors, 429, 502, 503, 504) are retried with exponential back-off
and jitter, honouring `Retry-After`. A read timeout is not retried (the server may have applied the
request; sending it again could duplicate it). Any other failure is reported for its file, with the
OperationOutcome's diagnostics, and loading goes on with the next file; the exit status is 1 when
any file failed.
"""

from __future__ import annotations

import argparse
import collections
import email.utils
import gzip
import io
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fhirgate import __version__
from fhirgate.cli.jwks_cmd import is_loopback

if TYPE_CHECKING:  # imported when a command runs, so `fhirgate --help` stays light
    import httpx
    from rich.console import Console
    from rich.progress import Progress

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "DEFAULT_FHIR",
    "NDJSON_BATCH",
    "RETRY_AFTER_CAP",
    "TRANSIENT_STATUSES",
    "demo_data",
    "load",
    "register",
]

#: Default FHIR base: where `fhirgate fhir-server` listens.
DEFAULT_FHIR = "http://127.0.0.1:8080"
#: Resources per transaction when loading NDJSON.
NDJSON_BATCH = 500
#: HTTP statuses worth retrying.
TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})
#: First back-off delay (seconds), doubled on every retry, capped at BACKOFF_CAP.
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
#: Longest `Retry-After` honoured (seconds).
RETRY_AFTER_CAP = 300.0

FHIR_JSON = "application/fhir+json"
_SUFFIXES = (".json", ".ndjson", ".json.gz", ".ndjson.gz")
_TIER_BY_TYPE = {"Organization": 0, "Location": 0, "Practitioner": 1, "PractitionerRole": 1, "Patient": 2}
_TIER_NAMES = ("organizations", "practitioners", "patients", "resources")
_STORED_BUNDLES = frozenset({"document", "message"})

# Replaced in tests to observe back-off without waiting.
_sleep = time.sleep


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add `demo-data` and `load` to the `fhirgate` command line."""
    demo = subparsers.add_parser(
        "demo-data",
        help="write deterministic synthetic patients (Synthea-shaped FHIR R4 transaction Bundles)",
        description="Write one FHIR R4 transaction Bundle per synthetic patient (about ten years of "
        "history: encounters, conditions, vital signs and labs, medications, immunizations, "
        "allergies, procedures, reports), plus the provider directory bundle they reference "
        "(hospitalInformation-*.json, load it first: `fhirgate load DIR` does). The same --patients "
        "and --seed always give the same bytes. No real person is described.",
    )
    demo.add_argument("--patients", type=_non_negative, default=10, metavar="N", help="patients (default 10)")
    demo.add_argument("--seed", type=int, default=1, metavar="S", help="random seed (default 1)")
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("demo-data"),
        metavar="DIR",
        help="output directory (default ./demo-data)",
    )
    demo.set_defaults(func=_run_demo)

    load_parser = subparsers.add_parser(
        "load",
        help="send FHIR Bundles, resources and NDJSON files to a FHIR server",
        description="Send each PATH to a FHIR server: transaction/batch Bundles as they are, other "
        "Bundles and NDJSON files (one resource a line) as transactions, single resources by "
        "PUT (with an id) or POST. A directory means every *.json and *.ndjson (also .gz) in it, "
        "sorted; provider directory files (hospitalInformation*, practitionerInformation*) and "
        "Organization, Practitioner and Patient resources go first. Transient failures are retried; "
        "a file that fails is reported with the server's diagnostics and the others still load. "
        "Exits 1 if any file failed.",
    )
    load_parser.add_argument("paths", nargs="+", metavar="PATH", help="JSON or NDJSON file, or a directory")
    load_parser.add_argument(
        "--fhir", default=DEFAULT_FHIR, metavar="URL", help=f"FHIR base URL (default {DEFAULT_FHIR})"
    )
    load_parser.add_argument(
        "--token",
        metavar="TOKEN",
        help="send 'Authorization: Bearer TOKEN' (default: the FHIRGATE_TOKEN environment variable)",
    )
    load_parser.add_argument(
        "--concurrency", type=_positive, default=2, metavar="N", help="files in flight (default 2)"
    )
    load_parser.add_argument(
        "--retries",
        type=_non_negative,
        default=3,
        metavar="N",
        help="retries of a transient failure (default 3)",
    )
    load_parser.add_argument(
        "--timeout", type=float, default=300.0, metavar="SECONDS", help="per-request time limit (default 300)"
    )
    load_parser.set_defaults(func=_run_load)


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _consoles() -> tuple[Console, Console]:
    from rich.console import Console

    return Console(file=sys.stdout, highlight=False), Console(file=sys.stderr, highlight=False)


def _progress(console: Console, unit: str) -> Progress:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        Task,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.text import Text

    class _RateColumn(ProgressColumn):
        """Items per second over the whole run (rich's own speed column shows bytes)."""

        def render(self, task: Task) -> Text:
            elapsed = task.elapsed or 0.0
            rate = task.completed / elapsed if elapsed > 0 else 0.0
            return Text(f"{rate:,.0f} {unit}/s", style="progress.data.speed")

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        _RateColumn(),
        TimeElapsedColumn(),
        console=console,
    )


# ---------------------------------------------------------------------------------------------
# demo-data


def _run_demo(args: argparse.Namespace) -> int:
    return demo_data(args.patients, args.seed, args.out)


def demo_data(patients: int, seed: int, out: Path) -> int:
    """Write the demo bundles into `out`; print a summary. Returns the exit status."""
    import orjson
    from rich.table import Table

    from fhirgate.fhirserver.demodata import generate

    stdout, stderr = _consoles()
    started = time.perf_counter()
    by_type: collections.Counter[str] = collections.Counter()
    files = 0
    total_bytes = 0
    try:
        out.mkdir(parents=True, exist_ok=True)
        with _progress(stderr, "bundles") as progress:
            task = progress.add_task("generating", total=patients + 1)
            for name, bundle in generate(patients, seed):
                data = orjson.dumps(bundle)
                (out / name).write_bytes(data)
                files += 1
                total_bytes += len(data)
                for entry in bundle["entry"]:
                    by_type[entry["resource"]["resourceType"]] += 1
                progress.advance(task)
    except OSError as exc:
        stderr.print(f"error: cannot write to {out}: {exc.strerror or exc}", markup=False, soft_wrap=True)
        return 1
    seconds = time.perf_counter() - started
    table = Table(title="resources by type", title_justify="left")
    table.add_column("type")
    table.add_column("count", justify="right")
    for rtype, count in sorted(by_type.items(), key=lambda item: (-item[1], item[0])):
        table.add_row(rtype, f"{count:,}")
    total = sum(by_type.values())
    table.add_row("total", f"{total:,}", style="bold")
    stdout.print(table)
    stdout.print(
        f"wrote {files} files ({patients} patients + the provider directory, {total:,} resources, "
        f"{total_bytes / 1e6:,.1f} MB) to {out} in {seconds:.1f} s (seed {seed})",
        markup=False,
        soft_wrap=True,
    )
    stdout.print(f"load them with: fhirgate load {out} --fhir {DEFAULT_FHIR}", markup=False, soft_wrap=True)
    return 0


# ---------------------------------------------------------------------------------------------
# load: what to send


class _FileError(Exception):
    """A file cannot be sent; the message says why, on one line."""


@dataclass(slots=True)
class _Job:
    path: Path
    kind: str  # "bundle" (transaction/batch, sent as is), "convert", "resource", "ndjson", "error"
    tier: int = 3
    resources: int = 0
    bundle_type: str = ""
    error: str = ""


@dataclass(slots=True)
class _Result:
    job: _Job
    loaded: int
    error: str | None


def _open(path: Path) -> io.BufferedIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _read(path: Path) -> bytes:
    with _open(path) as handle:
        return handle.read()


def _is_ndjson(path: Path) -> bool:
    return path.name.endswith((".ndjson", ".ndjson.gz"))


def _name_tier(path: Path) -> int | None:
    name = path.name
    if name.startswith(("hospitalInformation", "organizations")):
        return 0
    if name.startswith("practitionerInformation"):
        return 1
    return None


def _collect(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_SUFFIXES)))
        else:
            files.append(path)
    return files


def _scan(path: Path) -> _Job:
    """Look at a file once: what it holds, how many resources, which tier. Never raises."""
    import orjson

    try:
        if _is_ndjson(path):
            count = 0
            first_type = ""
            with _open(path) as handle:
                for line in handle:
                    if line.strip():
                        count += 1
                        if not first_type:
                            first_type = _resource_type(orjson.loads(line), "line 1")
            tier = _name_tier(path)
            return _Job(path, "ndjson", tier if tier is not None else _TIER_BY_TYPE.get(first_type, 3), count)
        document = orjson.loads(_read(path))
        rtype = _resource_type(document, "the file")
        name_tier = _name_tier(path)
        if rtype == "Bundle" and document.get("type") not in _STORED_BUNDLES:
            btype = str(document.get("type", ""))
            entries = document.get("entry") or []
            if not isinstance(entries, list):
                raise _FileError("Bundle.entry is not an array")
            tier = name_tier if name_tier is not None else 3
            if btype in ("transaction", "batch"):
                return _Job(path, "bundle", tier, len(entries), btype)
            count = sum(1 for e in entries if isinstance(e, dict) and isinstance(e.get("resource"), dict))
            return _Job(path, "convert", tier, count, btype)
        tier = name_tier if name_tier is not None else _TIER_BY_TYPE.get(rtype, 3)
        return _Job(path, "resource", tier, 1)
    except FileNotFoundError:
        return _Job(path, "error", error="no such file or directory")
    except IsADirectoryError:
        return _Job(path, "error", error="is a directory")
    except OSError as exc:  # gzip.BadGzipFile is an OSError too
        return _Job(path, "error", error=f"cannot read: {exc.strerror or exc}")
    except orjson.JSONDecodeError as exc:
        return _Job(path, "error", error=f"not valid JSON: {exc}")
    except _FileError as exc:
        return _Job(path, "error", error=str(exc))


def _resource_type(document: Any, where: str) -> str:
    if not isinstance(document, dict) or not isinstance(document.get("resourceType"), str):
        raise _FileError(f"{where} is not a FHIR resource (no resourceType)")
    return str(document["resourceType"])


def _entry(resource: dict[str, Any], full_url: Any = None) -> dict[str, Any]:
    rtype = resource["resourceType"]
    rid = resource.get("id")
    entry: dict[str, Any] = {}
    if isinstance(full_url, str) and full_url:
        entry["fullUrl"] = full_url
    entry["resource"] = resource
    if isinstance(rid, str) and rid:
        entry["request"] = {"method": "PUT", "url": f"{rtype}/{rid}"}
    else:
        entry["request"] = {"method": "POST", "url": rtype}
    return entry


def _transaction(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


@dataclass(slots=True)
class _Request:
    method: str
    path: str  # relative to the base: "" for a Bundle, "Patient" or "Patient/123"
    body: bytes
    resources: int
    where: str  # "" or " (lines 501-1000)" for messages
    batch: bool = False


def _requests(job: _Job) -> Iterator[_Request]:
    """The HTTP requests that send `job`'s file, produced lazily (NDJSON is streamed)."""
    import orjson

    if job.kind == "bundle":
        yield _Request("POST", "", _read(job.path), job.resources, "", batch=job.bundle_type == "batch")
    elif job.kind == "convert":
        document = orjson.loads(_read(job.path))
        entries = []
        for index, e in enumerate(document.get("entry") or []):
            if isinstance(e, dict) and isinstance(e.get("resource"), dict):
                _resource_type(e["resource"], f"entry[{index}].resource")
                entries.append(_entry(e["resource"], e.get("fullUrl")))
        if entries:
            yield _Request("POST", "", orjson.dumps(_transaction(entries)), len(entries), "")
    elif job.kind == "resource":
        document = orjson.loads(_read(job.path))
        rid = document.get("id")
        if isinstance(rid, str) and rid:
            yield _Request("PUT", f"{document['resourceType']}/{rid}", orjson.dumps(document), 1, "")
        else:
            yield _Request("POST", document["resourceType"], orjson.dumps(document), 1, "")
    elif job.kind == "ndjson":
        chunk: list[dict[str, Any]] = []
        first = last = 0
        with _open(job.path) as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    resource = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise _FileError(f"line {number} is not valid JSON: {exc}")
                _resource_type(resource, f"line {number}")
                if not chunk:
                    first = number
                last = number
                chunk.append(_entry(resource))
                if len(chunk) == NDJSON_BATCH:
                    yield _ndjson_request(chunk, first, last)
                    chunk = []
        if chunk:
            yield _ndjson_request(chunk, first, last)


def _ndjson_request(chunk: list[dict[str, Any]], first: int, last: int) -> _Request:
    import orjson

    body = orjson.dumps(_transaction(chunk))
    return _Request("POST", "", body, len(chunk), f" (lines {first}-{last})")


# ---------------------------------------------------------------------------------------------
# load: sending


class _Sender:
    def __init__(
        self,
        client: httpx.Client,
        base: str,
        retries: int,
        on_retry: Callable[[str, float], None],
        stop: threading.Event,
    ) -> None:
        self.client = client
        self.base = base
        self.retries = retries
        self.on_retry = on_retry
        self.stop = stop
        self.random = random.Random()  # jitter only; never affects what is sent

    def send(self, request: _Request) -> str | None:
        """Send one request, retrying transient failures. Returns None on success, else a message."""
        import httpx

        url = f"{self.base}/{request.path}" if request.path else self.base
        headers = {"Content-Type": FHIR_JSON}
        attempt = 0
        while True:
            try:
                response = self.client.request(request.method, url, content=request.body, headers=headers)
            except (httpx.ReadTimeout, httpx.WriteTimeout) as exc:
                return (
                    f"timed out waiting for the server ({type(exc).__name__}); not retried, since the server "
                    "may have applied the request: check, then load the file again or raise --timeout"
                )
            except httpx.TransportError as exc:
                if attempt >= self.retries or self.stop.is_set():
                    return f"cannot reach the server: {_one_line(str(exc)) or type(exc).__name__}"
                delay = self.backoff(attempt)
                self.on_retry(f"{type(exc).__name__}", delay)
            else:
                if (
                    response.status_code in TRANSIENT_STATUSES
                    and attempt < self.retries
                    and not self.stop.is_set()
                ):
                    after = _retry_after(response.headers.get("Retry-After"))
                    delay = self.backoff(attempt) if after is None else after
                    self.on_retry(f"HTTP {response.status_code}", delay)
                elif response.is_success:
                    return _batch_errors(response) if request.batch else None
                else:
                    status = response.status_code
                    reason = response.reason_phrase or httpx.codes.get_reason_phrase(status)
                    return f"HTTP {status} {reason}: {_diagnostics(response)}"
            _sleep(delay)
            attempt += 1

    def backoff(self, attempt: int) -> float:
        """Exponential back-off with jitter: half the delay fixed, half random."""
        delay = min(BACKOFF_CAP, BACKOFF_BASE * 2.0**attempt)
        return delay / 2 + self.random.uniform(0, delay / 2)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(RETRY_AFTER_CAP, float(value))
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return min(RETRY_AFTER_CAP, max(0.0, (moment - datetime.now(UTC)).total_seconds()))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _clip(text: str, limit: int = 500) -> str:
    text = _one_line(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _outcome_text(outcome: Any) -> str:
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return ""
    parts = []
    for issue in outcome.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code") or ""
        where = issue.get("expression") or issue.get("location") or []
        if isinstance(where, list) and where:
            text = f"{text} (at {', '.join(str(w) for w in where)})"
        if text:
            parts.append(str(text))
    return "; ".join(parts)


def _diagnostics(response: httpx.Response) -> str:
    import orjson

    try:
        text = _outcome_text(orjson.loads(response.content))
    except orjson.JSONDecodeError:
        text = ""
    if text:
        return _clip(text)
    body = response.content[:300].decode("utf-8", "replace")
    return _clip(body) if body.strip() else "(no body)"


def _batch_errors(response: httpx.Response) -> str | None:
    """A batch answers 200 even when some entries failed: report those."""
    import orjson

    try:
        bundle = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(bundle, dict):
        return None
    failed = []
    for index, entry in enumerate(bundle.get("entry") or []):
        status = str(((entry or {}).get("response") or {}).get("status", ""))
        if status and not status.startswith("2"):
            detail = _outcome_text((entry.get("response") or {}).get("outcome"))
            failed.append(f"entry[{index}] {status}" + (f": {detail}" if detail else ""))
    if not failed:
        return None
    shown = "; ".join(failed[:3]) + (f"; and {len(failed) - 3} more" if len(failed) > 3 else "")
    return f"{len(failed)} batch entries failed: {_clip(shown)}"


def _run_load(args: argparse.Namespace) -> int:
    token = args.token if args.token is not None else os.environ.get("FHIRGATE_TOKEN") or None
    return load(
        args.paths,
        fhir=args.fhir,
        token=token,
        concurrency=args.concurrency,
        retries=args.retries,
        timeout=args.timeout,
    )


def load(
    paths: Sequence[str],
    *,
    fhir: str = DEFAULT_FHIR,
    token: str | None = None,
    concurrency: int = 2,
    retries: int = 3,
    timeout: float = 300.0,
) -> int:
    """Send `paths` to the FHIR server at `fhir`. Returns the exit status (0 all loaded, 1 not)."""
    import httpx

    stdout, stderr = _consoles()

    def say(text: str) -> None:
        stderr.print(text, markup=False, soft_wrap=True)

    base = fhir.rstrip("/")
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        say(f"error: --fhir {fhir!r} is not an http(s) URL; give the FHIR base, e.g. {DEFAULT_FHIR}")
        return 2
    if token and parts.scheme == "http" and not is_loopback(parts.hostname):
        say(
            "warning: sending a bearer token over plain http: anyone on the network path can read it; "
            "use https"
        )

    files = _collect(paths)
    if not files:
        say(f"error: no .json or .ndjson files in {', '.join(paths)}")
        return 1
    started = time.perf_counter()
    jobs = [_scan(path) for path in files]
    tiers: dict[int, list[_Job]] = collections.defaultdict(list)
    results: list[_Result] = []
    for job in jobs:
        if job.kind == "error":
            say(f"error: {job.path}: {job.error}")
            results.append(_Result(job, 0, job.error))
        else:
            tiers[job.tier].append(job)
    total = sum(job.resources for job in jobs if job.kind != "error")

    headers = {"Accept": FHIR_JSON, "User-Agent": f"fhirgate/{__version__}", "Prefer": "return=minimal"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    stop = threading.Event()
    interrupted = False
    with (
        httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=10.0), limits=limits) as client,
        _progress(stderr, "resources") as progress,
        ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="fhirgate-load") as pool,
    ):
        task = progress.add_task("loading", total=total)
        lock = threading.Lock()
        remaining = [total]
        retried = collections.Counter[str]()

        def on_retry(reason: str, delay: float) -> None:
            with lock:
                retried[reason] += 1
            progress.console.print(
                f"retrying after {reason} in {delay:.1f} s", markup=False, soft_wrap=True, style="dim"
            )

        sender = _Sender(client, base, retries, on_retry, stop)

        def run(job: _Job) -> _Result:
            loaded = 0
            try:
                for request in _requests(job):
                    if stop.is_set():
                        return _Result(job, loaded, "interrupted")
                    error = sender.send(request)
                    if error is not None:
                        return _Result(job, loaded, f"{error}{request.where}")
                    loaded += request.resources
                    progress.advance(task, request.resources)
            except _FileError as exc:
                return _Result(job, loaded, str(exc))
            except OSError as exc:
                return _Result(job, loaded, f"cannot read: {exc.strerror or exc}")
            except Exception as exc:  # a bug must not hide the other files' outcome
                return _Result(job, loaded, f"{type(exc).__name__}: {exc}")
            finally:
                if loaded < job.resources:  # the bar counts what can still load
                    with lock:
                        remaining[0] -= job.resources - loaded
                        progress.update(task, total=remaining[0])
            return _Result(job, loaded, None)

        try:
            for tier in sorted(tiers):
                pending: set[Future[_Result]] = {pool.submit(run, job) for job in tiers[tier]}
                progress.update(task, description=f"loading {_TIER_NAMES[tier]}")
                while pending:
                    done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                    for future in done:
                        result = future.result()
                        results.append(result)
                        if result.error is not None:
                            progress.console.print(
                                f"error: {result.job.path}: {result.error}", markup=False, soft_wrap=True
                            )
        except KeyboardInterrupt:
            interrupted = True
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
    seconds = time.perf_counter() - started
    return _summary(stdout, results, seconds, interrupted, sum(retried.values()))


def _summary(stdout: Console, results: list[_Result], seconds: float, interrupted: bool, retries: int) -> int:
    from rich.table import Table

    ok = [r for r in results if r.error is None]
    failed = [r for r in results if r.error is not None]
    loaded = sum(r.loaded for r in results)
    table = Table(title="load summary", title_justify="left")
    for name in ("files ok", "files failed", "resources", "seconds", "resources/s"):
        table.add_column(name, justify="right")
    rate = loaded / seconds if seconds > 0 else 0.0
    table.add_row(str(len(ok)), str(len(failed)), f"{loaded:,}", f"{seconds:.1f}", f"{rate:,.0f}")
    stdout.print(table)
    if retries:
        stdout.print(f"{retries} transient failure(s) retried", markup=False, soft_wrap=True)
    for result in failed[:20]:
        stdout.print(f"failed: {result.job.path}: {result.error}", markup=False, soft_wrap=True)
    if len(failed) > 20:
        stdout.print(f"... and {len(failed) - 20} more failed files", markup=False, soft_wrap=True)
    if interrupted:
        stdout.print("interrupted", markup=False)
        return 130
    return 1 if failed else 0
