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
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING

from fhirgate import __version__, clock
from fhirgate.errors import (
    MSG_BAD_GATEWAY,
    MSG_NO_ROUTE,
    MSG_TIMEOUT,
    MSG_UNEXPECTED,
    GatewayExit,
)
from fhirgate.gateway import dialect
from fhirgate.gateway.context import RequestContext
from fhirgate.gateway.normalize import BadPathError, normalize_path
from fhirgate.gateway.pdk import PDK
from fhirgate.gateway.pipeline import Chain, Pipeline, PluginSpec, Step
from fhirgate.gateway.router import Router
from fhirgate.gateway.upstream import PoolKey, UpstreamConnection, UpstreamPool, UpstreamResponseError

if TYPE_CHECKING:
    from fhirgate.config import GatewayConfig
    from fhirgate.gateway.accesslog import AccessLog
    from fhirgate.gateway.server import ClientProtocol
    from fhirgate.settings import Settings

log = logging.getLogger("fhirgate.proxy")

SERVER_TOKEN = f"fhirgate/{__version__}"
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
_RESP_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


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
            specs.append(PluginSpec(p.id, p.name, p.route_id, p.service_id, p.consumer_id, handler))
        self.pipeline = Pipeline(specs)
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
    """One request/response with an upstream connection; receives the upstream's callbacks."""

    __slots__ = (
        "body_chunks",
        "chunked_out",
        "client",
        "complete",
        "ctx",
        "error",
        "filters",
        "gateway",
        "head",
        "keep_alive",
        "last_activity",
        "loop",
        "streaming",
        "timeout",
        "timer",
        "upstream",
        "upstream_paused_writing",
        "waiter",
        "write_timeout",
    )

    def __init__(
        self,
        gateway: Gateway,
        ctx: RequestContext,
        client: ClientProtocol,
        upstream: UpstreamConnection,
        target: UpstreamTarget,
    ) -> None:
        self.gateway = gateway
        self.loop = gateway.loop
        self.ctx = ctx
        self.client = client
        self.upstream = upstream
        self.head: tuple[int, list[tuple[bytes, bytes]]] | None = None
        self.keep_alive = False
        self.body_chunks: list[bytes] = []
        self.complete = False
        self.error: BaseException | None = None
        self.streaming = False
        self.chunked_out = False
        self.filters: list[Step] = []
        self.waiter: asyncio.Future[None] | None = None
        self.timeout = target.read_timeout
        self.write_timeout = target.write_timeout
        self.last_activity = self.loop.time()
        self.upstream_paused_writing = False
        self.timer: asyncio.TimerHandle | None = self.loop.call_at(
            self.last_activity + self.timeout, self._on_timer
        )

    # --- timers ----------------------------------------------------------------------------
    def _on_timer(self) -> None:
        self.timer = None
        if self.complete or self.error is not None:
            return
        limit = self.write_timeout if self.upstream_paused_writing else self.timeout
        deadline = self.last_activity + limit
        if self.loop.time() < deadline:
            self.timer = self.loop.call_at(deadline, self._on_timer)
            return
        self.on_upstream_error(TimeoutError())

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        self.waiter = self.loop.create_future()
        await self.waiter
        self.waiter = None

    # --- request body to the upstream ------------------------------------------------------
    def send_body(self, chunk: bytes) -> None:
        self.last_activity = self.loop.time()
        if self.ctx.chunked:
            if chunk:
                self.upstream.writelines([b"%x\r\n" % len(chunk), chunk, b"\r\n"])
            else:
                self.upstream.write(b"0\r\n\r\n")
        elif chunk:
            self.upstream.write(chunk)

    # --- upstream callbacks ----------------------------------------------------------------
    def on_upstream_head(self, status: int, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        self.last_activity = self.loop.time()
        self.ctx.t_upstream_end_headers = clock.now()
        self.head = (status, headers)
        self.keep_alive = keep_alive
        self._wake()

    def on_upstream_body(self, chunk: bytes) -> None:
        self.last_activity = self.loop.time()
        if self.streaming:
            self._forward(chunk)
        else:
            self.body_chunks.append(chunk)

    def _forward(self, chunk: bytes) -> None:
        for step in self.filters:
            chunk = step.hook(self.gateway.pdk(self.ctx, step), chunk, False)
            if not chunk:
                return
        self.ctx.response_size += len(chunk)
        if self.chunked_out:
            self.client.writelines([b"%x\r\n" % len(chunk), chunk, b"\r\n"])
        else:
            self.client.write(chunk)

    def on_upstream_complete(self) -> None:
        self.complete = True
        self._stop_timer()
        if self.streaming:
            self.gateway.finish_streamed(self)
        else:
            self._wake()

    def on_upstream_error(self, exc: BaseException) -> None:
        if self.complete or self.error is not None:
            return
        self.error = exc
        self._stop_timer()
        self.upstream.abandon()
        if self.streaming:
            # The head is already out: all we can do is cut the client connection.
            self.gateway.abort_streamed(self)
        self._wake()

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
        self.tasks: set[asyncio.Task[None]] = set()
        self.access_log = access_log
        tokens = {t.lower() for t in settings.headers}
        self.server_tokens = "server_tokens" in tokens
        self.latency_tokens = "latency_tokens" in tokens
        self.request_id_header = "request_id" in tokens
        self._via = f"1.1 {SERVER_TOKEN}".encode() if self.server_tokens else b""
        self._trusted = [ipaddress.ip_network(n, strict=False) for n in settings.trusted_ips]
        self._trusted_cache: dict[str, bool] = {}
        self._real_ip_header = settings.real_ip_header.lower()
        self._rid_prefix = os.urandom(8).hex()
        self._rid_counter = 0
        self._date_cache = (0, "")
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
        kong: PDK | None = ctx.shared.get("__pdk")
        if kong is None:
            kong = PDK(ctx)
            ctx.shared["__pdk"] = kong
        if step is not None:
            plugin_ctx = ctx.shared.setdefault("__plugin_ctx", {})
            kong.for_plugin(plugin_ctx.setdefault(step.spec.id, {}))
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

    # --- entry point -----------------------------------------------------------------------
    def handle(self, ctx: RequestContext) -> None:
        task = self.loop.create_task(self._run(ctx))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, ctx: RequestContext) -> None:
        state = self.state
        chain: Chain | None = None
        client = ctx.conn
        assert client is not None
        self.requests_total += 1
        ctx.request_id = self._new_request_id()
        try:
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
                    for step in pipeline.rewrite:
                        res = step.hook(self.pdk(ctx, step))
                        if step.is_async:
                            await res
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
                if not pipeline.empty:
                    chain = pipeline.chain(route.id, service.id if service is not None else None)
                    if chain.access:
                        chain = await self._access(ctx, pipeline, chain)
                if service is None:
                    raise GatewayExit(503, {"message": "no Service found with those values"})
                if ctx.body_error is not None:
                    raise ctx.body_error
                await self._proxy(ctx, state, chain, client)
            except GatewayExit as exc:
                await self._respond_exit(ctx, exc, chain, client)
        except _ClientGone:
            pass
        except asyncio.CancelledError:
            client.abort()
            raise
        except Exception:
            log.exception("unexpected error handling %s %s", ctx.method, ctx.raw_path)
            if ctx.response_status == 0:
                try:
                    await self._respond_exit(ctx, GatewayExit(500, {"message": MSG_UNEXPECTED}), None, client)
                except Exception:
                    client.abort()
            else:
                client.abort()
        finally:
            self.exchanges.pop(ctx, None)
            ctx.t_end = clock.now()
            if (chain is not None and chain.log) or self.access_log is not None:
                self.loop.call_soon(self._log_phase, ctx, chain)
            if self.draining and not self.tasks - {asyncio.current_task()} and self.on_idle is not None:
                self.loop.call_soon(self.on_idle)

    def _real_ip(self, ctx: RequestContext) -> str:
        values = ctx.header_map().get(self._real_ip_header)
        if not values:
            return ctx.client_ip
        value = values[-1]
        if self._real_ip_header == "x-forwarded-for":
            value = value.rsplit(",", 1)[-1]
        return value.strip() or ctx.client_ip

    async def _access(self, ctx: RequestContext, pipeline: Pipeline, chain: Chain) -> Chain:
        steps = chain.access
        i = 0
        consumer = None
        while i < len(steps):
            step = steps[i]
            res = step.hook(self.pdk(ctx, step))
            if step.is_async:
                await res
            i += 1
            if ctx.consumer is not consumer and pipeline.has_consumer_scoped:
                consumer = ctx.consumer
                route, service = ctx.route, ctx.service
                chain = pipeline.chain(
                    route.id,
                    service.id if service is not None else None,
                    getattr(consumer, "id", None),
                )
                # Continue with the plugins of lower priority in the consumer's chain.
                done = step.priority
                steps = [s for s in chain.access if s.priority < done]
                i = 0
        return chain

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
        conn_named: frozenset[bytes] = _NONE
        for name, value in ctx.headers:
            if len(name) == 10 and name.lower() == b"connection":
                # Headers named by Connection are hop-by-hop too (RFC 9110 7.6.1).
                conn_named = conn_named | {t.strip().lower() for t in value.split(b",")}
        trusted = bool(self._trusted) and self.is_trusted(ctx.client_ip)
        fwd: dict[bytes, bytes] = {}
        for name, value in ctx.headers:
            lname = name.lower()
            if lname in _HOP_BY_HOP or lname in conn_named:
                continue
            if lname in _FORWARDED:
                if trusted and lname not in fwd:
                    fwd[lname] = value
                continue
            if ops and lname.decode("latin-1") in ops:
                continue
            out += (name, b": ", value, b"\r\n")
        for op_name, op_value in ops.values():
            if op_value is not None:
                out += (op_name.encode("latin-1"), b": ", op_value.encode("latin-1"), b"\r\n")
        client_ip = ctx.client_ip.encode()
        xff = fwd.get(b"x-forwarded-for")
        out += (b"X-Real-IP: ", ctx.forwarded_ip.encode(), b"\r\n")
        out += (b"X-Forwarded-For: ", (xff + b", " + client_ip) if xff else client_ip, b"\r\n")
        out += (b"X-Forwarded-Proto: ", fwd.get(b"x-forwarded-proto") or ctx.scheme.encode(), b"\r\n")
        out += (
            b"X-Forwarded-Host: ",
            fwd.get(b"x-forwarded-host") or ctx.host_name.encode("latin-1"),
            b"\r\n",
        )
        out += (
            b"X-Forwarded-Port: ",
            fwd.get(b"x-forwarded-port") or str(ctx.listener_port).encode(),
            b"\r\n",
        )
        out += (b"X-Forwarded-Path: ", fwd.get(b"x-forwarded-path") or ctx.path.encode("latin-1"), b"\r\n")
        prefix = fwd.get(b"x-forwarded-prefix")
        if prefix:
            out += (b"X-Forwarded-Prefix: ", prefix, b"\r\n")
        if self._via:
            out += (b"Via: ", self._via, b"\r\n")
        if ctx.chunked:
            out.append(b"Transfer-Encoding: chunked\r\n")
        elif ctx.content_length is not None:
            out += (b"Content-Length: ", str(ctx.content_length).encode(), b"\r\n")
        out.append(b"\r\n")
        return b"".join(out)

    async def _proxy(
        self, ctx: RequestContext, state: GatewayState, chain: Chain | None, client: ClientProtocol
    ) -> None:
        service = ctx.service
        target = state.targets[service.id]
        head = self._request_head(ctx, target)
        tries = 0
        while True:
            tries += 1
            conn = self.pool.take_idle(target.key)
            reused = conn is not None
            if conn is None:
                try:
                    conn = await self.pool.connect(target.key, connect_timeout=target.connect_timeout)
                except (TimeoutError, OSError) as exc:
                    timeout = isinstance(exc, TimeoutError)
                    ctx.tries.append({"balancer_latency": 0, "ip": target.key[1], "port": target.key[2]})
                    if client._closing:
                        raise _ClientGone() from None
                    if tries <= target.retries:
                        continue
                    log.error("upstream %s:%s: %s", target.key[1], target.key[2], exc or type(exc).__name__)
                    if timeout:
                        raise GatewayExit(504, {"message": MSG_TIMEOUT}) from None
                    raise GatewayExit(502, {"message": MSG_BAD_GATEWAY}) from None
            if client._closing:
                self.pool.release(conn)
                raise _ClientGone()
            if ctx.body_error is not None:
                self.pool.release(conn)
                raise ctx.body_error
            ctx.tries.append({"ip": target.key[1], "port": target.key[2]})
            exchange = Exchange(self, ctx, client, conn, target)
            self.exchanges[ctx] = exchange
            conn.begin(exchange, head_only=ctx.method == "HEAD")
            if not ctx.t_upstream_start:
                ctx.t_upstream_start = clock.now()
            replayable = ctx.body_complete
            if ctx.body_complete:
                body = ctx.body_buffer
                if ctx.chunked:
                    framed = [head]
                    for chunk in body:
                        framed += (b"%x\r\n" % len(chunk), chunk, b"\r\n")
                    framed.append(b"0\r\n\r\n")
                    conn.writelines(framed)
                elif body:
                    conn.writelines([head, *body])
                else:
                    conn.write(head)
            else:
                chunks = ctx.take_buffered_body()
                if ctx.chunked:
                    framed = [head]
                    for chunk in chunks:
                        framed += (b"%x\r\n" % len(chunk), chunk, b"\r\n")
                    conn.writelines(framed)
                else:
                    conn.writelines([head, *chunks])
                ctx.body_sink = exchange.send_body
                if ctx.expect_continue:
                    client.send_continue(ctx)
                else:
                    client.resume_body()
            if exchange.head is None and exchange.error is None:
                await exchange.wait()
            if exchange.head is None:
                err = exchange.error
                if isinstance(err, (_ClientGone, GatewayExit)):
                    raise err
                if (
                    reused
                    and replayable
                    and not conn.got_bytes
                    and isinstance(err, UpstreamResponseError)
                    and tries <= target.retries + 1
                ):
                    # A pooled connection the upstream had closed (keep-alive race): retry.
                    self.exchanges.pop(ctx, None)
                    continue
                if isinstance(err, TimeoutError):
                    log.error("upstream timed out (%s:%s)", target.key[1], target.key[2])
                    raise GatewayExit(504, {"message": MSG_TIMEOUT})
                log.error("upstream error (%s:%s): %s", target.key[1], target.key[2], err)
                raise GatewayExit(502, {"message": MSG_BAD_GATEWAY})
            break
        await self._respond_upstream(ctx, exchange, chain, client)

    async def _respond_upstream(
        self, ctx: RequestContext, exchange: Exchange, chain: Chain | None, client: ClientProtocol
    ) -> None:
        assert exchange.head is not None
        status, raw_headers = exchange.head
        ctx.upstream_status = status
        ctx.response_status = status
        ctx.response_source = "service"
        headers: list[tuple[str, str]] = []
        content_length: str | None = None
        conn_named: set[str] | None = None
        for bname, bvalue in raw_headers:
            name = bname.decode("latin-1")
            lname = name.lower()
            if lname in _RESP_HOP_BY_HOP:
                if lname == "connection":
                    conn_named = conn_named or set()
                    conn_named.update(t.strip().lower() for t in bvalue.decode("latin-1").split(","))
                continue
            if lname == "content-length":
                content_length = bvalue.decode("latin-1")
                continue
            headers.append((name, bvalue.decode("latin-1")))
        if conn_named:
            headers = [(k, v) for k, v in headers if k.lower() not in conn_named]
        if self.latency_tokens:
            t0 = ctx.t_start
            up = ctx.t_upstream_start
            headers.append(
                ("X-Fhirgate-Upstream-Latency", str(int((ctx.t_upstream_end_headers - up) * 1000)))
            )
            headers.append(("X-Fhirgate-Proxy-Latency", str(int((up - t0) * 1000))))
        if self._via:
            headers.append(("Via", "1.1 " + SERVER_TOKEN))
        if self.request_id_header:
            headers.append(("X-Fhirgate-Request-Id", ctx.request_id))
        ctx.response_headers = headers
        if chain is not None and chain.header_filter:
            await self._header_filter(ctx, chain)
            headers = ctx.response_headers
        no_body = ctx.method == "HEAD" or status in (204, 304) or status < 200
        filters = chain.body_filter if chain is not None else []
        framing: bytes
        if no_body:
            framing = b"Content-Length: " + content_length.encode() + b"\r\n" if content_length else b""
        elif content_length is not None and not filters:
            framing = b"Content-Length: " + content_length.encode() + b"\r\n"
        elif ctx.http_version == "1.1":
            framing = b"Transfer-Encoding: chunked\r\n"
            exchange.chunked_out = True
        else:
            framing = b""
            ctx.keep_alive = False  # HTTP/1.0 close-delimited body
        head = self._response_head(ctx, status, headers, framing)
        exchange.filters = filters
        out = [head]
        chunks = exchange.body_chunks
        exchange.body_chunks = []
        if chunks and not no_body:
            for chunk in chunks:
                for step in filters:
                    chunk = step.hook(self.pdk(ctx, step), chunk, False)
                if not chunk:
                    continue
                ctx.response_size += len(chunk)
                if exchange.chunked_out:
                    out += (b"%x\r\n" % len(chunk), chunk, b"\r\n")
                else:
                    out.append(chunk)
        if exchange.complete:
            out += self._finish_body(ctx, exchange)
            client.writelines(out)
            self._done(ctx, exchange, client)
            return
        client.writelines(out)
        if exchange.error is not None:
            client.abort()
            return
        exchange.streaming = True
        if client.write_paused:
            exchange.upstream.pause_reading()
        await exchange.wait()

    def _finish_body(self, ctx: RequestContext, exchange: Exchange) -> list[bytes]:
        tail: list[bytes] = []
        if exchange.filters:
            chunk = b""
            for step in exchange.filters:
                chunk = step.hook(self.pdk(ctx, step), chunk, True)
            if chunk:
                ctx.response_size += len(chunk)
                tail += (b"%x\r\n" % len(chunk), chunk, b"\r\n") if exchange.chunked_out else (chunk,)
        if exchange.chunked_out:
            tail.append(b"0\r\n\r\n")
        return tail

    def _done(self, ctx: RequestContext, exchange: Exchange, client: ClientProtocol) -> None:
        conn = exchange.upstream
        request_complete = ctx.body_complete
        if exchange.keep_alive and request_complete and exchange.error is None:
            self.pool.release(conn)
        else:
            conn.abandon()
        ctx.body_sink = None
        client.request_done(ctx, close=not ctx.keep_alive)

    def finish_streamed(self, exchange: Exchange) -> None:
        ctx = exchange.ctx
        tail = self._finish_body(ctx, exchange)
        if tail:
            exchange.client.writelines(tail)
        self._done(ctx, exchange, exchange.client)
        exchange._wake()

    def abort_streamed(self, exchange: Exchange) -> None:
        exchange.client.abort()

    # --- client events ---------------------------------------------------------------------
    def client_gone(self, ctx: RequestContext) -> None:
        """The client closed its connection: free the upstream connection now."""
        exchange = self.exchanges.pop(ctx, None)
        if exchange is not None and not exchange.complete:
            exchange.error = exchange.error or _ClientGone()
            exchange._stop_timer()
            exchange.upstream.abandon()
            exchange._wake()
        waiter = ctx._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(_ClientGone())

    def client_write_paused(self, ctx: RequestContext) -> None:
        exchange = self.exchanges.get(ctx)
        if exchange is not None and exchange.streaming:
            exchange.upstream.pause_reading()

    def client_write_resumed(self, ctx: RequestContext) -> None:
        exchange = self.exchanges.get(ctx)
        if exchange is not None:
            exchange.last_activity = exchange.loop.time()
            exchange.upstream.resume_reading()

    def abort_request_body(self, ctx: RequestContext, refusal: GatewayExit) -> None:
        """The client's body stopped (timeout) or broke (bad chunk): free the upstream connection
        and answer `refusal` if no response has started; the connection then closes."""
        timeout = refusal
        ctx.keep_alive = False
        exchange = self.exchanges.get(ctx)
        if exchange is not None and not exchange.complete:
            if exchange.head is None:
                exchange.error = timeout
                exchange._stop_timer()
                exchange.upstream.abandon()
                exchange._wake()
                return
            # The upstream already answered: cut everything.
            exchange.upstream.abandon()
            if ctx.conn is not None:
                ctx.conn.abort()
            return
        # Not yet proxying (plugins running, or connecting): the request stops at its next step.
        ctx.body_error = timeout
        waiter = ctx._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(timeout)

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

    async def _respond_exit(
        self, ctx: RequestContext, exc: GatewayExit, chain: Chain | None, client: ClientProtocol
    ) -> None:
        status, headers, body = dialect.render(exc, self._is_fhir(ctx))
        ctx.response_source = "exit"
        ctx.response_status = status
        headers.insert(0, ("Date", self._http_date()))
        if self.server_tokens:
            headers.append(("Server", SERVER_TOKEN))
        if self.request_id_header and ctx.request_id:
            headers.append(("X-Fhirgate-Request-Id", ctx.request_id))
        if self.latency_tokens:
            headers.append(("X-Fhirgate-Response-Latency", str(int((clock.now() - ctx.t_start) * 1000))))
        ctx.response_headers = headers
        if chain is not None and chain.header_filter:
            try:
                await self._header_filter(ctx, chain)
            except GatewayExit:
                pass  # a response is already being produced
        if not ctx.body_complete and ctx.expect_continue:
            # The client is waiting to send a body we refuse: never ask for it (RFC 9110 10.1.1).
            ctx.keep_alive = False
        elif not ctx.body_complete:
            ctx.keep_alive = False
        no_body = ctx.method == "HEAD" or status in (204, 304)
        framing = b"" if no_body and not body else b"Content-Length: %d\r\n" % len(body)
        head = self._response_head(ctx, status, ctx.response_headers, framing)
        ctx.response_size = 0 if no_body else len(body)
        client.writelines([head] if no_body else [head, body])
        exchange = self.exchanges.pop(ctx, None)
        if exchange is not None:
            exchange.upstream.abandon()
        client.request_done(ctx, close=not ctx.keep_alive)

    async def _header_filter(self, ctx: RequestContext, chain: Chain) -> None:
        for step in chain.header_filter:
            res = step.hook(self.pdk(ctx, step))
            if step.is_async:
                await res

    def write_protocol_error(self, client: ClientProtocol, status: int, message: str) -> None:
        """A request too malformed to route: Kong JSON (or OperationOutcome if asked), then close."""
        ctx = RequestContext()
        ctx.keep_alive = False
        ctx.request_id = self._new_request_id()
        ctx.headers = list(client._headers)
        fhir = self._is_fhir(ctx)
        status, headers, body = dialect.render(GatewayExit(status, {"message": message}), fhir)
        headers.insert(0, ("Date", self._http_date()))
        if self.server_tokens:
            headers.append(("Server", SERVER_TOKEN))
        head = self._response_head(ctx, status, headers, b"Content-Length: %d\r\n" % len(body))
        client.writelines([head, body])

    # --- log phase -------------------------------------------------------------------------
    def _log_phase(self, ctx: RequestContext, chain: Chain | None) -> None:
        if chain is not None:
            for step in chain.log:
                try:
                    res = step.hook(self.pdk(ctx, step))
                    if step.is_async:
                        task = self.loop.create_task(res)
                        self.tasks.add(task)
                        task.add_done_callback(self.tasks.discard)
                except Exception:
                    log.exception("plugin %s failed in the log phase", step.spec.name)
        if self.access_log is not None:
            self.access_log.write(ctx)

    # --- lifecycle -------------------------------------------------------------------------
    def in_flight(self) -> int:
        return len(self.tasks)

    def close(self) -> None:
        self.pool.close()
        self.state.pipeline.close()
