"""The authorization server's store on the shared `Backend` (SQLite by default, PostgreSQL at scale).

Its schema is a list of numbered migrations recorded in `auth_schema` (`fhirgate.storage.migrations`);
later parts append clients, users, codes, refresh tokens, consents and `jti` replay entries as new
migrations. Never edit a released migration: append a new one.

`auth_user` holds the users (`users.Users`: the password as a self-describing scrypt hash, the
`fhirUser` they link to); `auth_client` the OAuth clients (`clients.Clients`: the RFC 7591 metadata as
validated JSON, the SHA-256 of a generated secret or NULL).

`auth_key` holds the signing keys (`keys.KeyRing`): the private key as PKCS#8 PEM, its public JWK
(public members only, as published in `/jwks`), when it was created and when it was retired
(milliseconds since the epoch; `retired_at` is NULL while the key signs).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fhirgate.storage import migrations
from fhirgate.storage.backend import Backend, Connection, Row, open_backend

__all__ = [
    "MIGRATIONS",
    "SCHEMA_TABLE",
    "AuthSession",
    "AuthStore",
    "StoredClient",
    "StoredCode",
    "StoredGrant",
    "StoredKey",
    "StoredRefresh",
    "StoredUser",
    "current_version",
    "migrate",
]

SCHEMA_TABLE = "auth_schema"

#: PostgreSQL advisory locks of this store (`pg_advisory_xact_lock`): migrations, and key creation
#: (two nodes starting at once must not both create an active key).
MIGRATION_LOCK_ID = 7245118
KEYS_LOCK_ID = 7245119

MIGRATIONS: Sequence[Sequence[str]] = (
    # 1: signing keys
    (
        """CREATE TABLE auth_key (
            kid TEXT NOT NULL PRIMARY KEY,
            alg TEXT NOT NULL,
            private_pem TEXT NOT NULL,
            public_jwk TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            retired_at BIGINT)""",
        "CREATE INDEX auth_key_alg ON auth_key (alg, retired_at)",
    ),
    # 2: users and OAuth clients
    (
        """CREATE TABLE auth_user (
            username TEXT NOT NULL PRIMARY KEY,
            password_hash TEXT NOT NULL,
            fhir_user TEXT,
            created_at BIGINT NOT NULL)""",
        """CREATE TABLE auth_client (
            client_id TEXT NOT NULL PRIMARY KEY,
            metadata TEXT NOT NULL,
            secret_hash TEXT,
            created_at BIGINT NOT NULL)""",
    ),
    # 3: what the OAuth flows remember (times in ms since the epoch; secrets only as SHA-256)
    (
        # client assertion ids (RFC 7523 §3 "jti"), kept until the assertion would have expired
        """CREATE TABLE auth_jti (
            client_id TEXT NOT NULL,
            jti TEXT NOT NULL,
            expires_at BIGINT NOT NULL,
            PRIMARY KEY (client_id, jti))""",
        "CREATE INDEX auth_jti_expires ON auth_jti (expires_at)",
        # one authorization (the consent a user gave one client): its code, access and refresh
        # tokens form a family that is revoked as a whole
        """CREATE TABLE auth_grant (
            family TEXT NOT NULL PRIMARY KEY,
            client_id TEXT NOT NULL,
            username TEXT NOT NULL,
            login TEXT,
            scope TEXT NOT NULL,
            context TEXT NOT NULL,
            auth_time BIGINT,
            created_at BIGINT NOT NULL,
            revoked_at BIGINT)""",
        """CREATE TABLE auth_code (
            code_hash TEXT NOT NULL PRIMARY KEY,
            family TEXT NOT NULL,
            redirect_uri TEXT NOT NULL,
            code_challenge TEXT NOT NULL,
            nonce TEXT,
            expires_at BIGINT NOT NULL,
            used_at BIGINT)""",
        """CREATE TABLE auth_refresh (
            token_hash TEXT NOT NULL PRIMARY KEY,
            family TEXT NOT NULL,
            scope TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            expires_at BIGINT,
            used_at BIGINT)""",
        "CREATE INDEX auth_refresh_family ON auth_refresh (family)",
        "CREATE INDEX auth_grant_username ON auth_grant (username, revoked_at)",
        "CREATE INDEX auth_grant_client ON auth_grant (client_id, revoked_at)",
        # access tokens issued in a family, and every revoked access token (the revocation feed)
        """CREATE TABLE auth_token (
            jti TEXT NOT NULL PRIMARY KEY,
            family TEXT,
            client_id TEXT NOT NULL,
            expires_at BIGINT NOT NULL,
            revoked_at BIGINT)""",
        "CREATE INDEX auth_token_family ON auth_token (family)",
        "CREATE INDEX auth_token_revoked ON auth_token (revoked_at)",
        # EHR launch contexts minted by `fhirgate launch`: one client, single use
        """CREATE TABLE auth_launch (
            launch_hash TEXT NOT NULL PRIMARY KEY,
            client_id TEXT NOT NULL,
            context TEXT NOT NULL,
            expires_at BIGINT NOT NULL,
            used_at BIGINT)""",
        # browser login sessions (the cookie's SHA-256); online_access lives as long as one
        """CREATE TABLE auth_login (
            session_hash TEXT NOT NULL PRIMARY KEY,
            username TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            expires_at BIGINT NOT NULL,
            ended_at BIGINT)""",
        # server secrets shared by every node (the CSRF key)
        """CREATE TABLE auth_secret (
            name TEXT NOT NULL PRIMARY KEY,
            value TEXT NOT NULL,
            created_at BIGINT NOT NULL)""",
    ),
)

_KEY_COLUMNS = "kid, alg, private_pem, public_jwk, created_at, retired_at"


@dataclass(frozen=True, slots=True)
class StoredKey:
    """One row of `auth_key`."""

    kid: str
    alg: str
    private_pem: str
    public_jwk: str
    created_at: int
    retired_at: int | None

    @property
    def active(self) -> bool:
        return self.retired_at is None


def _key(row: Row) -> StoredKey:
    kid, alg, pem, jwk, created, retired = row
    return StoredKey(kid, alg, pem, jwk, int(created), None if retired is None else int(retired))


@dataclass(frozen=True, slots=True)
class StoredUser:
    """One row of `auth_user`."""

    username: str
    password_hash: str
    fhir_user: str | None
    created_at: int


@dataclass(frozen=True, slots=True)
class StoredClient:
    """One row of `auth_client` (`metadata` is JSON text)."""

    client_id: str
    metadata: str
    secret_hash: str | None
    created_at: int


_USER_COLUMNS = "username, password_hash, fhir_user, created_at"
_CLIENT_COLUMNS = "client_id, metadata, secret_hash, created_at"


def _user(row: Row) -> StoredUser:
    username, password_hash, fhir_user, created = row
    return StoredUser(username, password_hash, fhir_user, int(created))


def _client(row: Row) -> StoredClient:
    client_id, metadata, secret_hash, created = row
    return StoredClient(client_id, metadata, secret_hash, int(created))


@dataclass(frozen=True, slots=True)
class StoredGrant:
    """One row of `auth_grant`: one authorization a user gave one client (`context` is JSON)."""

    family: str
    client_id: str
    username: str
    login: str | None
    scope: str
    context: str
    auth_time: int | None
    created_at: int
    revoked_at: int | None = None


@dataclass(frozen=True, slots=True)
class StoredCode:
    """One row of `auth_code` (the code only as its SHA-256)."""

    code_hash: str
    family: str
    redirect_uri: str
    code_challenge: str
    nonce: str | None
    expires_at: int
    used_at: int | None = None


@dataclass(frozen=True, slots=True)
class StoredRefresh:
    """One row of `auth_refresh` (the token only as its SHA-256; `expires_at` NULL: none)."""

    token_hash: str
    family: str
    scope: str
    created_at: int
    expires_at: int | None
    used_at: int | None = None


_GRANT_COLUMNS = "family, client_id, username, login, scope, context, auth_time, created_at, revoked_at"
_CODE_COLUMNS = "code_hash, family, redirect_uri, code_challenge, nonce, expires_at, used_at"
_REFRESH_COLUMNS = "token_hash, family, scope, created_at, expires_at, used_at"


def _opt(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def _grant(row: Row) -> StoredGrant:
    family, client_id, username, login, scope, context, auth_time, created, revoked = row
    return StoredGrant(
        family, client_id, username, login, scope, context, _opt(auth_time), int(created), _opt(revoked)
    )


def _code(row: Row) -> StoredCode:
    code_hash, family, redirect_uri, challenge, nonce, expires, used = row
    return StoredCode(code_hash, family, redirect_uri, challenge, nonce, int(expires), _opt(used))


def _refresh(row: Row) -> StoredRefresh:
    token_hash, family, scope, created, expires, used = row
    return StoredRefresh(token_hash, family, scope, int(created), _opt(expires), _opt(used))


class AuthSession:
    """The store's statements on one connection, inside a `read` or `write` block (`conn` is
    there for what has no method yet)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def lock_keys(self) -> None:
        """Serialise key creation across nodes for the rest of this write transaction (on SQLite
        the write transaction, BEGIN IMMEDIATE, already holds the database's one write lock)."""
        if self.conn.dialect == "postgresql":
            await self.conn.execute("SELECT pg_advisory_xact_lock(?)", (KEYS_LOCK_ID,))

    async def keys(self, alg: str | None = None) -> list[StoredKey]:
        """Every key (of `alg`), newest first."""
        if alg is None:
            rows = await self.conn.fetch(f"SELECT {_KEY_COLUMNS} FROM auth_key ORDER BY created_at DESC, kid")
        else:
            rows = await self.conn.fetch(
                f"SELECT {_KEY_COLUMNS} FROM auth_key WHERE alg = ? ORDER BY created_at DESC, kid", (alg,)
            )
        return [_key(row) for row in rows]

    async def active_keys(self, alg: str) -> list[StoredKey]:
        """The keys of `alg` not retired, newest first."""
        rows = await self.conn.fetch(
            f"SELECT {_KEY_COLUMNS} FROM auth_key WHERE alg = ? AND retired_at IS NULL "
            "ORDER BY created_at DESC, kid",
            (alg,),
        )
        return [_key(row) for row in rows]

    async def insert_key(self, key: StoredKey) -> None:
        await self.conn.execute(
            f"INSERT INTO auth_key ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
            (key.kid, key.alg, key.private_pem, key.public_jwk, key.created_at, key.retired_at),
        )

    async def retire_keys(self, alg: str, at_ms: int) -> int:
        """Retire every active key of `alg`; returns how many."""
        return await self.conn.execute(
            "UPDATE auth_key SET retired_at = ? WHERE alg = ? AND retired_at IS NULL", (at_ms, alg)
        )

    async def delete_retired_before(self, cutoff_ms: int) -> int:
        """Delete the keys retired at or before `cutoff_ms`; returns how many."""
        return await self.conn.execute(
            "DELETE FROM auth_key WHERE retired_at IS NOT NULL AND retired_at <= ?", (cutoff_ms,)
        )

    async def insert_user(self, user: StoredUser) -> bool:
        """Insert `user`; False (and nothing written) when the username is taken."""
        return (
            await self.conn.execute(
                f"INSERT INTO auth_user ({_USER_COLUMNS}) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (username) DO NOTHING",
                (user.username, user.password_hash, user.fhir_user, user.created_at),
            )
            == 1
        )

    async def user(self, username: str) -> StoredUser | None:
        row = await self.conn.fetchrow(
            f"SELECT {_USER_COLUMNS} FROM auth_user WHERE username = ?", (username,)
        )
        return None if row is None else _user(row)

    async def users(self) -> list[StoredUser]:
        """Every user, by username."""
        return [
            _user(r)
            for r in await self.conn.fetch(f"SELECT {_USER_COLUMNS} FROM auth_user ORDER BY username")
        ]

    async def delete_user(self, username: str) -> bool:
        return await self.conn.execute("DELETE FROM auth_user WHERE username = ?", (username,)) == 1

    async def insert_client(self, client: StoredClient) -> bool:
        """Insert `client`; False (and nothing written) when the client_id is taken."""
        return (
            await self.conn.execute(
                f"INSERT INTO auth_client ({_CLIENT_COLUMNS}) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (client_id) DO NOTHING",
                (client.client_id, client.metadata, client.secret_hash, client.created_at),
            )
            == 1
        )

    async def client(self, client_id: str) -> StoredClient | None:
        row = await self.conn.fetchrow(
            f"SELECT {_CLIENT_COLUMNS} FROM auth_client WHERE client_id = ?", (client_id,)
        )
        return None if row is None else _client(row)

    async def clients(self) -> list[StoredClient]:
        """Every client, oldest first."""
        rows = await self.conn.fetch(
            f"SELECT {_CLIENT_COLUMNS} FROM auth_client ORDER BY created_at, client_id"
        )
        return [_client(r) for r in rows]

    async def delete_client(self, client_id: str) -> bool:
        return await self.conn.execute("DELETE FROM auth_client WHERE client_id = ?", (client_id,)) == 1

    async def remember_jti(self, client_id: str, jti: str, expires_at_ms: int) -> bool:
        """Record a client assertion's `jti`; False (nothing written) when it was seen before."""
        return (
            await self.conn.execute(
                "INSERT INTO auth_jti (client_id, jti, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (client_id, jti) DO NOTHING",
                (client_id, jti, expires_at_ms),
            )
            == 1
        )

    async def forget_jtis_before(self, cutoff_ms: int) -> int:
        """Delete the `jti` entries whose assertion expired before `cutoff_ms`."""
        return await self.conn.execute("DELETE FROM auth_jti WHERE expires_at < ?", (cutoff_ms,))

    async def record_tokens(self, rows: Sequence[tuple[str, str | None, str, int]]) -> None:
        """Record issued access tokens: (jti, family, client_id, expires_at)."""
        await self.conn.executemany(
            "INSERT INTO auth_token (jti, family, client_id, expires_at) VALUES (?, ?, ?, ?)", rows
        )

    async def revoke_token(self, jti: str, client_id: str, expires_at_ms: int, at_ms: int) -> None:
        """Mark one access token revoked (recorded now if it was not: client_credentials tokens are
        not recorded when issued)."""
        await self.conn.execute(
            "INSERT INTO auth_token (jti, family, client_id, expires_at, revoked_at) "
            "VALUES (?, NULL, ?, ?, ?) ON CONFLICT (jti) DO UPDATE "
            "SET revoked_at = COALESCE(auth_token.revoked_at, excluded.revoked_at)",
            (jti, client_id, expires_at_ms, at_ms),
        )

    async def token_revoked(self, jti: str) -> bool:
        row = await self.conn.fetchrow(
            "SELECT 1 FROM auth_token WHERE jti = ? AND revoked_at IS NOT NULL", (jti,)
        )
        return row is not None

    async def revoked_since(self, since_ms: int, now_ms: int, limit: int) -> list[tuple[str, int, int]]:
        """Revoked access tokens not yet expired, revoked at or after `since_ms`, oldest revocation
        first: (jti, expires_at, revoked_at)."""
        rows = await self.conn.fetch(
            "SELECT jti, expires_at, revoked_at FROM auth_token "
            "WHERE revoked_at IS NOT NULL AND revoked_at >= ? AND expires_at > ? "
            "ORDER BY revoked_at, jti LIMIT ?",
            (since_ms, now_ms, limit),
        )
        return [(str(j), int(e), int(r)) for j, e, r in rows]

    async def forget_expired(self, cutoff_ms: int) -> int:
        """Delete codes, refresh tokens, launch values and login sessions that expired before
        `cutoff_ms` (the server keeps them a day past expiry, so a late replay is still recognised
        as one); returns how many rows went."""
        total = 0
        for table in ("auth_code", "auth_refresh", "auth_launch", "auth_login"):
            total += await self.conn.execute(
                f"DELETE FROM {table} WHERE expires_at IS NOT NULL AND expires_at < ?",
                (cutoff_ms,),
            )
        return total

    async def forget_tokens_before(self, cutoff_ms: int) -> int:
        """Delete the access-token rows that expired before `cutoff_ms`."""
        return await self.conn.execute("DELETE FROM auth_token WHERE expires_at < ?", (cutoff_ms,))

    async def revoke_family(self, family: str, at_ms: int) -> None:
        """Revoke one authorization as a whole: the grant, every refresh token of it (they stop
        working) and every access token issued in it (they enter the revocation feed)."""
        await self.conn.execute(
            "UPDATE auth_grant SET revoked_at = ? WHERE family = ? AND revoked_at IS NULL", (at_ms, family)
        )
        await self.conn.execute(
            "UPDATE auth_token SET revoked_at = ? WHERE family = ? AND revoked_at IS NULL", (at_ms, family)
        )

    async def revoke_grants_of(self, column: str, value: str, at_ms: int) -> int:
        """Revoke every authorization of a user (`column` "username") or a client ("client_id")
        as `revoke_family` does; a user's login sessions end too. Returns how many."""
        if column not in ("username", "client_id"):
            raise ValueError(column)
        rows = await self.conn.fetch(
            f"SELECT family FROM auth_grant WHERE {column} = ? AND revoked_at IS NULL", (value,)
        )
        for (family,) in rows:
            await self.revoke_family(str(family), at_ms)
        if column == "username":
            await self.conn.execute(
                "UPDATE auth_login SET ended_at = ? WHERE username = ? AND ended_at IS NULL", (at_ms, value)
            )
        return len(rows)

    async def family_revoked(self, family: str, lock: bool = False) -> bool:
        """Whether the authorization was revoked. With `lock` (inside a write transaction that is
        about to issue tokens in the family) the grant row stays locked until the transaction ends,
        so a concurrent `revoke_family` either comes first (and is seen here) or waits and then
        reaches the tokens this transaction records (PostgreSQL; SQLite's write transactions
        already run one at a time)."""
        sql = "SELECT revoked_at FROM auth_grant WHERE family = ?"
        if lock and self.conn.dialect == "postgresql":
            sql += " FOR UPDATE"
        row = await self.conn.fetchrow(sql, (family,))
        return row is not None and row[0] is not None

    async def secret(self, name: str, make: str, now_ms: int) -> str:
        """The server secret `name`, created with the value `make` if there is none yet (the first
        node to start wins; every node reads the same value)."""
        await self.conn.execute(
            "INSERT INTO auth_secret (name, value, created_at) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO NOTHING",
            (name, make, now_ms),
        )
        row = await self.conn.fetchrow("SELECT value FROM auth_secret WHERE name = ?", (name,))
        assert row is not None
        return str(row[0])

    # --- introspection, revocation and the revocation feed (endpoints.py) ---------------------

    async def access_token_status(self, jti: str) -> tuple[int | None, str | None, int | None] | None:
        """What the store knows of one access token: (its revoked_at, its family, the family's
        revoked_at), or None when it has no row (a client_credentials token never revoked)."""
        row = await self.conn.fetchrow(
            "SELECT t.revoked_at, t.family, g.revoked_at FROM auth_token t "
            "LEFT JOIN auth_grant g ON g.family = t.family WHERE t.jti = ?",
            (jti,),
        )
        if row is None:
            return None
        revoked, family, family_revoked = row
        return (
            None if revoked is None else int(revoked),
            None if family is None else str(family),
            None if family_revoked is None else int(family_revoked),
        )

    async def revoked_page(
        self, since_ms: int, after_jti: str | None, now_ms: int, limit: int
    ) -> list[tuple[str, int, int]]:
        """One page of the revocation feed: revoked access tokens not yet expired, in
        (revoked_at, jti) order, after the cursor (since_ms, after_jti) - or from since_ms
        inclusive without after_jti: (jti, expires_at, revoked_at)."""
        if after_jti is None:
            return await self.revoked_since(since_ms, now_ms, limit)
        rows = await self.conn.fetch(
            "SELECT jti, expires_at, revoked_at FROM auth_token "
            "WHERE revoked_at IS NOT NULL AND (revoked_at > ? OR (revoked_at = ? AND jti > ?)) "
            "AND expires_at > ? ORDER BY revoked_at, jti LIMIT ?",
            (since_ms, since_ms, after_jti, now_ms, limit),
        )
        return [(str(j), int(e), int(r)) for j, e, r in rows]

    # --- the browser flows (flows.py): grants, codes, refresh tokens, launches, logins -----------

    async def insert_grant(self, grant: StoredGrant) -> None:
        await self.conn.execute(
            f"INSERT INTO auth_grant ({_GRANT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                grant.family,
                grant.client_id,
                grant.username,
                grant.login,
                grant.scope,
                grant.context,
                grant.auth_time,
                grant.created_at,
                grant.revoked_at,
            ),
        )

    async def grant(self, family: str) -> StoredGrant | None:
        row = await self.conn.fetchrow(f"SELECT {_GRANT_COLUMNS} FROM auth_grant WHERE family = ?", (family,))
        return None if row is None else _grant(row)

    async def insert_code(self, code: StoredCode) -> None:
        await self.conn.execute(
            f"INSERT INTO auth_code ({_CODE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                code.code_hash,
                code.family,
                code.redirect_uri,
                code.code_challenge,
                code.nonce,
                code.expires_at,
                code.used_at,
            ),
        )

    async def code(self, code_hash: str) -> StoredCode | None:
        row = await self.conn.fetchrow(
            f"SELECT {_CODE_COLUMNS} FROM auth_code WHERE code_hash = ?", (code_hash,)
        )
        return None if row is None else _code(row)

    async def use_code(self, code_hash: str, at_ms: int) -> bool:
        """Mark a code used; False when it already was (a replay: nothing written)."""
        return (
            await self.conn.execute(
                "UPDATE auth_code SET used_at = ? WHERE code_hash = ? AND used_at IS NULL", (at_ms, code_hash)
            )
            == 1
        )

    async def insert_refresh(self, refresh: StoredRefresh) -> None:
        await self.conn.execute(
            f"INSERT INTO auth_refresh ({_REFRESH_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
            (
                refresh.token_hash,
                refresh.family,
                refresh.scope,
                refresh.created_at,
                refresh.expires_at,
                refresh.used_at,
            ),
        )

    async def refresh(self, token_hash: str) -> StoredRefresh | None:
        row = await self.conn.fetchrow(
            f"SELECT {_REFRESH_COLUMNS} FROM auth_refresh WHERE token_hash = ?", (token_hash,)
        )
        return None if row is None else _refresh(row)

    async def use_refresh(self, token_hash: str, at_ms: int) -> bool:
        """Mark a refresh token used (rotated); False when it already was (a reuse)."""
        return (
            await self.conn.execute(
                "UPDATE auth_refresh SET used_at = ? WHERE token_hash = ? AND used_at IS NULL",
                (at_ms, token_hash),
            )
            == 1
        )

    async def insert_launch(self, launch_hash: str, client_id: str, context: str, expires_at_ms: int) -> None:
        await self.conn.execute(
            "INSERT INTO auth_launch (launch_hash, client_id, context, expires_at, used_at) "
            "VALUES (?, ?, ?, ?, NULL)",
            (launch_hash, client_id, context, expires_at_ms),
        )

    async def launch(self, launch_hash: str) -> tuple[str, str, int, int | None] | None:
        """(client_id, context JSON, expires_at, used_at) of a launch value's hash."""
        row = await self.conn.fetchrow(
            "SELECT client_id, context, expires_at, used_at FROM auth_launch WHERE launch_hash = ?",
            (launch_hash,),
        )
        if row is None:
            return None
        client_id, context, expires, used = row
        return str(client_id), str(context), int(expires), None if used is None else int(used)

    async def use_launch(self, launch_hash: str, at_ms: int) -> bool:
        """Mark a launch used; False when it already was."""
        return (
            await self.conn.execute(
                "UPDATE auth_launch SET used_at = ? WHERE launch_hash = ? AND used_at IS NULL",
                (at_ms, launch_hash),
            )
            == 1
        )

    async def insert_login(self, session_hash: str, username: str, created_ms: int, expires_ms: int) -> None:
        await self.conn.execute(
            "INSERT INTO auth_login (session_hash, username, created_at, expires_at, ended_at) "
            "VALUES (?, ?, ?, ?, NULL)",
            (session_hash, username, created_ms, expires_ms),
        )

    async def login(self, session_hash: str, now_ms: int) -> tuple[str, int, int] | None:
        """(username, created_at, expires_at) of a login session still running at `now_ms`."""
        row = await self.conn.fetchrow(
            "SELECT username, created_at, expires_at FROM auth_login "
            "WHERE session_hash = ? AND ended_at IS NULL AND expires_at > ?",
            (session_hash, now_ms),
        )
        return None if row is None else (str(row[0]), int(row[1]), int(row[2]))

    async def end_login(self, session_hash: str, at_ms: int) -> bool:
        """End a login session (its online_access refresh tokens stop working)."""
        return (
            await self.conn.execute(
                "UPDATE auth_login SET ended_at = ? WHERE session_hash = ? AND ended_at IS NULL",
                (at_ms, session_hash),
            )
            == 1
        )

    async def active_grants(self, username: str, now_ms: int, limit: int) -> list[StoredGrant]:
        """The authorizations of `username` that still give access (not revoked, and with a
        refresh token that still works or an access token not yet expired), newest first."""
        rows = await self.conn.fetch(
            f"SELECT {_GRANT_COLUMNS} FROM auth_grant g WHERE g.username = ? AND g.revoked_at IS NULL "
            "AND (EXISTS (SELECT 1 FROM auth_refresh r WHERE r.family = g.family AND r.used_at IS NULL "
            "AND (r.expires_at IS NULL OR r.expires_at > ?)) "
            "OR EXISTS (SELECT 1 FROM auth_token t WHERE t.family = g.family AND t.expires_at > ?)) "
            "ORDER BY g.created_at DESC, g.family LIMIT ?",
            (username, now_ms, now_ms, limit),
        )
        return [_grant(r) for r in rows]

    async def patient_users(self, limit: int) -> list[str]:
        """The `Patient/ID` fhir_user values of the users, sorted, at most `limit`."""
        rows = await self.conn.fetch(
            "SELECT DISTINCT fhir_user FROM auth_user WHERE fhir_user LIKE 'Patient/%' "
            "ORDER BY fhir_user LIMIT ?",
            (limit,),
        )
        return [str(r[0]) for r in rows]


class AuthStore:
    """`await AuthStore.open(url)`, then `async with store.write() as s` (one atomic write
    transaction) or `store.read()`; `await store.close()` at the end."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @classmethod
    async def open(cls, url: str) -> AuthStore:
        """Open `sqlite:///path.db` or `postgresql://...`, creating or migrating the schema."""
        backend = await open_backend(url)
        try:
            async with backend.transaction() as conn:
                await migrate(conn)
        except BaseException:
            await backend.close()
            raise
        return cls(backend)

    @property
    def url(self) -> str:
        return self.backend.url

    @property
    def dialect(self) -> str:
        return self.backend.dialect

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AuthSession]:
        async with self.backend.transaction() as conn:
            yield AuthSession(conn)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AuthSession]:
        async with self.backend.reader() as conn:
            yield AuthSession(conn)

    async def close(self) -> None:
        await self.backend.close()


async def migrate(conn: Connection) -> tuple[int, int]:
    """Apply the missing migrations in the caller's transaction; returns (from, to)."""
    return await migrations.apply(conn, SCHEMA_TABLE, MIGRATIONS, lock_id=MIGRATION_LOCK_ID)


async def current_version(conn: Connection) -> int:
    return await migrations.current_version(conn, SCHEMA_TABLE)
