"""fhirgate's built-in FHIR R4 server: storage and search on SQLite or PostgreSQL.

Layout: `definitions` (the R4 SearchParameter and CompartmentDefinition data), `values` (FHIR value
semantics: date ranges, string normalisation, number precision), `fhirpath` + `indexing` (search
parameter expressions compiled once into extractors), `validation` (structural R4 validation),
`search` (query parsing), `storage` (schema, migrations, SQLite and PostgreSQL), `api` (the ASGI
app), `bundles` (batch and transaction), `capability` (CapabilityStatement).
"""
