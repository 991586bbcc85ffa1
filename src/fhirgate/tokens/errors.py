"""Typed token errors: each carries a machine `code` and a human `message`.

Callers map codes to their own dialect (Kong's `jwt` messages, RFC 6750 `error_description`), so
nothing here knows about HTTP.
"""

from __future__ import annotations

__all__ = [
    "AlgorithmNotAllowedError",
    "ClaimError",
    "InvalidKeyError",
    "MalformedTokenError",
    "SignatureError",
    "TokenError",
]


class TokenError(Exception):
    """Base of every token problem: `code` for machines, `message` for people."""

    code: str
    message: str

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class MalformedTokenError(TokenError):
    """The token is not a well-formed compact JWS carrying a JWT (RFC 7515 §7.1, RFC 7519 §7.2).

    Codes: ``token_too_large``, ``header_too_large``, ``truncated`` (fewer than three segments),
    ``extra_segments``, ``header_encoding``, ``header_json``, ``payload_encoding``, ``payload_json``,
    ``alg_invalid`` (missing, not a string, unknown, or ``none``), ``crit_unsupported``,
    ``claims_not_object``, ``signature_encoding``.
    """


class AlgorithmNotAllowedError(TokenError):
    """The token's `alg` is not one the key allows (RFC 8725 §3.1): code ``alg_not_allowed``."""


class SignatureError(TokenError):
    """The signature does not verify with the key: code ``bad_signature``."""


class ClaimError(TokenError):
    """A claim check failed (RFC 7519 §4.1). `claim` names the claim (or header member).

    Codes: ``missing``, ``not_a_number``, ``expired``, ``not_yet_valid``, ``issued_in_future``,
    ``too_old``, ``exceeds_maximum``, ``not_a_string``, ``issuer_mismatch``, ``audience_mismatch``,
    ``typ_not_allowed``.
    """

    def __init__(self, claim: str, code: str, message: str) -> None:
        super().__init__(code, message)
        self.claim = claim


class InvalidKeyError(TokenError, ValueError):
    """A key cannot be used for verification (bad PEM, unsupported curve, RSA < 2048 bits, an
    HMAC secret that is a public key...). Raised at configuration time, never per request.

    Codes: ``key_invalid``, ``key_unsupported``, ``key_too_small``, ``alg_mismatch``.
    """
