"""Races between two writers on one store, on both databases: a family revocation that commits
while tokens are being issued in that family still reaches them (the grant row is locked while
tokens are issued), so no token of a revoked authorization stays out of the revocation feed."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import pytest

from fhirgate.authserver.store import AuthStore, StoredGrant
from tests.authserver.harness import BACKENDS, database


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_revocation_during_issuing_reaches_the_new_token(backend: str, tmp_path: Path) -> None:
    async def go(url: str) -> None:
        issuer = await AuthStore.open(url)
        revoker = await AuthStore.open(url)  # another worker or node
        try:
            family = "fam-" + secrets.token_hex(4)
            async with issuer.write() as s:
                await s.insert_grant(StoredGrant(family, "c1", "u1", None, "patient/*.rs", "{}", 1, 1))
            now = 10_000_000
            checked = asyncio.Event()

            async def issue() -> None:  # what Model.persist_tokens does
                async with issuer.write() as s:
                    assert not await s.family_revoked(family, lock=True)
                    checked.set()
                    await asyncio.sleep(0.3)  # the revocation arrives now
                    await s.record_tokens([("jti-new", family, "c1", now + 3_600_000)])

            async def revoke() -> None:
                await checked.wait()
                async with revoker.write() as s:
                    await s.revoke_family(family, now)

            await asyncio.gather(issue(), revoke())
            async with issuer.read() as s:
                page = await s.revoked_page(0, None, now, 100)
            assert any(entry[0] == "jti-new" for entry in page), page
        finally:
            await issuer.close()
            await revoker.close()

    with database(backend, tmp_path) as url:
        asyncio.run(go(url))
