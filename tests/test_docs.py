"""The generated references stay true: docs/settings.md and docs/plugins.md match the code."""

from __future__ import annotations

from fhirgate.docsgen import generated


def test_generated_reference_docs_are_current() -> None:
    stale = [str(path) for path, text in generated().items() if not path.exists() or path.read_text() != text]
    assert stale == [], f"run `python -m fhirgate.docsgen` to refresh: {stale}"


def test_every_plugin_is_documented_with_every_field() -> None:
    from fhirgate.gateway.plugins.registry import available_plugins, get_plugin_class

    text = dict((p.name, t) for p, t in generated().items())["plugins.md"]
    for name in available_plugins():
        assert f"## `{name}`" in text
        cls = get_plugin_class(name)
        assert cls is not None
        for field, info in cls.Config.model_fields.items():
            assert f"`{info.alias or field}`" in text, (name, field)
            assert info.description, f"{name}.{field} has no description"
