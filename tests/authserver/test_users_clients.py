"""Users and OAuth clients in the auth store, against SQLite and PostgreSQL: password hashing and
verification, RFC 7591 metadata rules (each bad input with its exact error), client secrets."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from joserfc.jwk import ECKey, RSAKey

from fhirgate.authserver.clients import ClientMetadataError, Clients, UnknownClientError, validate_metadata
from fhirgate.authserver.store import AuthStore
from fhirgate.authserver.users import (
    DuplicateUserError,
    InvalidUserError,
    UnknownUserError,
    Users,
    check_password,
    hash_password,
)
from tests.fhirserver.harness import BACKENDS, database


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database(request.param, tmp_path) as url:
        yield url


def _ec_public(crv: str = "P-384") -> dict[str, Any]:
    return ECKey.generate_key(crv, private=True, auto_kid=True).as_dict(private=False)


EC384 = _ec_public()
EC_PRIVATE = ECKey.generate_key("P-256", private=True, auto_kid=True).as_dict(private=True)
RSA_PUBLIC = RSAKey.generate_key(2048, private=True, auto_kid=True).as_dict(private=False)


# ---- users --------------------------------------------------------------------------------------


def test_users_create_get_list_verify_delete(db_url: str) -> None:
    async def run() -> None:
        store = await AuthStore.open(db_url)
        users = Users(store)
        alice = await users.create("alice", "correct horse", "Patient/123")
        await users.create("bob", "correct horse", "Practitioner/9")
        await users.create("carol", "another one")
        assert (alice.username, alice.fhir_user) == ("alice", "Patient/123")
        assert await users.get("alice") == alice
        assert await users.get("nobody") is None
        assert [(u.username, u.fhir_user) for u in await users.list()] == [
            ("alice", "Patient/123"),
            ("bob", "Practitioner/9"),
            ("carol", None),
        ]
        with pytest.raises(DuplicateUserError, match=r"^user 'alice' already exists$"):
            await users.create("alice", "other password")

        assert await users.verify_password("alice", "correct horse") == alice
        assert await users.verify_password("alice", "correct horse ") is None
        assert await users.verify_password("alice", "Correct horse") is None
        assert await users.verify_password("alice", "") is None
        assert await users.verify_password("nobody", "correct horse") is None

        # the stored hash: not the password, scrypt with the production parameters, salted
        async with store.read() as s:
            rows = dict(await s.conn.fetch("SELECT username, password_hash FROM auth_user"))
        assert "correct horse" not in rows["alice"]
        assert rows["alice"].startswith("scrypt$16384$8$1$")
        assert rows["alice"] != rows["bob"]  # same password, different salt
        assert rows["alice"].split("$")[4] != rows["bob"].split("$")[4]

        await users.delete("bob")
        with pytest.raises(UnknownUserError, match=r"^no user 'bob'$"):
            await users.delete("bob")
        assert await users.verify_password("bob", "correct horse") is None
        assert [u.username for u in await users.list()] == ["alice", "carol"]
        await store.close()

    asyncio.run(run())


@pytest.mark.parametrize(
    ("username", "fhir_user", "password", "message"),
    [
        ("", None, "pw", "invalid username '': 1 to 128 characters from A-Z a-z 0-9 and . _ @ + -"),
        ("a b", None, "pw", "invalid username 'a b': "),
        ("x" * 129, None, "pw", "invalid username "),
        ("ok", "Patient/123", "", "the password is empty"),
        ("ok", "Observation/1", "pw", "invalid fhir_user 'Observation/1': expected Patient/ID"),
        ("ok", "Patient/", "pw", "invalid fhir_user 'Patient/': "),
        ("ok", "Patient/12 3", "pw", "invalid fhir_user 'Patient/12 3': "),
        ("ok", "Patient/123\n", "pw", "invalid fhir_user 'Patient/123\\n': "),
        ("ok", "Patient/" + "1" * 65, "pw", "invalid fhir_user "),
        ("ok", "patient/1", "pw", "invalid fhir_user 'patient/1': "),
    ],
)
def test_bad_users_are_refused(
    tmp_path: Path, username: str, fhir_user: str | None, password: str, message: str
) -> None:
    async def run() -> None:
        store = await AuthStore.open(f"sqlite:///{tmp_path / 'auth.db'}")
        with pytest.raises(InvalidUserError) as caught:
            await Users(store).create(username, password, fhir_user)
        assert str(caught.value).startswith(message)
        assert await Users(store).list() == []
        await store.close()

    asyncio.run(run())


@pytest.mark.parametrize(
    "fhir_user",
    ["Patient/123", "Practitioner/9", "PractitionerRole/a.b", "RelatedPerson/x-1", "Person/" + "A" * 64],
)
def test_every_fhir_user_type_is_accepted(tmp_path: Path, fhir_user: str) -> None:
    from fhirgate.authserver.users import check_fhir_user

    assert check_fhir_user(fhir_user) == fhir_user


def test_a_malformed_stored_hash_never_matches() -> None:
    good = hash_password("pw")
    assert check_password("pw", good)
    assert not check_password("pw2", good)
    for bad in (
        "",
        "pw",
        "scrypt$1$2$3",
        good.replace("scrypt", "bcrypt"),
        good[:-4] + "!!!!",
        "scrypt$x$8$1$AA==$AA==",
    ):
        assert not check_password("pw", bad)


# ---- clients: metadata rules --------------------------------------------------------------------

APP = {"client_name": "App", "redirect_uris": ["https://app.example/cb"]}
BACKEND = {
    "client_name": "Backend",
    "grant_types": ["client_credentials"],
    "token_endpoint_auth_method": "private_key_jwt",
    "jwks": {"keys": [EC384]},
}


def test_defaults_are_filled_in_and_unknown_members_dropped() -> None:
    assert validate_metadata({**APP, "logo_uri": "https://x", "software_id": "s"}) == {
        "client_name": "App",
        "redirect_uris": ["https://app.example/cb"],
        "grant_types": ["authorization_code"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "client_secret_basic",
    }
    assert validate_metadata(BACKEND)["response_types"] == []


@pytest.mark.parametrize(
    "metadata",
    [
        {
            **APP,
            "redirect_uris": ["http://127.0.0.1:8765/cb", "http://[::1]/cb", "http://localhost:1/cb?x=1"],
        },
        {**APP, "grant_types": ["authorization_code", "refresh_token"], "token_endpoint_auth_method": "none"},
        {
            **APP,
            "response_types": ["code"],
            "scope": "launch/patient openid fhirUser patient/*.rs offline_access",
        },
        {**APP, "token_endpoint_auth_method": "client_secret_post"},
        {**APP, "token_endpoint_auth_method": "private_key_jwt", "jwks_uri": "https://app.example/jwks"},
        {**BACKEND, "jwks": {"keys": [RSA_PUBLIC]}},
        {**BACKEND, "jwks": {"keys": [{**_ec_public("P-256"), "alg": "ES256", "use": "sig"}]}},
        {**BACKEND, "jwks": {"keys": [{"kty": "XYZ"}, {**EC384, "use": "enc"}, EC384]}},  # others skipped
    ],
)
def test_good_metadata_is_accepted(metadata: dict[str, Any]) -> None:
    validate_metadata(metadata)


def _without(metadata: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in metadata.items() if k not in names}


HTTPS = "must use https (http only on a loopback host: 127.0.0.1, [::1], localhost)"
NO_KEY = (
    "jwks: holds no public signing key usable with RS256, RS384, ES256 or ES384 (RSA of 2048+ bits, "
    "EC P-256 or P-384)"
)
PUB = "register public keys only"
CONFIDENTIAL = "it needs a confidential client (client_secret_basic, client_secret_post or private_key_jwt)"
BAD: list[tuple[dict[str, Any], str]] = [
    (
        {**APP, "client_id": "mine"},
        "client_id: is issued by the authorization server and cannot be registered",
    ),
    (
        {**APP, "client_secret": "s"},
        "client_secret: is issued by the authorization server and cannot be registered",
    ),
    # redirect_uris
    (_without(APP, "redirect_uris"), "redirect_uris: required with grant type authorization_code"),
    (
        {**APP, "redirect_uris": "https://app.example/cb"},
        "redirect_uris: must be an array of strings, not a JSON string",
    ),
    ({**APP, "redirect_uris": []}, "redirect_uris: must not be empty"),
    ({**APP, "redirect_uris": [1]}, "redirect_uris: must be an array of strings, not a JSON number"),
    (
        {**APP, "redirect_uris": ["https://a.example/cb"] * 2},
        'redirect_uris: lists "https://a.example/cb" twice',
    ),
    (
        {**APP, "redirect_uris": ["http://app.example/cb"]},
        'redirect_uris: "http://app.example/cb" ' + HTTPS,
    ),
    (
        {**APP, "redirect_uris": ["http://127.0.0.2/cb"]},
        'redirect_uris: "http://127.0.0.2/cb" ' + HTTPS,
    ),
    (
        {**APP, "redirect_uris": ["myapp://cb"]},
        'redirect_uris: "myapp://cb" ' + HTTPS,
    ),
    ({**APP, "redirect_uris": ["/cb"]}, 'redirect_uris: "/cb" is not an absolute URI'),
    ({**APP, "redirect_uris": ["https:///cb"]}, 'redirect_uris: "https:///cb" is not an absolute URI'),
    (
        {**APP, "redirect_uris": ["https://a.example:x/cb"]},
        'redirect_uris: "https://a.example:x/cb" is not an absolute URI',
    ),
    (
        {**APP, "redirect_uris": ["https://app.example/cb#x"]},
        'redirect_uris: "https://app.example/cb#x" must not have a fragment',
    ),
    (
        {**APP, "redirect_uris": ["https://app.example/cb#"]},
        'redirect_uris: "https://app.example/cb#" must not have a fragment',
    ),
    (
        {**APP, "redirect_uris": ["https://app.example@evil.com/cb"]},
        'redirect_uris: "https://app.example@evil.com/cb" must not have user information (user@host)',
    ),
    (
        {**APP, "redirect_uris": ["https://app.example/c b"]},
        'redirect_uris: "https://app.example/c b" contains whitespace or control characters',
    ),
    (
        {**APP, "redirect_uris": ["https://app.example/cb\n"]},
        'redirect_uris: "https://app.example/cb\\n" contains whitespace or control characters',
    ),
    (
        {**APP, "redirect_uris": ["https://app.example/" + "a" * 2000]},
        'redirect_uris: "https://app.example/aaaaaaaaaaaaaaaaaaaa..." is longer than 2000 characters',
    ),
    # grant_types and response_types
    (
        {**APP, "grant_types": ["implicit"]},
        'grant_types: "implicit" is not supported: fhirgate has no implicit or password grant',
    ),
    (
        {**APP, "grant_types": ["password"]},
        'grant_types: "password" is not supported: fhirgate has no implicit or password grant',
    ),
    (
        {**APP, "grant_types": ["urn:ietf:params:oauth:grant-type:device_code"]},
        'grant_types: "urn:ietf:params:oauth:grant-type:device_code" is not supported; '
        "use authorization_code, refresh_token or client_credentials",
    ),
    ({**APP, "grant_types": []}, "grant_types: must not be empty"),
    (
        {**BACKEND, "grant_types": ["client_credentials", "refresh_token"]},
        "grant_types: refresh_token needs authorization_code",
    ),
    (
        {**APP, "response_types": ["token"]},
        'response_types: "token" is not supported; the only response type is code (no implicit flow)',
    ),
    (
        {**APP, "response_types": ["code id_token"]},
        'response_types: "code id_token" is not supported; the only response type is code (no implicit flow)',
    ),
    ({**BACKEND, "response_types": ["code"]}, "response_types: code needs grant type authorization_code"),
    ({**APP, "response_types": []}, "response_types: must not be empty"),
    # token_endpoint_auth_method and keys
    (
        {**APP, "token_endpoint_auth_method": "tls_client_auth"},
        'token_endpoint_auth_method: "tls_client_auth" is not supported; use none, client_secret_basic, '
        "client_secret_post or private_key_jwt",
    ),
    (
        {**APP, "token_endpoint_auth_method": 1},
        "token_endpoint_auth_method: must be a string, not a JSON number",
    ),
    (
        {**BACKEND, "token_endpoint_auth_method": "none"},
        "token_endpoint_auth_method: none cannot be used with grant type client_credentials: " + CONFIDENTIAL,
    ),
    (
        {**BACKEND, "jwks_uri": "https://b.example/jwks"},
        "jwks: jwks and jwks_uri are mutually exclusive: give one",
    ),
    (
        _without(BACKEND, "jwks"),
        "jwks: private_key_jwt needs the client's public keys: give jwks or jwks_uri",
    ),
    (
        {**APP, "jwks": {"keys": [EC384]}},
        "jwks: is only used with token_endpoint_auth_method private_key_jwt",
    ),
    (
        {**APP, "token_endpoint_auth_method": "none", "jwks_uri": "https://a.example/jwks"},
        "jwks_uri: is only used with token_endpoint_auth_method private_key_jwt",
    ),
    ({**BACKEND, "jwks": [EC384]}, "jwks: must be a JWK Set object, not a JSON array"),
    ({**BACKEND, "jwks": {"keys": []}}, 'jwks: the "keys" array is empty: the JWKS holds no key'),
    ({**BACKEND, "jwks": EC384}, 'jwks: this is a single JWK, not a JWKS; wrap it as {"keys": [ ... ]}'),
    (
        {**BACKEND, "jwks": {"keys": [EC_PRIVATE]}},
        "jwks: key 0 carries private members (d): " + PUB,
    ),
    (
        {**BACKEND, "jwks": {"keys": [{"kty": "oct", "k": "AAAA"}]}},
        "jwks: key 0 carries private members (k): " + PUB,
    ),
    ({**BACKEND, "jwks": {"keys": [{"kty": "XYZ"}]}}, NO_KEY),
    (
        {**BACKEND, "jwks": {"keys": [{**EC384, "use": "enc"}]}},
        NO_KEY,
    ),
    (
        {**BACKEND, "jwks": {"keys": [{**RSA_PUBLIC, "alg": "PS256"}]}},
        NO_KEY,
    ),
    (
        {**_without(BACKEND, "jwks"), "jwks_uri": "http://keys.example/jwks"},
        'jwks_uri: "http://keys.example/jwks" ' + HTTPS,
    ),
    # scope and client_name
    ({**APP, "scope": "openid  profile"}, "scope: must be space-separated scope tokens (RFC 6749 §3.3)"),
    ({**APP, "scope": 'patient/*.rs "x"'}, "scope: must be space-separated scope tokens (RFC 6749 §3.3)"),
    ({**APP, "scope": ""}, "scope: must be space-separated scope tokens (RFC 6749 §3.3)"),
    ({**APP, "scope": ["openid"]}, "scope: must be a string, not a JSON array"),
    ({**APP, "client_name": ""}, "client_name: must be 1 to 200 characters on one line"),
    ({**APP, "client_name": "a\nb"}, "client_name: must be 1 to 200 characters on one line"),
    ({**APP, "client_name": "x" * 201}, "client_name: must be 1 to 200 characters on one line"),
    ({**APP, "client_name": None}, "client_name: must be a string, not a JSON null"),
]


@pytest.mark.parametrize(("metadata", "message"), BAD)
def test_bad_metadata_is_refused_naming_the_field(metadata: dict[str, Any], message: str) -> None:
    with pytest.raises(ClientMetadataError) as caught:
        validate_metadata(metadata)
    assert str(caught.value) == message
    assert caught.value.field == message.split(":")[0]
    expected = "invalid_redirect_uri" if caught.value.field == "redirect_uris" else "invalid_client_metadata"
    assert caught.value.error_code == expected


def test_a_jwks_with_a_parse_error_names_the_problem() -> None:
    bad = {**EC384, "x": EC384["x"] + "="}
    with pytest.raises(ClientMetadataError, match=r"^jwks: holds no public signing key"):
        validate_metadata({**BACKEND, "jwks": {"keys": [bad]}})


# ---- clients: the store -------------------------------------------------------------------------


def test_clients_create_get_list_verify_delete(db_url: str) -> None:
    async def run() -> None:
        store = await AuthStore.open(db_url)
        clients = Clients(store)
        app, secret = await clients.create({**APP, "scope": "openid fhirUser"})
        public, none = await clients.create(
            {**APP, "client_name": "Public", "token_endpoint_auth_method": "none"}
        )
        backend, no_secret = await clients.create(BACKEND)
        post, post_secret = await clients.create({**APP, "token_endpoint_auth_method": "client_secret_post"})
        assert secret is not None
        assert post_secret is not None
        assert none is None
        assert no_secret is None
        assert len(secret) >= 43  # 256 bits
        assert len({app.client_id, public.client_id, backend.client_id, post.client_id}) == 4
        assert all(c.isalnum() or c in "-_" for c in app.client_id)
        assert (app.has_secret, public.has_secret, backend.has_secret) == (True, False, False)
        assert app.auth_method == "client_secret_basic"
        assert app.metadata["scope"] == "openid fhirUser"
        assert await clients.get(app.client_id) == app
        assert await clients.get("nope") is None
        assert (await clients.get(backend.client_id)).metadata["jwks"] == {"keys": [EC384]}  # type: ignore[union-attr]
        assert {c.client_id for c in await clients.list()} == {
            app.client_id,
            public.client_id,
            backend.client_id,
            post.client_id,
        }

        assert await clients.verify_secret(app.client_id, secret) == app
        assert await clients.verify_secret(post.client_id, post_secret) == post
        assert await clients.verify_secret(app.client_id, post_secret) is None
        assert await clients.verify_secret(app.client_id, secret[:-1]) is None
        assert await clients.verify_secret(app.client_id, "") is None
        assert await clients.verify_secret("unknown", secret) is None
        assert await clients.verify_secret(public.client_id, "") is None
        assert await clients.verify_secret(backend.client_id, "anything") is None

        # stored: the metadata as validated, the secret only as its SHA-256
        async with store.read() as s:
            rows = {
                r[0]: r[1:]
                for r in await s.conn.fetch("SELECT client_id, metadata, secret_hash FROM auth_client")
            }
        assert rows[app.client_id][1] == "sha256$" + hashlib.sha256(secret.encode()).hexdigest()
        assert secret not in rows[app.client_id][1]
        assert json.loads(rows[app.client_id][0]) == app.metadata
        assert rows[public.client_id][1] is None

        await clients.delete(app.client_id)
        with pytest.raises(UnknownClientError, match=rf'^no client "{app.client_id}"$'):
            await clients.delete(app.client_id)
        assert await clients.verify_secret(app.client_id, secret) is None
        assert len(await clients.list()) == 3
        await store.close()

    asyncio.run(run())


def test_invalid_metadata_stores_nothing(db_url: str) -> None:
    async def run() -> None:
        store = await AuthStore.open(db_url)
        with pytest.raises(ClientMetadataError):
            await Clients(store).create({**APP, "grant_types": ["implicit"]})
        assert await Clients(store).list() == []
        await store.close()

    asyncio.run(run())


def test_generated_ids_and_secrets_never_look_like_an_option() -> None:
    """`fhirgate token --client-id ID --client-secret S` must not take them for options."""
    from fhirgate.authserver.clients import command_line_safe

    values = [command_line_safe(24) for _ in range(3000)]
    assert not any(v.startswith("-") for v in values)
    assert len(set(values)) == len(values)
