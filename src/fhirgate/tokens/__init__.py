"""Token verification core shared by the `jwt` and `openid-connect` plugins.

Parse (`parse_jwt`, bounded and strict), verify the signature with a key whose type decides the
allowed algorithms (`VerificationKey`, `verify_signature`), then check claims one by one
(`check_exp`, `check_nbf`, `check_iat`, `check_iss`, `check_aud`, `check_typ`). Every failure is a
`TokenError` with a machine `code` and a human `message`. Implements RFC 7515, RFC 7518, RFC 7519,
RFC 8037 and the RFC 8725 best practices; `jku`, `x5u`, `jwk` and `x5c` are never fetched or
trusted.
"""

from fhirgate.tokens.claims import (
    DEFAULT_TYP,
    check_aud,
    check_exp,
    check_iat,
    check_iss,
    check_maximum_expiration,
    check_nbf,
    check_typ,
    is_number,
)
from fhirgate.tokens.errors import (
    AlgorithmNotAllowedError,
    ClaimError,
    InvalidKeyError,
    MalformedTokenError,
    SignatureError,
    TokenError,
)
from fhirgate.tokens.jws import (
    ALGORITHMS,
    MAX_HEADER_LENGTH,
    MAX_TOKEN_LENGTH,
    ParsedJWT,
    b64url_decode,
    b64url_encode,
    parse_jwt,
)
from fhirgate.tokens.keys import (
    HMAC_ALGORITHMS,
    MIN_RSA_BITS,
    VerificationKey,
    hmac_key,
    public_key,
    public_key_from_pem,
)
from fhirgate.tokens.verify import verify_jwt, verify_signature

__all__ = [
    "ALGORITHMS",
    "DEFAULT_TYP",
    "HMAC_ALGORITHMS",
    "MAX_HEADER_LENGTH",
    "MAX_TOKEN_LENGTH",
    "MIN_RSA_BITS",
    "AlgorithmNotAllowedError",
    "ClaimError",
    "InvalidKeyError",
    "MalformedTokenError",
    "ParsedJWT",
    "SignatureError",
    "TokenError",
    "VerificationKey",
    "b64url_decode",
    "b64url_encode",
    "check_aud",
    "check_exp",
    "check_iat",
    "check_iss",
    "check_maximum_expiration",
    "check_nbf",
    "check_typ",
    "hmac_key",
    "is_number",
    "parse_jwt",
    "public_key",
    "public_key_from_pem",
    "verify_jwt",
    "verify_signature",
]
