"""Kong's `key-auth` plugin (`kong/plugins/key-auth/handler.lua`, Kong 3.10).

For each name in `key_names`, in order, the key is looked for in a request header (case-insensitive;
as OpenResty's header table does, `api_key` also finds `api-key`), then the query string, then (with
`key_in_body`) the body: `application/x-www-form-urlencoded`, `application/json` (an object) or
`multipart/form-data`. The first name present decides: a single string is the key; the same name
twice (two headers, two query arguments, a JSON array or object) is refused. A body that is absent,
of another type, malformed or larger than `BODY_LIMIT` counts as empty, as Kong's `get_body` error
does. With `hide_credentials`, that name is removed from the headers, the query string and (with
`key_in_body`) the body sent upstream, before the key is checked, as Kong does.

Refusals are Kong 3.7+'s: 401 with `WWW-Authenticate: Key` (`Key realm="..."` when `realm` is set)
and `No API key found in request`, `Duplicate API key found` or, for a key nobody holds,
`Unauthorized`. On success the consumer headers are set (`X-Credential-Identifier` is the
credential's `id`, as in Kong 3.x). `anonymous` makes the plugin one branch of a logical OR with the
other auth plugins (`fhirgate.gateway.plugins._auth.authenticate_or_anonymous`).

Credentials are the consumers' `keyauth_credentials` (nested, or at the top level with
`consumer: <id or username>`), indexed by key once per configuration in `bind_config`; a key held
twice is a configuration error naming both places. The lookup is a dict lookup on the key: the only
string comparison happens between the presented key and a stored key with the same (SipHash,
per-process randomized) hash, so response time does not reveal how much of a key matched.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final
from urllib.parse import unquote_plus

from fhirgate import clock
from fhirgate.errors import ConfigError, ConfigIssue
from fhirgate.gateway.context import BodyTooLarge
from fhirgate.gateway.plugins._auth import authenticate_or_anonymous, set_consumer
from fhirgate.gateway.plugins.base import Plugin, PluginConfig
from fhirgate.gateway.plugins.key_auth.schema import KeyAuthConfig

if TYPE_CHECKING:
    from fhirgate.config import GatewayConfig
    from fhirgate.config.model import Consumer
    from fhirgate.gateway.pdk import PDK

# Kong's texts (kong/plugins/key-auth/handler.lua, 3.7+).
MSG_NO_API_KEY: Final = "No API key found in request"
MSG_DUPLICATE_API_KEY: Final = "Duplicate API key found"
MSG_INVALID_CREDENTIALS: Final = "Unauthorized"
WWW_AUTHENTICATE: Final = "WWW-Authenticate"

#: The consumers' credential collection this plugin owns (Kong's `daos.lua`).
CREDENTIALS: Final = "keyauth_credentials"
#: The most body bytes read to find a key; a larger body counts as having none.
BODY_LIMIT: Final = 1024 * 1024

_ID_NAMESPACE = uuid.UUID("4d1f0a52-2b8e-5c1e-9f3b-6b6579617574")
_FORM = "application/x-www-form-urlencoded"
_JSON = "application/json"
_MULTIPART = "multipart/form-data"
_DISPOSITION_NAME = re.compile(rb';\s*name\s*=\s*(?:"([^"]*)"|([^;\s]+))', re.IGNORECASE)

# What the search for a key found.
_MISSING, _FOUND, _DUPLICATE, _NEED_BODY = range(4)


@dataclass(frozen=True, slots=True, eq=False)
class KeyAuthCredential:
    """One `keyauth_credentials` entry, validated (what `kong.client.get_credential()` returns)."""

    id: str
    consumer_id: str
    key: str = field(repr=False)
    tags: tuple[str, ...] = ()
    #: Epoch seconds after which the key no longer works (from `ttl`), or None.
    expires_at: float | None = None


Index = dict[str, tuple["Consumer", KeyAuthCredential]]


def build_index(config: GatewayConfig, now: float) -> Index:
    """Every key-auth credential of `config` by key. Raises `ConfigError` naming each bad or duplicate
    credential (never echoing a key)."""
    index: Index = {}
    key_at: dict[str, str] = {}
    id_at: dict[str, str] = {}
    issues: list[ConfigIssue] = []

    def add(consumer: Consumer, raw: Mapping[str, Any], loc: str, stable: str) -> None:
        key = raw.get("key")
        if key is None:
            issues.append(
                ConfigIssue(f"{loc}.key", "required field missing (fhirgate does not generate keys)")
            )
            return
        if not isinstance(key, str) or not key:
            issues.append(ConfigIssue(f"{loc}.key", "expected a non-empty string"))
            return
        cred_id = raw.get("id")
        if cred_id is None:
            # Stable across reloads, and not derived from the key (it travels upstream).
            cred_id = str(uuid.uuid5(_ID_NAMESPACE, f"{CREDENTIALS}:{stable}"))
        elif not isinstance(cred_id, str) or not cred_id:
            issues.append(ConfigIssue(f"{loc}.id", "expected a non-empty string"))
            return
        ttl = raw.get("ttl")
        if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0):
            issues.append(ConfigIssue(f"{loc}.ttl", "expected a non-negative integer (seconds)"))
            return
        tags = raw.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            issues.append(ConfigIssue(f"{loc}.tags", "expected a list of strings"))
            return
        if key in key_at:
            issues.append(ConfigIssue(f"{loc}.key", f"duplicate key-auth key (first at {key_at[key]}.key)"))
            return
        if cred_id in id_at:
            issues.append(
                ConfigIssue(f"{loc}.id", f"duplicate credential id '{cred_id}' (first at {id_at[cred_id]})")
            )
            return
        key_at[key] = loc
        id_at[cred_id] = loc
        expires_at = now + ttl if ttl else None
        index[key] = (consumer, KeyAuthCredential(cred_id, consumer.id, key, tuple(tags), expires_at))

    for i, consumer in enumerate(config.consumers):
        for j, raw in enumerate(consumer.credentials.get(CREDENTIALS, ())):
            add(consumer, raw, f"consumers[{i}].{CREDENTIALS}[{j}]", f"{consumer.id}:{j}")

    top = config.extra.get(CREDENTIALS)
    if isinstance(top, list):
        consumers: dict[str, Consumer] = {}
        for c in config.consumers:
            consumers.setdefault(c.id, c)
            if c.username:
                consumers.setdefault(c.username, c)
        for j, item in enumerate(top):
            loc = f"{CREDENTIALS}[{j}]"
            if not isinstance(item, Mapping):
                issues.append(ConfigIssue(loc, "expected an object"))
                continue
            ref: Any = item.get("consumer")
            if isinstance(ref, Mapping):
                ref = ref.get("id") or ref.get("username")
            owner = consumers.get(ref) if isinstance(ref, str) else None
            if owner is None:
                msg = "required field missing" if ref is None else f"unknown consumer '{ref}'"
                issues.append(ConfigIssue(f"{loc}.consumer", msg))
                continue
            add(owner, item, loc, f"{owner.id}:top:{j}")

    if issues:
        raise ConfigError(issues)
    return index


# --- request parsing ------------------------------------------------------------------------


def query_args(raw: str) -> dict[str, str | list[str] | bool]:
    """The query string as OpenResty's `get_uri_args` gives it: a bare `name` is True, a repeated
    name a list."""
    args: dict[str, str | list[str] | bool] = {}
    for part in raw.split("&"):
        if not part:
            continue
        name, sep, value = part.partition("=")
        _merge(args, unquote_plus(name), unquote_plus(value) if sep else True)
    return args


def _merge(args: dict[str, Any], name: str, value: Any) -> None:
    prev = args.get(name)
    if prev is None:
        args[name] = value
    elif isinstance(prev, list):
        prev.append(value)
    else:
        args[name] = [prev, value]


def _without_query_arg(raw: str, name: str) -> str | None:
    """`raw` without the arguments called `name`, the others in order; None if there were none."""
    parts = raw.split("&")
    kept = [p for p in parts if p and unquote_plus(p.partition("=")[0]) != name]
    return "&".join(kept) if len(kept) != len([p for p in parts if p]) else None


@dataclass(frozen=True, slots=True)
class Body:
    """A request body parsed as Kong's `kong.request.get_body` does (`kind` "" when unusable)."""

    kind: str
    raw: bytes = b""
    values: Mapping[str, Any] = field(default_factory=dict)
    boundary: bytes = b""

    def without(self, name: str) -> bytes | None:
        """The raw body with `name` removed, or None when it holds no `name`."""
        if name not in self.values:
            return None
        if self.kind == "form":
            segments = self.raw.split(b"&")
            kept = [s for s in segments if not s or _form_name(s) != name]
            return b"&".join(kept)
        if self.kind == "json":
            rest = {k: v for k, v in self.values.items() if k != name}
            return json.dumps(rest, separators=(",", ":"), ensure_ascii=False).encode()
        if self.kind == "multipart":
            delim = b"--" + self.boundary
            segments = self.raw.split(delim)
            out = [segments[0]]
            for seg in segments[1:]:
                if seg.startswith(b"--") or _part_name(seg) != name:
                    out.append(seg)
            return delim.join(out)
        return None


_UNUSABLE = Body("")


def _form_name(segment: bytes) -> str:
    return unquote_plus(segment.partition(b"=")[0].decode("latin-1"))


def _part_name(segment: bytes) -> str | None:
    head = segment.partition(b"\r\n\r\n")[0]
    for line in head.split(b"\r\n"):
        if line[:20].lower() == b"content-disposition:":
            m = _DISPOSITION_NAME.search(line)
            if m:
                return (m.group(1) if m.group(1) is not None else m.group(2)).decode("utf-8", "replace")
    return None


def _media_type(content_type: str) -> tuple[str, dict[str, str]]:
    media, *params = content_type.split(";")
    out: dict[str, str] = {}
    for p in params:
        k, _, v = p.strip().partition("=")
        out[k.strip().lower()] = v.strip().strip('"')
    return media.strip().lower(), out


def parse_body(content_type: str | None, raw: bytes) -> Body:
    """Parse `raw` by its media type; `_UNUSABLE` when Kong's `get_body` would fail."""
    if content_type is None:
        return _UNUSABLE
    media, params = _media_type(content_type)
    if media == _FORM:
        form: dict[str, Any] = {}
        for seg in raw.split(b"&"):
            if seg:
                name, sep, value = seg.partition(b"=")
                text = unquote_plus(value.decode("latin-1"), encoding="utf-8") if sep else True
                _merge(form, _form_name(name), text)
        return Body("form", raw, form)
    if media == _JSON:
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return _UNUSABLE
        if isinstance(doc, dict):
            return Body("json", raw, doc)
        return Body("json", raw, {}) if isinstance(doc, list) else _UNUSABLE
    if media == _MULTIPART:
        boundary = params.get("boundary", "").encode("latin-1")
        if not boundary:
            return _UNUSABLE
        segments = raw.split(b"--" + boundary)
        parts: dict[str, Any] = {}
        for seg in segments[1:]:
            if seg.startswith(b"--"):
                break
            _, sep, content = seg.partition(b"\r\n\r\n")
            part_name = _part_name(seg)
            if not sep or part_name is None:
                return _UNUSABLE
            _merge(parts, part_name, content.removesuffix(b"\r\n").decode("utf-8", "replace"))
        return Body("multipart", raw, parts, boundary)
    return _UNUSABLE


def _set_upstream_body(kong: PDK, body: bytes) -> None:
    kong.service.request.set_raw_body(body)


# --- the plugin -----------------------------------------------------------------------------


class Handler(Plugin):
    name: ClassVar[str] = "key-auth"
    priority: ClassVar[int] = 1250
    Config: ClassVar[type[PluginConfig]] = KeyAuthConfig
    no_consumer: ClassVar[bool] = True
    description: ClassVar[str] = "Authenticate consumers by an API key (header, query string or body)."

    config: KeyAuthConfig

    def __init__(self, config: PluginConfig, instance_id: str = "") -> None:
        if not isinstance(config, KeyAuthConfig):
            raise TypeError(f"key-auth: expected KeyAuthConfig, got {type(config).__name__}")
        super().__init__(config, instance_id)
        self.config = config
        self._challenge = {WWW_AUTHENTICATE: f'Key realm="{config.realm}"' if config.realm else "Key"}
        self._index: Index = {}
        if config.key_in_body:
            # Only then may the hook need to await the body; otherwise it stays synchronous.
            self.access = self._access_with_body  # type: ignore[method-assign,assignment]

    def bind_config(self, config: GatewayConfig) -> None:
        self._index = build_index(config, clock.now())

    # -- access ----------------------------------------------------------------------------------

    def access(self, kong: PDK) -> None:
        conf = self.config
        if not conf.run_on_preflight and kong.request.get_method() == "OPTIONS":
            return
        authenticate_or_anonymous(kong, conf.anonymous, lambda: self._authenticate(kong, _UNUSABLE))

    async def _access_with_body(self, kong: PDK) -> None:
        conf = self.config
        if not conf.run_on_preflight and kong.request.get_method() == "OPTIONS":
            return
        if conf.anonymous and kong.client.get_credential() is not None:
            return  # logical OR, already authenticated: do not read the body for nothing
        body = _UNUSABLE
        if self._search(kong, None)[0] == _NEED_BODY:
            body = await self._read_body(kong)
        authenticate_or_anonymous(kong, conf.anonymous, lambda: self._authenticate(kong, body))

    async def _read_body(self, kong: PDK) -> Body:
        content_type = kong.request.get_header("content-type")
        if content_type is None or _media_type(content_type)[0] not in (_FORM, _JSON, _MULTIPART):
            return _UNUSABLE
        try:
            raw = await kong.request.get_raw_body(BODY_LIMIT)
        except BodyTooLarge:
            return _UNUSABLE
        return parse_body(content_type, raw)

    def _search(self, kong: PDK, body: Body | None) -> tuple[int, str, str]:
        """Kong's search loop, without side effects: (outcome, key, name). `body` None means not
        read yet (then `_NEED_BODY` when the loop would look at it)."""
        conf = self.config
        headers = kong.request.get_headers() if conf.key_in_header else None
        query: dict[str, str | list[str] | bool] | None = None  # parsed only when a header lacks the key
        for name in conf.key_names:
            value: Any = None
            if headers is not None:
                values = headers.get(name.lower())
                if values is None and "_" in name:
                    values = headers.get(name.lower().replace("_", "-"))
                if values is not None:
                    value = values[0] if len(values) == 1 else values
            if value is None and conf.key_in_query:
                if query is None:
                    query = query_args(kong.request.get_raw_query())
                value = query.get(name)
            if value is None and conf.key_in_body:
                if body is None:
                    return _NEED_BODY, "", name
                value = body.values.get(name)
            if isinstance(value, str):
                if body is None and conf.hide_credentials and conf.key_in_body:
                    return _NEED_BODY, "", name  # the key is removed from the body too
                return _FOUND, value, name
            if isinstance(value, list | dict):
                return _DUPLICATE, "", name
        return _MISSING, "", ""

    def _authenticate(self, kong: PDK, body: Body) -> None:
        conf = self.config
        outcome, key, name = self._search(kong, body)
        if outcome == _DUPLICATE:
            kong.response.error(401, MSG_DUPLICATE_API_KEY, self._challenge)
        if outcome == _FOUND and conf.hide_credentials:
            self._hide(kong, name, body)
        if not key:
            kong.response.error(401, MSG_NO_API_KEY, self._challenge)
        entry = self._index.get(key)
        if entry is None:
            kong.response.error(401, MSG_INVALID_CREDENTIALS, self._challenge)
        consumer, credential = entry
        if credential.expires_at is not None and clock.now() >= credential.expires_at:
            kong.response.error(401, MSG_INVALID_CREDENTIALS, self._challenge)
        set_consumer(kong, consumer, credential, credential.id)

    def _hide(self, kong: PDK, name: str, body: Body) -> None:
        """Kong's hide_credentials: `name` leaves the query string, the headers and the body."""
        request = kong.service.request
        query = _without_query_arg(kong.request.get_raw_query(), name)
        if query is not None:
            request.set_raw_query(query)
        request.clear_header(name)
        if "_" in name:
            request.clear_header(name.replace("_", "-"))
        if self.config.key_in_body:
            stripped = body.without(name)
            if stripped is not None:
                _set_upstream_body(kong, stripped)


__all__ = [
    "BODY_LIMIT",
    "CREDENTIALS",
    "MSG_DUPLICATE_API_KEY",
    "MSG_INVALID_CREDENTIALS",
    "MSG_NO_API_KEY",
    "Body",
    "Handler",
    "KeyAuthCredential",
    "build_index",
    "parse_body",
    "query_args",
]
