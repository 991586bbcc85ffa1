"""A cache of verified tokens, keyed by the exact token string, and a revocation set.

Verifying an RS256 signature costs tens of microseconds; a client sends the same access token
again and again until it expires. `VerifiedTokenCache` remembers what a successful verification
produced (for the `jwt` plugin: the credential, the consumer and the claims) so the next request
with the very same token string skips parsing and signature verification.

What makes it safe:

- The key is the whole token string: a token that differs in any character (a tampered payload, a
  re-encoded signature) is a different key, so it is never a hit.
- An entry is served only inside the token's validity window, checked on every hit against
  `fhirgate.clock`: never at or after `exp` (RFC 7519 §4.1.4), never before `nbf` (§4.1.5), never
  after `max_ttl` seconds in the cache (which also bounds tokens without `exp`). Outside it the entry
  is dropped and the caller verifies the token again, so an expired token gets the caller's usual
  refusal even if it was cached.
- A revoked token is never a hit: its `jti` is looked up in a `RevocationSet` on every hit (one set
  lookup). The caller must consult `is_revoked` on a miss too, after verification, or a revoked
  token would simply be verified and accepted again.
- Bounded: at most `max_entries` entries (least recently used evicted first) and tokens longer than
  `max_token_length` characters are not cached at all (bounded memory: about
  `max_entries * max_token_length` bytes of keys at worst).
- Flushed when what the entries depend on changes: the cache belongs to one plugin instance, and the
  gateway builds new plugin instances for every configuration (`GatewayState`), so a reload that
  changes a key, a credential or a consumer starts from an empty cache. `clear()` exists for callers
  whose keys change without a reload (a JWKS refresh).

Per worker process, like Kong's per-node cache (DECISIONS.md: caches may be per worker). The hit
path is a dict lookup, a clock read, three comparisons, one set lookup and a move to the LRU end.
Not thread-safe beyond what the GIL gives (one event loop per worker).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from fhirgate import clock
from fhirgate.tokens.claims import is_number

__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_MAX_TOKEN_LENGTH",
    "DEFAULT_MAX_TTL",
    "REVOKED",
    "RevocationSet",
    "VerifiedTokenCache",
]

V = TypeVar("V")

#: Entries per cache (per plugin instance and worker).
DEFAULT_MAX_ENTRIES = 10_000
#: Longest time an entry is served, in seconds, whatever the token's `exp`.
DEFAULT_MAX_TTL = 300.0
#: Tokens longer than this (characters) are verified every time, never cached.
DEFAULT_MAX_TOKEN_LENGTH = 4096

_NEVER = float("inf")
_ALWAYS = float("-inf")


class RevocationSet:
    """Revoked token ids (`jti`, RFC 7519 §4.1.7), consulted in O(1).

    In memory, per worker process; a shared store (Redis) can replace it later behind the same two
    methods (`revoke`, `__contains__`). `until` is when the revoked token would expire anyway (its
    `exp`): after it the id is forgotten by `prune`, which keeps the set bounded by the tokens still
    alive."""

    __slots__ = ("_ids",)

    def __init__(self) -> None:
        self._ids: dict[str, float] = {}

    def revoke(self, jti: str, until: float | None = None) -> None:
        self._ids[jti] = _NEVER if until is None else max(until, self._ids.get(jti, _ALWAYS))

    def unrevoke(self, jti: str) -> None:
        self._ids.pop(jti, None)

    def __contains__(self, jti: object) -> bool:
        return jti in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def prune(self, now: float | None = None) -> int:
        """Forget the ids whose token has expired anyway; returns how many were forgotten."""
        current = clock.now() if now is None else now
        gone = [jti for jti, until in self._ids.items() if until <= current]
        for jti in gone:
            del self._ids[jti]
        return len(gone)

    def clear(self) -> None:
        self._ids.clear()


#: The process-wide revocation set: revocations outlive configuration reloads (a new plugin
#: instance, a new cache, the same set).
REVOKED = RevocationSet()


class _Entry(Generic[V]):
    __slots__ = ("expires", "jti", "not_before", "value")

    def __init__(self, value: V, expires: float, not_before: float, jti: str | None) -> None:
        self.value = value
        self.expires = expires
        self.not_before = not_before
        self.jti = jti


class VerifiedTokenCache(Generic[V]):
    """Token string -> what its verification produced (`V`), bounded, LRU.

    `get(token)` returns the value, or None when the token is not cached, expired (`exp`), not yet
    valid (`nbf`), older than `max_ttl` in the cache, or revoked (`jti`). `put(token, value, claims)`
    stores it after a successful verification; the window comes from the claims."""

    __slots__ = (
        "_entries",
        "_now",
        "evictions",
        "hits",
        "max_entries",
        "max_token_length",
        "max_ttl",
        "misses",
        "revoked",
    )

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        *,
        max_ttl: float = DEFAULT_MAX_TTL,
        max_token_length: int = DEFAULT_MAX_TOKEN_LENGTH,
        revoked: RevocationSet | None = None,
        now: Callable[[], float] | None = None,
    ) -> None:
        if max_entries < 0 or max_ttl < 0 or max_token_length < 0:
            raise ValueError("max_entries, max_ttl and max_token_length must not be negative")
        self.max_entries = max_entries
        self.max_ttl = float(max_ttl)
        self.max_token_length = max_token_length
        self.revoked = REVOKED if revoked is None else revoked
        #: The clock: `fhirgate.clock.now` (read through the module, so `clock.set_clock` applies).
        self._now = now if now is not None else clock.now
        self._entries: OrderedDict[str, _Entry[V]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, token: object) -> bool:
        """Whether `token` has an entry (valid or not: no window check; for tests and metrics)."""
        return token in self._entries

    def get(self, token: str) -> V | None:
        entries = self._entries
        entry = entries.get(token)
        if entry is None:
            self.misses += 1
            return None
        now = self._now()
        if (
            now >= entry.expires
            or now < entry.not_before
            or (entry.jti is not None and entry.jti in self.revoked)
        ):
            del entries[token]
            self.misses += 1
            return None
        entries.move_to_end(token)
        self.hits += 1
        return entry.value

    def put(self, token: str, value: V, claims: Mapping[str, Any]) -> bool:
        """Remember a token that has just been verified. Returns False when it is not cached: the
        cache is disabled, the token is too long, outside its window already, or revoked."""
        if self.max_entries == 0 or len(token) > self.max_token_length:
            return False
        now = self._now()
        expires = now + self.max_ttl
        exp: Any = claims.get("exp")
        if is_number(exp) and exp < expires:
            expires = float(exp)
        nbf: Any = claims.get("nbf")
        not_before = float(nbf) if is_number(nbf) else _ALWAYS
        jti: Any = claims.get("jti")
        if type(jti) is not str:
            jti = None
        if now >= expires or now < not_before or (jti is not None and jti in self.revoked):
            return False
        entries = self._entries
        if token in entries:
            entries.move_to_end(token)
        elif len(entries) >= self.max_entries:
            entries.popitem(last=False)
            self.evictions += 1
        entries[token] = _Entry(value, expires, not_before, jti)
        return True

    def is_revoked(self, claims: Mapping[str, Any]) -> bool:
        """Whether the token with these claims has a revoked `jti` (check it on a miss, after
        verification)."""
        jti = claims.get("jti")
        return type(jti) is str and jti in self.revoked

    def revoke(self, jti: str, until: float | None = None) -> None:
        """Revoke a token id (in this cache's revocation set, shared by default)."""
        self.revoked.revoke(jti, until)

    def discard(self, token: str) -> None:
        self._entries.pop(token, None)

    def clear(self) -> None:
        """Drop every entry (a key or credential the entries depended on changed)."""
        self._entries.clear()

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._entries),
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }
