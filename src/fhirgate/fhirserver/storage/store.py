"""The FHIR store: resources, versions, search index and compartments on one `Backend`.

Every write (resource row, version row, index rows, compartment rows) happens in one database
transaction. Index rows of a transaction are buffered and written with one `executemany` per table
when the transaction commits or before it searches (a transaction Bundle of 500 resources costs 7
batched inserts, not 3,500 statements). Reads serve the stored JSON bytes: no model objects.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

import orjson

from fhirgate import clock
from fhirgate.fhirserver.errors import FhirError, conflict
from fhirgate.fhirserver.http import dumps_exact
from fhirgate.fhirserver.indexing import Indexer
from fhirgate.fhirserver.model import IndexRows, SearchQuery
from fhirgate.fhirserver.storage import schema, sqlsearch
from fhirgate.fhirserver.storage.schema import INDEX_TABLES, migrate
from fhirgate.storage.backend import Backend, Connection, open_backend

_INSERTS = {
    table: f"INSERT INTO {table} (pid, param, {', '.join(cols)}) VALUES ({', '.join('?' * (len(cols) + 2))})"
    for table, cols in INDEX_TABLES.items()
}
_ROW_FIELDS = (
    ("fhir_string", "strings"),
    ("fhir_token", "tokens"),
    ("fhir_date", "dates"),
    ("fhir_number", "numbers"),
    ("fhir_quantity", "quantities"),
    ("fhir_uri", "uris"),
    ("fhir_reference", "references"),
)


def iso_instant(ms: int) -> str:
    """FHIR instant with milliseconds, UTC."""
    seconds, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


@dataclass(slots=True)
class Stored:
    """One version of a resource as stored; `body` is None for a version that records a delete."""

    pid: int
    type: str
    id: str
    version: int
    last_updated: int
    body: bytes | None
    method: str = "PUT"

    @property
    def deleted(self) -> bool:
        return self.body is None

    @property
    def etag(self) -> str:
        return f'W/"{self.version}"'

    @property
    def last_modified(self) -> str:
        return formatdate(self.last_updated / 1000, usegmt=True)

    @property
    def last_updated_iso(self) -> str:
        return iso_instant(self.last_updated)

    @property
    def reference(self) -> str:
        return f"{self.type}/{self.id}"


@dataclass(slots=True)
class SearchPage:
    matches: list[Stored]
    included: list[Stored]
    total: int | None
    has_next: bool
    warnings: list[str]


class Session:
    """Operations on one connection: a write transaction or a read snapshot."""

    def __init__(self, conn: Connection, indexer: Indexer, writable: bool) -> None:
        self.conn = conn
        self.indexer = indexer
        self.writable = writable
        self._pending: dict[str, list[tuple[Any, ...]]] = {t: [] for t in INDEX_TABLES}
        self._pending_compartments: list[tuple[int, str]] = []
        self._dirty = False

    # ---- reads -------------------------------------------------------------------------------

    async def current(self, rtype: str, rid: str) -> Stored | None:
        row = await self.conn.fetchrow(
            "SELECT r.pid, r.version, r.last_updated, v.body, v.method FROM fhir_resource r "
            "JOIN fhir_version v ON v.pid = r.pid AND v.version = r.version WHERE r.type = ? AND r.id = ?",
            (rtype, rid),
        )
        if row is None:
            return None
        return Stored(row[0], rtype, rid, row[1], row[2], _bytes(row[3]), row[4])

    async def version(self, rtype: str, rid: str, version: int) -> Stored | None:
        row = await self.conn.fetchrow(
            "SELECT v.pid, v.last_updated, v.body, v.method FROM fhir_version v "
            "JOIN fhir_resource r ON r.pid = v.pid WHERE r.type = ? AND r.id = ? AND v.version = ?",
            (rtype, rid, version),
        )
        if row is None:
            return None
        return Stored(row[0], rtype, rid, version, row[1], _bytes(row[2]), row[3])

    async def by_pids(self, pids: Sequence[int]) -> list[Stored]:
        """Current versions of these resources, in the order given (deleted ones left out)."""
        if not pids:
            return []
        found: dict[int, Stored] = {}
        for start in range(0, len(pids), 500):
            chunk = pids[start : start + 500]
            rows = await self.conn.fetch(
                "SELECT r.pid, r.type, r.id, r.version, r.last_updated, v.body FROM fhir_resource r "
                "JOIN fhir_version v ON v.pid = r.pid AND v.version = r.version "
                f"WHERE r.deleted = 0 AND r.pid IN ({', '.join('?' * len(chunk))})",
                chunk,
            )
            for r in rows:
                found[r[0]] = Stored(r[0], r[1], r[2], r[3], r[4], _bytes(r[5]))
        return [found[p] for p in pids if p in found]

    async def history(
        self,
        rtype: str | None,
        rid: str | None,
        since: int | None,
        at: int | None,
        count: int,
        offset: int,
    ) -> tuple[list[Stored], int]:
        """Versions newest first (R4 http.html §3.1.0.11), one page, and the total."""
        where: list[str] = []
        args: list[Any] = []
        if rtype is not None:
            where.append("v.type = ?")
            args.append(rtype)
        if rid is not None:
            where.append("v.id = ?")
            args.append(rid)
        if since is not None:
            where.append("v.last_updated >= ?")
            args.append(since)
        if at is not None:
            where.append("v.last_updated <= ?")
            args.append(at)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        total_row = await self.conn.fetchrow(f"SELECT COUNT(*) FROM fhir_version v {clause}", args)
        rows = await self.conn.fetch(
            "SELECT v.pid, v.type, v.id, v.version, v.last_updated, v.body, v.method FROM fhir_version v "
            f"{clause} ORDER BY v.last_updated DESC, v.pid DESC, v.version DESC LIMIT ? OFFSET ?",
            [*args, count, offset],
        )
        items = [Stored(r[0], r[1], r[2], r[3], r[4], _bytes(r[5]), r[6]) for r in rows]
        return items, int(total_row[0]) if total_row else 0

    async def search(self, query: SearchQuery, max_include: int = 1000) -> SearchPage:
        await self.flush()
        return await sqlsearch.run(self, query, max_include)

    async def find_ids(self, query: SearchQuery, limit: int = 2) -> list[Stored]:
        """Matches of a conditional URL (If-None-Exist, conditional update/delete/reference)."""
        await self.flush()
        query.count = limit
        query.offset = 0
        page = await sqlsearch.run(self, query, 0)
        return page.matches

    async def everything(
        self, patient_id: str, types: Sequence[str], since: int | None, count: int, offset: int
    ) -> tuple[list[Stored], int]:
        return await sqlsearch.everything(self, patient_id, types, since, count, offset)

    # ---- writes ------------------------------------------------------------------------------

    async def create(self, resource: dict[str, Any], rid: str | None = None, method: str = "POST") -> Stored:
        """A new logical resource, version 1 (server-assigned id unless `rid` is given)."""
        assert self.writable
        rtype = resource["resourceType"]
        rid = rid or str(uuid.uuid4())
        ms = _now_ms()
        body = _stamp(resource, rid, 1, ms)
        try:
            pid = await self.conn.insert_returning_id(
                "INSERT INTO fhir_resource (type, id, version, last_updated, deleted) VALUES (?, ?, 1, ?, 0)",
                (rtype, rid, ms),
            )
        except Exception as exc:
            if _is_unique_violation(exc):
                raise conflict(
                    409, f"{rtype}/{rid} was created concurrently by another request; retry"
                ) from None
            raise
        await self.conn.execute(
            "INSERT INTO fhir_version (pid, version, type, id, last_updated, method, body) "
            "VALUES (?, 1, ?, ?, ?, ?, ?)",
            (pid, rtype, rid, ms, method, body),
        )
        self._queue_index(pid, resource)
        return Stored(pid, rtype, rid, 1, ms, body, method)

    async def update(
        self, resource: dict[str, Any], rid: str, if_match: int | None = None, method: str = "PUT"
    ) -> tuple[Stored, bool]:
        """Update (or create with the client's id); returns (stored, created)."""
        assert self.writable
        rtype = resource["resourceType"]
        row = await self._lock_current(rtype, rid)
        if row is None:
            if if_match is not None:
                raise conflict(
                    412,
                    f'If-Match W/"{if_match}" given but {rtype}/{rid} does not exist; '
                    "remove If-Match to create it",
                )
            return await self.create(resource, rid, method), True
        pid, version, deleted = row
        if if_match is not None and if_match != version:
            raise conflict(
                412,
                f'Version conflict: If-Match W/"{if_match}" but the current version of {rtype}/{rid} is '
                f'W/"{version}"; read it again and reapply your change',
            )
        new_version = version + 1
        ms = _now_ms()
        body = _stamp(resource, rid, new_version, ms)
        changed = await self.conn.execute(
            "UPDATE fhir_resource SET version = ?, last_updated = ?, deleted = 0 "
            "WHERE pid = ? AND version = ?",
            (new_version, ms, pid, version),
        )
        if changed != 1:
            raise conflict(
                409, f"{rtype}/{rid} was changed concurrently by another request; read it and retry"
            )
        await self.conn.execute(
            "INSERT INTO fhir_version (pid, version, type, id, last_updated, method, body) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (pid, new_version, rtype, rid, ms, method, body),
        )
        if not deleted:
            await self._drop_index(pid)
        self._queue_index(pid, resource)
        return Stored(pid, rtype, rid, new_version, ms, body, method), bool(deleted)

    async def delete(self, rtype: str, rid: str, if_match: int | None = None) -> Stored | None:
        """Delete the current version (a new version that records the delete); None if there was
        nothing to delete (R4: deleting a missing or deleted resource succeeds)."""
        assert self.writable
        row = await self._lock_current(rtype, rid)
        if row is None or row[2]:
            if if_match is not None and row is None:
                raise conflict(412, f"If-Match given but {rtype}/{rid} does not exist")
            return None
        pid, version, _ = row
        if if_match is not None and if_match != version:
            raise conflict(
                412, f'Version conflict: If-Match W/"{if_match}" but {rtype}/{rid} is at W/"{version}"'
            )
        ms = _now_ms()
        changed = await self.conn.execute(
            "UPDATE fhir_resource SET version = ?, last_updated = ?, deleted = 1 "
            "WHERE pid = ? AND version = ?",
            (version + 1, ms, pid, version),
        )
        if changed != 1:
            raise conflict(409, f"{rtype}/{rid} was changed concurrently by another request; retry")
        await self.conn.execute(
            "INSERT INTO fhir_version (pid, version, type, id, last_updated, method, body) "
            "VALUES (?, ?, ?, ?, ?, 'DELETE', NULL)",
            (pid, version + 1, rtype, rid, ms),
        )
        await self._drop_index(pid)
        return Stored(pid, rtype, rid, version + 1, ms, None, "DELETE")

    async def _lock_current(self, rtype: str, rid: str) -> tuple[int, int, int] | None:
        suffix = " FOR UPDATE" if self.conn.dialect == "postgresql" else ""
        row = await self.conn.fetchrow(
            f"SELECT pid, version, deleted FROM fhir_resource WHERE type = ? AND id = ?{suffix}", (rtype, rid)
        )
        return None if row is None else (int(row[0]), int(row[1]), int(row[2]))

    def _queue_index(self, pid: int, resource: dict[str, Any]) -> None:
        rows: IndexRows = self.indexer.extract(resource)
        for table, attr in _ROW_FIELDS:
            values = getattr(rows, attr)
            if values:
                pending = self._pending[table]
                pending.extend((pid, *v) for v in values)
        self._pending_compartments.extend((pid, patient) for patient in rows.compartments)
        self._dirty = True

    async def _drop_index(self, pid: int) -> None:
        await self.flush()
        for table in INDEX_TABLES:
            await self.conn.execute(f"DELETE FROM {table} WHERE pid = ?", (pid,))
        await self.conn.execute("DELETE FROM fhir_compartment WHERE pid = ?", (pid,))

    async def flush(self) -> None:
        if not self._dirty:
            return
        for table, rows in self._pending.items():
            if rows:
                await self.conn.executemany(_INSERTS[table], rows)
                rows.clear()
        if self._pending_compartments:
            await self.conn.executemany(
                "INSERT INTO fhir_compartment (pid, patient_id) VALUES (?, ?)", self._pending_compartments
            )
            self._pending_compartments.clear()
        self._dirty = False


class FhirStore:
    def __init__(self, backend: Backend, indexer: Indexer) -> None:
        self.backend = backend
        self.indexer = indexer

    @classmethod
    async def open(
        cls,
        url: str,
        base_url: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> FhirStore:
        """Open (creating or migrating) a store; rebuild its index first if it was built by older
        indexing rules (`progress(done, total)` is told how far that is)."""
        backend = await open_backend(url)
        try:
            async with backend.transaction() as conn:
                await migrate(conn)
                stale = await schema.index_version(conn) != schema.INDEX_VERSION
            store = cls(backend, Indexer(base_url=base_url))
            if stale:
                await store.reindex(progress)
        except BaseException:
            await backend.close()
            raise
        return store

    async def reindex(self, progress: Callable[[int, int], None] | None = None, batch: int = 500) -> int:
        """Rebuild every current resource's index rows and compartments from its stored JSON, in
        batches of `batch` resources per transaction, then record the index version. Interrupted,
        it starts again on the next open; searches stay correct for the batches already done."""
        async with self.read() as s:
            row = await s.conn.fetchrow("SELECT COUNT(*), MAX(pid) FROM fhir_resource WHERE deleted = 0")
        total = int(row[0]) if row else 0
        done = 0
        last = 0
        while True:
            async with self.write() as s:
                rows = await s.conn.fetch(
                    "SELECT r.pid, v.body FROM fhir_resource r JOIN fhir_version v "
                    "ON v.pid = r.pid AND v.version = r.version "
                    "WHERE r.deleted = 0 AND r.pid > ? ORDER BY r.pid LIMIT ?",
                    (last, batch),
                )
                if not rows:
                    await s.conn.execute("UPDATE fhir_schema SET index_version = ?", (schema.INDEX_VERSION,))
                    break
                pids = [int(r[0]) for r in rows]
                marks = ", ".join("?" * len(pids))
                for table in (*INDEX_TABLES, "fhir_compartment"):
                    await s.conn.execute(f"DELETE FROM {table} WHERE pid IN ({marks})", pids)
                for pid, body in rows:
                    s._queue_index(int(pid), orjson.loads(bytes(body)))
                last = pids[-1]
            done += len(rows)
            if progress is not None:
                progress(done, total)
        return done

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Session]:
        async with self.backend.transaction() as conn:
            session = Session(conn, self.indexer, writable=True)
            yield session
            await session.flush()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Session]:
        async with self.backend.reader() as conn:
            yield Session(conn, self.indexer, writable=False)

    async def close(self) -> None:
        await self.backend.close()


def _now_ms() -> int:
    return int(clock.now() * 1000)


def _stamp(resource: dict[str, Any], rid: str, version: int, ms: int) -> bytes:
    """Set id and the server-owned meta elements (R4 resource.html §2.36.0.4), then serialise."""
    meta = resource.get("meta")
    meta = dict(meta) if isinstance(meta, dict) else {}
    meta["versionId"] = str(version)
    meta["lastUpdated"] = iso_instant(ms)
    resource["id"] = rid
    resource["meta"] = meta
    # resourceType first, as FHIR JSON convention and human readers expect.
    ordered = {"resourceType": resource["resourceType"], "id": rid, "meta": meta}
    ordered.update(resource)
    return dumps_exact(ordered)


def _bytes(value: Any) -> bytes | None:
    if value is None:
        return None
    return bytes(value)


def _is_unique_violation(exc: Exception) -> bool:
    name = type(exc).__name__
    return name in ("IntegrityError", "UniqueViolationError")


__all__ = ["FhirError", "FhirStore", "SearchPage", "Session", "Stored", "iso_instant"]
