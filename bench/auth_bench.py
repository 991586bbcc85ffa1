#!/usr/bin/env python3
"""Authorization server benchmark: tokens/s of `fhirgate auth-server`'s token endpoint for
`client_credentials` (issue 5, §6).

Cases, each against `fhirgate auth-server --workers 2` on loopback, loaded by wrk:

  a        client_secret_basic,                         RS256 access tokens, SQLite store
  b        private_key_jwt (ES384 assertions, jti kept), RS256 access tokens, SQLite  (bar: >= 500/s)
  c        private_key_jwt (ES384 assertions),           ES256 access tokens, SQLite
  d-basic  (a) on PostgreSQL (a fresh schema, dropped at the end)
  d-jwt    (b) on PostgreSQL

Every client assertion carries a unique `jti` and the server refuses a `jti` it has seen: before
each run the script mints a fresh pool of assertions (sized from the rate measured so far, x 1.5),
and wrk's Lua script (bench/lua/token_bodies.lua) sends each one once. A run with any non-2xx
response or socket error is flagged loudly. After a warm-up per case, alternating rounds; the
figures are the medians over rounds. It is a report, not a test: it exits 0 whether the bar passes.

    python bench/auth_bench.py --quick          # smoke run: 3 s runs, 1 s warm-up, 3 rounds
    python bench/auth_bench.py                  # full run: 10 s runs, 3 s warm-up, 3 rounds
    python bench/auth_bench.py --profile 15 --breakdown 1000   # ... plus where the time goes in case b

It reuses proxy_bench.py's pieces (processes, wrk runner, CPU accounting, machine facts, path
scrubbing, the lock that keeps two benchmarks from measuring each other). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import datetime as dt
import hashlib
import http.client
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # proxy_bench, imported as a module

import proxy_bench as pb

BENCH_DIR = pb.BENCH_DIR
REPO_ROOT = pb.REPO_ROOT
say = pb.say
loud = pb.loud

LUA_SCRIPT = BENCH_DIR / "lua" / "token_bodies.lua"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
FHIR_BASE = "https://fhir.bench.fhirgate.test/r4"  # the `aud` of the access tokens (never contacted)
SCOPE = "system/*.read"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_ALG = "ES384"
ASSERTION_LIFETIME_S = 240  # exp of a minted assertion: SMART allows at most 300 s ahead
READY_TIMEOUT_S = 60.0
WRK_TIMEOUT = "10s"
POOL_FACTOR = 2.0  # assertions minted per run: rate x duration x this (rates vary on a shared machine)
FIRST_RATE_GUESS = 3000.0  # tokens/s assumed before any private_key_jwt case was measured
NOISY_SHARE = pb.NOISY_SHARE

BAR_CASE = "b"
BAR_TOKENS_PER_S = 500.0


@dataclass(frozen=True)
class ServerSpec:
    key: str
    store: str  # "sqlite" | "postgresql"
    signing_alg: str


@dataclass(frozen=True)
class Case:
    id: str  # what --cases takes
    key: str
    label: str
    server: str  # ServerSpec.key
    auth: str  # "client_secret_basic" | "private_key_jwt"


SERVERS = (
    ServerSpec("sqlite-rs256", "sqlite", "RS256"),
    ServerSpec("sqlite-es256", "sqlite", "ES256"),
    ServerSpec("postgresql-rs256", "postgresql", "RS256"),
)
CASES = (
    Case("a", "secret-rs256-sqlite", "(a) secret, RS256, SQLite", "sqlite-rs256", "client_secret_basic"),
    Case("b", "jwt-rs256-sqlite", "(b) ES384 JWT, RS256, SQLite", "sqlite-rs256", "private_key_jwt"),
    Case("c", "jwt-es256-sqlite", "(c) ES384 JWT, ES256, SQLite", "sqlite-es256", "private_key_jwt"),
    Case(
        "d-basic",
        "secret-rs256-postgresql",
        "(d) secret, RS256, PostgreSQL",
        "postgresql-rs256",
        "client_secret_basic",
    ),
    Case(
        "d-jwt",
        "jwt-rs256-postgresql",
        "(d) ES384 JWT, RS256, PostgreSQL",
        "postgresql-rs256",
        "private_key_jwt",
    ),
)


# ------------------------------------------------------------------------------------------ servers


@dataclass
class Server:
    spec: ServerSpec
    port: int
    database: str  # the --database URL (PostgreSQL: with ?schema=)
    workdir: Path
    command: list[str] = field(default_factory=list)
    env_settings: dict[str, str] = field(default_factory=dict)
    proc: pb.Proc | None = None

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_url(self) -> str:
        return self.issuer + "/token"


@dataclass
class ClientSetup:
    client_id: str
    command: list[str]
    secret: str | None = None
    key: Any = None  # joserfc ECKey (private_key_jwt)
    kid: str | None = None


@dataclass
class CaseState:
    case: Case
    server: Server
    client: ClientSetup | None = None
    skipped: str | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    warmup: dict[str, Any] | None = None
    rate_estimate: float = FIRST_RATE_GUESS
    measured: bool = False
    bodies_sent: int = 0


def server_env(spec: ServerSpec) -> tuple[dict[str, str], dict[str, str]]:
    """The server's environment (no FHIRGATE_* from the caller's shell, fhirgate from this checkout)
    and the FHIRGATE_* settings the benchmark sets itself."""
    settings = {"FHIRGATE_AUTH_SIGNING_ALG": spec.signing_alg}
    return {**pb.gateway_env(), **settings}, settings


def fhirgate_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fhirgate.cli.main", *args]


def start_server(procs: pb.Processes, server: Server, workers: int) -> None:
    server.workdir.mkdir(parents=True, exist_ok=True)
    env, server.env_settings = server_env(server.spec)
    server.command = fhirgate_cmd(
        "auth-server",
        "--data-dir",
        str(server.workdir),
        "--database",
        server.database,
        "--listen",
        f"127.0.0.1:{server.port}",
        "--issuer",
        server.issuer,
        "--fhir-base",
        FHIR_BASE,
        "--workers",
        str(workers),
    )
    proc = procs.start(
        f"auth-server-{server.spec.key}", server.command, server.workdir / "server.log", server.workdir, env
    )
    server.proc = proc
    what = f"auth-server {server.spec.key}"
    pb.wait_http_ready(proc, server.port, "/.well-known/openid-configuration", what, READY_TIMEOUT_S)
    say(f"{what} ready on 127.0.0.1:{server.port}")


def create_client(server: Server, case: Case, tmp: Path) -> ClientSetup:
    """`fhirgate clients create` on the server's store; for private_key_jwt with a fresh P-384 key
    whose public JWK (alg ES384) is the client's `jwks`."""
    from joserfc.jwk import ECKey

    args = [
        "clients",
        "create",
        "--data-dir",
        str(server.workdir),
        "--database",
        server.database,
        "--name",
        f"bench {case.key}",
        "--grant-type",
        "client_credentials",
        "--auth-method",
        case.auth,
        "--scope",
        SCOPE,
    ]
    key = kid = None
    if case.auth == "private_key_jwt":
        key = ECKey.generate_key("P-384", private=True, auto_kid=False)
        kid = key.thumbprint()
        public = {**key.as_dict(private=False), "kid": kid, "alg": ASSERTION_ALG, "use": "sig"}
        jwks = tmp / f"client-{case.key}.jwks.json"
        jwks.write_text(json.dumps({"keys": [public]}))
        args += ["--jwks", str(jwks)]
    cmd = fhirgate_cmd(*args)
    env, _ = server_env(server.spec)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=server.workdir, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"`fhirgate clients create` failed ({out.returncode}): {out.stderr.strip()}")
    found = dict(re.findall(r"^(client_id|client_secret): (\S+)$", out.stdout, re.MULTILINE))
    if "client_id" not in found:
        raise RuntimeError(f"`fhirgate clients create` printed no client_id: {out.stdout!r}")
    return ClientSetup(found["client_id"], cmd, found.get("client_secret"), key, kid)


# ----------------------------------------------------------------------------------------- requests


def basic_header(client: ClientSetup) -> str:
    assert client.secret is not None
    raw = f"{client.client_id}:{client.secret}".encode()  # both URL-safe: no form-encoding needed
    return "Basic " + base64.b64encode(raw).decode()


def secret_body() -> str:
    return urlencode({"grant_type": "client_credentials", "scope": SCOPE})


def assertion_body(client: ClientSetup, token_url: str, now: int) -> str:
    from joserfc import jwt

    claims = {
        "iss": client.client_id,
        "sub": client.client_id,
        "aud": token_url,
        "iat": now,
        "exp": now + ASSERTION_LIFETIME_S,
        "jti": uuid.uuid4().hex,
    }
    header = {"alg": ASSERTION_ALG, "kid": client.kid, "typ": "JWT"}
    assertion = jwt.encode(header, claims, client.key, algorithms=[ASSERTION_ALG])
    return urlencode(
        {
            "grant_type": "client_credentials",
            "scope": SCOPE,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
        }
    )


def mint_bodies(state: CaseState, count: int, path: Path) -> float:
    """`count` request bodies with fresh assertions (unique jti) written one a line; seconds taken."""
    assert state.client is not None
    t0 = time.monotonic()
    now = int(time.time())
    with path.open("w") as fh:
        for _ in range(count):
            fh.write(assertion_body(state.client, state.server.token_url, now))
            fh.write("\n")
    return time.monotonic() - t0


def post_token(port: int, body: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(
            "POST",
            "/token",
            body=body.encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded", **(headers or {})},
        )
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = {"_raw": raw[:300].decode(errors="replace")}
    return resp.status, doc if isinstance(doc, dict) else {"_json": doc}


def check_case(state: CaseState) -> None:
    """Before measuring: a sample request answers 200 with an RFC 9068 access token signed with the
    server's key for the expected algorithm (verified against its /jwks) and the expected claims; a
    replayed assertion (same jti) and a wrong secret are refused. Problems are recorded and said
    loudly; the case is then SKIPPED (a fast figure must not come from a broken endpoint)."""
    from joserfc import jwt
    from joserfc.errors import JoseError
    from joserfc.jwk import KeySet

    server, client, case = state.server, state.client, state.case
    assert client is not None
    problems: list[str] = []
    headers: dict[str, str] = {}
    if case.auth == "client_secret_basic":
        body = secret_body()
        headers["Authorization"] = basic_header(client)
    else:
        body = assertion_body(client, server.token_url, int(time.time()))
    status, doc = post_token(server.port, body, headers)
    state.checks["sample_status"] = status
    token = doc.get("access_token")
    if status != 200 or not isinstance(token, str):
        problems.append(f"sample request: HTTP {status} {json.dumps(doc)[:300]}")
    else:
        state.checks["response_members"] = sorted(doc)
        state.checks["token_type"] = doc.get("token_type")
        try:
            _, _, jwks_raw = pb.http_get(server.port, "/jwks")
            keyset = KeySet.import_key_set(json.loads(jwks_raw))
            decoded = jwt.decode(token, keyset, algorithms=[server.spec.signing_alg])
            claims = decoded.claims
            state.checks["access_token_header"] = decoded.header
            state.checks["access_token_claims"] = sorted(claims)
            state.checks["access_token_bytes"] = len(token)
            expected = {
                "iss": server.issuer,
                "aud": FHIR_BASE,
                "client_id": client.client_id,
                "sub": client.client_id,
                "scope": SCOPE,
            }
            for name, value in expected.items():
                if claims.get(name) != value:
                    problems.append(f"access token claim {name} = {claims.get(name)!r}, expected {value!r}")
            if decoded.header.get("typ") != "at+jwt":
                problems.append(f"access token typ {decoded.header.get('typ')!r}, expected 'at+jwt'")
            if decoded.header.get("alg") != server.spec.signing_alg:
                problems.append(f"access token alg {decoded.header.get('alg')!r}")
            if doc.get("token_type") != "Bearer":
                problems.append(f"token_type {doc.get('token_type')!r}")
            state.checks["access_token_verified"] = True
        except (JoseError, ValueError, OSError) as exc:
            problems.append(f"the access token does not verify against /jwks: {type(exc).__name__}: {exc}")
    if case.auth == "private_key_jwt":
        status2, doc2 = post_token(server.port, body)  # the same assertion again: jti seen before
        state.checks["replayed_assertion"] = {"status": status2, "error": doc2.get("error")}
        if status2 != 400 or doc2.get("error") != "invalid_client":
            problems.append(f"a replayed assertion (same jti) was not refused: HTTP {status2} {doc2}")
    else:
        wrong = "Basic " + base64.b64encode(f"{client.client_id}:not-the-secret".encode()).decode()
        status2, doc2 = post_token(server.port, body, {"Authorization": wrong})
        state.checks["wrong_secret"] = {"status": status2, "error": doc2.get("error")}
        if status2 != 401:
            problems.append(f"a wrong client secret was not refused with 401: HTTP {status2} {doc2}")
    state.checks["problems"] = problems
    if problems:
        state.skipped = "pre-run check failed: " + "; ".join(problems)
        loud(f"{case.label}: SKIPPED: {state.skipped}")
    else:
        say(
            f"check {case.label}: 200, {server.spec.signing_alg} at+jwt verified against /jwks, claims ok; "
            + (
                "replayed jti refused (400)"
                if case.auth == "private_key_jwt"
                else "wrong secret refused (401)"
            )
        )


# ---------------------------------------------------------------------------------------- CPU meter


class CpuMeter:
    """CPU of the server's process group, wrk (our children), PostgreSQL (every `postgres` process:
    other users of that server count too) and the rest of the machine between start and stop."""

    def __init__(self, pgid: int, postgres: bool) -> None:
        self.pgid = pgid
        self.postgres = postgres
        self.t0 = time.monotonic()
        self.server0 = pb.group_cpu_seconds(pgid)
        self.wrk0 = pb.children_cpu_seconds()
        self.pg0 = pb.named_cpu_seconds("postgres") if postgres else 0.0
        self.busy0 = pb.system_busy_seconds()

    def stop(self) -> dict[str, Any]:
        busy = pb.system_busy_seconds() - self.busy0
        wall = time.monotonic() - self.t0
        server = pb.group_cpu_seconds(self.pgid) - self.server0
        wrk = pb.children_cpu_seconds() - self.wrk0
        pg = pb.named_cpu_seconds("postgres") - self.pg0 if self.postgres else 0.0
        other = busy - server - wrk - pg
        return {
            "wall_s": round(wall, 3),
            "cpu_server_s": round(server, 3),
            "cpu_wrk_s": round(wrk, 3),
            "cpu_postgres_s": round(pg, 3),
            "cpu_other_s": round(other, 3),
            "noisy": other > NOISY_SHARE * wall * (os.cpu_count() or 1),
        }


# ------------------------------------------------------------------------------------------------ wrk


def wrk_cmd(
    wrk: str, args: argparse.Namespace, state: CaseState, bodies: Path, duration: float, mode: str
) -> list[str]:
    cmd = [
        wrk,
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        WRK_TIMEOUT,
        "--latency",
    ]
    if state.case.auth == "client_secret_basic":
        assert state.client is not None
        cmd += ["-H", f"Authorization: {basic_header(state.client)}"]
    cmd += ["-s", str(LUA_SCRIPT), state.server.token_url, "--", str(bodies), str(args.threads), mode]
    return cmd


def public_cmd(cmd: list[str]) -> str:
    """The command as recorded: the client secret's Basic credentials hidden."""
    return re.sub(
        r"Authorization: Basic [A-Za-z0-9+/=]+", "Authorization: Basic <client_id:secret>", shlex.join(cmd)
    )


#: the fastest clean private_key_jwt rate measured so far, any case (the cases differ by less than 2x)
_FASTEST_JWT: list[float] = []


def pool_size(state: CaseState, duration: float, connections: int) -> int:
    """Assertions to mint for a run: the case's fastest clean rate so far (the first guess before its
    first run), or the fastest of any private_key_jwt case if that is higher, x duration x
    POOL_FACTOR, + 4 per connection."""
    rate = max(state.rate_estimate, *_FASTEST_JWT) if state.measured else state.rate_estimate
    return math.ceil(rate * duration * POOL_FACTOR) + 4 * connections


def run_case(
    runner: pb.WrkRunner,
    wrk: str,
    args: argparse.Namespace,
    state: CaseState,
    tmp: Path,
    duration: float,
    label: str,
) -> dict[str, Any]:
    """One wrk run of a case: mint its pool of assertions first (private_key_jwt), then load."""
    case, server = state.case, state.server
    bodies = tmp / f"bodies-{case.key}.txt"
    minted = 0
    mint_s = 0.0
    if case.auth == "private_key_jwt":
        minted = pool_size(state, duration, args.connections)
        mint_s = mint_bodies(state, minted, bodies)
        mode = "once"
    else:
        bodies.write_text(secret_body() + "\n")
        mode = "cycle"
    cmd = wrk_cmd(wrk, args, state, bodies, duration, mode)
    assert server.proc is not None
    loadavg = pb.read_loadavg()
    meter = CpuMeter(server.proc.pid, server.spec.store == "postgresql")
    raw = runner.run(cmd, duration)
    cpu = meter.stop()
    res = pb.parse_lua_wrk(raw, "AUTHBENCH")
    s, ms = res.stats, res.ms
    non2xx, socket_errors = res.non_2xx_3xx, res.socket_errors
    exhausted = mode == "once" and s["overflow"] > 0
    none = s["requests"] == 0
    rate = res.rps
    if mode == "once":
        state.bodies_sent += s["built"]
        if not exhausted:  # an overflowing run's rate counts the cheap GET requests too
            # the next pool is sized from the fastest clean rate measured so far for this case (the
            # first replaces the generous first guess)
            state.rate_estimate = max(rate, 1.0) if not state.measured else max(state.rate_estimate, rate)
            state.measured = True
            _FASTEST_JWT.append(rate)
        else:
            state.rate_estimate *= 2
    run = {
        "what": label,
        "tokens_per_s": rate,
        "requests": s["requests"],
        "p50_ms": ms("p50_us"),
        "p90_ms": ms("p90_us"),
        "p99_ms": ms("p99_us"),
        "mean_ms": ms("mean_us"),
        "max_ms": ms("max_us"),
        "socket_errors": socket_errors,
        "non_2xx_3xx": non2xx,
        "pool": minted if mode == "once" else None,
        "pool_used": s["built"] if mode == "once" else None,
        "pool_overflow_requests": s["overflow"] if mode == "once" else None,
        "pool_exhausted": exhausted,
        "mint_s": round(mint_s, 2),
        "flagged": socket_errors > 0 or non2xx > 0 or exhausted or none,
        **cpu,
        "cpu_server_ms_per_token": round(cpu["cpu_server_s"] * 1000.0 / s["requests"], 3)
        if s["requests"]
        else None,
        "loadavg_before": loadavg,
        "command": public_cmd(cmd),
        "raw": raw,
    }
    return run


def log_run(state: CaseState, run: dict[str, Any]) -> None:
    flag = ("  <-- ERRORS" if run["flagged"] else "") + ("  (noisy: other load)" if run["noisy"] else "")
    pool = (
        f"  pool {run['pool_used']:,}/{run['pool']:,} (minted in {run['mint_s']:.1f}s)" if run["pool"] else ""
    )
    cpu_ms = run["cpu_server_ms_per_token"]
    say(
        f"  {run['what']:<9} {state.case.label:<36} {run['tokens_per_s']:>8,.0f} tokens/s  "
        f"p50 {run['p50_ms']:6.2f}  p99 {run['p99_ms']:7.2f} ms  "
        f"server {cpu_ms if cpu_ms is not None else '-'} CPU ms/token  "
        f"cpu s: server {run['cpu_server_s']:.1f} wrk {run['cpu_wrk_s']:.1f} "
        f"pg {run['cpu_postgres_s']:.1f} other {run['cpu_other_s']:.1f}{pool}{flag}"
    )
    if run["flagged"]:
        why = []
        if run["non_2xx_3xx"]:
            why.append(f"{run['non_2xx_3xx']} non-2xx responses")
        if run["socket_errors"]:
            why.append(f"{run['socket_errors']} socket errors")
        if run["pool_exhausted"]:
            why.append(
                f"the assertion pool ({run['pool']:,}) ran out: the rest of the run sent GET requests "
                "for the metadata instead (never a replayed jti), so its tokens/s is not a measurement"
            )
        if not run["requests"]:
            why.append("no request completed")
        loud(f"{state.case.label} {run['what']}: FAILED RUN: {'; '.join(why)}: not a clean measurement")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(k: str) -> float:
        vals = [r[k] for r in runs if r[k] is not None]
        return float(statistics.median(vals)) if vals else float("nan")

    return {
        "rounds": len(runs),
        "tokens_per_s": med("tokens_per_s"),
        "tokens_per_s_min": min((r["tokens_per_s"] for r in runs), default=float("nan")),
        "tokens_per_s_max": max((r["tokens_per_s"] for r in runs), default=float("nan")),
        "p50_ms": med("p50_ms"),
        "p90_ms": med("p90_ms"),
        "p99_ms": med("p99_ms"),
        "cpu_server_ms_per_token": med("cpu_server_ms_per_token"),
        "requests": sum(r["requests"] for r in runs),
        "errors": sum(r["socket_errors"] for r in runs),
        "non_2xx_3xx": sum(r["non_2xx_3xx"] for r in runs),
        "flagged_runs": sum(1 for r in runs if r["flagged"]),
        "noisy_runs": sum(1 for r in runs if r["noisy"]),
    }


# ------------------------------------------------------------------------------------------ profile


#: (name, where the needle must be: "any" frame of the stack or the "leaf" (self time), needles)
PROFILE_CATEGORIES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("token request in the worker thread (create_token_response)", "any", ("create_token_response (",)),
    ("  client assertion: joserfc jwt.decode", "any", ("decode (joserfc/jwt.py)",)),
    ("    ES384 signature check (ESAlgorithm.verify)", "any", ("ESAlgorithm.verify (",)),
    ("  client JWKS parsed per request (KeySet.import_key_set)", "any", ("import_key_set (",)),
    ("  assertion claims checks (verify_claims, without the jti hop)", "leaf", ("verify_claims (",)),
    ("  access token: SigningKey.sign", "any", ("SigningKey.sign (",)),
    ("    RSA/EC signature (AlgModel.sign)", "any", ("AlgModel.sign (", "ESAlgorithm.sign (")),
    ("store: jti insert (remember_jti, on the event loop)", "any", ("remember_jti (",)),
    ("store: client lookup (load_client, on the event loop)", "any", ("load_client (",)),
    ("store: fhirgate storage backend (all)", "any", ("(fhirgate/storage/",)),
    (
        "thread hop: anyio / futures / threading / queue (self)",
        "leaf",
        ("(anyio/", "(concurrent/futures/", "(threading.py)", "(queue.py)"),
    ),
    ("Starlette (inclusive)", "any", ("(starlette/",)),
    ("uvicorn protocol, Python side (inclusive)", "any", ("(uvicorn/protocols/",)),
    (
        "event-loop thread in C: uvloop, httptools, epoll and GIL waits (self of Runner.run)",
        "leaf",
        ("Runner.run (",),
    ),
    (
        "asyncio Python helpers (self)",
        "leaf",
        (
            "(asyncio/tasks.py)",
            "(asyncio/futures.py)",
            "(asyncio/base_futures.py)",
            "(asyncio/events.py)",
            "(asyncio/base_events.py)",
            "(asyncio/locks.py)",
        ),
    ),
)
#: Leaves of threads that wait (py-spy does not always see them as idle): left out of the shares.
_IDLE_LEAVES = (
    "Condition.wait (threading.py)",
    "Event.wait (threading.py)",
    "Thread._wait_for_tstate_lock (threading.py)",
    "Connection._recv (multiprocessing/",
    "BaseSelector.select (selectors",
    "EpollSelector.select (selectors",
)


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """From py-spy's collapsed stacks (`--subprocesses`, `--nolineno`): the share of the worker
    processes' on-CPU samples per function (self and inclusive) and per category above."""
    stacks, workers = pb.pyspy_worker_stacks(path, "fhirgate/authserver")
    self_c: collections.Counter[str] = collections.Counter()
    incl_c: collections.Counter[str] = collections.Counter()
    cat_c: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for _, frames, k in stacks:
        if frames[-1].startswith(_IDLE_LEAVES):
            idle += k
            continue
        total += k
        self_c[frames[-1]] += k
        for f in set(frames):
            incl_c[f] += k
        for name, where, needles in PROFILE_CATEGORIES:
            scope = frames if where == "any" else frames[-1:]
            if any(any(n in f for n in needles) for f in scope):
                cat_c[name] += k

    def share(c: int) -> float:
        return round(100.0 * c / total, 1) if total else 0.0

    return {
        "samples": total,
        "idle_samples_left_out": idle,
        "processes": workers,
        "categories": [(name, share(cat_c[name])) for name, _, _ in PROFILE_CATEGORIES],
        "self": [(f, share(c)) for f, c in self_c.most_common(top)],
        "inclusive": [(f, share(c)) for f, c in incl_c.most_common(top * 2)],
    }


def profile_case(
    runner: pb.WrkRunner, wrk: str, args: argparse.Namespace, state: CaseState, tmp: Path
) -> dict[str, Any]:
    """py-spy on the case's server (all its processes) while wrk loads it for `--profile` seconds.
    Not part of the figures: sampling slows the server."""
    pyspy = pb.pyspy_path()
    if not Path(pyspy).exists():
        loud("--profile: py-spy not found (pip install py-spy into the venv): no profile")
        return {"skipped": "py-spy not found"}
    assert state.server.proc is not None
    out = tmp / "profile.txt"
    seconds = max(2, round(args.profile))
    cmd = [
        pyspy,
        "record",
        "--pid",
        str(state.server.proc.pid),
        "--subprocesses",
        "--nolineno",
        "--format",
        "raw",
        "--rate",
        "250",
        "--duration",
        str(seconds + 1),
        "--output",
        str(out),
    ]
    # mint first (wrk's run starts only when py-spy is attached)
    bodies_ready = run_case_prepare(args, state, tmp, seconds + 2)
    say(f"profile: {shlex.join(cmd)}")
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)  # py-spy attaches to every process of the group
        wcmd = wrk_cmd(wrk, args, state, bodies_ready[0], seconds, bodies_ready[1])
        raw = runner.run(wcmd, seconds)
        _, err = spy.communicate(timeout=seconds + 60)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if not out.exists():
        loud(f"py-spy wrote no profile: {err.decode(errors='replace')[-500:]}")
        return {"skipped": "py-spy wrote no profile", "stderr": err.decode(errors="replace")[-2000:]}
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", raw, re.MULTILINE)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", raw)
    summary = summarize_profile(out)
    keep = args.results_dir / "tmp"
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy(out, keep / "auth_profile.txt")
    return {
        "case": state.case.key,
        "command": shlex.join(cmd).replace(str(state.server.proc.pid), "SERVER_PID"),
        "wrk_command": public_cmd(wcmd),
        "tokens_per_s_under_profiler": float(rps.group(1)) if rps else None,
        "non_2xx_3xx": int(non2xx.group(1)) if non2xx else 0,
        "raw_profile": "bench/results/tmp/auth_profile.txt (git-ignored)",
        **summary,
    }


def run_case_prepare(
    args: argparse.Namespace, state: CaseState, tmp: Path, duration: float
) -> tuple[Path, str]:
    bodies = tmp / f"bodies-{state.case.key}-profile.txt"
    if state.case.auth == "private_key_jwt":
        count = pool_size(state, duration, args.connections)
        mint_bodies(state, count, bodies)
        return bodies, "once"
    bodies.write_text(secret_body() + "\n")
    return bodies, "cycle"


def print_profile(prof: dict[str, Any]) -> None:
    if prof.get("skipped"):
        return
    say()
    say(
        f"profile of {prof['case']} ({prof['samples']:,} samples, waiting threads left out, in "
        f"{prof['processes']} worker processes; "
        f"{prof.get('tokens_per_s_under_profiler') or 0:,.0f} tokens/s under the profiler):",
        style="bold",
    )
    say("  by category ('any': a sample counts in every category on its stack; 'self': by its leaf):")
    for name, pct in prof["categories"]:
        say(f"    {pct:5.1f}%  {name}")
    say("  functions most on CPU (self):")
    for f, pct in prof["self"][:15]:
        say(f"    {pct:5.1f}%  {f}")
    say("  functions most on the stack (inclusive):")
    for f, pct in prof["inclusive"][:30]:
        say(f"    {pct:5.1f}%  {f}")


# -------------------------------------------------------------------------------------- breakdown


def breakdown(count: int, tmp: Path) -> dict[str, Any]:
    """The CPU cost of each piece of one private_key_jwt token request, measured in this process
    (one thread, no HTTP, no contention), with the server's own classes from this checkout: what the
    end-to-end CPU per token is made of. Microseconds per operation (CPU of the calling thread, or of
    the whole process where a hop to another thread is part of the piece)."""
    sys.path.insert(0, str(REPO_ROOT / "src"))
    import anyio.from_thread
    import anyio.to_thread
    from joserfc import jwt
    from joserfc.jwk import ECKey, KeySet

    from fhirgate.authserver.clients import Clients
    from fhirgate.authserver.keys import KeyRing
    from fhirgate.authserver.oauth import OAuthServer, ServerConfig, TokenRequest
    from fhirgate.authserver.store import AuthStore

    out: dict[str, Any] = {"operations": count}

    def timed(name: str, fn: Any, n: int = count) -> None:
        t, w = time.thread_time(), time.perf_counter()
        for _ in range(n):
            fn()
        out[name] = {
            "cpu_us": round((time.thread_time() - t) / n * 1e6, 1),
            "wall_us": round((time.perf_counter() - w) / n * 1e6, 1),
        }

    key = ECKey.generate_key("P-384", private=True, auto_kid=False)
    kid = key.thumbprint()
    jwks = {"keys": [{**key.as_dict(private=False), "kid": kid, "alg": ASSERTION_ALG, "use": "sig"}]}
    issuer = "http://127.0.0.1:1"

    def assertion(client_id: str) -> str:
        now = int(time.time())
        claims = {
            "iss": client_id,
            "sub": client_id,
            "aud": issuer + "/token",
            "iat": now,
            "exp": now + 240,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(
            {"alg": ASSERTION_ALG, "kid": kid, "typ": "JWT"}, claims, key, algorithms=[ASSERTION_ALG]
        )

    pool = iter([assertion("c") for _ in range(2 * count)])
    parsed = KeySet.import_key_set(jwks).keys[0]
    timed("client JWKS: KeySet.import_key_set", lambda: KeySet.import_key_set(jwks))
    timed(
        "assertion: jwt.decode ES384, key parsed once",
        lambda: jwt.decode(next(pool), parsed, algorithms=[ASSERTION_ALG]),
    )
    timed(
        "assertion: import_key_set + jwt.decode ES384 (as per request now)",
        lambda: jwt.decode(next(pool), KeySet.import_key_set(jwks).keys[0], algorithms=[ASSERTION_ALG]),
    )

    async def in_loop() -> None:
        store = await AuthStore.open(f"sqlite:///{tmp / 'breakdown.db'}")
        try:
            ring = KeyRing(store)
            signing = {alg: await ring.ensure_active(alg) for alg in ("RS256", "ES256")}
            now = int(time.time())
            claims = {
                "iss": issuer,
                "sub": "c",
                "aud": FHIR_BASE,
                "client_id": "c",
                "scope": SCOPE,
                "iat": now,
                "exp": now + 3600,
                "jti": "x" * 32,
            }
            for alg, sk in signing.items():
                timed(f"access token: SigningKey.sign {alg}", lambda sk=sk: sk.sign(claims, typ="at+jwt"))
            client, _ = await Clients(store).create(
                {
                    "client_name": "breakdown",
                    "grant_types": ["client_credentials"],
                    "token_endpoint_auth_method": "private_key_jwt",
                    "jwks": jwks,
                    "scope": SCOPE,
                }
            )
            cid = client.client_id
            server = OAuthServer(
                ServerConfig(issuer=issuer, fhir_base=FHIR_BASE), store, lambda: signing["RS256"]
            )

            async def loop_timed(name: str, make: Any) -> None:
                t, w = time.process_time(), time.perf_counter()
                for _ in range(count):
                    await make()
                out[name] = {
                    "cpu_us": round((time.process_time() - t) / count * 1e6, 1),
                    "wall_us": round((time.perf_counter() - w) / count * 1e6, 1),
                }

            await loop_timed(
                "store: remember_jti (SQLite write transaction)",
                lambda: server.remember_jti(cid, uuid.uuid4().hex, time.time() + 240),
            )
            await loop_timed("store: load_client (SQLite read, JSON)", lambda: server.load_client(cid))

            async def noop() -> None:
                return None

            def three_calls_back() -> None:
                for _ in range(3):
                    anyio.from_thread.run(noop)

            await loop_timed(
                "thread hop: anyio.to_thread.run_sync, no work",
                lambda: anyio.to_thread.run_sync(lambda: None),
            )
            await loop_timed(
                "thread hop: to_thread + 3 x from_thread.run (as a private_key_jwt request)",
                lambda: anyio.to_thread.run_sync(three_calls_back),
            )

            def form() -> dict[str, str]:
                return {
                    "grant_type": "client_credentials",
                    "scope": SCOPE,
                    "client_assertion_type": ASSERTION_TYPE,
                    "client_assertion": assertion(cid),
                }

            forms = iter([form() for _ in range(count + 1)])

            async def token() -> None:
                req = TokenRequest("POST", issuer + "/token", {}, next(forms))
                status, body, _ = await anyio.to_thread.run_sync(server.create_token_response, req)
                if status != 200:
                    raise RuntimeError(f"create_token_response: {status} {body}")

            await token()
            await loop_timed("whole: create_token_response in a thread (RS256, no HTTP)", token)
        finally:
            await store.close()

    try:
        import uvloop

        uvloop.run(in_loop())
    except ImportError:
        asyncio.run(in_loop())
    return out


def print_breakdown(b: dict[str, Any]) -> None:
    say()
    say(
        f"cost of the pieces of one private_key_jwt token request (in-process, {b['operations']} each):",
        style="bold",
    )
    for name, v in b.items():
        if isinstance(v, dict):
            say(f"  {v['cpu_us']:8.0f} us CPU  {v['wall_us']:8.0f} us wall  {name}")


# ---------------------------------------------------------------------------------------- the bench


def source_fingerprint() -> str:
    """SHA-256 (16 hex) of the sources the server runs: others may edit them during a run."""
    h = hashlib.sha256()
    src = REPO_ROOT / "src" / "fhirgate"
    for p in sorted([*src.glob("authserver/*.py"), *src.glob("storage/*.py"), *src.glob("cli/auth*.py")]):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def versions(wrk: str, postgres: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        **pb.base_versions(wrk),
        **{
            name: pb.package_version(name)
            for name in ("Authlib", "joserfc", "cryptography", "starlette", "uvicorn", "uvloop", "asyncpg")
        },
    }
    if postgres is not None:
        out["postgres"] = pb.postgres_version(postgres)
    return out


@contextlib.contextmanager
def progress_bar(total: int) -> Iterator[Any]:
    """A rich progress bar over the runs (warm-ups, rounds, profile), or a stand-in without rich."""
    console = pb._CONSOLE
    if console is None:

        class _Plain:
            def update(self, *_a: Any, **_k: Any) -> None:
                return None

            def advance(self, *_a: Any, **_k: Any) -> None:
                return None

        yield _Plain()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description:<48}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("starting", total=total)

        class _Task:
            def update(self, description: str) -> None:
                progress.update(task, description=description)

            def advance(self) -> None:
                progress.advance(task)

        yield _Task()


def bench(args: argparse.Namespace, procs: pb.Processes, runner: pb.WrkRunner, wrk: str, tmp: Path) -> int:
    started = dt.datetime.now(dt.UTC)
    t_start = time.monotonic()
    source_at_start = source_fingerprint()
    say(f"machine: {pb.machine_info()['cpu_model']}, {os.cpu_count()} cores; load {pb.read_loadavg()}")
    cases = [c for c in CASES if c.id in args.cases]
    needed = {c.server for c in cases}

    postgres_note = None
    if any(s.store == "postgresql" for s in SERVERS if s.key in needed):
        if args.no_postgres:
            postgres_note = "--no-postgres given"
        else:
            try:
                pb.pg(args.postgres, [], "SELECT 1")
            except Exception as exc:
                postgres_note = f"PostgreSQL at {args.postgres} unavailable: {type(exc).__name__}: {exc}"
                loud(f"{postgres_note}: the PostgreSQL cases are SKIPPED")
    schema = f"authbench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    schema_created = False

    servers: dict[str, Server] = {}
    states: list[CaseState] = []
    profile: dict[str, Any] | None = None
    try:
        ports = pb.free_ports(len(SERVERS))
        for spec, port in zip(SERVERS, ports, strict=True):
            if spec.key not in needed:
                continue
            workdir = tmp / spec.key
            if spec.store == "postgresql":
                if postgres_note:
                    continue
                pb.pg(args.postgres, [f"CREATE SCHEMA {schema}"])
                schema_created = True
                say(f"PostgreSQL: created schema {schema}")
                database = pb.with_schema(args.postgres, schema)
            else:
                database = f"sqlite:///{workdir / 'auth.db'}"
            workdir.mkdir(parents=True)
            servers[spec.key] = Server(spec, port, database, workdir)
        for case in cases:
            server = servers.get(case.server)
            if server is None:
                st = CaseState(case, Server(next(s for s in SERVERS if s.key == case.server), 0, "", tmp))
                st.skipped = postgres_note or "no server"
                states.append(st)
                continue
            states.append(CaseState(case, server))
        # clients first (the CLI creates the store), then the servers
        for st in states:
            if st.skipped is None:
                st.client = create_client(st.server, st.case, tmp)
                say(f"client for {st.case.label}: {st.case.auth}, client_id {st.client.client_id}")
        for server in servers.values():
            start_server(procs, server, args.workers)
        for st in states:
            if st.skipped is None:
                check_case(st)
        active = [st for st in states if st.skipped is None]

        say()
        say(
            f"method: wrk and the auth servers share this machine's {os.cpu_count()} cores on loopback; "
            f"{args.workers} workers per server; one warm-up run per case, then {args.rounds} alternating "
            f"rounds of {args.duration:g}s (the first case rotating each round); medians over rounds."
        )
        total = len(active) * (1 + args.rounds) + (1 if args.profile else 0)
        with progress_bar(total) as bar:
            for st in active:
                bar.update(f"warm-up {st.case.label}")
                st.warmup = run_case(runner, wrk, args, st, tmp, args.warmup, "warm-up")
                log_run(st, st.warmup)
                bar.advance()
            for rnd in range(args.rounds):
                order = active[rnd % len(active) :] + active[: rnd % len(active)]
                for st in order:
                    bar.update(f"round {rnd + 1}/{args.rounds} {st.case.label}")
                    run = run_case(runner, wrk, args, st, tmp, args.duration, f"round {rnd + 1}")
                    run["round"] = rnd + 1
                    st.runs.append(run)
                    log_run(st, run)
                    bar.advance()
            if args.profile:
                target = next((st for st in active if st.case.id == args.profile_case), None)
                if target is None:
                    loud(f"--profile: case {args.profile_case} is not measured in this run: no profile")
                else:
                    bar.update(f"profile {target.case.label}")
                    profile = profile_case(runner, wrk, args, target, tmp)
                bar.advance()
    finally:
        for server in servers.values():
            if server.proc is not None:
                procs.stop(server.proc)
        if schema_created:
            try:
                pb.pg(args.postgres, [f"DROP SCHEMA {schema} CASCADE"])
                say(f"PostgreSQL: dropped schema {schema}")
            except Exception as exc:
                loud(f"could not drop PostgreSQL schema {schema}: {type(exc).__name__}: {exc}")

    noisy = sum(1 for st in states for r in st.runs if r["noisy"])
    if noisy:
        say(
            f"warning: {noisy} of {sum(len(st.runs) for st in states)} runs had other load above "
            f"{NOISY_SHARE:.0%} of the machine: rerun on a quiet machine for figures to publish",
            style="yellow",
        )
    source_at_end = source_fingerprint()
    pb.warn_if_sources_changed(source_at_start, source_at_end)

    cost: dict[str, Any] | None = None
    if args.breakdown:
        try:
            cost = breakdown(args.breakdown, tmp)
        except Exception as exc:  # the server's classes may have changed: the figures still stand
            loud(f"--breakdown failed: {type(exc).__name__}: {exc}")
            cost = {"error": f"{type(exc).__name__}: {exc}"}
    report = build_report(args, states, servers, wrk, started, t_start, schema, profile)
    report["breakdown"] = cost
    report["versions"]["fhirgate_source_sha256_16"] = {"start": source_at_start, "end": source_at_end}
    print_report(report)
    if profile:
        print_profile(profile)
    if cost and "error" not in cost:
        print_breakdown(cost)
    write_results(args, report, tmp)
    return 0


def build_report(
    args: argparse.Namespace,
    states: list[CaseState],
    servers: dict[str, Server],
    wrk: str,
    started: dt.datetime,
    t_start: float,
    schema: str,
    profile: dict[str, Any] | None,
) -> dict[str, Any]:
    cases = []
    for st in states:
        rec: dict[str, Any] = {
            "id": st.case.id,
            "key": st.case.key,
            "label": st.case.label,
            "store": st.server.spec.store,
            "client_auth": st.case.auth,
            "client_assertion_alg": ASSERTION_ALG if st.case.auth == "private_key_jwt" else None,
            "access_token_alg": st.server.spec.signing_alg,
            "server": st.server.spec.key,
            "skipped": st.skipped,
        }
        if st.skipped is None:
            rec.update(
                {
                    "client_create_command": shlex.join(st.client.command) if st.client else None,
                    "checks": st.checks,
                    "warmup": st.warmup,
                    "runs": st.runs,
                    "medians": summarize(st.runs),
                    "assertions_sent": st.bodies_sent if st.case.auth == "private_key_jwt" else None,
                }
            )
        cases.append(rec)
    bar_case = next((c for c in cases if c["id"] == BAR_CASE), None)
    if bar_case is None or bar_case.get("skipped") or not bar_case.get("runs"):
        verdict: dict[str, Any] = {
            "result": "SKIPPED",
            "why": (bar_case or {}).get("skipped") or "case b not measured",
        }
    else:
        med = bar_case["medians"]
        passed = med["tokens_per_s"] >= BAR_TOKENS_PER_S
        verdict = {
            # a flagged run (errors, an exhausted pool) makes the median meaningless either way
            "result": "INVALID" if med["flagged_runs"] else "PASS" if passed else "MISS",
            "tokens_per_s": med["tokens_per_s"],
            "required": f">= {BAR_TOKENS_PER_S:g}",
            "runs_with_errors": med["flagged_runs"] > 0,
            "noisy_runs": med["noisy_runs"],
        }
    verdict["bar"] = (
        f"case b: private_key_jwt (ES384 assertions, jti recorded), RS256 access tokens, SQLite, "
        f"{args.workers} workers: >= {BAR_TOKENS_PER_S:g} tokens/s"
    )
    return {
        **pb.report_head("bench/auth_bench.py", started, t_start, args.argv),
        "machine": pb.machine_info(),
        "versions": {
            **versions(wrk, None if args.no_postgres else args.postgres),
            "fhirgate_working_tree_dirty": pb.dirty_sources(),
        },
        "method": {
            "quick": args.quick,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "connections": args.connections,
            "wrk_threads": args.threads,
            "workers": args.workers,
            "wrk_command": (
                f"wrk -t{args.threads} -c{args.connections} -d{max(1, round(args.duration))}s --timeout "
                f"{WRK_TIMEOUT} --latency [-H 'Authorization: Basic <client_id:secret>'] "
                "-s bench/lua/token_bodies.lua http://127.0.0.1:PORT/token -- BODIES THREADS once|cycle"
            ),
            "request": (
                "POST /token, application/x-www-form-urlencoded: "
                f"grant_type=client_credentials&scope={SCOPE} "
                "plus HTTP Basic (client_secret_basic) or client_assertion_type + client_assertion "
                f"(private_key_jwt: {ASSERTION_ALG}, iss = sub = client_id, aud = the token URL, iat = mint "
                f"time, exp = iat + {ASSERTION_LIFETIME_S} s, jti = 32 random hex digits, kid = the key's "
                "RFC 7638 thumbprint)"
            ),
            "assertion_pool": (
                "before every run (warm-up included) a fresh pool of assertions is minted, "
                f"ceil(rate x duration x {POOL_FACTOR:g}) + 4 x connections, where rate is the fastest clean "
                "rate measured so far for that case or, if higher, for any private_key_jwt case "
                f"({FIRST_RATE_GUESS:g}/s before the case's first run); each body is sent at most once "
                "(thread k of T sends lines k, k+T, ...); a run that uses up its pool never replays a jti: "
                "it sends GET /.well-known/openid-configuration for the rest of the run, counts those "
                "requests (pool_overflow_requests) and is flagged as not a measurement; the next pool is "
                "then doubled"
            ),
            "rounds_note": (
                "one warm-up run per case (discarded), then rounds; in each round every case gets one run, "
                "round-robin with the first case rotating; figures are the medians over rounds"
            ),
            "client_and_server_share_the_machine": (
                f"wrk, the auth servers (all started before the first run, idle when not loaded) and "
                f"PostgreSQL run on this machine's {os.cpu_count()} cores on loopback"
            ),
            "cpu_columns": (
                "cpu_server_s: user+sys CPU of the loaded server's process group; cpu_wrk_s: wrk; "
                "cpu_postgres_s: every process named postgres (PostgreSQL cases only; other users of that "
                "server count too); cpu_other_s: the rest of the machine's busy time; noisy: other > "
                f"{NOISY_SHARE:.0%} of the machine"
            ),
        },
        "servers": [
            {
                "key": s.spec.key,
                "store": s.spec.store,
                "access_token_alg": s.spec.signing_alg,
                "database": s.database.replace(schema, "authbench_PID_RANDOM"),
                "command": shlex.join(s.command).replace(schema, "authbench_PID_RANDOM"),
                "environment": s.env_settings,
            }
            for s in servers.values()
        ],
        "cases": cases,
        "bar": verdict,
        "_schema": schema,  # scrubbed from every string by write_results
        "profile": profile,
    }


# ------------------------------------------------------------------------------------------ report


def print_report(report: dict[str, Any]) -> None:
    fmt = pb.fmt
    m = report["method"]
    title = (
        f"token endpoint, client_credentials: median of {m['rounds']} rounds, {m['duration_s']:g}s each, "
        f"{m['connections']} connections, {m['workers']} workers - {report['machine']['cpu_model']}, "
        f"{report['machine']['cores']} cores{' - QUICK run' if m['quick'] else ''}"
    )
    header = ("case", "tokens/s", "min-max", "p50 ms", "p99 ms", "server CPU ms/token", "errors")
    rows: list[tuple[str, ...]] = []
    for c in report["cases"]:
        if c.get("skipped"):
            rows.append((c["label"], "SKIPPED", "", "", "", "", c["skipped"][:60]))
            continue
        s = c["medians"]
        errs = s["errors"] + s["non_2xx_3xx"]
        bad = errs or s["flagged_runs"]
        rows.append(
            (
                c["label"],
                fmt(s["tokens_per_s"], ",.0f"),
                f"{fmt(s['tokens_per_s_min'], ',.0f')}-{fmt(s['tokens_per_s_max'], ',.0f')}",
                fmt(s["p50_ms"], ".2f"),
                fmt(s["p99_ms"], ".2f"),
                fmt(s["cpu_server_ms_per_token"], ".2f"),
                f"{errs} FLAGGED ({s['flagged_runs']} runs)" if bad else "0",
            )
        )
    say()
    pb.print_table(title, header, rows)
    b = report["bar"]
    style = {"PASS": "bold green", "MISS": "bold red"}.get(b["result"], "yellow")
    extra = ""
    if "tokens_per_s" in b:
        extra = f"  median {b['tokens_per_s']:,.0f} tokens/s (required {b['required']})"
        if b.get("runs_with_errors"):
            extra += "  -- runs had errors: NOT a valid measurement"
        if b.get("noisy_runs"):
            extra += f"  ({b['noisy_runs']} noisy runs: other load on the machine)"
    else:
        extra = f"  why: {b.get('why')}"
    say()
    say(f"bar (issue 5 §6; a report, never an exit status): {b['result']}  {b['bar']}{extra}", style=style)
    say("note: wrk and the servers share the machine's cores on loopback; wrk's CPU is part of the cost.")


def write_results(args: argparse.Namespace, report: dict[str, Any], tmp: Path) -> None:
    replacements = [
        (sys.executable, "python"),
        (pb.pyspy_path(), "py-spy"),
        (str(tmp), "$TMP"),
        (str(REPO_ROOT), "$REPO"),
    ]
    found = pb.find_exe("wrk")
    if found:
        replacements.append((found, "wrk"))
    schema = report.pop("_schema", None)
    if schema:
        replacements.append((schema, "authbench_PID_RANDOM"))
    pb.save_report(args.results_dir, "auth_latest", report, replacements, plot)


def plot(report: dict[str, Any], path: Path) -> Path:
    """Median tokens/s per case (dots: rounds) with the 500 tokens/s bar; p50 and p99 per case."""
    plt = pb.pyplot()
    from matplotlib import ticker

    cases = report["cases"]
    labels = [c["label"].replace(", ", "\n", 1) for c in cases]
    xs = list(range(len(cases)))
    colours = {"sqlite": "#1f77b4", "postgresql": "#2ca02c"}
    red = "#d62728"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6.8), gridspec_kw={"width_ratios": (1.4, 1)})

    heights = [c["medians"]["tokens_per_s"] if not c.get("skipped") else 0.0 for c in cases]
    points = [[r["tokens_per_s"] for r in c.get("runs", [])] for c in cases]
    top = max([BAR_TOKENS_PER_S, *heights, *(p for pts in points for p in pts)])
    bars = ax1.bar(
        xs,
        heights,
        color=[colours[c["store"]] for c in cases],
        edgecolor=["black" if c["id"] != BAR_CASE else red for c in cases],
        linewidth=[1.0 if c["id"] != BAR_CASE else 2.5 for c in cases],
        width=0.6,
    )
    for i, c in enumerate(cases):
        if c.get("skipped"):
            ax1.text(i, top * 0.03, "skipped", ha="center", va="bottom", color=red, fontsize=10)
            continue
        ax1.scatter([i] * len(points[i]), points[i], color="black", s=14, zorder=3)
        s = c["medians"]
        note = f"{heights[i]:,.0f} tokens/s\n{s['cpu_server_ms_per_token']:.2f} CPU ms/token"
        if s["flagged_runs"]:
            note += "\nERRORS"
        if c["id"] == BAR_CASE:
            note += f"\n{report['bar']['result']}"
        ax1.text(
            bars[i].get_x() + bars[i].get_width() / 2,
            max(heights[i], *points[i]) + top * 0.02,
            note,
            ha="center",
            va="bottom",
            fontsize=9,
            fontweight="bold" if c["id"] == BAR_CASE else "normal",
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1.5},
            zorder=4,
        )
    ax1.axhline(
        BAR_TOKENS_PER_S, color=red, linestyle="--", linewidth=1.3, label="bar: case (b) >= 500 tokens/s"
    )
    ax1.legend(loc="upper right", fontsize=8, framealpha=0.9)
    ax1.set_xticks(xs)
    ax1.set_xticklabels(labels, fontsize=8.5)
    ax1.set_ylabel("tokens/s (median of rounds; higher is better)")
    ax1.set_ylim(0, top * 1.35)
    ax1.set_title("Token endpoint throughput (client_credentials)")
    ax1.grid(axis="y", alpha=0.3)

    width = 0.38
    p50 = [c["medians"]["p50_ms"] if not c.get("skipped") else 0.0 for c in cases]
    p99 = [c["medians"]["p99_ms"] if not c.get("skipped") else 0.0 for c in cases]
    ax2.bar([x - width / 2 for x in xs], p50, width, label="p50", color="#9ecae1", edgecolor="black")
    ax2.bar([x + width / 2 for x in xs], p99, width, label="p99", color="#3182bd", edgecolor="black")
    for x, a, b in zip(xs, p50, p99, strict=True):
        if b:
            ax2.text(x + width / 2, b, f"{b:.1f}", ha="center", va="bottom", fontsize=8)
            ax2.text(x - width / 2, a, f"{a:.1f}", ha="center", va="bottom", fontsize=8)
    ax2.set_xticks(xs)
    ax2.set_xticklabels(labels, fontsize=7.5)
    ax2.set_yscale("log")  # a p99 tail can be 100x the p50
    ax2.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _p: f"{v:g}"))
    ax2.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax2.set_ylabel("latency, ms, log scale (median of rounds; lower is better)")
    ax2.set_title("Latency under load")
    ax2.legend(fontsize=8)
    ax2.grid(axis="y", alpha=0.3)

    mach = report["machine"]
    m = report["method"]
    day = report["timestamp"][:16].replace("T", " ")
    runs = [r for c in cases for r in c.get("runs", [])]
    noisy = sum(1 for r in runs if r["noisy"])
    noisy_note = f"  |  {noisy} of {len(runs)} runs NOISY (other load on the machine)" if noisy else ""
    fig.suptitle(
        f"fhirgate auth-server, token endpoint - {mach['cpu_model']}, {mach['cores']} cores, {day} UTC\n"
        f"{m['workers']} workers, wrk -t{m['wrk_threads']} -c{m['connections']} -d{m['duration_s']:g}s, "
        f"median of {m['rounds']} alternating rounds after warm-up"
        f"{'  |  QUICK run' if m['quick'] else ''}{noisy_note}",
        fontsize=11,
    )
    return pb.finish_chart(
        fig,
        path,
        (0, 0.04, 1, 0.93),
        "wrk, the servers and PostgreSQL share the same cores on loopback. Blue: SQLite, green: PostgreSQL. "
        "Dots: individual rounds.",
        0.012,
    )


# -------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 3 s runs, 1 s warm-up, 3 rounds")
    p.add_argument("--duration", type=float, default=None, help="seconds per measured run (10; 3 quick)")
    p.add_argument(
        "--warmup", type=float, default=None, help="seconds of the warm-up run per case (3; 1 quick)"
    )
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds, at least 3 (3)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections (16)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    p.add_argument(
        "--workers", type=int, default=2, help="auth-server workers (2, the reference machine's cores)"
    )
    p.add_argument(
        "--cases",
        default="a,b,c,d-basic,d-jwt",
        help="comma-separated: a, b, c, d-basic, d-jwt (all)",
    )
    p.add_argument("--postgres", default=DEFAULT_POSTGRES, help=f"PostgreSQL URL ({DEFAULT_POSTGRES})")
    p.add_argument("--no-postgres", action="store_true", help="leave the PostgreSQL cases out")
    p.add_argument(
        "--profile",
        type=float,
        default=0,
        metavar="S",
        help="after the rounds, py-spy the --profile-case server for S s under load (needs py-spy)",
    )
    p.add_argument("--profile-case", default=BAR_CASE, help=f"case to profile ({BAR_CASE})")
    p.add_argument(
        "--breakdown",
        type=int,
        default=0,
        metavar="N",
        help="after the runs, time each piece of a token request N times in-process (try 1000)",
    )
    p.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (databases, logs, bodies)")
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 3.0)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(args.cases) - {c.id for c in CASES}
    if unknown:
        p.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    if args.rounds < 3:
        p.error("--rounds must be at least 3 (median of at least three alternating rounds)")
    if args.duration <= 0 or args.warmup <= 0 or args.connections < 1 or args.workers < 1 or args.threads < 1:
        p.error("durations, connections, threads and workers must be positive")
    if args.threads > args.connections:
        p.error("--threads must not exceed --connections")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return pb.run_benchmark(
        "fhirgate-auth-bench-",
        args.keep_tmp,
        pb.ensure_wrk,
        lambda procs, runner, wrk, tmp: bench(args, procs, runner, wrk, tmp),
    )


if __name__ == "__main__":
    sys.exit(main())
