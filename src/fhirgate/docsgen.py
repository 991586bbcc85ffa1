"""Generate the reference docs from the code, so they cannot drift: `docs/settings.md` (every node
setting) and `docs/plugins.md` (every plugin's config field). `python -m fhirgate.docsgen` writes
them; a test fails when the committed files differ from what this produces."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from fhirgate.gateway.plugins.registry import available_plugins, get_plugin_class
from fhirgate.settings import settings_reference

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _type_name(annotation: Any) -> str:
    """A readable, deterministic type: `list[str] or null`, `one of: a, b`."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        parts = [_type_name(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return text + " or null" if type(None) in args else text
    if origin in (list, tuple, set, frozenset):
        inner = ", ".join(_type_name(a) for a in args if a is not Ellipsis)
        return f"list of ({inner})" if " " in inner else f"list of {inner}"
    if origin is dict:
        return f"map of {_type_name(args[0])} to {_type_name(args[1])}"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "object"
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            annotation.__name__, annotation.__name__
        )
    return str(annotation).replace("typing.", "")


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        try:
            value: Any = field.default_factory()  # type: ignore[call-arg]
        except TypeError:
            return "(computed)"
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(see below)"
    return f"`{value!r}`".replace("|", "\\|")


def _fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows: list[str] = []
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        desc = (field.description or "").replace("\n", " ").replace("|", "\\|")
        type_name = _type_name(field.annotation).replace("|", "\\|")
        rows.append(f"| `{key}` | {type_name} | {_default(field)} | {desc} |")
        ann = field.annotation
        for candidate in getattr(ann, "__args__", (ann,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                nested.append((key, candidate))
    for key, sub in nested:
        rows += _fields(sub, prefix=f"{key}.")
    return rows


def plugins_reference() -> str:
    out = [
        "# Plugin reference",
        "",
        "Generated from the plugins' config schemas by `python -m fhirgate.docsgen`; do not edit by hand.",
        "Field names and defaults follow Kong's; deviations are listed in `kong-compatibility.md`.",
        "",
    ]
    for name in available_plugins():
        cls = get_plugin_class(name)
        assert cls is not None
        out += [
            f"## `{name}`",
            "",
            f"{cls.description}".strip() or "",
            "",
            f"Priority {cls.priority}." + (" Cannot be scoped to a consumer." if cls.no_consumer else ""),
            "",
            "| field | type | default | description |",
            "|---|---|---|---|",
            *_fields(cls.Config),
            "",
        ]
    return "\n".join(out)


def settings_doc() -> str:
    return "\n".join(
        [
            "# Node settings",
            "",
            "Generated from `fhirgate.settings.Settings` by `python -m fhirgate.docsgen`;",
            "do not edit by hand.",
            "",
            "Precedence: command-line flags, then `FHIRGATE_<NAME>` environment variables, then a",
            "`fhirgate.toml` file (`--settings FILE`, default `./fhirgate.toml`), then these defaults.",
            "Lists can be given as comma-separated strings in the environment",
            "(`FHIRGATE_TRUSTED_IPS=10.0.0.0/8,192.168.0.1`). Timeouts are in milliseconds unless stated.",
            "",
            settings_reference(),
            "",
        ]
    )


def generated() -> dict[Path, str]:
    return {DOCS / "settings.md": settings_doc(), DOCS / "plugins.md": plugins_reference()}


def main() -> int:
    for path, text in generated().items():
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
