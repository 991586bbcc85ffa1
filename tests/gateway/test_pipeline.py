"""The plugin pipeline through a running gateway: Kong's scoping precedence, priority order, the
phases and what each may do, sync and async hooks, and the PDK's effects on the wire."""

from __future__ import annotations

import asyncio
import time
from typing import Any, ClassVar

import httpx
import pytest

from fhirgate.gateway.pdk import PDK
from fhirgate.gateway.plugins import registry
from fhirgate.gateway.plugins.base import Plugin, PluginConfig
from tests.harness import Reply, Upstream, running_gateway

EVENTS: list[str] = []


class TagConfig(PluginConfig):
    tag: str = "x"


class Tagger(Plugin):
    """Sends its tag upstream and back, and records the phases it ran in."""

    name: ClassVar[str] = "tagger"
    priority: ClassVar[int] = 1000
    Config: ClassVar[type[PluginConfig]] = TagConfig

    def rewrite(self, kong: PDK) -> None:
        EVENTS.append(f"rewrite:{self.config.tag}")  # type: ignore[attr-defined]

    def access(self, kong: PDK) -> None:
        tag = self.config.tag  # type: ignore[attr-defined]
        EVENTS.append(f"access:{tag}")
        kong.service.request.set_header("X-Tag", tag)
        kong.ctx.plugin["tag"] = tag

    def header_filter(self, kong: PDK) -> None:
        kong.response.set_header("X-Tag", kong.ctx.plugin["tag"])

    def log(self, kong: PDK) -> None:
        EVENTS.append(f"log:{kong.response.get_status()}")


class Early(Plugin):
    name: ClassVar[str] = "early"
    priority: ClassVar[int] = 5000
    Config: ClassVar[type[PluginConfig]] = TagConfig

    def rewrite(self, kong: PDK) -> None:
        EVENTS.append("rewrite:early")

    def access(self, kong: PDK) -> None:
        EVENTS.append("access:early")
        kong.ctx.shared["seen_by_early"] = True


class Late(Plugin):
    name: ClassVar[str] = "late"
    priority: ClassVar[int] = 10
    Config: ClassVar[type[PluginConfig]] = TagConfig

    def access(self, kong: PDK) -> None:
        EVENTS.append(f"access:late:{kong.ctx.shared.get('seen_by_early')}")


class Auth(Plugin):
    """Authenticates `X-User: <username>` as that consumer, else refuses with 401."""

    name: ClassVar[str] = "auth"
    priority: ClassVar[int] = 1450
    no_consumer: ClassVar[bool] = True
    Config: ClassVar[type[PluginConfig]] = TagConfig

    def __init__(self, config: PluginConfig, instance_id: str = "") -> None:
        super().__init__(config, instance_id)

    def access(self, kong: PDK) -> None:
        user = kong.request.get_header("x-user")
        consumer = CONSUMERS.get(user or "")
        if consumer is None:
            kong.response.exit(401, {"message": "Unauthorized"}, {"WWW-Authenticate": "Bearer"})
        kong.client.authenticate(consumer, None)


class AsyncGate(Plugin):
    """An async access hook that can wait and can refuse."""

    name: ClassVar[str] = "async-gate"
    priority: ClassVar[int] = 900
    Config: ClassVar[type[PluginConfig]] = TagConfig

    async def access(self, kong: PDK) -> None:
        await asyncio.sleep(0.01)
        if kong.request.get_header("x-deny"):
            kong.response.error(403, "denied by async gate")
        kong.service.request.set_header("X-Async", "yes")

    async def header_filter(self, kong: PDK) -> None:
        await asyncio.sleep(0)
        kong.response.add_header("X-Async-Back", "yes")


class Upper(Plugin):
    """A body filter: upper-cases the response body."""

    name: ClassVar[str] = "upper"
    priority: ClassVar[int] = 800
    Config: ClassVar[type[PluginConfig]] = TagConfig

    def body_filter(self, kong: PDK, chunk: bytes, eof: bool) -> bytes:
        return chunk.upper() + (b"!" if eof else b"")


class BodyReader(Plugin):
    name: ClassVar[str] = "body-reader"
    priority: ClassVar[int] = 850
    Config: ClassVar[type[PluginConfig]] = TagConfig

    async def access(self, kong: PDK) -> None:
        body = await kong.request.get_raw_body()
        kong.service.request.set_header("X-Body-Length", str(len(body)))


PLUGINS: dict[str, type[Plugin]] = {
    cls.name: cls for cls in (Tagger, Early, Late, Auth, AsyncGate, Upper, BodyReader)
}
CONSUMERS: dict[str, Any] = {}


@pytest.fixture(autouse=True)
def test_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_BUILTIN", {name: name for name in PLUGINS})
    monkeypatch.setattr(registry, "_load", PLUGINS.get)
    EVENTS.clear()
    CONSUMERS.clear()


def two_routes(upstream: Upstream, plugins: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "_format_version": "3.0",
        "services": [
            {
                "name": "svc",
                "url": upstream.url,
                "routes": [{"name": "a", "paths": ["/a"]}, {"name": "b", "paths": ["/b"]}],
            },
            {"name": "other", "url": upstream.url, "routes": [{"name": "c", "paths": ["/c"]}]},
        ],
        "consumers": [{"username": "alice"}, {"username": "bob"}],
        "plugins": plugins,
    }


def test_most_specific_instance_wins(upstream: Upstream) -> None:
    config = two_routes(
        upstream,
        [
            {"name": "tagger", "config": {"tag": "global"}},
            {"name": "tagger", "service": "svc", "config": {"tag": "service"}},
            {"name": "tagger", "route": "a", "config": {"tag": "route"}},
        ],
    )
    with running_gateway(config) as gw, httpx.Client() as c:
        got = {p: c.get(f"{gw.url}/{p}").headers["x-tag"] for p in ("a", "b", "c")}
    assert got == {"a": "route", "b": "service", "c": "global"}
    assert [r.header("x-tag") for r in upstream.requests] == ["route", "service", "global"]


def test_consumer_scoped_instance_applies_after_authentication(upstream: Upstream) -> None:
    config = two_routes(
        upstream,
        [
            {"name": "auth"},
            {"name": "tagger", "config": {"tag": "everyone"}},
            {"name": "tagger", "consumer": "alice", "config": {"tag": "alice"}},
            {"name": "tagger", "consumer": "alice", "route": "b", "config": {"tag": "alice-on-b"}},
        ],
    )
    with running_gateway(config) as gw, httpx.Client() as c:
        consumers = gw.gateway.state.config.consumers
        CONSUMERS.update({cons.username: cons for cons in consumers})
        got = [
            c.get(f"{gw.url}/{path}", headers={"X-User": user}).headers["x-tag"]
            for path, user in (("a", "alice"), ("b", "alice"), ("a", "bob"))
        ]
    assert got == ["alice", "alice-on-b", "everyone"]


def test_plugins_run_in_priority_order_and_share_ctx(upstream: Upstream) -> None:
    config = two_routes(upstream, [{"name": "late"}, {"name": "tagger"}, {"name": "early"}])
    with running_gateway(config) as gw:
        httpx.get(gw.url + "/a")
    assert [e for e in EVENTS if e.startswith("access")] == ["access:early", "access:x", "access:late:True"]


def test_rewrite_runs_for_global_plugins_only(upstream: Upstream) -> None:
    config = two_routes(
        upstream,
        [{"name": "tagger", "config": {"tag": "g"}}, {"name": "early", "route": "a"}],
    )
    with running_gateway(config) as gw:
        assert httpx.get(gw.url + "/nowhere").status_code == 404  # rewrite runs before routing
        assert EVENTS == ["rewrite:g"]
        EVENTS.clear()
        httpx.get(gw.url + "/a")
    # The route-scoped plugin's rewrite hook never runs (Kong: rewrite is for global plugins);
    # its access hook does.
    assert EVENTS[0] == "rewrite:g"
    assert "rewrite:early" not in EVENTS
    assert "access:early" in EVENTS


def test_log_phase_runs_after_response_even_for_refusals(upstream: Upstream) -> None:
    config = two_routes(upstream, [{"name": "auth"}, {"name": "tagger"}])
    with running_gateway(config) as gw:
        r = httpx.get(gw.url + "/a")
        # tagger's header_filter fails on this refusal (it never ran its access hook): the
        # refusal is still answered, and the log phase still runs.
        assert r.status_code == 401
        assert r.json() == {"message": "Unauthorized"}
        deadline = time.monotonic() + 3
        while "log:401" not in EVENTS and time.monotonic() < deadline:
            time.sleep(0.01)
    assert "log:401" in EVENTS
    assert upstream.requests == []


def test_exit_from_access_is_rendered_with_plugin_headers(upstream: Upstream) -> None:
    config = two_routes(upstream, [{"name": "auth"}])
    with running_gateway(config) as gw:
        r = httpx.get(gw.url + "/a")
    assert r.status_code == 401
    assert r.json() == {"message": "Unauthorized"}
    assert r.headers["www-authenticate"] == "Bearer"
    assert upstream.requests == []


def test_async_access_and_header_filter_hooks(upstream: Upstream) -> None:
    config = two_routes(upstream, [{"name": "async-gate"}, {"name": "tagger"}])
    with running_gateway(config) as gw, httpx.Client() as c:
        ok = c.get(gw.url + "/a")
        denied = c.get(gw.url + "/a", headers={"X-Deny": "1"})
    assert ok.status_code == 200
    assert ok.headers["x-async-back"] == "yes"
    assert ok.headers["x-tag"] == "x"
    assert denied.status_code == 403
    assert denied.json() == {"message": "denied by async gate"}
    assert denied.headers["x-async-back"] == "yes"  # header_filter runs on exits too
    assert len(upstream.requests) == 1
    assert upstream.requests[0].header("x-async") == "yes"


def test_body_filter_rewrites_the_streamed_body(upstream: Upstream) -> None:
    upstream.handler = lambda req: Reply(body=[b"abc", b"def"])
    with running_gateway(two_routes(upstream, [{"name": "upper"}])) as gw:
        r = httpx.get(gw.url + "/a")
    assert r.content == b"ABCDEF!"
    assert "content-length" not in r.headers


def test_body_filter_drops_content_length(upstream: Upstream) -> None:
    upstream.handler = lambda req: Reply(body=b"hello")
    with running_gateway(two_routes(upstream, [{"name": "upper"}])) as gw:
        r = httpx.get(gw.url + "/a")
    assert r.content == b"HELLO!"
    assert r.headers["transfer-encoding"] == "chunked"


def test_plugin_can_read_the_whole_body_and_it_is_still_proxied(upstream: Upstream) -> None:
    with running_gateway(two_routes(upstream, [{"name": "body-reader"}])) as gw:
        r = httpx.post(gw.url + "/a", content=b"x" * 100_000)
    assert r.status_code == 200
    rec = upstream.requests[0]
    assert rec.header("x-body-length") == "100000"
    assert rec.body == b"x" * 100_000


def test_plugin_header_overrides_the_upstreams(upstream: Upstream) -> None:
    upstream.handler = lambda req: Reply(
        headers=[("X-Tag", "from-upstream"), ("X-Other", "kept")], body=b"ok"
    )
    with running_gateway(two_routes(upstream, [{"name": "tagger", "config": {"tag": "mine"}}])) as gw:
        r = httpx.get(gw.url + "/a")
    assert r.headers.get_list("x-tag") == ["mine"]
    assert r.headers["x-other"] == "kept"


def test_client_headers_replaced_by_plugin_are_not_duplicated(upstream: Upstream) -> None:
    with running_gateway(two_routes(upstream, [{"name": "tagger", "config": {"tag": "mine"}}])) as gw:
        httpx.get(gw.url + "/a", headers={"X-Tag": "forged"})
    assert upstream.requests[0].header_all("x-tag") == ["mine"]


def test_no_consumer_plugin_scoped_to_consumer_is_a_config_error() -> None:
    from fhirgate.config import load_config_dict
    from fhirgate.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config_dict(
            {
                "_format_version": "3.0",
                "consumers": [{"username": "a"}],
                "plugins": [{"name": "auth", "consumer": "a"}],
            }
        )
    assert "plugins[0]" in str(err.value)
