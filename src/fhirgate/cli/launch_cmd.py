"""`fhirgate launch`: mint an EHR launch value (SMART App Launch 2.2 "EHR launch", issue 5 §2)."""

from __future__ import annotations

import argparse

from fhirgate.cli.auth_store_cmd import add_store_options, auth_store, run
from fhirgate.settings import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "launch",
        help="mint an EHR launch value for one client (patient, encounter context)",
        description=(
            "Mint a `launch` value the way an EHR would: the app passes it to /authorize with the "
            "`launch` scope and receives this patient (and encounter) without a patient picker. "
            "The value is bound to one client, single-use and expires after --lifetime seconds; "
            "only its SHA-256 is stored."
        ),
    )
    p.add_argument("--patient", required=True, metavar="ID", help="the Patient id of the launch context")
    p.add_argument("--encounter", metavar="ID", help="the Encounter id of the launch context")
    p.add_argument(
        "--client-id",
        dest="client_id",
        required=True,
        metavar="ID",
        help="the client to launch",
    )
    p.add_argument(
        "--fhir-context",
        dest="fhir_context",
        action="append",
        default=[],
        metavar="TYPE/ID",
        help="a further resource for the app's fhirContext (repeatable)",
    )
    p.add_argument("--lifetime", type=int, default=300, metavar="SECONDS", help="how long it is valid (300)")
    add_store_options(p)
    p.set_defaults(func=lambda args: run(args, _launch))


async def _launch(settings: Settings, args: argparse.Namespace) -> None:
    from fhirgate.authserver.launch import LaunchError, mint_launch

    if not 1 <= args.lifetime <= 3600:
        raise LaunchError("--lifetime must be 1 to 3600 seconds")
    async with auth_store(settings) as store:
        value = await mint_launch(
            store, args.client_id, args.patient, args.encounter, args.fhir_context, args.lifetime
        )
    print(value)
