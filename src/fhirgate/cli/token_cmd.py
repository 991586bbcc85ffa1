"""`fhirgate token`: get an access token with the client_credentials grant (SMART Backend
Services) and print it, nothing else, on stdout.

The token endpoint comes from the issuer's metadata (OpenID Connect Discovery
`{issuer}/.well-known/openid-configuration`, then RFC 8414
`{origin}/.well-known/oauth-authorization-server{path}`), whose `issuer` must be the one asked
for; `--token-url` skips discovery. The client authenticates with its secret (`client_secret_basic`,
RFC 6749 §2.3.1: form-encoded, then base64; or `client_secret_post`) or with a `private_key_jwt`
assertion (RFC 7523) signed with joserfc: `iss` = `sub` = the client_id, `aud` = the token
endpoint, `exp` four minutes ahead (SMART allows at most five), a random `jti`. The key file is
PEM (PKCS#8 or traditional) or a private JWK (JSON, or a JWK Set holding one key); `kid` is
`--kid`, else the JWK's `kid`, else its RFC 7638 thumbprint; `alg` is `--alg`, else the JWK's
`alg`, else ES384 for P-384, ES256 for P-256 and RS384 for RSA.

Any failure is one `error: ...` line on stderr (the server's `error` and `error_description` when it
answered with them) and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

__all__ = ["register"]

ALGS = ("ES384", "RS384", "ES256", "RS256")
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: Seconds an assertion is valid (SMART Backend Services: at most 300).
ASSERTION_LIFETIME = 240
TIMEOUT = 30.0


class TokenCommandError(Exception):
    """What goes on the one `error:` line."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "token",
        help="get an access token (client_credentials) and print it",
        description=(
            "Get an access token with the client_credentials grant (SMART Backend Services) from "
            "the authorization server and print only the token on stdout. The token endpoint is "
            "discovered from the issuer's metadata unless --token-url is given."
        ),
    )
    p.add_argument("--client-id", dest="client_id", required=True, help="the client's client_id")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--client-secret", dest="client_secret", metavar="SECRET", help="the client's secret")
    how.add_argument(
        "--private-key",
        dest="private_key",
        type=Path,
        metavar="FILE",
        help="private key (PEM or JWK JSON) for a private_key_jwt client assertion",
    )
    p.add_argument(
        "--kid", help="kid of the assertion (default: the JWK's kid, else its RFC 7638 thumbprint)"
    )
    p.add_argument("--alg", choices=ALGS, help="assertion algorithm (default: from the key)")
    p.add_argument(
        "--secret-method",
        dest="secret_method",
        choices=("basic", "post"),
        default="basic",
        help="how the secret is sent: client_secret_basic (default) or client_secret_post",
    )
    p.add_argument("--scope", default="system/*.read", help="requested scopes (default system/*.read)")
    p.add_argument("--issuer", metavar="URL", help="the issuer (default: setting auth_issuer)")
    p.add_argument(
        "--token-url", dest="token_url", metavar="URL", help="the token endpoint (skips discovery)"
    )
    p.add_argument("--settings", type=Path, help="node settings file (default ./fhirgate.toml)")
    p.set_defaults(func=run)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def run(args: argparse.Namespace) -> int:
    if args.client_secret is not None and (args.kid is not None or args.alg is not None):
        print("error: --kid and --alg go with --private-key", file=sys.stderr)
        return 1
    try:
        key = None if args.private_key is None else load_private_key(args.private_key, args.kid, args.alg)
        token_url = args.token_url or discover_token_endpoint(_issuer(args))
        token = fetch_token(args, token_url, key)
    except TokenCommandError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    print(token)
    return 0


def _issuer(args: argparse.Namespace) -> str:
    if args.issuer:
        return str(args.issuer)
    from fhirgate.errors import ConfigError
    from fhirgate.settings import load_settings

    try:
        return load_settings(args.settings).auth_issuer
    except ConfigError as exc:
        raise TokenCommandError(f"settings: {'; '.join(str(i) for i in exc.issues)}") from None


# -- the key ------------------------------------------------------------------------------------


class SigningKey:
    def __init__(self, key: Any, kid: str, alg: str) -> None:
        self.key = key
        self.kid = kid
        self.alg = alg


def _default_alg(key: Any) -> str:
    from joserfc.jwk import ECKey

    if isinstance(key, ECKey):
        curve = key.as_dict(private=False).get("crv")
        if curve == "P-384":
            return "ES384"
        if curve == "P-256":
            return "ES256"
        raise TokenCommandError(f"EC curve {curve} cannot sign a client assertion: use P-384 or P-256")
    return "RS384"


def load_private_key(path: Path, kid: str | None, alg: str | None) -> SigningKey:
    """The private key of `path` (PEM, a JWK, or a JWK Set of one key) with its kid and alg."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from joserfc.errors import JoseError
    from joserfc.jwk import ECKey, RSAKey

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TokenCommandError(f"--private-key {path}: {exc.strerror or exc}") from None
    jwk: dict[str, Any] | None = None
    key: Any
    try:
        if data.lstrip().startswith(b"{"):
            doc = json.loads(data)
            if isinstance(doc, dict) and isinstance(doc.get("keys"), list):
                if len(doc["keys"]) != 1:
                    raise TokenCommandError(f"--private-key {path}: a JWK Set must hold exactly one key here")
                doc = doc["keys"][0]
            if not isinstance(doc, dict):
                raise TokenCommandError(f"--private-key {path}: not a JWK (a JSON object)")
            jwk = doc
            kty = doc.get("kty")
            if kty == "EC":
                key = ECKey.import_key(doc)
            elif kty == "RSA":
                key = RSAKey.import_key(doc)
            else:
                raise TokenCommandError(f"--private-key {path}: kty must be EC or RSA, not {kty!r}")
        else:
            loaded = load_pem_private_key(data, password=None)
            if isinstance(loaded, ec.EllipticCurvePrivateKey):
                key = ECKey.import_key(data)
            elif isinstance(loaded, rsa.RSAPrivateKey):
                key = RSAKey.import_key(data)
            else:
                raise TokenCommandError(f"--private-key {path}: an EC or RSA private key is needed")
    except TokenCommandError:
        raise
    except (ValueError, TypeError, JoseError) as exc:
        detail = "not a PEM private key or a private JWK" if not str(exc) else _one_line(exc)
        raise TokenCommandError(f"--private-key {path}: {detail}") from None
    if not key.is_private:
        raise TokenCommandError(f"--private-key {path}: this is a public key; the private key is needed")
    alg = alg or (str(jwk["alg"]) if jwk is not None and jwk.get("alg") else None) or _default_alg(key)
    if alg not in ALGS:
        raise TokenCommandError(f"--private-key {path}: alg {alg} is not one of {', '.join(ALGS)}")
    if (alg.startswith("ES")) != isinstance(key, ECKey):
        raise TokenCommandError(
            f"--private-key {path}: a {alg} assertion needs an {'EC' if alg[0] == 'E' else 'RSA'} key"
        )
    if kid is None:
        kid = str(jwk["kid"]) if jwk is not None and jwk.get("kid") else key.thumbprint()
    return SigningKey(key, kid, alg)


def client_assertion(key: SigningKey, client_id: str, token_url: str) -> str:
    from joserfc import jwt

    now = int(time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": token_url,
        "iat": now,
        "exp": now + ASSERTION_LIFETIME,
        "jti": secrets.token_urlsafe(24),
    }
    header = {"alg": key.alg, "kid": key.kid, "typ": "JWT"}
    return jwt.encode(header, claims, key.key, algorithms=[key.alg])


# -- HTTP ---------------------------------------------------------------------------------------


def _get_json(client: Any, url: str) -> tuple[int, Any]:
    import httpx

    try:
        response = client.get(url, headers={"Accept": "application/json"})
    except httpx.HTTPError as exc:
        raise TokenCommandError(f"cannot reach {url}: {type(exc).__name__}: {exc}") from None
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, None


def discover_token_endpoint(issuer: str) -> str:
    """The `token_endpoint` of the issuer's metadata (OpenID Connect Discovery, then RFC 8414)."""
    import httpx

    issuer = issuer.rstrip("/")
    parts = urlsplit(issuer)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TokenCommandError(f"--issuer {issuer!r} is not an http(s) URL")
    candidates = [
        issuer + "/.well-known/openid-configuration",
        urlunsplit(
            (parts.scheme, parts.netloc, "/.well-known/oauth-authorization-server" + parts.path, "", "")
        ),
    ]
    tried = []
    with httpx.Client(timeout=TIMEOUT, follow_redirects=False) as client:
        for url in candidates:
            status, doc = _get_json(client, url)
            if status != 200 or not isinstance(doc, dict):
                tried.append(f"{url} (HTTP {status})")
                continue
            if str(doc.get("issuer", "")).rstrip("/") != issuer:
                raise TokenCommandError(
                    f"{url} names issuer {doc.get('issuer')!r}, not {issuer!r}: refusing its metadata"
                )
            endpoint = doc.get("token_endpoint")
            if not isinstance(endpoint, str) or not endpoint:
                raise TokenCommandError(f"{url} has no token_endpoint")
            return endpoint
    raise TokenCommandError("no authorization server metadata at " + ", ".join(tried))


def fetch_token(args: argparse.Namespace, token_url: str, key: SigningKey | None) -> str:
    import base64

    import httpx

    form = {"grant_type": "client_credentials", "scope": args.scope}
    headers = {"Accept": "application/json"}
    if key is not None:
        form["client_assertion_type"] = ASSERTION_TYPE
        form["client_assertion"] = client_assertion(key, args.client_id, token_url)
    elif args.secret_method == "post":  # noqa: S105 - an option value, not a secret
        form["client_id"] = args.client_id
        form["client_secret"] = args.client_secret
    else:
        pair = f"{quote(args.client_id, safe='')}:{quote(args.client_secret, safe='')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    try:
        with httpx.Client(timeout=TIMEOUT, follow_redirects=False) as client:
            response = client.post(token_url, data=form, headers=headers)
    except httpx.HTTPError as exc:
        raise TokenCommandError(f"cannot reach {token_url}: {type(exc).__name__}: {exc}") from None
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise TokenCommandError(f"{token_url}: HTTP {response.status_code}, not an OAuth 2.0 JSON response")
    if response.status_code != 200 or "error" in body:
        error = body.get("error", f"HTTP {response.status_code}")
        description = body.get("error_description")
        raise TokenCommandError(f"{error}: {description}" if description else str(error))
    token = body.get("access_token")
    if not isinstance(token, str) or not token:
        raise TokenCommandError(f"{token_url}: the response has no access_token")
    return token
