"""The authorization server's signing keys: generated on first start, persisted in the store,
published in `/jwks` (public members only), rotated with `fhirgate keys rotate`.

A retired key stays in the JWKS until every token it signed has expired (`retired_at` + the access
token lifetime), so a rotation never breaks a token in flight (issue 5 §3); after that `prune`
deletes it. `kid` is the key's RFC 7638 JWK thumbprint (base64url SHA-256), so the same key always
has the same `kid` and two keys never share one.

Creating a key is check-and-create in one write transaction, under a PostgreSQL advisory lock (on
SQLite the write transaction is BEGIN IMMEDIATE): nodes starting at once end with one active key.
The key is generated before that transaction, so the database's write lock is never held across the
(slow, off-loop) RSA generation.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from fhirgate import clock
from fhirgate.authserver.store import AuthStore, StoredKey
from fhirgate.errors import FhirgateError

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALG",
    "PUBLIC_MEMBERS",
    "KeyRing",
    "RotateResult",
    "SigningKey",
    "UnsupportedAlgorithmError",
    "check_alg",
    "published_until",
]

DEFAULT_ALG = "RS256"

#: Signing algorithms and how their keys are made (RFC 7518 §3.3: RSA keys of at least 2048 bits;
#: §3.4: ES256 on P-256, ES384 on P-384).
ALGORITHMS: Mapping[str, tuple[str, str | int]] = {
    "RS256": ("RSA", 2048),
    "RS384": ("RSA", 2048),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
}

#: The members a published JWK may carry, by key type (RFC 7518 §6.2.1, §6.3.1); anything else
#: (d, p, q, dp, dq, qi, oth) is private and never leaves the store.
PUBLIC_MEMBERS: Mapping[str, tuple[str, ...]] = {"RSA": ("n", "e"), "EC": ("crv", "x", "y")}

MSG_UNSUPPORTED_ALG = "unsupported signing algorithm {alg!r}: use one of {allowed}"


class UnsupportedAlgorithmError(FhirgateError, ValueError):
    """A signing algorithm the authorization server does not sign with."""

    def __init__(self, alg: str) -> None:
        super().__init__(MSG_UNSUPPORTED_ALG.format(alg=alg, allowed=", ".join(ALGORITHMS)))


def check_alg(alg: str) -> str:
    """`alg` if the server signs with it; else `UnsupportedAlgorithmError`."""
    if alg not in ALGORITHMS:
        raise UnsupportedAlgorithmError(alg)
    return alg


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def published_until(key: StoredKey, token_lifetime_s: float) -> int | None:
    """When a retired key leaves the JWKS (ms since the epoch); None while it is active."""
    if key.retired_at is None:
        return None
    return key.retired_at + _ms(token_lifetime_s)


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A key the server signs with: its `kid`, `alg`, the joserfc key (`key`) and the
    `cryptography` private key object (`private_key`)."""

    kid: str
    alg: str
    key: RSAKey | ECKey
    created_at: int
    retired_at: int | None = None

    @property
    def private_key(self) -> Any:
        return self.key.private_key

    @property
    def public_jwk(self) -> dict[str, Any]:
        return _public_jwk(self.key, self.kid, self.alg)

    def sign(self, claims: Mapping[str, Any], typ: str | None = "JWT") -> str:
        """A compact JWS of `claims` with header `alg`, `kid` and (unless None) `typ`."""
        header: dict[str, Any] = {"alg": self.alg, "kid": self.kid}
        if typ is not None:
            header["typ"] = typ
        return jwt.encode(header, dict(claims), self.key, algorithms=[self.alg])


@dataclass(frozen=True, slots=True)
class RotateResult:
    """What `KeyRing.rotate` did: the new active key, the keys it retired, and until when they stay
    published (ms since the epoch)."""

    new: SigningKey
    retired: tuple[StoredKey, ...]
    published_until: int | None


def _public_jwk(key: RSAKey | ECKey, kid: str, alg: str) -> dict[str, Any]:
    members = key.as_dict(private=False)
    kty = str(members["kty"])
    jwk: dict[str, Any] = {"kty": kty, "kid": kid, "use": "sig", "alg": alg}
    jwk.update({name: members[name] for name in PUBLIC_MEMBERS[kty]})
    return jwk


def _generate(alg: str) -> StoredKey:
    kty, size = ALGORITHMS[alg]
    key: RSAKey | ECKey
    if kty == "RSA":
        assert isinstance(size, int)
        key = RSAKey.generate_key(size, private=True, auto_kid=False)
    else:
        assert isinstance(size, str)
        key = ECKey.generate_key(size, private=True, auto_kid=False)
    kid = key.thumbprint()  # RFC 7638: base64url(SHA-256(required public members))
    pem = key.as_pem(private=True).decode()  # PKCS#8
    public = json.dumps(_public_jwk(key, kid, alg), separators=(",", ":"))
    return StoredKey(kid, alg, pem, public, _ms(clock.now()), None)


def _load(stored: StoredKey) -> SigningKey:
    kty = json.loads(stored.public_jwk)["kty"]
    key: RSAKey | ECKey = (
        RSAKey.import_key(stored.private_pem) if kty == "RSA" else ECKey.import_key(stored.private_pem)
    )
    return SigningKey(stored.kid, stored.alg, key, stored.created_at, stored.retired_at)


class KeyRing:
    """The signing keys in `store`. Parsed keys are cached by `kid` (a PEM is parsed once)."""

    def __init__(self, store: AuthStore) -> None:
        self.store = store
        self._parsed: dict[str, SigningKey] = {}

    def _signing(self, stored: StoredKey) -> SigningKey:
        cached = self._parsed.get(stored.kid)
        if cached is None or cached.retired_at != stored.retired_at:
            cached = self._parsed[stored.kid] = _load(stored)
        return cached

    async def active(self, alg: str = DEFAULT_ALG) -> SigningKey | None:
        """The key that signs with `alg` now (the newest active one), or None."""
        async with self.store.read() as s:
            rows = await s.active_keys(check_alg(alg))
        return self._signing(rows[0]) if rows else None

    async def ensure_active(self, alg: str = DEFAULT_ALG) -> SigningKey:
        """The active key for `alg`, generated and persisted first if there is none."""
        current = await self.active(alg)
        if current is not None:
            return current
        candidate = await asyncio.to_thread(_generate, alg)
        async with self.store.write() as s:
            await s.lock_keys()
            rows = await s.active_keys(alg)  # another node may have created one meanwhile
            if not rows:
                await s.insert_key(candidate)
                rows = [candidate]
        return self._signing(rows[0])

    async def rotate(self, alg: str = DEFAULT_ALG, token_lifetime_s: float | None = None) -> RotateResult:
        """Create a new active key for `alg` and retire the previous one(s) (retired_at = now)."""
        candidate = await asyncio.to_thread(_generate, check_alg(alg))
        async with self.store.write() as s:
            await s.lock_keys()
            retired = await s.active_keys(alg)
            now = _ms(clock.now())
            await s.retire_keys(alg, now)
            await s.insert_key(candidate)
        until = now + _ms(token_lifetime_s) if retired and token_lifetime_s is not None else None
        return RotateResult(
            self._signing(candidate),
            tuple(StoredKey(k.kid, k.alg, k.private_pem, k.public_jwk, k.created_at, now) for k in retired),
            until,
        )

    async def keys(self) -> list[StoredKey]:
        """Every stored key, newest first."""
        async with self.store.read() as s:
            return await s.keys()

    async def jwks(self, token_lifetime_s: float) -> dict[str, list[dict[str, Any]]]:
        """The JWK Set to publish: active keys, then retired keys whose tokens may still be valid
        (retired_at + `token_lifetime_s` > now); public members only."""
        now = _ms(clock.now())
        published: list[dict[str, Any]] = []
        retired: list[dict[str, Any]] = []
        for key in await self.keys():
            until = published_until(key, token_lifetime_s)
            if until is None:
                published.append(json.loads(key.public_jwk))
            elif until > now:
                retired.append(json.loads(key.public_jwk))
        return {"keys": published + retired}

    async def prune(self, token_lifetime_s: float) -> int:
        """Delete the retired keys no token can need any more; returns how many."""
        cutoff = _ms(clock.now()) - _ms(token_lifetime_s)
        async with self.store.write() as s:
            deleted = await s.delete_retired_before(cutoff)
        for kid in [
            kid for kid, k in self._parsed.items() if k.retired_at is not None and k.retired_at <= cutoff
        ]:
            del self._parsed[kid]
        return deleted
