"""The FHIR R4 REST API (http.html) as an ASGI application over a `FhirStore`.

Routing is a match on path segments (no framework on the hot path); every handler works on a
`Session` so that the same handlers serve plain requests and the entries of a transaction Bundle.
Errors are `FhirError`s rendered once, in `Response.error`, as OperationOutcomes.

The server does no authorization: it listens on loopback by default and the gateway in front of it
decides who gets in (issue 4 §5).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import orjson

from fhirgate import clock
from fhirgate.fhirserver import capability
from fhirgate.fhirserver.definitions import definitions
from fhirgate.fhirserver.errors import FhirError, bad_request, conflict, gone, not_found, outcome
from fhirgate.fhirserver.http import (
    FHIR_JSON,
    Request,
    Response,
    dumps_exact,
    loads_exact,
    negotiate,
    parse_etag,
    parse_json,
    prefer,
    require_json_body,
)
from fhirgate.fhirserver.search import parse_search
from fhirgate.fhirserver.storage.store import FhirStore, SearchPage, Session, Stored, iso_instant
from fhirgate.fhirserver.validation import validate_resource
from fhirgate.fhirserver.values import DateFormatError, date_range

log = logging.getLogger("fhirgate.fhirserver")

_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
Handler = Callable[..., Awaitable[Response]]
#: how a handler gets its session: a read snapshot, a write transaction, or on its own
READ, WRITE, OWN = "read", "write", "own"


class FhirServer:
    """The FHIR server. `base_url` is the absolute URL clients use (for fullUrl, Location and
    paging links); behind the gateway that is the gateway's `/fhir` URL."""

    def __init__(
        self,
        store: FhirStore | None = None,
        *,
        database_url: str | None = None,
        base_url: str = "http://127.0.0.1:8080",
        default_count: int = 20,
        max_count: int = 1000,
        max_body: int = 64 * 1024 * 1024,
        auth_issuer: str | None = None,
    ) -> None:
        self.store = store
        self.auth_issuer = auth_issuer
        self.database_url = database_url
        self.base = base_url.rstrip("/")
        self.default_count = default_count
        self.max_count = max_count
        self.max_body = max_body
        self.defs = definitions()
        self._capability: bytes | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    async def startup(self) -> None:
        if self.store is None:
            if self.database_url is None:
                raise RuntimeError("FhirServer needs a store or a database_url")
            self.store = await FhirStore.open(self.database_url, base_url=self.base)

    async def shutdown(self) -> None:
        if self.store is not None:
            await self.store.close()

    @property
    def indexer(self) -> Any:
        assert self.store is not None
        return self.store.indexer

    # ---- ASGI --------------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                await self._send(
                    send,
                    Response.error(
                        FhirError(413, f"Request body larger than {self.max_body} bytes", "too-costly")
                    ),
                )
                return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        params = parse_qsl(scope.get("query_string", b"").decode("utf-8", "replace"), keep_blank_values=True)
        request = Request(scope["method"], path.strip("/"), params, headers, body)
        await self._send(send, await self.handle(request))

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    @staticmethod
    async def _send(send: Any, response: Response) -> None:
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})

    # ---- dispatch ----------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        """Answer one request (any error becomes an OperationOutcome)."""
        try:
            negotiate(request)
            handler, mode, args = self._route(request)
            assert self.store is not None
            if mode == OWN:
                response = await handler(request, None, *args)
            elif mode == WRITE:
                async with self.store.write() as session:
                    response = await handler(request, session, *args)
            else:
                async with self.store.read() as session:
                    response = await handler(request, session, *args)
        except FhirError as err:
            response = Response.error(err)
        except Exception:
            log.exception("unexpected error in %s /%s", request.method, request.path)
            response = Response.error(
                FhirError(500, "Internal server error; the server log has the details", "exception")
            )
        if request.param("_pretty") == "true" and response.body:
            response.body = dumps_exact(loads_exact(response.body), option=orjson.OPT_INDENT_2)
        return response

    async def dispatch(self, request: Request, session: Session) -> Response:
        """Answer a request inside an existing session (a transaction Bundle's entries)."""
        handler, _mode, args = self._route(request)
        return await handler(request, session, *args)

    def _route(self, request: Request) -> tuple[Handler, str, tuple[str, ...]]:
        """The handler of a request, whether it runs in a read or a write session (or opens its
        own: a Bundle), and its path arguments."""
        segs = [s for s in request.path.split("/") if s]
        method = request.method
        n = len(segs)
        if n == 0:
            if method == "POST":
                return self._bundle, OWN, ()
            if method == "GET":
                return self._search, READ, ()
            raise _method_not_allowed(method, "/", "GET, POST")
        head = segs[0]
        if n == 1 and head == "metadata":
            if method != "GET":
                raise _method_not_allowed(method, "/metadata", "GET")
            return self._metadata, READ, ()
        if n == 1 and head == "_history":
            _only(method, ("GET",), "/_history")
            return self._history, READ, ()
        if n == 1 and head == "_search":
            _only(method, ("POST",), "/_search")
            return self._search, READ, ()
        rtype = self._type(head)
        if n == 1:
            if method == "GET":
                return self._search, READ, (rtype,)
            if method == "POST":
                return self._create, WRITE, (rtype,)
            if method == "PUT":
                return self._conditional_update, WRITE, (rtype,)
            if method == "DELETE":
                return self._conditional_delete, WRITE, (rtype,)
            raise _method_not_allowed(method, f"/{rtype}", "GET, POST, PUT, DELETE")
        second = segs[1]
        if n == 2 and second == "_search":
            _only(method, ("GET", "POST"), f"/{rtype}/_search")
            return self._search, READ, (rtype,)
        if n == 2 and second == "_history":
            _only(method, ("GET",), f"/{rtype}/_history")
            return self._history, READ, (rtype,)
        rid = _check_id(second)
        if n == 2:
            if method in ("GET", "HEAD"):
                return self._read, READ, (rtype, rid)
            if method == "PUT":
                return self._update, WRITE, (rtype, rid)
            if method == "DELETE":
                return self._delete, WRITE, (rtype, rid)
            if method == "PATCH":
                return self._patch, WRITE, (rtype, rid)
            raise _method_not_allowed(method, f"/{rtype}/{rid}", "GET, PUT, PATCH, DELETE")
        third = segs[2]
        if n == 3 and third == "_history":
            _only(method, ("GET",), f"/{rtype}/{rid}/_history")
            return self._history, READ, (rtype, rid)
        if n == 4 and third == "_history":
            _only(method, ("GET",), f"/{rtype}/{rid}/_history/{segs[3]}")
            return self._vread, READ, (rtype, rid, segs[3])
        if n == 3 and third == "$everything":
            if rtype != "Patient":
                raise FhirError(404, f"$everything is defined on Patient only, not {rtype}", "not-supported")
            _only(method, ("GET", "POST"), f"/Patient/{rid}/$everything")
            return self._everything, READ, (rid,)
        if n == 3 and third.startswith("$"):
            raise FhirError(404, f"Operation {third} is not supported by this server", "not-supported")
        if n == 3 and rtype == "Patient":
            ctype = self._type(third)
            _only(method, ("GET",), f"/Patient/{rid}/{ctype}")
            return self._search, READ, (ctype, rid)
        if n == 3:
            raise FhirError(
                404, f"Compartment searches are supported for Patient only, not {rtype}", "not-supported"
            )
        raise FhirError(404, f"Unknown path /{request.path}", "not-found")

    def _type(self, name: str) -> str:
        if name not in self.defs.resource_types:
            raise FhirError(
                404,
                f"Unknown resource type '{name}': this server supports the FHIR R4 resource types "
                "(see /metadata)",
                "not-supported",
            )
        return name

    # ---- capability --------------------------------------------------------------------------

    async def _metadata(self, request: Request, session: Session) -> Response:
        if self._capability is None:
            self._capability = orjson.dumps(
                capability.build(self.base, self.indexer, self.defs, self.auth_issuer)
            )
        return Response(200, self._capability, {"Content-Type": FHIR_JSON})

    # ---- instance level ----------------------------------------------------------------------

    async def _read(self, request: Request, session: Session, rtype: str, rid: str) -> Response:
        stored = await session.current(rtype, rid)
        if stored is None:
            raise not_found(f"{rtype}/{rid} is not known")
        if stored.deleted:
            raise gone(f"{rtype}/{rid} was deleted (version {stored.version})")
        inm = request.header("if-none-match")
        if inm and parse_etag(inm, "If-None-Match") == stored.version:
            return Response(304, b"", {"ETag": stored.etag})
        return self._resource(request, stored, 200)

    async def _vread(self, request: Request, session: Session, rtype: str, rid: str, vid: str) -> Response:
        if not vid.isdigit():
            raise bad_request(f"Version id '{vid}' is not valid: versions are positive integers")
        stored = await session.version(rtype, rid, int(vid))
        if stored is None:
            if await session.current(rtype, rid) is None:
                raise not_found(f"{rtype}/{rid} is not known")
            raise not_found(f"{rtype}/{rid} has no version {vid}")
        if stored.deleted:
            raise gone(f"Version {vid} of {rtype}/{rid} records its deletion")
        return self._resource(request, stored, 200)

    async def _create(self, request: Request, session: Session, rtype: str) -> Response:
        resource = self._body(request, rtype)
        condition = request.header("if-none-exist")
        if condition:
            matches = await self.conditional(session, rtype, condition, "If-None-Exist")
            if len(matches) == 1:
                return self._resource(request, matches[0], 200)
            if len(matches) > 1:
                raise conflict(
                    412, f"If-None-Exist: {condition} matches more than one {rtype}; make it selective"
                )
        stored = await session.create(resource)
        return self._resource(request, stored, 201, location=True)

    async def _update(self, request: Request, session: Session, rtype: str, rid: str) -> Response:
        resource = self._body(request, rtype)
        body_id = resource.get("id")
        if body_id is None:
            raise bad_request(
                f'The resource has no id: an update of {rtype}/{rid} must carry "id": "{rid}"', f"{rtype}.id"
            )
        if body_id != rid:
            raise bad_request(f"The resource id '{body_id}' does not match the URL id '{rid}'", f"{rtype}.id")
        if_match = self._if_match(request)
        stored, created = await session.update(resource, rid, if_match)
        return self._resource(request, stored, 201 if created else 200, location=created)

    async def _conditional_update(self, request: Request, session: Session, rtype: str) -> Response:
        if not request.params:
            raise _method_not_allowed("PUT", f"/{rtype}", "GET, POST (PUT needs an id or search parameters)")
        resource = self._body(request, rtype)
        condition = urlencode(request.params)
        matches = await self.conditional(session, rtype, condition, "conditional update")
        if len(matches) > 1:
            raise conflict(412, f"Conditional update {rtype}?{condition} matches more than one resource")
        if matches:
            rid = matches[0].id
            if resource.get("id") not in (None, rid):
                raise bad_request(
                    f"The resource id '{resource['id']}' does not match the resource found ({rid})"
                )
        else:
            rid = resource.get("id") or str(uuid.uuid4())
            _check_id(rid)
        stored, created = await session.update(resource, rid, self._if_match(request))
        return self._resource(request, stored, 201 if created else 200, location=created)

    async def _delete(self, request: Request, session: Session, rtype: str, rid: str) -> Response:
        stored = await session.delete(rtype, rid, self._if_match(request))
        headers = {"ETag": stored.etag} if stored else {}
        return Response(204, b"", headers)

    async def _conditional_delete(self, request: Request, session: Session, rtype: str) -> Response:
        if not request.params:
            raise _method_not_allowed(
                "DELETE", f"/{rtype}", "GET, POST (DELETE needs an id or search parameters)"
            )
        condition = urlencode(request.params)
        matches = await self.conditional(session, rtype, condition, "conditional delete")
        if len(matches) > 1:
            raise conflict(412, f"Conditional delete {rtype}?{condition} matches more than one resource")
        if matches:
            await session.delete(rtype, matches[0].id)
        return Response(204)

    async def _patch(self, request: Request, session: Session, rtype: str, rid: str) -> Response:
        import jsonpatch

        ctype = (request.header("content-type") or "").split(";")[0].strip().lower()
        if ctype != "application/json-patch+json":
            raise FhirError(
                415,
                f"PATCH with Content-Type {ctype or '(none)'} is not supported: send a JSON Patch "
                "(RFC 6902) as application/json-patch+json (FHIRPath Patch is not supported)",
                "not-supported",
            )
        ops = parse_json(request.body)
        if not isinstance(ops, list):
            raise bad_request("A JSON Patch body is an array of operations (RFC 6902 §3)")
        current = await session.current(rtype, rid)
        if current is None:
            raise not_found(f"{rtype}/{rid} is not known")
        if current.deleted:
            raise gone(f"{rtype}/{rid} was deleted")
        if_match = self._if_match(request)
        if if_match is not None and if_match != current.version:
            raise conflict(
                412,
                f'Version conflict: If-Match W/"{if_match}" but {rtype}/{rid} is at W/"{current.version}"',
            )
        assert current.body is not None
        try:
            patched = jsonpatch.JsonPatch(ops).apply(loads_exact(current.body))
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            raise FhirError(422, f"The JSON Patch cannot be applied: {exc}", "processing") from None
        except (TypeError, KeyError, AttributeError) as exc:
            raise bad_request(f"The JSON Patch is malformed: {exc}") from None
        if not isinstance(patched, dict) or patched.get("resourceType") != rtype or patched.get("id") != rid:
            raise FhirError(422, "A patch must not change resourceType or id", "processing")
        validate_resource(patched, rtype)
        stored, _ = await session.update(patched, rid, current.version, method="PATCH")
        return self._resource(request, stored, 200)

    # ---- history -----------------------------------------------------------------------------

    async def _history(
        self, request: Request, session: Session, rtype: str | None = None, rid: str | None = None
    ) -> Response:
        count, offset = self._paging(request)
        since = self._instant_param(request, "_since")
        at = self._instant_param(request, "_at")
        if rid is not None and rtype is not None and await session.current(rtype, rid) is None:
            raise not_found(f"{rtype}/{rid} is not known")
        items, total = await session.history(rtype, rid, since, at, count, offset)
        path = "/".join(p for p in (rtype, rid, "_history") if p)
        entries: list[bytes] = []
        for s in items:
            request_part = {"method": s.method, "url": f"{s.type}/{s.id}" if s.method != "POST" else s.type}
            response_part = {
                "status": "201 Created" if s.version == 1 else ("200 OK" if s.body else "204 No Content"),
                "etag": s.etag,
                "lastModified": s.last_updated_iso,
            }
            parts = [b'{"fullUrl":', orjson.dumps(f"{self.base}/{s.type}/{s.id}")]
            if s.body is not None:
                parts += [b',"resource":', s.body]
            parts += [
                b',"request":',
                orjson.dumps(request_part),
                b',"response":',
                orjson.dumps(response_part),
                b"}",
            ]
            entries.append(b"".join(parts))
        links = self._links(
            path,
            [(k, v) for k, v in request.params if k in ("_since", "_at")],
            count,
            offset,
            offset + len(items) < total,
        )
        return self._bundle_response("history", total, links, entries)

    # ---- search ------------------------------------------------------------------------------

    async def _search(
        self, request: Request, session: Session, rtype: str | None = None, compartment: str | None = None
    ) -> Response:
        """Type (`rtype`), compartment (`Patient/[id]/[rtype]`) or system (no type) search."""
        query = parse_search(
            rtype,
            self._search_params(request),
            supported=self.indexer.is_indexed,
            base_url=self.base,
            strict=prefer(request, "handling") == "strict",
            default_count=self.default_count,
            max_count=self.max_count,
            compartment=compartment,
        )
        page = await session.search(query, self.max_count)
        path = f"Patient/{compartment}/{rtype}" if compartment else (rtype or "")
        return self._searchset(request, path, query, page)

    def _search_params(self, request: Request) -> list[tuple[str, str]]:
        params = list(request.params)
        if request.method == "POST":
            ctype = (request.header("content-type") or "").split(";")[0].strip().lower()
            if request.body and ctype != "application/x-www-form-urlencoded":
                raise FhirError(
                    415, "POST _search takes application/x-www-form-urlencoded parameters", "not-supported"
                )
            params += parse_qsl(request.body.decode("utf-8", "replace"), keep_blank_values=True)
        return params

    def _searchset(self, request: Request, path: str, query: Any, page: SearchPage) -> Response:
        shape = self._shaper(query.summary, query.elements)
        entries = [self._entry(s, b"match", shape) for s in page.matches]
        entries += [self._entry(s, b"include", shape) for s in page.included]
        notes = [f"Parameter {name} was ignored: {why}" for name, why in query.ignored] + page.warnings
        if notes:
            oo = {
                "resourceType": "OperationOutcome",
                "issue": [
                    {
                        "severity": "warning",
                        "code": "not-supported" if n.startswith("Parameter") else "too-costly",
                        "diagnostics": n,
                    }
                    for n in notes
                ],
            }
            entries.append(b'{"resource":' + orjson.dumps(oo) + b',"search":{"mode":"outcome"}}')
        links = self._links(path, list(query.applied), query.count, query.offset, page.has_next)
        return self._bundle_response("searchset", page.total, links, entries)

    def _entry(self, s: Stored, mode: bytes, shape: Callable[[Stored], bytes] | None) -> bytes:
        body = shape(s) if shape else s.body
        assert body is not None
        return b"".join(
            (
                b'{"fullUrl":',
                orjson.dumps(f"{self.base}/{s.type}/{s.id}"),
                b',"resource":',
                body,
                b',"search":{"mode":"',
                mode,
                b'"}}',
            )
        )

    def _shaper(
        self, summary: str | None, elements: tuple[str, ...] | None
    ) -> Callable[[Stored], bytes] | None:
        """`_summary` / `_elements` (search.html §3.1.1.5.8-9): parse only when asked."""
        if summary in (None, "false", "count") and elements is None:
            return None
        defs = self.defs

        def shape(s: Stored) -> bytes:
            assert s.body is not None
            resource = loads_exact(s.body)
            if elements is not None:
                keep = set(elements) | {"resourceType", "id", "meta"}
                kept = {k: v for k, v in resource.items() if _listed(k, keep)}
                _mark_subsetted(kept)
                return dumps_exact(kept)
            if summary == "text":
                kept = {k: v for k, v in resource.items() if k in ("resourceType", "id", "meta", "text")}
            elif summary == "data":
                kept = {k: v for k, v in resource.items() if k != "text"}
            else:  # true
                allowed = defs.summary_elements(s.type)
                kept = {k: v for k, v in resource.items() if k == "resourceType" or _listed(k, allowed)}
            _mark_subsetted(kept)
            return dumps_exact(kept)

        return shape

    def _links(
        self, path: str, applied: list[tuple[str, str]], count: int, offset: int, has_next: bool
    ) -> list[tuple[str, str]]:
        def url(off: int) -> str:
            pairs = [(k, v) for k, v in applied if k not in ("_count", "_offset")]
            pairs.append(("_count", str(count)))
            if off:
                pairs.append(("_offset", str(off)))
            where = f"{self.base}/{path}" if path else self.base
            return f"{where}?{urlencode(pairs, quote_via=quote, safe='/:|,$')}"

        links = [("self", url(offset))]
        if offset > 0:
            links.append(("first", url(0)))
            links.append(("previous", url(max(0, offset - count))))
        if has_next:
            links.append(("next", url(offset + count)))
        return links

    def _bundle_response(
        self, btype: str, total: int | None, links: list[tuple[str, str]], entries: list[bytes]
    ) -> Response:
        head: dict[str, Any] = {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "meta": {"lastUpdated": iso_instant(int(clock.now() * 1000))},
            "type": btype,
        }
        if total is not None:
            head["total"] = total
        head["link"] = [{"relation": r, "url": u} for r, u in links]
        body = orjson.dumps(head)[:-1] + b',"entry":[' + b",".join(entries) + b"]}"
        return Response(200, body, {"Content-Type": FHIR_JSON})

    # ---- $everything -------------------------------------------------------------------------

    async def _everything(self, request: Request, session: Session, rid: str) -> Response:
        patient = await session.current("Patient", rid)
        if patient is None:
            raise not_found(f"Patient/{rid} is not known")
        if patient.deleted:
            raise gone(f"Patient/{rid} was deleted")
        params = self._search_params(request) if request.method == "POST" else request.params
        known = {"_since", "_type", "_count", "_offset", "_format", "_pretty"}
        for name, _ in params:
            if name not in known and prefer(request, "handling") == "strict":
                raise bad_request(
                    f"Parameter {name} is not supported by $everything (use _since, _type, _count)"
                )
        types: list[str] = []
        for name, value in params:
            if name == "_type":
                types += [self._type(t.strip()) for t in value.split(",") if t.strip()]
        count, offset = self._paging(request)
        since = self._instant_param(request, "_since")
        items, total = await session.everything(rid, types, since, count, offset)
        entries = [self._entry(s, b"match", None) for s in items]
        applied = [(k, v) for k, v in params if k in ("_since", "_type")]
        links = self._links(f"Patient/{rid}/$everything", applied, count, offset, offset + len(items) < total)
        return self._bundle_response("searchset", total, links, entries)

    # ---- batch / transaction -----------------------------------------------------------------

    async def _bundle(self, request: Request, session: Session | None = None) -> Response:
        from fhirgate.fhirserver import bundles

        require_json_body(request)
        bundle = parse_json(request.body)
        assert self.store is not None
        return await bundles.process(self, self.store, request, bundle)

    # ---- helpers -----------------------------------------------------------------------------

    def _body(self, request: Request, rtype: str) -> dict[str, Any]:
        if request.resource is not None:
            resource = request.resource  # a Bundle entry, validated when the Bundle was read
        else:
            require_json_body(request)
            resource = parse_json(request.body)
            validate_resource(resource, rtype)
        assert isinstance(resource, dict)
        return resource

    def _if_match(self, request: Request) -> int | None:
        value = request.header("if-match")
        return None if value is None else parse_etag(value, "If-Match")

    async def conditional(
        self,
        session: Session,
        rtype: str,
        condition: str,
        what: str,
        pairs: list[tuple[str, str]] | None = None,
    ) -> list[Stored]:
        """At most two matches of a conditional URL (If-None-Exist, conditional update/delete,
        conditional references): enough to tell none, one and several apart."""
        params = (
            pairs if pairs is not None else parse_qsl(condition.split("?", 1)[-1], keep_blank_values=True)
        )
        if not params:
            raise bad_request(f"{what}: '{condition}' has no search parameters")
        query = parse_search(
            rtype,
            params,
            supported=self.indexer.is_indexed,
            base_url=self.base,
            strict=True,
            default_count=2,
            max_count=2,
        )
        return await session.find_ids(query, limit=2)

    def _paging(self, request: Request) -> tuple[int, int]:
        count = self.default_count
        offset = 0
        raw = request.param("_count")
        if raw is not None:
            if not raw.isdigit():
                raise bad_request(f"_count={raw} is not a non-negative integer")
            count = min(int(raw), self.max_count)
        raw = request.param("_offset")
        if raw is not None:
            if not raw.isdigit():
                raise bad_request(f"_offset={raw} is not a non-negative integer")
            offset = int(raw)
        return count, offset

    def _instant_param(self, request: Request, name: str) -> int | None:
        raw = request.param(name)
        if raw is None:
            return None
        try:
            low, _high = date_range(raw)
        except DateFormatError as exc:
            raise bad_request(f"{name}: {exc}") from None
        return low

    def _resource(self, request: Request, stored: Stored, status: int, location: bool = False) -> Response:
        headers = {"ETag": stored.etag, "Last-Modified": stored.last_modified}
        if location:
            headers["Location"] = f"{self.base}/{stored.type}/{stored.id}/_history/{stored.version}"
        ret = prefer(request, "return")
        if ret == "minimal":
            return Response(status, b"", headers)
        if ret == "operationoutcome":
            verb = {201: "Created", 200: "Stored"}.get(status, "Stored")
            oo = outcome(
                "information", "informational", f"{verb} {stored.type}/{stored.id} version {stored.version}"
            )
            return Response.json(status, oo, headers)
        assert stored.body is not None
        summary = request.param("_summary")
        elements = request.param("_elements")
        shape = self._shaper(summary, tuple(e.strip() for e in elements.split(",")) if elements else None)
        body = shape(stored) if shape and request.method == "GET" else stored.body
        return Response(status, body, {"Content-Type": FHIR_JSON, **headers})


def _listed(key: str, names: set[str] | frozenset[str]) -> bool:
    """`key` is one of `names`, or a choice form of one (`valueQuantity` for `value`)."""
    if key in names:
        return True
    for i, ch in enumerate(key):
        if ch.isupper() and i > 0:
            return key[:i] in names
    return False


def _mark_subsetted(resource: dict[str, Any]) -> None:
    meta = dict(resource.get("meta") or {})
    tags = list(meta.get("tag") or [])
    tags.append({"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"})
    meta["tag"] = tags
    resource["meta"] = meta


def _check_id(rid: str) -> str:
    if not _ID_RE.match(rid):
        raise bad_request(f"'{rid}' is not a valid resource id (1-64 characters from A-Z a-z 0-9 - .)")
    return rid


def _only(method: str, allowed: tuple[str, ...], path: str) -> None:
    if method not in allowed:
        raise _method_not_allowed(method, path, ", ".join(allowed))


def _method_not_allowed(method: str, path: str, allowed: str) -> FhirError:
    return FhirError(
        405,
        f"{method} is not allowed on {path} (allowed: {allowed})",
        "not-supported",
        headers={"Allow": allowed},
    )
