from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import Upstream


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    up = Upstream()
    try:
        yield up
    finally:
        up.close()
