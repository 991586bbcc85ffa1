from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fhirserver.harness import BACKENDS, RunningFhir, database, running_fhir


@pytest.fixture(scope="module", params=BACKENDS)
def fhir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningFhir]:
    """A FHIR server shared by one test module, on each backend. Tests make their own data
    (unique identifiers and names) so they don't depend on each other."""
    backend: str = request.param
    with database(backend, tmp_path_factory.mktemp("fhir")) as url, running_fhir(url, backend) as server:
        yield server


@pytest.fixture(params=BACKENDS)
def fresh_fhir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningFhir]:
    """An empty FHIR server for one test, on each backend."""
    backend: str = request.param
    with database(backend, tmp_path) as url, running_fhir(url, backend) as server:
        yield server
