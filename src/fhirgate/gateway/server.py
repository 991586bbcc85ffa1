"""The client side: an asyncio Protocol per connection, parsing HTTP/1.1 with httptools (llhttp).

Framing rules (RFC 9112) enforced here, before anything reaches a route or an upstream:
- llhttp (strict mode) refuses both Content-Length and Transfer-Encoding, duplicate or non-numeric
  Content-Length, bad chunk sizes, obs-fold, NUL / bare CR / bare LF in the head;
- we refuse a missing or repeated Host (RFC 9112 3.2), a transfer coding other than `chunked`
  (501), an oversize request line (414) and oversize headers (431).
Every such refusal is answered and the connection closed, so nothing after a malformed message is
ever interpreted.

Pipelined requests are handled one at a time and answered in order; the next request's bytes wait
in the kernel and the parser (reading is paused while a request is in flight and its body is not
needed).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from fhirgate.errors import (
    MSG_BAD_REQUEST,
    MSG_HEADERS_TOO_LARGE,
    MSG_NOT_IMPLEMENTED,
    MSG_REQUEST_TIMEOUT,
    MSG_URI_TOO_LONG,
    GatewayExit,
)
from fhirgate.gateway.context import RequestContext

if TYPE_CHECKING:
    from fhirgate.gateway.proxy import Gateway

log = logging.getLogger("fhirgate.server")

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_now = time.time  # request timings: see fhirgate.gateway.proxy
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}


class _Refuse(Exception):
    """Abort parsing: answer `status` with `message` and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ClientProtocol(asyncio.Protocol):
    """One client connection."""

    __slots__ = (
        "_body_paused",
        "_closing",
        "_eof",
        "_header_bytes",
        "_headers",
        "_paused",
        "_timer",
        "_timer_deadline",
        "_timer_kind",
        "_url",
        "_write_paused",
        "client_ip",
        "client_port",
        "current",
        "gateway",
        "listener_port",
        "loop",
        "parser",
        "queue",
        "receiving",
        "requests_served",
        "tls",
        "tls_version",
        "transport",
        "write_waiters",
    )

    def __init__(self, gateway: Gateway, tls: bool = False) -> None:
        self.gateway = gateway
        self.tls = tls
        self.tls_version: str | None = None
        self.loop = asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self._url: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self.queue: deque[RequestContext] = deque()
        self.current: RequestContext | None = None
        self.receiving: RequestContext | None = None
        self._paused = False
        self._body_paused = False
        self._write_paused = False
        self.write_waiters: list[asyncio.Future[None]] = []
        self._closing = False
        self._eof = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline = 0.0
        self._timer_kind = ""
        self.client_ip = ""
        self.client_port = 0
        self.listener_port = 0
        self.requests_served = 0

    # --- connection ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports don't subclass it
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip, self.client_port = peer[0], peer[1]
        if self.tls:
            ssl_object = transport.get_extra_info("ssl_object")
            self.tls_version = ssl_object.version() if ssl_object is not None else None
        local = transport.get_extra_info("sockname")
        if local:
            self.listener_port = local[1]
        self.gateway.connections.add(self)
        self._arm_timer("header", self.gateway.settings.client_header_timeout / 1000)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self.gateway.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for waiter in self.write_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.write_waiters.clear()
        current = self.current
        if current is not None:
            self.gateway.client_gone(current)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self.parser.feed_data(data)
        except _Refuse as exc:
            self.refuse(exc.status, exc.message)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__ or exc.__cause__
            if isinstance(cause, _Refuse):
                self.refuse(cause.status, cause.message)
            else:
                log.exception("parser callback failed")
                self.refuse(400, MSG_BAD_REQUEST)
        except httptools.HttpParserUpgrade:
            # An Upgrade request (WebSocket, h2c) is proxied as a plain request with Upgrade
            # removed; bytes after it are not HTTP/1.1 we can trust, so the connection closes.
            self.pause_reading()
        except httptools.HttpParserError as exc:
            self.refuse(400, f"{MSG_BAD_REQUEST}: {exc}")

    def eof_received(self) -> bool | None:
        # The client half-closed. Mid-body, that's an aborted request: close now, which frees
        # its upstream connection. Otherwise finish the responses in flight, then close.
        if self.receiving is not None or (self.current is None and not self.queue):
            return None
        self._eof = True
        return True

    # --- flow control ----------------------------------------------------------------------
    def pause_writing(self) -> None:
        self._write_paused = True
        current = self.current
        if current is not None:
            self.gateway.client_write_paused(current)

    def resume_writing(self) -> None:
        self._write_paused = False
        for waiter in self.write_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.write_waiters.clear()
        current = self.current
        if current is not None:
            self.gateway.client_write_resumed(current)

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None and not self._closing:
            self._paused = False
            self.transport.resume_reading()

    def resume_body(self) -> None:
        """The current request's body is wanted now (streaming to upstream or a plugin)."""
        self._body_paused = False
        if self.receiving is self.current:
            self.resume_reading()

    def pause_body(self) -> None:
        self._body_paused = True
        self.pause_reading()

    # --- timers ----------------------------------------------------------------------------
    def _arm_timer(self, kind: str, seconds: float) -> None:
        self._timer_kind = kind
        self._timer_deadline = deadline = self.loop.time() + seconds
        timer = self._timer
        if timer is not None and timer.when() > deadline:
            # Only ever pushed later lazily; an earlier deadline needs a new timer.
            timer.cancel()
            timer = None
        if timer is None:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _disarm_timer(self) -> None:
        self._timer_kind = ""

    def _on_timer(self) -> None:
        self._timer = None
        kind = self._timer_kind
        if not kind or self._closing:
            return
        now = self.loop.time()
        if now < self._timer_deadline:
            self._timer = self.loop.call_at(self._timer_deadline, self._on_timer)
            return
        if kind == "idle":
            self.close()
        elif kind == "header":
            if self._url or self._headers or self._header_bytes:
                self.refuse(408, MSG_REQUEST_TIMEOUT)
            else:
                self.close()
        elif kind == "body":
            self.refuse(408, MSG_REQUEST_TIMEOUT)

    # --- parser callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = []
        self._headers = []
        self._header_bytes = 0
        if self._timer_kind != "header":
            self._arm_timer("header", self.gateway.settings.client_header_timeout / 1000)

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._header_bytes += len(url)
        if self._header_bytes > self.gateway.settings.max_request_line:
            raise _Refuse(414, MSG_URI_TOO_LONG)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._header_bytes += len(name) + len(value) + 4
        settings = self.gateway.settings
        if (
            self._header_bytes > settings.max_header_size + settings.max_request_line
            or len(self._headers) > settings.max_headers
        ):
            raise _Refuse(431, MSG_HEADERS_TOO_LARGE)

    def on_headers_complete(self) -> None:
        parser = self.parser
        ctx = RequestContext()
        ctx.t_start = _now()
        ctx.conn = self
        method = parser.get_method()
        ctx.method = _METHODS.get(method) or method.decode("ascii")
        ctx.http_version = parser.get_http_version()
        # After an Upgrade request the bytes that follow are another protocol: serve it as a
        # plain request (Upgrade is hop-by-hop and never forwarded), then close.
        ctx.keep_alive = bool(parser.should_keep_alive()) and not parser.should_upgrade()
        ctx.headers = headers = self._headers
        ctx.client_ip = self.client_ip
        ctx.client_port = self.client_port
        ctx.listener_port = self.listener_port
        ctx.tls = self.tls
        ctx.scheme = "https" if self.tls else "http"
        ctx.request_size = self._header_bytes
        url = b"".join(self._url) if len(self._url) != 1 else self._url[0]
        # Framing checks llhttp leaves to us.
        host: bytes | None = None
        hosts = 0
        for name, value in headers:
            if len(name) == 4 and name.lower() == b"host":
                hosts += 1
                host = value
            elif len(name) == 17 and name.lower() == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    raise _Refuse(501, f"{MSG_NOT_IMPLEMENTED}: transfer coding {value.decode('latin-1')!r}")
                ctx.chunked = True
            elif len(name) == 14 and name.lower() == b"content-length":
                ctx.content_length = int(value)
            elif len(name) == 6 and name.lower() == b"expect":
                if value.strip().lower() == b"100-continue":
                    ctx.expect_continue = ctx.http_version == "1.1"
                else:
                    raise _Refuse(417, "Expectation Failed")
        if hosts > 1:
            raise _Refuse(400, f"{MSG_BAD_REQUEST}: more than one Host header")
        if host is None:
            if ctx.http_version == "1.1":
                raise _Refuse(400, f"{MSG_BAD_REQUEST}: missing Host header")
            host = b""
        ctx.host = host.decode("latin-1")
        ctx.host_name = _host_name(ctx.host)
        if url[:1] != b"/":
            if url == b"*" and ctx.method == "OPTIONS":
                url = b"/"
            elif url.lower().startswith((b"http://", b"https://")):
                # absolute-form (RFC 9112 3.2.2): the Host header must agree with it.
                rest = url.split(b"://", 1)[1]
                authority, slash, path = rest.partition(b"/")
                if authority.lower() != host.lower():
                    raise _Refuse(400, f"{MSG_BAD_REQUEST}: request target and Host disagree")
                url = slash + path if slash else b"/"
            else:
                raise _Refuse(400, f"{MSG_BAD_REQUEST}: invalid request target")
        raw_path, _, query = url.partition(b"?")
        hash_at = raw_path.find(b"#")
        if hash_at >= 0:
            raise _Refuse(400, f"{MSG_BAD_REQUEST}: fragment in request target")
        try:
            ctx.raw_path = raw_path.decode("ascii")
            ctx.query = query.decode("ascii")
        except UnicodeDecodeError:
            raise _Refuse(400, f"{MSG_BAD_REQUEST}: non-ASCII bytes in request target") from None
        if ctx.content_length is None and not ctx.chunked:
            ctx.body_complete = True
        self.receiving = ctx
        self.requests_served += 1
        if self.requests_served >= self.gateway.settings.keepalive_requests:
            ctx.keep_alive = False
        if ctx.body_complete:
            self._disarm_timer()
        else:
            self._arm_timer("body", self.gateway.settings.client_body_timeout / 1000)
        if self.current is None:
            self._start(ctx)
        else:
            self.queue.append(ctx)
            self.pause_reading()

    def on_body(self, body: bytes) -> None:
        ctx = self.receiving
        if ctx is None:
            return
        ctx.request_size += len(body)
        ctx.feed_body(body)
        if self._timer_kind == "body":
            self._timer_deadline = self.loop.time() + self.gateway.settings.client_body_timeout / 1000
        if ctx.body_sink is None and ctx.body_buffered_size >= self.gateway.settings.client_max_buffer:
            self.pause_reading()

    def on_message_complete(self) -> None:
        ctx = self.receiving
        if ctx is None:
            return
        self.receiving = None
        if self._timer_kind == "body":
            self._disarm_timer()
        ctx.finish_body()
        current = self.current
        if current is not None and ctx is not current:
            self.pause_reading()  # a pipelined request waits for the one in flight
        elif current is None and not self.queue:
            # Answered before its end was parsed (a synchronous refusal): now idle.
            ka = self.gateway.settings.keepalive_timeout
            if ka > 0:
                self._arm_timer("idle", ka / 1000)

    # --- requests --------------------------------------------------------------------------
    def _start(self, ctx: RequestContext) -> None:
        self.current = ctx
        if not ctx.body_complete and not ctx.expect_continue and self._body_paused:
            self._body_paused = False
        self.gateway.handle(ctx)

    def request_done(self, ctx: RequestContext, close: bool) -> None:
        """The response to `ctx` has been written in full."""
        if ctx is not self.current:
            return
        self.current = None
        if close or not ctx.keep_alive or not ctx.body_complete or self._closing:
            # A body we did not read to the end leaves the stream unsynchronised: close.
            self.close()
            return
        if self.queue:
            self._start(self.queue.popleft())
            if not self._eof and (self.receiving is None or self.receiving is self.current):
                self.resume_reading()
            return
        if self._eof:
            self.close()
            return
        self.resume_reading()
        if self.receiving is None:
            ka = self.gateway.settings.keepalive_timeout
            if ka <= 0:
                self.close()
            else:
                self._arm_timer("idle", ka / 1000)

    def send_continue(self, ctx: RequestContext) -> None:
        """Answer `Expect: 100-continue` (only once the access phase has let the request in)."""
        if ctx.expect_continue and self.transport is not None and not self._closing:
            ctx.expect_continue = False
            self.transport.write(_CONTINUE)
        self.resume_body()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self._closing:
            self.transport.write(data)

    def writelines(self, data: list[bytes]) -> None:
        if self.transport is not None and not self._closing:
            self.transport.writelines(data)

    @property
    def write_paused(self) -> bool:
        return self._write_paused

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def pending_headers(self) -> list[tuple[bytes, bytes]]:
        """Headers of the request being parsed (for rendering a refusal in the right dialect)."""
        return self._headers

    def refuse(self, status: int, message: str) -> None:
        """Answer a malformed request and close the connection."""
        if self._closing:
            return
        self.pause_reading()
        current = self.current
        if current is not None and self.receiving is current:
            # The body of the request being served broke: stop it, free its upstream.
            self.receiving = None
            self.queue.clear()
            self.gateway.abort_request_body(current, GatewayExit(status, {"message": message}))
            return
        if current is not None:
            # A response is in flight for an earlier request: it cannot be interleaved.
            current.keep_alive = False
            self.queue.clear()
            self.receiving = None
            return
        self.gateway.write_protocol_error(self, status, message)
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self._closing:
            self._closing = True
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self._closing = True
            self.transport.abort()


def _host_name(host: str) -> str:
    """Host header -> lower-cased name without port (IPv6 literals keep their brackets)."""
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1].lower() if end > 0 else host.lower()
    name, _, _port = host.partition(":")
    return name.lower()
