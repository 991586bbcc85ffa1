"""The plugin pipeline: which plugin instances run for a request, in what order.

Kong's rules (`kong/runloop/plugins_iterator.lua`): exactly one instance of each plugin name runs
per request, the most specific one — 1 Route+Service+Consumer, 2 Route+Consumer,
3 Service+Consumer, 4 Route+Service, 5 Consumer, 6 Route, 7 Service, 8 Global — and plugins run
in descending PRIORITY. The rewrite phase runs global plugins only (no route is known yet).
Chains are computed once per (route, service, consumer) and cached, never per request.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from fhirgate.gateway.plugins.base import Plugin

Scope = tuple[str | None, str | None, str | None]  # (route_id, service_id, consumer_id)


@dataclass(frozen=True, slots=True)
class PluginSpec:
    """One enabled plugin instance of the configuration."""

    id: str
    name: str
    route_id: str | None
    service_id: str | None
    consumer_id: str | None
    handler: Plugin


@dataclass(frozen=True, slots=True)
class Step:
    """One hook to call: the instance, its bound hook, and whether to await it."""

    spec: PluginSpec
    hook: Callable[..., Any]
    is_async: bool
    priority: int


@dataclass(slots=True)
class Chain:
    """The plugins of one request scope, per phase, in priority order."""

    access: list[Step] = field(default_factory=list)
    header_filter: list[Step] = field(default_factory=list)
    body_filter: list[Step] = field(default_factory=list)
    log: list[Step] = field(default_factory=list)
    any_async_header_filter: bool = False

    @property
    def empty(self) -> bool:
        return not (self.access or self.header_filter or self.body_filter or self.log)


def _step(spec: PluginSpec, phase: str) -> Step | None:
    hook = getattr(spec.handler, phase, None)
    if hook is None:
        return None
    return Step(spec, hook, inspect.iscoroutinefunction(hook), type(spec.handler).priority)


class Pipeline:
    """Built once per configuration."""

    def __init__(self, specs: Iterable[PluginSpec]) -> None:
        self.specs = list(specs)
        # name -> scope -> spec
        self._by_name: dict[str, dict[Scope, PluginSpec]] = {}
        for spec in self.specs:
            scope = (spec.route_id, spec.service_id, spec.consumer_id)
            self._by_name.setdefault(spec.name, {})[scope] = spec
        self.has_consumer_scoped = any(s.consumer_id is not None for s in self.specs)
        globals_ = [
            s for s in self.specs if s.route_id is None and s.service_id is None and s.consumer_id is None
        ]
        globals_.sort(key=lambda s: -type(s.handler).priority)
        self.rewrite: list[Step] = [st for s in globals_ if (st := _step(s, "rewrite")) is not None]
        self._cache: dict[Scope, Chain] = {}
        self.empty = not self.specs

    def _lookup(
        self, name: str, route_id: str | None, service_id: str | None, consumer_id: str | None
    ) -> PluginSpec | None:
        scopes = self._by_name[name]
        r, s, c = route_id, service_id, consumer_id
        # Kong's order, most specific first (plugins_iterator.lua); runs at config time only.
        for key in (
            (r, s, c),
            (r, None, c),
            (None, s, c),
            (r, s, None),
            (None, None, c),
            (r, None, None),
            (None, s, None),
            (None, None, None),
        ):
            spec = scopes.get(key)
            if spec is not None:
                return spec
        return None

    def chain(self, route_id: str | None, service_id: str | None, consumer_id: str | None = None) -> Chain:
        key = (route_id, service_id, consumer_id)
        chain = self._cache.get(key)
        if chain is not None:
            return chain
        chosen = [
            spec
            for name in self._by_name
            if (spec := self._lookup(name, route_id, service_id, consumer_id)) is not None
        ]
        chosen.sort(key=lambda s: -type(s.handler).priority)
        chain = Chain()
        for phase in ("access", "header_filter", "body_filter", "log"):
            steps: list[Step] = getattr(chain, phase)
            steps.extend(st for s in chosen if (st := _step(s, phase)) is not None)
        chain.any_async_header_filter = any(st.is_async for st in chain.header_filter)
        if len(self._cache) < 100_000:
            self._cache[key] = chain
        return chain

    def init_worker(self) -> None:
        for spec in self.specs:
            spec.handler.init_worker()

    def close(self) -> None:
        for spec in self.specs:
            spec.handler.close()
