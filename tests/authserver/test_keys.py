"""The signing keys' contract, run against SQLite and PostgreSQL with real keys: one active key per
algorithm (also under concurrent starts), a JWKS of public members only that verifies what the key
signs, rotation that keeps the old key published until its tokens expire, then prunes it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet

from fhirgate import clock
from fhirgate.authserver import store as auth_store
from fhirgate.authserver.keys import KeyRing, SigningKey, UnsupportedAlgorithmError
from fhirgate.authserver.store import AuthStore
from fhirgate.storage.backend import DatabaseUrlError
from fhirgate.tokens import verify_jwt
from fhirgate.tokens.jwk import PRIVATE_MEMBERS, parse_jwks
from tests.fhirserver.harness import BACKENDS, database

LIFETIME = 3600
T0 = 1_800_000_000.0
PRIVATE = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def now() -> Iterator[list[float]]:
    """The clock the key ring reads; tests move `now[0]`."""
    current = [T0]
    clock.set_clock(lambda: current[0])
    try:
        yield current
    finally:
        clock.set_clock(None)


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 §3: SHA-256 of the required members, lexicographic order, no whitespace."""
    required = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y")}[jwk["kty"]]
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return _b64u(hashlib.sha256(canonical.encode()).digest())


async def _count(store: AuthStore, where: str = "1=1") -> int:
    async with store.read() as s:
        row = await s.conn.fetchrow(f"SELECT COUNT(*) FROM auth_key WHERE {where}")
    assert row is not None
    return int(row[0])


def _kids(jwks: dict[str, list[dict[str, str]]]) -> list[str]:
    return [k["kid"] for k in jwks["keys"]]


def _verify_both_ways(key: SigningKey, jwks: dict[str, list[dict[str, str]]]) -> None:
    claims = {"iss": "http://localhost:8000/auth", "sub": "u1", "iat": int(T0), "exp": int(T0) + 300}
    token = key.sign(claims, typ="at+jwt")
    # fhirgate's own verifier, with the key picked from the published JWKS by kid
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": key.alg, "kid": key.kid, "typ": "at+jwt"}
    (published,) = parse_jwks(jwks).by_kid(key.kid)
    assert published.private_members == ()
    from fhirgate.tokens import public_key

    verified = verify_jwt(
        token,
        public_key(published.key, published.algorithms),
        issuer="http://localhost:8000/auth",
        typ={"at+jwt", "application/at+jwt"},
        now=T0,
    )
    assert verified.claims["sub"] == "u1"
    # joserfc, independently
    decoded = jose_jwt.decode(token, KeySet.import_key_set(jwks), algorithms=[key.alg])  # type: ignore[arg-type]
    assert decoded.claims["sub"] == "u1"
    assert decoded.header["kid"] == key.kid


@pytest.mark.parametrize("alg", ["RS256", "ES256", "RS384", "ES384"])
def test_first_start_creates_one_key_and_later_starts_reuse_it(
    db_url: str, alg: str, now: list[float]
) -> None:
    async def run() -> None:
        store = await AuthStore.open(db_url)
        ring = KeyRing(store)
        assert await ring.active(alg) is None
        first = await ring.ensure_active(alg)
        assert first.alg == alg
        assert first.created_at == int(T0 * 1000)
        assert first.retired_at is None
        assert (await ring.ensure_active(alg)).kid == first.kid
        assert await _count(store) == 1
        await store.close()
        # a restart: same key, parsed from the stored PEM
        store = await AuthStore.open(db_url)
        again = await KeyRing(store).ensure_active(alg)
        assert again.kid == first.kid
        assert again.public_jwk == first.public_jwk
        assert await _count(store) == 1
        await store.close()

    asyncio.run(run())


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_the_jwks_has_public_members_only_and_verifies_what_the_key_signs(
    db_url: str, alg: str, now: list[float]
) -> None:
    async def run() -> None:
        store = await AuthStore.open(db_url)
        ring = KeyRing(store)
        key = await ring.ensure_active(alg)
        jwks = await ring.jwks(LIFETIME)
        (jwk,) = jwks["keys"]
        for name in PRIVATE:
            assert name not in jwk
        assert set(PRIVATE) >= set(PRIVATE_MEMBERS)
        expected = {"RSA": {"n", "e"}, "EC": {"crv", "x", "y"}}[jwk["kty"]]
        assert set(jwk) == {"kty", "kid", "use", "alg"} | expected
        assert jwk["use"] == "sig"
        assert jwk["alg"] == alg
        assert jwk["kty"] == ("RSA" if alg.startswith("RS") else "EC")
        assert jwk["kid"] == key.kid == _thumbprint(jwk)
        if alg == "RS256":
            assert key.private_key.key_size == 2048
        else:
            assert jwk["crv"] == "P-256"
        _verify_both_ways(key, jwks)
        # the private key is stored as PKCS#8 PEM, the public JWK without private members
        async with store.read() as s:
            row = await s.conn.fetchrow("SELECT private_pem, public_jwk FROM auth_key")
        assert row is not None
        assert row[0].startswith("-----BEGIN PRIVATE KEY-----")
        assert not set(json.loads(row[1])) & set(PRIVATE)
        await store.close()

    asyncio.run(run())


def test_rotation_keeps_the_old_key_published_until_its_tokens_expire_then_prunes_it(
    db_url: str, now: list[float]
) -> None:
    async def run() -> None:
        store = await AuthStore.open(db_url)
        ring = KeyRing(store)
        old = await ring.ensure_active("RS256")
        other = await ring.ensure_active("ES256")
        token = old.sign({"sub": "before-rotation", "iat": int(T0), "exp": int(T0) + LIFETIME})

        now[0] = T0 + 100
        result = await ring.rotate("RS256", LIFETIME)
        new = result.new
        assert new.kid != old.kid
        assert [k.kid for k in result.retired] == [old.kid]
        retired_at = int((T0 + 100) * 1000)
        assert result.retired[0].retired_at == retired_at
        assert result.published_until == retired_at + LIFETIME * 1000
        assert (await ring.active("RS256")) == new
        assert (await ring.active("ES256")) == other  # another algorithm's key is untouched
        jwks = await ring.jwks(LIFETIME)
        assert sorted(_kids(jwks)) == sorted([new.kid, other.kid, old.kid])
        assert _kids(jwks)[-1] == old.kid  # active keys first
        # a token the old key signed still verifies against the published set
        decoded = jose_jwt.decode(token, KeySet.import_key_set(jwks), algorithms=["RS256"])  # type: ignore[arg-type]
        assert decoded.claims["sub"] == "before-rotation"
        _verify_both_ways(new, jwks)

        now[0] = T0 + 100 + LIFETIME - 1  # the old key's last tokens are still valid
        assert old.kid in _kids(await ring.jwks(LIFETIME))
        assert await ring.prune(LIFETIME) == 0

        now[0] = T0 + 100 + LIFETIME  # retired_at + lifetime: every token it signed has expired
        assert sorted(_kids(await ring.jwks(LIFETIME))) == sorted([new.kid, other.kid])
        assert await _count(store) == 3
        assert await ring.prune(LIFETIME) == 1
        assert await _count(store) == 2
        assert {k.kid for k in await ring.keys()} == {new.kid, other.kid}
        assert await ring.prune(LIFETIME) == 0
        await store.close()

    asyncio.run(run())


def test_rotation_without_a_key_creates_the_first_one(db_url: str, now: list[float]) -> None:
    async def run() -> None:
        store = await AuthStore.open(db_url)
        ring = KeyRing(store)
        result = await ring.rotate("ES384", LIFETIME)
        assert result.retired == ()
        assert result.published_until is None
        assert (await ring.ensure_active("ES384")).kid == result.new.kid
        assert json.loads((await ring.keys())[0].public_jwk)["crv"] == "P-384"
        await store.close()

    asyncio.run(run())


@pytest.fixture
def instant_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Key generation without its (random) delay, so concurrent transactions really overlap."""
    from fhirgate.authserver import keys

    made = {alg: [keys._generate(alg) for _ in range(10)] for alg in ("RS256", "ES256")}
    monkeypatch.setattr(keys, "_generate", lambda alg: made[alg].pop())


@pytest.mark.usefixtures("instant_keys")
def test_concurrent_first_starts_create_one_active_key(db_url: str) -> None:
    """Five nodes (each its own store: pool or SQLite connection) start at once, two tasks each."""

    async def run() -> None:
        stores = [await AuthStore.open(db_url) for _ in range(5)]
        try:
            rings = [KeyRing(s) for s in stores for _ in range(2)]
            keys = await asyncio.gather(*(ring.ensure_active("RS256") for ring in rings))
            assert len({k.kid for k in keys}) == 1
            assert await _count(stores[0]) == 1
            assert await _count(stores[0], "retired_at IS NULL") == 1
        finally:
            for s in stores:
                await s.close()

    asyncio.run(run())


@pytest.mark.usefixtures("instant_keys")
def test_concurrent_rotations_leave_exactly_one_active_key(db_url: str) -> None:
    async def run() -> None:
        stores = [await AuthStore.open(db_url) for _ in range(3)]
        try:
            await KeyRing(stores[0]).ensure_active("ES256")
            results = await asyncio.gather(*(KeyRing(s).rotate("ES256", LIFETIME) for s in stores))
            assert len({r.new.kid for r in results}) == 3
            assert await _count(stores[0]) == 4
            assert await _count(stores[0], "retired_at IS NULL") == 1
        finally:
            for s in stores:
                await s.close()

    asyncio.run(run())


def test_an_unsupported_algorithm_is_refused(db_url: str) -> None:
    async def run() -> None:
        store = await AuthStore.open(db_url)
        ring = KeyRing(store)
        for alg in ("HS256", "none", "PS256", "EdDSA"):
            with pytest.raises(UnsupportedAlgorithmError, match="unsupported signing algorithm"):
                await ring.ensure_active(alg)
            with pytest.raises(UnsupportedAlgorithmError):
                await ring.rotate(alg)
        assert await _count(store) == 0
        await store.close()

    asyncio.run(run())


def test_the_store_migrates_once_and_refuses_a_newer_schema(db_url: str) -> None:
    async def run() -> None:
        store = await AuthStore.open(db_url)
        async with store.write() as s:
            assert await auth_store.current_version(s.conn) == len(auth_store.MIGRATIONS)
            assert await auth_store.migrate(s.conn) == (len(auth_store.MIGRATIONS),) * 2
            await s.conn.execute("UPDATE auth_schema SET version = ?", (len(auth_store.MIGRATIONS) + 1,))
        await store.close()
        with pytest.raises(DatabaseUrlError, match="newer than this fhirgate"):
            await AuthStore.open(db_url)

    asyncio.run(run())


def test_the_auth_store_and_the_fhir_store_share_one_database(db_url: str) -> None:
    """`database_url` is the default of both stores: their migration tables don't collide."""
    from fhirgate.fhirserver.storage.store import FhirStore

    async def run() -> None:
        fhir = await FhirStore.open(db_url)
        await fhir.close()
        store = await AuthStore.open(db_url)
        key = await KeyRing(store).ensure_active()
        await store.close()
        fhir = await FhirStore.open(db_url)
        await fhir.close()
        store = await AuthStore.open(db_url)
        assert (await KeyRing(store).ensure_active()).kid == key.kid
        await store.close()

    asyncio.run(run())
