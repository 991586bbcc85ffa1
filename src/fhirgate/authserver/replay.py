"""Client assertion `jti` replay protection (RFC 7523 §3 item 7, SMART Backend Services).

A `jti` is accepted once per client, ever: the registry remembers it until the assertion would
have expired anyway (after that the assertion is refused for its `exp`). Two implementations behind
one small protocol, both atomic check-and-set, so two nodes receiving the same assertion at the
same moment accept it once:

- `StoreReplay`: the `auth_jti` table of the authorization server's store (SQLite or PostgreSQL),
  `INSERT ... ON CONFLICT DO NOTHING` as a statement of its own (`Backend.statement`); expired rows
  are deleted by the server's housekeeping.
- `RedisReplay`: `SET key 1 NX PXAT expires_at` in Redis, when `redis_url` is configured: the
  entry is short-lived and Redis expires it by itself.

`tests/authserver/test_replay.py` runs one contract suite against SQLite, PostgreSQL and Redis.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

from fhirgate.authserver.store import AuthSession, AuthStore

__all__ = ["RedisReplay", "ReplayRegistry", "StoreReplay", "open_replay"]


class ReplayRegistry(Protocol):
    async def remember(self, client_id: str, jti: str, expires_at_ms: int) -> bool:
        """Record `jti` for `client_id` until `expires_at_ms`; False when it was seen before."""
        ...

    async def close(self) -> None: ...


class StoreReplay:
    def __init__(self, store: AuthStore) -> None:
        self.store = store

    async def remember(self, client_id: str, jti: str, expires_at_ms: int) -> bool:
        # one statement, atomic by itself (its own transaction): on PostgreSQL one round trip
        # instead of BEGIN/INSERT/COMMIT; on SQLite a BEGIN IMMEDIATE transaction as before
        async with self.store.backend.statement(write=True) as conn:
            return await AuthSession(conn).remember_jti(client_id, jti, expires_at_ms)

    async def close(self) -> None:
        return None


class RedisReplay:
    """Keys `{prefix}{sha256(client_id NUL jti)}`: fixed length whatever the client sends."""

    def __init__(self, redis: Any, prefix: str = "fhirgate:jti:") -> None:
        self.redis = redis
        self.prefix = prefix

    def key(self, client_id: str, jti: str) -> str:
        digest = hashlib.sha256(client_id.encode() + b"\0" + jti.encode()).hexdigest()
        return self.prefix + digest

    async def remember(self, client_id: str, jti: str, expires_at_ms: int) -> bool:
        stored = await self.redis.set(self.key(client_id, jti), b"1", nx=True, pxat=max(expires_at_ms, 1))
        return bool(stored)

    async def close(self) -> None:
        await self.redis.aclose()


def open_replay(store: AuthStore, redis_url: str | None) -> ReplayRegistry:
    """Redis when `redis_url` is set, else the store."""
    if not redis_url:
        return StoreReplay(store)
    import redis.asyncio

    return RedisReplay(redis.asyncio.from_url(redis_url))
