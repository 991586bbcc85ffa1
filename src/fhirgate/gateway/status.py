"""The status listener (Kong's `status_listen`): `/status`, `/status/ready` and what plugins
register (the prometheus plugin registers `/metrics`). Off unless `status_listen` is set."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fhirgate.config import empty_config
from fhirgate.errors import GatewayExit
from fhirgate.gateway.proxy import Gateway

if TYPE_CHECKING:
    from fhirgate.gateway.context import RequestContext
    from fhirgate.settings import Settings

#: path -> provider returning (status, headers, body)
Endpoint = Callable[[], tuple[int, dict[str, str], bytes]]
_ENDPOINTS: dict[str, Endpoint] = {}


def register_endpoint(path: str, provider: Endpoint) -> None:
    """Serve `path` on the status listener (e.g. the prometheus plugin's `/metrics`)."""
    _ENDPOINTS[path] = provider


def unregister_endpoint(path: str) -> None:
    _ENDPOINTS.pop(path, None)


class StatusGateway(Gateway):
    """Answers status requests itself; reuses the proxy's HTTP server and error rendering."""

    def __init__(self, settings: Settings, main: Gateway) -> None:
        super().__init__(settings, empty_config())
        self.main = main
        self.server_tokens = False
        self.latency_tokens = False
        self.request_id_header = False
        self._via = b""

    def handle(self, ctx: RequestContext) -> None:
        path = ctx.raw_path.rstrip("/") or "/"
        exit_: GatewayExit
        if ctx.method not in ("GET", "HEAD"):
            exit_ = GatewayExit(405, {"message": "Method not allowed"}, {"Allow": "GET, HEAD"})
        elif path == "/status":
            exit_ = GatewayExit(200, self.status_body())
        elif path == "/status/ready":
            if self.main.draining:
                exit_ = GatewayExit(503, {"message": "shutting down"})
            else:
                exit_ = GatewayExit(200, {"message": "ready"})
        elif path in _ENDPOINTS:
            status, headers, body = _ENDPOINTS[path]()
            exit_ = GatewayExit(status, body, headers)
        else:
            exit_ = GatewayExit(404, {"message": "Not found"})
        self._exit(ctx, exit_)

    def status_body(self) -> dict[str, Any]:
        main = self.main
        active = len(main.connections)
        writing = sum(1 for c in main.connections if c.current is not None)
        return {
            "server": {
                "connections_active": active,
                "connections_reading": sum(1 for c in main.connections if c.receiving is not None),
                "connections_writing": writing,
                "connections_waiting": active - writing,
                "total_requests": main.requests_total,
            },
            "database": {"reachable": True},
            "configuration_hash": main.state.config_hash,
            "worker": {"pid": os.getpid(), "in_flight": main.in_flight()},
        }
