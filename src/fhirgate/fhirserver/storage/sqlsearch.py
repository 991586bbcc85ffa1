"""Compile a parsed search (`model.SearchQuery`) into SQL over the typed index tables.

Each clause becomes a predicate on the candidate resource row `r`. The most selective clause
drives the query as `r.pid IN (subquery)` (an index range scan on its value); the others are
correlated `EXISTS` probes through the `(pid, param)` indexes, so a US Core search such as
`Observation?patient=X&category=laboratory` reads the patient's few hundred index rows, not every
laboratory Observation. Semantics follow R4 search.html §3.1.1.4 (types, prefixes, modifiers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from fhirgate.fhirserver.definitions import definitions, param_id
from fhirgate.fhirserver.model import (
    DateValue,
    HasClause,
    Include,
    NumberValue,
    ParamClause,
    QuantityValue,
    ReferenceValue,
    SearchQuery,
    SearchValue,
    StringValue,
    TokenValue,
    UriValue,
)

if TYPE_CHECKING:
    from fhirgate.fhirserver.storage.store import SearchPage, Session, Stored

_TABLE = {
    "string": "fhir_string",
    "token": "fhir_token",
    "date": "fhir_date",
    "number": "fhir_number",
    "quantity": "fhir_quantity",
    "uri": "fhir_uri",
    "reference": "fhir_reference",
}

#: Rounds of `_include:iterate` / `_revinclude:iterate` before stopping (reported as a warning).
MAX_ITERATE = 4

Sql = tuple[str, list[Any]]


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _prefix_range(text: str) -> tuple[str, str]:
    """[text, upper) such that every string starting with `text` lies in it (byte order)."""
    return text, text + "\U0010ffff"


# ---- value predicates on an index-table alias `x` ----------------------------------------------


def _value_sql(clause: ParamClause, value: SearchValue, x: str) -> Sql:
    mod = clause.modifier
    if isinstance(value, StringValue):
        if clause.type == "token":  # token :text — prefix on the normalised display/text
            low, high = _prefix_range(value.text)
            return f"{x}.text >= ? AND {x}.text < ?", [low, high]
        if mod == "exact":
            return f"{x}.exact = ?", [value.text]
        if mod == "contains":
            return f"{x}.norm LIKE ? ESCAPE '\\'", [f"%{_like_escape(value.text)}%"]
        low, high = _prefix_range(value.text)
        return f"{x}.norm >= ? AND {x}.norm < ?", [low, high]
    if isinstance(value, TokenValue):
        parts: list[str] = []
        args: list[Any] = []
        if value.code is not None:
            parts.append(f"{x}.code = ?")
            args.append(value.code)
        if value.system == "":
            parts.append(f"{x}.system IS NULL")
        elif value.system is not None:
            parts.append(f"{x}.system = ?")
            args.append(value.system)
        return " AND ".join(parts) or "1 = 1", args
    if isinstance(value, ReferenceValue):
        if value.url is not None and value.target_id is None:
            return f"{x}.url = ?", [value.url]
        if value.target_type is not None:
            return f"{x}.target_id = ? AND {x}.target_type = ?", [value.target_id, value.target_type]
        return f"{x}.target_id = ?", [value.target_id]
    if isinstance(value, DateValue):
        return _date_sql(value, f"{x}.low", f"{x}.high")
    if isinstance(value, QuantityValue):
        sql, args = _number_sql(value.prefix, value.value, value.low, value.high, f"{x}.value")
        if value.system is not None:
            sql += f" AND {x}.system = ?"
            args.append(value.system)
            if value.code is not None:
                sql += f" AND {x}.code = ?"
                args.append(value.code)
        elif value.code is not None:
            sql += f" AND ({x}.code = ? OR {x}.unit = ?)"
            args += [value.code, value.code]
        return sql, args
    if isinstance(value, NumberValue):
        return _number_sql(value.prefix, value.value, value.low, value.high, f"{x}.value")
    if isinstance(value, UriValue):
        # URIs compare case-sensitively and character by character: no LIKE, whose `_`/`%` in a
        # stored value would be wildcards and which ignores ASCII case on SQLite.
        if mod == "below":  # stored URIs that start with the searched one
            return f"SUBSTR({x}.value, 1, ?) = ?", [len(value.value), value.value]
        if mod == "above":  # stored URIs that the searched one starts with
            return f"{x}.value = SUBSTR(CAST(? AS TEXT), 1, LENGTH({x}.value))", [value.value]
        return f"{x}.value = ?", [value.value]
    raise AssertionError(f"unexpected search value {value!r}")


def _date_sql(value: DateValue, low: str, high: str) -> Sql:
    """R4 search §3.1.1.4.6 prefixes on intervals: stored [low, high], searched [s_lo, s_hi]."""
    s_lo, s_hi, prefix = value.low, value.high, value.prefix
    if prefix == "eq":
        return f"{low} >= ? AND {high} <= ?", [s_lo, s_hi]
    if prefix == "ne":
        return f"NOT ({low} >= ? AND {high} <= ?)", [s_lo, s_hi]
    if prefix == "gt":
        return f"{high} > ?", [s_hi]
    if prefix == "lt":
        return f"{low} < ?", [s_lo]
    if prefix == "ge":
        # the range above the search value overlaps the target, or the search value contains it
        # (a target that starts inside and ends after it is "above"; one that starts before is not)
        return f"({high} > ? OR {low} >= ?)", [s_hi, s_lo]
    if prefix == "le":
        # the range below the search value overlaps the target, or the search value contains it
        return f"({low} < ? OR {high} <= ?)", [s_lo, s_hi]
    if prefix == "sa":
        return f"{low} > ?", [s_hi]
    if prefix == "eb":
        return f"{high} < ?", [s_lo]
    if prefix == "ap":
        # approximately: the intervals overlap once the searched one is widened by 10% of its
        # distance from now, at least a day (the spec leaves the amount to the server).
        from fhirgate import clock

        now = int(clock.now() * 1000)
        slack = max(86_400_000, abs(now - s_lo) // 10)
        return f"{high} >= ? AND {low} <= ?", [s_lo - slack, s_hi + slack]
    raise AssertionError(prefix)


def _number_sql(prefix: str, value: Decimal, low: Decimal, high: Decimal, col: str) -> Sql:
    v, lo, hi = float(value), float(low), float(high)
    if prefix == "eq":
        return f"{col} >= ? AND {col} < ?", [lo, hi]
    if prefix == "ne":
        return f"NOT ({col} >= ? AND {col} < ?)", [lo, hi]
    if prefix in ("gt", "sa"):
        return f"{col} > ?", [v]
    if prefix in ("lt", "eb"):
        return f"{col} < ?", [v]
    if prefix == "ge":
        return f"{col} >= ?", [v]
    if prefix == "le":
        return f"{col} <= ?", [v]
    if prefix == "ap":
        slack = abs(v) / 10
        return f"{col} >= ? AND {col} <= ?", [v - slack, v + slack]
    raise AssertionError(prefix)


# ---- clause predicates on a resource alias ------------------------------------------------------


class _Compiler:
    def __init__(self, types: Sequence[str] = ()) -> None:
        self.n = 0
        #: the types of a system-level search (empty: every type), whose clauses are on "Resource"
        self.types = types

    def alias(self) -> str:
        self.n += 1
        return f"x{self.n}"

    def clause(self, clause: ParamClause | HasClause, res: str, rtype: str) -> Sql:
        """A boolean SQL expression true when the resource row `res` matches `clause`."""
        if isinstance(clause, HasClause):
            return self._has(clause, res, rtype)
        code = clause.code
        if code == "_id":
            ids = [v.code for v in clause.values if isinstance(v, TokenValue)]
            sql = f"{res}.id IN ({', '.join('?' * len(ids))})"
            return (f"NOT ({sql})" if clause.modifier == "not" else sql), list(ids)
        if code == "_lastUpdated":
            if clause.modifier == "missing":
                return ("1 = 0" if clause.missing else "1 = 1"), []
            parts: list[str] = []
            date_args: list[Any] = []
            for v in clause.values:
                assert isinstance(v, DateValue)
                sql, a = _date_sql(v, f"{res}.last_updated", f"{res}.last_updated")
                parts.append(f"({sql})")
                date_args += a
            return f"({' OR '.join(parts)})", date_args
        if clause.modifier == "missing":
            return self._missing(clause, res)
        x = self.alias()
        if clause.chain is not None:
            return self._chain(clause, clause.chain, res, x)
        table, pids = self._table_params(clause)
        param_sql, param_args = _param_sql(x, pids, probe=True)
        ors, args = self._values(clause, x)
        exists = f"EXISTS (SELECT 1 FROM {table} {x} WHERE {x}.pid = {res}.pid AND {param_sql} AND ({ors}))"
        if clause.modifier == "not":
            return f"NOT {exists}", [*param_args, *args]
        return exists, [*param_args, *args]

    def _missing(self, clause: ParamClause, res: str) -> Sql:
        """search.html#missing: whether the resource has any value for the parameter (for a
        reference, a `Reference.identifier` is a value too)."""
        probes: list[tuple[str, list[int]]] = [(_TABLE[clause.type], self._param_ids(clause, ""))]
        if clause.type == "reference":
            probes.append(("fhir_token", self._param_ids(clause, ":identifier")))
        parts: list[str] = []
        args: list[Any] = []
        for table, pids in probes:
            x = self.alias()
            param_sql, param_args = _param_sql(x, pids, probe=True)
            parts.append(f"EXISTS (SELECT 1 FROM {table} {x} WHERE {x}.pid = {res}.pid AND {param_sql})")
            args += param_args
        exists = " OR ".join(parts)
        return (f"NOT ({exists})" if clause.missing else f"({exists})"), args

    def _chain(self, clause: ParamClause, chain: ParamClause, res: str, x: str) -> Sql:
        """search.html#chaining: a reference of `res` (through `clause`) to a current resource
        that matches `chain`. Without a target type, `chain` is resolved on each type the
        reference parameter can point to (its param_id is per type)."""
        t = self.alias()
        if clause.chain_type:
            targets = [clause.chain_type]
        else:
            targets = _reference_targets(clause.resource_type, clause.code, chain.code)
            if not targets:
                return "1 = 0", []
        sql = (
            f"EXISTS (SELECT 1 FROM fhir_reference {x} JOIN fhir_resource {t} "
            f"ON {t}.type = {x}.target_type AND {t}.id = {x}.target_id "
            f"WHERE {x}.pid = {res}.pid AND +{x}.param = ? AND {t}.deleted = 0 "
            f"AND {x}.target_type IN ({', '.join('?' * len(targets))})"
        )
        args: list[Any] = [clause.param_id, *targets]
        if len(targets) == 1:
            inner, inner_args = self.clause(_retarget(chain, targets[0]), t, targets[0])
            return f"{sql} AND {inner})", args + inner_args
        parts: list[str] = []
        for target in targets:
            inner, inner_args = self.clause(_retarget(chain, target), t, target)
            parts.append(f"({t}.type = ? AND {inner})")
            args += [target, *inner_args]
        return f"{sql} AND ({' OR '.join(parts)}))", args

    def driving(self, clause: ParamClause | HasClause) -> Sql | None:
        """`SELECT pid ...` for a clause that can drive the query from its index, else None."""
        if isinstance(clause, HasClause) or clause.chain is not None:
            return None
        if clause.modifier in ("missing", "not") or clause.code in ("_id", "_lastUpdated"):
            return None
        table, pids = self._table_params(clause)
        x = self.alias()
        param_sql, param_args = _param_sql(x, pids)
        ors, args = self._values(clause, x)
        return f"SELECT {x}.pid FROM {table} {x} WHERE {param_sql} AND ({ors})", [*param_args, *args]

    def _table_params(self, clause: ParamClause) -> tuple[str, list[int]]:
        if clause.modifier == "identifier":
            return "fhir_token", self._param_ids(clause, ":identifier")
        if clause.type == "token" and clause.modifier == "text":
            return "fhir_token", self._param_ids(clause, "")
        return _TABLE[clause.type], self._param_ids(clause, "")

    def _param_ids(self, clause: ParamClause, suffix: str) -> list[int]:
        """The index keys of `clause` (`suffix` ":identifier" for `Reference.identifier` rows).
        A clause of a system-level search is on "Resource": index rows are keyed per resource
        type, so it stands for the parameter of every type searched."""
        if clause.resource_type == "Resource":
            types = self.types or sorted(definitions().resource_types)
            return [param_id(t, clause.code + suffix) for t in types]
        if suffix:
            return [param_id(clause.resource_type, clause.code + suffix)]
        return [clause.param_id]

    def _values(self, clause: ParamClause, x: str) -> Sql:
        parts: list[str] = []
        args: list[Any] = []
        for value in clause.values:
            sql, a = _value_sql(clause, value, x)
            parts.append(f"({sql})")
            args += a
        return " OR ".join(parts) or "1 = 1", args

    def _has(self, clause: HasClause, res: str, rtype: str) -> Sql:
        x, s = self.alias(), self.alias()
        inner, inner_args = self.clause(clause.clause, s, clause.source_type)
        sql = (
            f"EXISTS (SELECT 1 FROM fhir_reference {x} JOIN fhir_resource {s} ON {s}.pid = {x}.pid "
            f"WHERE {x}.param = ? AND {x}.target_type = ? AND {x}.target_id = {res}.id AND {s}.deleted = 0 "
            f"AND {inner})"
        )
        return sql, [clause.reference_param_id, rtype, *inner_args]


def _param_sql(x: str, pids: Sequence[int], probe: bool = False) -> Sql:
    """`x.param = ?` (or IN). In a `probe` (a correlated lookup by `x.pid = r.pid`) the column is
    written `+x.param`: that keeps both planners off the (param, value, pid) index, whose covering
    scan of every row of the parameter they otherwise prefer, and on the (pid, param) index,
    which reads only the candidate's own few rows."""
    col = f"+{x}.param" if probe else f"{x}.param"
    if len(pids) == 1:
        return f"{col} = ?", [pids[0]]
    return f"{col} IN ({', '.join('?' * len(pids))})", list(pids)


def _reference_targets(rtype: str, code: str, chained: str) -> list[str]:
    """The types a reference parameter can point to that define the chained parameter `chained`
    (every type when the parameter names none)."""
    defs = definitions()
    spd = defs.params(rtype).get(code)
    targets = spd.targets if spd is not None and spd.targets else sorted(defs.resource_types)
    return [t for t in targets if chained in defs.params(t)]


def _retarget(chain: ParamClause, target: str) -> ParamClause:
    """`chain` as a clause on `target`."""
    if chain.resource_type == target:
        return chain
    return replace(chain, resource_type=target, param_id=param_id(target, chain.code))


_DRIVE_ORDER = {"reference": 0, "token": 1, "uri": 1, "string": 2, "quantity": 4, "number": 4, "date": 5}


def _drive_rank(clause: ParamClause | HasClause) -> int:
    """Which clause drives the query: the one likely to match the fewest rows. Without statistics
    this is a rule of thumb: references and identifiers first; then tokens given with their system
    (`http://loinc.org|8867-4`); then strings; then bare codes, which are often few-valued
    (`gender=male`, `category=vital-signs`); numbers and dates last."""
    if isinstance(clause, HasClause):
        return 9
    if clause.modifier == "identifier" or clause.code in ("identifier", "_id"):
        return 0
    if clause.type == "token" and not all(
        isinstance(v, TokenValue) and v.system and v.code for v in clause.values
    ):
        return 3
    return _DRIVE_ORDER.get(clause.type, 9)


def _sort_sql(query: SearchQuery) -> Sql:
    keys: list[str] = []
    args: list[Any] = []
    for key in query.sort:
        direction = "DESC" if key.descending else "ASC"
        if key.type == "_id" or key.code == "_id":
            keys.append(f"r.id {direction}")
            continue
        if key.type == "_lastUpdated" or key.code == "_lastUpdated":
            keys.append(f"r.last_updated {direction}")
            continue
        table = _TABLE[key.type]
        agg = "MAX" if key.descending else "MIN"
        col = {
            "fhir_string": "norm",
            "fhir_token": "code",
            "fhir_date": "high" if key.descending else "low",
            "fhir_number": "value",
            "fhir_quantity": "value",
            "fhir_uri": "value",
            "fhir_reference": "target_id",
        }[table]
        expr = f"(SELECT {agg}(s.{col}) FROM {table} s WHERE s.pid = r.pid AND +s.param = ?)"
        # resources without a value sort last in both directions, on both databases
        keys.append(f"({expr} IS NULL) ASC")
        keys.append(f"{expr} {direction}")
        args += [key.param_id, key.param_id]
    keys.append("r.pid ASC")
    return ", ".join(keys), args


#: where `compile_where`'s SELECT takes its column list
COLS = "/*cols*/"


def compile_where(query: SearchQuery) -> tuple[str, str, list[Any]]:
    """(FROM, WHERE, args) selecting the matching current resources `r`.

    The driving clause becomes a materialised CTE joined to `r`: both planners then start from
    its (usually small) set of pids instead of guessing, which they did badly without fresh
    statistics (a patient's laboratory Observations: 1 s on SQLite, 850 ms on PostgreSQL,
    against a few ms this way)."""
    comp = _Compiler(query.types if query.resource_type is None else ())
    clauses = list(query.clauses)
    drive: Sql | None = None
    if query.compartment is not None:
        drive = ("SELECT c.pid FROM fhir_compartment c WHERE c.patient_id = ?", [query.compartment])
    else:
        for clause in sorted(clauses, key=_drive_rank):
            drive = comp.driving(clause)
            if drive is not None:
                clauses.remove(clause)
                break
    prefix, source, args = "", "fhir_resource r", []
    # With a driving set, `r` is reached only by its key: `type || ''` keeps planners without
    # fresh statistics from scanning every resource of the type instead (PostgreSQL did).
    type_col = "r.type"
    if drive is not None:
        prefix = f"WITH drive AS MATERIALIZED (SELECT DISTINCT pid FROM ({drive[0]}) d0) "
        source = "drive d JOIN fhir_resource r ON r.pid = d.pid"
        args += drive[1]
        type_col = "r.type || ''"
    where: list[str] = ["r.deleted = 0"]
    if query.resource_type is not None:
        where.append(f"{type_col} = ?")
        args.append(query.resource_type)
    elif query.types:
        where.append(f"{type_col} IN ({', '.join('?' * len(query.types))})")
        args += list(query.types)
    for clause in clauses:
        sql, a = comp.clause(clause, "r", query.resource_type or "")
        where.append(sql)
        args += a
    return f"{prefix}SELECT {COLS} FROM {source}", " AND ".join(where), args


async def run(session: Session, query: SearchQuery, max_include: int) -> SearchPage:
    from fhirgate.fhirserver.storage.store import SearchPage

    select, where, args = compile_where(query)
    conn = session.conn
    total: int | None = None
    # search.html#count: `_count=0` is treated as `_summary=count` (the total, no entries)
    count_only = query.summary == "count" or query.count == 0
    if count_only or query.total in ("accurate", "estimate"):
        row = await conn.fetchrow(f"{select.replace(COLS, 'COUNT(*)')} WHERE {where}", args)
        total = int(row[0]) if row else 0
    if count_only:
        return SearchPage([], [], total, False, [])
    order, order_args = _sort_sql(query)
    rows = await conn.fetch(
        f"{select.replace(COLS, 'r.pid')} WHERE {where} ORDER BY {order} LIMIT ? OFFSET ?",
        [*args, *order_args, query.count + 1, query.offset],
    )
    pids = [int(r[0]) for r in rows]
    has_next = len(pids) > query.count
    pids = pids[: query.count]
    matches = await session.by_pids(pids)
    if total is None and not has_next and query.total != "none":
        if pids or query.offset == 0:
            total = query.offset + len(pids)  # the last page: everything before it was full
        else:  # a page past the end says nothing about how many came before it
            row = await conn.fetchrow(f"{select.replace(COLS, 'COUNT(*)')} WHERE {where}", args)
            total = int(row[0]) if row else 0
    included, warnings = await _includes(session, query, matches, max_include)
    return SearchPage(matches, included, total, has_next, warnings)


async def _includes(
    session: Session, query: SearchQuery, matches: list[Stored], max_include: int
) -> tuple[list[Stored], list[str]]:
    if not (query.includes or query.revincludes) or not matches:
        return [], []
    seen = {m.pid for m in matches}
    included: list[Stored] = []
    warnings: list[str] = []
    frontier = matches
    for round_ in range(MAX_ITERATE + 1):
        new_pids: list[int] = []
        for inc in (*query.includes, *query.revincludes):
            if round_ > 0 and not inc.iterate:
                continue
            for pid in await _include_pids(session, inc, frontier):
                if pid not in seen:
                    seen.add(pid)
                    new_pids.append(pid)
        if not new_pids:
            break
        if len(included) + len(new_pids) > max_include:
            new_pids = new_pids[: max(0, max_include - len(included))]
            warnings.append(
                f"_include/_revinclude stopped after {max_include} included resources; "
                "narrow the search or lower _count"
            )
        frontier = await session.by_pids(new_pids)
        included += frontier
        if warnings:
            break
        if round_ == MAX_ITERATE and any(i.iterate for i in (*query.includes, *query.revincludes)):
            warnings.append(f":iterate stopped after {MAX_ITERATE} rounds")
    return included, warnings


async def _include_pids(session: Session, inc: Include, frontier: Sequence[Stored]) -> list[int]:
    conn = session.conn
    out: list[int] = []
    if not inc.reverse:
        sources = [s.pid for s in frontier if s.type == inc.source_type]
        for start in range(0, len(sources), 500):
            chunk = sources[start : start + 500]
            sql = (
                "SELECT DISTINCT t.pid FROM fhir_reference x JOIN fhir_resource t "
                "ON t.type = x.target_type AND t.id = x.target_id "
                f"WHERE x.param = ? AND t.deleted = 0 AND x.pid IN ({', '.join('?' * len(chunk))})"
            )
            args: list[Any] = [inc.param_id, *chunk]
            if inc.target_type:
                sql += " AND x.target_type = ?"
                args.append(inc.target_type)
            out += [int(r[0]) for r in await conn.fetch(sql, args)]
        return out
    by_type: dict[str, list[str]] = {}
    for s in frontier:
        if inc.target_type is None or s.type == inc.target_type:
            by_type.setdefault(s.type, []).append(s.id)
    for ttype, ids in by_type.items():
        for start in range(0, len(ids), 500):
            id_chunk = ids[start : start + 500]
            rows = await conn.fetch(
                "SELECT DISTINCT x.pid FROM fhir_reference x WHERE x.param = ? AND x.target_type = ? "
                f"AND x.target_id IN ({', '.join('?' * len(id_chunk))})",
                [inc.param_id, ttype, *id_chunk],
            )
            out += [int(r[0]) for r in rows]
    return out


async def everything(
    session: Session, patient_id: str, types: Sequence[str], since: int | None, count: int, offset: int
) -> tuple[list[Stored], int]:
    """Patient/$everything (R4 patient-operation-everything): the Patient, every resource in its
    compartment, and the resources those reference (practitioners, organizations, medications)."""
    where = ["r.deleted = 0"]
    args: list[Any] = [patient_id, patient_id]
    if types:
        where.append(f"r.type IN ({', '.join('?' * len(types))})")
        args += list(types)
    if since is not None:
        where.append("r.last_updated >= ?")
        args.append(since)
    base = (
        "WITH c AS (SELECT pid FROM fhir_compartment WHERE patient_id = ?), "
        "e AS (SELECT pid FROM c UNION SELECT t.pid FROM fhir_reference x JOIN fhir_resource t "
        "ON t.type = x.target_type AND t.id = x.target_id WHERE x.pid IN "
        "(SELECT pid FROM fhir_compartment WHERE patient_id = ?)) "
        f"SELECT {{cols}} FROM fhir_resource r WHERE r.pid IN (SELECT pid FROM e) AND {' AND '.join(where)}"
    )
    conn = session.conn
    total_row = await conn.fetchrow(base.format(cols="COUNT(*)"), args)
    rows = await conn.fetch(
        base.format(cols="r.pid") + " ORDER BY (r.type <> 'Patient'), r.pid LIMIT ? OFFSET ?",
        [*args, count, offset],
    )
    return await session.by_pids([int(r[0]) for r in rows]), int(total_row[0]) if total_row else 0
