"""A real authorization server (uvicorn + httptools, in a background thread) on an ephemeral port,
over SQLite or PostgreSQL, and helpers that register clients and users in its store the way the
`fhirgate clients` / `fhirgate users` commands do (a second connection to the same database).

The issuer is the server's own address (`http://127.0.0.1:PORT`), so the token endpoint a client
assertion must name is `{issuer}/token`."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from joserfc import jwt
from joserfc.jwk import ECKey

from fhirgate.authserver.app import AuthApp
from fhirgate.authserver.clients import Clients
from fhirgate.authserver.oauth import ServerConfig
from fhirgate.authserver.store import AuthStore
from fhirgate.authserver.users import Users
from tests.fhirserver.harness import BACKENDS, database

__all__ = [
    "ASSERTION_TYPE",
    "BACKENDS",
    "FHIR_BASE",
    "RunningAuth",
    "assertion",
    "backend_client",
    "database",
    "running_auth",
    "with_store",
]

FHIR_BASE = "http://localhost:8000/fhir"


@dataclass
class RunningAuth:
    base: str
    client: httpx.Client
    app: AuthApp
    backend: str
    database_url: str
    loop: asyncio.AbstractEventLoop

    def on_server(self, coro: Any) -> Any:
        """Run a coroutine on the server's own event loop (its store connections live there)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    @property
    def issuer(self) -> str:
        return self.app.config.issuer

    @property
    def token_url(self) -> str:
        return self.issuer + "/token"

    def _store(self, action: Any) -> Any:
        return with_store(self.database_url, action)

    def register(self, metadata: Mapping[str, Any]) -> tuple[str, str | None]:
        """Register a client; (client_id, secret or None)."""

        async def go(store: AuthStore) -> tuple[str, str | None]:
            client, secret = await Clients(store).create(metadata)
            return client.client_id, secret

        result: tuple[str, str | None] = self._store(go)
        return result

    def add_user(self, username: str, password: str, fhir_user: str | None = None) -> None:
        async def go(store: AuthStore) -> None:
            await Users(store).create(username, password, fhir_user)

        self._store(go)

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of `sql` in the server's store (what reached the store, for attack tests)."""

        async def go(store: AuthStore) -> list[tuple[Any, ...]]:
            async with store.read() as s:
                return [tuple(r) for r in await s.conn.fetch(sql, args)]

        rows: list[tuple[Any, ...]] = self._store(go)
        return rows


def with_store(database_url: str, action: Any) -> Any:
    """`await action(store)` on a second connection to the server's store, as the CLI would."""

    async def go() -> Any:
        store = await AuthStore.open(database_url)
        try:
            return await action(store)
        finally:
            await store.close()

    return asyncio.run(go())


ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def backend_client(auth: RunningAuth, **metadata: Any) -> tuple[str, ECKey]:
    """A `private_key_jwt` client with one ES384 key (`kid` k1): (client_id, private key)."""
    key = ECKey.generate_key("P-384", private=True)
    public = {**key.as_dict(private=False), "kid": "k1", "alg": "ES384"}
    client_id, _ = auth.register(
        {
            "grant_types": ["client_credentials"],
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": {"keys": [public]},
            **metadata,
        }
    )
    return client_id, key


def assertion(auth: RunningAuth, key: ECKey, client_id: str, lifetime: int = 240, **claims: Any) -> str:
    """An ES384 client assertion for `auth`'s token endpoint with a fresh `jti`."""
    body = {
        "iss": client_id,
        "sub": client_id,
        "aud": auth.token_url,
        "exp": int(time.time()) + lifetime,
        "jti": secrets.token_hex(8),
    }
    body.update(claims)
    return jwt.encode({"alg": "ES384", "kid": "k1"}, body, key, algorithms=["ES384"])


@contextlib.contextmanager
def running_auth(
    database_url: str,
    backend: str = "sqlite",
    signing_alg: str = "RS256",
    redis_url: str | None = None,
    **config: Any,
) -> Iterator[RunningAuth]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    config.setdefault("fhir_base", FHIR_BASE)
    app = AuthApp(database_url, ServerConfig(issuer=base, **config), signing_alg)
    app.redis_url = redis_url
    server = uvicorn.Server(
        uvicorn.Config(
            app, lifespan="on", log_level="warning", http="httptools", loop="asyncio", access_log=False
        )
    )
    loops: list[asyncio.AbstractEventLoop] = []

    async def serve() -> None:
        loops.append(asyncio.get_running_loop())
        await server.serve(sockets=[sock])

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("authorization server did not start")
        time.sleep(0.01)
    client = httpx.Client(base_url=base, timeout=30, follow_redirects=False)
    try:
        yield RunningAuth(base, client, app, backend, database_url, loops[0])
    finally:
        client.close()
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="module", params=BACKENDS)
def auth(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAuth]:
    """One authorization server per module and backend."""
    tmp: Path = tmp_path_factory.mktemp("auth")
    with database(request.param, tmp) as url, running_auth(url, request.param) as running:
        yield running
