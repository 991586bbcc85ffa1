"""`make run`: the gateway in front of a small local FHIR upstream, ready to try with curl.

This is the demo until `fhirgate up` exists: it starts a read-only FHIR R4 upstream on
127.0.0.1:9080 (a few generated patients), then `fhirgate gateway --config examples/demo.yaml`
on :8000 with its status listener (Prometheus metrics) on 127.0.0.1:8100.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

UPSTREAM = ("127.0.0.1", 9080)

_FAMILIES = ["Chalmers", "Okafor", "Nguyen", "Garcia", "Kowalski"]
_GIVEN = ["Peter", "Amaka", "Linh", "Lucia", "Marek"]


def demo_patients() -> dict[str, dict[str, Any]]:
    """Deterministic synthetic patients (no real person)."""
    out: dict[str, dict[str, Any]] = {}
    for i, (family, given) in enumerate(zip(_FAMILIES, _GIVEN, strict=True), start=1):
        pid = f"demo-{i}"
        out[pid] = {
            "resourceType": "Patient",
            "id": pid,
            "meta": {"versionId": "1", "lastUpdated": "2026-01-01T00:00:00Z"},
            "identifier": [{"system": "urn:fhirgate:demo:mrn", "value": f"MRN-{1000 + i}"}],
            "name": [{"use": "official", "family": family, "given": [given]}],
            "gender": "female" if i % 2 == 0 else "male",
            "birthDate": f"19{60 + i * 5}-0{i}-1{i}",
        }
    return out


class _FhirUpstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    patients = demo_patients()

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/fhir/metadata":
            self._send(
                200,
                {
                    "resourceType": "CapabilityStatement",
                    "status": "active",
                    "fhirVersion": "4.0.1",
                    "kind": "instance",
                    "format": ["json"],
                },
            )
        elif path == "/fhir/Patient":
            entries = [{"resource": p, "fullUrl": f"Patient/{p['id']}"} for p in self.patients.values()]
            self._send(
                200, {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries}
            )
        elif path.startswith("/fhir/Patient/") and path.count("/") == 3:
            patient = self.patients.get(path.rsplit("/", 1)[1])
            if patient is None:
                self._send(
                    404,
                    {
                        "resourceType": "OperationOutcome",
                        "issue": [
                            {"severity": "error", "code": "not-found", "diagnostics": "Patient not found"}
                        ],
                    },
                )
            else:
                self._send(200, patient)
        else:
            self._send(
                404,
                {
                    "resourceType": "OperationOutcome",
                    "issue": [
                        {
                            "severity": "error",
                            "code": "not-supported",
                            "diagnostics": f"{path} is not served by the demo",
                        }
                    ],
                },
            )


def main() -> int:
    upstream = ThreadingHTTPServer(UPSTREAM, _FhirUpstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    config = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"
    if not config.exists():
        config = Path("examples/demo.yaml")
    print("demo FHIR upstream on http://127.0.0.1:9080/fhir (5 synthetic patients)")
    print("try:")
    print("  curl -i http://localhost:8000/fhir/Patient/demo-1")
    print("  curl -i http://localhost:8000/fhir/Patient")
    print("  curl -i http://localhost:8000/nowhere              # 404, Kong-style JSON")
    print("  curl -s http://127.0.0.1:8100/metrics | grep kong_http_requests_total")
    print("Ctrl-C stops everything.\n", flush=True)
    cmd = [
        sys.executable,
        "-m",
        "fhirgate.cli.main",
        "gateway",
        "--config",
        str(config),
        "--listen",
        "0.0.0.0:8000",
        "--status-listen",
        "127.0.0.1:8100",
        "--access-log",
        "stdout",
    ]
    proc = subprocess.Popen(cmd, env={**os.environ})
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        return proc.wait()
    finally:
        upstream.shutdown()


if __name__ == "__main__":
    sys.exit(main())
