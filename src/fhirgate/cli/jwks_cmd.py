"""`fhirgate jwks-to-pem SOURCE [--kid KID]`: print the public keys of a JWKS (a URL, a file or
stdin) as SubjectPublicKeyInfo PEM, ready for a Kong `jwt_secrets` credential's `rsa_public_key`.

This replaces the script of the article fhirgate starts from (JWKS `n`, `e` -> `RSAPublicNumbers`
-> PEM, `keys[0]` only) with one that reads every key type Kong's `jwt` plugin verifies, says which
key is which, and refuses what it cannot convert instead of printing something wrong.

Fetching a URL is done as the `openid-connect` plugin will: TLS verified, a total time limit, a
size cap, and no redirect to another host (a JWKS served from elsewhere is not the issuer's).
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from typing import IO, TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit

from fhirgate import __version__

if TYPE_CHECKING:  # imported when the command runs, so `fhirgate --help` stays light
    from fhirgate.tokens.jwk import Jwk, JwkSet, SkippedKey

__all__ = ["MAX_BYTES", "TIMEOUT", "SourceError", "jwks_to_pem", "read_source", "register"]

#: Largest JWKS read from a URL, a file or stdin (real ones are a few KiB).
MAX_BYTES = 1 << 20
#: Seconds allowed for fetching a URL: connecting, each read, and the whole body.
TIMEOUT = 10.0
MAX_REDIRECTS = 5

_CHUNK = 64 * 1024


class SourceError(Exception):
    """SOURCE could not be read. The message is one line: what is wrong and how to fix it."""


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add `jwks-to-pem SOURCE [--kid KID]` to the `fhirgate` command line."""
    parser = subparsers.add_parser(
        "jwks-to-pem",
        help="print the public keys of a JWKS as PEM (for a jwt_secrets credential)",
        description="Read a JWKS from an http(s) URL, a file or '-' (stdin) and print each public key "
        "(RSA, EC, OKP) as a SubjectPublicKeyInfo PEM, the form Kong's jwt plugin takes in "
        "rsa_public_key, each after a line naming its kid, kty and alg. With --kid, print only that "
        "key's PEM. Exits 1 with an 'error:' line on stderr when nothing usable can be printed.",
    )
    parser.add_argument("source", metavar="SOURCE", help="https://... URL, file path, or - for stdin")
    parser.add_argument("--kid", metavar="KID", help="print only the PEM of the key with this kid")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    return jwks_to_pem(args.source, kid=args.kid)


def jwks_to_pem(
    source: str,
    kid: str | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    *,
    stdin: IO[bytes] | None = None,
    timeout: float = TIMEOUT,
    max_bytes: int = MAX_BYTES,
) -> int:
    """Run the command. Returns the exit status: 0 printed, 1 bad or unreachable input."""
    from fhirgate.tokens.jwk import JwkError, describe, parse_jwks, to_pem

    out = out or sys.stdout
    err = err or sys.stderr
    shown = _display_source(source)
    try:
        document = read_source(source, stdin=stdin, timeout=timeout, max_bytes=max_bytes, err=err)
        jwks = parse_jwks(document)
    except (SourceError, JwkError) as exc:
        print(f"error: {shown}: {_one_line(str(exc))}", file=err)
        return 1
    _warn_private(jwks, err)
    if kid is not None:
        return _print_one(jwks, kid, shown, out, err)
    for skipped in jwks.skipped:
        print(f"warning: skipping {_name(skipped)}: {_one_line(skipped.error.message)}", file=err)
    if not jwks.keys:
        print(
            f"error: {shown}: none of its {len(jwks.skipped)} key(s) can be written as a PEM public key "
            "(see the warnings above); fhirgate reads RSA, EC (P-256, P-384, P-521) and OKP "
            "(Ed25519, Ed448) public keys",
            file=err,
        )
        return 1
    blocks = [f"{describe(key)}\n{to_pem(key)}" for key in jwks.keys]
    out.write("\n".join(blocks))
    out.flush()
    return 0


def _print_one(jwks: JwkSet, kid: str, source: str, out: TextIO, err: TextIO) -> int:
    from fhirgate.tokens.jwk import to_pem

    matches = jwks.by_kid(kid)
    if len(matches) == 1:
        out.write(to_pem(matches[0]))
        out.flush()
        return 0
    shown = _quote(kid)
    if matches:
        print(
            f"error: {source}: {len(matches)} keys have kid {shown}, so it does not name one key; "
            "run without --kid to see them all",
            file=err,
        )
        return 1
    for skipped in jwks.skipped:
        if skipped.kid == kid:
            print(
                f"error: {source}: key {shown} cannot be converted: {_one_line(skipped.error.message)}",
                file=err,
            )
            return 1
    known = [_quote(key.kid) for key in jwks.keys if key.kid is not None]
    listing = f"the kids in this JWKS are {', '.join(known)}" if known else "no key in this JWKS has a kid"
    print(f"error: {source}: no key with kid {shown}; {listing} (run without --kid to see them)", file=err)
    return 1


def _quote(kid: str) -> str:
    """A kid as shown in messages: JSON-quoted, so whatever it contains stays on one line."""
    return json.dumps(kid, ensure_ascii=True)


def _name(key: Jwk | SkippedKey) -> str:
    from fhirgate.tokens.jwk import SkippedKey

    kid = f" (kid {_quote(key.kid)})" if key.kid is not None else ""
    if isinstance(key, SkippedKey):
        return f"key #{key.index}{kid}"
    return f"the {key.kty} key{kid}" if kid else f"the {key.kty} key without kid"


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return _one_line(text)


def _warn_private(jwks: JwkSet, err: TextIO) -> None:
    # A published JWKS must hold public keys only (RFC 7517 §9): private members
    # mean the private key itself has leaked. Say so loudly; only public parts are ever printed.
    entries: list[Jwk | SkippedKey] = [*jwks.keys, *jwks.skipped]
    for entry in entries:
        if entry.private_members:
            names = ", ".join(entry.private_members)
            print(
                f"warning: {_name(entry)} carries private members ({names}): this JWKS exposes a "
                "private key; only public parts are printed. Publish only public members and "
                "replace (rotate) that key.",
                file=err,
            )


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _display_source(source: str) -> str:
    """SOURCE as shown in messages: without a URL's password, on one line."""
    if "://" in source:
        try:
            parts = urlsplit(source)
        except ValueError:
            parts = urlsplit("")
        if parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            source = parts._replace(netloc=f"{parts.username}:***@{host}").geturl()
    return source if source.isprintable() else json.dumps(source, ensure_ascii=True)


# --------------------------------------------------------------------------------------------
# Reading SOURCE


def read_source(
    source: str,
    *,
    stdin: IO[bytes] | None = None,
    timeout: float = TIMEOUT,
    max_bytes: int = MAX_BYTES,
    err: TextIO | None = None,
) -> bytes:
    """The bytes of SOURCE: an http(s) URL, `-` for stdin, or a file path. Raises `SourceError`."""
    scheme = source.split("://", 1)[0].lower() if "://" in source else ""
    if scheme in ("http", "https"):
        return fetch_url(source, timeout=timeout, max_bytes=max_bytes, err=err)
    if scheme and scheme.isalpha():
        raise SourceError(f"unsupported URL scheme {scheme}://; give an http(s):// URL or a file path")
    if source == "-":
        stream = stdin if stdin is not None else sys.stdin.buffer
        return _capped(stream.read(max_bytes + 1), max_bytes, "stdin")
    try:
        with open(source, "rb") as handle:
            return _capped(handle.read(max_bytes + 1), max_bytes, "the file")
    except FileNotFoundError:
        raise SourceError("no such file; give a path to a JWKS file, an http(s):// URL, or - for stdin")
    except IsADirectoryError:
        raise SourceError("is a directory; give a path to a JWKS file")
    except OSError as exc:
        raise SourceError(f"cannot read the file: {exc.strerror or exc}")


def _capped(data: bytes, max_bytes: int, what: str) -> bytes:
    if len(data) > max_bytes:
        raise SourceError(f"{what} is larger than {_size(max_bytes)}, too large for a JWKS")
    return data


def _size(n: int) -> str:
    return f"{n // (1 << 20)} MiB" if n % (1 << 20) == 0 else f"{n} bytes"


class _RedirectRefused(Exception):
    pass


class _SameHostRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to the same host, and never from https down to http: a JWKS served
    from another host is not the issuer's keys (the same rule the openid-connect plugin applies)."""

    max_redirections = MAX_REDIRECTS

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        old, new = urlsplit(req.full_url), urlsplit(newurl)
        if (new.hostname or "").lower() != (old.hostname or "").lower():
            fp.close()
            raise _RedirectRefused(
                f"redirected ({code}) to another host, {new.hostname}, which is refused: a JWKS must come "
                f"from its issuer's host; use the final URL if you trust it ({_safe_url(newurl)})"
            )
        if new.scheme not in ("http", "https") or (old.scheme == "https" and new.scheme != "https"):
            fp.close()
            raise _RedirectRefused(
                f"redirected ({code}) from https to {new.scheme}, which is refused; use an https URL"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _safe_url(url: str) -> str:
    return url if url.isprintable() and len(url) <= 300 else repr(url[:300])


def is_loopback(host: str | None) -> bool:
    """`localhost` or a loopback address (where plain http leaks nothing to the network)."""
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def fetch_url(
    url: str, *, timeout: float = TIMEOUT, max_bytes: int = MAX_BYTES, err: TextIO | None = None
) -> bytes:
    """GET a JWKS over http(s): TLS verified, `timeout` seconds in all, at most `max_bytes`,
    redirects only to the same host. Raises `SourceError` with a one-line reason."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise SourceError(f"invalid URL ({exc}); check the URL")
    if parts.scheme not in ("http", "https"):
        raise SourceError("only http:// and https:// URLs can be fetched")
    if parts.username is not None or parts.password is not None:
        raise SourceError(
            "credentials in the URL are not supported (a JWKS is public); remove them, or download "
            "the JWKS and pass the file"
        )
    if not parts.hostname:
        raise SourceError("the URL has no host; give a URL such as https://idp.example/.well-known/jwks.json")
    if parts.scheme == "http" and not is_loopback(parts.hostname) and err is not None:
        print(
            "warning: fetching keys over plain http: anyone on the network path could substitute "
            "their own keys; use the https URL",
            file=err,
        )
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=ssl.create_default_context()), _SameHostRedirects()
    )
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked above (http/https only)
        url,
        headers={
            "Accept": "application/jwk-set+json, application/json",
            "User-Agent": f"fhirgate/{__version__}",
        },
    )
    deadline = time.monotonic() + timeout
    try:
        with opener.open(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise SourceError(
                    f"the response is {declared} bytes, more than the {_size(max_bytes)} allowed for a JWKS; "
                    "check the URL points at the JWKS (jwks_uri)"
                )
            chunks: list[bytes] = []
            total = 0
            while True:
                if time.monotonic() > deadline:
                    raise SourceError(
                        f"timed out after {timeout:g} s reading the response; try again or "
                        "save the JWKS to a file"
                    )
                chunk = response.read(_CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise SourceError(
                        f"the response is larger than the {_size(max_bytes)} allowed for a JWKS; "
                        "check the URL points at the JWKS (jwks_uri)"
                    )
                chunks.append(chunk)
            return b"".join(chunks)
    except _RedirectRefused as exc:
        raise SourceError(str(exc))
    except urllib.error.HTTPError as exc:
        exc.close()
        raise SourceError(
            f"the server answered HTTP {exc.code} {exc.reason}; check the URL (the IdP's jwks_uri)"
        )
    except urllib.error.URLError as exc:
        raise SourceError(_network_reason(exc.reason, timeout))
    except TimeoutError:
        raise SourceError(f"timed out after {timeout:g} s; check the URL and that the host is reachable")
    except ssl.SSLError as exc:
        raise SourceError(f"TLS failed: {exc.reason or exc}")
    except (OSError, http.client.HTTPException) as exc:
        raise SourceError(f"cannot fetch: {_reason(exc)}; check the URL and that the host is reachable")
    except ValueError as exc:  # malformed URL (bad port, ...)
        raise SourceError(f"invalid URL: {exc}")


def _network_reason(reason: object, timeout: float) -> str:
    if isinstance(reason, ssl.SSLCertVerificationError):
        return (
            f"the server's TLS certificate could not be verified ({reason.verify_message}); fhirgate "
            "always verifies TLS: fix the certificate, or download the JWKS and pass the file"
        )
    if isinstance(reason, TimeoutError):
        return f"timed out after {timeout:g} s; check the URL and that the host is reachable"
    if isinstance(reason, socket.gaierror):
        return "the host name could not be resolved; check the URL"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused; check the URL (host and port) and that the server is running"
    if isinstance(reason, OSError):
        return f"cannot connect: {reason.strerror or reason}; check the URL and that the host is reachable"
    return f"cannot fetch: {reason}; check the URL and that the host is reachable"
