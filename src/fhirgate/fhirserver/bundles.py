"""batch and transaction Bundles (R4 http.html §3.1.0.11).

A transaction is all or nothing: every entry runs in one database transaction and the first
failure rolls everything back and answers with that entry's OperationOutcome. Processing order is
the spec's (§3.1.0.11.2): DELETE, then POST, then PUT/PATCH, then GET/HEAD. Before any write, every
POSTed entry gets its id and every conditional PUT and conditional create is resolved, so all
`urn:uuid:` references (including circular ones) and conditional references (`Patient?identifier=
...`) are rewritten to `Type/id` first. A batch runs each entry on its own; each gets its own
status.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from fhirgate.fhirserver.errors import FhirError, bad_request, conflict
from fhirgate.fhirserver.http import Request, Response, loads_exact, prefer
from fhirgate.fhirserver.storage.store import FhirStore, Session, Stored
from fhirgate.fhirserver.validation import validate_resource

if TYPE_CHECKING:
    from fhirgate.fhirserver.api import FhirServer

_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
_URN = re.compile(r"urn:uuid:[0-9a-fA-F-]{36}")


@dataclass(slots=True)
class _Entry:
    index: int
    method: str
    path: str
    params: list[tuple[str, str]]
    full_url: str | None
    resource: dict[str, Any] | None
    headers: dict[str, str]
    raw_url: str
    # resolved before writing
    rid: str | None = None
    existing: Stored | None = None
    #: a batch entry's own validation failure (a transaction fails as a whole instead)
    error: FhirError | None = None
    result: dict[str, Any] = field(default_factory=dict)


def _status(code: int) -> str:
    return f"{code} {HTTPStatus(code).phrase}"


def _read_entries(server: FhirServer, bundle: Any) -> tuple[str, list[_Entry]]:
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise bad_request("POST to the base URL takes a Bundle of type batch or transaction")
    btype = bundle.get("type")
    if btype not in ("batch", "transaction"):
        raise bad_request(
            f"Bundle.type is {btype!r}: POST to the base URL processes only 'batch' or 'transaction' Bundles",
            "Bundle.type",
        )
    raw_entries = bundle.get("entry", [])
    if not isinstance(raw_entries, list):
        raise bad_request("Bundle.entry must be an array", "Bundle.entry")
    entries: list[_Entry] = []
    for i, raw in enumerate(raw_entries):
        where = f"Bundle.entry[{i}]"
        if not isinstance(raw, dict):
            raise bad_request(f"{where} is not an object", where)
        req = raw.get("request")
        if (
            not isinstance(req, dict)
            or not isinstance(req.get("url"), str)
            or req.get("method") not in _METHODS
        ):
            raise bad_request(
                f"{where}.request needs a method ({', '.join(_METHODS)}) and a url", f"{where}.request"
            )
        url = req["url"]
        parts = urlsplit(url)
        path = parts.path
        if parts.scheme and url.startswith(server.base + "/"):
            path = url[len(server.base) + 1 :].split("?", 1)[0]
        elif parts.scheme:
            raise bad_request(f"{where}.request.url {url!r} is not on this server", f"{where}.request.url")
        path = path.strip("/")
        if not path and req["method"] == "POST":
            raise bad_request(
                f"{where}: nested batch/transaction Bundles are not processed", f"{where}.request"
            )
        resource = raw.get("resource")
        method = req["method"]
        error: FhirError | None = None
        if method in ("POST", "PUT"):
            rtype = path.split("/", 1)[0]
            if resource is None:
                raise bad_request(f"{where}: a {method} entry needs a resource", f"{where}.resource")
            try:
                validate_resource(resource, rtype)
            except FhirError as err:
                if btype == "transaction":
                    raise _at(err, i) from None
                error = _at(err, i)
        headers = {"content-type": "application/fhir+json"}
        for key, header in (
            ("ifMatch", "if-match"),
            ("ifNoneMatch", "if-none-match"),
            ("ifNoneExist", "if-none-exist"),
            ("ifModifiedSince", "if-modified-since"),
        ):
            if isinstance(req.get(key), str):
                headers[header] = req[key]
        if method == "PATCH":
            headers["content-type"] = "application/json-patch+json"
        entries.append(
            _Entry(
                index=i,
                method=method,
                path=path,
                params=parse_qsl(parts.query, keep_blank_values=True),
                full_url=raw.get("fullUrl") if isinstance(raw.get("fullUrl"), str) else None,
                resource=resource,
                headers=headers,
                raw_url=url,
                error=error,
            )
        )
    return btype, entries


def _at(err: FhirError, index: int) -> FhirError:
    """The error of one entry, saying which entry it was."""
    expression = err.expression
    if expression:
        expression = (
            f"Bundle.entry[{index}].resource.{expression.split('.', 1)[-1]}"
            if "." in expression
            else f"Bundle.entry[{index}].resource"
        )
    return FhirError(
        err.status, f"Bundle.entry[{index}]: {err.diagnostics}", err.code, expression, err.headers
    )


async def process(server: FhirServer, store: FhirStore, request: Request, bundle: Any) -> Response:
    btype, entries = _read_entries(server, bundle)
    representation = prefer(request, "return") == "representation"
    if btype == "batch":
        out = [await _batch_entry(server, e, representation) for e in entries]
        return _response("batch-response", out)
    async with store.write() as session:
        await _transaction(server, session, entries, representation)
    return _response("transaction-response", [e.result for e in entries])


def _response(btype: str, results: list[dict[str, Any]]) -> Response:
    body = {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": btype, "entry": results}
    return Response.json(200, body)


def _entry_result(response: Response, representation: bool) -> dict[str, Any]:
    result: dict[str, Any] = {"status": _status(response.status)}
    for header, key in (("Location", "location"), ("ETag", "etag"), ("Last-Modified", "lastModified")):
        if header in response.headers:
            result[key] = response.headers[header]
    entry: dict[str, Any] = {"response": result}
    if response.body:
        parsed = loads_exact(response.body)
        if response.status >= 400:
            result["outcome"] = parsed
        elif representation or entry_is_read(response):
            entry["resource"] = parsed
    return entry


def entry_is_read(response: Response) -> bool:
    return "Location" not in response.headers


def _patch_body(e: _Entry) -> bytes:
    """The JSON Patch of a PATCH entry: a Binary resource whose `data` is the patch, base64
    (http.html §3.1.0.11: a Bundle entry's patch travels as a Binary)."""
    if not isinstance(e.resource, dict) or e.resource.get("resourceType") != "Binary":
        raise bad_request("a PATCH entry carries a Binary resource whose data is the JSON Patch")
    try:
        return base64.b64decode(e.resource.get("data", ""), validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise bad_request("the PATCH entry's Binary.data is not base64") from None


async def _batch_entry(server: FhirServer, e: _Entry, representation: bool) -> dict[str, Any]:
    if e.error is not None:
        return {"response": {"status": _status(e.error.status), "outcome": e.error.outcome()}}
    req = Request(e.method, e.path, e.params, dict(e.headers), b"", e.resource)
    if e.method in ("POST", "PUT"):
        req.headers["prefer"] = "return=representation" if representation else "return=minimal"
    if e.method == "PATCH":
        try:
            req.body = _patch_body(e)
        except FhirError as err:
            return {"response": {"status": _status(err.status), "outcome": _at(err, e.index).outcome()}}
        req.resource = None
    response = await server.handle(req)
    return _entry_result(response, representation)


async def _transaction(
    server: FhirServer, session: Session, entries: list[_Entry], representation: bool
) -> None:
    ordered = sorted(entries, key=lambda e: _ORDER[e.method])
    refs: dict[str, str] = {}  # fullUrl -> Type/id
    try:
        # 1. Resolve ids and conditional creates/updates before any write (circular urn:uuid refs work).
        for e in ordered:
            current_index = e.index
            rtype = e.path.split("/", 1)[0]
            if e.method == "POST":
                cond = e.headers.get("if-none-exist")
                if cond:
                    matches = await server.conditional(session, rtype, cond, "ifNoneExist")
                    if len(matches) > 1:
                        raise conflict(412, f"ifNoneExist {cond} matches more than one {rtype}")
                    if matches:
                        e.existing = matches[0]
                        e.rid = matches[0].id
                e.rid = e.rid or str(uuid.uuid4())
            elif e.method in ("PUT", "PATCH", "DELETE"):
                if "/" in e.path:
                    e.rid = e.path.split("/")[1]
                elif e.params:
                    matches = await server.conditional(
                        session, rtype, e.raw_url, f"conditional {e.method}", pairs=e.params
                    )
                    if len(matches) > 1:
                        raise conflict(412, f"{e.method} {e.raw_url} matches more than one resource")
                    if matches:
                        e.rid = matches[0].id
                    elif e.method == "PUT":
                        rid = e.resource.get("id") if isinstance(e.resource, dict) else None
                        e.rid = rid if isinstance(rid, str) else str(uuid.uuid4())
                    else:
                        e.rid = None
            if e.full_url and e.rid and e.method in ("POST", "PUT"):
                refs[e.full_url] = f"{rtype}/{e.rid}"
        # 2. Rewrite references in every resource.
        for e in ordered:
            current_index = e.index
            if isinstance(e.resource, dict) and e.method in ("POST", "PUT"):
                await _rewrite(server, session, e.resource, refs, e.index)
        # 3. Write, in the spec's order.
        for e in ordered:
            current_index = e.index
            e.result = await _run(server, session, e, representation)
    except FhirError as err:
        raise _at(err, current_index) from None


async def _rewrite(server: FhirServer, session: Session, node: Any, refs: dict[str, str], index: int) -> None:
    """Replace `urn:uuid:` and conditional references with `Type/id` (in place). The walk is
    synchronous; only references it does not know yet (conditional ones) are looked up."""
    pending: list[tuple[dict[str, Any], str]] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "reference" and isinstance(value, str):
                    known = refs.get(value)
                    if known is not None:
                        item[key] = known
                    elif value.startswith(("urn:uuid:", "urn:oid:")):
                        raise bad_request(
                            f"Reference {value} does not match the fullUrl of any entry in this transaction"
                        )
                    elif "?" in value and not value.startswith(("http://", "https://", "#")):
                        pending.append((item, value))
                elif key == "div" and isinstance(value, str) and "urn:uuid:" in value:
                    item[key] = _URN.sub(lambda m: refs.get(m.group(0), m.group(0)), value)
                elif isinstance(value, dict | list):
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(v for v in item if isinstance(v, dict | list))
    for holder, ref in pending:
        holder["reference"] = await _resolve_conditional(server, session, ref, refs)


async def _resolve_conditional(server: FhirServer, session: Session, ref: str, refs: dict[str, str]) -> str:
    """`Patient?identifier=...` -> `Patient/id`: exactly one match, or the transaction fails (412)."""
    if ref in refs:
        return refs[ref]
    rtype, _, condition = ref.partition("?")
    if rtype not in server.defs.resource_types:
        raise bad_request(f"Conditional reference {ref}: unknown resource type {rtype!r}")
    matches = await server.conditional(session, rtype, condition, "conditional reference")
    if len(matches) != 1:
        what = "no" if not matches else "more than one"
        raise conflict(
            412, f"Conditional reference {ref} matches {what} resource (it must match exactly one)"
        )
    resolved = f"{rtype}/{matches[0].id}"
    refs[ref] = resolved
    return resolved


async def _run(server: FhirServer, session: Session, e: _Entry, representation: bool) -> dict[str, Any]:
    rtype = e.path.split("/", 1)[0]
    if e.method == "POST":
        if e.existing is not None:
            return _stored_result(server, e.existing, 200, representation)
        assert isinstance(e.resource, dict)
        assert e.rid is not None
        stored = await session.create(e.resource, e.rid)
        return _stored_result(server, stored, 201, representation, location=True)
    if e.method == "PUT":
        assert isinstance(e.resource, dict)
        assert e.rid is not None
        body_id = e.resource.get("id")
        if "/" in e.path and body_id != e.rid:
            raise bad_request(f"The resource id {body_id!r} does not match the URL id {e.rid!r}")
        if_match = e.headers.get("if-match")
        from fhirgate.fhirserver.http import parse_etag

        stored, created = await session.update(
            e.resource, e.rid, parse_etag(if_match, "ifMatch") if if_match else None
        )
        return _stored_result(server, stored, 201 if created else 200, representation, location=created)
    if e.method == "DELETE":
        if e.rid is None:
            return {"response": {"status": _status(204)}}
        await session.delete(rtype, e.rid)
        return {"response": {"status": _status(204)}}
    req = Request(
        e.method,
        e.path if e.method != "PATCH" or e.rid is None else f"{rtype}/{e.rid}",
        e.params,
        dict(e.headers),
    )
    if e.method == "PATCH":
        req.body = _patch_body(e)
    response = await server.dispatch(req, session)
    if response.status >= 400:
        raise FhirError(response.status, orjson.loads(response.body)["issue"][0]["diagnostics"])
    return _entry_result(response, representation or e.method in ("GET", "HEAD"))


def _stored_result(
    server: FhirServer, stored: Stored, status: int, representation: bool, location: bool = False
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "status": _status(status),
        "etag": stored.etag,
        "lastModified": stored.last_updated_iso,
    }
    if location or status == 201:
        result["location"] = f"{stored.type}/{stored.id}/_history/{stored.version}"
    entry: dict[str, Any] = {"response": result}
    if representation and stored.body is not None:
        entry["resource"] = loads_exact(stored.body)
    return entry
