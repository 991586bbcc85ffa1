"""What the end-to-end tests share: free loopback ports, and stopping a command's whole process
group (the master and its workers) whatever state it is in."""

from __future__ import annotations

import os
import signal
import socket
import subprocess


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stop_group(proc: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM, wait: float = 10) -> None:
    """`sig` to the process group (started with `start_new_session=True`), SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    if proc.stdout:
        proc.stdout.close()
