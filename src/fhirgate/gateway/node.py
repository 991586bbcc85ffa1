"""A gateway node: N worker processes sharing the listeners with SO_REUSEPORT.

The master process binds each listener once (resolving port 0 and reserving the port, without
listening), forks the workers and supervises them. Each worker binds its own listening socket on
the same address with SO_REUSEPORT, so the kernel spreads connections across workers, and runs
its own uvloop event loop. Signals (sent to the master, which forwards them):

- SIGTERM / SIGINT: stop accepting, let in-flight requests finish up to `shutdown_timeout`, exit.
- SIGHUP: re-read the declarative file; a file with errors is refused (logged) and the old
  configuration keeps serving; a good one is loaded by every worker without dropping connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fhirgate.config import GatewayConfig, empty_config, load_config_file
from fhirgate.errors import ConfigError
from fhirgate.gateway import hooks
from fhirgate.gateway.accesslog import AccessLog
from fhirgate.gateway.plugins.registry import available_plugins
from fhirgate.gateway.proxy import Gateway
from fhirgate.gateway.server import ClientProtocol
from fhirgate.gateway.status import StatusGateway
from fhirgate.settings import Settings, parse_hostport

log = logging.getLogger("fhirgate.node")


@dataclass
class Listener:
    kind: str  # "proxy" | "ssl" | "status"
    host: str
    port: int
    family: int = socket.AF_INET

    @property
    def url(self) -> str:
        scheme = "https" if self.kind == "ssl" else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"


def _bind(host: str, port: int, reuse_port: bool = True) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


def plan_listeners(settings: Settings) -> list[Listener]:
    out: list[Listener] = []
    for addr in settings.listen:
        host, port = parse_hostport(addr)
        out.append(Listener("proxy", host, port))
    if settings.ssl_cert:
        for addr in settings.ssl_listeners:
            host, port = parse_hostport(addr)
            out.append(Listener("ssl", host, port))
    if settings.status_listen:
        host, port = parse_hostport(settings.status_listen)
        out.append(Listener("status", host, port))
    return out


def server_ssl_context(settings: Settings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(settings.ssl_cert), str(settings.ssl_cert_key) if settings.ssl_cert_key else None)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def setup_logging(settings: Settings) -> None:
    level = {
        "debug": logging.DEBUG,
        "info": logging.INFO,
        "notice": logging.INFO,
        "warn": logging.WARNING,
        "error": logging.ERROR,
        "crit": logging.CRITICAL,
    }[settings.log_level]
    target = settings.proxy_error_log
    handler: logging.Handler
    if target in ("stderr", "stdout"):
        handler = logging.StreamHandler(sys.stderr if target == "stderr" else sys.stdout)
    else:
        handler = logging.FileHandler(target)
    if settings.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s [%(levelname)s] %(process)d %(name)s: %(message)s")
        )
    root = logging.getLogger("fhirgate")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        import json

        data = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data)


@dataclass
class WorkerRuntime:
    """Everything one worker runs (also used in-process by the tests)."""

    settings: Settings
    config: GatewayConfig
    config_path: Path | None = None
    gateway: Gateway | None = None
    status: StatusGateway | None = None
    servers: list[asyncio.AbstractServer] = field(default_factory=list)
    listeners: list[Listener] = field(default_factory=list)
    stopped: asyncio.Event | None = None

    async def start(self, listeners: list[Listener]) -> None:
        loop = asyncio.get_running_loop()
        access_log = (
            AccessLog(self.settings.proxy_access_log, self.settings.log_format)
            if self.settings.proxy_access_log != "off"
            else None
        )
        self.gateway = gateway = Gateway(self.settings, self.config, access_log=access_log)
        self.stopped = asyncio.Event()
        ssl_ctx = server_ssl_context(self.settings) if any(li.kind == "ssl" for li in listeners) else None
        for li in listeners:
            sock = _bind(li.host, li.port)
            factory: Callable[[], asyncio.Protocol]
            if li.kind == "status":
                if self.status is None:
                    self.status = StatusGateway(self.settings, gateway)
                status = self.status
                factory = lambda s=status: ClientProtocol(s)  # type: ignore[misc]  # noqa: E731
                server = await loop.create_server(factory, sock=sock, backlog=1024)
            elif li.kind == "ssl":
                factory = lambda: ClientProtocol(gateway, tls=True)  # noqa: E731
                server = await loop.create_server(
                    factory, sock=sock, backlog=4096, ssl=ssl_ctx, ssl_handshake_timeout=10
                )
            else:
                factory = lambda: ClientProtocol(gateway)  # noqa: E731
                server = await loop.create_server(factory, sock=sock, backlog=4096)
            bound = sock.getsockname()
            self.listeners.append(Listener(li.kind, li.host, bound[1]))
            self.servers.append(server)

    def reload(self) -> bool:
        """Re-read the declarative file; keep the old configuration if the new one is bad."""
        if self.config_path is None or self.gateway is None:
            return False
        try:
            config = load_config_file(self.config_path)
        except ConfigError as exc:
            log.error("configuration reload refused, still serving the previous one:\n%s", exc.describe())
            return False
        except OSError as exc:
            log.error("configuration reload refused (%s), still serving the previous one", exc)
            return False
        self.config = config
        self.gateway.reload(config)
        log.info("configuration reloaded from %s", self.config_path)
        return True

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, finish in-flight requests up to `grace` seconds, close the rest."""
        gateway = self.gateway
        # The proxy listeners stop accepting now; the status listener stays up until the end so
        # that /status/ready answers 503 while in-flight requests drain (load balancers stop
        # sending traffic on it).
        status_servers = [
            server for server, li in zip(self.servers, self.listeners, strict=True) if li.kind == "status"
        ]
        for server in self.servers:
            if server not in status_servers:
                server.close()
        if gateway is None:
            for server in status_servers:
                server.close()
            return
        gateway.draining = True
        for conn in list(gateway.connections):
            if conn.current is None and not conn.queue:
                conn.close()  # idle keep-alive connection
            elif conn.current is not None:
                conn.current.keep_alive = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if gateway.active:
            idle = asyncio.Event()
            gateway.on_idle = idle.set
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(idle.wait(), grace)
        # Every response is written; the connections that carried them are closing (their last
        # response said `Connection: close`). Let them flush what is still buffered in user space
        # (the end of a large body to a slow client) until the grace period ends, then cut the rest.
        await _poll(lambda: not any(_unflushed(c) for c in gateway.connections), deadline)
        for conn in list(gateway.connections):
            conn.abort()
        # Idle HTTPS upstream connections end with a TLS close_notify exchange, which needs the
        # event loop for a moment after close(): wait for it (bounded), then cut what is left, so
        # no transport outlives the loop (plain TCP connections close at once).
        tls_upstreams = [
            c.transport
            for idle in gateway.pool._idle.values()
            for c in idle
            if c.transport is not None and c.key[0] == "https"
        ]
        gateway.close()
        if tls_upstreams:
            # The TLS transport drops its TCP transport (socket) once the connection is lost.
            await _poll(
                lambda: all(t.get_extra_info("socket") is None for t in tls_upstreams),
                loop.time() + min(max(grace, 0.1), 1.0),
            )
            for t in tls_upstreams:
                if t.get_extra_info("socket") is not None:
                    t.abort()
            await asyncio.sleep(0)
        for server in status_servers:
            server.close()
        if self.status is not None:
            for conn in list(self.status.connections):
                conn.abort()
            self.status.close()
        if gateway.access_log is not None:
            gateway.access_log.close()


_NODE_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


async def _poll(done: Callable[[], bool], deadline: float) -> None:
    """Wait until `done()` or the loop time `deadline`, checking every few milliseconds."""
    loop = asyncio.get_running_loop()
    while not done():
        if loop.time() >= deadline:
            return
        await asyncio.sleep(0.005)


def _unflushed(conn: ClientProtocol) -> bool:
    transport = conn.transport
    return transport is not None and transport.get_write_buffer_size() > 0


def _worker_main(
    settings: Settings,
    config: GatewayConfig,
    config_path: Path | None,
    listeners: list[Listener],
    ready_w: int,
) -> None:
    import uvloop

    hooks.run_after_fork(settings)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    runtime = WorkerRuntime(settings, config, config_path)
    stop = asyncio.Event()

    async def main() -> None:
        await runtime.start(listeners)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, runtime.reload)
        # The master forked us with these signals blocked: one sent before the handlers above
        # existed was held, and is delivered now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _NODE_SIGNALS)
        os.write(ready_w, b"1")
        os.close(ready_w)
        await stop.wait()
        await runtime.shutdown(settings.shutdown_timeout)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


class Node:
    """The master process."""

    def __init__(self, settings: Settings, config: GatewayConfig, config_path: Path | None) -> None:
        self.settings = settings
        self.config = config
        self.config_path = config_path
        self.workers: dict[int, int] = {}  # pid -> index
        self.reserved: list[socket.socket] = []
        self.listeners: list[Listener] = []
        self._stopping = False

    def reserve(self) -> None:
        for li in plan_listeners(self.settings):
            if li.port != 0:
                # SO_REUSEPORT would let this node share a port another process (another node)
                # already listens on, silently splitting its traffic: make sure the port is free.
                _bind(li.host, li.port, reuse_port=False).close()
            sock = _bind(li.host, li.port)
            self.reserved.append(sock)
            self.listeners.append(Listener(li.kind, li.host, sock.getsockname()[1]))

    def _spawn(self, index: int) -> int:
        ready_r, ready_w = os.pipe()
        # Block the node's signals across fork: the worker unblocks them once its own handlers
        # are installed, so a signal forwarded to it while it starts is held, never fatal.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _NODE_SIGNALS)
        pid = os.fork()
        if pid == 0:  # worker
            os.close(ready_r)
            for sock in self.reserved:
                sock.close()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
            code = 0
            try:
                _worker_main(self.settings, self.config, self.config_path, self.listeners, ready_w)
            except BaseException:
                log.exception("worker %d crashed", index)
                code = 1
            finally:
                os._exit(code)
        self.workers[pid] = index  # before the wait below: a stop or reload reaches it too
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as ready:
            ok = ready.read(1) == b"1"
        if not ok:
            self.workers.pop(pid, None)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            raise RuntimeError(f"worker {index} failed to start (see the error log)")
        return pid

    def run(self, on_ready: Callable[[list[Listener]], None] | None = None) -> int:
        """Start the workers and supervise them until SIGTERM/SIGINT. Returns the exit code:
        0 after a graceful stop, 1 if the workers could not be kept running."""
        self.reserve()
        # Import every built-in plugin now, so their per-node resources (shared counters,
        # metrics directory) exist before the workers fork, even if a later reload adds them.
        available_plugins()
        hooks.run_before_fork(self.settings)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        try:
            for i in range(self.settings.workers):
                if self._stopping:
                    break
                self._spawn(i)
        except RuntimeError:
            # Never leave the workers already started running without their master.
            self._stopping = True
            self._forward(signal.SIGTERM)
            self._reap_all()
            self._release()
            raise
        if on_ready is not None and not self._stopping:
            on_ready(self.listeners)
        code = 0
        while self.workers:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            index = self.workers.pop(pid, None)
            if self._stopping or index is None:
                continue
            log.error("worker %d (pid %d) %s; restarting it", index, pid, _describe_exit(status))
            try:
                self._spawn(index)
            except RuntimeError as exc:
                log.error("%s", exc)
                if not self.workers:
                    log.error("no worker left running; the node stops")
                    code = 1
        self._release()
        return code

    def _reap_all(self) -> None:
        while self.workers:
            try:
                pid, _status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self.workers.pop(pid, None)

    def _release(self) -> None:
        for sock in self.reserved:
            sock.close()
        self.reserved.clear()

    def _forward(self, sig: int) -> None:
        for pid in list(self.workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _on_stop(self, signum: int, _frame: object) -> None:
        self._stopping = True
        self._forward(signal.SIGTERM)

    def _on_hup(self, _signum: int, _frame: object) -> None:
        if self.config_path is None:
            log.warning("SIGHUP: no declarative file to reload")
            return
        try:
            config = load_config_file(self.config_path)
        except ConfigError as exc:
            log.error("configuration reload refused, still serving the previous one:\n%s", exc.describe())
            return
        except OSError as exc:
            log.error("configuration reload refused (%s)", exc)
            return
        self.config = config  # workers restarted later start from it
        self._forward(signal.SIGHUP)


def _describe_exit(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown"
        return f"was killed by signal {-code} ({name})"
    return f"exited with status {code}"


def load_or_empty(path: Path | None) -> GatewayConfig:
    return load_config_file(path) if path is not None else empty_config()
