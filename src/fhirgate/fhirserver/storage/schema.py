"""The FHIR store's schema, as numbered migrations applied in order on start.

`fhir_schema` records the version reached; a newer fhirgate applies only the migrations it adds,
inside one transaction, so an upgrade never asks a user to reload data. Never edit a released
migration: append a new one. Statements use the dialect type placeholders of
`fhirgate.storage.migrations.TYPES` ({pk}, {blob}, {text_c}, {real}).

Layout (the HAPI / IBM design, shrunk; see docs/fhir-server.md): `fhir_resource` holds one row per
logical resource (its current version, deleted flag), `fhir_version` every version's JSON bytes
exactly as served, and typed index tables the rows `indexing.Indexer` extracts on write, keyed by
the resource's `pid` and the parameter's 64-bit id. `fhir_compartment` lists the Patients whose
compartment holds each resource.
"""

from __future__ import annotations

from collections.abc import Sequence

from fhirgate.storage import migrations
from fhirgate.storage.backend import Connection

#: Index tables and their value columns (after pid, param), used by storage and search.
INDEX_TABLES: dict[str, tuple[str, ...]] = {
    "fhir_string": ("norm", "exact"),
    "fhir_token": ("system", "code", "text"),
    "fhir_date": ("low", "high"),
    "fhir_number": ("value",),
    "fhir_quantity": ("system", "code", "unit", "value"),
    "fhir_uri": ("value",),
    "fhir_reference": ("target_type", "target_id", "url"),
}

MIGRATIONS: Sequence[Sequence[str]] = (
    # 1: resources, versions, typed search index, compartments
    (
        """CREATE TABLE fhir_resource (
            pid {pk},
            type TEXT NOT NULL,
            id {text_c} NOT NULL,
            version INTEGER NOT NULL,
            last_updated BIGINT NOT NULL,
            deleted SMALLINT NOT NULL DEFAULT 0,
            UNIQUE (type, id))""",
        """CREATE TABLE fhir_version (
            pid BIGINT NOT NULL,
            version INTEGER NOT NULL,
            type TEXT NOT NULL,
            id TEXT NOT NULL,
            last_updated BIGINT NOT NULL,
            method TEXT NOT NULL,
            body {blob},
            PRIMARY KEY (pid, version))""",
        "CREATE INDEX fhir_version_updated ON fhir_version (last_updated)",
        "CREATE INDEX fhir_version_type_updated ON fhir_version (type, last_updated)",
        "CREATE INDEX fhir_resource_type_pid ON fhir_resource (type, deleted, pid)",
        "CREATE INDEX fhir_resource_type_updated ON fhir_resource (type, last_updated)",
        """CREATE TABLE fhir_string (pid BIGINT NOT NULL, param BIGINT NOT NULL, norm {text_c},
            exact {text_c})""",
        "CREATE INDEX fhir_string_value ON fhir_string (param, norm, pid)",
        "CREATE INDEX fhir_string_pid ON fhir_string (pid, param)",
        """CREATE TABLE fhir_token (pid BIGINT NOT NULL, param BIGINT NOT NULL, system {text_c},
            code {text_c}, text {text_c})""",
        "CREATE INDEX fhir_token_value ON fhir_token (param, code, system, pid)",
        "CREATE INDEX fhir_token_pid ON fhir_token (pid, param)",
        "CREATE TABLE fhir_date (pid BIGINT NOT NULL, param BIGINT NOT NULL, low BIGINT, high BIGINT)",
        "CREATE INDEX fhir_date_value ON fhir_date (param, low, high, pid)",
        "CREATE INDEX fhir_date_pid ON fhir_date (pid, param)",
        "CREATE TABLE fhir_number (pid BIGINT NOT NULL, param BIGINT NOT NULL, value {real})",
        "CREATE INDEX fhir_number_value ON fhir_number (param, value, pid)",
        "CREATE INDEX fhir_number_pid ON fhir_number (pid, param)",
        """CREATE TABLE fhir_quantity (pid BIGINT NOT NULL, param BIGINT NOT NULL, system TEXT, code TEXT,
            unit TEXT, value {real})""",
        "CREATE INDEX fhir_quantity_value ON fhir_quantity (param, value, pid)",
        "CREATE INDEX fhir_quantity_pid ON fhir_quantity (pid, param)",
        "CREATE TABLE fhir_uri (pid BIGINT NOT NULL, param BIGINT NOT NULL, value {text_c})",
        "CREATE INDEX fhir_uri_value ON fhir_uri (param, value, pid)",
        "CREATE INDEX fhir_uri_pid ON fhir_uri (pid, param)",
        """CREATE TABLE fhir_reference (pid BIGINT NOT NULL, param BIGINT NOT NULL, target_type TEXT,
            target_id {text_c}, url {text_c})""",
        "CREATE INDEX fhir_reference_value ON fhir_reference (param, target_id, target_type, pid)",
        "CREATE INDEX fhir_reference_target ON fhir_reference (target_type, target_id)",
        "CREATE INDEX fhir_reference_pid ON fhir_reference (pid, param)",
        "CREATE TABLE fhir_compartment (pid BIGINT NOT NULL, patient_id TEXT NOT NULL)",
        "CREATE INDEX fhir_compartment_patient ON fhir_compartment (patient_id, pid)",
        "CREATE INDEX fhir_compartment_pid ON fhir_compartment (pid)",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)

#: Version of the rules that turn a resource into index rows (search parameter data, FHIRPath
#: compilation, value conversions). Bump it when they change: a store whose rows were built by
#: other rules is reindexed from its stored resources on start (`store.reindex`), so an upgrade
#: never asks a user to reload data.
INDEX_VERSION = 1


#: The FHIR store's PostgreSQL advisory lock: two nodes starting at once must not both migrate.
LOCK_ID = 7245117


async def current_version(conn: Connection) -> int:
    return await migrations.current_version(conn, "fhir_schema")


async def migrate(conn: Connection) -> tuple[int, int]:
    """Apply the missing migrations in the caller's transaction; returns (from, to)."""
    # A new database's (empty) index is built by the current rules.
    return await migrations.apply(
        conn, "fhir_schema", MIGRATIONS, lock_id=LOCK_ID, extra_columns={"index_version": INDEX_VERSION}
    )


async def index_version(conn: Connection) -> int:
    row = await conn.fetchrow("SELECT index_version FROM fhir_schema")
    return int(row[0]) if row else 0
