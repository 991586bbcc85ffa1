"""`key-auth` (Kong's spec/03-plugins/09-key-auth, Kong 3.10): schema, credentials checked when the
configuration is compiled, access through a running gateway (key in header, query string and body;
hide_credentials; preflight; anonymous) and the logical AND / OR with a second auth plugin."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sys
import types
from collections.abc import Iterator
from typing import Any, ClassVar

import httpx
import pytest

from fhirgate import clock
from fhirgate.config import load_config_dict
from fhirgate.errors import ConfigError
from fhirgate.gateway.pdk import PDK
from fhirgate.gateway.plugins import registry
from fhirgate.gateway.plugins._auth import authenticate_or_anonymous, set_consumer
from fhirgate.gateway.plugins.base import Plugin, PluginConfig
from fhirgate.gateway.proxy import GatewayState
from tests.harness import Upstream, running_gateway, service_config

BOB_ID = "8d1c6a33-0f6e-4f3c-9d0e-6a8f3f1f0b01"
BOB_CRED_ID = "2a7d7c53-5a34-4ae4-8b8e-0c3c5b1c9d02"
ANON_ID = "c9a3b0b4-7f1e-4d9f-a7c2-3b5e2d8a1f03"
ALICE_ID = "f0e4c2a1-9b7d-4c3e-8a6f-1d2b3c4d5e04"

NO_KEY = {"message": "No API key found in request"}
INVALID = {"message": "Unauthorized"}
DUPLICATE = {"message": "Duplicate API key found"}

CONSUMER_HEADERS = (
    "x-consumer-id",
    "x-consumer-custom-id",
    "x-consumer-username",
    "x-credential-identifier",
    "x-anonymous-consumer",
)


def consumers() -> list[dict[str, Any]]:
    return [
        {
            "id": BOB_ID,
            "username": "bob",
            "custom_id": "bob-custom",
            "keyauth_credentials": [{"id": BOB_CRED_ID, "key": "kong"}],
        },
        {"id": ANON_ID, "username": "no-body"},
        {"id": ALICE_ID, "username": "alice", "keyauth_credentials": [{"key": "alice-key"}]},
    ]


def with_key_auth(upstream_url: str, **config: Any) -> dict[str, Any]:
    cfg = service_config(upstream_url)
    cfg["consumers"] = consumers()
    cfg["plugins"] = [{"name": "key-auth", "config": config}]
    return cfg


def config_issues(plugin_config: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_dict(
            {"_format_version": "3.0", "plugins": [{"name": "key-auth", "config": plugin_config}]}
        )
    return [str(issue) for issue in info.value.issues]


def compile_issues(document: dict[str, Any]) -> list[str]:
    """Issues raised when a gateway compiles `document` (where `bind_config` runs)."""
    with pytest.raises(ConfigError) as info:
        GatewayState(load_config_dict({"_format_version": "3.0", **document}))
    return [str(issue) for issue in info.value.issues]


def assert_refused(
    resp: httpx.Response,
    upstream: Upstream,
    body: dict[str, str],
    status: int = 401,
    challenge: str | None = "Key",
    seen: int = 0,
) -> None:
    """`resp` is Kong's refusal, and the upstream still has only the `seen` requests it had."""
    assert resp.status_code == status
    assert resp.json() == body
    assert resp.headers.get("www-authenticate") == challenge
    assert len(upstream.requests) == seen


def upstream_headers(upstream: Upstream) -> dict[str, str | None]:
    rec = upstream.requests[-1]
    return {name: rec.header(name) for name in CONSUMER_HEADERS}


BOB_HEADERS = {
    "x-consumer-id": BOB_ID,
    "x-consumer-custom-id": "bob-custom",
    "x-consumer-username": "bob",
    "x-credential-identifier": BOB_CRED_ID,
    "x-anonymous-consumer": None,
}
ANON_HEADERS = {
    "x-consumer-id": ANON_ID,
    "x-consumer-custom-id": None,
    "x-consumer-username": "no-body",
    "x-credential-identifier": None,
    "x-anonymous-consumer": "true",
}


def multipart(fields: dict[str, str], boundary: str = "XyZzy42") -> tuple[bytes, str]:
    out = b""
    for name, value in fields.items():
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n').encode()
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


# --- schema ---------------------------------------------------------------------------------


def test_schema_defaults_are_kongs() -> None:
    cfg = load_config_dict({"_format_version": "3.0", "plugins": [{"name": "key-auth"}]})
    plugin = cfg.plugins[0]
    assert plugin.plugin_class.priority == 1250
    assert plugin.plugin_class.no_consumer is True
    assert plugin.config.model_dump() == {
        "key_names": ["apikey"],
        "hide_credentials": False,
        "anonymous": None,
        "key_in_header": True,
        "key_in_query": True,
        "key_in_body": False,
        "run_on_preflight": True,
        "realm": None,
        "identity_realms": None,
    }


def test_schema_refuses_a_key_name_that_is_not_a_header_name() -> None:
    assert config_issues({"key_names": ["apikey", "api key"]}) == [
        "plugins[0].config.key_names[1]: bad header name 'api key', allowed characters are A-Z, a-z, "
        "0-9, '_', and '-'"
    ]


def test_schema_refuses_null_key_names_and_wrong_types() -> None:
    assert config_issues({"key_names": None}) == ["plugins[0].config.key_names: required field missing"]
    assert config_issues({"hide_credentials": "maybe"}) == [
        "plugins[0].config.hide_credentials: Input should be a valid boolean, unable to interpret input"
    ]
    assert config_issues({"key_in_header": None})[0].startswith("plugins[0].config.key_in_header: ")


def test_schema_refuses_unknown_fields() -> None:
    assert config_issues({"key_name": ["apikey"]}) == ["plugins[0].config.key_name: unknown field"]


def test_schema_refuses_a_realm_that_would_break_the_header() -> None:
    assert config_issues({"realm": 'a"b'}) == [
        "plugins[0].config.realm: realm may not contain '\"', '\\' or control characters"
    ]


def test_plugin_cannot_be_applied_to_a_consumer() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_dict(
            {
                "_format_version": "3.0",
                "consumers": [{"username": "bob", "plugins": [{"name": "key-auth"}]}],
            }
        )
    assert [str(i) for i in info.value.issues] == [
        "consumers[0].plugins[0]: plugin 'key-auth' cannot be applied to a consumer"
    ]


# --- credentials, checked when the configuration is compiled --------------------------------


def test_duplicate_key_is_a_config_error_naming_both_credentials_and_not_the_key() -> None:
    issues = compile_issues(
        {
            "consumers": [
                {"username": "a", "keyauth_credentials": [{"key": "k1"}, {"key": "s3cret"}]},
                {"username": "b", "keyauth_credentials": [{"key": "s3cret"}]},
            ],
            "plugins": [{"name": "key-auth"}],
        }
    )
    assert issues == [
        "consumers[1].keyauth_credentials[0].key: duplicate key-auth key "
        "(first at consumers[0].keyauth_credentials[1].key)"
    ]
    assert "s3cret" not in issues[0]


def test_credential_without_key_or_with_bad_fields_is_a_config_error() -> None:
    issues = compile_issues(
        {
            "consumers": [
                {
                    "username": "a",
                    "keyauth_credentials": [{"id": "x"}, {"key": ""}, {"key": "k", "ttl": -1}],
                },
                {"username": "b", "keyauth_credentials": [{"key": "k2", "id": 5}]},
            ],
            "plugins": [{"name": "key-auth"}],
        }
    )
    assert issues == [
        "consumers[0].keyauth_credentials[0].key: required field missing (fhirgate does not generate keys)",
        "consumers[0].keyauth_credentials[1].key: expected a non-empty string",
        "consumers[0].keyauth_credentials[2].ttl: expected a non-negative integer (seconds)",
        "consumers[1].keyauth_credentials[0].id: expected a non-empty string",
    ]


def test_top_level_credential_must_name_a_known_consumer() -> None:
    issues = compile_issues(
        {
            "consumers": [{"username": "a"}],
            "keyauth_credentials": [{"key": "k1", "consumer": "nobody"}, {"key": "k2"}],
            "plugins": [{"name": "key-auth"}],
        }
    )
    assert issues == [
        "keyauth_credentials[0].consumer: unknown consumer 'nobody'",
        "keyauth_credentials[1].consumer: required field missing",
    ]


def test_duplicate_keys_without_a_key_auth_plugin_are_not_checked() -> None:
    # The credentials belong to key-auth: without it they are kept, unused (DECISIONS.md).
    GatewayState(
        load_config_dict(
            {
                "_format_version": "3.0",
                "consumers": [
                    {"username": "a", "keyauth_credentials": [{"key": "same"}]},
                    {"username": "b", "keyauth_credentials": [{"key": "same"}]},
                ],
            }
        )
    )


# --- refusals -------------------------------------------------------------------------------


def test_missing_key_is_refused_with_kongs_message_and_challenge(upstream: Upstream) -> None:
    with running_gateway(with_key_auth(upstream.url)) as gw:
        assert_refused(httpx.get(gw.url + "/status"), upstream, NO_KEY)
        # An empty key is no key.
        assert_refused(httpx.get(gw.url + "/status", headers={"apikey": ""}), upstream, NO_KEY)
        assert_refused(httpx.get(gw.url + "/status?apikey="), upstream, NO_KEY)
        assert_refused(httpx.get(gw.url + "/status?apikey"), upstream, NO_KEY)


def test_realm_is_sent_in_the_challenge(upstream: Upstream) -> None:
    with running_gateway(with_key_auth(upstream.url, realm="fhir-api")) as gw:
        assert_refused(httpx.get(gw.url + "/"), upstream, NO_KEY, challenge='Key realm="fhir-api"')
        resp = httpx.get(gw.url + "/", headers={"apikey": "nope"})
        assert_refused(resp, upstream, INVALID, challenge='Key realm="fhir-api"')


def test_unknown_key_is_refused(upstream: Upstream) -> None:
    with running_gateway(with_key_auth(upstream.url)) as gw:
        assert_refused(httpx.get(gw.url + "/", headers={"apikey": "123"}), upstream, INVALID)
        assert_refused(httpx.get(gw.url + "/?apikey=123"), upstream, INVALID)
        # A prefix, or a different case, of a real key is no key.
        assert_refused(httpx.get(gw.url + "/?apikey=kon"), upstream, INVALID)
        assert_refused(httpx.get(gw.url + "/?apikey=KONG"), upstream, INVALID)


def test_duplicate_key_in_query_or_headers_is_refused(upstream: Upstream) -> None:
    with running_gateway(with_key_auth(upstream.url)) as gw:
        assert_refused(httpx.get(gw.url + "/?apikey=kong&apikey=kong"), upstream, DUPLICATE)
        resp = httpx.get(gw.url + "/", headers=[("apikey", "kong"), ("apikey", "kong")])
        assert_refused(resp, upstream, DUPLICATE)


def test_refusal_on_a_fhir_request_keeps_status_and_challenge(upstream: Upstream) -> None:
    with running_gateway(with_key_auth(upstream.url)) as gw:
        resp = httpx.get(gw.url + "/Patient/1", headers={"Accept": "application/fhir+json"})
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"] == "Key"
    outcome = resp.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["diagnostics"] == NO_KEY["message"]
    assert upstream.requests == []


# --- where the key is found -----------------------------------------------------------------


def test_key_in_header_authenticates_and_sets_consumer_headers(upstream: Upstream) -> None:
    with running_gateway(with_key_auth(upstream.url)) as gw:
        resp = httpx.get(gw.url + "/request", headers={"apikey": "kong"})
    assert resp.status_code == 200
    assert upstream_headers(upstream) == BOB_HEADERS
    assert upstream.requests[-1].header("apikey") == "kong"  # hide_credentials is false


def test_header_names_are_case_insensitive_and_underscores_match_hyphens(upstream: Upstream) -> None:
    with running_gateway(with_key_auth(upstream.url, key_names=["X-Api-Key", "api_key"])) as gw:
        assert httpx.get(gw.url + "/", headers={"x-api-key": "kong"}).status_code == 200
        assert httpx.get(gw.url + "/", headers={"X-API-KEY": "kong"}).status_code == 200
        assert httpx.get(gw.url + "/", headers={"Api-Key": "kong"}).status_code == 200
        assert_refused(httpx.get(gw.url + "/", headers={"apikey": "kong"}), upstream, NO_KEY, seen=3)


def test_key_in_query_authenticates(upstream: Upstream) -> None:
    with running_gateway(with_key_auth(upstream.url)) as gw:
        resp = httpx.get(gw.url + "/request?a=1&apikey=kong&b=2")
    assert resp.status_code == 200
    assert upstream_headers(upstream) == BOB_HEADERS
    assert upstream.requests[-1].target == "/request?a=1&apikey=kong&b=2"


def test_first_key_name_present_wins(upstream: Upstream) -> None:
    with running_gateway(with_key_auth(upstream.url, key_names=["first", "second"])) as gw:
        resp = httpx.get(gw.url + "/?first=alice-key", headers={"second": "kong"})
        assert resp.status_code == 200
        assert upstream.requests[-1].header("x-consumer-username") == "alice"
        # Within one name: header before query string.
        resp = httpx.get(gw.url + "/?first=alice-key", headers={"first": "kong"})
        assert upstream.requests[-1].header("x-consumer-username") == "bob"


def test_key_in_header_or_query_can_be_switched_off(upstream: Upstream) -> None:
    with running_gateway(with_key_auth(upstream.url, key_in_header=False)) as gw:
        assert_refused(httpx.get(gw.url + "/", headers={"apikey": "kong"}), upstream, NO_KEY)
    with running_gateway(with_key_auth(upstream.url, key_in_query=False)) as gw:
        assert_refused(httpx.get(gw.url + "/?apikey=kong"), upstream, NO_KEY)


def test_key_in_body_is_ignored_unless_key_in_body(upstream: Upstream) -> None:
    with running_gateway(with_key_auth(upstream.url)) as gw:
        assert_refused(httpx.post(gw.url + "/", data={"apikey": "kong"}), upstream, NO_KEY)


@pytest.mark.parametrize("kind", ["form", "json", "multipart"])
def test_key_in_body_authenticates(upstream: Upstream, kind: str) -> None:
    with running_gateway(with_key_auth(upstream.url, key_in_body=True)) as gw:
        if kind == "form":
            resp = httpx.post(gw.url + "/", data={"apikey": "kong", "foo": "bar"})
        elif kind == "json":
            resp = httpx.post(gw.url + "/", json={"apikey": "kong", "foo": "bar"})
        else:
            body, ctype = multipart({"apikey": "kong", "foo": "bar"})
            resp = httpx.post(gw.url + "/", content=body, headers={"Content-Type": ctype})
        assert resp.status_code == 200
        assert upstream_headers(upstream) == BOB_HEADERS
        sent = upstream.requests[-1].body
        assert b"kong" in sent  # hide_credentials is false: the body goes upstream unchanged
        assert upstream.requests[-1].header("content-length") == str(len(sent))


@pytest.mark.parametrize("kind", ["form", "json", "multipart"])
def test_unknown_key_in_body_is_refused(upstream: Upstream, kind: str) -> None:
    with running_gateway(with_key_auth(upstream.url, key_in_body=True)) as gw:
        if kind == "form":
            resp = httpx.post(gw.url + "/", data={"apikey": "123"})
        elif kind == "json":
            resp = httpx.post(gw.url + "/", json={"apikey": "123"})
        else:
            body, ctype = multipart({"apikey": "123"})
            resp = httpx.post(gw.url + "/", content=body, headers={"Content-Type": ctype})
        assert_refused(resp, upstream, INVALID)


def test_duplicate_key_in_body_is_refused(upstream: Upstream) -> None:
    with running_gateway(with_key_auth(upstream.url, key_in_body=True)) as gw:
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        resp = httpx.post(gw.url + "/", content=b"apikey=kong&apikey=kong", headers=form)
        assert_refused(resp, upstream, DUPLICATE)
        assert_refused(httpx.post(gw.url + "/", json={"apikey": ["kong", "kong"]}), upstream, DUPLICATE)


def test_body_of_another_type_or_malformed_counts_as_empty(upstream: Upstream) -> None:
    # Kong 3.x logs the body error and carries on without a key.
    with running_gateway(with_key_auth(upstream.url, key_in_body=True)) as gw:
        text = {"Content-Type": "text/plain"}
        assert_refused(httpx.post(gw.url + "/", content=b"apikey=kong", headers=text), upstream, NO_KEY)
        bad_json = {"Content-Type": "application/json"}
        assert_refused(httpx.post(gw.url + "/", content=b'{"apikey":', headers=bad_json), upstream, NO_KEY)
        assert_refused(httpx.post(gw.url + "/", json=["kong"]), upstream, NO_KEY)
        assert_refused(httpx.post(gw.url + "/", json={"apikey": 12}), upstream, NO_KEY)


def test_body_is_not_read_when_the_key_is_in_a_header(upstream: Upstream) -> None:
    with running_gateway(with_key_auth(upstream.url, key_in_body=True)) as gw:

        def body() -> Iterator[bytes]:
            yield b'{"apikey":'
            yield b'"nope"}'

        resp = httpx.post(
            gw.url + "/", content=body(), headers={"apikey": "kong", "Content-Type": "application/json"}
        )
    assert resp.status_code == 200
    assert upstream.requests[-1].body == b'{"apikey":"nope"}'


# --- hide_credentials -----------------------------------------------------------------------


def test_hide_credentials_removes_the_header(upstream: Upstream) -> None:
    with running_gateway(with_key_auth(upstream.url, hide_credentials=True)) as gw:
        resp = httpx.get(gw.url + "/", headers={"apikey": "kong", "other": "kept"})
    assert resp.status_code == 200
    rec = upstream.requests[-1]
    assert rec.header("apikey") is None
    assert rec.header("other") == "kept"
    assert upstream_headers(upstream) == BOB_HEADERS


def test_hide_credentials_removes_the_query_argument_keeping_the_others_in_order(upstream: Upstream) -> None:
    with running_gateway(with_key_auth(upstream.url, hide_credentials=True)) as gw:
        assert httpx.get(gw.url + "/p?z=1&apikey=kong&a=%20x").status_code == 200
        assert upstream.requests[-1].target == "/p?z=1&a=%20x"
        assert httpx.get(gw.url + "/p?apikey=kong").status_code == 200
        assert upstream.requests[-1].target == "/p"


def test_hide_credentials_strips_the_key_even_when_it_is_refused(upstream: Upstream) -> None:
    # Kong removes the key before checking it: an anonymous request never carries the bad key.
    cfg = with_key_auth(upstream.url, hide_credentials=True, anonymous=ANON_ID)
    with running_gateway(cfg) as gw:
        assert httpx.get(gw.url + "/?apikey=wrong", headers={"apikey": "wrong"}).status_code == 200
    rec = upstream.requests[-1]
    assert rec.target == "/"
    assert rec.header("apikey") is None
    assert upstream_headers(upstream) == ANON_HEADERS


@pytest.mark.parametrize("kind", ["form", "json", "multipart"])
def test_hide_credentials_removes_the_key_from_the_body(upstream: Upstream, kind: str) -> None:
    cfg = with_key_auth(upstream.url, key_in_body=True, hide_credentials=True)
    with running_gateway(cfg) as gw:
        if kind == "form":
            resp = httpx.post(gw.url + "/", data={"foo": "bar", "apikey": "kong", "z": "9"})
            expected = b"foo=bar&z=9"
        elif kind == "json":
            resp = httpx.post(gw.url + "/", json={"foo": "bar", "apikey": "kong"})
            expected = b'{"foo":"bar"}'
        else:
            body, ctype = multipart({"foo": "bar", "apikey": "kong"})
            resp = httpx.post(gw.url + "/", content=body, headers={"Content-Type": ctype})
            expected = multipart({"foo": "bar"})[0]
        assert resp.status_code == 200
        rec = upstream.requests[-1]
        assert rec.body == expected
        assert rec.header("content-length") == str(len(expected))
        assert upstream_headers(upstream) == BOB_HEADERS
        if kind == "multipart":
            assert rec.header("content-type") == ctype  # the MIME type (and boundary) is kept


def test_hide_credentials_with_key_in_body_also_strips_the_body_when_the_key_was_in_a_header(
    upstream: Upstream,
) -> None:
    cfg = with_key_auth(upstream.url, key_in_body=True, hide_credentials=True)
    with running_gateway(cfg) as gw:
        resp = httpx.post(gw.url + "/?apikey=x", headers={"apikey": "kong"}, data={"apikey": "y", "a": "b"})
    assert resp.status_code == 200
    rec = upstream.requests[-1]
    assert (rec.target, rec.header("apikey"), rec.body) == ("/", None, b"a=b")


# --- preflight ------------------------------------------------------------------------------


def test_preflight_is_authenticated_by_default(upstream: Upstream) -> None:
    with running_gateway(with_key_auth(upstream.url)) as gw:
        assert_refused(httpx.options(gw.url + "/"), upstream, NO_KEY)


def test_preflight_passes_when_run_on_preflight_is_false(upstream: Upstream) -> None:
    with running_gateway(with_key_auth(upstream.url, run_on_preflight=False)) as gw:
        assert httpx.options(gw.url + "/").status_code == 200
        assert upstream.requests[-1].method == "OPTIONS"
        assert upstream_headers(upstream)["x-consumer-id"] is None
        assert_refused(httpx.get(gw.url + "/"), upstream, NO_KEY, seen=1)


# --- consumer headers, anonymous --------------------------------------------------------------


def test_client_sent_consumer_headers_are_replaced(upstream: Upstream) -> None:
    forged = {
        "X-Consumer-ID": "evil",
        "X-Consumer-Custom-ID": "evil",
        "X-Consumer-Username": "evil",
        "X-Credential-Identifier": "evil",
        "X-Anonymous-Consumer": "true",
    }
    with running_gateway(with_key_auth(upstream.url)) as gw:
        assert httpx.get(gw.url + "/", headers={**forged, "apikey": "alice-key"}).status_code == 200
    rec = upstream.requests[-1]
    assert rec.header("x-consumer-id") == ALICE_ID
    assert rec.header("x-consumer-username") == "alice"
    assert rec.header_all("x-consumer-custom-id") == []  # alice has no custom_id
    assert rec.header_all("x-anonymous-consumer") == []
    # Without an `id` in the file, the credential gets a stable one that does not derive from the key.
    ident = rec.header("x-credential-identifier")
    assert ident not in (None, "evil", "alice-key")
    assert len(rec.header_all("x-consumer-id")) == 1


def test_credential_id_is_stable_across_reloads(upstream: Upstream) -> None:
    with running_gateway(with_key_auth(upstream.url)) as gw:
        httpx.get(gw.url + "/", headers={"apikey": "alice-key"})
        gw.reload(with_key_auth(upstream.url))
        httpx.get(gw.url + "/", headers={"apikey": "alice-key"})
    first, second = (r.header("x-credential-identifier") for r in upstream.requests)
    assert first == second


@pytest.mark.parametrize("anonymous", [ANON_ID, "no-body"])
def test_anonymous_by_id_or_username(upstream: Upstream, anonymous: str) -> None:
    with running_gateway(with_key_auth(upstream.url, anonymous=anonymous)) as gw:
        assert httpx.get(gw.url + "/?apikey=kong").status_code == 200
        assert upstream_headers(upstream) == BOB_HEADERS
        assert httpx.get(gw.url + "/").status_code == 200
        assert upstream_headers(upstream) == ANON_HEADERS
        assert httpx.get(gw.url + "/?apikey=wrong").status_code == 200
        assert upstream_headers(upstream) == ANON_HEADERS
        assert httpx.get(gw.url + "/?apikey=a&apikey=b").status_code == 200
        assert upstream_headers(upstream) == ANON_HEADERS


def test_missing_anonymous_consumer_is_a_500_with_kongs_message(upstream: Upstream) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    with running_gateway(with_key_auth(upstream.url, anonymous=missing)) as gw:
        resp = httpx.get(gw.url + "/")
        assert resp.status_code == 500
        assert resp.json() == {"message": f"anonymous consumer {missing} is configured but doesn't exist"}
        # A valid key still works.
        assert httpx.get(gw.url + "/?apikey=kong").status_code == 200
    assert len(upstream.requests) == 1


def test_top_level_credentials_reference_their_consumer(upstream: Upstream) -> None:
    cfg = with_key_auth(upstream.url)
    cfg["keyauth_credentials"] = [
        {"key": "by-username", "consumer": "alice"},
        {"key": "by-id", "consumer": {"id": BOB_ID}},
    ]
    with running_gateway(cfg) as gw:
        httpx.get(gw.url + "/", headers={"apikey": "by-username"})
        httpx.get(gw.url + "/", headers={"apikey": "by-id"})
    assert [r.header("x-consumer-username") for r in upstream.requests] == ["alice", "bob"]


def test_ttl_expires_the_key_after_that_many_seconds_from_load(upstream: Upstream) -> None:
    now = [1_000_000.0]
    clock.set_clock(lambda: now[0])
    try:
        cfg = with_key_auth(upstream.url)
        cfg["consumers"][0]["keyauth_credentials"][0]["ttl"] = 60
        with running_gateway(cfg) as gw:
            now[0] += 59
            assert httpx.get(gw.url + "/?apikey=kong").status_code == 200
            now[0] += 1
            resp = httpx.get(gw.url + "/?apikey=kong")
    finally:
        clock.set_clock(None)
    assert resp.status_code == 401
    assert resp.json() == INVALID
    assert len(upstream.requests) == 1


# --- logical AND / OR with a second auth plugin (Kong's "multiple auth" cases) ----------------


class _TestAuthConfig(PluginConfig):
    anonymous: str | None = None


class _TestAuthHandler(Plugin):
    """Stands in for Kong's basic-auth (priority 1100, after key-auth): `X-Test-User: <username>`
    authenticates that consumer."""

    name: ClassVar[str] = "test-auth"
    priority: ClassVar[int] = 1100
    Config: ClassVar[type[PluginConfig]] = _TestAuthConfig
    no_consumer: ClassVar[bool] = True

    def access(self, kong: PDK) -> None:
        anonymous = getattr(self.config, "anonymous", None)

        def attempt() -> None:
            username = kong.request.get_header("x-test-user")
            consumer = kong.client.load_consumer(username, True) if username else None
            if consumer is None:
                kong.response.error(401, "Unauthorized", {"WWW-Authenticate": "Test"})
            set_consumer(kong, consumer, {"id": f"test-{consumer.id}"}, f"test-{consumer.id}")

        authenticate_or_anonymous(kong, anonymous, attempt)


@pytest.fixture
def test_auth_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("fhirgate.gateway.plugins.test_auth_for_key_auth.handler")
    module.Handler = _TestAuthHandler  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(registry._BUILTIN, "test-auth", "test_auth_for_key_auth")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hs256(payload: dict[str, Any], secret: str) -> str:
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(payload).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


JWT_SECRET = "a-long-enough-secret-for-hs256-tokens!!"
SECOND_AUTH = [
    pytest.param("test-auth", id="test-auth"),
    pytest.param(
        "jwt",
        id="jwt",
        marks=pytest.mark.skipif(
            registry.get_plugin_class("jwt") is None, reason="the jwt plugin is not in this build yet"
        ),
    ),
]


def _second_credential(plugin: str) -> dict[str, str]:
    """Request headers that authenticate alice with the second plugin."""
    if plugin == "jwt":
        return {"Authorization": "Bearer " + _hs256({"iss": "alice-iss"}, JWT_SECRET)}
    return {"X-Test-User": "alice"}


def _multi_auth(upstream_url: str, plugin: str, anonymous: str | None) -> dict[str, Any]:
    cfg = service_config(upstream_url)
    cfg["consumers"] = consumers()
    cfg["consumers"][2]["keyauth_credentials"] = []  # alice authenticates with the second plugin only
    cfg["consumers"][2]["jwt_secrets"] = [{"key": "alice-iss", "secret": JWT_SECRET}]
    anon = {"anonymous": anonymous} if anonymous else {}
    cfg["plugins"] = [{"name": "key-auth", "config": anon}, {"name": plugin, "config": anon}]
    return cfg


# The second plugin's refusal without its credential: jwt (priority 1450) runs before key-auth, the
# basic-auth stand-in (1100) after it.
SECOND_REFUSAL = {"jwt": ("Bearer", True), "test-auth": ("Test", False)}


@pytest.mark.usefixtures("test_auth_plugin")
@pytest.mark.parametrize("plugin", SECOND_AUTH)
def test_logical_and_needs_both_credentials(upstream: Upstream, plugin: str) -> None:
    second = _second_credential(plugin)
    challenge, runs_first = SECOND_REFUSAL[plugin]
    with running_gateway(_multi_auth(upstream.url, plugin, None)) as gw:
        resp = httpx.get(gw.url + "/", headers={"apikey": "kong", **second})
        assert resp.status_code == 200
        assert upstream.requests[-1].header("x-consumer-id") in (BOB_ID, ALICE_ID)
        assert upstream.requests[-1].header("x-anonymous-consumer") is None
        count = len(upstream.requests)
        only_key = httpx.get(gw.url + "/", headers={"apikey": "kong"})
        assert_refused(only_key, upstream, INVALID, challenge=challenge, seen=count)
        only_second = httpx.get(gw.url + "/", headers=second)
        assert_refused(only_second, upstream, NO_KEY, seen=count)
        neither = httpx.get(gw.url + "/")
        if runs_first:
            assert_refused(neither, upstream, INVALID, challenge=challenge, seen=count)
        else:
            assert_refused(neither, upstream, NO_KEY, seen=count)


@pytest.mark.usefixtures("test_auth_plugin")
@pytest.mark.parametrize("plugin", SECOND_AUTH)
def test_logical_or_passes_with_either_credential_or_none(upstream: Upstream, plugin: str) -> None:
    second = _second_credential(plugin)
    with running_gateway(_multi_auth(upstream.url, plugin, ANON_ID)) as gw:
        assert httpx.get(gw.url + "/", headers={"apikey": "kong", **second}).status_code == 200
        both = upstream_headers(upstream)
        assert both["x-consumer-id"] in (BOB_ID, ALICE_ID)
        assert both["x-anonymous-consumer"] is None

        assert httpx.get(gw.url + "/", headers={"apikey": "kong"}).status_code == 200
        assert upstream_headers(upstream) == BOB_HEADERS

        assert httpx.get(gw.url + "/", headers=second).status_code == 200
        only_second = upstream_headers(upstream)
        assert only_second["x-consumer-id"] == ALICE_ID
        assert only_second["x-anonymous-consumer"] is None

        assert httpx.get(gw.url + "/").status_code == 200
        assert upstream_headers(upstream) == ANON_HEADERS
