"""Database backends behind one small protocol: SQLite (default) and PostgreSQL (asyncpg pool).

Storage code is written once against `Connection`, with `?` placeholders; the PostgreSQL backend
rewrites them to `$n` once per statement text. SQLite calls run inline on the event loop: each is
a short, local call, and a thread hop per call (aiosqlite's design) costs more than the call
itself (issue 4, "speed traps"). Because an inline SQLite call never yields, a write transaction
on one connection is never interleaved with another coroutine's statements; a lock makes that
explicit. Concurrency comes from processes; SQLite's WAL lets readers run beside the one writer.
A write transaction that finds another process holding SQLite's write lock does not wait for it on
the event loop: `BEGIN IMMEDIATE` fails fast (a short `busy_timeout`) and is retried after an
asynchronous sleep, so the loop keeps serving while it waits.

`statement()` is a connection for one statement that is its own transaction (a lookup by key, an
`INSERT ... ON CONFLICT DO NOTHING`): on PostgreSQL it saves the `BEGIN` and `COMMIT` round trips
of `reader()`/`transaction()`. PostgreSQL connections go back to the pool without asyncpg's reset
query (`RESET ALL`, `CLOSE ALL`, `UNLISTEN *`, `pg_advisory_unlock_all()`: one more round trip per
use), so storage code must leave no session state behind: `SET LOCAL`, never `SET`; transaction
advisory locks (`pg_advisory_xact_lock`), never session ones; no `LISTEN`, no `WITH HOLD` cursors.
An open transaction is still rolled back when a connection is released.
"""

from __future__ import annotations

import asyncio
import random
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from fhirgate.errors import FhirgateError

Row = tuple[Any, ...]


class DatabaseUrlError(FhirgateError):
    """A `--database` URL fhirgate cannot use."""


class Connection(Protocol):
    dialect: str

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run a statement; returns the number of rows it changed."""
        ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]: ...

    async def fetchrow(self, sql: str, args: Sequence[Any] = ()) -> Row | None: ...

    async def insert_returning_id(self, sql: str, args: Sequence[Any]) -> int:
        """Run an INSERT into a table with an integer key and return the new key."""
        ...


class Backend(Protocol):
    dialect: str
    url: str

    def transaction(self) -> Any:
        """`async with backend.transaction() as conn`: one atomic write transaction."""
        ...

    def reader(self) -> Any:
        """`async with backend.reader() as conn`: a connection for reads (no transaction)."""
        ...

    def statement(self, write: bool = False) -> Any:
        """`async with backend.statement(write) as conn`: a connection for ONE statement, which is
        atomic by itself (no snapshot or transaction spans statements)."""
        ...

    async def close(self) -> None: ...


# ---- SQLite --------------------------------------------------------------------------------------

#: bytes of write-ahead log kept between checkpoints
WAL_LIMIT = 64 * 1024 * 1024
#: how long a writer waits in all for another process's write lock before it fails
BUSY_TIMEOUT_MS = 10_000
#: how long one SQLite call may block the event loop waiting for a lock (`PRAGMA busy_timeout`);
#: `BEGIN IMMEDIATE` is retried after asynchronous sleeps until BUSY_TIMEOUT_MS has passed
LOOP_BUSY_TIMEOUT_MS = 2
#: first and longest sleep between two `BEGIN IMMEDIATE` attempts (seconds; doubled, jittered)
BUSY_RETRY_FIRST = 0.0005
BUSY_RETRY_MAX = 0.02


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


class SqliteConnection:
    dialect = "sqlite"

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self._db.execute(sql, args).rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._db.executemany(sql, rows)

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return self._db.execute(sql, args).fetchall()

    async def fetchrow(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        row: Row | None = self._db.execute(sql, args).fetchone()
        return row

    async def insert_returning_id(self, sql: str, args: Sequence[Any]) -> int:
        cursor = self._db.execute(sql, args)
        assert cursor.lastrowid is not None
        return cursor.lastrowid


class SqliteBackend:
    """One SQLite file in WAL mode. `synchronous=NORMAL` by default: a process crash loses no
    committed transaction in WAL mode; `synchronous=FULL` (the `?synchronous=full` URL option)
    also survives power loss, at the cost the benchmark reports."""

    dialect = "sqlite"

    def __init__(self, path: str, synchronous: str = "normal") -> None:
        self.url = f"sqlite:///{path}"
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
        self._db.execute(f"PRAGMA busy_timeout={LOOP_BUSY_TIMEOUT_MS}")
        self._db.execute("PRAGMA foreign_keys=OFF")
        self._db.execute("PRAGMA cache_size=-65536")  # 64 MiB page cache
        self._db.execute("PRAGMA temp_store=MEMORY")
        self._db.execute("PRAGMA mmap_size=268435456")
        # After a checkpoint the WAL is cut back to this size instead of keeping its peak.
        self._db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
        self._wal = None if path == ":memory:" else Path(f"{path}-wal")
        self._commits = 0
        self._conn = SqliteConnection(self._db)
        self._lock = asyncio.Lock()

    async def _begin_immediate(self) -> None:
        """`BEGIN IMMEDIATE`, waiting for another process's write lock with asynchronous sleeps
        (an attempt blocks the loop at most LOOP_BUSY_TIMEOUT_MS, a lock held that briefly costs
        no timer); SQLITE_BUSY after BUSY_TIMEOUT_MS in all, as a long busy_timeout would."""
        deadline = 0.0
        delay = BUSY_RETRY_FIRST
        while True:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                now = time.monotonic()
                if not deadline:
                    deadline = now + BUSY_TIMEOUT_MS / 1000
                elif now >= deadline:
                    raise
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, BUSY_RETRY_MAX)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteConnection]:
        async with self._lock:
            # IMMEDIATE takes the write lock now, so two processes never both read a version
            # and then both write it (no lost update); another process's writer is waited for
            # with asynchronous sleeps (`_begin_immediate`), not on the event loop.
            await self._begin_immediate()
            try:
                yield self._conn
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            self._commits += 1
            if self._commits % 64 == 0:
                self._bound_wal()

    def _bound_wal(self) -> None:
        """Keep the WAL from growing without bound. SQLite's automatic checkpoints copy pages
        back but cannot restart the log while other workers keep reading, so under steady load
        it grew to gigabytes (bench/fhir_bench.py); past `WAL_LIMIT`, a TRUNCATE checkpoint resets
        it when no reader is left in it."""
        try:
            size = self._wal.stat().st_size if self._wal is not None else 0
        except OSError:
            return
        if size > WAL_LIMIT:
            # Never wait for readers here (this runs on the event loop): with a reader still in
            # the log the checkpoint does what it can and the next check tries again.
            self._db.execute("PRAGMA busy_timeout=0")
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            finally:
                self._db.execute(f"PRAGMA busy_timeout={LOOP_BUSY_TIMEOUT_MS}")

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[SqliteConnection]:
        async with self._lock:
            # One snapshot for all statements of a read (a search and its includes).
            self._db.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._db.execute("COMMIT")

    def statement(self, write: bool = False) -> Any:
        """A write is a `transaction()` (its `BEGIN IMMEDIATE` waits for another process's
        writer asynchronously), a read a `reader()`: both are inline calls, without round trips."""
        return self.transaction() if write else self.reader()

    async def close(self) -> None:
        self._db.close()


# ---- PostgreSQL ----------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\?")


class PostgresConnection:
    dialect = "postgresql"

    def __init__(self, conn: Any, cache: dict[str, str]) -> None:
        self._conn = conn
        self._cache = cache

    def _sql(self, sql: str) -> str:
        converted = self._cache.get(sql)
        if converted is None:
            counter = iter(range(1, 1 << 16))
            converted = _PLACEHOLDER.sub(lambda _m: f"${next(counter)}", sql)
            self._cache[sql] = converted
        return converted

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        status: str = await self._conn.execute(self._sql(sql), *args)
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if rows:
            await self._conn.executemany(self._sql(sql), rows)

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return [tuple(r) for r in await self._conn.fetch(self._sql(sql), *args)]

    async def fetchrow(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        row = await self._conn.fetchrow(self._sql(sql), *args)
        return None if row is None else tuple(row)

    async def insert_returning_id(self, sql: str, args: Sequence[Any]) -> int:
        value: int = await self._conn.fetchval(self._sql(sql + " RETURNING pid"), *args)
        return value


class PostgresBackend:
    dialect = "postgresql"

    def __init__(self, url: str, pool: Any) -> None:
        self.url = url
        self._pool = pool
        self._sql_cache: dict[str, str] = {}

    @classmethod
    async def connect(cls, url: str, min_size: int = 1, max_size: int = 10) -> PostgresBackend:
        import asyncpg

        parts = urlsplit(url)
        query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
        # Plan each search for its values: a generic plan cached for a prepared statement once
        # started a patient's search from the category index (70 ms against 2 ms).
        server_settings = {"plan_cache_mode": "force_custom_plan"}
        if "schema" in query:
            server_settings["search_path"] = unquote(query.pop("schema"))
        dsn = parts._replace(query="&".join(f"{k}={v}" for k, v in query.items())).geturl()
        dsn = dsn.replace("postgresql+asyncpg://", "postgresql://", 1)
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            server_settings=server_settings,
            # no reset query on release (see the module docstring); asyncpg still rolls back an
            # open transaction first
            reset=_no_reset,
        )
        return cls(url, pool)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresConnection]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield PostgresConnection(conn, self._sql_cache)

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[PostgresConnection]:
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            yield PostgresConnection(conn, self._sql_cache)

    @asynccontextmanager
    async def statement(self, write: bool = False) -> AsyncIterator[PostgresConnection]:
        """No BEGIN/COMMIT: the statement runs in its own implicit transaction (one round trip)."""
        async with self._pool.acquire() as conn:
            yield PostgresConnection(conn, self._sql_cache)

    async def close(self) -> None:
        await self._pool.close()


async def _no_reset(_conn: Any) -> None:
    """The pool's `reset`: nothing to undo (storage code keeps no session state)."""
    return None


async def open_backend(url: str) -> SqliteBackend | PostgresBackend:
    """`sqlite:///path/to/file.db[?synchronous=full]` or `postgresql://user@host/db[?schema=s]`."""
    if url.startswith("sqlite:"):
        parts = urlsplit(url)
        path = unquote(parts.path)
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            path = path[1:]  # sqlite:///relative.db (SQLAlchemy's convention); //// is absolute
        if not path:
            raise DatabaseUrlError(f"{url}: no database file (expected sqlite:///path/to/file.db)")
        query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
        sync = query.get("synchronous", "normal").lower()
        if sync not in ("normal", "full"):
            raise DatabaseUrlError(f"{url}: synchronous must be 'normal' or 'full', not {sync!r}")
        return SqliteBackend(path, sync)
    if url.startswith(("postgresql:", "postgres:", "postgresql+asyncpg:")):
        return await PostgresBackend.connect(url)
    raise DatabaseUrlError(
        f"unsupported database URL {url!r}: use sqlite:///path/to/file.db or postgresql://user@host/db"
    )
