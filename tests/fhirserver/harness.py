"""A real FHIR server (uvicorn + httptools, in a background thread) on an ephemeral port, over
SQLite or PostgreSQL, and an httpx client for black-box tests.

PostgreSQL servers get a schema of their own (`?schema=`), dropped afterwards, in the local
server's `test` database (the one CI starts)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from fhirgate.fhirserver.api import FhirServer

PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
BACKENDS = ("sqlite", "postgresql")
SYNTHEA = Path(__file__).resolve().parents[3] / "shared" / "data" / "synthea"
FHIR_JSON = {"Content-Type": "application/fhir+json"}


async def _pg(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.contextmanager
def database(backend: str, tmp: Path) -> Iterator[str]:
    """A fresh, empty database URL for `backend`."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp / f'fhir-{uuid.uuid4().hex[:8]}.db'}"
        return
    schema = f"fhirtest_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg(f"CREATE SCHEMA {schema}"))
    try:
        yield f"{PG_DSN}?schema={schema}"
    finally:
        asyncio.run(_pg(f"DROP SCHEMA {schema} CASCADE"))


@dataclass
class RunningFhir:
    base: str
    client: httpx.Client
    app: FhirServer
    backend: str

    def create(self, resource: dict[str, Any]) -> dict[str, Any]:
        r = self.client.post(f"/{resource['resourceType']}", json=resource, headers=FHIR_JSON)
        assert r.status_code == 201, r.text
        created: dict[str, Any] = r.json()
        return created

    def search(self, query: str, **headers: str) -> dict[str, Any]:
        r = self.client.get(f"/{query}", headers=headers)
        assert r.status_code == 200, r.text
        bundle: dict[str, Any] = r.json()
        return bundle

    def ids(self, query: str) -> list[str]:
        bundle = self.search(query)
        return [
            e["resource"]["id"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == "match"
        ]


@contextlib.contextmanager
def running_fhir(database_url: str, backend: str = "sqlite", **options: Any) -> Iterator[RunningFhir]:
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only then, and without
    # it every kept-alive response waits for a delayed ACK (~40 ms).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    app = FhirServer(database_url=database_url, base_url=base, **options)
    config = uvicorn.Config(
        app, lifespan="on", log_level="warning", http="httptools", loop="asyncio", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("FHIR server did not start")
        time.sleep(0.01)
    client = httpx.Client(base_url=base, timeout=30)
    try:
        yield RunningFhir(base, client, app, backend)
    finally:
        client.close()
        server.should_exit = True
        thread.join(15)
        sock.close()
