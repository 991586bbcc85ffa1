"""One contract for the jti replay registry, run against SQLite, PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from fhirgate.authserver.replay import RedisReplay, ReplayRegistry, StoreReplay, open_replay
from fhirgate.authserver.store import AuthStore
from tests.fhirserver.harness import database

REDIS_URL = "redis://127.0.0.1:6379/0"
KINDS = ("sqlite", "postgresql", "redis")


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    backend = "sqlite" if request.param == "redis" else request.param
    with database(backend, tmp_path) as url:
        yield request.param, url


@asynccontextmanager
async def registry(kind: tuple[str, str]) -> AsyncIterator[ReplayRegistry]:
    name, url = kind
    store = await AuthStore.open(url)
    replay = open_replay(store, REDIS_URL if name == "redis" else None)
    if name == "redis":
        assert isinstance(replay, RedisReplay)
        replay.prefix = f"fhirgate-test:{uuid.uuid4().hex}:"
    else:
        assert isinstance(replay, StoreReplay)
    try:
        yield replay
    finally:
        await replay.close()
        await store.close()


def _later(seconds: float = 300) -> int:
    return int((time.time() + seconds) * 1000)


def test_a_jti_is_accepted_once_per_client(kind: tuple[str, str]) -> None:
    async def go() -> None:
        async with registry(kind) as replay:
            assert await replay.remember("client-a", "j1", _later())
            assert not await replay.remember("client-a", "j1", _later())
            assert await replay.remember("client-b", "j1", _later())  # another client's namespace
            assert await replay.remember("client-a", "j2", _later())

    asyncio.run(go())


def test_concurrent_submissions_of_one_jti_succeed_once(kind: tuple[str, str]) -> None:
    async def go() -> None:
        async with registry(kind) as replay:
            results = await asyncio.gather(*(replay.remember("c", "same", _later()) for _ in range(20)))
            assert results.count(True) == 1

    asyncio.run(go())


def test_the_entry_outlives_a_reopen(kind: tuple[str, str]) -> None:
    async def go() -> None:
        async with registry(kind) as replay:
            prefix = getattr(replay, "prefix", None)
            assert await replay.remember("c", "persisted", _later())
        async with registry(kind) as replay:
            if prefix is not None:
                replay.prefix = prefix  # type: ignore[attr-defined]
            assert not await replay.remember("c", "persisted", _later())

    asyncio.run(go())


def test_separator_cannot_be_forged(kind: tuple[str, str]) -> None:
    """("a", "b:c") and ("a:b", "c") are different entries."""

    async def go() -> None:
        async with registry(kind) as replay:
            assert await replay.remember("a", "b:c", _later())
            assert await replay.remember("a:b", "c", _later())

    asyncio.run(go())


def test_a_server_with_redis_keeps_jtis_there(tmp_path: Path) -> None:
    """With `redis_url` the token endpoint records assertion ids in Redis, not in the store."""
    import secrets

    import redis
    from joserfc import jwt
    from joserfc.jwk import ECKey

    from tests.authserver.harness import running_auth

    key = ECKey.generate_key("P-384", private=True)
    public = {**key.as_dict(private=False), "kid": "k1", "alg": "ES384"}
    with database("sqlite", tmp_path) as url, running_auth(url, redis_url=REDIS_URL) as auth:
        client_id, _ = auth.register(
            {
                "grant_types": ["client_credentials"],
                "token_endpoint_auth_method": "private_key_jwt",
                "jwks": {"keys": [public]},
            }
        )
        jti = secrets.token_hex(12)
        claims = {
            "iss": client_id,
            "sub": client_id,
            "aud": auth.token_url,
            "exp": int(time.time()) + 60,
            "jti": jti,
        }
        form = {
            "grant_type": "client_credentials",
            "scope": "system/*.read",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": jwt.encode({"alg": "ES384", "kid": "k1"}, claims, key, algorithms=["ES384"]),
        }
        assert auth.client.post("/token", data=form).status_code == 200
        again = auth.client.post("/token", data=form)
        assert again.status_code == 400
        assert again.json()["error_description"] == "the client assertion's jti was used before"
        assert auth.query("SELECT count(*) FROM auth_jti") == [(0,)]
        replay_key = RedisReplay(None).key(client_id, jti)
        r = redis.Redis.from_url(REDIS_URL)
        try:
            ttl_ms = r.pttl(replay_key)
            assert 0 < ttl_ms <= 95_000  # exp (60 s) + 30 s leeway
            r.delete(replay_key)
        finally:
            r.close()
