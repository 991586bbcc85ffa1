"""`jwt` (Kong's plugin): schema, load-time credential validation, and access through a running
gateway — Kong's access spec (`spec/03-plugins/16-jwt/03-access_spec.lua`, list in
kong-anchor.md §1.5) and an attack catalogue. Every refusal asserts the exact status, body and
`WWW-Authenticate`, and that the upstream received nothing."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fhirgate.config import load_config_dict
from fhirgate.errors import ConfigError, GatewayExit
from fhirgate.gateway.plugins.jwt.handler import Handler, validate_jwt_secrets
from fhirgate.gateway.plugins.jwt.schema import JwtConfig
from fhirgate.gateway.plugins.registry import get_plugin_class
from fhirgate.gateway.proxy import GatewayState
from tests.harness import GatewayHandle, Reply, Upstream, running_gateway
from tests.tokens.jwtkit import ALG_KEYS, HS_SECRET, keypair, rsa1024, segment, sign, signing_key

ANON_ID = "7e1b2c4d-0000-4000-8000-00000000a001"
MISSING_ANON_ID = "7e1b2c4d-0000-4000-8000-00000000dead"
SECRET = HS_SECRET.decode()
SECRET_6 = "kid-secret-of-at-least-32-bytes-xx"
SECRET_B64_RAW = b"base64-secret-with-\x00\xff-bytes-inside-32b"
HS384_SECRET = "h" * 48
HS512_SECRET = "i" * 64
WWW = "www-authenticate"
INVALID = 'Bearer error="invalid_token"'
REALM_INVALID = 'Bearer realm="test-jwt", error="invalid_token"'


def asym_key(alg: str, key_name: str) -> str:
    return f"{alg.lower()}-{key_name}-key"


def consumers() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {
            "username": "jwt_tests_consumer",
            "custom_id": "c-1",
            "jwt_secrets": [{"key": "hs-key", "secret": SECRET}],
        },
        {"username": "jwt_tests_consumer_6", "jwt_secrets": [{"key": "kid-key", "secret": SECRET_6}]},
        {
            "username": "jwt_tests_base64_consumer",
            "jwt_secrets": [{"key": "b64-key", "secret": base64.b64encode(SECRET_B64_RAW).decode()}],
        },
        {
            "username": "hs384",
            "jwt_secrets": [{"key": "hs384-key", "algorithm": "HS384", "secret": HS384_SECRET}],
        },
        {
            "username": "hs512",
            "jwt_secrets": [{"key": "hs512-key", "algorithm": "HS512", "secret": HS512_SECRET}],
        },
        {"username": "no-secret", "jwt_secrets": [{"key": "no-secret-key"}]},
        {"id": ANON_ID, "username": "no-body"},
    ]
    for alg, key_name in ALG_KEYS:
        if key_name == "hs":
            continue
        out.append(
            {
                "username": f"{alg}-{key_name}",
                "jwt_secrets": [
                    {
                        "key": asym_key(alg, key_name),
                        "algorithm": alg,
                        "rsa_public_key": keypair(key_name).public_pem,
                    }
                ],
            }
        )
    return out


ROUTES: dict[str, dict[str, Any]] = {
    "jwt1": {},
    "jwt2": {"uri_param_names": ["token", "jwt"]},
    "jwt3": {"claims_to_verify": ["nbf", "exp"]},
    "jwt4": {"key_claim_name": "aud"},
    "jwt5": {"secret_is_base64": True},
    "jwt6": {"anonymous": ANON_ID},
    "jwt7": {"anonymous": MISSING_ANON_ID},
    "jwt8": {"run_on_preflight": False},
    "jwt9": {"cookie_names": ["silly", "crumble"], "realm": "test-jwt"},
    "jwt10": {"key_claim_name": "kid"},
    "jwt11": {"claims_to_verify": ["nbf", "exp"], "maximum_expiration": 300},
    "jwt12": {"header_names": ["CustomAuthorization"]},
    "jwt13": {"anonymous": "no-body"},
    "jwt14": {"realm": "test-jwt"},
}


def gateway_config(upstream_url: str) -> dict[str, Any]:
    routes = [
        {
            "name": host,
            "hosts": [f"{host}.test"],
            "paths": ["/"],
            "plugins": [{"name": "jwt", "config": conf}],
        }
        for host, conf in ROUTES.items()
    ]
    return {
        "_format_version": "3.0",
        "services": [{"name": "s1", "url": upstream_url, "routes": routes}],
        "consumers": consumers(),
    }


@pytest.fixture(scope="module")
def upstream_m() -> Iterator[Upstream]:
    up = Upstream()
    up.handler = lambda req: Reply(
        body=json.dumps({"headers": dict(req.headers), "path": req.target}).encode()
    )
    try:
        yield up
    finally:
        up.close()


@pytest.fixture(scope="module")
def gw(upstream_m: Upstream) -> Iterator[GatewayHandle]:
    with running_gateway(gateway_config(upstream_m.url)) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(gw: GatewayHandle) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        yield c


class Api:
    """Requests through the gateway, asserting whether the upstream saw them."""

    def __init__(self, client: httpx.Client, upstream: Upstream) -> None:
        self.client = client
        self.upstream = upstream

    def call(
        self,
        host: str,
        token: str | None = None,
        *,
        method: str = "GET",
        path: str = "/request",
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        h = {"Host": f"{host}.test", **(headers or {})}
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        return self.client.request(method, path, headers=h)

    def refused(self, host: str, token: str | None = None, **kw: Any) -> httpx.Response:
        before = len(self.upstream.requests)
        res = self.call(host, token, **kw)
        assert len(self.upstream.requests) == before, "the upstream must see nothing"
        return res

    def ok(self, host: str, token: str | None = None, **kw: Any) -> dict[str, str]:
        before = len(self.upstream.requests)
        res = self.call(host, token, **kw)
        assert res.status_code == 200, res.text
        assert len(self.upstream.requests) == before + 1
        headers: dict[str, str] = res.json()["headers"]
        return headers


@pytest.fixture
def api(client: httpx.Client, upstream_m: Upstream) -> Api:
    return Api(client, upstream_m)


def payload(**claims: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"nbf": now, "iat": now, "exp": now + 3600, **claims}


def assert_refusal(res: httpx.Response, body: Any, www: str | None = INVALID, status: int = 401) -> None:
    assert res.status_code == status, res.text
    assert res.json() == body
    assert res.headers.get(WWW) == www
    assert res.headers["content-type"].startswith("application/json")


# --- schema ----------------------------------------------------------------------------------


def _issues(config: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_config_dict({"_format_version": "3.0", "plugins": [{"name": "jwt", "config": config}]})
    return [(i.location, i.message) for i in info.value.issues]


def test_defaults_are_kongs() -> None:
    conf = load_config_dict({"_format_version": "3.0", "plugins": [{"name": "jwt"}]}).plugins[0].config
    assert isinstance(conf, JwtConfig)
    assert conf.uri_param_names == ["jwt"]
    assert conf.cookie_names == []
    assert conf.header_names == ["authorization"]
    assert conf.key_claim_name == "iss"
    assert conf.secret_is_base64 is False
    assert conf.claims_to_verify is None
    assert conf.maximum_expiration == 0
    assert conf.anonymous is None
    assert conf.run_on_preflight is True
    assert conf.realm is None
    assert Handler.priority == 1450
    assert Handler.no_consumer is True
    assert get_plugin_class("jwt") is Handler


def test_valid_maximum_expiration() -> None:
    cfg = {"maximum_expiration": 60, "claims_to_verify": ["exp"]}
    conf = load_config_dict({"_format_version": "3.0", "plugins": [{"name": "jwt", "config": cfg}]})
    assert conf.plugins[0].config.maximum_expiration == 60  # type: ignore[attr-defined]


def test_negative_maximum_expiration_is_refused() -> None:
    assert _issues({"maximum_expiration": -1}) == [
        ("plugins[0].config.maximum_expiration", "value should be between 0 and 31536000")
    ]
    assert _issues({"maximum_expiration": 31536001, "claims_to_verify": ["exp"]})[0][1] == (
        "value should be between 0 and 31536000"
    )


def test_maximum_expiration_requires_exp_in_claims_to_verify() -> None:
    assert _issues({"maximum_expiration": 60, "claims_to_verify": ["nbf"]}) == [
        ("plugins[0].config.claims_to_verify", "expected to contain: exp")
    ]


def test_claims_to_verify_is_exp_or_nbf() -> None:
    assert _issues({"claims_to_verify": ["iat"]})[0][0] == "plugins[0].config.claims_to_verify[0]"


def test_sets_collapse_duplicates() -> None:
    cfg = {"uri_param_names": ["jwt", "jwt", "t"], "claims_to_verify": ["exp", "exp"]}
    conf = load_config_dict({"_format_version": "3.0", "plugins": [{"name": "jwt", "config": cfg}]})
    assert conf.plugins[0].config.uri_param_names == ["jwt", "t"]  # type: ignore[attr-defined]
    assert conf.plugins[0].config.claims_to_verify == ["exp"]  # type: ignore[attr-defined]


def test_realm_cannot_break_the_header() -> None:
    assert _issues({"realm": 'a"b'})[0][0] == "plugins[0].config.realm"


def test_unknown_field_is_refused() -> None:
    assert _issues({"nope": 1}) == [("plugins[0].config.nope", "unknown field")]


# --- credentials validated at load time -------------------------------------------------------


def _secret_issues(secrets: list[dict[str, Any]]) -> list[tuple[str, str]]:
    cfg = load_config_dict(
        {"_format_version": "3.0", "consumers": [{"username": "alice", "jwt_secrets": secrets}]}
    )
    return [(i.location, i.message) for i in validate_jwt_secrets(cfg.consumers)]


@pytest.mark.parametrize("alg", ["RS256", "PS384", "ES256", "ES512", "EdDSA"])
def test_public_key_algorithms_need_a_public_key(alg: str) -> None:
    assert _secret_issues([{"key": "a-key", "algorithm": alg}]) == [
        (
            "consumers[0].jwt_secrets[0].rsa_public_key",
            f"consumer 'alice', credential 'a-key': required field missing "
            f"(algorithm {alg} needs a PEM public key)",
        )
    ]


def test_unparseable_or_mismatched_public_keys_are_refused() -> None:
    issues = _secret_issues(
        [
            {
                "key": "k1",
                "algorithm": "RS256",
                "rsa_public_key": "-----BEGIN PUBLIC KEY-----\nxx\n-----END PUBLIC KEY-----",
            },
            {"key": "k2", "algorithm": "ES256", "rsa_public_key": keypair("rsa").public_pem},
            {"key": "k3", "algorithm": "ES256", "rsa_public_key": keypair("p384").public_pem},
            {"key": "k4", "algorithm": "RS256", "rsa_public_key": rsa1024().public_pem},
            {"key": "k5", "algorithm": "EdDSA", "rsa_public_key": keypair("ed448").public_pem},
        ]
    )
    assert [loc for loc, _ in issues] == [f"consumers[0].jwt_secrets[{j}].rsa_public_key" for j in range(4)]
    assert issues[0][1].startswith(
        "consumer 'alice', credential 'k1': invalid key for RS256: not a PEM public key"
    )
    assert "cannot verify ES256" in issues[1][1]
    assert "cannot verify ES256" in issues[2][1]
    assert "1024 bits" in issues[3][1]


def test_unknown_algorithm_and_duplicate_keys_are_refused() -> None:
    issues = _secret_issues(
        [
            {"key": "k1", "algorithm": "none", "secret": "s"},
            {"key": "k2", "algorithm": "HS256", "secret": SECRET},
            {"key": "k2", "algorithm": "HS256", "secret": SECRET},
            {"key": "k3", "secret": keypair("rsa").public_pem},
        ]
    )
    assert issues[0] == (
        "consumers[0].jwt_secrets[0].algorithm",
        "consumer 'alice', credential 'k1': expected one of: HS256, HS384, HS512, RS256, RS384, RS512, "
        "ES256, ES384, ES512, PS256, PS384, PS512, EdDSA",
    )
    assert issues[1][0] == "consumers[0].jwt_secrets[2].key"
    assert "duplicate key (first at consumers[0].jwt_secrets[1])" in issues[1][1]
    assert issues[2][0] == "consumers[0].jwt_secrets[3].secret"
    assert "public key" in issues[2][1]


def _bad_es256_config() -> dict[str, Any]:
    return {
        "_format_version": "3.0",
        "consumers": [{"username": "alice", "jwt_secrets": [{"key": "k", "algorithm": "ES256"}]}],
        "plugins": [{"name": "jwt"}],
    }


def test_a_bad_credential_stops_the_configuration_from_being_compiled() -> None:
    with pytest.raises(ConfigError) as info:
        GatewayState(load_config_dict(_bad_es256_config()))
    assert info.value.issues[0].location == "consumers[0].jwt_secrets[0].rsa_public_key"


def test_a_bad_credential_fails_load_config_dict() -> None:
    with pytest.raises(ConfigError) as err:
        load_config_dict(_bad_es256_config())
    assert "jwt_secrets" in str(err.value)


# --- refusals (Kong's access spec) ------------------------------------------------------------


def test_401_without_a_token(api: Api) -> None:
    assert_refusal(api.refused("jwt1"), {"message": "Unauthorized"}, "Bearer")


def test_401_without_a_token_with_realm(api: Api) -> None:
    assert_refusal(api.refused("jwt14"), {"message": "Unauthorized"}, 'Bearer realm="test-jwt"')


def test_401_no_key_claim(api: Api) -> None:
    res = api.refused("jwt1", sign(payload(), key=b"foo"))
    assert_refusal(res, {"message": "No mandatory 'iss' in claims"})


def test_401_empty_key_claim(api: Api) -> None:
    res = api.refused("jwt1", sign(payload(iss=""), key=b"foo"))
    assert_refusal(res, {"message": "Invalid 'iss' in claims"})


@pytest.mark.parametrize("value", [123, ["hs-key"], {"k": 1}, True])
def test_401_non_string_key_claim(api: Api, value: Any) -> None:
    res = api.refused("jwt1", sign(payload(iss=value), key=b"foo"))
    assert_refusal(res, {"message": "Invalid 'iss' in claims"})


def test_401_unknown_iss(api: Api) -> None:
    res = api.refused("jwt1", sign(payload(iss="123456789")))
    assert_refusal(res, {"message": "No credentials found for given 'iss'"})


def test_messages_follow_key_claim_name(api: Api) -> None:
    assert_refusal(
        api.refused("jwt4", sign(payload(), key=b"foo")), {"message": "No mandatory 'aud' in claims"}
    )
    assert_refusal(
        api.refused("jwt4", sign(payload(aud="nobody"))), {"message": "No credentials found for given 'aud'"}
    )


def test_401_invalid_signature(api: Api) -> None:
    res = api.refused("jwt1", sign(payload(iss="hs-key"), key=b"foo"))
    assert_refusal(res, {"message": "Invalid signature"})


def test_401_alg_does_not_match_the_credential(api: Api) -> None:
    token = sign(payload(iss="hs-key"), "HS256", HS_SECRET, header={"typ": "JWT", "alg": "RS256"})
    assert_refusal(api.refused("jwt1", token), {"message": "Invalid algorithm"})


def test_401_credential_without_secret(api: Api) -> None:
    token = sign(payload(iss="no-secret-key"), key=b"anything")
    assert_refusal(api.refused("jwt1", token), {"message": "Invalid key/secret"})


def test_options_passes_when_run_on_preflight_is_false(api: Api) -> None:
    api.ok("jwt8", method="OPTIONS")


def test_options_is_authenticated_when_run_on_preflight_is_true(api: Api) -> None:
    res = api.refused("jwt1", method="OPTIONS")
    assert res.status_code == 401
    assert res.content == b'{"message":"Unauthorized"}'


def test_401_beyond_maximum_expiration(api: Api) -> None:
    now = int(time.time())
    token = sign({"iss": "hs-key", "exp": now + 3600, "nbf": now - 30})
    res = api.refused("jwt11", path=f"/request/?jwt={token}")
    assert res.status_code == 401
    assert res.content == b'{"exp":"exceeds maximum allowed expiration"}'
    assert res.headers[WWW] == INVALID


def test_200_within_maximum_expiration(api: Api) -> None:
    now = int(time.time())
    api.ok("jwt11", path=f"/request/?jwt={sign({'iss': 'hs-key', 'exp': now + 270, 'nbf': now - 30})}")


def test_401_multiple_different_tokens(api: Api) -> None:
    t1, t2 = sign(payload(iss="hs-key")), sign(payload(iss="hs-key", sub="x"))
    res = api.refused("jwt1", t1, path=f"/request?jwt={t2}")
    assert_refusal(res, {"message": "Multiple tokens provided"})
    res = api.refused("jwt2", path=f"/request?jwt={t1}&token={t2}")
    assert_refusal(res, {"message": "Multiple tokens provided"})
    res = api.refused("jwt1", path=f"/request?jwt={t1}&jwt={t2}")
    assert_refusal(res, {"message": "Multiple tokens provided"})


def test_the_same_token_twice_collapses(api: Api) -> None:
    token = sign(payload(iss="hs-key"))
    api.ok("jwt1", token, path=f"/request?jwt={token}&jwt={token}&jwt=")


# --- HS256 and token locations ----------------------------------------------------------------


def test_proxies_with_consumer_headers(api: Api) -> None:
    token = sign(payload(iss="hs-key"))
    headers = api.ok(
        "jwt1",
        token,
        headers={
            "X-Consumer-Username": "forged",
            "X-Anonymous-Consumer": "true",
            "X-Credential-Identifier": "f",
        },
    )
    assert headers["authorization"] == f"Bearer {token}"
    assert headers["x-consumer-username"] == "jwt_tests_consumer"
    assert headers["x-consumer-custom-id"] == "c-1"
    assert headers["x-credential-identifier"] == "hs-key"
    assert headers["x-consumer-id"]
    assert "x-anonymous-consumer" not in headers


def test_bearer_scheme_is_case_insensitive(api: Api) -> None:
    token = sign(payload(iss="hs-key"))
    for scheme in ("bearer", "BEARER", "BeArEr"):
        api.ok("jwt1", headers={"Authorization": f"{scheme}  {token}"})


def test_other_schemes_are_no_token(api: Api) -> None:
    token = sign(payload(iss="hs-key"))
    for value in (f"Basic {token}", token, f"Bearer{token}", "Bearer", f"Token Bearer {token}"):
        assert_refusal(
            api.refused("jwt1", headers={"Authorization": value}), {"message": "Unauthorized"}, "Bearer"
        )


def test_key_in_jose_header_kid(api: Api) -> None:
    token = sign(payload(), key=SECRET_6.encode(), header={"typ": "JWT", "alg": "HS256", "kid": "kid-key"})
    assert api.ok("jwt10", token)["x-consumer-username"] == "jwt_tests_consumer_6"


def test_key_in_another_claim(api: Api) -> None:
    headers = api.ok("jwt4", sign(payload(aud="hs-key")))
    assert headers["x-consumer-username"] == "jwt_tests_consumer"
    assert headers["x-credential-identifier"] == "hs-key"


def test_base64_secret(api: Api) -> None:
    token = sign(payload(iss="b64-key"), key=SECRET_B64_RAW)
    assert api.ok("jwt5", token)["x-consumer-username"] == "jwt_tests_base64_consumer"
    # the same credential without secret_is_base64 uses the encoded text as the secret
    assert_refusal(api.refused("jwt1", token), {"message": "Invalid signature"})


@pytest.mark.parametrize("cookie", ["crumble", "silly"])
def test_token_in_cookie(api: Api, cookie: str) -> None:
    token = sign(payload(iss="hs-key"))
    api.ok("jwt9", headers={"Cookie": f"{cookie}={token}; path=/;domain=.jwt9.test"})


def test_cookie_with_unknown_iss(api: Api) -> None:
    token = sign(payload(iss="incorrect-issuer"))
    res = api.refused("jwt9", headers={"Cookie": f"crumble={token}; path=/;domain=.jwt9.test"})
    assert_refusal(res, {"message": "No credentials found for given 'iss'"}, REALM_INVALID)


def test_corrupted_cookie_token(api: Api) -> None:
    token = sign(payload(iss="hs-key"))
    res = api.refused("jwt9", headers={"Cookie": f"crumble={token[:-10]}x.y; path=/"})
    assert res.status_code == 401
    corrupted = "crumble=" + token.replace(".", "", 1)[:40] + ".x.y"
    res = api.refused("jwt9", headers={"Cookie": corrupted})
    assert_refusal(res, {"message": "Bad token; invalid JSON"}, REALM_INVALID)


def test_authorization_header_still_works_when_cookies_are_configured(api: Api) -> None:
    api.ok("jwt9", sign(payload(iss="hs-key")))


def test_neither_cookie_nor_header(api: Api) -> None:
    assert_refusal(api.refused("jwt9"), {"message": "Unauthorized"}, 'Bearer realm="test-jwt"')


def test_custom_header(api: Api) -> None:
    token = sign(payload(iss="hs-key"))
    api.ok("jwt12", headers={"CustomAuthorization": f"Bearer {token}"})
    assert_refusal(api.refused("jwt12", token), {"message": "Unauthorized"}, "Bearer")


def test_first_occurrence_of_a_repeated_header_is_used(api: Api) -> None:
    good, bad = sign(payload(iss="hs-key")), sign(payload(iss="hs-key"), key=b"wrong")
    before = len(api.upstream.requests)
    res = api.client.get(
        "/request",
        headers=[
            ("Host", "jwt12.test"),
            ("CustomAuthorization", f"Bearer {good}"),
            ("CustomAuthorization", f"Bearer {bad}"),
        ],
    )
    assert res.status_code == 200
    assert len(api.upstream.requests) == before + 1
    res = api.client.get(
        "/request",
        headers=[
            ("Host", "jwt12.test"),
            ("CustomAuthorization", f"Bearer {bad}"),
            ("CustomAuthorization", f"Bearer {good}"),
        ],
    )
    assert_refusal(res, {"message": "Invalid signature"})


def test_token_in_query(api: Api) -> None:
    api.ok("jwt1", path=f"/request/?jwt={sign(payload(iss='hs-key'))}")


def test_token_in_custom_query_param(api: Api) -> None:
    api.ok("jwt2", path=f"/request/?token={sign(payload(iss='hs-key'))}")


class _Namespace:
    def __init__(self, **attrs: Any) -> None:
        self.__dict__.update(attrs)


def _fake_kong(authorization: str) -> tuple[Any, dict[str, Any], dict[str, str | None]]:
    """The PDK surface the handler uses, recording what it does (for `kong.ctx.shared`)."""
    shared: dict[str, Any] = {}
    upstream_headers: dict[str, str | None] = {}
    state: dict[str, Any] = {"consumer": None, "credential": None}

    def authenticate(consumer: Any, credential: Any) -> None:
        state.update(consumer=consumer, credential=credential)

    def exit_(status: int, body: Any = None, headers: Any = None, fhir_code: Any = None) -> None:
        raise GatewayExit(status, body, dict(headers or {}))

    kong = _Namespace(
        request=_Namespace(
            get_method=lambda: "GET",
            get_raw_query=lambda: "",
            get_header=lambda name: authorization if name.lower() == "authorization" else None,
            get_headers=lambda: {},
        ),
        client=_Namespace(get_credential=lambda: state["credential"], authenticate=authenticate),
        service=_Namespace(
            request=_Namespace(
                set_header=upstream_headers.__setitem__,
                clear_header=lambda name: upstream_headers.__setitem__(name, None),
            )
        ),
        response=_Namespace(exit=exit_),
        ctx=_Namespace(shared=shared),
    )
    return kong, shared, upstream_headers


def test_token_is_shared_with_later_plugins_only_on_success() -> None:
    cfg = load_config_dict(
        {
            "_format_version": "3.0",
            "consumers": [{"username": "u", "jwt_secrets": [{"key": "hs-key", "secret": SECRET}]}],
            "plugins": [{"name": "jwt"}],
        }
    )
    handler = Handler(cfg.plugins[0].config, "p1")  # type: ignore[arg-type]
    handler.bind_config(cfg)
    token = sign(payload(iss="hs-key"))
    kong, shared, headers = _fake_kong(f"Bearer {token}")
    handler.access(kong)
    assert shared == {"authenticated_jwt_token": token}
    assert headers["X-Credential-Identifier"] == "hs-key"
    kong, shared, _ = _fake_kong(f"Bearer {sign(payload(iss='hs-key'), key=b'wrong')}")
    with pytest.raises(GatewayExit):
        handler.access(kong)
    assert shared == {}


# --- every algorithm --------------------------------------------------------------------------


@pytest.mark.parametrize(("alg", "key_name"), [(a, k) for a, k in ALG_KEYS if k != "hs"])
def test_verifies_and_identifies_the_consumer(api: Api, alg: str, key_name: str) -> None:
    token = sign(payload(iss=asym_key(alg, key_name)), alg, signing_key(key_name))
    headers = api.ok("jwt1", token)
    assert headers["x-consumer-username"] == f"{alg}-{key_name}"
    assert headers["x-credential-identifier"] == asym_key(alg, key_name)


@pytest.mark.parametrize(
    ("alg", "key", "secret"), [("HS384", "hs384-key", HS384_SECRET), ("HS512", "hs512-key", HS512_SECRET)]
)
def test_hs384_hs512(api: Api, alg: str, key: str, secret: str) -> None:
    headers = api.ok("jwt1", sign(payload(iss=key), alg, secret.encode()))
    assert headers["x-consumer-username"] == alg.lower()


def test_rs256_ignores_secret_is_base64(api: Api) -> None:
    token = sign(payload(iss=asym_key("RS256", "rsa")), "RS256", signing_key("rsa"))
    api.ok("jwt5", token)


@pytest.mark.parametrize(("alg", "key_name"), [(a, k) for a, k in ALG_KEYS if k != "hs"])
def test_wrong_key_of_each_algorithm(api: Api, alg: str, key_name: str) -> None:
    token = sign(payload(iss=asym_key(alg, key_name)), alg, signing_key(key_name + "#2"))
    assert_refusal(api.refused("jwt1", token), {"message": "Invalid signature"})


# --- claims -----------------------------------------------------------------------------------


def test_checked_claims_must_be_present(api: Api) -> None:
    res = api.refused("jwt3", sign({"iss": "hs-key"}))
    assert_refusal(res, {"nbf": "must be a number", "exp": "must be a number"})


def test_checked_claims_must_be_numbers(api: Api) -> None:
    res = api.refused("jwt3", sign({"iss": "hs-key", "exp": "soon", "nbf": True}))
    assert_refusal(res, {"nbf": "must be a number", "exp": "must be a number"})


def test_expired(api: Api) -> None:
    res = api.refused("jwt3", sign(payload(iss="hs-key", exp=int(time.time()) - 1)))
    assert_refusal(res, {"exp": "token expired"})


def test_not_yet_valid(api: Api) -> None:
    res = api.refused("jwt3", sign(payload(iss="hs-key", nbf=int(time.time()) + 60)))
    assert_refusal(res, {"nbf": "token not valid yet"})


def test_unchecked_claims_are_ignored_as_in_kong(api: Api) -> None:
    api.ok("jwt1", sign({"iss": "hs-key", "exp": 1, "nbf": 9_999_999_999}))


# --- anonymous ---------------------------------------------------------------------------------


def test_anonymous_with_valid_credentials_is_the_real_consumer(api: Api) -> None:
    headers = api.ok("jwt6", sign(payload(iss="hs-key")))
    assert headers["x-consumer-username"] == "jwt_tests_consumer"
    assert "x-anonymous-consumer" not in headers


@pytest.mark.parametrize("host", ["jwt6", "jwt13"])
def test_anonymous_without_credentials(api: Api, host: str) -> None:
    for token in (None, sign(payload(iss="hs-key"), key=b"wrong"), "garbage"):
        headers = api.ok(host, token, headers={"X-Credential-Identifier": "forged"})
        assert headers["x-anonymous-consumer"] == "true"
        assert headers["x-consumer-username"] == "no-body"
        assert headers["x-consumer-id"] == ANON_ID
        assert "x-credential-identifier" not in headers


def test_500_when_the_anonymous_consumer_does_not_exist(api: Api) -> None:
    res = api.refused("jwt7")
    assert res.status_code == 500
    assert res.json()["message"] == f"anonymous consumer {MISSING_ANON_ID} is configured but doesn't exist"


# --- attack catalogue ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trap() -> Iterator[Upstream]:
    """A listener that records whether anyone fetched a key from it."""
    up = Upstream()
    try:
        yield up
    finally:
        up.close()


def test_alg_none(api: Api) -> None:
    claims = segment(payload(iss="hs-key"))
    for alg in ("none", "None", "NONE", "nOnE"):
        res = api.refused("jwt1", f"{segment({'alg': alg, 'typ': 'JWT'})}.{claims}.")
        assert_refusal(res, {"message": "Bad token; invalid alg"})
    signed = sign(payload(iss="hs-key"))
    res = api.refused("jwt1", f"{segment({'alg': 'none'})}.{signed.split('.')[1]}.{signed.split('.')[2]}")
    assert_refusal(res, {"message": "Bad token; invalid alg"})


def test_alg_confusion_hs256_signed_with_the_rsa_public_key(api: Api) -> None:
    pem = keypair("rsa").public_pem.encode()
    token = sign(payload(iss=asym_key("RS256", "rsa")), "HS256", pem)
    assert_refusal(api.refused("jwt1", token), {"message": "Invalid algorithm"})
    forged_header = sign(payload(iss=asym_key("RS256", "rsa")), "HS256", pem, header={"alg": "RS256"})
    assert_refusal(api.refused("jwt1", forged_header), {"message": "Invalid signature"})


def test_key_headers_are_never_fetched(api: Api, trap: Upstream) -> None:
    attacker = signing_key("rsa#2")
    attacker_pem = keypair("rsa#2").public_pem
    for extra in (
        {"jku": f"{trap.url}/jwks.json"},
        {"x5u": f"{trap.url}/cert.pem"},
        {"jwk": {"kty": "RSA", "n": "AQAB", "e": "AQAB"}},
        {"x5c": [attacker_pem.replace("\n", "")]},
        {"jku": f"{trap.url}/jwks.json", "kid": asym_key("RS256", "rsa")},
    ):
        header = {"alg": "RS256", "typ": "JWT", **extra}
        token = sign(payload(iss=asym_key("RS256", "rsa")), "RS256", attacker, header=header)
        assert_refusal(api.refused("jwt1", token), {"message": "Invalid signature"})
    assert trap.requests == []
    assert trap.connections == 0


@pytest.mark.parametrize(
    "kid",
    [
        "../../etc/passwd",
        "' OR '1'='1",
        "hs-key\x00",
        "kid-key/../hs-key",
        "*",
        "kid-key ",
        "KID-KEY",
        "%6bid-key",
    ],
)
def test_kid_injection_strings_are_opaque(api: Api, kid: str) -> None:
    token = sign(payload(), key=SECRET_6.encode(), header={"alg": "HS256", "kid": kid})
    assert_refusal(api.refused("jwt10", token), {"message": "No credentials found for given 'kid'"})


def test_tampered_payload(api: Api) -> None:
    h, _, s = sign(payload(iss="hs-key", sub="alice")).split(".")
    forged = f"{h}.{segment(payload(iss='hs-key', sub='admin'))}.{s}"
    assert_refusal(api.refused("jwt1", forged), {"message": "Invalid signature"})


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda t: t.rsplit(".", 1)[0], "Bad token; invalid JSON"),
        (lambda t: t.split(".")[0], "Bad token; invalid JSON"),
        (lambda t: "***." + t.split(".", 1)[1], "Bad token; invalid JSON"),
        (lambda t: t.split(".")[0] + ".%%%." + t.split(".")[2], "Bad token; invalid JSON"),
        (lambda t: t.rsplit(".", 1)[0] + ".@@@", "Bad token; invalid signature"),
        (lambda t: t + ".extra", "Bad token; invalid signature"),
        (lambda t: t.rsplit(".", 1)[0] + ".", "Invalid signature"),
        (
            lambda t: f"{segment({'alg': 'HS256'})}.{segment(None)}.{t.split('.')[2]}",
            "Bad token; invalid claims",
        ),
        (
            lambda t: f"{segment({'alg': 'HS256', 'crit': ['x']})}.{t.split('.')[1]}.{t.split('.')[2]}",
            "Bad token; invalid alg",
        ),
    ],
)
def test_malformed_tokens_are_401_never_500(api: Api, mangle: Any, message: str) -> None:
    token = mangle(sign(payload(iss="hs-key")))
    assert_refusal(api.refused("jwt1", token), {"message": message})


def test_malformed_asymmetric_signatures_are_401(api: Api) -> None:
    for alg, key_name in (("ES256", "p256"), ("PS256", "rsa"), ("EdDSA", "ed25519")):
        h, p, _ = sign(payload(iss=asym_key(alg, key_name)), alg, signing_key(key_name)).split(".")
        for sig in ("", "AAAA", "A" * 400):
            assert_refusal(api.refused("jwt1", f"{h}.{p}.{sig}"), {"message": "Invalid signature"})


def test_oversize_token(api: Api) -> None:
    token = sign(payload(iss="hs-key", pad="x" * 9000))
    res = api.refused("jwt1", token)
    assert res.status_code in (401, 431)
    if res.status_code == 401:
        assert_refusal(res, {"message": "Bad token; invalid JSON"})


# --- logical AND / OR with key-auth -------------------------------------------------------------

needs_key_auth = pytest.mark.skipif(
    get_plugin_class("key-auth") is None, reason="key-auth not registered yet"
)


def _multi_auth_config(upstream_url: str) -> dict[str, Any]:
    return {
        "_format_version": "3.0",
        "services": [
            {
                "name": "s1",
                "url": upstream_url,
                "routes": [
                    {
                        "name": "and",
                        "hosts": ["and.test"],
                        "plugins": [{"name": "jwt"}, {"name": "key-auth"}],
                    },
                    {
                        "name": "or",
                        "hosts": ["or.test"],
                        "plugins": [
                            {"name": "jwt", "config": {"anonymous": ANON_ID}},
                            {"name": "key-auth", "config": {"anonymous": ANON_ID}},
                        ],
                    },
                ],
            }
        ],
        "consumers": [
            {"username": "jwt-user", "jwt_secrets": [{"key": "hs-key", "secret": SECRET}]},
            {"username": "key-user", "keyauth_credentials": [{"key": "mouse"}]},
            {"id": ANON_ID, "username": "no-body"},
        ],
    }


@pytest.fixture(scope="module")
def multi(upstream_m: Upstream) -> Iterator[Api]:
    with (
        running_gateway(_multi_auth_config(upstream_m.url)) as handle,
        httpx.Client(base_url=handle.url) as c,
    ):
        yield Api(c, upstream_m)


@needs_key_auth
def test_logical_and(multi: Api) -> None:
    token = sign(payload(iss="hs-key"))
    multi.ok("and", token, headers={"apikey": "mouse"})
    assert_refusal(multi.refused("and", headers={"apikey": "mouse"}), {"message": "Unauthorized"}, "Bearer")
    res = multi.refused("and", token)
    assert res.status_code == 401
    assert res.headers[WWW] == "Key"
    assert_refusal(multi.refused("and"), {"message": "Unauthorized"}, "Bearer")


@needs_key_auth
def test_logical_or(multi: Api) -> None:
    token = sign(payload(iss="hs-key"))
    both = multi.ok("or", token, headers={"apikey": "mouse"})
    assert both["x-consumer-username"] == "jwt-user"
    assert "x-anonymous-consumer" not in both
    only_jwt = multi.ok("or", token)
    assert only_jwt["x-consumer-username"] == "jwt-user"
    assert "x-anonymous-consumer" not in only_jwt
    only_key = multi.ok("or", headers={"apikey": "mouse"})
    assert only_key["x-consumer-username"] == "key-user"
    assert "x-anonymous-consumer" not in only_key
    none = multi.ok("or")
    assert none["x-anonymous-consumer"] == "true"
    assert none["x-consumer-username"] == "no-body"
