"""A poller of an authorization server's revocation feed, feeding the revocation set the
verified-token caches consult (`fhirgate.tokens.cache.REVOKED`).

The feed (fhirgate's authorization server: `GET {issuer}/revocations?since=MS[&after=JTI]`)
answers `{"revoked": [{"jti", "exp" (seconds), "revoked_at" (ms)}], "next": MS, "more": BOOL,
"after": JTI (with more)}`: revoked access tokens not yet expired, oldest revocation first. Each
entry becomes `REVOKED.revoke(jti, until=exp)`, so a revoked token is refused by every plugin
instance of the worker, cached or not, from the next request on; the set forgets it when it would
have expired anyway (`prune`).

- One poller per event loop (so per worker) and feed URL, shared by every plugin instance that
  names the URL and kept across configuration reloads (reference-counted: `acquire` when an
  instance starts, `release` when the configuration holding it is replaced; the last release stops
  it). Started lazily, on the first `acquire` inside a running loop.
- Failure-tolerant: a failed fetch or a malformed answer keeps what was learned (the set and the
  cursor) and is retried at the next interval; the first failure and the recovery are logged
  (warning, info), not every repetition.
- Bounded: at most `max_pages` pages per poll, each at most `max_bytes` and `MAX_ENTRIES` entries;
  `jti`s longer than `MAX_JTI` are ignored; the revocation set is pruned at most once a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson

from fhirgate import clock
from fhirgate.tokens.cache import REVOKED, RevocationSet
from fhirgate.tokens.jwks_cache import MAX_BYTES, Fetched, FetchError, HttpFetcher

__all__ = ["MAX_ENTRIES", "MAX_JTI", "FeedError", "RevocationFeed", "acquire", "release"]

log = logging.getLogger("fhirgate.tokens.revocations")

MAX_JTI = 256
MAX_ENTRIES = 10_000
MAX_PAGES = 20
PRUNE_EVERY = 60.0
#: An entry is kept at most this long (s): no access token of ours lives longer than an hour (plus skew).
MAX_TOKEN_LIFETIME = 3600 + 300
#: The most revoked tokens one worker holds (a few tens of MB at most).
MAX_REVOKED = 200_000


class FeedError(FetchError):
    """The feed answered something that is not a revocation page."""


@dataclass(frozen=True, slots=True)
class Page:
    entries: list[tuple[str, float]]
    next: int
    after: str | None
    more: bool


def parse_page(body: bytes) -> Page:
    """A feed page, checked member by member (nothing is trusted half-way)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise FeedError("the revocation feed did not answer JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("revoked"), list):
        raise FeedError("the revocation feed's answer has no revoked list")
    revoked = doc["revoked"]
    if len(revoked) > MAX_ENTRIES:
        raise FeedError(f"the revocation feed's page has more than {MAX_ENTRIES} entries")
    nxt, more, after = doc.get("next"), doc.get("more", False), doc.get("after")
    if type(nxt) is not int or nxt < 0 or type(more) is not bool:
        raise FeedError("the revocation feed's next or more member is invalid")
    if more and (not isinstance(after, str) or not 0 < len(after) <= MAX_JTI):
        raise FeedError("the revocation feed's after member is invalid")
    entries: list[tuple[str, float]] = []
    for entry in revoked:
        if not isinstance(entry, dict):
            raise FeedError("a revocation feed entry is not an object")
        jti, exp = entry.get("jti"), entry.get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise FeedError("a revocation feed entry has no numeric exp")
        if isinstance(jti, str) and 0 < len(jti) <= MAX_JTI:
            entries.append((jti, float(exp)))
    return Page(entries, nxt, after if more else None, more)


class RevocationFeed:
    """Polls one feed URL every `interval` seconds into `revoked`."""

    def __init__(
        self,
        url: str,
        interval: float,
        fetch: Callable[[str], Awaitable[Fetched]] | None = None,
        *,
        revoked: RevocationSet | None = None,
        timeout: float = 5.0,
        max_bytes: int = MAX_BYTES,
        max_pages: int = MAX_PAGES,
    ) -> None:
        self.url = url
        self.interval = interval
        self.fetch = fetch or HttpFetcher(timeout=timeout, max_bytes=max_bytes)
        self.revoked = REVOKED if revoked is None else revoked
        self.max_pages = max_pages
        self.since = 0
        self.after: str | None = None
        self.failing = False
        self.full = False
        self.polls = 0
        self.failures = 0
        self.learned = 0
        self._pruned = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self.users = 0

    def _page_url(self) -> str:
        url = f"{self.url}?since={self.since}"
        return url + f"&after={quote(self.after, safe='')}" if self.after is not None else url

    async def poll_once(self) -> int:
        """Read the feed up to its end (at most `max_pages` pages); returns the entries applied.
        An entry is kept until its token's `exp`, but never longer than MAX_TOKEN_LIFETIME from
        now (an access token lives at most an hour), and the set stops growing at MAX_REVOKED:
        a broken or hostile feed cannot make the gateway keep entries forever or without bound."""
        applied = 0
        pruned = False
        for _ in range(self.max_pages):
            page = parse_page((await self.fetch(self._page_url())).body)
            ceiling = clock.now() + MAX_TOKEN_LIFETIME
            for jti, exp in page.entries:
                if len(self.revoked) >= MAX_REVOKED and jti not in self.revoked:
                    if not pruned:
                        self.revoked.prune()
                        pruned = True
                    if len(self.revoked) >= MAX_REVOKED:
                        if not self.full:
                            log.error(
                                "revocation feed %s: %d revoked tokens held, the most this worker keeps; "
                                "later revocations are not learned until some expire",
                                self.url,
                                MAX_REVOKED,
                            )
                        self.full = True
                        continue
                self.full = False
                self.revoked.revoke(jti, until=min(exp, ceiling))
            applied += len(page.entries)
            self.since, self.after = page.next, page.after
            if not page.more:
                break
        self.polls += 1
        self.learned += applied
        now = time.monotonic()
        if now - self._pruned >= PRUNE_EVERY:
            self.revoked.prune()
            self._pruned = now
        return applied

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # network, HTTP status, malformed page: keep what we know
                self.failures += 1
                if not self.failing:
                    message = exc.message if isinstance(exc, FetchError) else type(exc).__name__
                    log.warning(
                        "revocation feed %s failed (retrying every %gs): %s", self.url, self.interval, message
                    )
                self.failing = True
            else:
                if self.failing:
                    log.info("revocation feed %s answers again", self.url)
                self.failing = False
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self.run(), name=f"revocation feed {self.url}"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


_FEEDS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Any, ...], RevocationFeed]] = (
    weakref.WeakKeyDictionary()
)


def acquire(
    url: str, interval: float, *, timeout: float = 5.0, max_bytes: int = MAX_BYTES
) -> RevocationFeed | None:
    """The running loop's poller of `url` (started if needed), one more user counted; None outside
    a running loop (a configuration checked or loaded outside a worker polls nothing)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    feeds = _FEEDS.setdefault(loop, {})
    key = (url, interval, timeout, max_bytes)
    feed = feeds.get(key)
    if feed is None:
        feed = feeds[key] = RevocationFeed(url, interval, timeout=timeout, max_bytes=max_bytes)
    feed.users += 1
    feed.start()
    return feed


def release(feed: RevocationFeed) -> None:
    """One user fewer; the last one stops the poller (what it learned stays in the set)."""
    feed.users -= 1
    if feed.users > 0:
        return
    feed.cancel()
    for feeds in list(_FEEDS.values()):
        for key, value in list(feeds.items()):
            if value is feed:
                del feeds[key]
