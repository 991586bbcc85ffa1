"""The authorization server's users (issue 5 §4): who may log in, and the `fhirUser` each links to.

Passwords are hashed with scrypt (`hashlib.scrypt`, memory-hard: n=2**14, r=8, p=1, 16 MiB per
hash), a 16-byte random salt per hash, stored as the self-describing string
`scrypt$n$r$p$salt_b64$hash_b64` so the parameters can be raised later without breaking stored
hashes. Hashing runs off the event loop (`asyncio.to_thread`).

`verify_password` costs one scrypt whether or not the user exists (an unknown user is checked
against a dummy hash) and compares with `hmac.compare_digest`, so its timing does not tell which
usernames exist.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from fhirgate import clock
from fhirgate.authserver.store import AuthStore, StoredUser
from fhirgate.errors import FhirgateError

__all__ = [
    "FHIR_USER",
    "SCRYPT_N",
    "SCRYPT_P",
    "SCRYPT_R",
    "USERNAME",
    "DuplicateUserError",
    "InvalidUserError",
    "UnknownUserError",
    "User",
    "UserError",
    "Users",
    "check_fhir_user",
    "check_password",
    "check_username",
    "hash_password",
]

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
#: scrypt needs 128 * r * n bytes (16 MiB here); allow twice that for a later raise of n.
_MAXMEM = 64 * 1024 * 1024

#: The FHIR resource a user is (the `fhirUser` claim, SMART App Launch 2.2).
FHIR_USER = re.compile(r"^(Patient|Practitioner|PractitionerRole|RelatedPerson|Person)/[A-Za-z0-9\-.]{1,64}$")
#: Login names: printable, no spaces, no control characters.
USERNAME = re.compile(r"^[A-Za-z0-9._@+-]{1,128}$")

MSG_USERNAME = "invalid username {value}: 1 to 128 characters from A-Z a-z 0-9 and . _ @ + -"
MSG_FHIR_USER = (
    "invalid fhir_user {value}: expected Patient/ID, Practitioner/ID, PractitionerRole/ID, "
    "RelatedPerson/ID or Person/ID (ID: 1 to 64 of A-Z a-z 0-9 - .)"
)
MSG_EMPTY_PASSWORD = "the password is empty"  # noqa: S105 - a message, not a password
MSG_DUPLICATE = "user {value} already exists"
MSG_UNKNOWN = "no user {value}"


class UserError(FhirgateError, ValueError):
    """A user operation that cannot be done; the message says why."""


class InvalidUserError(UserError):
    """A bad username, fhir_user or password."""


class DuplicateUserError(UserError):
    """The username is taken."""


class UnknownUserError(UserError):
    """No such user."""


def _q(value: str) -> str:
    return repr(value)


def check_username(username: str) -> str:
    if not USERNAME.fullmatch(username):
        raise InvalidUserError(MSG_USERNAME.format(value=_q(username)))
    return username


def check_fhir_user(fhir_user: str | None) -> str | None:
    # fullmatch: `$` alone would accept a trailing newline
    if fhir_user is not None and not FHIR_USER.fullmatch(fhir_user):
        raise InvalidUserError(MSG_FHIR_USER.format(value=_q(fhir_user)))
    return fhir_user


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hash_password(password: str) -> str:
    """`scrypt$n$r$p$salt_b64$hash_b64` of `password` with a fresh random salt (blocking: ~50 ms)."""
    if not password:
        raise InvalidUserError(MSG_EMPTY_PASSWORD)
    salt = secrets.token_bytes(SALT_BYTES)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=_MAXMEM, dklen=HASH_BYTES
    )
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def check_password(password: str, encoded: str) -> bool:
    """Whether `password` matches the stored `encoded` hash (blocking). A malformed hash never
    matches."""
    try:
        scheme, n, r, p, salt_b64, hash_b64 = encoded.split("$")
        if scheme != "scrypt":
            return False
        salt = base64.b64decode(salt_b64, validate=True)
        expected = base64.b64decode(hash_b64, validate=True)
        digest = hashlib.scrypt(
            password.encode(), salt=salt, n=int(n), r=int(r), p=int(p), maxmem=_MAXMEM, dklen=len(expected)
        )
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(digest, expected)


#: The hash an unknown user's password is checked against, so that checking an unknown user costs
#: the same scrypt as a known one from the first call on. Made once from a random password nobody
#: kept; a constant, so no process pays for it on its first unknown user (that would time it).
_DUMMY_HASH = "scrypt$16384$8$1$xBkiAYZaQTBGa2H4o06tjg==$NBsbJesm5vbZaqWwC+ph+7+pkYq7cBPpJh/PrOsmPAM="


def _dummy_hash() -> str:
    return _DUMMY_HASH


@dataclass(frozen=True, slots=True)
class User:
    """A user, without its password hash."""

    username: str
    fhir_user: str | None
    created_at: int


def _public(stored: StoredUser) -> User:
    return User(stored.username, stored.fhir_user, stored.created_at)


class Users:
    """The users in `store`."""

    def __init__(self, store: AuthStore) -> None:
        self.store = store

    async def create(self, username: str, password: str, fhir_user: str | None = None) -> User:
        """Create a user; `DuplicateUserError` if the username is taken, `InvalidUserError` for a
        bad username, fhir_user or an empty password."""
        check_username(username)
        check_fhir_user(fhir_user)
        if not password:
            raise InvalidUserError(MSG_EMPTY_PASSWORD)
        password_hash = await asyncio.to_thread(hash_password, password)
        stored = StoredUser(username, password_hash, fhir_user, int(clock.now() * 1000))
        async with self.store.write() as s:
            inserted = await s.insert_user(stored)
        if not inserted:
            raise DuplicateUserError(MSG_DUPLICATE.format(value=_q(username)))
        return _public(stored)

    async def get(self, username: str) -> User | None:
        async with self.store.read() as s:
            stored = await s.user(username)
        return None if stored is None else _public(stored)

    async def list(self) -> list[User]:
        """Every user, by username."""
        async with self.store.read() as s:
            return [_public(u) for u in await s.users()]

    async def delete(self, username: str) -> None:
        """Delete a user and revoke everything they authorized (their refresh tokens stop working,
        their access tokens enter the revocation feed, their login sessions end);
        `UnknownUserError` if there is none."""
        async with self.store.write() as s:
            deleted = await s.delete_user(username)
            if deleted:
                await s.revoke_grants_of("username", username, int(clock.now() * 1000))
        if not deleted:
            raise UnknownUserError(MSG_UNKNOWN.format(value=_q(username)))

    async def verify_password(self, username: str, password: str) -> User | None:
        """The user if `password` is theirs, else None; one scrypt either way."""
        async with self.store.read() as s:
            stored = await s.user(username)
        encoded = stored.password_hash if stored is not None else _dummy_hash()
        ok = await asyncio.to_thread(check_password, password, encoded)
        return _public(stored) if ok and stored is not None else None
