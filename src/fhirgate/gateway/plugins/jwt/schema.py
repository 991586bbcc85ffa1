"""Config of the `jwt` plugin (Kong's `kong/plugins/jwt/schema.lua`): same fields, defaults and
validation messages (`spec/03-plugins/16-jwt/06-schema_spec.lua`)."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from fhirgate.gateway.plugins.base import PluginConfig

MAX_EXPIRATION = 31536000
MSG_MAXIMUM_EXPIRATION_RANGE = f"value should be between 0 and {MAX_EXPIRATION}"
MSG_EXPECTED_EXP = "expected to contain: exp"


def _dedupe(values: list[str]) -> list[str]:
    # Kong's `set` type: each value once, first occurrence wins.
    return list(dict.fromkeys(values))


class JwtConfig(PluginConfig):
    uri_param_names: list[str] = Field(
        default_factory=lambda: ["jwt"],
        description="A list of querystring parameters that the plugin will inspect to retrieve JWTs.",
    )
    cookie_names: list[str] = Field(
        default_factory=list,
        description="A list of cookie names that the plugin will inspect to retrieve JWTs.",
    )
    header_names: list[str] = Field(
        default_factory=lambda: ["authorization"],
        description="A list of HTTP header names that the plugin will inspect to retrieve JWTs.",
    )
    key_claim_name: str = Field(
        "iss",
        description=(
            "The name of the claim in which the key identifying the secret must be passed. Looked up "
            "in the payload first, then in the JOSE header (so `kid` works)."
        ),
    )
    secret_is_base64: bool = Field(
        False, description="If true, the plugin assumes the credential's HS* `secret` to be base64 encoded."
    )
    claims_to_verify: list[Literal["exp", "nbf"]] | None = Field(
        None, description="A list of registered claims (`exp`, `nbf`) that Kong verifies."
    )
    maximum_expiration: float = Field(
        0,
        description=(
            "A value between 0 and 31536000 (365 days) limiting how far in the future `exp` may be "
            "(seconds). 0 disables the check; a positive value requires `exp` in `claims_to_verify`."
        ),
    )
    anonymous: str | None = Field(
        None,
        description=(
            "An optional consumer id or username to use as an anonymous consumer if authentication "
            "fails (logical OR with other auth plugins)."
        ),
    )
    run_on_preflight: bool = Field(
        True, description="Whether the plugin should authenticate `OPTIONS` preflight requests."
    )
    realm: str | None = Field(
        None, description="When authentication fails, the realm sent in the `WWW-Authenticate` header."
    )

    @field_validator("uri_param_names", "cookie_names", "header_names")
    @classmethod
    def _set(cls, v: list[str]) -> list[str]:
        return _dedupe(v)

    @field_validator("claims_to_verify")
    @classmethod
    def _claims_set(cls, v: list[Literal["exp", "nbf"]] | None) -> list[Literal["exp", "nbf"]] | None:
        return list(dict.fromkeys(v)) if v is not None else None

    @field_validator("maximum_expiration")
    @classmethod
    def _range(cls, v: float) -> float:
        if not 0 <= v <= MAX_EXPIRATION:
            raise ValueError(MSG_MAXIMUM_EXPIRATION_RANGE)
        return v

    @field_validator("realm")
    @classmethod
    def _realm(cls, v: str | None) -> str | None:
        # It is written inside a quoted-string of WWW-Authenticate (RFC 9110 §11.6.1, §5.6.4).
        if v is not None and any(c in v for c in '"\\\r\n\0'):
            raise ValueError("realm cannot contain quotes, backslashes or line breaks")
        return v

    @model_validator(mode="after")
    def _maximum_needs_exp(self) -> Self:
        if self.maximum_expiration > 0 and "exp" not in (self.claims_to_verify or []):
            raise ValidationError.from_exception_data(
                "JwtConfig",
                [
                    InitErrorDetails(
                        type=PydanticCustomError("jwt", MSG_EXPECTED_EXP),
                        loc=("claims_to_verify",),
                        input=self.claims_to_verify,
                    )
                ],
            )
        return self
