"""`fhirgate config check FILE`: errors with locations on stderr, warnings, exit status, summary."""

import subprocess
import sys

import pytest

from fhirgate.cli.main import main

GOOD = """\
_format_version: "3.0"
services:
  - name: fhir
    url: http://fhir.internal:8080/fhir
    tags: [fhir]
    routes:
      - name: fhir
        paths: [/fhir]
  - name: tls
    url: https://tls.internal
    tls_verify: false
consumers:
  - username: app
"""

BAD = """\
_format_version: "3.0"
services:
  - name: fhir
    url: http://fhir.internal
    colour: blue
    routes:
      - paths: [fhir]
routes:
  - service: missing
    paths: [/x]
plugins:
  - name: not-a-plugin
"""


@pytest.fixture
def write(tmp_path):
    def _write(text, name="kong.yml"):
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    return _write


def test_valid_file_exits_zero_with_summary_and_warnings(write, capsys):
    path = write(GOOD)
    assert main(["config", "check", path]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{path}: OK (2 services, 1 routes, 1 consumers, 0 plugins, 2 warnings)"
    warnings = err.strip().splitlines()
    assert len(warnings) == 2
    assert all(line.startswith("warning: ") for line in warnings)
    assert any("services[0].routes[0]" in line and "smart-on-fhir" in line for line in warnings)
    assert any("services[1].tls_verify" in line for line in warnings)


def test_invalid_file_prints_every_error_with_location_and_exits_one(write, capsys):
    path = write(BAD)
    assert main(["config", "check", path]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert f"{path}: services[0].colour: unknown field" in lines
    assert any(line.startswith(f"{path}: services[0].routes[0].paths[0]: ") for line in lines)
    assert f"{path}: routes[0].service: unknown service 'missing'" in lines
    assert any(
        line.startswith(f"{path}: plugins[0].name: plugin 'not-a-plugin' is not implemented")
        for line in lines
    )
    assert lines[-1] == f"{path}: 4 error(s)"


def test_invalid_yaml_reports_line_and_column(write, capsys):
    path = write('_format_version: "3.0"\nservices:\n  - name: x\n   url: http://x\n')
    assert main(["config", "check", path]) == 1
    err = capsys.readouterr().err
    assert f"{path}: line 4, column 4: invalid YAML" in err


def test_invalid_json_reports_line_and_column(write, capsys):
    path = write('{\n  "_format_version": "3.0",\n  "services": [,]\n}\n', name="kong.json")
    assert main(["config", "check", path]) == 1
    err = capsys.readouterr().err
    assert "line 3, column 16: invalid JSON" in err


def test_missing_file_is_an_error(tmp_path, capsys):
    assert main(["config", "check", str(tmp_path / "nope.yml")]) == 1
    assert "cannot read file" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_runs_as_a_module(write):
    path = write(GOOD)
    proc = subprocess.run(
        [sys.executable, "-m", "fhirgate.cli.main", "config", "check", path],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0
    assert "OK (2 services" in proc.stdout
