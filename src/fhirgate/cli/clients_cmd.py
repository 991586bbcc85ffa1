"""`fhirgate clients create|list|delete`: the authorization server's OAuth clients (issue 5 §4)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fhirgate.cli.auth_store_cmd import add_store_options, auth_store, run, table, when
from fhirgate.settings import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "clients",
        help="the authorization server's OAuth clients: create, list, delete",
        description="Manage the OAuth clients registered with the authorization server (RFC 7591 metadata).",
    )
    actions = p.add_subparsers(dest="clients_command", metavar="ACTION", required=True)
    create = actions.add_parser(
        "create",
        help="register a client; prints its client_id and, for secret methods, its secret (once)",
    )
    create.add_argument("--name", required=True, help="client_name")
    create.add_argument(
        "--redirect-uri", dest="redirect_uris", action="append", metavar="URI", help="repeat for several"
    )
    create.add_argument(
        "--grant-type",
        dest="grant_types",
        action="append",
        metavar="GRANT",
        help="authorization_code (default), refresh_token, client_credentials; repeat for several",
    )
    create.add_argument(
        "--auth-method",
        dest="auth_method",
        metavar="METHOD",
        help="token_endpoint_auth_method: client_secret_basic (default), client_secret_post, "
        "private_key_jwt, none",
    )
    keys = create.add_mutually_exclusive_group()
    keys.add_argument(
        "--jwks", metavar="FILE", help="the client's public keys (JWK Set JSON) for private_key_jwt"
    )
    keys.add_argument(
        "--jwks-uri", dest="jwks_uri", metavar="URL", help="where the client publishes its JWK Set"
    )
    create.add_argument("--scope", help="the scopes the client may request, space-separated")
    listing = actions.add_parser(
        "list", help="every client: client_id, name, auth method, grant types (no secrets)"
    )
    delete = actions.add_parser("delete", help="delete a client")
    delete.add_argument("client_id")
    for action in (create, listing, delete):
        add_store_options(action)
    create.set_defaults(func=_create)
    listing.set_defaults(func=lambda args: run(args, _list))
    delete.set_defaults(func=lambda args: run(args, _delete))


def _metadata(args: argparse.Namespace) -> dict[str, Any]:
    metadata: dict[str, Any] = {"client_name": args.name}
    if args.redirect_uris:
        metadata["redirect_uris"] = args.redirect_uris
    if args.grant_types:
        metadata["grant_types"] = args.grant_types
    if args.auth_method is not None:
        metadata["token_endpoint_auth_method"] = args.auth_method
    if args.jwks is not None:
        with open(args.jwks, encoding="utf-8") as f:
            metadata["jwks"] = json.load(f)
    if args.jwks_uri is not None:
        metadata["jwks_uri"] = args.jwks_uri
    if args.scope is not None:
        metadata["scope"] = args.scope
    return metadata


def _create(args: argparse.Namespace) -> int:
    from fhirgate.authserver.clients import ClientError, validate_metadata

    try:  # checked before the database is opened (or created)
        metadata = _metadata(args)
        validate_metadata(metadata)
    except (OSError, ValueError) as exc:
        if isinstance(exc, ClientError):
            print(f"error: {exc}", file=sys.stderr)
        else:
            print(f"error: --jwks {args.jwks}: {exc}", file=sys.stderr)
        return 1

    async def create(settings: Settings, args: argparse.Namespace) -> None:
        from fhirgate.authserver.clients import Clients

        async with auth_store(settings) as store:
            client, secret = await Clients(store).create(metadata)
        print(f"client_id: {client.client_id}")
        if secret is not None:
            print(f"client_secret: {secret}")
            print(
                "warning: the client secret is not shown again and cannot be recovered; store it now",
                file=sys.stderr,
            )

    return run(args, create)


async def _list(settings: Settings, args: argparse.Namespace) -> None:
    from fhirgate.authserver.clients import Clients

    async with auth_store(settings) as store:
        clients = await Clients(store).list()
    if not clients:
        print("no clients yet (fhirgate clients create --name NAME ...)")
        return
    rows = [("client_id", "name", "auth method", "grant types", "created")]
    for c in clients:
        rows.append(
            (
                c.client_id,
                json.dumps(c.name or ""),
                c.auth_method,
                ",".join(c.grant_types),
                when(c.created_at),
            )
        )
    table(rows)


async def _delete(settings: Settings, args: argparse.Namespace) -> None:
    from fhirgate.authserver.clients import Clients

    async with auth_store(settings) as store:
        await Clients(store).delete(args.client_id)
    print(f"deleted client {args.client_id}")
