"""Request path normalization, done once per request before routing.

Implements RFC 3986 section 6.2.2 (syntax-based normalization): percent-decoding of unreserved
characters (section 2.3: ``ALPHA / DIGIT / "-" / "." / "_" / "~"``), upper-casing of the remaining
percent-escapes (section 6.2.2.1), removal of dot-segments (section 5.2.4), and merging of
repeated slashes, as Kong 3.x does in ``kong/tools/uri.lua`` ``normalize(uri, merge_slashes=true)``
before its router sees the path.

Where fhirgate deliberately deviates from Kong, and why:

- Kong also decodes "other" characters (neither reserved nor unreserved, e.g. ``%20``, ``%22``,
  non-ASCII bytes). fhirgate decodes unreserved characters only, as RFC 3986 section 6.2.2.2 allows;
  everything else stays encoded so the upstream receives exactly the octets the client meant and
  no two different encodings of a reserved character collapse into one.
- Kong silently clamps a ``..`` that climbs above the root (``/../admin`` becomes ``/admin``).
  fhirgate refuses it: a client that sends it is either broken or probing.
- Kong passes ``%00``, encoded or raw control characters and encoded slashes combined with dot
  segments (``/fhir/..%2Fadmin``) through. fhirgate refuses them: an upstream that decodes ``%2F``
  or ``%5C`` (or treats ``\\`` as a separator, as some Windows and Java servers do) after the
  gateway has routed the request would resolve the dot-segment itself and reach a path the
  gateway never authorized (the classic "path confusion" bypass). A plain ``%2F`` inside a
  segment with no dot-segment around it is kept encoded and allowed (FHIR ids never need it, but
  other APIs do).
"""

from __future__ import annotations

__all__ = ["BadPathError", "normalize_path"]

_HEX = frozenset("0123456789abcdefABCDEF")
# RFC 3986 section 2.3 unreserved characters, decoded when percent-encoded.
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Separators an upstream might honour after decoding (%2F, %5C) or by itself (\).
_HIDDEN_SEPARATORS = ("%2F", "%5C", "\\")


class BadPathError(ValueError):
    """A request path the gateway refuses to route (answered with 400 Bad Request)."""


def _is_control(ch: str) -> bool:
    code = ord(ch)
    return code < 0x20 or code == 0x7F


def normalize_path(raw_path: str) -> str:
    """Return the normalized form of `raw_path` (the path of the request target, without query).

    Raises `BadPathError` for a path that does not start with ``/``, an invalid percent-escape,
    ``%00`` or a control character (raw or encoded), a ``..`` that climbs above the root, or an
    encoded slash/backslash (``%2F``, ``%5C``, ``\\``) next to a dot-segment.
    """
    # Fast path: nothing to decode, no dot-segment, no empty segment, nothing suspicious.
    # `isprintable` is a C loop; it is False for any C0 control character and DEL.
    if (
        raw_path[:1] == "/"
        and "%" not in raw_path
        and "/." not in raw_path
        and "//" not in raw_path
        and "\\" not in raw_path
        and raw_path.isprintable()
    ):
        return raw_path
    return _normalize_slow(raw_path)


def _decode_unreserved(path: str) -> str:
    """RFC 3986 section 6.2.2.1/6.2.2.2: decode unreserved escapes, upper-case the others."""
    parts = path.split("%")
    out = [parts[0]]
    for part in parts[1:]:
        if len(part) < 2 or part[0] not in _HEX or part[1] not in _HEX:
            raise BadPathError(f"invalid percent-encoding in path: '%{part[:2]}'")
        code = int(part[:2], 16)
        if code == 0:
            raise BadPathError("path contains an encoded NUL byte (%00)")
        if code < 0x20 or code == 0x7F:
            raise BadPathError(f"path contains an encoded control character (%{part[:2].upper()})")
        ch = chr(code)
        if ch in _UNRESERVED:
            out.append(ch + part[2:])
        else:
            out.append("%" + part[:2].upper() + part[2:])
    return "".join(out)


def _normalize_slow(raw_path: str) -> str:
    if not raw_path.startswith("/"):
        raise BadPathError("path must start with '/'")
    for ch in raw_path:
        if _is_control(ch):
            if ch == "\x00":
                raise BadPathError("path contains a NUL byte")
            raise BadPathError(f"path contains a control character ({ord(ch):#04x})")
    path = _decode_unreserved(raw_path) if "%" in raw_path else raw_path

    segments = path[1:].split("/")
    last = len(segments) - 1
    out: list[str] = []
    for i, seg in enumerate(segments):
        if seg == ".":
            if i == last:
                out.append("")
            continue
        if seg == "..":
            if not out:
                raise BadPathError("path climbs above the root ('..')")
            out.pop()
            if i == last:
                out.append("")
            continue
        if not seg:
            if i == last:
                out.append("")
            continue  # RFC 3986 keeps empty segments; Kong (and we) merge slashes.
        if _hides_dot_segment(seg):
            raise BadPathError(
                "path combines an encoded slash or backslash with a dot-segment "
                "(an upstream that decodes it could reach another path)"
            )
        out.append(seg)
    return "/" + "/".join(out)


def _hides_dot_segment(segment: str) -> bool:
    """True if `segment`, split at an encoded slash/backslash or a raw backslash, has a dot part."""
    if "." not in segment:
        return False
    upper = segment.upper() if "%" in segment else segment
    if not any(sep in upper for sep in _HIDDEN_SEPARATORS):
        return False
    for sep in _HIDDEN_SEPARATORS[1:]:
        upper = upper.replace(sep, "%2F")
    return any(part in (".", "..") for part in upper.split("%2F"))
