"""The authorization server's store on the shared `Backend` (SQLite by default, PostgreSQL at scale).

Its schema is a list of numbered migrations recorded in `auth_schema` (`fhirgate.storage.migrations`);
later parts append clients, users, codes, refresh tokens, consents and `jti` replay entries as new
migrations. Never edit a released migration: append a new one.

`auth_key` holds the signing keys (`keys.KeyRing`): the private key as PKCS#8 PEM, its public JWK
(public members only, as published in `/jwks`), when it was created and when it was retired
(milliseconds since the epoch; `retired_at` is NULL while the key signs).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fhirgate.storage import migrations
from fhirgate.storage.backend import Backend, Connection, Row, open_backend

__all__ = [
    "MIGRATIONS",
    "SCHEMA_TABLE",
    "AuthSession",
    "AuthStore",
    "StoredKey",
    "current_version",
    "migrate",
]

SCHEMA_TABLE = "auth_schema"

#: PostgreSQL advisory locks of this store (`pg_advisory_xact_lock`): migrations, and key creation
#: (two nodes starting at once must not both create an active key).
MIGRATION_LOCK_ID = 7245118
KEYS_LOCK_ID = 7245119

MIGRATIONS: Sequence[Sequence[str]] = (
    # 1: signing keys
    (
        """CREATE TABLE auth_key (
            kid TEXT NOT NULL PRIMARY KEY,
            alg TEXT NOT NULL,
            private_pem TEXT NOT NULL,
            public_jwk TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            retired_at BIGINT)""",
        "CREATE INDEX auth_key_alg ON auth_key (alg, retired_at)",
    ),
)

_KEY_COLUMNS = "kid, alg, private_pem, public_jwk, created_at, retired_at"


@dataclass(frozen=True, slots=True)
class StoredKey:
    """One row of `auth_key`."""

    kid: str
    alg: str
    private_pem: str
    public_jwk: str
    created_at: int
    retired_at: int | None

    @property
    def active(self) -> bool:
        return self.retired_at is None


def _key(row: Row) -> StoredKey:
    kid, alg, pem, jwk, created, retired = row
    return StoredKey(kid, alg, pem, jwk, int(created), None if retired is None else int(retired))


class AuthSession:
    """The store's statements on one connection, inside a `read` or `write` block (`conn` is
    there for what has no method yet)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def lock_keys(self) -> None:
        """Serialise key creation across nodes for the rest of this write transaction (on SQLite
        the write transaction, BEGIN IMMEDIATE, already holds the database's one write lock)."""
        if self.conn.dialect == "postgresql":
            await self.conn.execute("SELECT pg_advisory_xact_lock(?)", (KEYS_LOCK_ID,))

    async def keys(self, alg: str | None = None) -> list[StoredKey]:
        """Every key (of `alg`), newest first."""
        if alg is None:
            rows = await self.conn.fetch(f"SELECT {_KEY_COLUMNS} FROM auth_key ORDER BY created_at DESC, kid")
        else:
            rows = await self.conn.fetch(
                f"SELECT {_KEY_COLUMNS} FROM auth_key WHERE alg = ? ORDER BY created_at DESC, kid", (alg,)
            )
        return [_key(row) for row in rows]

    async def active_keys(self, alg: str) -> list[StoredKey]:
        """The keys of `alg` not retired, newest first."""
        rows = await self.conn.fetch(
            f"SELECT {_KEY_COLUMNS} FROM auth_key WHERE alg = ? AND retired_at IS NULL "
            "ORDER BY created_at DESC, kid",
            (alg,),
        )
        return [_key(row) for row in rows]

    async def insert_key(self, key: StoredKey) -> None:
        await self.conn.execute(
            f"INSERT INTO auth_key ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
            (key.kid, key.alg, key.private_pem, key.public_jwk, key.created_at, key.retired_at),
        )

    async def retire_keys(self, alg: str, at_ms: int) -> int:
        """Retire every active key of `alg`; returns how many."""
        return await self.conn.execute(
            "UPDATE auth_key SET retired_at = ? WHERE alg = ? AND retired_at IS NULL", (at_ms, alg)
        )

    async def delete_retired_before(self, cutoff_ms: int) -> int:
        """Delete the keys retired at or before `cutoff_ms`; returns how many."""
        return await self.conn.execute(
            "DELETE FROM auth_key WHERE retired_at IS NOT NULL AND retired_at <= ?", (cutoff_ms,)
        )


class AuthStore:
    """`await AuthStore.open(url)`, then `async with store.write() as s` (one atomic write
    transaction) or `store.read()`; `await store.close()` at the end."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @classmethod
    async def open(cls, url: str) -> AuthStore:
        """Open `sqlite:///path.db` or `postgresql://...`, creating or migrating the schema."""
        backend = await open_backend(url)
        try:
            async with backend.transaction() as conn:
                await migrate(conn)
        except BaseException:
            await backend.close()
            raise
        return cls(backend)

    @property
    def url(self) -> str:
        return self.backend.url

    @property
    def dialect(self) -> str:
        return self.backend.dialect

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AuthSession]:
        async with self.backend.transaction() as conn:
            yield AuthSession(conn)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AuthSession]:
        async with self.backend.reader() as conn:
            yield AuthSession(conn)

    async def close(self) -> None:
        await self.backend.close()


async def migrate(conn: Connection) -> tuple[int, int]:
    """Apply the missing migrations in the caller's transaction; returns (from, to)."""
    return await migrations.apply(conn, SCHEMA_TABLE, MIGRATIONS, lock_id=MIGRATION_LOCK_ID)


async def current_version(conn: Connection) -> int:
    return await migrations.current_version(conn, SCHEMA_TABLE)
