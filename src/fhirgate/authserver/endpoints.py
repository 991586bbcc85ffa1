"""Token management endpoints: introspection (RFC 7662), revocation (RFC 7009), dynamic client
registration (RFC 7591) and the revocation feed the gateway polls."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import Route

if TYPE_CHECKING:
    from fhirgate.authserver.app import AuthApp
    from fhirgate.authserver.oauth import OAuthServer


def install(server: OAuthServer) -> None:
    """Register this module's endpoints with the Authlib server."""


def routes(app: AuthApp) -> list[Route]:
    """This module's HTTP routes."""
    return []
