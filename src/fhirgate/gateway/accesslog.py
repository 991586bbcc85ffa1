"""The proxy access log (Kong's `proxy_access_log`): one line per request, text or JSON.

Text lines follow nginx's "combined" format plus the request id and latencies. The query string
is never written (FHIR search parameters carry PHI); credentials never appear (only the method,
path and status are logged, never headers). JSON lines carry Kong's `kong.log.serialize()` record
(with `Authorization` and cookies redacted) minus the query string: no `querystring`, and `uri`,
`url` and `upstream_uri` without their `?...` part.
"""

from __future__ import annotations

import sys
import time
from typing import IO, TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from fhirgate.gateway.context import RequestContext


class AccessLog:
    def __init__(self, target: str, fmt: str = "text") -> None:
        self.fmt = fmt
        self._own = False
        self._stream: IO[str]
        if target == "stdout":
            self._stream = sys.stdout
        elif target == "stderr":
            self._stream = sys.stderr
        else:
            self._stream = open(target, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
            self._own = True

    def write(self, ctx: RequestContext) -> None:
        if self.fmt == "json":
            record = ctx.serialize()
            record["request"].pop("querystring", None)
            uri = record["request"]["uri"]
            record["request"]["uri"] = uri.split("?", 1)[0]
            record["request"]["url"] = record["request"]["url"].split("?", 1)[0]
            upstream_uri = record.get("upstream_uri")
            if isinstance(upstream_uri, str):  # the query as sent upstream (perhaps rewritten)
                record["upstream_uri"] = upstream_uri.split("?", 1)[0]
            line = orjson.dumps(record, default=str).decode()
        else:
            ts = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(ctx.t_start))
            ua = ctx.header_map().get("user-agent", ["-"])[0].replace('"', "'")
            total_ms = int((ctx.t_end - ctx.t_start) * 1000) if ctx.t_end else 0
            line = (
                f'{ctx.forwarded_ip or ctx.client_ip} - - [{ts}] "{ctx.method} {ctx.raw_path} '
                f'HTTP/{ctx.http_version}" {ctx.response_status} {ctx.response_size} "-" "{ua}" '
                f"request_id={ctx.request_id} latency_ms={total_ms}"
            )
        try:
            self._stream.write(line + "\n")
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        if self._own:
            self._stream.close()
