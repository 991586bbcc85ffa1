"""`fhirgate keys rotate|list`: the authorization server's signing keys (issue 5 §3)."""

from __future__ import annotations

import argparse

from fhirgate.cli.auth_store_cmd import add_store_options, auth_store, run, when
from fhirgate.settings import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "keys",
        help="the authorization server's signing keys: rotate, list",
        description=(
            "Manage the authorization server's signing keys. A rotated-out key stays published in "
            "the JWKS until the tokens it signed have expired (auth_access_token_lifetime)."
        ),
    )
    actions = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    rotate = actions.add_parser("rotate", help="create a new signing key and retire the current one")
    rotate.add_argument("--alg", default="RS256", help="RS256 (default), RS384, ES256 or ES384")
    listing = actions.add_parser("list", help="every stored key: kid, alg, state, created, published until")
    for action in (rotate, listing):
        add_store_options(action)
    rotate.set_defaults(func=lambda args: run(args, _rotate))
    listing.set_defaults(func=lambda args: run(args, _list))


async def _rotate(settings: Settings, args: argparse.Namespace) -> None:
    from fhirgate.authserver.keys import KeyRing, check_alg

    alg = check_alg(args.alg)  # before opening (and perhaps creating) the database
    async with auth_store(settings) as store:
        result = await KeyRing(store).rotate(alg, settings.auth_access_token_lifetime)
    print(f"new {alg} key: {result.new.kid}")
    if not result.retired:
        print(f"retired: none (the first {alg} key)")
    for key in result.retired:
        print(f"retired: {key.kid} (published until {when(result.published_until)})")


async def _list(settings: Settings, args: argparse.Namespace) -> None:
    from fhirgate.authserver.keys import KeyRing, published_until

    async with auth_store(settings) as store:
        keys = await KeyRing(store).keys()
    if not keys:
        print("no keys yet (the authorization server creates one on first start; or: fhirgate keys rotate)")
        return
    rows = [("kid", "alg", "state", "created", "published until")]
    for key in keys:
        until = published_until(key, settings.auth_access_token_lifetime)
        rows.append(
            (key.kid, key.alg, "active" if key.active else "retired", when(key.created_at), when(until))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
