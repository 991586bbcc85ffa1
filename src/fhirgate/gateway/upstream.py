"""Pooled keep-alive HTTP/1.1 client to upstream services (asyncio Protocol + httptools).

One `UpstreamPool` per worker. Idle connections are kept per (scheme, host, port, TLS verify)
key and reused LIFO; a connection is only returned to the pool after a complete response that
allowed keep-alive. HTTPS upstreams are verified (system trust store or
`ssl_trusted_certificate`) with SNI, unless the service sets `tls_verify: false`.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Any, Protocol, cast

import httptools

from fhirgate import clock


class ExchangeSink(Protocol):
    """Receives what the upstream sends for one request (implemented by the proxy)."""

    def on_upstream_head(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        content_length: bytes | None,
    ) -> None: ...
    def on_upstream_body(self, chunk: bytes) -> None: ...
    def on_upstream_complete(self) -> None: ...
    def on_upstream_error(self, exc: BaseException) -> None: ...
    def flush(self) -> None: ...
    def on_upstream_pause_writing(self) -> None: ...
    def on_upstream_resume_writing(self) -> None: ...


# RFC 9110 7.6.1 hop-by-hop fields, and the framing the gateway sets itself.
_RESPONSE_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)


_RESPONSE_DROP_LENGTHS = frozenset(len(n) for n in _RESPONSE_DROP)
# Connection options that name no other header (RFC 9112 9.6, 9.3; upgrade is dropped anyway).
CONNECTION_OPTIONS = frozenset({b"keep-alive", b"close", b"upgrade", b""})


def end_to_end_headers(
    headers: list[tuple[bytes, bytes]],
) -> tuple[list[tuple[bytes, bytes]], bytes | None, bool]:
    """One pass over a response's headers: the end-to-end ones (hop-by-hop fields and those named
    by `Connection` dropped, framing removed: the gateway re-frames), the Content-Length value and
    whether the body is chunked."""
    out: list[tuple[bytes, bytes]] = []
    content_length: bytes | None = None
    chunked = False
    conn_named: set[bytes] | None = None
    for name, value in headers:
        if len(name) not in _RESPONSE_DROP_LENGTHS:  # most headers: no lower(), no hashing
            out.append((name, value))
            continue
        lname = name.lower()
        if lname in _RESPONSE_DROP:
            if lname == b"content-length":
                content_length = value
            elif lname == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif lname == b"connection":
                for token in value.split(b","):
                    token = token.strip().lower()
                    if token not in CONNECTION_OPTIONS:  # keep-alive/close: nothing more to drop
                        conn_named = conn_named or set()
                        conn_named.add(token)
            continue
        out.append((name, value))
    if conn_named:
        out = [(k, v) for k, v in out if k.lower() not in conn_named]
    return out, content_length, chunked


class UpstreamResponseError(Exception):
    """The upstream sent something that is not a valid HTTP/1.1 response, or closed early."""


PoolKey = tuple[str, str, int, bool]


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_headers",
        "_ignore_message",
        "_parser",
        "close_delimited",
        "closed",
        "got_bytes",
        "head_only",
        "idle_since",
        "key",
        "pool",
        "requests",
        "sink",
        "transport",
    )

    def __init__(self, pool: UpstreamPool, key: PoolKey) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.sink: ExchangeSink | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []
        self._ignore_message = False
        self.closed = False
        self.close_delimited = False
        self.requests = 0
        self.idle_since = 0.0
        self.head_only = False
        self.got_bytes = False

    # --- transport events ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports don't subclass it
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            # Bytes on an idle connection: the upstream is misbehaving; never reuse it.
            self.close()
            return
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.sink = None
            self.close()
            sink.on_upstream_error(UpstreamResponseError(f"invalid response from upstream: {exc}"))
            return
        sink.flush()

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        sink = self.sink
        if sink is not None:
            self.sink = None
            # A close-delimited body ends with the connection.
            try:
                self._parser.feed_data(b"")
            except httptools.HttpParserError:
                pass
            if self.close_delimited:
                sink.on_upstream_complete()
                sink.flush()
                return
            sink.on_upstream_error(
                UpstreamResponseError("upstream closed the connection" + (f": {exc}" if exc else ""))
            )

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.on_upstream_pause_writing()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.on_upstream_resume_writing()

    # --- parser callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status: int = self._parser.get_status_code()
        if 100 <= status < 200:
            # Interim responses (100 Continue, 103 Early Hints) are not forwarded.
            self._ignore_message = True
            return
        sink = self.sink
        if sink is None:
            return
        keep_alive = bool(self._parser.should_keep_alive())
        headers, content_length, chunked = end_to_end_headers(self._headers)
        close_delimited = (
            content_length is None and not chunked and status not in (204, 304) and not self.head_only
        )
        self.close_delimited = close_delimited
        sink.on_upstream_head(status, headers, keep_alive and not close_delimited, content_length)
        if self.head_only:
            # A response to HEAD has no body whatever its Content-Length says (RFC 9110 9.3.2).
            self._finish(sink)

    def on_body(self, body: bytes) -> None:
        sink = self.sink
        if sink is not None and not self._ignore_message:
            sink.on_upstream_body(body)

    def on_message_complete(self) -> None:
        if self._ignore_message:
            self._ignore_message = False
            return
        sink = self.sink
        if sink is not None:
            self._finish(sink)

    def _finish(self, sink: ExchangeSink) -> None:
        self.sink = None
        if self.head_only:
            self._parser = httptools.HttpResponseParser(self)
            self.head_only = False
        sink.on_upstream_complete()

    # --- use -------------------------------------------------------------------------------
    def begin(self, sink: ExchangeSink, head_only: bool) -> None:
        self.sink = sink
        self.head_only = head_only
        self.got_bytes = False
        self.close_delimited = False
        self._ignore_message = False
        self.requests += 1

    def abandon(self) -> None:
        """The exchange is over before the response ended: the connection cannot be reused."""
        self.sink = None
        self.close()

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not self.closed:
            transport.write(data)

    def writelines(self, data: list[bytes]) -> None:
        transport = self.transport
        if transport is not None and not self.closed:
            transport.writelines(data)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        self.pool.forget(self)


class UpstreamPool:
    """Idle keep-alive connections per upstream, plus connecting with timeouts."""

    def __init__(
        self,
        *,
        pool_size: int = 512,
        idle_timeout: float = 60.0,
        max_requests: int = 10000,
        ca_file: str | None = None,
    ) -> None:
        self.pool_size = pool_size
        self.idle_timeout = idle_timeout
        self.max_requests = max_requests
        self._idle: dict[PoolKey, list[UpstreamConnection]] = {}
        self._ca_file = ca_file
        self._ssl_verify: ssl.SSLContext | None = None
        self._ssl_noverify: ssl.SSLContext | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.connects = 0  # new connections opened (observability and tests)

    def ssl_context(self, verify: bool) -> ssl.SSLContext:
        if verify:
            if self._ssl_verify is None:
                ctx = ssl.create_default_context(cafile=self._ca_file)
                ctx.set_alpn_protocols(["http/1.1"])
                self._ssl_verify = ctx
            return self._ssl_verify
        if self._ssl_noverify is None:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.set_alpn_protocols(["http/1.1"])
            self._ssl_noverify = ctx
        return self._ssl_noverify

    def take_idle(self, key: PoolKey) -> UpstreamConnection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def connect(self, key: PoolKey, *, connect_timeout: float) -> UpstreamConnection:
        scheme, host, port, verify = key
        loop = asyncio.get_running_loop()
        ssl_ctx = self.ssl_context(verify) if scheme == "https" else None
        factory: Callable[[], UpstreamConnection] = lambda: UpstreamConnection(self, key)  # noqa: E731
        coro = loop.create_connection(
            factory, host, port, ssl=ssl_ctx, server_hostname=host if ssl_ctx is not None else None
        )
        _transport, conn = await asyncio.wait_for(coro, connect_timeout)
        self.connects += 1
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Return a connection whose last response completed and allowed keep-alive."""
        if conn.closed or self.pool_size == 0 or (self.max_requests and conn.requests >= self.max_requests):
            conn.close()
            return
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self.pool_size:
            conn.close()
            return
        conn.idle_since = clock.monotonic()
        idle.append(conn)
        if self._sweeper is None and self.idle_timeout > 0:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(min(self.idle_timeout, 5.0), self._sweep)

    def forget(self, conn: UpstreamConnection) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = clock.monotonic() - self.idle_timeout
        remaining = 0
        for idle in list(self._idle.values()):
            for conn in [c for c in idle if c.idle_since <= cutoff]:
                conn.close()
            remaining += len(idle)
        if remaining:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(min(self.idle_timeout, 5.0), self._sweep)

    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def close(self) -> None:
        for idle in list(self._idle.values()):
            for conn in list(idle):
                conn.close()
        self._idle.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


def upstream_info(conn: UpstreamConnection) -> dict[str, Any]:
    scheme, host, port, _ = conn.key
    return {"ip": host, "port": port, "scheme": scheme}
