"""The request lifecycle: route, run plugins, proxy to the upstream, answer, log.

`Gateway` holds one worker's state: node settings, the current configuration (router +
pipeline, swapped atomically on reload; a request in flight keeps the snapshot it started with),
the upstream pool and the open client connections.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from fhirgate import __version__
from fhirgate.errors import (
    MSG_BAD_GATEWAY,
    MSG_NO_ROUTE,
    MSG_TIMEOUT,
    MSG_UNEXPECTED,
    GatewayExit,
)
from fhirgate.gateway import dialect
from fhirgate.gateway.context import RequestContext
from fhirgate.gateway.eager import run_eagerly
from fhirgate.gateway.normalize import BadPathError, normalize_path
from fhirgate.gateway.pdk import PDK
from fhirgate.gateway.pipeline import Chain, Pipeline, PluginSpec, Step
from fhirgate.gateway.router import Router
from fhirgate.gateway.upstream import (
    CONNECTION_OPTIONS,
    PoolKey,
    UpstreamConnection,
    UpstreamPool,
    UpstreamResponseError,
)

if TYPE_CHECKING:
    from fhirgate.config import GatewayConfig
    from fhirgate.gateway.accesslog import AccessLog
    from fhirgate.gateway.server import ClientProtocol
    from fhirgate.settings import Settings

log = logging.getLogger("fhirgate.proxy")

SERVER_TOKEN = f"fhirgate/{__version__}"
# Request timings (latencies, log timestamps) read the wall clock directly: they measure, they do
# not decide anything, so they need not follow an injected clock (`fhirgate.clock`).
_now = time.time
_REASONS = {s.value: s.phrase for s in HTTPStatus}

# RFC 9110 7.6.1 hop-by-hop fields, plus Proxy-* (never forwarded) and the framing headers we
# set ourselves.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"host",
        b"expect",
    }
)
_FORWARDED = frozenset(
    {
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-path",
        b"x-forwarded-prefix",
        b"x-real-ip",
    }
)
_NONE: frozenset[bytes] = frozenset()
# Lengths of the request header names the gateway removes or rewrites (hop-by-hop, forwarding,
# Via): a name of another length needs no further look.
_SPECIAL_LENGTHS = frozenset(len(n) for n in (*_HOP_BY_HOP, *_FORWARDED, b"via"))


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """What the hot path needs of a service, computed once per configuration."""

    key: PoolKey
    host_header: bytes
    connect_timeout: float
    write_timeout: float
    read_timeout: float
    retries: int


class GatewayState:
    """One configuration, compiled: router, pipeline and upstream targets."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.config_hash = config_hash(config)
        self.router = Router(config.routes)
        self.router_needs_headers = bool(getattr(self.router, "uses_headers", True))
        specs: list[PluginSpec] = []
        for p in config.plugins:
            if not p.enabled:
                continue
            handler = p.plugin_class(p.config, p.id)
            handler.bind_config(config)
            specs.append(PluginSpec(p.id, p.name, p.route_id, p.service_id, p.consumer_id, handler))
        self.pipeline = Pipeline(specs)
        # Consumers by id and by username (Kong's `kong.client.load_consumer`).
        self.consumers: dict[str, Any] = {}
        for consumer in config.consumers:
            self.consumers[consumer.id] = consumer
            if consumer.username:
                self.consumers.setdefault(consumer.username, consumer)
        self.targets: dict[str, UpstreamTarget] = {}
        for svc in config.services:
            verify = svc.tls_verify is not False
            default_port = 443 if svc.protocol == "https" else 80
            host_header = svc.host if svc.port == default_port else f"{svc.host}:{svc.port}"
            self.targets[svc.id] = UpstreamTarget(
                key=(svc.protocol, svc.host, svc.port, verify),
                host_header=host_header.encode("idna" if not svc.host.isascii() else "ascii"),
                connect_timeout=svc.connect_timeout / 1000,
                write_timeout=svc.write_timeout / 1000,
                read_timeout=svc.read_timeout / 1000,
                retries=svc.retries,
            )


def config_hash(config: GatewayConfig) -> str:
    """A stable digest of the configuration (Kong's `configuration_hash`)."""
    import hashlib

    source = getattr(config, "source_hash", None) or repr(
        (
            [(s.id, s.host, s.port, s.path) for s in config.services],
            [(r.id, r.paths, r.hosts, r.methods) for r in config.routes],
            [(p.id, p.name, p.config.model_dump_json()) for p in config.plugins],
        )
    )
    return hashlib.md5(str(source).encode(), usedforsecurity=False).hexdigest()


class _ClientGone(Exception):
    pass


class Exchange:
    """One request/response with an upstream connection; receives the upstream's callbacks.

    The common path needs no task and no future: the response head is processed in the parser's
    callback, body bytes are collected, and everything that arrived in one read is written to the
    client in one `write` when the upstream connection calls `flush()`.
    """

    __slots__ = (
        "body_chunks",
        "chunked_out",
        "client",
        "complete",
        "content_length",
        "ctx",
        "error",
        "filters",
        "gateway",
        "head",
        "keep_alive",
        "last_activity",
        "loop",
        "out",
        "ready",
        "reused",
        "target",
        "upstream",
        "upstream_paused_writing",
    )

    def __init__(
        self,
        gateway: Gateway,
        ctx: RequestContext,
        client: ClientProtocol,
        upstream: UpstreamConnection,
        target: UpstreamTarget,
        reused: bool,
    ) -> None:
        self.gateway = gateway
        self.loop = gateway.loop
        self.ctx = ctx
        self.client = client
        self.upstream = upstream
        self.target = target
        self.reused = reused
        self.head: tuple[int, list[tuple[bytes, bytes]]] | None = None
        self.keep_alive = False
        self.content_length: bytes | None = None
        self.body_chunks: list[bytes] = []
        self.out: list[bytes] = []
        self.complete = False
        self.error: BaseException | None = None
        self.ready = False  # response head processed: body bytes go straight to `out`
        self.chunked_out = False
        self.filters: list[Step] = []
        self.last_activity = self.loop.time()
        self.upstream_paused_writing = False

    def timed_out(self, now: float) -> bool:
        limit = self.target.write_timeout if self.upstream_paused_writing else self.target.read_timeout
        return now - self.last_activity > limit

    # --- request body to the upstream ------------------------------------------------------
    def send_body(self, chunk: bytes) -> None:
        self.last_activity = self.loop.time()
        if self.ctx.chunked:
            if chunk:
                self.upstream.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                self.upstream.write(b"0\r\n\r\n")
        elif chunk:
            self.upstream.write(chunk)

    # --- upstream callbacks ----------------------------------------------------------------
    def on_upstream_head(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        content_length: bytes | None,
    ) -> None:
        self.last_activity = self.loop.time()
        self.ctx.t_upstream_end_headers = _now()
        self.head = (status, headers)  # end-to-end headers only
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.gateway.on_head(self)

    def on_upstream_body(self, chunk: bytes) -> None:
        if self.ready:
            self.frame(chunk)
        else:
            self.body_chunks.append(chunk)

    def frame(self, chunk: bytes) -> None:
        for step in self.filters:
            chunk = step.hook(self.gateway.pdk(self.ctx, step), chunk, False)
            if not chunk:
                return
        self.ctx.response_size += len(chunk)
        if self.chunked_out:
            self.out.append(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            self.out.append(chunk)

    def flush(self) -> None:
        """End of one read from the upstream: send what it produced in one write."""
        self.last_activity = self.loop.time()
        out = self.out
        if out and self.ready:
            self.client.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def on_upstream_complete(self) -> None:
        self.complete = True
        if self.ready:
            self.gateway.finish(self)

    def on_upstream_error(self, exc: BaseException) -> None:
        if self.complete or self.error is not None:
            return
        self.error = exc
        self.upstream.abandon()
        self.gateway.upstream_failed(self)

    def on_upstream_pause_writing(self) -> None:
        self.upstream_paused_writing = True
        self.client.pause_body()

    def on_upstream_resume_writing(self) -> None:
        self.upstream_paused_writing = False
        self.last_activity = self.loop.time()
        self.client.resume_body()


class Gateway:
    """One worker's gateway."""

    def __init__(
        self,
        settings: Settings,
        config: GatewayConfig,
        *,
        access_log: AccessLog | None = None,
    ) -> None:
        self.settings = settings
        self.state = GatewayState(config)
        self.loop = asyncio.get_event_loop()
        self.pool = UpstreamPool(
            pool_size=settings.upstream_keepalive_pool_size,
            idle_timeout=float(settings.upstream_keepalive_idle_timeout),
            max_requests=settings.upstream_keepalive_max_requests,
            ca_file=str(settings.ssl_trusted_certificate) if settings.ssl_trusted_certificate else None,
        )
        self.connections: set[ClientProtocol] = set()
        self.exchanges: dict[RequestContext, Exchange] = {}
        self.active: set[RequestContext] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.access_log = access_log
        tokens = {t.lower() for t in settings.headers}
        self.server_tokens = "server_tokens" in tokens
        self.latency_tokens = "latency_tokens" in tokens
        self.request_id_header = "request_id" in tokens
        self._via = f"1.1 {SERVER_TOKEN}".encode() if self.server_tokens else b""
        self._via_resp = b"Via: 1.1 " + SERVER_TOKEN.encode() + b"\r\n" if self.server_tokens else b""
        self._trusted = [ipaddress.ip_network(n, strict=False) for n in settings.trusted_ips]
        self._trusted_cache: dict[str, bool] = {}
        self._real_ip_header = settings.real_ip_header.lower()
        self._rid_prefix = os.urandom(8).hex()
        self._rid_counter = 0
        self._date_cache = (0, "")
        self._sweeper: asyncio.TimerHandle | None = None
        self.requests_total = 0
        self.draining = False
        self.on_idle: Callable[[], None] | None = None
        self.state.pipeline.init_worker()

    # --- configuration ---------------------------------------------------------------------
    def reload(self, config: GatewayConfig) -> None:
        """Swap in a new configuration; requests in flight finish with the old one."""
        old = self.state
        self.state = GatewayState(config)
        self.state.pipeline.init_worker()
        old.pipeline.close()

    # --- helpers ---------------------------------------------------------------------------
    def pdk(self, ctx: RequestContext, step: Step | None = None) -> PDK:
        kong: PDK | None = ctx.pdk
        if kong is None:
            kong = ctx.pdk = PDK(ctx)
        if step is not None:
            kong.ctx._owner = step.spec.id
        return kong

    def is_trusted(self, ip: str) -> bool:
        if not self._trusted:
            return False
        cached = self._trusted_cache.get(ip)
        if cached is None:
            try:
                addr = ipaddress.ip_address(ip)
                cached = any(addr in net for net in self._trusted)
            except ValueError:
                cached = False
            if len(self._trusted_cache) > 10000:
                self._trusted_cache.clear()
            self._trusted_cache[ip] = cached
        return cached

    def _http_date(self) -> str:
        now = int(time.time())
        if self._date_cache[0] != now:
            self._date_cache = (now, formatdate(now, usegmt=True))
        return self._date_cache[1]

    def _new_request_id(self) -> str:
        self._rid_counter += 1
        return f"{self._rid_prefix}{self._rid_counter:016x}"

    def _is_fhir(self, ctx: RequestContext) -> bool:
        route = ctx.route
        if route is not None and getattr(route, "is_fhir", False):
            return True
        accept = None
        for name, value in ctx.headers:
            if name.lower() == b"accept":
                accept = value.decode("latin-1")
                break
        return dialect.wants_fhir(accept)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # --- entry point -----------------------------------------------------------------------
    def handle(self, ctx: RequestContext) -> None:
        """A request head has arrived: run it as far as possible without a task."""
        state = self.state
        ctx.state = state
        self.requests_total += 1
        ctx.request_id = self._new_request_id()
        self.active.add(ctx)
        try:
            try:
                ctx.path = normalize_path(ctx.raw_path)
            except BadPathError as exc:
                raise GatewayExit(400, {"message": f"Bad request: {exc}"}) from None
            if self._trusted and self.is_trusted(ctx.client_ip):
                ctx.forwarded_ip = self._real_ip(ctx)
            else:
                ctx.forwarded_ip = ctx.client_ip
            pipeline = state.pipeline
            if pipeline.rewrite:
                if any(step.is_async for step in pipeline.rewrite):
                    self._spawn(self._handle_async(ctx, rewrite=True))
                    return
                for step in pipeline.rewrite:
                    step.hook(self.pdk(ctx, step))
            chain = self._route(ctx, state)
            if chain is not None and chain.access:
                self._access_sync(ctx, pipeline, chain)
            self._forward(ctx)
        except _NeedsAsync as more:
            self._spawn(self._continue_async(ctx, more))
        except Exception as exc:
            self._settle(ctx, exc)

    async def _continue_async(self, ctx: RequestContext, more: _NeedsAsync) -> None:
        """An async access hook had to wait: finish it, and the access phase, in a task."""
        try:
            await more.pending
            await self._access_async(ctx, ctx.state.pipeline, more.steps, more.consumer, more.priority)
            self._forward(ctx)
        except Exception as exc:
            self._settle(ctx, exc)

    async def _handle_async(self, ctx: RequestContext, rewrite: bool) -> None:
        """The same steps as `handle`, for configurations with async rewrite/access hooks."""
        state = ctx.state
        try:
            if rewrite:
                for step in state.pipeline.rewrite:
                    res = step.hook(self.pdk(ctx, step))
                    if step.is_async:
                        await res
                self._route(ctx, state)
            chain = ctx.chain
            if chain is not None and chain.access:
                await self._access_async(ctx, state.pipeline, chain.access, None, None)
            self._forward(ctx)
        except Exception as exc:
            self._settle(ctx, exc)

    def _route(self, ctx: RequestContext, state: GatewayState) -> Chain | None:
        match = state.router.match(
            ctx.method,
            ctx.host,
            ctx.path,
            ctx.header_map() if state.router_needs_headers else None,
            scheme=ctx.scheme,
        )
        if match is None:
            raise GatewayExit(404, {"message": MSG_NO_ROUTE})
        ctx.route = route = match.route
        ctx.service = service = match.service
        ctx.upstream_path = match.upstream_path
        if route.strip_path:
            ctx.matched_prefix = match.matched_path  # what was stripped (X-Forwarded-Prefix)
        if state.pipeline.empty:
            return None
        chain = state.pipeline.chain(route.id, service.id if service is not None else None)
        ctx.chain = chain
        return chain

    def _real_ip(self, ctx: RequestContext) -> str:
        values = ctx.header_map().get(self._real_ip_header)
        if not values:
            return ctx.client_ip
        value = values[-1]
        if self._real_ip_header == "x-forwarded-for":
            value = value.rsplit(",", 1)[-1]
        value = value.strip()
        try:
            ipaddress.ip_address(value)
        except ValueError:
            return ctx.client_ip  # not an address: ignored, as nginx's realip module does
        return value

    # --- access phase ----------------------------------------------------------------------
    def _rescope(self, ctx: RequestContext, pipeline: Pipeline, done_priority: int) -> list[Step]:
        """After authentication set a consumer: the consumer's chain, from where we are."""
        route, service = ctx.route, ctx.service
        chain = pipeline.chain(
            route.id, service.id if service is not None else None, getattr(ctx.consumer, "id", None)
        )
        ctx.chain = chain
        return [s for s in chain.access if s.priority < done_priority]

    def _access_sync(self, ctx: RequestContext, pipeline: Pipeline, chain: Chain) -> None:
        """The access phase without a task. An `async def` hook runs eagerly; if it has to wait,
        `_NeedsAsync` carries it and the steps left to a task (`_continue_async`)."""
        steps = chain.access
        consumer = None
        i = 0
        while i < len(steps):
            step = steps[i]
            res = step.hook(self.pdk(ctx, step))
            i += 1
            if step.is_async:
                pending = run_eagerly(res)
                if pending is not None:
                    raise _NeedsAsync(pending, steps[i:], consumer, step.priority)
            if ctx.consumer is not consumer and pipeline.has_consumer_scoped:
                consumer = ctx.consumer
                steps, i = self._rescope(ctx, pipeline, step.priority), 0

    async def _access_async(
        self,
        ctx: RequestContext,
        pipeline: Pipeline,
        steps: list[Step],
        consumer: Any,
        after_priority: int | None,
    ) -> None:
        """The rest of the access phase in a task; `after_priority` is the priority of a hook that
        just finished waiting (the consumer it set re-scopes the chain, as in `_access_sync`)."""
        if after_priority is not None and ctx.consumer is not consumer and pipeline.has_consumer_scoped:
            consumer = ctx.consumer
            steps = self._rescope(ctx, pipeline, after_priority)
        i = 0
        while i < len(steps):
            step = steps[i]
            res = step.hook(self.pdk(ctx, step))
            if step.is_async:
                await res
            i += 1
            if ctx.consumer is not consumer and pipeline.has_consumer_scoped:
                consumer = ctx.consumer
                steps, i = self._rescope(ctx, pipeline, step.priority), 0

    # --- proxying --------------------------------------------------------------------------
    def _request_head(self, ctx: RequestContext, target: UpstreamTarget) -> bytes:
        path = ctx.upstream_path
        query = ctx.query if ctx.upstream_query is None else ctx.upstream_query
        uri = f"{path}?{query}" if query else path
        ctx.upstream_uri = uri
        out = [ctx.method.encode(), b" ", uri.encode("latin-1"), b" HTTP/1.1\r\nHost: "]
        route = ctx.route
        out.append(ctx.host.encode("latin-1") if route.preserve_host and ctx.host else target.host_header)
        out.append(b"\r\n")
        ops = ctx.upstream_header_ops
        ops_names = {k.encode("latin-1") for k in ops} if ops else _NONE
        conn_named: frozenset[bytes] = _NONE
        for name, value in ctx.headers:
            if len(name) == 10 and name.lower() == b"connection":
                # Headers named by Connection are hop-by-hop too (RFC 9110 7.6.1); keep-alive,
                # close and upgrade name nothing else.
                named = {t.strip().lower() for t in value.split(b",")} - CONNECTION_OPTIONS
                if named:
                    conn_named = conn_named | named
        trusted = bool(self._trusted) and self.is_trusted(ctx.client_ip)
        fwd: dict[bytes, bytes] = {}
        via: bytes | None = None
        for name, value in ctx.headers:
            if len(name) not in _SPECIAL_LENGTHS and not conn_named and not ops_names:
                out += (name, b": ", value, b"\r\n")  # most headers: no lower(), no hashing
                continue
            lname = name.lower()
            if lname in _HOP_BY_HOP or lname in conn_named:
                continue
            if lname == b"via" and self._via:
                via = value if via is None else via + b", " + value
                continue
            if lname in _FORWARDED:
                if trusted and lname not in fwd:
                    fwd[lname] = value
                continue
            if lname in ops_names:
                continue
            out += (name, b": ", value, b"\r\n")
        for op_name, op_value in ops.values():
            if op_value is not None:
                out += (op_name.encode("latin-1"), b": ", op_value.encode("latin-1"), b"\r\n")
        client_ip = ctx.client_ip.encode()
        xff = fwd.get(b"x-forwarded-for")
        out += (
            b"X-Real-IP: ",
            ctx.forwarded_ip.encode(),
            b"\r\nX-Forwarded-For: ",
            (xff + b", " + client_ip) if xff else client_ip,
            b"\r\nX-Forwarded-Proto: ",
            fwd.get(b"x-forwarded-proto") or ctx.scheme.encode(),
            b"\r\nX-Forwarded-Host: ",
            fwd.get(b"x-forwarded-host") or ctx.host_name.encode("latin-1"),
            b"\r\nX-Forwarded-Port: ",
            fwd.get(b"x-forwarded-port") or str(ctx.listener_port).encode(),
            b"\r\nX-Forwarded-Path: ",
            fwd.get(b"x-forwarded-path") or ctx.raw_path.encode("latin-1"),
            b"\r\n",
        )
        # Kong: the trusted client's value, else the prefix strip_path removed (unless "/").
        prefix = fwd.get(b"x-forwarded-prefix")
        if prefix is None and ctx.matched_prefix and ctx.matched_prefix != "/":
            prefix = ctx.matched_prefix.encode("latin-1")
        if prefix:
            out += (b"X-Forwarded-Prefix: ", prefix, b"\r\n")
        if self._via:
            # RFC 9110 7.6.3: each proxy appends itself to Via.
            out += (b"Via: ", via + b", " + self._via if via else self._via, b"\r\n")
        if ctx.chunked:
            out.append(b"Transfer-Encoding: chunked\r\n")
        elif ctx.content_length is not None:
            out += (b"Content-Length: ", str(ctx.content_length).encode(), b"\r\n")
        out.append(b"\r\n")
        return b"".join(out)

    def _forward(self, ctx: RequestContext) -> None:
        client = ctx.conn
        assert client is not None
        if client.closing:
            raise _ClientGone()
        service = ctx.service
        if service is None:
            raise GatewayExit(503, {"message": "no Service found with those values"})
        if ctx.body_error is not None:
            raise ctx.body_error
        target = ctx.state.targets[service.id]
        ctx.upstream_head = self._request_head(ctx, target)
        self._attempt(ctx, target)

    def _attempt(self, ctx: RequestContext, target: UpstreamTarget) -> None:
        ctx.n_tries += 1
        conn = self.pool.take_idle(target.key)
        if conn is None:
            self._spawn(self._connect(ctx, target))
        else:
            self._send(ctx, target, conn, reused=True)

    async def _connect(self, ctx: RequestContext, target: UpstreamTarget) -> None:
        client = ctx.conn
        assert client is not None
        try:
            while True:
                try:
                    conn = await self.pool.connect(target.key, connect_timeout=target.connect_timeout)
                    break
                except (TimeoutError, OSError) as exc:
                    ctx.tries.append({"ip": target.key[1], "port": target.key[2], "error": str(exc)})
                    if client.closing:
                        raise _ClientGone() from None
                    if ctx.n_tries <= target.retries:
                        ctx.n_tries += 1
                        continue
                    log.error("upstream %s:%s: %s", target.key[1], target.key[2], exc or type(exc).__name__)
                    if isinstance(exc, TimeoutError):
                        raise GatewayExit(504, {"message": MSG_TIMEOUT}) from None
                    raise GatewayExit(502, {"message": MSG_BAD_GATEWAY}) from None
            if client.closing:
                self.pool.release(conn)
                raise _ClientGone()
            if ctx.body_error is not None:
                self.pool.release(conn)
                raise ctx.body_error
            self._send(ctx, target, conn, reused=False)
        except Exception as exc:
            self._settle(ctx, exc)

    def _send(
        self, ctx: RequestContext, target: UpstreamTarget, conn: UpstreamConnection, reused: bool
    ) -> None:
        client = ctx.conn
        assert client is not None
        ctx.tries.append({"ip": target.key[1], "port": target.key[2]})
        exchange = Exchange(self, ctx, client, conn, target, reused)
        self.exchanges[ctx] = exchange
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(_SWEEP_INTERVAL, self._sweep)
        conn.begin(exchange, head_only=ctx.method == "HEAD")
        if not ctx.t_upstream_start:
            ctx.t_upstream_start = _now()
        head = ctx.upstream_head
        if ctx.body_complete:
            body = ctx.body_buffer
            if ctx.chunked:
                framed = [head]
                for chunk in body:
                    framed.append(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                framed.append(b"0\r\n\r\n")
                conn.write(b"".join(framed))
            elif body:
                conn.write(b"".join([head, *body]))
            else:
                conn.write(head)
        else:
            chunks = ctx.take_buffered_body()
            if ctx.chunked:
                conn.write(b"".join([head, *(b"%x\r\n%b\r\n" % (len(c), c) for c in chunks)]))
            else:
                conn.write(b"".join([head, *chunks]))
            ctx.body_sink = exchange.send_body
            if ctx.expect_continue:
                client.send_continue(ctx)
            else:
                client.resume_body()

    def _sweep(self) -> None:
        """Upstream read/write timeouts: one timer per worker, not one per request."""
        self._sweeper = None
        if not self.exchanges:
            return
        now = self.loop.time()
        for exchange in [e for e in self.exchanges.values() if not e.complete and e.timed_out(now)]:
            exchange.on_upstream_error(TimeoutError())
        if self.exchanges:
            self._sweeper = self.loop.call_later(_SWEEP_INTERVAL, self._sweep)

    def upstream_failed(self, exchange: Exchange) -> None:
        """The upstream broke (or timed out) during an exchange."""
        ctx = exchange.ctx
        err = exchange.error
        if self.exchanges.get(ctx) is exchange:
            del self.exchanges[ctx]
        if isinstance(err, _ClientGone):
            self._finalize(ctx)
            return
        if exchange.ready:
            # The head is already out: all we can do is cut the client connection.
            exchange.flush()
            exchange.client.abort()
            self._finalize(ctx)
            return
        if exchange.head is not None:
            return  # an async header filter is running; it sees the error
        if isinstance(err, GatewayExit):
            self._exit(ctx, err)
            return
        target = exchange.target
        if (
            exchange.reused
            and ctx.body_complete
            and not exchange.upstream.got_bytes
            and isinstance(err, UpstreamResponseError)
            and ctx.n_tries <= target.retries + 1
        ):
            # A pooled connection the upstream had closed (keep-alive race): retry.
            self._attempt(ctx, target)
            return
        if isinstance(err, TimeoutError):
            log.error("upstream timed out (%s:%s)", target.key[1], target.key[2])
            self._exit(ctx, GatewayExit(504, {"message": MSG_TIMEOUT}))
        else:
            log.error("upstream error (%s:%s): %s", target.key[1], target.key[2], err)
            self._exit(ctx, GatewayExit(502, {"message": MSG_BAD_GATEWAY}))

    # --- the response ----------------------------------------------------------------------
    def on_head(self, exchange: Exchange) -> None:
        chain = exchange.ctx.chain
        if chain is not None and chain.any_async_header_filter:
            self._spawn(self._head_async(exchange))
            return
        try:
            self._process_head(exchange)
        except Exception:
            exchange.upstream.abandon()
            self.exchanges.pop(exchange.ctx, None)
            self._crash(exchange.ctx)

    async def _head_async(self, exchange: Exchange) -> None:
        ctx = exchange.ctx
        try:
            self._response_headers(ctx, exchange)
            chain = ctx.chain
            assert chain is not None
            await self._header_filter_async(ctx, chain)
            if exchange.error is not None:
                exchange.client.abort()
                self._finalize(ctx)
                return
            self._process_head(exchange, headers_done=True)
            exchange.flush()
            if exchange.complete:
                self.finish(exchange)
        except Exception:
            exchange.upstream.abandon()
            self.exchanges.pop(ctx, None)
            self._crash(ctx)

    def _response_headers(self, ctx: RequestContext, exchange: Exchange) -> None:
        """Decode the upstream's headers for header_filter plugins (only when some exist)."""
        assert exchange.head is not None
        status, raw_headers = exchange.head
        headers: list[tuple[str, str]] = []
        for bname, bvalue in raw_headers:
            headers.append((bname.decode("latin-1"), bvalue.decode("latin-1")))
        self._add_gateway_headers(ctx, headers)
        ctx.response_headers = headers
        ctx.response_status = status

    def _add_gateway_headers(self, ctx: RequestContext, headers: list[tuple[str, str]]) -> None:
        if self.latency_tokens:
            up = ctx.t_upstream_start
            headers.append(
                ("X-Fhirgate-Upstream-Latency", str(int((ctx.t_upstream_end_headers - up) * 1000)))
            )
            headers.append(("X-Fhirgate-Proxy-Latency", str(int((up - ctx.t_start) * 1000))))
        if self._via:
            headers.append(("Via", "1.1 " + SERVER_TOKEN))
        if self.request_id_header:
            headers.append(("X-Fhirgate-Request-Id", ctx.request_id))

    def _process_head(self, exchange: Exchange, headers_done: bool = False) -> None:
        ctx = exchange.ctx
        assert exchange.head is not None
        status, raw_headers = exchange.head
        ctx.upstream_status = status
        ctx.response_status = status
        ctx.response_source = "service"
        chain = ctx.chain
        content_length = exchange.content_length
        filters = chain.body_filter if chain is not None else []
        no_body = ctx.method == "HEAD" or status in (204, 304) or status < 200
        if no_body:
            framing = b"Content-Length: " + content_length + b"\r\n" if content_length else b""
        elif content_length is not None and not filters:
            framing = b"Content-Length: " + content_length + b"\r\n"
        elif ctx.http_version == "1.1":
            framing = b"Transfer-Encoding: chunked\r\n"
            exchange.chunked_out = True
        else:
            framing = b""
            ctx.keep_alive = False  # HTTP/1.0 client: a close-delimited body
        if headers_done:  # async header filters already worked on the decoded list
            head = self._response_head(ctx, ctx.response_status, ctx.response_headers, framing)
        else:
            filtered = raw_headers
            # Decoded only if a plugin (or the log phase) looks at them: see `resp_headers`.
            ctx.raw_response_headers = filtered
            ctx.resp_extra = self._add_gateway_headers
            ctx.response_headers = []
            if chain is not None and chain.header_filter:
                self._header_filter_sync(ctx, chain)
            overlay = ctx.resp_set
            if overlay and ctx.raw_response_headers is not None and not _GATEWAY_HEADERS.isdisjoint(overlay):
                ctx.resp_headers()  # a plugin overrides a gateway header: take the general path
            if ctx.raw_response_headers is None:
                # A plugin read or changed the headers: write the list it worked on.
                head = self._response_head(ctx, ctx.response_status, ctx.response_headers, framing)
            else:
                if overlay:
                    names = {k.encode("latin-1") for k in overlay}
                    filtered = [(k, v) for k, v in filtered if k.lower() not in names]
                    filtered += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in overlay.values()]
                head = self._fast_response_head(ctx, status, filtered, framing)
        exchange.filters = filters
        exchange.ready = True
        exchange.out.append(head)
        if not no_body:
            for chunk in exchange.body_chunks:
                exchange.frame(chunk)
        exchange.body_chunks = []
        if exchange.client.write_paused:
            exchange.upstream.pause_reading()

    def _fast_response_head(
        self, ctx: RequestContext, status: int, raw_headers: list[tuple[bytes, bytes]], framing: bytes
    ) -> bytes:
        """The response head straight from the upstream's (filtered) header bytes, when no plugin
        read or changed them."""
        out = [
            _STATUS_LINES.get(status) or f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n".encode()
        ]
        for name, value in raw_headers:
            out += (name, b": ", value, b"\r\n")
        if self.latency_tokens:
            up = ctx.t_upstream_start
            out.append(
                b"X-Fhirgate-Upstream-Latency: %d\r\nX-Fhirgate-Proxy-Latency: %d\r\n"
                % (int((ctx.t_upstream_end_headers - up) * 1000), int((up - ctx.t_start) * 1000))
            )
        if self._via_resp:
            out.append(self._via_resp)
        if self.request_id_header:
            out += (b"X-Fhirgate-Request-Id: ", ctx.request_id.encode(), b"\r\n")
        out.append(framing)
        if not ctx.keep_alive:
            out.append(b"Connection: close\r\n")
        elif ctx.http_version == "1.0":
            out.append(b"Connection: keep-alive\r\n")
        out.append(b"\r\n")
        return b"".join(out)

    def _finish_body(self, ctx: RequestContext, exchange: Exchange) -> None:
        if exchange.filters:
            chunk = b""
            for step in exchange.filters:
                chunk = step.hook(self.pdk(ctx, step), chunk, True)
            if chunk:
                ctx.response_size += len(chunk)
                exchange.out.append(b"%x\r\n%b\r\n" % (len(chunk), chunk) if exchange.chunked_out else chunk)
        if exchange.chunked_out:
            exchange.out.append(b"0\r\n\r\n")

    def finish(self, exchange: Exchange) -> None:
        """The upstream's response is complete and its head was processed."""
        ctx = exchange.ctx
        client = exchange.client
        try:
            self._finish_body(ctx, exchange)
        except Exception:
            log.exception("body_filter failed")
            exchange.out.clear()
            client.abort()
        exchange.flush()
        conn = exchange.upstream
        if exchange.keep_alive and ctx.body_complete and exchange.error is None:
            self.pool.release(conn)
        else:
            conn.abandon()
        ctx.body_sink = None
        self._finalize(ctx)
        client.request_done(ctx, close=not ctx.keep_alive)

    # --- client events ---------------------------------------------------------------------
    def client_gone(self, ctx: RequestContext) -> None:
        """The client closed its connection: free the upstream connection now."""
        exchange = self.exchanges.pop(ctx, None)
        if exchange is not None and not exchange.complete:
            exchange.error = exchange.error or _ClientGone()
            exchange.upstream.abandon()
            self._finalize(ctx)
        waiter = ctx._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(_ClientGone())

    def client_write_paused(self, ctx: RequestContext) -> None:
        exchange = self.exchanges.get(ctx)
        if exchange is not None and exchange.ready:
            exchange.upstream.pause_reading()

    def client_write_resumed(self, ctx: RequestContext) -> None:
        exchange = self.exchanges.get(ctx)
        if exchange is not None:
            exchange.last_activity = exchange.loop.time()
            exchange.upstream.resume_reading()

    def abort_request_body(self, ctx: RequestContext, refusal: GatewayExit) -> None:
        """The client's body stopped (timeout) or broke (bad chunk): free the upstream connection
        and answer `refusal` if no response has started; the connection then closes."""
        ctx.keep_alive = False
        exchange = self.exchanges.get(ctx)
        if exchange is not None and not exchange.complete:
            if not exchange.ready and exchange.head is None:
                exchange.error = refusal
                exchange.upstream.abandon()
                self.upstream_failed(exchange)
                return
            # The upstream already answered: cut everything.
            exchange.upstream.abandon()
            self.exchanges.pop(ctx, None)
            if ctx.conn is not None:
                ctx.conn.abort()
            self._finalize(ctx)
            return
        # Not yet proxying (plugins running, or connecting): the request stops at its next step.
        ctx.body_error = refusal
        waiter = ctx._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(refusal)

    # --- gateway-made responses ------------------------------------------------------------
    def _response_head(
        self, ctx: RequestContext, status: int, headers: list[tuple[str, str]], framing: bytes
    ) -> bytes:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in headers]
        head = "".join(lines).encode("latin-1") + framing
        if not ctx.keep_alive:
            head += b"Connection: close\r\n"
        elif ctx.http_version == "1.0":
            head += b"Connection: keep-alive\r\n"
        return head + b"\r\n"

    def _exit(self, ctx: RequestContext, exc: GatewayExit) -> None:
        """Answer with a gateway-made response (a plugin's exit or a gateway error)."""
        client = ctx.conn
        assert client is not None
        status, headers, body = dialect.render(exc, self._is_fhir(ctx))
        ctx.response_source = "exit"
        ctx.response_status = status
        headers.insert(0, ("Date", self._http_date()))
        if self.server_tokens:
            headers.append(("Server", SERVER_TOKEN))
        if self.request_id_header and ctx.request_id:
            headers.append(("X-Fhirgate-Request-Id", ctx.request_id))
        if self.latency_tokens:
            headers.append(("X-Fhirgate-Response-Latency", str(int((_now() - ctx.t_start) * 1000))))
        # Headers a plugin set before exiting (e.g. CORS) are kept, as in Kong.
        ctx.response_headers = [*ctx.response_headers, *headers] if ctx.response_headers else headers
        exchange = self.exchanges.pop(ctx, None)
        if exchange is not None:
            exchange.upstream.abandon()
        chain = ctx.chain
        if chain is not None and chain.header_filter:
            if chain.any_async_header_filter:
                self._spawn(self._exit_async(ctx, body))
                return
            try:
                self._header_filter_sync(ctx, chain)
            except GatewayExit:
                pass  # a response is already being produced
            except Exception:
                log.exception("a header_filter hook failed while answering %s", status)
        self._write_exit(ctx, status, body)

    async def _exit_async(self, ctx: RequestContext, body: bytes) -> None:
        chain = ctx.chain
        assert chain is not None
        try:
            await self._header_filter_async(ctx, chain)
        except GatewayExit:
            pass
        except Exception:
            log.exception("header_filter failed")
        self._write_exit(ctx, ctx.response_status, body)

    def _write_exit(self, ctx: RequestContext, status: int, body: bytes) -> None:
        client = ctx.conn
        assert client is not None
        if not ctx.body_complete:
            # Never ask for (or wait for) a body we refuse (RFC 9110 10.1.1): close afterwards.
            ctx.keep_alive = False
        no_body = ctx.method == "HEAD" or status in (204, 304)
        framing = b"" if no_body and not body else b"Content-Length: %d\r\n" % len(body)
        head = self._response_head(ctx, status, ctx.response_headers, framing)
        ctx.response_size = 0 if no_body else len(body)
        client.write(head if no_body else head + body)
        self._finalize(ctx)
        client.request_done(ctx, close=not ctx.keep_alive)

    def _settle(self, ctx: RequestContext, exc: Exception) -> None:
        """Where a request whose processing raised ends: an exit is answered, a gone client is
        finalized, anything else is a 500 (call from the `except` block, for the traceback)."""
        if isinstance(exc, GatewayExit):
            self._exit(ctx, exc)
        elif isinstance(exc, _ClientGone):
            self._finalize(ctx)
        else:
            self._crash(ctx)

    def _crash(self, ctx: RequestContext) -> None:
        log.exception("unexpected error handling %s %s", ctx.method, ctx.raw_path)
        client = ctx.conn
        if ctx.response_status == 0 and client is not None and not client.closing:
            try:
                ctx.chain = None
                self._exit(ctx, GatewayExit(500, {"message": MSG_UNEXPECTED}))
                return
            except Exception:
                log.exception("could not answer 500")
        if client is not None:
            client.abort()
        self._finalize(ctx)

    def _header_filter_sync(self, ctx: RequestContext, chain: Chain) -> None:
        for step in chain.header_filter:
            step.hook(self.pdk(ctx, step))

    async def _header_filter_async(self, ctx: RequestContext, chain: Chain) -> None:
        for step in chain.header_filter:
            res = step.hook(self.pdk(ctx, step))
            if step.is_async:
                await res

    def write_protocol_error(self, client: ClientProtocol, status: int, message: str) -> None:
        """A request too malformed to route: Kong JSON (or OperationOutcome if asked), then close."""
        ctx = RequestContext()
        ctx.keep_alive = False
        ctx.request_id = self._new_request_id()
        ctx.headers = list(client.pending_headers)
        fhir = self._is_fhir(ctx)
        status, headers, body = dialect.render(GatewayExit(status, {"message": message}), fhir)
        headers.insert(0, ("Date", self._http_date()))
        if self.server_tokens:
            headers.append(("Server", SERVER_TOKEN))
        head = self._response_head(ctx, status, headers, b"Content-Length: %d\r\n" % len(body))
        client.write(head + body)

    # --- end of a request ------------------------------------------------------------------
    def _finalize(self, ctx: RequestContext) -> None:
        """Exactly once per request: timings, the log phase (off the client's latency)."""
        if ctx.finalized:
            return
        ctx.finalized = True
        self.exchanges.pop(ctx, None)
        ctx.t_end = _now()
        chain = ctx.chain
        if (chain is not None and chain.log) or self.access_log is not None:
            self.loop.call_soon(self._log_phase, ctx, chain)
        else:
            ctx.pdk = None  # PDK <-> context is a cycle: break it so refcounting frees both
        self.active.discard(ctx)
        if self.draining and not self.active and self.on_idle is not None:
            self.loop.call_soon(self.on_idle)

    def _log_phase(self, ctx: RequestContext, chain: Chain | None) -> None:
        if chain is not None:
            for step in chain.log:
                try:
                    res = step.hook(self.pdk(ctx, step))
                    if step.is_async:
                        self._spawn(res)
                except Exception:
                    log.exception("plugin %s failed in the log phase", step.spec.name)
        if self.access_log is not None:
            self.access_log.write(ctx)
        ctx.pdk = None  # PDK <-> context is a cycle: break it so refcounting frees both

    # --- lifecycle -------------------------------------------------------------------------
    def in_flight(self) -> int:
        return len(self.active)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self.pool.close()
        self.state.pipeline.close()


class _NeedsAsync(Exception):
    """An access hook has to wait: what is left of the access phase."""

    def __init__(
        self, pending: Coroutine[Any, Any, Any], steps: list[Step], consumer: Any, priority: int
    ) -> None:
        self.pending = pending
        self.steps = steps
        self.consumer = consumer
        self.priority = priority


_GATEWAY_HEADERS = frozenset(
    {"via", "x-fhirgate-upstream-latency", "x-fhirgate-proxy-latency", "x-fhirgate-request-id"}
)
_SWEEP_INTERVAL = 0.05
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
