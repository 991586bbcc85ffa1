"""What every endpoint of the authorization server answers with: RFC 6749 §5.2 JSON errors
(`Cache-Control: no-store`, descriptions in the characters the RFC allows) and the form body of a
POST parsed the one strict way (UTF-8, form-encoded only, each parameter once, a size cap)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.requests import Request
from starlette.responses import Response

__all__ = [
    "MAX_FORM_BYTES",
    "NO_STORE",
    "FormError",
    "error_code",
    "form_params",
    "json_response",
    "method_not_allowed",
    "oauth_error",
    "safe_description",
    "single_valued",
]

MAX_FORM_BYTES = 64 * 1024

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def safe_description(text: str) -> str:
    """An RFC 6749 §5.2 `error_description`: printable ASCII without double quote or backslash."""
    text = text.replace("§", "section ")
    return "".join("'" if c == '"' else "?" if c == "\\" or not 0x20 <= ord(c) <= 0x7E else c for c in text)


def method_not_allowed(allow: str, what: str = "this endpoint", why: str = "") -> Response:
    """405 in RFC 6749 JSON with `Allow` (not Starlette's plain text)."""
    return oauth_error(405, "invalid_request", f"{what} takes {allow} only{why}", {"Allow": allow})


def oauth_error(
    status: int, error: str, description: str, headers: Mapping[str, str] | None = None
) -> Response:
    """An RFC 6749 §5.2 error response (`Cache-Control: no-store`)."""
    return json_response(
        status, {"error": error, "error_description": safe_description(description)}, headers
    )


def json_response(
    status: int, body: Any, headers: Mapping[str, str] | None = None, cache: bool = False
) -> Response:
    """JSON; `Cache-Control: no-store` unless `cache` (then `headers` say how)."""
    all_headers = {} if cache else dict(NO_STORE)
    all_headers.update(headers or {})
    return Response(orjson.dumps(body), status, all_headers, media_type="application/json")


def error_code(response: Response) -> str | None:
    """The `error` member of a JSON error response."""
    try:
        body = orjson.loads(bytes(response.body))
    except orjson.JSONDecodeError:
        return None
    return body.get("error") if isinstance(body, dict) else None


class FormError(ValueError):
    pass


async def form_params(request: Request) -> dict[str, str]:
    """The body of a form POST as single-valued parameters (RFC 6749 §3.1, §3.2: parameters sent
    without a value are treated as omitted; none may be repeated)."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";", 1)[0].strip().lower() != "application/x-www-form-urlencoded":
        shown = ctype.split(";", 1)[0].strip() or "none"
        raise FormError(f"the body must be application/x-www-form-urlencoded, not {shown}")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise FormError(f"the body is larger than {MAX_FORM_BYTES} bytes")
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text), errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise FormError("the body is not valid UTF-8 form encoding") from None
    return single_valued(pairs)


def single_valued(pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in params:
            raise FormError(f"parameter {name} is repeated: send each parameter once")
        params[name] = value
    return {k: v for k, v in params.items() if v != ""}
