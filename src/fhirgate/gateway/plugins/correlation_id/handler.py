"""Kong's `correlation-id` plugin (`kong/plugins/correlation-id/handler.lua`, priority 100001).

In the access phase: a value the client sent in `header_name` is kept as is; otherwise one is
generated and set on the request to the upstream. With `echo_downstream`, the value is also set on
the response (in the header filter, so refusals by later plugins carry it too).

Generators (Kong's formats):
- ``uuid``: a random UUID per request.
- ``uuid#counter``: ``<worker uuid>#<n>``, one UUID per worker process and a counter from 1.
- ``tracker``: ``<server>-<port>-<pid>-<sequence>-<n>-<time>`` (see `_tracker`).
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from fhirgate.gateway.plugins.base import Plugin, PluginConfig
from fhirgate.gateway.plugins.correlation_id.schema import CorrelationIdConfig

if TYPE_CHECKING:
    from fhirgate.gateway.pdk import PDK

_CTX_KEY = "correlation_id"


class _Worker:
    """Per-process state, renewed in every forked worker so no two workers share a UUID."""

    uuid_prefix = ""
    counter: itertools.count[int] = itertools.count(1)
    pid = 0

    @classmethod
    def renew(cls) -> None:
        cls.uuid_prefix = str(uuid.uuid4()) + "#"
        cls.counter = itertools.count(1)
        cls.pid = os.getpid()


_Worker.renew()
os.register_at_fork(after_in_child=_Worker.renew)


def _uuid(kong: PDK) -> str:
    return str(uuid.uuid4())


def _uuid_counter(kong: PDK) -> str:
    return f"{_Worker.uuid_prefix}{next(_Worker.counter)}"


def _tracker(kong: PDK) -> str:
    # Kong: `server_addr-server_port-worker_pid-connection-connection_requests-now`. The PDK
    # exposes neither the local address nor the connection's serial number and request count;
    # the host the client addressed and a per-worker sequence number take their places (the
    # value stays unique per node: pid + sequence), and the request count is 1.
    request = kong.request
    return (
        f"{request.get_host()}-{request.get_port()}-{_Worker.pid}-{next(_Worker.counter)}-1-{time.time():.3f}"
    )


GENERATE: dict[str, Callable[[PDK], str]] = {
    "uuid": _uuid,
    "uuid#counter": _uuid_counter,
    "tracker": _tracker,
}


class Handler(Plugin):
    name = "correlation-id"
    priority = 100001
    Config = CorrelationIdConfig
    description = "Give every request a correlation ID header, sent upstream and optionally back."

    config: CorrelationIdConfig

    def __init__(self, config: PluginConfig, instance_id: str = "") -> None:
        if not isinstance(config, CorrelationIdConfig):
            raise TypeError(f"correlation-id: expected CorrelationIdConfig, got {type(config).__name__}")
        super().__init__(config, instance_id)
        self.config = config
        self._generate = GENERATE[config.generator]
        self._header = config.header_name
        self._echo = config.echo_downstream

    def access(self, kong: PDK) -> None:
        value = kong.request.get_header(self._header)
        if not value:
            value = self._generate(kong)
            kong.service.request.set_header(self._header, value)
        if self._echo:
            kong.ctx.plugin[_CTX_KEY] = value

    def header_filter(self, kong: PDK) -> None:
        value = kong.ctx.plugin.get(_CTX_KEY)
        if value is not None:
            kong.response.set_header(self._header, value)


__all__ = ["GENERATE", "Handler"]
