"""Per-request state shared by the server, the pipeline and the PDK."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

if TYPE_CHECKING:
    from fhirgate.gateway.server import ClientProtocol

REDACTED = "REDACTED"
_REDACT = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})


class BodyTooLarge(Exception):
    """The request body grew past the limit a plugin set (`kong.request.get_raw_body(limit)`)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"request body exceeds the limit ({size} bytes received)")
        self.size = size


class RequestContext:
    """Everything known about one request, from its head to the log phase."""

    __slots__ = (
        "_body_waiter",
        "_hmap",
        "body_buffer",
        "body_buffered_size",
        "body_complete",
        "body_error",
        "body_sink",
        "buffer_response",
        "chain",
        "chunked",
        "client_ip",
        "client_port",
        "conn",
        "consumer",
        "consumer_hook",
        "content_length",
        "credential",
        "expect_continue",
        "finalized",
        "forwarded_ip",
        "headers",
        "host",
        "host_name",
        "http_version",
        "keep_alive",
        "listener_port",
        "matched_prefix",
        "method",
        "n_tries",
        "path",
        "pdk",
        "query",
        "raw_path",
        "raw_response_headers",
        "request_id",
        "request_size",
        "resp_extra",
        "resp_set",
        "response_headers",
        "response_size",
        "response_source",
        "response_status",
        "route",
        "scheme",
        "service",
        "shared",
        "state",
        "t_end",
        "t_start",
        "t_upstream_end_headers",
        "t_upstream_start",
        "tls",
        "tries",
        "upstream_head",
        "upstream_header_ops",
        "upstream_path",
        "upstream_query",
        "upstream_status",
        "upstream_uri",
    )

    def __init__(self) -> None:
        self._hmap: dict[str, list[str]] | None = None
        self._body_waiter: asyncio.Future[None] | None = None
        self.body_buffer: list[bytes] = []
        self.body_buffered_size = 0
        self.body_complete = False
        self.body_error: Exception | None = None
        self.body_sink: Callable[[bytes], None] | None = None
        self.buffer_response = False
        self.chain: Any = None
        self.chunked = False
        self.client_ip = ""
        self.client_port = 0
        self.conn: ClientProtocol | None = None
        self.consumer: Any = None
        self.consumer_hook: Callable[[], None] | None = None
        self.content_length: int | None = None
        self.credential: Any = None
        self.expect_continue = False
        self.finalized = False
        self.forwarded_ip = ""
        self.headers: list[tuple[bytes, bytes]] = []
        self.host = ""
        self.host_name = ""
        self.http_version = "1.1"
        self.keep_alive = True
        self.listener_port = 0
        self.matched_prefix: str | None = None
        self.method = "GET"
        self.n_tries = 0
        self.path = "/"
        self.pdk: Any = None
        self.query = ""
        self.raw_path = "/"
        self.request_id = ""
        self.request_size = 0
        self.response_headers: list[tuple[str, str]] = []
        # The upstream's headers not yet decoded: decoded on first use by a plugin (`resp_headers`),
        # so a header_filter that does not touch them costs nothing.
        self.raw_response_headers: list[tuple[bytes, bytes]] | None = None
        self.resp_extra: Callable[[RequestContext, list[tuple[str, str]]], None] | None = None
        # Headers set by plugins while the upstream's are still undecoded (lower name -> header).
        self.resp_set: dict[str, tuple[str, str]] | None = None
        self.response_size = 0
        self.response_source = "service"
        self.response_status = 0
        self.route: Any = None
        self.scheme = "http"
        self.service: Any = None
        self.shared: dict[str, Any] = {}
        self.state: Any = None
        self.t_end = 0.0
        self.t_start = 0.0
        self.t_upstream_end_headers = 0.0
        self.t_upstream_start = 0.0
        self.tls = False
        self.tries: list[dict[str, Any]] = []
        self.upstream_head = b""
        self.upstream_header_ops: dict[str, tuple[str, str | None]] = {}
        self.upstream_path = "/"
        self.upstream_query: str | None = None
        self.upstream_status = 0
        self.upstream_uri = ""

    # --- headers ---------------------------------------------------------------------------
    def header_map(self) -> dict[str, list[str]]:
        """Request headers by lower-cased name (built on first use)."""
        hmap = self._hmap
        if hmap is None:
            hmap = {}
            for name, value in self.headers:
                hmap.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
            self._hmap = hmap
        return hmap

    def resp_headers(self) -> list[tuple[str, str]]:
        """The response headers as a mutable list of (name, value), decoded on first use."""
        raw = self.raw_response_headers
        if raw is not None:
            self.raw_response_headers = None
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]
            if self.resp_extra is not None:
                self.resp_extra(self, headers)
            overlay = self.resp_set
            if overlay:
                self.resp_set = None
                headers = [(k, v) for k, v in headers if k.lower() not in overlay]
                headers += overlay.values()
            headers += self.response_headers
            self.response_headers = headers
        return self.response_headers

    def consumer_changed(self) -> None:
        if self.consumer_hook is not None:
            self.consumer_hook()

    # --- body ------------------------------------------------------------------------------
    def feed_body(self, chunk: bytes) -> None:
        if not chunk:
            return
        sink = self.body_sink
        if sink is not None:
            sink(chunk)
            return
        self.body_buffer.append(chunk)
        self.body_buffered_size += len(chunk)
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def finish_body(self) -> None:
        self.body_complete = True
        sink = self.body_sink
        if sink is not None:
            sink(b"")  # end of body
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read_body(self, limit: int | None = None) -> bytes:
        """Buffer the whole request body (a plugin asked for it). Idempotent.

        With `limit`, raises `BodyTooLarge` as soon as more than `limit` bytes have arrived (the
        rest is never read)."""
        loop = asyncio.get_running_loop()
        if self.expect_continue and self.conn is not None:
            self.conn.send_continue(self)
        while not self.body_complete:
            if self.body_error is not None:
                raise self.body_error
            if limit is not None and self.body_buffered_size > limit:
                raise BodyTooLarge(self.body_buffered_size)
            if self.conn is not None:
                self.conn.resume_body()
            self._body_waiter = loop.create_future()
            await self._body_waiter
            self._body_waiter = None
        if limit is not None and self.body_buffered_size > limit:
            raise BodyTooLarge(self.body_buffered_size)
        if len(self.body_buffer) > 1:
            self.body_buffer = [b"".join(self.body_buffer)]
        return self.body_buffer[0] if self.body_buffer else b""

    def take_buffered_body(self) -> list[bytes]:
        chunks, self.body_buffer = self.body_buffer, []
        self.body_buffered_size = 0
        return chunks

    # --- log -------------------------------------------------------------------------------
    def serialize(self) -> dict[str, Any]:
        """Kong's `kong.log.serialize()` record, with credentials redacted."""
        req_headers: dict[str, Any] = {}
        for name, values in self.header_map().items():
            val: Any = REDACTED if name in _REDACT else (values[0] if len(values) == 1 else values)
            req_headers[name] = val
        resp_headers: dict[str, Any] = {}
        for name, value in self.resp_headers():
            lname = name.lower()
            if lname in _REDACT:
                resp_headers[lname] = REDACTED
            elif lname in resp_headers:
                prev = resp_headers[lname]
                resp_headers[lname] = [*prev, value] if isinstance(prev, list) else [prev, value]
            else:
                resp_headers[lname] = value
        route = self.route
        service = self.service
        consumer = self.consumer
        start = self.t_start
        proxy_ms = (
            int((self.t_upstream_start - start) * 1000)
            if self.t_upstream_start
            else int((self.t_end - start) * 1000)
        )
        upstream_ms = (
            int((self.t_upstream_end_headers - self.t_upstream_start) * 1000)
            if self.t_upstream_start and self.t_upstream_end_headers
            else None
        )
        host = self.host or ""
        url = f"{self.scheme}://{host}{self.path}" + (f"?{self.query}" if self.query else "")
        record: dict[str, Any] = {
            "request": {
                "id": self.request_id,
                "uri": self.raw_path + (f"?{self.query}" if self.query else ""),
                "url": url,
                "querystring": _querystring(self.query),
                "method": self.method,
                "headers": req_headers,
                "size": self.request_size,
                "tls": {"version": self.conn.tls_version if self.conn is not None else None}
                if self.tls
                else None,
            },
            "upstream_uri": self.upstream_uri,
            "upstream_status": str(self.upstream_status) if self.upstream_status else "",
            "response": {
                "status": self.response_status,
                "headers": resp_headers,
                "size": self.response_size,
            },
            "latencies": {
                "kong": proxy_ms,
                "proxy": upstream_ms,
                "request": int((self.t_end - start) * 1000) if self.t_end else 0,
                "receive": 0,
            },
            "tries": self.tries,
            "client_ip": self.forwarded_ip or self.client_ip,
            "started_at": int(start * 1000),
            "source": "upstream" if self.response_source == "service" else "kong",
            "workspace": "default",
            "route": _entity(route),
            "service": _entity(service),
            "consumer": _entity(consumer),
        }
        if consumer is not None:
            record["authenticated_entity"] = {"id": getattr(self.credential, "id", None)}
        return record


def _querystring(query: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not query:
        return out
    for key, value in parse_qsl(query, keep_blank_values=True):
        v: Any = value if value != "" else True
        if key in out:
            prev = out[key]
            out[key] = [*prev, v] if isinstance(prev, list) else [prev, v]
        else:
            out[key] = v
    return out


def _entity(obj: Any) -> dict[str, Any] | None:
    if obj is None:
        return None
    dump = getattr(obj, "log_dict", None)
    if callable(dump):
        result: dict[str, Any] = dump()
        return result
    return {"id": getattr(obj, "id", None), "name": getattr(obj, "name", None)}
