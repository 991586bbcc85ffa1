"""The plugin development kit: the only API plugins use to see and change a request.

Modelled on Kong's PDK (`kong.request`, `kong.response`, `kong.client`, `kong.service.request`,
`kong.router`, `kong.ctx`, `kong.log`), so a plugin ported from Kong reads the same. One `PDK`
object exists per request and only when the request runs at least one plugin.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import parse_qs

from fhirgate.errors import GatewayExit

if TYPE_CHECKING:
    from fhirgate.gateway.context import RequestContext

log = logging.getLogger("fhirgate.plugins")

# RFC 9110 5.1 / 5.5: a header name is a token; a value never holds CR, LF or NUL.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_GOOD_NAMES: set[str] = set()  # names already checked (plugins reuse a handful of names)


def _check_header(name: str, value: str | None) -> None:
    """Refuse header injection: a name that is not a token, a value with CR, LF or NUL."""
    if name not in _GOOD_NAMES:
        if _TOKEN.fullmatch(name) is None:
            raise ValueError(f"invalid header name {name!r}")
        if len(_GOOD_NAMES) < 4096:
            _GOOD_NAMES.add(name)
    if value is not None and ("\r" in value or "\n" in value or "\x00" in value):
        raise ValueError(f"invalid value for header {name!r}: contains CR, LF or NUL")


class _Request:
    """`kong.request`: the request as the client sent it (path already normalized)."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: RequestContext) -> None:
        self._ctx = ctx

    def get_method(self) -> str:
        return self._ctx.method

    def get_scheme(self) -> str:
        return self._ctx.scheme

    def get_host(self) -> str:
        """Host header without port, lower-cased."""
        return self._ctx.host_name

    def get_port(self) -> int:
        return self._ctx.listener_port

    def get_path(self) -> str:
        """The normalized path (what routing and the upstream see), without query string."""
        return self._ctx.path

    def get_raw_path(self) -> str:
        """The path exactly as the client sent it."""
        return self._ctx.raw_path

    def get_raw_query(self) -> str:
        return self._ctx.query

    def get_query(self) -> dict[str, list[str]]:
        return parse_qs(self._ctx.query, keep_blank_values=True)

    def get_query_arg(self, name: str) -> str | None:
        values = self.get_query().get(name)
        return values[0] if values else None

    def get_header(self, name: str) -> str | None:
        """First value of header `name` (case-insensitive), or None."""
        ctx = self._ctx
        if ctx._hmap is not None:
            values = ctx._hmap.get(name.lower())
            return values[0] if values else None
        bname = name.lower().encode("latin-1")
        size = len(bname)
        for key, value in ctx.headers:
            if len(key) == size and key.lower() == bname:
                return value.decode("latin-1")
        return None

    def get_headers(self) -> Mapping[str, list[str]]:
        """All request headers, names lower-cased, values in order."""
        return self._ctx.header_map()

    def get_http_version(self) -> str:
        return self._ctx.http_version

    def get_content_length(self) -> int | None:
        return self._ctx.content_length

    async def get_raw_body(self, limit: int | None = None) -> bytes:
        """Read and buffer the whole request body (the request then stops streaming).

        With `limit`, raises `fhirgate.gateway.context.BodyTooLarge` once more than `limit`
        bytes have arrived, without reading the rest."""
        return await self._ctx.read_body(limit)


class _Client:
    """`kong.client`."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: RequestContext) -> None:
        self._ctx = ctx

    def get_ip(self) -> str:
        """The address of the peer that connected to the gateway."""
        return self._ctx.client_ip

    def get_forwarded_ip(self) -> str:
        """The client's address, from X-Forwarded-For when the peer is a trusted proxy."""
        return self._ctx.forwarded_ip

    def get_port(self) -> int:
        return self._ctx.client_port

    def get_consumer(self) -> Any:
        return self._ctx.consumer

    def get_credential(self) -> Any:
        return self._ctx.credential

    def authenticate(self, consumer: Any, credential: Any) -> None:
        self._ctx.consumer = consumer
        self._ctx.credential = credential
        self._ctx.consumer_changed()

    def load_consumer(self, id_or_username: str, search_by_username: bool = True) -> Any:
        """The consumer with this id (or, if allowed, this username) in the request's
        configuration, or None (Kong's `kong.client.load_consumer`)."""
        state = self._ctx.state
        if state is None:
            return None
        consumer = state.consumers.get(id_or_username)
        if consumer is not None and not search_by_username and consumer.id != id_or_username:
            return None
        return consumer


class _ServiceRequest:
    """`kong.service.request`: change what is sent upstream."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: RequestContext) -> None:
        self._ctx = ctx

    def set_header(self, name: str, value: str) -> None:
        _check_header(name, value)
        self._ctx.upstream_header_ops[name.lower()] = (name, value)

    def clear_header(self, name: str) -> None:
        self._ctx.upstream_header_ops[name.lower()] = (name, None)

    def set_path(self, path: str) -> None:
        self._ctx.upstream_path = path

    def set_raw_body(self, body: bytes) -> None:
        """Replace the request body sent upstream (after `kong.request.get_raw_body()` has read
        it whole). `Content-Length` follows the new body."""
        ctx = self._ctx
        if not ctx.body_complete:
            raise RuntimeError("set_raw_body needs the whole body: await kong.request.get_raw_body() first")
        ctx.body_buffer = [body] if body else []
        ctx.body_buffered_size = len(body)
        ctx.chunked = False
        ctx.content_length = len(body)

    def set_raw_query(self, query: str) -> None:
        self._ctx.upstream_query = query

    def enable_buffering(self) -> None:
        """Ask for the whole response body to be buffered (for `kong.service.response`)."""
        self._ctx.buffer_response = True


class _Service:
    __slots__ = ("request",)

    def __init__(self, ctx: RequestContext) -> None:
        self.request = _ServiceRequest(ctx)


class _Response:
    """`kong.response`: the response to the client."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: RequestContext) -> None:
        self._ctx = ctx

    def exit(
        self,
        status: int,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        fhir_code: str | None = None,
    ) -> NoReturn:
        """Answer now with `status`; `body` a dict (JSON), str or bytes. Stops the request."""
        raise GatewayExit(status, body, dict(headers or {}), fhir_code)

    def error(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> NoReturn:
        """Kong's `kong.response.error`: a `{"message": ...}` body in the route's dialect."""
        raise GatewayExit(status, {"message": message}, dict(headers or {}))

    def get_status(self) -> int:
        return self._ctx.response_status

    def get_source(self) -> str:
        """``"service"`` (the upstream answered), ``"exit"`` (a plugin or the gateway) or
        ``"error"``."""
        return self._ctx.response_source

    def get_header(self, name: str) -> str | None:
        lname = name.lower()
        for k, v in self._ctx.resp_headers():
            if k.lower() == lname:
                return v
        return None

    def get_headers(self) -> list[tuple[str, str]]:
        return list(self._ctx.resp_headers())

    def set_header(self, name: str, value: str) -> None:
        _check_header(name, value)
        ctx = self._ctx
        if ctx.raw_response_headers is not None:
            # The upstream's headers are not decoded yet: note the change, apply it when writing.
            overlay = ctx.resp_set
            if overlay is None:
                overlay = ctx.resp_set = {}
            overlay[name.lower()] = (name, value)
            return
        self.clear_header(name)
        ctx.resp_headers().append((name, value))

    def add_header(self, name: str, value: str) -> None:
        _check_header(name, value)
        self._ctx.resp_headers().append((name, value))

    def clear_header(self, name: str) -> None:
        lname = name.lower()
        headers = self._ctx.resp_headers()
        headers[:] = [(k, v) for k, v in headers if k.lower() != lname]

    def set_headers(self, headers: Mapping[str, str]) -> None:
        """Set several headers in one pass over the response headers."""
        for k, v in headers.items():
            _check_header(k, v)
        ctx = self._ctx
        if ctx.raw_response_headers is not None:
            overlay = ctx.resp_set
            if overlay is None:
                overlay = ctx.resp_set = {}
            for k, v in headers.items():
                overlay[k.lower()] = (k, v)
            return
        replaced = {k.lower() for k in headers}
        current = self._ctx.resp_headers()
        current[:] = [(k, v) for k, v in current if k.lower() not in replaced]
        current.extend(headers.items())


class _Router:
    __slots__ = ("_ctx",)

    def __init__(self, ctx: RequestContext) -> None:
        self._ctx = ctx

    def get_route(self) -> Any:
        return self._ctx.route

    def get_service(self) -> Any:
        return self._ctx.service


class _Ctx:
    """`kong.ctx`: `shared` is one dict per request for all plugins; `plugin` one per plugin
    instance (created on first use)."""

    __slots__ = ("_dicts", "_owner", "shared")

    def __init__(self, shared: dict[str, Any]) -> None:
        self.shared = shared
        self._owner = ""
        self._dicts: dict[str, dict[str, Any]] | None = None

    @property
    def plugin(self) -> dict[str, Any]:
        dicts = self._dicts
        if dicts is None:
            dicts = self._dicts = {}
        d = dicts.get(self._owner)
        if d is None:
            d = dicts[self._owner] = {}
        return d


class _Log:
    __slots__ = ("_ctx",)

    def __init__(self, ctx: RequestContext) -> None:
        self._ctx = ctx

    def serialize(self) -> dict[str, Any]:
        """Kong's log record for this request (`kong.log.serialize()`), with credentials
        redacted."""
        return self._ctx.serialize()

    def debug(self, msg: str, *args: Any) -> None:
        log.debug(msg, *args)

    def info(self, msg: str, *args: Any) -> None:
        log.info(msg, *args)

    def warn(self, msg: str, *args: Any) -> None:
        log.warning(msg, *args)

    def err(self, msg: str, *args: Any) -> None:
        log.error(msg, *args)


class PDK:
    """The `kong` object handed to every phase hook. Its namespaces are created on first use."""

    __slots__ = ("_client", "_ctx", "_log", "_request", "_response", "_router", "_service", "ctx")

    def __init__(self, ctx: RequestContext) -> None:
        self._ctx = ctx
        self.ctx = _Ctx(ctx.shared)
        self._request: _Request | None = None
        self._client: _Client | None = None
        self._service: _Service | None = None
        self._response: _Response | None = None
        self._router: _Router | None = None
        self._log: _Log | None = None

    @property
    def request(self) -> _Request:
        ns = self._request
        if ns is None:
            ns = self._request = _Request(self._ctx)
        return ns

    @property
    def client(self) -> _Client:
        ns = self._client
        if ns is None:
            ns = self._client = _Client(self._ctx)
        return ns

    @property
    def service(self) -> _Service:
        ns = self._service
        if ns is None:
            ns = self._service = _Service(self._ctx)
        return ns

    @property
    def response(self) -> _Response:
        ns = self._response
        if ns is None:
            ns = self._response = _Response(self._ctx)
        return ns

    @property
    def router(self) -> _Router:
        ns = self._router
        if ns is None:
            ns = self._router = _Router(self._ctx)
        return ns

    @property
    def log(self) -> _Log:
        ns = self._log
        if ns is None:
            ns = self._log = _Log(self._ctx)
        return ns

    def for_plugin(self, instance_id: str) -> PDK:
        """Point `kong.ctx.plugin` at one plugin instance's own dict (called by the pipeline)."""
        self.ctx._owner = instance_id
        return self


def json_body(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
