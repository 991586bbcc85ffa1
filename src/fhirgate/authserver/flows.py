"""The browser flows: `/authorize`, the login, patient picker and consent pages, the
authorization_code grant with PKCE, refresh tokens, OpenID Connect and SMART launch context."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import Route

if TYPE_CHECKING:
    from fhirgate.authserver.app import AuthApp
    from fhirgate.authserver.oauth import OAuthServer


def install(server: OAuthServer) -> None:
    """Register this module's grants with the Authlib server."""


def routes(app: AuthApp) -> list[Route]:
    """This module's HTTP routes."""
    return []
