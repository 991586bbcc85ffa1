"""Kong's prometheus exporter (`kong/plugins/prometheus/exporter.lua`, 3.x): metric names, labels,
help texts and buckets as Kong emits them, so Kong's Grafana dashboard (7424) works unchanged.

One node, several workers (DECISIONS.md): the node reports the sum over its workers. A before-fork
hook gives the node a fresh directory for prometheus-client's multiprocess mode
(`PROMETHEUS_MULTIPROC_DIR`); each worker writes its values to its own memory-mapped files there,
and `/metrics` on the status listener (whichever worker serves it) merges all of them with
`MultiProcessCollector`. Without a node (a gateway built directly) the values stay in this
process. Metric objects are created lazily, in the worker, after the mode is chosen.

The text is rendered here rather than by prometheus-client so that names match Kong's exactly
(`kong_bandwidth_bytes` is a counter without the `_total` suffix prometheus-client would add) and
numbers print as Kong prints them (`1`, `le="5"`).
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.multiprocess import MultiProcessCollector

from fhirgate import __version__
from fhirgate.gateway import hooks, status

if TYPE_CHECKING:
    from fhirgate.settings import Settings

#: Kong's KONG_LATENCY_BUCKETS and UPSTREAM_LATENCY_BUCKETS (ms).
KONG_LATENCY_BUCKETS = (1, 2, 5, 7, 10, 15, 20, 30, 50, 75, 100, 200, 500, 750, 1000, 3000, 6000)
UPSTREAM_LATENCY_BUCKETS = (25, 50, 80, 100, 250, 400, 700, 1000, 2000, 5000, 10000, 30000, 60000)

CONTENT_TYPE = "text/plain; charset=UTF-8"
WORKSPACE = "default"  # fhirgate has one workspace, Kong's default

# Kong's exposition names of the families whose sample names prometheus-client changes.
_KONG_NAMES = {
    "kong_http_requests": "kong_http_requests_total",
    "kong_bandwidth_bytes": "kong_bandwidth_bytes",
}
_CACHE_LIMIT = 10_000
# Kong's label order per family (prometheus-client's multiprocess collector sorts them).
_LABEL_ORDER = {
    "kong_http_requests": ("service", "route", "code", "source", "workspace", "consumer"),
    "kong_kong_latency_ms": ("service", "route", "workspace", "le"),
    "kong_upstream_latency_ms": ("service", "route", "workspace", "le"),
    "kong_request_latency_ms": ("service", "route", "workspace", "le"),
    "kong_bandwidth_bytes": ("service", "route", "direction", "workspace", "consumer"),
}


class Metrics:
    """The per-request metrics of one process, with their labelled children cached by key."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.status = Counter(
            "kong_http_requests",
            "HTTP status codes per consumer/service/route in Kong",
            ("service", "route", "code", "source", "workspace", "consumer"),
            registry=registry,
        )
        self.kong_latency = Histogram(
            "kong_kong_latency_ms",
            "Latency added by Kong and enabled plugins for each service/route in Kong",
            ("service", "route", "workspace"),
            buckets=KONG_LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_latency = Histogram(
            "kong_upstream_latency_ms",
            "Latency added by upstream response for each service/route in Kong",
            ("service", "route", "workspace"),
            buckets=UPSTREAM_LATENCY_BUCKETS,
            registry=registry,
        )
        self.total_latency = Histogram(
            "kong_request_latency_ms",
            "Total latency incurred during requests for each service/route in Kong",
            ("service", "route", "workspace"),
            buckets=UPSTREAM_LATENCY_BUCKETS,
            registry=registry,
        )
        # Kong's name has no `_total`; prometheus-client adds it to samples, `render` removes it.
        self.bandwidth = Counter(
            "kong_bandwidth_bytes",
            "Total bandwidth (ingress/egress) throughput in bytes",
            ("service", "route", "direction", "workspace", "consumer"),
            registry=registry,
        )
        # label key -> child; `.labels()` costs more than a dict lookup on the hot path
        self.children: dict[tuple[Any, ...], Any] = {}

    def child(self, key: tuple[Any, ...], metric: Any, labels: tuple[str, ...]) -> Any:
        found = self.children.get(key)
        if found is None:
            if len(self.children) >= _CACHE_LIMIT:
                self.children.clear()
            found = self.children[key] = metric.labels(*labels)
        return found


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.multiproc_dir: str | None = None
        self.owner_pid = 0
        self.registry: CollectorRegistry | None = None  # in-process mode only
        self.metrics: Metrics | None = None
        self.node_id = str(uuid.uuid4())


_state = _State()


def metrics() -> Metrics:
    """This process's metrics (created on first use, in the mode the node chose)."""
    m = _state.metrics
    if m is None:
        with _state.lock:
            m = _state.metrics
            if m is None:
                if _state.multiproc_dir is None:
                    _state.registry = CollectorRegistry(auto_describe=True)
                m = _state.metrics = Metrics(_state.registry)
    return m


def node_id() -> str:
    return _state.node_id


_DIR_PREFIX = "fhirgate-prometheus-"


def _remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _remove_stale_dirs() -> None:
    """Directories of nodes that died without cleaning up (SIGKILL): named after a dead pid."""
    root = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            if not entry.name.startswith(_DIR_PREFIX) or not entry.is_dir(follow_symlinks=False):
                continue
            pid_text = entry.name[len(_DIR_PREFIX) :].split("-", 1)[0]
            if not pid_text.isdigit():
                continue
            try:
                os.kill(int(pid_text), 0)
            except ProcessLookupError:
                _remove_dir(entry.path)
            except PermissionError:
                pass  # alive, another user's


def setup_node(_settings: Settings | None = None) -> None:
    """Before the workers fork: a fresh, empty multiprocess directory for this node."""
    with _state.lock:
        old, owner = _state.multiproc_dir, _state.owner_pid
        _remove_stale_dirs()
        path = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        # A new value class: prometheus-client caches its open files per class, not per directory.
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        _state.multiproc_dir = path
        _state.owner_pid = os.getpid()
        _state.registry = None
        _state.metrics = None
        _state.node_id = str(uuid.uuid4())
        if old is not None and owner == os.getpid():
            _remove_dir(old)
        if owner != os.getpid():
            atexit.register(_cleanup_at_exit)


def _cleanup_at_exit() -> None:
    # Only the master (the process that made the directory) removes it; workers leave with _exit.
    if _state.multiproc_dir is not None and _state.owner_pid == os.getpid():
        _remove_dir(_state.multiproc_dir)


# --- rendering ---------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str], order: tuple[str, ...]) -> str:
    if not labels:
        return ""
    parts = []
    items = sorted(labels.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
    for k, v in items:
        if k == "le" and v != "+Inf":
            with contextlib.suppress(ValueError):
                v = _fmt(float(v))
        parts.append(f'{k}="{_escape(v)}"')
    return "{" + ",".join(parts) + "}"


def _families() -> Iterable[Any]:
    if _state.multiproc_dir is not None:
        registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(registry, path=_state.multiproc_dir)  # type: ignore[no-untyped-call]
        return list(registry.collect())
    metrics()  # make sure the in-process registry exists
    assert _state.registry is not None
    return list(_state.registry.collect())


def render() -> bytes:
    """The node's metrics in Prometheus text format, sorted by name as Kong's exporter does."""
    out: list[str] = []
    blocks: list[tuple[str, list[str]]] = []
    for family in _families():
        samples = [s for s in family.samples if not s.name.endswith("_created")]
        if not samples:
            continue
        name = _KONG_NAMES.get(family.name, family.name)
        kind = family.type
        lines = [f"# HELP {name} {family.documentation}", f"# TYPE {name} {kind}"]
        if kind == "histogram":
            samples.sort(
                key=lambda s: (
                    tuple(sorted((k, v) for k, v in s.labels.items() if k != "le")),
                    {"_bucket": 0, "_count": 1, "_sum": 2}.get(s.name[len(family.name) :], 3),
                    float(s.labels.get("le", "0").replace("+Inf", "inf")),
                )
            )
        for sample in samples:
            sample_name = name if sample.name == family.name + "_total" else sample.name
            labels = _labels(sample.labels, _LABEL_ORDER.get(family.name, ()))
            lines.append(f"{sample_name}{labels} {_fmt(float(sample.value))}")
        blocks.append((name, lines))
    blocks.append(
        (
            "kong_datastore_reachable",
            [
                "# HELP kong_datastore_reachable Datastore reachable from Kong, 0 is unreachable",
                "# TYPE kong_datastore_reachable gauge",
                "kong_datastore_reachable 1",  # DB-less: the declarative file is the datastore
            ],
        )
    )
    blocks.append(
        (
            "kong_node_info",
            [
                "# HELP kong_node_info Kong Node metadata information",
                "# TYPE kong_node_info gauge",
                f'kong_node_info{{node_id="{_state.node_id}",version="{_escape(__version__)}"}} 1',
            ],
        )
    )
    for _, lines in sorted(blocks, key=lambda b: b[0]):
        out.extend(lines)
    return ("\n".join(out) + "\n").encode()


def serve_metrics() -> tuple[int, dict[str, str], bytes]:
    """The status listener's `/metrics`."""
    return 200, {"Content-Type": CONTENT_TYPE}, render()


hooks.on_before_fork("prometheus", setup_node)
status.register_endpoint("/metrics", serve_metrics)

__all__ = [
    "KONG_LATENCY_BUCKETS",
    "UPSTREAM_LATENCY_BUCKETS",
    "Metrics",
    "metrics",
    "node_id",
    "render",
    "serve_metrics",
    "setup_node",
]
