"""Kong's `file-log` plugin (`kong/plugins/file-log/handler.lua`): one JSON line per request, the
record of `kong.log.serialize()` (credentials already redacted: `Authorization`,
`Proxy-Authorization`, `Cookie`, `Set-Cookie`).

The event loop only encodes the line and gathers it; every 50 ms (or 64 KiB) the gathered lines
go to a writer thread per plugin instance, which appends them. The file is opened with O_APPEND and
every write holds whole lines (a batch of at most 64 KiB, or one longer line), so the lines of
several workers never interleave. With
`reopen: true` the file is opened again for every write (each batch of lines), so a rotated file
is followed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import threading
from typing import TYPE_CHECKING, ClassVar, cast

from fhirgate.gateway.plugins.base import Plugin, PluginConfig
from fhirgate.gateway.plugins.file_log.schema import FileLogConfig

if TYPE_CHECKING:
    from fhirgate.gateway.pdk import PDK

log = logging.getLogger("fhirgate.plugins.file-log")

_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
_MODE = 0o644  # Kong: S_IRUSR | S_IWUSR | S_IRGRP | S_IROTH
_BATCH = 64 * 1024
_FLUSH_EVERY = 0.05  # seconds


class LineWriter:
    """Appends lines to one file from a background thread."""

    def __init__(self, path: str, reopen: bool) -> None:
        self.path = path
        self.reopen = reopen
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()  # None: stop
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._fd: int | None = None
        self._closed = False
        self._start_lock = threading.Lock()
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._flush_handle: asyncio.TimerHandle | None = None

    def put(self, line: bytes) -> None:
        """Queue one line (ending in a newline). Never blocks on the disk.

        Lines are gathered in the event loop and handed to the writer thread in batches (every
        50 ms, or at 64 KiB), so a request costs no thread wake-up."""
        if self._closed:
            self._write(line)  # a request that finished after a reload: rare, write it directly
            return
        if self._thread is None or self._pid != os.getpid():
            self._start()
        self._pending.append(line)
        self._pending_size += len(line)
        if self._pending_size >= _BATCH:
            self.flush()
        elif self._flush_handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._flush_handle = loop.call_later(_FLUSH_EVERY, self.flush)

    def flush(self) -> None:
        """Hand the gathered lines to the writer thread."""
        handle, self._flush_handle = self._flush_handle, None
        if handle is not None:
            handle.cancel()
        if self._pending:
            self._queue.put(b"".join(self._pending))
            self._pending.clear()
            self._pending_size = 0

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is not None and self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._fd = None  # a descriptor inherited across fork is the parent's
            self._thread = threading.Thread(target=self._run, name=f"file-log {self.path}", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        q = self._queue
        while True:
            first = q.get()
            if first is None:
                break
            batch = [first]
            size = len(first)
            stop = False
            while size < _BATCH:
                try:
                    nxt = q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                if size + len(nxt) > _BATCH:
                    self._write(b"".join(batch))
                    batch, size = [], 0
                batch.append(nxt)
                size += len(nxt)
            if batch:
                self._write(b"".join(batch))
            if stop:
                break
        self._close_fd()

    def _write(self, data: bytes) -> None:
        try:
            fd = self._fd
            if fd is None:
                fd = os.open(self.path, _FLAGS, _MODE)
                self._fd = None if self.reopen else fd
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            finally:
                if self.reopen:
                    os.close(fd)
        except OSError as exc:
            log.error("file-log: cannot write to %s: %s", self.path, exc)
            self._close_fd()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop the thread and close the file."""
        self.flush()
        self._closed = True
        thread = self._thread
        if thread is not None and self._pid == os.getpid() and thread.is_alive():
            self._queue.put(None)
            thread.join(timeout)
        else:
            self._close_fd()


class Handler(Plugin):
    name: ClassVar[str] = "file-log"
    priority: ClassVar[int] = 9
    Config: ClassVar[type[PluginConfig]] = FileLogConfig
    description: ClassVar[str] = "Append one JSON line per request (Kong's log record) to a file."

    def __init__(self, config: PluginConfig, instance_id: str = "") -> None:
        super().__init__(config, instance_id)
        conf = cast(FileLogConfig, config)
        self.writer = LineWriter(conf.path, conf.reopen)

    def log(self, kong: PDK) -> None:
        record = kong.log.serialize()
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str) + "\n"
        self.writer.put(line.encode("utf-8", "surrogateescape"))

    def close(self) -> None:
        self.writer.close()


__all__ = ["Handler", "LineWriter"]
