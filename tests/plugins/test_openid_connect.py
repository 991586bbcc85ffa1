"""`openid-connect` (bearer JWT): schema, and access through a running gateway in front of a real
local identity provider (`FakeIdP`: discovery + JWKS over HTTP on 127.0.0.1, keys rotated by the
test, requests counted). Every refusal asserts the exact status, `WWW-Authenticate` and body, and
that the upstream saw nothing. Time-dependent behaviour (cache lifetimes, cool-downs) runs on an
injected monotonic clock."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from fhirgate.config import load_config_dict
from fhirgate.errors import ConfigError
from fhirgate.gateway.plugins.openid_connect.handler import Handler
from fhirgate.gateway.plugins.openid_connect.schema import OpenIdConnectConfig
from fhirgate.gateway.plugins.registry import get_plugin_class
from tests.harness import GatewayHandle, Reply, Upstream, running_gateway
from tests.tokens.jwtkit import keypair, segment, sign
from tests.tokens.test_jwks_cache import Clock, FakeIdP, public_jwk, token

AUDIENCE = "https://fhir.test/r4"
REALM = "fhir"
WWW = "www-authenticate"
CHALLENGE = f'Bearer realm="{REALM}"'


def invalid_token(description: str) -> str:
    return f'{CHALLENGE}, error="invalid_token", error_description="{description}"'


def invalid_request(description: str) -> str:
    return f'{CHALLENGE}, error="invalid_request", error_description="{description}"'


def realm_of(host: str) -> str:
    return REALM if host == "api" else host


class Env:
    """A gateway with `openid-connect` on one route per host, an upstream that echoes the headers
    it received, and the IdP."""

    def __init__(self, idp: FakeIdP, upstream: Upstream, gw: GatewayHandle, client: httpx.Client) -> None:
        self.idp = idp
        self.upstream = upstream
        self.gw = gw
        self.client = client

    def handler(self, host: str = "api") -> Handler:
        for spec in self.gw.gateway.state.pipeline.specs:
            if (spec.route_id is not None and spec.handler.config.realm == host) or host == "api":
                handler: Handler = spec.handler
                return handler
        raise KeyError(host)

    def clock(self, host: str = "api") -> Clock:
        clock = Clock()
        self.handler(host).cache.monotonic = clock
        return clock

    def claims(self, **extra: Any) -> dict[str, Any]:
        now = int(time.time())
        out: dict[str, Any] = {
            "iss": self.idp.issuer,
            "sub": "alice",
            "aud": AUDIENCE,
            "scope": "openid patient/*.read",
            "iat": now,
            "exp": now + 300,
        }
        out.update(extra)
        return {k: v for k, v in out.items() if v is not None}

    def call(
        self,
        tok: str | None = None,
        *,
        host: str = "api",
        headers: list[tuple[str, str]] | None = None,
        params: dict[str, str] | None = None,
        method: str = "GET",
        content: bytes | None = None,
    ) -> httpx.Response:
        h = [("Host", f"{host}.test"), *(headers or [])]
        if tok is not None:
            h.append(("Authorization", f"Bearer {tok}"))
        return self.client.request(method, "/Patient", headers=h, params=params, content=content)

    def refused(self, tok: str | None = None, **kw: Any) -> httpx.Response:
        before = len(self.upstream.requests)
        res = self.call(tok, **kw)
        assert len(self.upstream.requests) == before, "the upstream must see nothing"
        return res

    def ok(self, tok: str | None = None, **kw: Any) -> dict[str, str]:
        before = len(self.upstream.requests)
        res = self.call(tok, **kw)
        assert res.status_code == 200, (res.status_code, res.headers.get(WWW), res.text)
        assert len(self.upstream.requests) == before + 1
        seen: dict[str, str] = res.json()["headers"]
        return seen


def assert_refusal(res: httpx.Response, status: int, www: str | None, message: str) -> None:
    assert res.status_code == status, res.text
    assert res.headers.get(WWW) == www
    assert res.json() == {"message": message}
    assert res.headers["content-type"].startswith("application/json")


@pytest.fixture
def idp() -> Iterator[FakeIdP]:
    server = FakeIdP()
    server.keys = [public_jwk("rsa", "k1", use="sig"), public_jwk("p256", "e1")]
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


@pytest.fixture
def make_env(idp: FakeIdP, upstream: Upstream, stack: ExitStack) -> Any:
    upstream.handler = lambda req: Reply(body=json.dumps({"headers": dict(req.headers)}).encode())

    def make(routes: dict[str, dict[str, Any]] | None = None, **conf: Any) -> Env:
        routes = routes or {"api": conf}
        config = {
            "_format_version": "3.0",
            "services": [
                {
                    "name": "fhir",
                    "url": upstream.url,
                    "routes": [
                        {
                            "name": host,
                            "hosts": [f"{host}.test"],
                            "paths": ["/"],
                            "plugins": [
                                {
                                    "name": "openid-connect",
                                    "config": {
                                        "issuer": idp.issuer,
                                        "audience_required": [AUDIENCE],
                                        "realm": realm_of(host),
                                        **route_conf,
                                    },
                                }
                            ],
                        }
                        for host, route_conf in routes.items()
                    ],
                }
            ],
            "consumers": [
                {"username": "alice", "custom_id": "c-alice"},
                {"id": "7e1b2c4d-0000-4000-8000-00000000a001", "username": "anon"},
            ],
        }
        gw = stack.enter_context(running_gateway(config))
        client = stack.enter_context(httpx.Client(base_url=gw.url, timeout=10))
        return Env(idp, upstream, gw, client)

    return make


@pytest.fixture
def env(make_env: Any) -> Env:
    result: Env = make_env()
    return result


# -- schema --------------------------------------------------------------------------------------


def test_defaults_and_registration() -> None:
    conf = OpenIdConnectConfig(issuer="https://idp.test")
    assert conf.bearer_token_param_type == ["header"]
    assert conf.scopes_claim == ["scope"]
    assert conf.consumer_by == ["username", "custom_id"]
    assert conf.rediscovery_lifetime == 30
    assert conf.leeway == 0
    assert conf.typ == ["at+jwt", "JWT"]
    assert conf.jwks_refetch_cooldown == 30
    assert (conf.jwks_cache_min_ttl, conf.jwks_cache_max_ttl) == (60, 86400)
    assert conf.jwks_max_bytes == 512 * 1024
    assert Handler.priority == 1050
    assert get_plugin_class("openid-connect") is Handler


def _issues(config: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_config_dict(
            {"_format_version": "3.0", "plugins": [{"name": "openid-connect", "config": config}]}
        )
    return [(i.location, i.message) for i in info.value.issues]


def test_invalid_configurations_name_the_field() -> None:
    assert _issues({})[0][0] == "plugins[0].config.issuer"
    assert _issues({"issuer": "ftp://idp.test"})[0][0] == "plugins[0].config.issuer"
    assert _issues({"issuer": "https://u:p@idp.test"})[0][0] == "plugins[0].config.issuer"
    assert _issues({"issuer": "https://idp.test", "scopes_required": [" "]})[0][0] == (
        "plugins[0].config.scopes_required"
    )
    assert _issues({"issuer": "https://idp.test", "realm": 'a"b'})[0][0] == "plugins[0].config.realm"
    assert _issues({"issuer": "https://idp.test", "bearer_token_param_type": ["cookie"]})[0][0].startswith(
        "plugins[0].config.bearer_token_param_type"
    )
    issues = _issues({"issuer": "https://idp.test", "upstream_headers_claims": ["sub"]})
    assert "same length" in issues[0][1]


# -- access ---------------------------------------------------------------------------------------


def test_a_valid_token_reaches_the_upstream(env: Env) -> None:
    tok = token("rsa", "k1", env.claims())
    seen = env.ok(tok, headers=[("X-Consumer-Username", "forged"), ("X-Anonymous-Consumer", "true")])
    assert seen["authorization"] == f"Bearer {tok}"
    assert seen["x-credential-identifier"] == "alice"
    assert "x-consumer-username" not in seen
    assert "x-anonymous-consumer" not in seen
    assert env.ok(token("p256", "e1", env.claims(), alg="ES256"))["x-credential-identifier"] == "alice"
    assert env.idp.count("/.well-known/openid-configuration") == 1
    assert env.idp.jwks_fetches == 1  # then from the cache


def test_bearer_scheme_is_case_insensitive(env: Env) -> None:
    tok = token("rsa", "k1", env.claims())
    env.ok(headers=[("Authorization", f"bEaReR   {tok}")])


def test_no_token_is_a_challenge_without_error(env: Env) -> None:
    assert_refusal(env.refused(), 401, CHALLENGE, "Unauthorized")
    assert_refusal(env.refused(headers=[("Authorization", "Basic YTpi")]), 401, CHALLENGE, "Unauthorized")
    assert env.idp.paths == []  # nothing fetched for a request without a token


def test_realm_defaults_to_the_host(make_env: Any) -> None:
    env = make_env(realm=None)
    assert_refusal(env.refused(), 401, 'Bearer realm="api.test"', "Unauthorized")


def test_expired_token(env: Env) -> None:
    now = int(time.time())
    tok = token("rsa", "k1", env.claims(iat=now - 600, exp=now - 60))
    msg = "the token has expired"
    assert_refusal(env.refused(tok), 401, invalid_token(msg), msg)


def test_token_without_exp_is_refused(env: Env) -> None:
    tok = token("rsa", "k1", env.claims(exp=None))
    msg = "the token's exp claim is missing or invalid"
    assert_refusal(env.refused(tok), 401, invalid_token(msg), msg)


def test_not_yet_valid_token_and_leeway(make_env: Any) -> None:
    env = make_env(routes={"api": {}, "lenient": {"leeway": 60}})
    tok = token("rsa", "k1", env.claims(nbf=int(time.time()) + 30))
    msg = "the token is not valid yet"
    assert_refusal(env.refused(tok), 401, invalid_token(msg), msg)
    env.ok(tok, host="lenient")


def test_wrong_issuer_is_refused_without_fetching(env: Env) -> None:
    tok = token("rsa", "k1", env.claims(iss="https://evil.test"))
    msg = "the token's issuer is not accepted"
    assert_refusal(env.refused(tok), 401, invalid_token(msg), msg)
    assert env.idp.paths == []


def test_issuer_with_a_trailing_slash_is_another_issuer(env: Env) -> None:
    tok = token("rsa", "k1", env.claims(iss=env.idp.issuer + "/"))
    msg = "the token's issuer is not accepted"
    assert_refusal(env.refused(tok), 401, invalid_token(msg), msg)


def test_wrong_audience(env: Env) -> None:
    msg = "the token's audience is not accepted"
    for aud in ("https://other.test", ["a", "b"], None):
        tok = token("rsa", "k1", env.claims(aud=aud))
        assert_refusal(env.refused(tok), 401, invalid_token(msg), msg)
    env.ok(token("rsa", "k1", env.claims(aud=["other", AUDIENCE])))


def test_missing_scope_is_403_insufficient_scope(make_env: Any) -> None:
    env = make_env(scopes_required=["patient/*.write"])
    tok = token("rsa", "k1", env.claims())
    msg = "the token lacks the scope this resource requires"
    www = f'{CHALLENGE}, error="insufficient_scope", error_description="{msg}", scope="patient/*.write"'
    assert_refusal(env.refused(tok), 403, www, msg)


def test_scopes_required_are_alternatives_of_sets(make_env: Any) -> None:
    env = make_env(scopes_required=["patient/*.read patient/*.write", "system/*.*"])
    env.ok(token("rsa", "k1", env.claims(scope="system/*.*")))
    env.ok(token("rsa", "k1", env.claims(scope="patient/*.write openid patient/*.read")))
    res = env.refused(token("rsa", "k1", env.claims(scope="patient/*.read")))
    assert res.status_code == 403
    assert 'scope="patient/*.read patient/*.write"' in res.headers[WWW]


def test_scp_array_as_scopes_claim(make_env: Any) -> None:
    env = make_env(scopes_claim=["scp"], scopes_required=["fhir.read"])
    env.ok(token("rsa", "k1", env.claims(scp=["openid", "fhir.read"])))
    assert env.refused(token("rsa", "k1", env.claims(scp=["openid"]))).status_code == 403
    # the default claim is not looked at when another is configured
    assert env.refused(token("rsa", "k1", env.claims(scope="fhir.read"))).status_code == 403


def test_unknown_kid_refetches_once_then_refuses(env: Env) -> None:
    clock = env.clock()
    env.ok(token("rsa", "k1", env.claims()))
    assert env.idp.jwks_fetches == 1
    clock.advance(31)
    msg = "no key of the issuer matches the token's kid"
    for i in range(5):
        tok = token("rsa#2", f"attacker-{i}", env.claims())
        assert_refusal(env.refused(tok), 401, invalid_token(msg), msg)
    assert env.idp.jwks_fetches == 2  # one refetch for the five
    clock.advance(30)
    assert_refusal(env.refused(token("rsa#2", "again", env.claims())), 401, invalid_token(msg), msg)
    assert env.idp.jwks_fetches == 3


def test_rotation_new_key_accepted_removed_key_refused_after_refresh(env: Env) -> None:
    clock = env.clock()
    old = token("rsa", "k1", env.claims())
    env.ok(old)
    env.idp.keys = [public_jwk("rsa", "k1"), public_jwk("rsa#2", "k2")]
    clock.advance(30)
    env.ok(token("rsa#2", "k2", env.claims()))  # unknown kid -> refetch -> the new key
    assert env.idp.jwks_fetches == 2
    env.idp.keys = [public_jwk("rsa#2", "k2")]
    env.ok(old)  # the removed key is still cached ...
    clock.advance(300)  # ... until the cache period (max-age=300) ends and a refresh succeeds
    msg = "no key of the issuer matches the token's kid"
    assert_refusal(env.refused(old), 401, invalid_token(msg), msg)
    env.ok(token("rsa#2", "k2", env.claims()))


def test_jwks_down_with_keys_cached_keeps_serving(env: Env) -> None:
    clock = env.clock()
    tok = token("rsa", "k1", env.claims())
    env.ok(tok)
    env.idp.down = True
    clock.advance(301)
    env.ok(tok)
    assert env.idp.paths[-1] == "/jwks"  # a refresh was tried, failed, and the keys stayed
    attempts = len(env.idp.paths)
    env.ok(tok)
    assert len(env.idp.paths) == attempts  # and is not retried before the cool-down


def test_jwks_down_at_cold_start_is_503_with_retry_after(env: Env) -> None:
    clock = env.clock()
    env.idp.down = True
    tok = token("rsa", "k1", env.claims())
    res = env.refused(tok)
    assert res.status_code == 503
    assert res.headers["retry-after"] == "30"
    assert WWW not in res.headers
    assert res.json() == {"message": "the issuer's signing keys cannot be fetched now; try again later"}
    attempts = len(env.idp.paths)
    clock.advance(10)
    res = env.refused(tok)
    assert (res.status_code, res.headers["retry-after"]) == (503, "20")
    assert len(env.idp.paths) == attempts
    env.idp.down = False
    clock.advance(20)
    env.ok(tok)


def test_discovery_naming_another_issuer_is_a_503(env: Env) -> None:
    env.clock()
    env.idp.issuer_override = "https://evil.test"
    assert env.refused(token("rsa", "k1", env.claims())).status_code == 503
    assert env.idp.jwks_fetches == 0


def test_token_in_query_is_refused_by_default(env: Env) -> None:
    tok = token("rsa", "k1", env.claims())
    msg = "access_token in the query string is not accepted; send it in the Authorization header"
    assert_refusal(env.refused(params={"access_token": tok}), 400, invalid_request(msg), msg)
    assert_refusal(env.refused(tok, params={"access_token": tok}), 400, invalid_request(msg), msg)


def test_query_and_body_when_configured(make_env: Any) -> None:
    env = make_env(bearer_token_param_type=["header", "query", "body"])
    tok = token("rsa", "k1", env.claims())
    env.ok(params={"access_token": tok})
    form = [("Content-Type", "application/x-www-form-urlencoded")]
    env.ok(method="POST", headers=form, content=f"access_token={tok}&x=1".encode())
    msg = "more than one access token in the request"
    assert_refusal(env.refused(tok, params={"access_token": tok}), 400, invalid_request(msg), msg)
    res = env.refused(tok, method="POST", headers=form, content=f"access_token={tok}".encode())
    assert_refusal(res, 400, invalid_request(msg), msg)


def test_two_authorization_headers_are_400(env: Env) -> None:
    tok = token("rsa", "k1", env.claims())
    msg = "more than one Authorization header"
    res = env.refused(headers=[("Authorization", f"Bearer {tok}"), ("Authorization", f"Bearer {tok}")])
    assert_refusal(res, 400, invalid_request(msg), msg)


def test_bearer_credentials_that_are_not_a_b64token_are_400(env: Env) -> None:
    msg = "the Authorization header is not a Bearer b64token (RFC 6750 section 2.1)"
    for value in ("Bearer", "Bearer a b", "Bearer a,Bearer b"):
        res = env.refused(headers=[("Authorization", value)])
        assert_refusal(res, 400, invalid_request(msg), msg)


def test_alg_none_is_refused(env: Env) -> None:
    claims = env.claims()
    tok = sign(claims, "none", None, {"alg": "none", "kid": "k1"})
    msg = "the token's alg is missing, unknown or none"
    assert_refusal(env.refused(tok), 401, invalid_token(msg), msg)
    unsigned = f"{segment({'alg': 'none'})}.{segment(claims)}."
    assert_refusal(env.refused(unsigned), 401, invalid_token(msg), msg)


def test_hs256_signed_with_the_rsa_public_key_is_refused(env: Env) -> None:
    pem = keypair("rsa").public_pem.encode()
    tok = sign(env.claims(), "HS256", pem, {"alg": "HS256", "kid": "k1", "typ": "at+jwt"})
    msg = "the token's alg is not allowed for the issuer's key"
    assert_refusal(env.refused(tok), 401, invalid_token(msg), msg)


def test_tampered_payload_fails_the_signature(env: Env) -> None:
    tok = token("rsa", "k1", env.claims())
    header, _, signature = tok.split(".")
    forged = f"{header}.{segment(env.claims(sub='mallory'))}.{signature}"
    msg = "the token's signature is invalid"
    assert_refusal(env.refused(forged), 401, invalid_token(msg), msg)


def test_malformed_tokens(env: Env) -> None:
    msg = "the token is malformed"
    for tok in ("a.b", "abc.def.ghi", "eyJhbGciOiJSUzI1NiJ9.e30.***"):
        value = f"Bearer {tok}"
        res = env.refused(headers=[("Authorization", value)])
        expected = 400 if "*" in tok else 401
        assert res.status_code == expected, tok
    assert_refusal(env.refused("a.b"), 401, invalid_token(msg), msg)
    big = "a" * 9000 + ".b.c"
    assert_refusal(env.refused(big), 401, invalid_token("the token is too large"), "the token is too large")


def test_jku_and_x5u_are_never_fetched(env: Env) -> None:
    listener = FakeIdP()
    try:
        listener.keys = [public_jwk("rsa#2", "evil")]
        claims = env.claims()
        for extra in ({"jku": listener.url + "/jwks"}, {"x5u": listener.url + "/cert.pem"}):
            tok = token("rsa#2", "evil", claims, **extra)
            msg = "no key of the issuer matches the token's kid"
            assert_refusal(env.refused(tok), 401, invalid_token(msg), msg)
        tok = token("rsa#2", "k1", claims, jwk=public_jwk("rsa#2", "k1"))
        msg = "the token's signature is invalid"
        assert_refusal(env.refused(tok), 401, invalid_token(msg), msg)
        assert listener.paths == []
    finally:
        listener.close()


def test_typ_policy(env: Env) -> None:
    env.ok(token("rsa", "k1", env.claims(), typ="JWT"))
    env.ok(token("rsa", "k1", env.claims(), typ="application/at+jwt"))
    msg = "the token's type is not accepted"
    assert_refusal(
        env.refused(token("rsa", "k1", env.claims(), typ="dpop+jwt")), 401, invalid_token(msg), msg
    )


def test_consumer_mapping_and_upstream_claim_headers(make_env: Any) -> None:
    env = make_env(
        routes={
            "api": {
                "consumer_claim": ["preferred_username"],
                "upstream_headers_claims": ["sub", "scope", "groups"],
                "upstream_headers_names": ["X-User", "X-Scopes", "X-Groups"],
            },
            "optional": {"consumer_claim": ["preferred_username"], "consumer_optional": True},
        }
    )
    tok = token("rsa", "k1", env.claims(preferred_username="alice", groups=["a", "b"]))
    seen = env.ok(tok)
    assert seen["x-consumer-username"] == "alice"
    assert seen["x-consumer-custom-id"] == "c-alice"
    assert seen["x-user"] == "alice"
    assert seen["x-scopes"] == "openid patient/*.read"
    assert seen["x-groups"] == "a,b"
    by_custom_id = token("rsa", "k1", env.claims(preferred_username="c-alice"))
    assert env.ok(by_custom_id, headers=[("X-Groups", "admins")]).get("x-groups") is None
    stranger = token("rsa", "k1", env.claims(preferred_username="bob"))
    msg = "the token matches no consumer"
    assert_refusal(env.refused(stranger), 401, invalid_token(msg), msg)
    seen = env.ok(stranger, host="optional")
    assert "x-consumer-username" not in seen
    assert seen["x-credential-identifier"] == "alice"


def test_anonymous_consumer_on_failure(make_env: Any) -> None:
    env = make_env(anonymous="anon")
    seen = env.ok()
    assert seen["x-anonymous-consumer"] == "true"
    assert seen["x-consumer-username"] == "anon"
    assert env.ok(token("rsa", "k1", env.claims()))["x-credential-identifier"] == "alice"


def test_preflight_can_skip_authentication(make_env: Any) -> None:
    env = make_env(run_on_preflight=False)
    before = len(env.upstream.requests)
    assert env.call(method="OPTIONS").status_code == 200
    assert len(env.upstream.requests) == before + 1
    assert env.refused(method="GET").status_code == 401


def test_fhir_clients_get_an_operation_outcome_with_the_same_challenge(env: Env) -> None:
    now = int(time.time())
    tok = token("rsa", "k1", env.claims(exp=now - 10))
    res = env.refused(tok, headers=[("Accept", "application/fhir+json")])
    assert res.status_code == 401
    assert res.headers[WWW] == invalid_token("the token has expired")
    body = res.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == "login"
    assert body["issue"][0]["diagnostics"] == "the token has expired"


def test_issuers_allowed_accepts_aliases_of_the_issuer_only(make_env: Any, idp: FakeIdP) -> None:
    alias = "https://sts.alias.test/tenant/"
    env = make_env(issuers_allowed=[idp.issuer, alias])
    env.ok(token("rsa", "k1", env.claims(iss=alias)))
    env.ok(token("rsa", "k1", env.claims()))
    msg = "the token's issuer is not accepted"
    tok = token("rsa", "k1", env.claims(iss="https://sts.alias.test/other/"))
    assert_refusal(env.refused(tok), 401, invalid_token(msg), msg)


def test_a_reload_keeps_the_jwks_cache_warm_through_an_idp_outage(env: Env) -> None:
    tok = token("rsa", "k1", env.claims())
    env.ok(tok)
    fetches = len(env.idp.paths)
    env.idp.down = True
    # The same configuration reloaded (SIGHUP): new plugin instances, the issuer's keys stay known.
    env.gw.reload(
        {
            "_format_version": "3.0",
            "services": [
                {
                    "name": "fhir",
                    "url": env.upstream.url,
                    "routes": [
                        {
                            "name": "api",
                            "hosts": ["api.test"],
                            "paths": ["/"],
                            "plugins": [
                                {
                                    "name": "openid-connect",
                                    "config": {
                                        "issuer": env.idp.issuer,
                                        "audience_required": [AUDIENCE],
                                        "realm": realm_of("api"),
                                    },
                                }
                            ],
                        }
                    ],
                }
            ],
        }
    )
    env.ok(tok)
    assert len(env.idp.paths) == fetches  # nothing fetched: the warm cache answered
