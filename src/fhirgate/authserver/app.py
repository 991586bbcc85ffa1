"""The authorization server over HTTP: a thin Starlette adapter around the Authlib core (`oauth.py`).

The adapter parses what Authlib should not have to (the form body: UTF-8, form-encoded only, each
parameter once, a size cap), keeps the active signing key warm, runs the synchronous Authlib call
in a worker thread (so its model methods can reach the asynchronous store through `Bridge`), and
renders the result. Every error of the token endpoint is RFC 6749 §5.2 JSON with
`Cache-Control: no-store`; an unexpected exception is logged and answered with `server_error`,
never with a stack trace.

`create_app()` builds the app from the node settings (`FHIRGATE_*`, `fhirgate.toml`), so every
uvicorn worker process builds the same one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio.to_thread
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fhirgate import clock
from fhirgate.authserver import endpoints, flows, metadata
from fhirgate.authserver.keys import KeyRing, SigningKey
from fhirgate.authserver.oauth import OAuthServer, ServerConfig, TokenRequest, claimed_client_id
from fhirgate.authserver.ratelimit import FailureLimiter
from fhirgate.authserver.replay import open_replay
from fhirgate.authserver.responses import (
    NO_STORE,
    FormError,
    error_code,
    form_params,
    json_response,
    method_not_allowed,
    oauth_error,
)
from fhirgate.authserver.store import AuthStore
from fhirgate.settings import Settings, load_settings

__all__ = ["ActiveKey", "AuthApp", "app_from_settings", "create_app"]

log = logging.getLogger("fhirgate.authserver")

#: How long a worker signs with the key it read before looking again (a `fhirgate keys rotate` in
#: another process is noticed within this many seconds).
KEY_RECHECK_SECONDS = 5.0
HOUSEKEEPING_SECONDS = 60.0
#: Codes, refresh tokens, launches and logins are deleted this long after they expired.
EXPIRED_KEPT_MS = 24 * 3600 * 1000
#: Failed client authentications allowed per client_id and caller address in RATE_WINDOW_SECONDS
#: when neither the settings nor the constructor say (settings `auth_rate_limit`).
DEFAULT_RATE_LIMIT = 10
RATE_WINDOW_SECONDS = 60.0
#: The error code of a 429 at the token endpoint. RFC 6749 registers none for rate limiting;
#: `slow_down` is the one registered code (IANA OAuth Extensions Error registry, RFC 8628 §3.5)
#: whose usage location is the token endpoint and whose meaning is "slow down" (docs/auth-server.md).
RATE_LIMITED = "slow_down"


class ActiveKey:
    """The signing key of one algorithm, read from the store at most every `recheck` seconds."""

    def __init__(self, ring: KeyRing, alg: str, recheck: float = KEY_RECHECK_SECONDS) -> None:
        self.ring = ring
        self.alg = alg
        self.recheck = recheck
        self._key: SigningKey | None = None
        self._checked = 0.0

    async def refresh(self) -> SigningKey:
        now = time.monotonic()
        if self._key is None or now - self._checked >= self.recheck:
            self._key = await self.ring.active(self.alg) or await self.ring.ensure_active(self.alg)
            self._checked = now
        return self._key

    def current(self) -> SigningKey:
        if self._key is None:
            raise RuntimeError("ActiveKey.refresh() was not awaited")
        return self._key


class AuthApp:
    """The authorization server's ASGI application."""

    def __init__(
        self,
        database_url: str,
        config: ServerConfig,
        signing_alg: str = "RS256",
        settings: Settings | None = None,
        rate_limit: int | None = None,
    ) -> None:
        self.database_url = database_url
        self.config = config
        self.signing_alg = signing_alg
        self.settings = settings
        if rate_limit is None:
            rate_limit = settings.auth_rate_limit if settings is not None else DEFAULT_RATE_LIMIT
        #: Failed client authentications at /token per (client_id, caller address) and minute.
        self.token_limiter = FailureLimiter(rate_limit, RATE_WINDOW_SECONDS)
        self.redis_url = settings.redis_url if settings is not None else None
        self.store: AuthStore | None = None
        self.oauth: OAuthServer | None = None
        self.keys: ActiveKey | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.app = Starlette(routes=self.routes(), lifespan=self.lifespan)

    def routes(self) -> list[Route]:
        openid = self._document(metadata.openid_configuration)
        oauth = self._document(metadata.oauth_metadata)
        smart = self._document(metadata.smart_configuration)
        issuer_path = urlsplit(self.config.issuer).path.strip("/")
        routes = [
            Route("/.well-known/openid-configuration", openid, methods=["GET"]),
            Route("/.well-known/oauth-authorization-server", oauth, methods=["GET"]),
            Route("/.well-known/smart-configuration", smart, methods=["GET"]),
            Route("/jwks", self.jwks, methods=["GET"]),
            # POST; any other method is a 405 in RFC 6749 JSON, not Starlette's plain text
            Route("/token", self.token, methods=["POST", "GET", "PUT", "PATCH", "DELETE", "OPTIONS"]),
            *flows.routes(self),
            *endpoints.routes(self),
        ]
        if issuer_path:  # RFC 8414 §3.1: /.well-known/oauth-authorization-server/{issuer path}
            routes.append(
                Route(
                    f"/.well-known/oauth-authorization-server/{issuer_path}",
                    oauth,
                    methods=["GET"],
                )
            )
        return routes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def start(self) -> None:
        self.store = await AuthStore.open(self.database_url)
        ring = KeyRing(self.store)
        self.keys = ActiveKey(ring, self.signing_alg)
        await self.keys.refresh()
        await ring.prune(self.config.access_token_lifetime)
        self.oauth = OAuthServer(self.config, self.store, self.keys.current)
        if self.redis_url:
            self.oauth.replay = open_replay(self.store, self.redis_url)
        flows.install(self.oauth)
        endpoints.install(self.oauth)
        self._tasks.append(asyncio.create_task(self._housekeeping()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.oauth is not None:
            await self.oauth.replay.close()
        if self.store is not None:
            await self.store.close()
            self.store = None

    async def housekeep(self) -> None:
        """Forget what can no longer matter: expired `jti` entries and access-token rows; codes,
        refresh tokens, launch values and logins a day after they expired."""
        assert self.store is not None
        now_ms = int(clock.now() * 1000)
        async with self.store.write() as s:
            await s.forget_jtis_before(now_ms)
            await s.forget_tokens_before(now_ms)
            await s.forget_expired(now_ms - EXPIRED_KEPT_MS)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_SECONDS)
            try:
                await self.housekeep()
            except Exception:
                log.exception("authorization server housekeeping failed")

    # --- metadata ------------------------------------------------------------------------------

    def _document(self, build: Callable[[ServerConfig, str], dict[str, Any]]) -> Callable[[Request], Any]:
        """A discovery document: it depends on the configuration only, so it is serialised once."""
        body = json_response(200, build(self.config, self.signing_alg), cache=True).body

        async def serve(_request: Request) -> Response:
            return Response(body, 200, media_type="application/json")

        return serve

    async def jwks(self, _request: Request) -> Response:
        assert self.keys is not None
        doc = await self.keys.ring.jwks(self.config.access_token_lifetime)
        return json_response(200, doc, {"Cache-Control": "public, max-age=60"}, cache=True)

    # --- the token endpoint --------------------------------------------------------------------

    async def token(self, request: Request) -> Response:
        return await self.client_endpoint(
            request,
            "the token endpoint",
            lambda server, req: server.create_token_response(req),
            why=" (RFC 6749 section 3.2)",
        )

    async def client_endpoint(
        self,
        request: Request,
        what: str,
        call: Callable[[OAuthServer, TokenRequest], Any],
        why: str = "",
    ) -> Response:
        """An endpoint where the client authenticates (`/token`, `/introspect`, `/revoke`): POST,
        a form body, the Authlib `call`, and one failure limiter for all three, so none of them
        is a side door for guessing a client secret. Failed client authentications are counted per
        claimed client_id (unverified: the Basic header, the client_id parameter or the
        assertion's sub) and caller address; successes never."""
        if request.method != "POST":
            return method_not_allowed("POST", what, why)
        try:
            form = await form_params(request)
        except FormError as exc:
            return oauth_error(400, "invalid_request", str(exc))
        client_id = claimed_client_id(request.headers.get("authorization"), form)
        address = request.client.host if request.client is not None else "-"
        key = f"{client_id}\x00{address}"
        limiter = self.token_limiter
        wait = limiter.retry_after(key)
        if wait:
            return oauth_error(
                429,
                RATE_LIMITED,
                f"{limiter.limit} failed client authentications for this client from this address "
                f"in the last {limiter.window:g} seconds: retry after {wait} seconds",
                {"Retry-After": str(wait)},
            )
        response = await self.run_oauth(request, form, call, client_id)
        if response.status_code in (400, 401) and error_code(response) == "invalid_client":
            limiter.failed(key)
        return response

    async def run_oauth(
        self,
        request: Request,
        form: dict[str, str],
        call: Callable[[OAuthServer, TokenRequest], Any],
        client_id: str = "",
    ) -> Response:
        """Run one Authlib call in a worker thread and render its (status, body, headers). The
        client the request claims (`client_id`, unverified) is read first, here on the loop, and
        handed to the thread with the request (`OAuthServer.preload`): one callback fewer."""
        assert self.oauth is not None
        assert self.keys is not None
        await self.keys.refresh()
        headers = {}
        auth = request.headers.get("authorization")
        if auth is not None:
            headers["Authorization"] = auth
        req = TokenRequest(request.method, self.config.issuer + request.url.path, headers, form)
        try:
            await self.oauth.preload(req, client_id)
            status, body, out_headers = await anyio.to_thread.run_sync(call, self.oauth, req)
        except Exception:
            log.exception("authorization server: unexpected error at %s", request.url.path)
            return oauth_error(
                500, "server_error", "the authorization server failed; the error is in its log"
            )
        response_headers = dict(NO_STORE)
        response_headers.update(dict(out_headers))
        response_headers.pop("Content-Type", None)
        if isinstance(body, dict | list):
            return Response(orjson.dumps(body), status, response_headers, media_type="application/json")
        return Response(body or b"", status, response_headers)


def app_from_settings(settings: Settings) -> AuthApp:
    config = ServerConfig(
        issuer=settings.auth_issuer.rstrip("/"),
        fhir_base=settings.auth_fhir_base.rstrip("/"),
        access_token_lifetime=settings.auth_access_token_lifetime,
        code_lifetime=settings.auth_code_lifetime,
        refresh_token_lifetime=settings.auth_refresh_token_lifetime,
        login_lifetime=settings.auth_login_lifetime,
        patient_search_url=settings.auth_patient_search_url.rstrip("/")
        if settings.auth_patient_search_url
        else None,
    )
    return AuthApp(settings.auth_database(), config, settings.auth_signing_alg, settings)


def create_app() -> AuthApp:
    settings_file = os.environ.get("FHIRGATE_SETTINGS_FILE")
    return app_from_settings(load_settings(Path(settings_file) if settings_file else None))
