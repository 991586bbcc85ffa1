"""Config of the `file-log` plugin (Kong's `kong/plugins/file-log/schema.lua`)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from fhirgate.gateway.plugins.base import PluginConfig

# Kong: `match = [[^[^*&%%\`]+$]]` (a Lua pattern: no `*`, `&`, `%` or backtick),
# `err = "not a valid filename"`.
_VALID_PATH = re.compile(r"^[^*&%`]+$")
MSG_BAD_PATH = "not a valid filename"
MSG_LUA = (
    "custom_fields_by_lua is not supported: fhirgate does not run Lua code; remove it (the record "
    "is Kong's kong.log.serialize() without custom fields)"
)


class FileLogConfig(PluginConfig):
    path: str = Field(
        description=(
            "The file path of the output log file. The plugin creates the log file if it doesn't exist yet."
        )
    )
    reopen: bool = Field(
        False, description="Determines whether the log file is closed and reopened on every request."
    )
    custom_fields_by_lua: dict[str, str] | None = Field(
        None, description="Lua code as a key-value map (refused: fhirgate does not run Lua)."
    )

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v:
            raise ValueError("length must be at least 1")
        if not _VALID_PATH.match(v) or "\x00" in v:
            raise ValueError(MSG_BAD_PATH)
        return v

    @field_validator("custom_fields_by_lua")
    @classmethod
    def _no_lua(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v:
            raise ValueError(MSG_LUA)
        return v


__all__ = ["FileLogConfig"]
