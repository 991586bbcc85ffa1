"""Request and response values of the FHIR API, and content negotiation (R4 http.html §3.1.0.1).

JSON only: `application/fhir+json` (and `application/json`, `json` as `_format`). XML is refused
with 406 (Accept / `_format`) or 415 (Content-Type) rather than answered in the wrong format.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson

from fhirgate.fhirserver.errors import FhirError

FHIR_JSON = "application/fhir+json; charset=utf-8"
_JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
_FORMAT_OK = frozenset({"json", "application/json", "application/fhir+json", "application/json+fhir"})


@dataclass(slots=True)
class Request:
    method: str
    path: str  # below the FHIR base, without a leading slash
    params: list[tuple[str, str]]  # query (and form, for POST _search) pairs in order
    headers: dict[str, str]  # lower-case names
    body: bytes = b""
    #: an already-parsed body (entries of a Bundle), used instead of `body`
    resource: Any = None

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def param(self, name: str) -> str | None:
        for key, value in self.params:
            if key == name:
                return value
        return None


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, value: Any, headers: dict[str, str] | None = None) -> Response:
        return cls(status, dumps_exact(value), {"Content-Type": FHIR_JSON, **(headers or {})})

    @classmethod
    def error(cls, err: FhirError) -> Response:
        return cls.json(err.status, err.outcome(), err.headers)


def negotiate(request: Request) -> None:
    """Refuse a representation we cannot produce: `_format` overrides Accept (§3.1.0.1.8)."""
    fmt = request.param("_format")
    if fmt is not None:
        if fmt.split(";")[0].strip().lower() not in _FORMAT_OK:
            raise FhirError(
                406,
                f"_format={fmt} is not supported: this server speaks JSON only "
                "(use _format=json or application/fhir+json)",
                "not-supported",
            )
        return
    accept = request.header("accept")
    if not accept:
        return
    for part in accept.split(","):
        media, _, params = part.strip().partition(";")
        media = media.strip().lower()
        if "q=0" in params.replace(" ", "") and "q=0." not in params.replace(" ", ""):
            continue
        if media in _JSON_TYPES or media in ("*/*", "application/*", ""):
            return
    raise FhirError(
        406,
        f"Accept: {accept} cannot be satisfied: this server returns application/fhir+json only",
        "not-supported",
    )


def require_json_body(request: Request, allow_patch: bool = False) -> None:
    """415 unless the request body is FHIR JSON (or JSON Patch where `allow_patch`)."""
    ctype = (request.header("content-type") or "").split(";")[0].strip().lower()
    if ctype in _JSON_TYPES:
        return
    if allow_patch and ctype == "application/json-patch+json":
        return
    expected = "application/json-patch+json" if allow_patch else "application/fhir+json"
    raise FhirError(
        415,
        f"Content-Type {ctype or '(none)'} is not supported: send {expected}",
        "not-supported",
    )


# A JSON number whose text a binary float would not give back: a fraction ending in 0 (`1.50`),
# an exponent (`2.0e1`) or more digits than a double holds. Only then is the slow, exact parse used.
_INEXACT_NUMBER = re.compile(rb"[:\[,]\s*-?(?:\d+\.\d*0|\d+(?:\.\d+)?[eE][+-]?\d+|[\d.]{17,})\s*[,\]}]")


def loads_exact(data: bytes) -> Any:
    """Parse JSON keeping every decimal's precision (R4 json.html: the number of decimal places
    is significant, `1.50` is not `1.5`): such numbers become `Decimal`s, which `dumps_exact`
    writes back as they came. JSON without them (most of it) takes orjson's fast path."""
    if _INEXACT_NUMBER.search(data) is None:
        return orjson.loads(data)
    return json.loads(data, parse_float=Decimal)


def _exact_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return orjson.Fragment(str(value).encode())
    raise TypeError(f"cannot serialise {type(value).__name__}")


def dumps_exact(value: Any, option: int = 0) -> bytes:
    """orjson.dumps that writes `Decimal`s from `loads_exact` with their own digits."""
    return orjson.dumps(value, default=_exact_default, option=option)


def parse_json(body: bytes) -> Any:
    if not body:
        raise FhirError(400, "The request body is empty: send a FHIR resource as JSON", "invalid")
    try:
        return loads_exact(body)
    except ValueError as exc:  # orjson.JSONDecodeError and json.JSONDecodeError both are
        raise FhirError(400, f"The request body is not valid JSON: {exc}", "structure") from None


def prefer(request: Request, key: str) -> str | None:
    """The value of one Prefer token (RFC 7240): `return`, `handling`."""
    raw = request.header("prefer")
    if not raw:
        return None
    for part in raw.split(","):
        for token in part.split(";"):
            name, _, value = token.strip().partition("=")
            if name.strip().lower() == key:
                return value.strip().strip('"').lower()
    return None


def parse_etag(value: str, header: str) -> int:
    """`W/"3"` or `"3"` -> 3."""
    text = value.strip()
    if text.startswith("W/"):
        text = text[2:]
    text = text.strip('"')
    if not text.isdigit():
        raise FhirError(400, f'{header}: {value} is not a version ETag (expected W/"<versionId>")', "invalid")
    return int(text)
