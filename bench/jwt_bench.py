#!/usr/bin/env python3
"""JWT benchmark: fhirgate's `jwt` and `openid-connect` plugins (RS256) against nginx as a proxy and
HAProxy's `jwt_verify`.

One run starts the static FHIR upstream (nginx #1), nginx #2 as a plain reverse proxy, fhirgate with
the `jwt` plugin (one consumer whose `jwt_secrets` credential holds an RS256 2048-bit public key,
`claims_to_verify: [exp]`), a second fhirgate with `openid-connect` (issuer = a static nginx serving
`/.well-known/openid-configuration` and `/jwks.json` on `ISSUER_PORT`, `audience_required` = the
tokens' `aud`) and HAProxy 2.6 verifying the same tokens with `jwt_verify`, all in front of the same
upstream; then it loads every target with wrk in alternating rounds after a warm-up:

- with one token repeated (fhirgate: verified-token cache hits; HAProxy verifies every request),
- with a distinct valid token per request (every request verified), from a set of pre-minted
  tokens cached on disk under bench/results/tmp/ and larger than the requests of any round.

It reports req/s, p50, p99, CPU per request, the ratios to nginx and HAProxy and the bars of issue 3
(a report, not a test: it never exits non-zero because a bar is missed).

    python bench/jwt_bench.py [--quick] [--duration S] [--runs N] [--workers W] [--tokens N]

It reuses proxy_bench.py's pieces (processes, nginx configurations, wrk parsing, CPU accounting,
machine facts, path scrubbing). See bench/README.md.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import hashlib
import http.client
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

sys.path.insert(0, str(Path(__file__).resolve().parent))  # proxy_bench, imported as a module

import proxy_bench as pb

BENCH_DIR = pb.BENCH_DIR
REQUEST_PATH = pb.REQUEST_PATH
TOKEN_DIR = BENCH_DIR / "results" / "tmp" / "jwt-tokens"  # git-ignored (bench/results/tmp/)
# The `iss` claim: the credential's `key` for `jwt` (Kong's key_claim_name) and the issuer identifier
# for `openid-connect`, whose discovery document is served on this fixed port (the tokens carry it, so
# it cannot be a port picked at run time; if it is busy, the openid-connect targets are skipped).
ISSUER_PORT = 47281
ISSUER = f"http://127.0.0.1:{ISSUER_PORT}"
AUDIENCE = "https://fhir.bench.fhirgate.test/r4"  # the `aud` claim = openid-connect's audience_required
TOKEN_LIFETIME_S = 30 * 86400  # minted tokens stay valid 30 days; re-minted when fewer than 2 remain
TOKEN_MIN_REMAINING_S = 2 * 86400
DEFAULT_TOKENS = 300_000
BASELINE = "nginx-proxy"
HAPROXY_PEER = {
    "fhirgate-jwt-cached": "haproxy-jwt",
    "fhirgate-jwt-distinct": "haproxy-jwt-distinct",
    "fhirgate-oidc-cached": "haproxy-jwt",
    "fhirgate-oidc-distinct": "haproxy-jwt-distinct",
}

# Bars of issue 3, §5 (for jwt and openid-connect alike): (target, reference target, factor, label)
BARS: tuple[tuple[str, str, float, str], ...] = tuple(
    bar
    for key, name in (("jwt", "jwt"), ("oidc", "openid-connect"))
    for bar in (
        (
            f"fhirgate-{key}-cached",
            BASELINE,
            0.7,
            f"fhirgate {name}, one token (cached): req/s >= 0.7 x nginx proxy",
        ),
        (
            f"fhirgate-{key}-cached",
            "haproxy-jwt",
            1.0,
            f"fhirgate {name}, one token (cached): req/s >= 1.0 x HAProxy",
        ),
        (
            f"fhirgate-{key}-distinct",
            "haproxy-jwt-distinct",
            0.8,
            f"fhirgate {name}, distinct tokens (uncached): req/s >= 0.8 x HAProxy (distinct tokens)",
        ),
    )
)

say = pb.say
loud = pb.loud


# ------------------------------------------------------------------------------------- the tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _segment(value: Any) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


_SIGNER: Any = None


def _init_signer(key_pem: bytes) -> None:
    global _SIGNER
    _SIGNER = serialization.load_pem_private_key(key_pem, password=None)


def mint(key: Any, claims: dict[str, Any]) -> str:
    """A compact RS256 JWS (RFC 7515 §7.1) signed with `key` (a `cryptography` RSA private key)."""
    signing_input = f"{_segment({'alg': 'RS256', 'typ': 'JWT'})}.{_segment(claims)}"
    signature = key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(signature)}"


def token_claims(i: int, iat: int, exp: int) -> dict[str, Any]:
    """Claims of token number `i`: fixed width, so every token has the same length."""
    return {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": f"Patient/{i:08d}",
        "iat": iat,
        "exp": exp,
        "jti": f"bench-{i:010d}",
    }


def _mint_range(args: tuple[int, int, int, int]) -> list[str]:
    start, stop, iat, exp = args
    return [mint(_SIGNER, token_claims(i, iat, exp)) for i in range(start, stop)]


class TokenSet:
    """The benchmark's signing key and pre-minted tokens, cached on disk (`TOKEN_DIR`) and reused
    across runs: `key.pem` (private), `public.pem`, `tokens.txt` (one token a line), `meta.json`."""

    def __init__(self, directory: Path = TOKEN_DIR) -> None:
        self.dir = directory
        self.key_file = directory / "key.pem"
        self.public_file = directory / "public.pem"
        self.tokens_file = directory / "tokens.txt"
        self.meta_file = directory / "meta.json"
        self.meta: dict[str, Any] = {}

    def ensure(self, count: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.key_file.exists():
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.key_file.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            self.key_file.chmod(0o600)
            self.public_file.write_bytes(
                key.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
            with contextlib.suppress(FileNotFoundError):
                self.meta_file.unlink()
        key_sha = hashlib.sha256(self.public_file.read_bytes()).hexdigest()
        with contextlib.suppress(OSError, ValueError):
            self.meta = json.loads(self.meta_file.read_text())
        now = time.time()
        fresh = (
            self.meta.get("key_sha256") == key_sha
            and self.meta.get("iss") == ISSUER
            and self.meta.get("aud") == AUDIENCE
            and self.meta.get("count", 0) >= count
            and self.meta.get("exp", 0) - now >= TOKEN_MIN_REMAINING_S
            and self.tokens_file.exists()
            and self.tokens_file.stat().st_size == self.meta.get("bytes")
        )
        if fresh:
            say(
                f"tokens: reusing {self.meta['count']:,} pre-minted RS256 tokens "
                f"(minted {self.meta['minted']}, valid until {self.meta['exp_iso']}): {self.tokens_file}"
            )
            return
        iat = int(now)
        exp = iat + TOKEN_LIFETIME_S
        workers = max(1, len(os.sched_getaffinity(0)))
        say(f"tokens: minting {count:,} RS256 tokens (2048-bit key) on {workers} processes, once ...")
        t0 = time.monotonic()
        chunk = 5000
        ranges = [(i, min(i + chunk, count), iat, exp) for i in range(0, count, chunk)]
        tmp = self.tokens_file.with_suffix(".tmp")
        length = None
        with (
            ProcessPoolExecutor(
                workers, initializer=_init_signer, initargs=(self.key_file.read_bytes(),)
            ) as ex,
            tmp.open("w") as fh,
        ):
            for tokens in ex.map(_mint_range, ranges):
                for tok in tokens:
                    if length is None:
                        length = len(tok)
                    elif len(tok) != length:
                        raise RuntimeError("minted tokens differ in length")
                    fh.write(tok + "\n")
        tmp.replace(self.tokens_file)
        self.meta = {
            "count": count,
            "token_length": length,
            "bytes": self.tokens_file.stat().st_size,
            "key_sha256": key_sha,
            "iss": ISSUER,
            "aud": AUDIENCE,
            "iat": iat,
            "exp": exp,
            "exp_iso": dt.datetime.fromtimestamp(exp, dt.UTC).isoformat(timespec="seconds"),
            "minted": dt.datetime.fromtimestamp(iat, dt.UTC).isoformat(timespec="seconds"),
            "claims_example": token_claims(0, iat, exp),
            "mint_seconds": round(time.monotonic() - t0, 1),
        }
        self.meta_file.write_text(json.dumps(self.meta, indent=2) + "\n")
        say(f"tokens: minted {count:,} in {self.meta['mint_seconds']} s -> {self.tokens_file}")

    @property
    def count(self) -> int:
        n: int = self.meta["count"]
        return n

    def first(self) -> str:
        with self.tokens_file.open() as fh:
            return fh.readline().strip()

    def private_key(self) -> Any:
        return serialization.load_pem_private_key(self.key_file.read_bytes(), password=None)

    def public_pem(self) -> str:
        return self.public_file.read_text()

    def jwks(self) -> dict[str, Any]:
        """The public key as a JWKS (RFC 7517), what the issuer publishes at `/jwks.json`."""
        public = serialization.load_pem_public_key(self.public_file.read_bytes())
        if not isinstance(public, rsa.RSAPublicKey):
            raise TypeError("the benchmark key is not RSA")
        numbers = public.public_numbers()
        n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
        e = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
        return {"keys": [{"kty": "RSA", "use": "sig", "alg": "RS256", "n": _b64(n), "e": _b64(e)}]}


# wrk: a different Authorization header per request, from the pre-minted file. Thread k of T takes
# tokens offset+k, offset+k+T, ... so no token repeats within a run while requests < count.
WRK_LUA = """\
-- fhirgate jwt bench: one distinct pre-minted token per request
local threads_started = 0
function setup(thread)
  thread:set("tid", threads_started)
  threads_started = threads_started + 1
end

local tokens = {}
local n, i, step = 0, 0, 1
function init(args)
  local path, offset = args[1], tonumber(args[2])
  step = tonumber(args[3])
  for line in io.lines(path) do
    n = n + 1
    tokens[n] = "Bearer " .. line
  end
  i = (offset + tid) % n
end

function request()
  i = i + step
  if i > n then i = i - n end
  return wrk.format(nil, nil, { ["Authorization"] = tokens[i] })
end
"""


# ---------------------------------------------------------------------------------- configurations


def gateway_oidc_conf(upstream_port: int) -> str:
    return (
        pb.service_yaml(upstream_port) + "plugins:\n"
        "  - name: openid-connect\n"
        "    config:\n"
        f"      issuer: {ISSUER}\n"
        "      audience_required:\n"
        f"        - {AUDIENCE}\n"
    )


def nginx_issuer_conf(d: Path, root: Path, port: int) -> str:
    return (
        "# fhirgate bench: nginx #3, the issuer (a static discovery document and JWKS)\n"
        "worker_processes 1;\n"
        f"{pb.nginx_common(d)}"
        "    types { }\n"
        "    default_type application/json;\n"
        "    server {\n"
        f"        listen 127.0.0.1:{port};\n"
        f"        root {root};\n"
        '        add_header Cache-Control "max-age=3600";\n'
        "    }\n"
        "}\n"
    )


def write_issuer_files(root: Path, tokens: TokenSet) -> None:
    """`/.well-known/openid-configuration` (issuer `ISSUER`, `jwks_uri`) and `/jwks.json`."""
    well_known = root / ".well-known"
    well_known.mkdir(parents=True, mode=0o755)
    discovery = {"issuer": ISSUER, "jwks_uri": f"{ISSUER}/jwks.json"}
    (well_known / "openid-configuration").write_text(json.dumps(discovery) + "\n")
    (root / "jwks.json").write_text(json.dumps(tokens.jwks()) + "\n")
    for path in (root, well_known, well_known / "openid-configuration", root / "jwks.json"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def issuer_ready(port: int, timeout: float = 10.0) -> str | None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
        try:
            conn.request("GET", "/.well-known/openid-configuration")
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                return None
            last = f"HTTP {resp.status}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
        time.sleep(0.1)
    return f"the issuer on port {port} is not ready (last: {last})"


def gateway_jwt_conf(upstream_port: int, public_pem: str) -> str:
    pem = "".join(f"          {line}\n" for line in public_pem.strip().splitlines())
    return (
        pb.service_yaml(upstream_port) + "consumers:\n"
        "  - username: bench-client\n"
        "    jwt_secrets:\n"
        f"      - key: {ISSUER}\n"
        "        algorithm: RS256\n"
        "        rsa_public_key: |\n"
        f"{pem}"
        "plugins:\n"
        "  - name: jwt\n"
        "    config:\n"
        "      claims_to_verify:\n"
        "        - exp\n"
    )


def haproxy_conf(port: int, upstream_port: int, threads: int, pub_pem: Path) -> str:
    return (
        "# fhirgate bench: HAProxy 2.6 verifying RS256 JWTs with jwt_verify, in front of the upstream\n"
        "global\n"
        f"    nbthread {threads}\n"
        "    maxconn 4096\n"
        "defaults\n"
        "    mode http\n"
        "    timeout connect 5s\n"
        "    timeout client 65s\n"
        "    timeout server 65s\n"
        "    timeout http-keep-alive 65s\n"
        "    option http-keep-alive\n"
        "    http-reuse always\n"
        "frontend fhir\n"
        f"    bind 127.0.0.1:{port}\n"
        "    http-request set-var(txn.bearer) http_auth_bearer\n"
        "    http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')\n"
        "    http-request deny deny_status 401 unless { var(txn.alg) -m str RS256 }\n"
        f'    http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_verify(txn.alg,"{pub_pem}") '
        "-m int 1 }\n"
        "    # exp, as fhirgate's claims_to_verify: [exp] (expired when exp <= now)\n"
        "    http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('$.exp','int')\n"
        "    http-request set-var(txn.now) date()\n"
        "    http-request deny deny_status 401 if { var(txn.exp),sub(txn.now) -m int le 0 }\n"
        "    default_backend upstream\n"
        "backend upstream\n"
        f"    server fhir 127.0.0.1:{upstream_port}\n"
    )


def find_haproxy() -> str:
    found = pb.find_exe("haproxy")
    if found is not None:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise SystemExit("haproxy is missing: apt-get install -y haproxy (as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "haproxy"]
    say(f"tools: haproxy missing -> running: {' '.join(cmd)}")
    if subprocess.run(cmd, env=env).returncode != 0:
        subprocess.run(["apt-get", "update"], check=True, env=env)
        subprocess.run(cmd, check=True, env=env)
    found = pb.find_exe("haproxy")
    if found is None:
        raise SystemExit("haproxy still not found after installing")
    return found


# ---------------------------------------------------------------------------------------- requests


def bearer(token: str | None) -> dict[str, str] | None:
    return {"Authorization": f"Bearer {token}"} if token is not None else None


def get(port: int, token: str | None, timeout: float = 2.0) -> tuple[int, dict[str, str], bytes]:
    return pb.http_get(port, REQUEST_PATH, timeout, bearer(token))


def check_target(t: pb.Target, expected: bytes, good: str, bad: dict[str, str], verifies: bool) -> None:
    """The target returns the upstream's bytes for a valid token and, when it verifies tokens,
    refuses each bad one (evidence that verification is really on)."""
    status, headers, body = get(t.port, good)
    t.checks["status"] = status
    t.checks["body_identical"] = body == expected
    t.checks["content_type"] = headers.get("content-type")
    problems = []
    if status != 200 or body != expected:
        problems.append(f"valid token: status {status}, body identical {body == expected}")
    if verifies:
        refused = {}
        for name, tok in bad.items():
            bad_status = get(t.port, tok)[0]
            refused[name] = bad_status
            if bad_status < 400:
                problems.append(f"{name} token answered {bad_status}")
        t.checks["refusals"] = refused
    if problems:
        loud(f"{t.label}: check failed: {'; '.join(problems)}")


def bad_tokens(tokens: TokenSet) -> dict[str, str]:
    key = tokens.private_key()
    now = int(time.time())
    good = tokens.first()
    head, _payload, sig = good.split(".")
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    tampered = _segment({**token_claims(1, now, now + 3600), "sub": "Patient/evil"})
    return {
        "expired": mint(key, token_claims(0, now - 7200, now - 3600)),
        "tampered_payload": f"{head}.{tampered}.{sig}",
        "other_key": mint(other, token_claims(0, now, now + 3600)),
        "none": "none",
    }


# ------------------------------------------------------------------------------------------ runs


class Load:
    """What wrk sends to a target: one fixed token (`-H`) or a distinct token per request (Lua)."""

    def __init__(self, kind: str, token: str, script: Path, tokens: TokenSet) -> None:
        self.kind = kind  # "one-token" | "distinct"
        self.token = token
        self.script = script
        self.tokens = tokens

    def cmd(self, wrk: str, args: argparse.Namespace, port: int, duration: float, offset: int) -> list[str]:
        base = [wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{duration:g}s", "--latency"]
        url = f"http://127.0.0.1:{port}{REQUEST_PATH}"
        if self.kind == "one-token":
            return [*base, "-H", f"Authorization: Bearer {self.token}", url]
        return [
            *base,
            "-s",
            str(self.script),
            url,
            "--",
            str(self.tokens.tokens_file),
            str(offset),
            str(args.threads),
        ]


# ------------------------------------------------------------------------------------------ bench


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_gateway(
    args: argparse.Namespace,
    procs: pb.Processes,
    gw_dir: Path,
    plugin: str,
    conf: str,
    port: int,
    one_token: str,
    description: str,
    skip: str | None = None,
) -> tuple[pb.Target, pb.Target]:
    """One fhirgate process with `plugin` (`conf`), as two targets: one token repeated (verified-token
    cache hits) and a distinct token per request (every request verified)."""
    short = "jwt" if plugin == "jwt" else "oidc"
    gw_dir.mkdir()
    gw_file = gw_dir / f"{short}.yaml"
    gw_file.write_text(conf)
    gw_cmd = [
        sys.executable,
        "-m",
        args.gateway_module,
        "gateway",
        "--config",
        str(gw_file),
        "--listen",
        f"127.0.0.1:{port}",
        "--workers",
        str(args.workers),
    ]
    cached = pb.Target(
        f"fhirgate-{short}-cached",
        f"fhirgate {plugin}, one token ({args.workers}w)",
        "gateway",
        port,
        f"{description}; one token repeated: verified-token cache hits",
        command=gw_cmd,
        config_file=str(gw_file),
        config_text=conf,
    )
    distinct = pb.Target(
        f"fhirgate-{short}-distinct",
        f"fhirgate {plugin}, distinct tokens ({args.workers}w)",
        "gateway",
        port,
        "the same fhirgate process; a distinct valid token per request: every request verified",
        command=gw_cmd,
        config_file=str(gw_file),
        config_text=conf,
    )
    pair = (cached, distinct)
    if skip is None:
        skip = pb.gateway_available(args.gateway_module)
        if skip is not None:
            skip = f"the `fhirgate gateway` command is not available: {skip}"
    if skip is not None:
        for t in pair:
            t.skipped = skip
        loud(f"fhirgate {plugin} targets SKIPPED: {skip}")
        return pair
    proc = procs.start(f"fhirgate-{short}", gw_cmd, gw_dir / "gateway.log", cwd=gw_dir, env=pb.gateway_env())
    if (why := pb.wait_ready(proc, port, headers=bearer(one_token))) is not None:
        tail = proc.log_tail()
        loud(f"fhirgate {plugin} SKIPPED: {why}\n{tail}")
        procs.stop(proc)
        for t in pair:
            t.skipped, t.checks["log_tail"] = why, tail
    else:
        for t in pair:
            t.proc = proc
    return pair


def bench(
    args: argparse.Namespace,
    procs: pb.Processes,
    runner: pb.WrkRunner,
    nginx: str,
    wrk: str,
    haproxy: str,
    tmp: Path,
) -> int:
    tmp.chmod(0o755)  # nginx workers run as `nobody` when started by root: they must read the body
    started = dt.datetime.now(dt.UTC)
    tokens = TokenSet(args.token_dir)
    tokens.ensure(args.tokens)
    one_token = tokens.first()
    script = tmp / "distinct-tokens.lua"
    script.write_text(WRK_LUA)
    body = pb.patient_json()
    www = tmp / "www"
    www.mkdir(mode=0o755)
    (www / "patient.json").write_bytes(body)
    (www / "patient.json").chmod(0o644)
    pub_pem = tmp / "public.pem"
    pub_pem.write_text(tokens.public_pem())
    pub_pem.chmod(0o644)

    up_port, proxy_port, gw_port, oidc_port, ha_port = pb.free_ports(5)

    up_dir = tmp / "nginx-upstream"
    up_conf = pb.nginx_upstream_conf(up_dir, www, up_port)
    upstream = pb.Target("upstream-direct", "upstream", "reference", up_port, "nginx #1", config_text=up_conf)
    upstream.proc = pb.start_nginx(procs, nginx, "nginx-upstream", up_dir, up_conf)
    if (why := pb.wait_ready(upstream.proc, up_port)) is not None:
        raise SystemExit(f"upstream nginx did not start: {why}\n{upstream.proc.log_tail()}")

    px_dir = tmp / "nginx-proxy"
    px_conf = pb.nginx_proxy_conf(px_dir, proxy_port, up_port, args.workers)
    proxy = pb.Target(
        BASELINE,
        f"nginx proxy ({args.workers}w)",
        "baseline",
        proxy_port,
        "nginx #2 as a plain reverse proxy (no token check), same one-token requests",
        config_text=px_conf,
        config_file=str(px_dir / "nginx.conf"),
    )
    proxy.proc = pb.start_nginx(procs, nginx, "nginx-proxy", px_dir, px_conf)
    proxy.command = list(proxy.proc.popen.args)  # type: ignore[arg-type]
    if (why := pb.wait_ready(proxy.proc, proxy_port)) is not None:
        raise SystemExit(f"nginx proxy did not start: {why}\n{proxy.proc.log_tail()}")

    gw_cached, gw_distinct = start_gateway(
        args,
        procs,
        tmp / "fhirgate",
        "jwt",
        gateway_jwt_conf(up_port, tokens.public_pem()),
        gw_port,
        one_token,
        "fhirgate with jwt (RS256, claims_to_verify [exp])",
    )

    oidc_skip: str | None = None
    idp_dir = tmp / "nginx-issuer"
    idp_root = tmp / "issuer-www"
    write_issuer_files(idp_root, tokens)
    if not port_free(ISSUER_PORT):
        oidc_skip = f"the issuer's port {ISSUER_PORT} (fixed: the tokens' iss) is in use"
    else:
        idp_conf = nginx_issuer_conf(idp_dir, idp_root, ISSUER_PORT)
        idp_proc = pb.start_nginx(procs, nginx, "nginx-issuer", idp_dir, idp_conf)
        oidc_skip = issuer_ready(ISSUER_PORT)
        if oidc_skip is not None:
            oidc_skip += "\n" + idp_proc.log_tail()
    if oidc_skip is not None:
        loud(f"openid-connect targets SKIPPED: {oidc_skip}")
    oidc_cached, oidc_distinct = start_gateway(
        args,
        procs,
        tmp / "fhirgate-oidc",
        "openid-connect",
        gateway_oidc_conf(up_port),
        oidc_port,
        one_token,
        f"fhirgate with openid-connect (issuer {ISSUER}: discovery + JWKS from a static nginx, "
        "audience_required)",
        skip=oidc_skip,
    )
    gateways = [gw_cached, gw_distinct, oidc_cached, oidc_distinct]

    ha_dir = tmp / "haproxy"
    ha_dir.mkdir()
    ha_conf = haproxy_conf(ha_port, up_port, args.workers, pub_pem)
    ha_file = ha_dir / "haproxy.cfg"
    ha_file.write_text(ha_conf)
    ha_cmd = [haproxy, "-db", "-f", str(ha_file)]
    ha_one = pb.Target(
        "haproxy-jwt",
        f"HAProxy jwt_verify, one token ({args.workers}t)",
        "peer",
        ha_port,
        "HAProxy 2.6 verifying RS256 with jwt_verify (+ exp) on every request; one token repeated",
        command=ha_cmd,
        config_file=str(ha_file),
        config_text=ha_conf,
    )
    ha_distinct = pb.Target(
        "haproxy-jwt-distinct",
        f"HAProxy jwt_verify, distinct tokens ({args.workers}t)",
        "peer",
        ha_port,
        "the same HAProxy process; a distinct valid token per request",
        command=ha_cmd,
        config_file=str(ha_file),
        config_text=ha_conf,
    )
    check = subprocess.run([haproxy, "-c", "-f", str(ha_file)], capture_output=True, text=True)
    if check.returncode != 0:
        why = f"haproxy -c refused the configuration: {(check.stderr or check.stdout).strip()[-500:]}"
        loud(why)
        ha_one.skipped = ha_distinct.skipped = why
    else:
        ha_proc = procs.start("haproxy", ha_cmd, ha_dir / "haproxy.log", cwd=ha_dir, env=dict(os.environ))
        if (why := pb.wait_ready(ha_proc, ha_port, headers=bearer(one_token))) is not None:
            loud(f"HAProxy SKIPPED: {why}\n{ha_proc.log_tail()}")
            procs.stop(ha_proc)
            ha_one.skipped = ha_distinct.skipped = why
        else:
            ha_one.proc = ha_distinct.proc = ha_proc

    one = Load("one-token", one_token, script, tokens)
    distinct = Load("distinct", one_token, script, tokens)
    loads = {
        BASELINE: one,
        "fhirgate-jwt-cached": one,
        "fhirgate-jwt-distinct": distinct,
        "fhirgate-oidc-cached": one,
        "fhirgate-oidc-distinct": distinct,
        "haproxy-jwt": one,
        "haproxy-jwt-distinct": distinct,
    }
    targets = [proxy, *gateways, ha_one, ha_distinct]
    active = [t for t in targets if t.skipped is None]
    bad = bad_tokens(tokens)
    for t in active:
        if t.key in (gw_distinct.key, oidc_distinct.key, ha_distinct.key):
            continue  # same process as its one-token twin
        check_target(t, body, one_token, bad, verifies=t.key != BASELINE)

    example = {
        kind: shlex.join(load.cmd("wrk", args, 0, args.duration, 0)).replace(":0/", ":PORT/")
        for kind, load in (("one_token", one), ("distinct_tokens", distinct))
    }
    example = {k: v.replace(one_token, "<token>").replace(str(tmp), "$TMP") for k, v in example.items()}
    say()
    say(
        f"method: wrk and every target share this machine's {os.cpu_count()} cores on loopback; "
        f"{args.runs} alternating rounds of {args.duration:g}s after a {args.warmup:g}s warm-up per target"
    )
    for kind, cmd in example.items():
        say(f"        {kind}: {cmd}")
    say()

    offset = 0  # next unused pre-minted token: no token is sent twice until the whole set is used
    used_max = 0

    def run_once(t: pb.Target, duration: float, rnd: int, pos: int) -> pb.Run:
        nonlocal offset, used_max
        load = loads[t.key]
        cmd = load.cmd(wrk, args, t.port, duration, offset)
        run = pb.measure_cmd(runner, cmd, duration, t, upstream, rnd, pos)
        if load.kind == "distinct":
            used = run.wrk["requests"] + args.connections
            used_max = max(used_max, used)
            if used >= tokens.count:
                loud(f"{t.label}: {used:,} requests >= {tokens.count:,} tokens: some tokens repeated")
            offset = (offset + used) % tokens.count
        return run

    if args.warmup > 0:
        for t in active:
            run_once(t, args.warmup, -1, 0)
            say(f"warm-up {t.label}: done")

    for rnd in range(args.runs):
        order = active[rnd % len(active) :] + active[: rnd % len(active)]
        for pos, t in enumerate(order):
            run = run_once(t, args.duration, rnd, pos)
            t.runs.append(run)
            r = run.wrk
            cpu_us = run.cpu_target_s * 1e6 / r["requests"] if r["requests"] else float("nan")
            flag = ("  <-- ERRORS" if run.flagged else "") + ("  (noisy)" if run.noisy else "")
            say(
                f"round {rnd + 1}/{args.runs} {t.label:<40} {r['rps']:>8.0f} req/s"
                f"  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  cpu {cpu_us:6.0f} us/req"
                f"  (wrk {run.cpu_wrk_s:4.2f}s, upstream {run.cpu_upstream_s:4.2f}s){flag}"
            )
            if run.flagged:
                loud(
                    f"{t.label} round {rnd + 1}: socket errors {r['socket_errors']}, non-2xx/3xx "
                    f"{r['non_2xx_3xx']}: NOT a clean measurement"
                )

    report = build_report(args, targets, started, nginx, wrk, haproxy, example, tokens, used_max, body)
    print_report(report)
    write_results(args.results_dir, report, tmp)
    return 0


# ------------------------------------------------------------------------------------------ report


def build_report(
    args: argparse.Namespace,
    targets: list[pb.Target],
    started: dt.datetime,
    nginx: str,
    wrk: str,
    haproxy: str,
    wrk_commands: dict[str, str],
    tokens: TokenSet,
    used_max: int,
    body: bytes,
) -> dict[str, Any]:
    summaries = {t.key: pb.summarize(t) for t in targets if t.skipped is None}
    for s in summaries.values():
        s["cpu_us_per_request"] = s["cpu_ms_per_1k_requests"]  # ms per 1k requests == us per request
    base = summaries.get(BASELINE)
    for key, s in summaries.items():
        s["rps_ratio_to_nginx"] = s["rps"] / base["rps"] if base and base["rps"] else float("nan")
        s["p99_ratio_to_nginx"] = s["p99_ms"] / base["p99_ms"] if base and base["p99_ms"] else float("nan")
        peer = summaries.get(HAPROXY_PEER.get(key, ""))
        s["rps_ratio_to_haproxy"] = s["rps"] / peer["rps"] if peer and peer["rps"] else float("nan")
    bars: list[dict[str, Any]] = []
    for key, ref, factor, label in BARS:
        gw, r = summaries.get(key), summaries.get(ref)
        if gw is None or r is None:
            why = next((t.skipped for t in targets if t.key in (key, ref) and t.skipped), "not measured")
            bars.append({"bar": label, "result": "SKIPPED", "why": why})
            continue
        ratio = gw["rps"] / r["rps"] if r["rps"] else float("nan")
        bars.append(
            {
                "bar": label,
                "result": "PASS" if ratio >= factor else "MISS",
                "ratio": ratio,
                "required": f">= {factor}",
                "runs_with_errors": gw["flagged_runs"] > 0 or r["flagged_runs"] > 0,
            }
        )
    return {
        "benchmark": "bench/jwt_bench.py",
        "timestamp": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": pb.machine_info(),
        "tools": {
            "nginx": pb.tool_version([nginx, "-v"]),
            "wrk": pb.tool_version([wrk, "-v"]),
            "haproxy": pb.tool_version([haproxy, "-v"]),
            "fhirgate_revision": pb.repo_revision(),
        },
        "method": {
            "note": (
                "wrk and the targets share the machine's cores on loopback; alternating round-robin rounds "
                "(first target rotating) after one warm-up run per target; figures are medians over rounds. "
                "One-token loads send the same Authorization header (wrk -H) to nginx, fhirgate and HAProxy; "
                "distinct-token loads send a different pre-minted token per request (wrk Lua script), to "
                "fhirgate and HAProxy. fhirgate and HAProxy each run one process for both loads."
            ),
            "wrk_commands": wrk_commands,
            "wrk_lua": WRK_LUA,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.runs,
            "connections": args.connections,
            "wrk_threads": args.threads,
            "workers": args.workers,
            "request": f"GET {REQUEST_PATH}",
            "body_bytes": len(body),
            "quick": args.quick,
            "tokens": {
                **{k: v for k, v in tokens.meta.items() if k != "key_sha256"},
                "most_used_by_one_run": used_max,
                "note": "distinct-token runs never repeat a token while requests < count; consecutive "
                "runs continue where the previous one stopped",
            },
            "cpu": "cpu_us_per_request: user+sys CPU of the target's processes per request (median)",
        },
        "targets": [pb.target_record(t) for t in targets],
        "medians": summaries,
        "bars": bars,
    }


def print_report(report: dict[str, Any]) -> None:
    m = report["method"]
    fmt = pb.fmt
    title = (
        f"median of {m['rounds']} rounds, {m['duration_s']:g}s each, {m['connections']} connections, "
        f"{m['workers']} workers - {report['machine']['cpu_model']}, {report['machine']['cores']} cores"
    )
    header = (
        "target",
        "req/s",
        "min-max",
        "p50 ms",
        "p99 ms",
        "/ nginx",
        "/ HAProxy",
        "CPU us/req",
        "errors",
    )
    rows = pb.target_rows(
        report,
        lambda s: (
            fmt(s["rps_ratio_to_nginx"], ".2f") + "x",
            fmt(s["rps_ratio_to_haproxy"], ".2f") + "x",
            fmt(s["cpu_us_per_request"], ".0f"),
        ),
        len(header),
    )
    say()
    pb.print_table(title, header, rows)
    say()
    say("bars (issue 3 §5; a report, never an exit status):")
    for b in report["bars"]:
        extra = (
            f"  ratio {b['ratio']:.2f} (required {b['required']})" if "ratio" in b else f"  ({b.get('why')})"
        )
        if b.get("runs_with_errors"):
            extra += "  -- runs had errors: not a valid measurement"
        style = {"PASS": "bold green", "MISS": "bold red"}.get(b["result"], "yellow")
        say(f"  {b['result']:<8} {b['bar']}{extra}", style=style)
    say()
    say("note: wrk and the targets share the same cores; compare ratios, not absolute figures.")


def write_results(results_dir: Path, report: dict[str, Any], tmp: Path) -> None:
    replacements = [(sys.executable, "python"), (str(tmp), "$TMP"), (str(pb.REPO_ROOT), "$REPO")]
    for tool in ("nginx", "wrk", "haproxy"):
        found = pb.find_exe(tool)
        if found:
            replacements.append((found, tool))
    pb.save_report(results_dir, "jwt_latest", report, replacements, plot)


def plot(report: dict[str, Any], path: Path) -> Path:
    """Median requests/s per target (ratios on each bar, the issue's bars as red lines) and p99."""
    plt = pb.pyplot()

    targets = report["targets"]
    med = report["medians"]
    colours = {"baseline": "#8c8c8c", "gateway": "#1f77b4", "peer": "#ff7f0e"}
    labels = [t["label"].replace(", ", "\n") for t in targets]
    xs = list(range(len(targets)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6.8))
    for ax, metric, ylabel in (
        (ax1, "rps", "requests/s (median of rounds; higher is better)"),
        (ax2, "p99_ms", "p99 latency, ms (median of rounds; lower is better)"),
    ):
        heights = [med[t["key"]][metric] if t["key"] in med else 0.0 for t in targets]
        points = [[r["wrk"][metric] for r in t["runs"]] for t in targets]
        top = max([1e-9, *heights, *(p for pts in points for p in pts)])
        bars = ax.bar(xs, heights, color=[colours[t["role"]] for t in targets], edgecolor="black", width=0.6)
        for i, t in enumerate(targets):
            if t["key"] not in med:
                ax.text(i, top * 0.03, "skipped", ha="center", va="bottom", color="#d62728")
                continue
            s = med[t["key"]]
            ax.scatter([i] * len(points[i]), points[i], color="black", s=14, zorder=3)
            if metric == "rps":
                text = f"{heights[i]:,.0f} req/s\n{s['rps_ratio_to_nginx']:.2f}x nginx"
                if s["rps_ratio_to_haproxy"] == s["rps_ratio_to_haproxy"]:
                    text += f"\n{s['rps_ratio_to_haproxy']:.2f}x HAProxy"
                text += f"\n{s['cpu_us_per_request']:.0f} us CPU/req"
            else:
                text = f"{heights[i]:.2f} ms\n{s['p99_ratio_to_nginx']:.2f}x nginx"
            ax.text(
                bars[i].get_x() + bars[i].get_width() / 2,
                max(heights[i], *points[i]) + top * 0.02,
                text,
                ha="center",
                va="bottom",
                fontsize=8.5,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1.5},
                zorder=4,
            )
        if metric == "rps":
            base = med.get(BASELINE)
            if base:
                ax.axhline(
                    base["rps"] * 0.7,
                    color="#d62728",
                    linestyle="--",
                    linewidth=1.2,
                    label="bar: cached >= 0.7x nginx",
                )
            for key, style, factor, label in (  # the same bars for jwt and openid-connect
                ("haproxy-jwt", ":", 1.0, "bar: cached >= 1.0x HAProxy"),
                ("haproxy-jwt-distinct", "-.", 0.8, "bar: distinct >= 0.8x HAProxy (distinct)"),
            ):
                if key in med:
                    ax.axhline(
                        med[key]["rps"] * factor, color="#d62728", linestyle=style, linewidth=1.0, label=label
                    )
            ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=8, rotation=25, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, top * 1.45)
        ax.grid(axis="y", alpha=0.3)
    mach, m = report["machine"], report["method"]
    fig.suptitle(
        "fhirgate jwt / openid-connect (RS256) vs nginx proxy and HAProxy 2.6 jwt_verify - "
        f"{mach['cpu_model']}, "
        f"{mach['cores']} cores, {report['timestamp'][:16].replace('T', ' ')} UTC\n"
        f"wrk -t{m['wrk_threads']} -c{m['connections']} -d{m['duration_s']:g}s | median of {m['rounds']} "
        f"alternating rounds after warm-up | {m['workers']} workers/threads"
        f"{'  |  QUICK run' if m['quick'] else ''}",
        fontsize=11,
    )
    verdicts = "   ".join(f"{b['result']}: {b['bar']}" for b in report["bars"])
    fig.text(0.5, 0.03, verdicts, ha="center", fontsize=7.5, wrap=True)
    return pb.finish_chart(fig, path, (0, 0.07, 1, 0.92))


# -------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=None, help="seconds per measured run (default 10)")
    p.add_argument("--warmup", type=float, default=None, help="seconds of the warm-up run per target (3)")
    p.add_argument("--runs", type=int, default=None, help="alternating rounds, at least 3 (default 3)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument(
        "--workers", type=int, default=2, help="fhirgate workers = nginx workers = HAProxy threads"
    )
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="pre-minted distinct tokens (300000)")
    p.add_argument("--token-dir", type=Path, default=TOKEN_DIR, help="where the tokens are cached")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 s runs, 1 s warm-up, 3 rounds")
    p.add_argument("--gateway-module", default="fhirgate.cli.main", help="python -m MODULE gateway ...")
    p.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = p.parse_args(argv)
    duration, warmup, runs = (3.0, 1.0, 3) if args.quick else (10.0, 3.0, 3)
    args.duration = args.duration if args.duration is not None else duration
    args.warmup = args.warmup if args.warmup is not None else warmup
    args.runs = args.runs if args.runs is not None else runs
    if args.runs < 3:
        p.error("--runs must be at least 3 (median of at least three alternating runs)")
    if (
        args.duration <= 0
        or args.warmup < 0
        or args.connections < 1
        or args.workers < 1
        or args.tokens < 1000
    ):
        p.error("durations, connections and workers must be positive; --tokens at least 1000")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tools: dict[str, str] = {}

    def find_wrk() -> str:
        tools["nginx"], wrk = pb.ensure_tools()
        tools["haproxy"] = find_haproxy()
        return wrk

    return pb.run_benchmark(
        "fhirgate-jwt-bench-",
        args.keep_tmp,
        find_wrk,
        lambda procs, runner, wrk, tmp: bench(
            args, procs, runner, tools["nginx"], wrk, tools["haproxy"], tmp
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
