"""Test harness: a real gateway on an ephemeral port in front of a real upstream that records what
it received. Both run in background threads; tests talk to them over real sockets.

The upstream is written with h11 (an independent HTTP/1.1 implementation), so the gateway's framing
is checked against a second opinion rather than against itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import h11

from fhirgate.config import GatewayConfig, load_config_dict
from fhirgate.gateway import hooks
from fhirgate.gateway.node import Listener, WorkerRuntime
from fhirgate.settings import Settings

# --------------------------------------------------------------------------------------------
# Upstream


@dataclass
class Recorded:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    http_version: str

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]


@dataclass
class Reply:
    """What the upstream answers. `body` may be bytes or a list of chunks (sent with pauses)."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=lambda: [("Content-Type", "application/json")])
    body: bytes | list[bytes] = b'{"ok":true}'
    delay: float = 0.0
    chunk_delay: float = 0.0
    raw: bytes | None = None  # send these bytes verbatim instead (malformed responses)
    close: bool = False  # close after the reply
    chunked: bool = False


Handler = Callable[[Recorded], Reply]


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class Upstream:
    """A recording HTTP/1.1 server on 127.0.0.1.

    With `ssl_context` (a server-side context holding the certificate), connections are served over
    TLS and `url` is `https://localhost:PORT`. The context's `sni_callback` is replaced: the server
    name each client sent (None without SNI) is appended to `sni_names`; `tls_failures` counts
    handshakes that failed (e.g. the client refused the certificate).
    """

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.requests: list[Recorded] = []
        self.connections = 0
        self.ssl_context = ssl_context
        self.sni_names: list[str | None] = []
        self.tls_failures = 0
        self._sni = threading.local()
        if ssl_context is not None:
            ssl_context.sni_callback = self._on_sni
        self.handler: Handler = lambda req: Reply(
            body=json.dumps({"path": req.target, "method": req.method}).encode()
        )
        self._lock = threading.Lock()
        self.open_connections = 0
        outer = self

        class H(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer._serve(self.request)

        self._server = _Server(("127.0.0.1", 0), H)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        if self.ssl_context is not None:
            return f"https://localhost:{self.port}"
        return f"http://127.0.0.1:{self.port}"

    def _on_sni(self, _sock: Any, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        self._sni.name = server_name  # runs in the connection's thread, during its handshake

    def _serve(self, sock: socket.socket) -> None:
        with self._lock:
            self.connections += 1
            self.open_connections += 1
        conn = h11.Connection(h11.SERVER)
        sock.settimeout(30)
        try:
            if self.ssl_context is not None:
                self._sni.name = None
                try:
                    sock = self.ssl_context.wrap_socket(sock, server_side=True)
                except (OSError, ssl.SSLError):
                    with self._lock:
                        self.tls_failures += 1
                    raise
                with self._lock:
                    self.sni_names.append(self._sni.name)
            while True:
                req: h11.Request | None = None
                body = b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = sock.recv(65536)
                        conn.receive_data(data)
                        if not data and req is None:
                            return
                        continue
                    if isinstance(event, h11.Request):
                        req = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                assert req is not None
                rec = Recorded(
                    req.method.decode(),
                    req.target.decode(),
                    [(k.decode(), v.decode("latin-1")) for k, v in req.headers],
                    body,
                    req.http_version.decode(),
                )
                with self._lock:
                    self.requests.append(rec)
                reply = self.handler(rec)
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.raw is not None:
                    sock.sendall(reply.raw)
                    if reply.close:
                        return
                    # h11 cannot know what we sent: serve one raw reply per connection
                    time.sleep(0.2)
                    return
                headers = list(reply.headers)
                chunks = reply.body if isinstance(reply.body, list) else [reply.body]
                if reply.chunked or isinstance(reply.body, list):
                    headers.append(("Transfer-Encoding", "chunked"))
                else:
                    headers.append(("Content-Length", str(len(chunks[0]))))
                if reply.close:
                    headers.append(("Connection", "close"))
                sock.sendall(conn.send(h11.Response(status_code=reply.status, headers=headers)) or b"")
                if req.method != b"HEAD":
                    for chunk in chunks:
                        if reply.chunk_delay:
                            time.sleep(reply.chunk_delay)
                        if chunk:
                            sock.sendall(conn.send(h11.Data(data=chunk)) or b"")
                sock.sendall(conn.send(h11.EndOfMessage()) or b"")
                if conn.our_state is h11.MUST_CLOSE or reply.close:
                    return
                conn.start_next_cycle()
        except (OSError, h11.RemoteProtocolError):
            return
        finally:
            with self._lock:
                self.open_connections -= 1
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# --------------------------------------------------------------------------------------------
# Gateway


class GatewayHandle:
    """A gateway worker running in a background thread with its own uvloop event loop."""

    def __init__(self, config: GatewayConfig, settings: Settings, listeners: list[Listener]) -> None:
        import uvloop

        hooks.run_before_fork(settings)
        hooks.run_after_fork(settings)
        self.loop = uvloop.new_event_loop()
        self.runtime = WorkerRuntime(settings, config)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.call(self.runtime.start(listeners))

    def call(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def port(self, kind: str = "proxy") -> int:
        return next(li.port for li in self.runtime.listeners if li.kind == kind)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port()}"

    @property
    def gateway(self) -> Any:
        return self.runtime.gateway

    def reload(self, config: dict[str, Any]) -> None:
        cfg = load_config_dict(config)

        async def swap() -> None:
            assert self.runtime.gateway is not None
            self.runtime.gateway.reload(cfg)

        self.call(swap())

    def stop(self, timeout: float = 2.0) -> None:
        with contextlib.suppress(Exception):
            self.call(self.runtime.shutdown(timeout), timeout + 5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        with contextlib.suppress(Exception):
            self.loop.close()


def service_config(upstream_url: str, **route: Any) -> dict[str, Any]:
    """A one-service, one-route declarative config (route defaults: paths ['/'])."""
    route.setdefault("paths", ["/"])
    route.setdefault("name", "r1")
    return {
        "_format_version": "3.0",
        "services": [{"name": "s1", "url": upstream_url, "routes": [route]}],
    }


@contextlib.contextmanager
def running_gateway(
    config: dict[str, Any] | None = None,
    *,
    ssl: bool = False,
    status: bool = False,
    **settings: Any,
) -> Iterator[GatewayHandle]:
    cfg = load_config_dict(config or {"_format_version": "3.0"})
    settings.setdefault("workers", 1)
    st = Settings(**settings)
    listeners = [Listener("proxy", "127.0.0.1", 0)]
    if ssl:
        listeners.append(Listener("ssl", "127.0.0.1", 0))
    if status:
        listeners.append(Listener("status", "127.0.0.1", 0))
    handle = GatewayHandle(cfg, st, listeners)
    try:
        yield handle
    finally:
        handle.stop()


# --------------------------------------------------------------------------------------------
# Raw client helpers


def raw_request(port: int, data: bytes, timeout: float = 5.0, read_until_close: bool = True) -> bytes:
    """Send raw bytes and return everything the gateway answers until it closes (or times out)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if not read_until_close:
                    break
        except TimeoutError:
            pass
        return b"".join(chunks)


def parse_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a byte stream of HTTP/1.1 responses (h11 as the independent parser)."""
    conn = h11.Connection(h11.CLIENT)
    out: list[tuple[int, dict[str, str], bytes]] = []
    # h11 needs a request for each response it parses.
    conn.receive_data(data)
    while True:
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        status = 0
        headers: dict[str, str] = {}
        body = b""
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return out
            if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                if status:
                    out.append((status, headers, body))
                return out
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                out.append((status, headers, body))
                break
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            return out
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return out
