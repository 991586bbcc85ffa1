"""The discovery documents: OpenID Connect Discovery 1.0, RFC 8414 authorization server metadata,
and SMART App Launch 2.2's `.well-known/smart-configuration`.

Every URL is the issuer plus a path, and every list says only what this server does: a capability
appears here when the flow behind it works (and is tested).
"""

from __future__ import annotations

from typing import Any

from fhirgate.authserver.oauth import ServerConfig

__all__ = [
    "CAPABILITIES",
    "GRANT_TYPES",
    "SCOPES_SUPPORTED",
    "TOKEN_AUTH_METHODS",
    "oauth_metadata",
    "openid_configuration",
    "smart_configuration",
]

GRANT_TYPES = ["authorization_code", "refresh_token", "client_credentials"]
TOKEN_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "private_key_jwt"]
CLIENT_ASSERTION_ALGS = ["RS384", "ES384", "RS256", "ES256"]

#: SMART App Launch 2.2 §"Capabilities" that work end to end.
CAPABILITIES = [
    "client-confidential-symmetric",
    "client-confidential-asymmetric",
    "permission-v1",
    "permission-v2",
    # flows.py: the browser flows
    "launch-ehr",
    "launch-standalone",
    "client-public",
    "authorize-post",
    "context-banner",
    "context-style",
    "context-ehr-patient",
    "context-ehr-encounter",
    "context-standalone-patient",
    "permission-offline",
    "permission-online",
    "permission-patient",
    "permission-user",
    "sso-openid-connect",
]

SCOPES_SUPPORTED = [
    "system/*.read",
    "system/*.rs",
    "system/*.cruds",
    # flows.py: user flows (system/ scopes are never granted there)
    "openid",
    "fhirUser",
    "launch",
    "launch/patient",
    "offline_access",
    "online_access",
    "patient/*.read",
    "patient/*.rs",
    "patient/*.cruds",
    "user/*.read",
    "user/*.rs",
    "user/*.cruds",
]


def oauth_metadata(config: ServerConfig, signing_alg: str) -> dict[str, Any]:
    """RFC 8414 §2 metadata."""
    issuer = config.issuer
    return {
        "issuer": issuer,
        "token_endpoint": issuer + "/token",
        "jwks_uri": issuer + "/jwks",
        "grant_types_supported": list(GRANT_TYPES),
        "authorization_endpoint": issuer + "/authorize",
        "token_endpoint_auth_methods_supported": ["none", *TOKEN_AUTH_METHODS],
        "token_endpoint_auth_signing_alg_values_supported": list(CLIENT_ASSERTION_ALGS),
        # endpoints.py: RFC 7662, RFC 7009, RFC 7591 (registration answers 403 while closed)
        "introspection_endpoint": issuer + "/introspect",
        "introspection_endpoint_auth_methods_supported": list(TOKEN_AUTH_METHODS),
        "revocation_endpoint": issuer + "/revoke",
        "revocation_endpoint_auth_methods_supported": ["none", *TOKEN_AUTH_METHODS],
        "introspection_endpoint_auth_signing_alg_values_supported": list(CLIENT_ASSERTION_ALGS),
        "revocation_endpoint_auth_signing_alg_values_supported": list(CLIENT_ASSERTION_ALGS),
        "registration_endpoint": issuer + "/register",
        "scopes_supported": list(SCOPES_SUPPORTED),
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "access_token_signing_alg_values_supported": [signing_alg],
    }


def openid_configuration(config: ServerConfig, signing_alg: str) -> dict[str, Any]:
    """OpenID Connect Discovery 1.0 §3 (the RFC 8414 members plus the OpenID ones)."""
    doc = oauth_metadata(config, signing_alg)
    doc.update(
        {
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "userinfo_endpoint": config.issuer + "/userinfo",
            "claims_supported": [
                "iss",
                "sub",
                "aud",
                "exp",
                "iat",
                "auth_time",
                "nonce",
                "at_hash",
                "fhirUser",
            ],
        }
    )
    return doc


def smart_configuration(config: ServerConfig, signing_alg: str) -> dict[str, Any]:
    """SMART App Launch 2.2 §"Metadata": every required and recommended field."""
    doc = oauth_metadata(config, signing_alg)
    doc["capabilities"] = list(CAPABILITIES)
    # flows.py: where a user sees and revokes the applications it authorized
    doc["management_endpoint"] = config.issuer + "/manage"
    return doc
