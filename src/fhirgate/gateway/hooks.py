"""Node lifecycle hooks for plugins that need per-node resources shared by all workers (shared
memory counters, prometheus' multiprocess directory).

- `before_fork` hooks run once in the master process, after the configuration is loaded and
  before any worker starts (e.g. create a shared-memory segment the workers inherit).
- `after_fork` hooks run in each worker before its event loop starts serving.

In-process use (tests, one worker without a master) runs both in the same process, in order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fhirgate.settings import Settings

Hook = Callable[["Settings"], None]

_before_fork: dict[str, Hook] = {}
_after_fork: dict[str, Hook] = {}


def on_before_fork(name: str, hook: Hook) -> None:
    """Register `hook` (idempotent per `name`)."""
    _before_fork[name] = hook


def on_after_fork(name: str, hook: Hook) -> None:
    _after_fork[name] = hook


def run_before_fork(settings: Settings) -> None:
    for hook in list(_before_fork.values()):
        hook(settings)


def run_after_fork(settings: Settings) -> None:
    for hook in list(_after_fork.values()):
        hook(settings)
