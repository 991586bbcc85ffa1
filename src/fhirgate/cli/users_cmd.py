"""`fhirgate users create|list|delete`: the authorization server's users (issue 5 §4)."""

from __future__ import annotations

import argparse
import getpass
import sys

from fhirgate.cli.auth_store_cmd import add_store_options, auth_store, run, table, when
from fhirgate.settings import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "users",
        help="the authorization server's users: create, list, delete",
        description="Manage the users who log in to the authorization server.",
    )
    actions = p.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    create = actions.add_parser(
        "create",
        help="create a user (prompts for the password unless --password-stdin)",
        description="Create a user. The password is read from the terminal without echo, or from "
        "the first line of standard input with --password-stdin; it is stored only as an scrypt hash.",
    )
    create.add_argument("username")
    create.add_argument(
        "--fhir-user",
        dest="fhir_user",
        metavar="REF",
        help="the user's FHIR resource: Patient/123, Practitioner/9",
    )
    create.add_argument(
        "--password-stdin", dest="password_stdin", action="store_true", help="read the password from stdin"
    )
    listing = actions.add_parser("list", help="every user: username, fhirUser, created")
    delete = actions.add_parser("delete", help="delete a user")
    delete.add_argument("username")
    for action in (create, listing, delete):
        add_store_options(action)
    create.set_defaults(func=_create)
    listing.set_defaults(func=lambda args: run(args, _list))
    delete.set_defaults(func=lambda args: run(args, _delete))


def _read_password(args: argparse.Namespace) -> str:
    from fhirgate.authserver.users import InvalidUserError

    if args.password_stdin:
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    password = getpass.getpass("Password: ")
    if password and getpass.getpass("Repeat password: ") != password:
        raise InvalidUserError("the passwords do not match")
    return password


def _create(args: argparse.Namespace) -> int:
    from fhirgate.authserver.users import (
        MSG_EMPTY_PASSWORD,
        InvalidUserError,
        check_fhir_user,
        check_username,
    )

    try:  # the input is checked before the password is asked for and the database opened
        check_username(args.username)
        check_fhir_user(args.fhir_user)
        password = _read_password(args)
        if not password:
            raise InvalidUserError(MSG_EMPTY_PASSWORD)
    except InvalidUserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (EOFError, KeyboardInterrupt):
        print("error: no password given", file=sys.stderr)
        return 1

    async def create(settings: Settings, args: argparse.Namespace) -> None:
        from fhirgate.authserver.users import Users

        async with auth_store(settings) as store:
            user = await Users(store).create(args.username, password, args.fhir_user)
        print(f"created user {user.username}" + (f" ({user.fhir_user})" if user.fhir_user else ""))

    return run(args, create)


async def _list(settings: Settings, args: argparse.Namespace) -> None:
    from fhirgate.authserver.users import Users

    async with auth_store(settings) as store:
        users = await Users(store).list()
    if not users:
        print("no users yet (fhirgate users create USERNAME)")
        return
    table(
        [("username", "fhirUser", "created")]
        + [(u.username, u.fhir_user or "-", when(u.created_at)) for u in users]
    )


async def _delete(settings: Settings, args: argparse.Namespace) -> None:
    from fhirgate.authserver.users import Users

    async with auth_store(settings) as store:
        await Users(store).delete(args.username)
    print(f"deleted user {args.username}")
