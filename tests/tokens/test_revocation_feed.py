"""The revocation feed poller: pages applied to the revocation set, cursor kept, malformed pages
and failures tolerated (what was learned stays), one poller per loop and URL shared across plugin
instances and reloads, and the plugin's config fields."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
import pytest

from fhirgate.errors import ConfigError
from fhirgate.gateway.plugins.openid_connect.handler import Handler
from fhirgate.gateway.plugins.openid_connect.schema import OpenIdConnectConfig
from fhirgate.tokens import revocation_feed
from fhirgate.tokens.cache import RevocationSet
from fhirgate.tokens.jwks_cache import Fetched, FetchError
from fhirgate.tokens.revocation_feed import FeedError, RevocationFeed, parse_page

URL = "http://auth.test/revocations"


class FakeFeed:
    """Answers queued bodies (bytes) or raises queued exceptions; records the URLs asked."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.urls: list[str] = []

    async def __call__(self, url: str) -> Fetched:
        self.urls.append(url)
        answer = self.answers.pop(0) if self.answers else _page([], 0)
        if isinstance(answer, Exception):
            raise answer
        return Fetched(answer)


def _page(entries: list[tuple[str, float]], nxt: int, after: str | None = None) -> bytes:
    body: dict[str, Any] = {
        "revoked": [{"jti": j, "exp": e, "revoked_at": 1} for j, e in entries],
        "next": nxt,
        "more": after is not None,
    }
    if after is not None:
        body["after"] = after
    return orjson.dumps(body)


def test_pages_are_applied_and_the_cursor_followed() -> None:
    later = time.time() + 600
    fetch = FakeFeed(_page([("a", later), ("b", later)], 100, after="b"), _page([("c", later)], 90))
    revoked = RevocationSet()
    feed = RevocationFeed(URL, 1, fetch, revoked=revoked)
    assert asyncio.run(feed.poll_once()) == 3
    assert {"a", "b", "c"} <= set(revoked._ids)
    assert fetch.urls == [f"{URL}?since=0", f"{URL}?since=100&after=b"]
    assert (feed.since, feed.after) == (90, None)
    asyncio.run(feed.poll_once())
    assert fetch.urls[-1] == f"{URL}?since=90"
    assert revoked._ids["a"] == later  # forgotten when the token would have expired anyway
    assert revoked.prune(later + 1) == 3


def test_a_poll_reads_at_most_max_pages() -> None:
    fetch = FakeFeed(*[_page([(f"j{i}", time.time() + 60)], i, after=f"j{i}") for i in range(10)])
    feed = RevocationFeed(URL, 1, fetch, revoked=RevocationSet(), max_pages=3)
    assert asyncio.run(feed.poll_once()) == 3
    assert len(fetch.urls) == 3


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"next": 1}',
        b'{"revoked": [], "next": -1}',
        b'{"revoked": [], "next": "1"}',
        b'{"revoked": [], "next": 1, "more": true}',
        b'{"revoked": [1], "next": 1}',
        b'{"revoked": [{"jti": "a"}], "next": 1}',
        b'{"revoked": [{"jti": "a", "exp": true}], "next": 1}',
    ],
)
def test_malformed_pages_are_refused_whole(body: bytes) -> None:
    with pytest.raises(FeedError):
        parse_page(body)


def test_oversized_jtis_are_ignored() -> None:
    page = parse_page(_page([("x" * 300, 1.0), ("ok", 2.0)], 5))
    assert page.entries == [("ok", 2.0)]


def test_failures_keep_what_was_learned_and_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    later = time.time() + 600
    fetch = FakeFeed(
        _page([("a", later)], 50),
        FetchError("http://auth.test/revocations: HTTP status 503"),
        b"garbage",
        FetchError("http://auth.test/revocations: ConnectError"),
        _page([("b", later)], 60),
    )
    revoked = RevocationSet()
    feed = RevocationFeed(URL, 0.01, fetch, revoked=revoked)

    async def run() -> None:
        task = asyncio.create_task(feed.run())
        for _ in range(500):
            if "b" in revoked:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.INFO, logger="fhirgate.tokens.revocations"):
        asyncio.run(run())
    assert "a" in revoked
    assert "b" in revoked
    assert feed.failures == 3
    assert fetch.urls[1:4] == [f"{URL}?since=50"] * 3  # the cursor survived the failures
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "HTTP status 503" in warnings[0].getMessage()
    assert any("answers again" in r.getMessage() for r in caplog.records)


def test_one_poller_per_loop_and_url_shared_by_instances_and_released_by_the_last() -> None:
    config = OpenIdConnectConfig(
        issuer="http://auth.test", revocation_feed_url=URL, revocation_poll_interval=30
    )

    async def run() -> None:
        first, second = Handler(config), Handler(config)
        first.init_worker()
        second.init_worker()
        assert first.feed is not None
        assert first.feed is second.feed
        assert first.feed.users == 2
        feed = first.feed
        first.close()
        assert feed.users == 1
        assert feed._task is not None
        reloaded = Handler(config)  # a reload: the new instance starts before the old closes
        reloaded.init_worker()
        second.close()
        assert reloaded.feed is feed
        reloaded.close()
        assert feed.users == 0
        assert feed._task is None
        again = Handler(config)
        again.init_worker()
        assert again.feed is not feed  # a new poller once the last user left
        again.close()
        await asyncio.sleep(0)

    asyncio.run(run())


def test_outside_a_loop_nothing_polls_until_the_first_request() -> None:
    handler = Handler(OpenIdConnectConfig(issuer="http://auth.test", revocation_feed_url=URL))
    handler.init_worker()
    assert handler.feed is None
    assert handler._wants_feed is True
    assert revocation_feed.acquire(URL, 2) is None


def test_config_fields() -> None:
    config = Handler.validate_config({"issuer": "https://idp.test"})
    assert isinstance(config, OpenIdConnectConfig)
    assert config.revocation_feed_url is None
    assert config.revocation_poll_interval == 2
    for bad in (
        {"revocation_feed_url": "ftp://auth.test/revocations"},
        {"revocation_feed_url": "https://auth.test/revocations?since=1"},
        {"revocation_feed_url": "https://user:pw@auth.test/revocations"},
        {"revocation_poll_interval": 0},
        {"revocation_poll_interval": 7200},
    ):
        with pytest.raises((ValueError, ConfigError)):
            Handler.validate_config({"issuer": "https://idp.test", **bad})


def test_a_hostile_feed_cannot_keep_entries_forever_or_without_bound(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`exp` far in the future is held at most MAX_TOKEN_LIFETIME; the set stops at MAX_REVOKED
    (logged once) instead of growing with whatever the feed sends."""
    monkeypatch.setattr(revocation_feed, "MAX_REVOKED", 50)
    far = 1e300
    fetch = FakeFeed(
        _page([(f"j{i}", far) for i in range(40)], 10, after="j39"),
        _page([(f"k{i}", far) for i in range(40)], 20),
    )
    revoked = RevocationSet()
    feed = RevocationFeed(URL, 1, fetch, revoked=revoked)
    with caplog.at_level(logging.ERROR, logger="fhirgate.tokens.revocations"):
        asyncio.run(feed.poll_once())
    assert len(revoked) == 50
    assert max(revoked._ids.values()) <= time.time() + revocation_feed.MAX_TOKEN_LIFETIME + 5
    assert revoked.prune(time.time() + revocation_feed.MAX_TOKEN_LIFETIME + 10) == 50
    assert sum("the most this worker keeps" in r.getMessage() for r in caplog.records) == 1
