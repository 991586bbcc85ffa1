"""`fhirgate demo-data` and `fhirgate load`, run in-process against a real HTTP server that answers
like a FHIR server (the recording h11 upstream of tests/harness.py with a FHIR-like handler)."""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from tests.harness import Recorded, Reply, Upstream

from fhirgate.cli import data_cmd
from fhirgate.cli.main import main
from fhirgate.fhirserver.demodata import generate

FHIR_JSON = "application/fhir+json"


def outcome(status: int, diagnostics: str) -> Reply:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "invalid", "diagnostics": diagnostics}],
    }
    return Reply(status=status, headers=[("Content-Type", FHIR_JSON)], body=json.dumps(body).encode())


def fhir_ok(req: Recorded) -> Reply:
    """What a FHIR server answers to a successful write."""
    if req.method == "POST" and req.target.rstrip("/") in ("", "/fhir"):
        bundle = json.loads(req.body)
        kind = "batch-response" if bundle.get("type") == "batch" else "transaction-response"
        entries = [{"response": {"status": "201 Created"}} for _ in bundle.get("entry", [])]
        body = {"resourceType": "Bundle", "type": kind, "entry": entries}
        return Reply(status=200, headers=[("Content-Type", FHIR_JSON)], body=json.dumps(body).encode())
    return Reply(status=201, headers=[("Content-Type", FHIR_JSON)], body=req.body)


def entry_types(req: Recorded) -> set[str]:
    return {e["resource"]["resourceType"] for e in json.loads(req.body).get("entry", [])}


def is_directory(req: Recorded) -> bool:
    return "Organization" in entry_types(req)


@pytest.fixture
def demo_dir(tmp_path: Path) -> Path:
    out = tmp_path / "demo"
    out.mkdir()
    for name, bundle in generate(3, 4):
        (out / name).write_bytes(orjson.dumps(bundle))
    return out


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Back-off delays the loader asked for; nothing actually waits."""
    asked: list[float] = []
    monkeypatch.setattr(data_cmd, "_sleep", asked.append)
    return asked


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FHIRGATE_TOKEN", raising=False)


def run(*argv: str) -> int:
    return main(list(argv))


# ---- demo-data --------------------------------------------------------------------------------


def test_demo_data_writes_the_generator_output_compact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "new" / "dir"
    assert run("demo-data", "--patients", "3", "--seed", "7", "--out", str(out)) == 0
    expected = {name: orjson.dumps(bundle) for name, bundle in generate(3, 7)}
    assert {p.name: p.read_bytes() for p in out.iterdir()} == expected
    assert all(b"\n" not in data and b": " not in data for data in expected.values())
    stdout = capsys.readouterr().out
    total = sum(len(orjson.loads(data)["entry"]) for data in expected.values())
    assert "resources by type" in stdout
    assert "Observation" in stdout
    assert "PractitionerRole" in stdout
    assert f"wrote 4 files (3 patients + the provider directory, {total:,} resources" in stdout
    assert f"fhirgate load {out}" in stdout


def test_demo_data_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert run("demo-data") == 0
    names = sorted(p.name for p in (tmp_path / "demo-data").iterdir())
    assert names == sorted(name for name, _ in generate(10, 1))


def test_demo_data_reports_an_unwritable_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run("demo-data", "--patients", "1", "--out", str(blocker / "sub")) == 1
    assert f"error: cannot write to {blocker / 'sub'}" in capsys.readouterr().err


def test_demo_data_rejects_negative_patients(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run("demo-data", "--patients", "-1")
    assert "must be 0 or more" in capsys.readouterr().err


# ---- load: success, order, headers ------------------------------------------------------------


def test_load_sends_the_directory_first_then_patients_as_they_are(
    upstream: Upstream, demo_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    received: list[tuple[float, bool]] = []
    lock = threading.Lock()

    def handler(req: Recorded) -> Reply:
        directory = is_directory(req)
        with lock:
            received.append((time.monotonic(), directory))
        reply = fhir_ok(req)
        reply.delay = 0.3 if directory else 0.0  # patients must wait for it all the same
        return reply

    upstream.handler = handler
    code = run(
        "load", str(demo_dir), "--fhir", upstream.url + "/fhir/", "--token", "t0k3n", "--concurrency", "3"
    )
    assert code == 0
    assert len(upstream.requests) == 4
    assert [d for _, d in received] == [True, False, False, False]
    assert all(at >= received[0][0] + 0.3 for at, _ in received[1:])
    files = {p.read_bytes() for p in demo_dir.iterdir()}
    for req in upstream.requests:
        assert req.method == "POST"
        assert req.target == "/fhir"
        assert req.header("authorization") == "Bearer t0k3n"
        assert req.header("content-type") == FHIR_JSON
        assert req.header("accept") == FHIR_JSON
        assert req.body in files  # transaction bundles go as they are
    total = sum(len(orjson.loads(data)["entry"]) for data in files)
    out = capsys.readouterr().out
    assert "load summary" in out
    assert f"{total:,}" in out


def test_load_reads_the_token_from_the_environment(
    upstream: Upstream, demo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream.handler = fhir_ok
    monkeypatch.setenv("FHIRGATE_TOKEN", "from-env")
    assert run("load", str(demo_dir), "--fhir", upstream.url) == 0
    assert {r.header("authorization") for r in upstream.requests} == {"Bearer from-env"}
    assert {r.target for r in upstream.requests} == {"/"}


def test_load_without_token_sends_no_authorization(upstream: Upstream, demo_dir: Path) -> None:
    upstream.handler = fhir_ok
    assert run("load", str(demo_dir), "--fhir", upstream.url) == 0
    assert all(r.header("authorization") is None for r in upstream.requests)


def test_synthea_hospital_and_practitioner_files_go_first_in_that_order(
    upstream: Upstream, tmp_path: Path
) -> None:
    upstream.handler = fhir_ok

    def bundle(rtype: str) -> bytes:
        entry = {
            "fullUrl": "urn:uuid:1",
            "resource": {"resourceType": rtype},
            "request": {"method": "POST", "url": rtype},
        }
        return orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [entry]})

    (tmp_path / "Aaron1_Abbott2_x.json").write_bytes(bundle("Patient"))
    (tmp_path / "practitionerInformation1596649672088.json").write_bytes(bundle("Practitioner"))
    (tmp_path / "hospitalInformation1596649672088.json").write_bytes(bundle("Organization"))
    (tmp_path / "zz.json").write_bytes(bundle("Patient"))
    assert run("load", str(tmp_path), "--fhir", upstream.url, "--concurrency", "4") == 0
    order = [entry_types(r) for r in upstream.requests]
    assert order[:2] == [{"Organization"}, {"Practitioner"}]
    assert order[2:] == [{"Patient"}, {"Patient"}]


# ---- load: other inputs -----------------------------------------------------------------------


def test_ndjson_goes_in_transactions_of_500_patients_before_other_types(
    upstream: Upstream, tmp_path: Path
) -> None:
    upstream.handler = fhir_ok
    observations = [{"resourceType": "Observation", "id": f"o{i}", "status": "final"} for i in range(1203)]
    observations[7].pop("id")
    lines = [orjson.dumps(o).decode() for o in observations]
    lines.insert(10, "")  # blank lines are skipped
    (tmp_path / "a-Observation.ndjson").write_text("\n".join(lines) + "\n")
    with gzip.open(tmp_path / "b-Patient.ndjson.gz", "wt") as handle:
        handle.write('{"resourceType":"Patient","id":"p1"}\n{"resourceType":"Patient","id":"p2"}\n')
    (tmp_path / "notes.txt").write_text("ignored")
    assert run("load", str(tmp_path), "--fhir", upstream.url + "/fhir") == 0
    bundles = [json.loads(r.body) for r in upstream.requests]
    assert [len(b["entry"]) for b in bundles] == [2, 500, 500, 203]
    assert all(b["type"] == "transaction" for b in bundles)
    assert bundles[0]["entry"][0]["request"] == {"method": "PUT", "url": "Patient/p1"}
    requests = [e["request"] for b in bundles[1:] for e in b["entry"]]
    assert requests[0] == {"method": "PUT", "url": "Observation/o0"}
    assert requests[7] == {"method": "POST", "url": "Observation"}
    assert len(requests) == 1203


def test_single_resources_are_put_with_an_id_and_posted_without(upstream: Upstream, tmp_path: Path) -> None:
    upstream.handler = fhir_ok
    (tmp_path / "p.json").write_text('{"resourceType": "Patient", "id": "abc", "gender": "female"}')
    (tmp_path / "o.json").write_text('{"resourceType": "Observation", "status": "final"}')
    assert (
        run("load", str(tmp_path / "o.json"), str(tmp_path / "p.json"), "--fhir", upstream.url + "/r4") == 0
    )
    # The Patient goes first (its tier), whatever the order on the command line.
    assert [(r.method, r.target) for r in upstream.requests] == [
        ("PUT", "/r4/Patient/abc"),
        ("POST", "/r4/Observation"),
    ]
    assert json.loads(upstream.requests[0].body)["gender"] == "female"


def test_a_collection_bundle_is_sent_as_a_transaction(upstream: Upstream, tmp_path: Path) -> None:
    upstream.handler = fhir_ok
    collection = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {
                "fullUrl": "http://x/Patient/1",
                "resource": {"resourceType": "Patient", "id": "1"},
                "search": {"mode": "match"},
            },
            {"resource": {"resourceType": "Observation", "status": "final"}},
            {"fullUrl": "http://x/nothing"},
        ],
    }
    (tmp_path / "c.json").write_bytes(orjson.dumps(collection))
    assert run("load", str(tmp_path), "--fhir", upstream.url) == 0
    (req,) = upstream.requests
    sent = json.loads(req.body)
    assert sent["type"] == "transaction"
    assert sent["entry"] == [
        {
            "fullUrl": "http://x/Patient/1",
            "resource": {"resourceType": "Patient", "id": "1"},
            "request": {"method": "PUT", "url": "Patient/1"},
        },
        {
            "resource": {"resourceType": "Observation", "status": "final"},
            "request": {"method": "POST", "url": "Observation"},
        },
    ]


# ---- load: failures ---------------------------------------------------------------------------


def test_transient_failures_are_retried_honouring_retry_after(
    upstream: Upstream, demo_dir: Path, sleeps: list[float], capsys: pytest.CaptureFixture[str]
) -> None:
    answers: Iterator[Callable[[Recorded], Reply]] = iter(
        [
            lambda req: outcome(503, "starting"),
            lambda req: Reply(status=429, headers=[("Retry-After", "7")], body=b""),
            lambda req: Reply(status=502, body=b"bad gateway"),
        ]
    )

    def handler(req: Recorded) -> Reply:
        return next(answers, fhir_ok)(req)

    upstream.handler = handler
    (directory,) = demo_dir.glob("hospitalInformation*.json")
    assert run("load", str(directory), "--fhir", upstream.url) == 0
    assert len(upstream.requests) == 4
    assert len({r.body for r in upstream.requests}) == 1
    first, second, third = sleeps
    assert data_cmd.BACKOFF_BASE / 2 <= first <= data_cmd.BACKOFF_BASE
    assert second == 7.0
    assert data_cmd.BACKOFF_BASE * 2 <= third <= data_cmd.BACKOFF_BASE * 4
    captured = capsys.readouterr()
    assert "3 transient failure(s) retried" in captured.out
    assert "error" not in captured.err


def test_transient_failures_give_up_after_the_retries(
    upstream: Upstream, demo_dir: Path, sleeps: list[float], capsys: pytest.CaptureFixture[str]
) -> None:
    upstream.handler = lambda req: outcome(503, "database is restarting")
    assert run("load", str(demo_dir), "--fhir", upstream.url, "--retries", "2", "--concurrency", "1") == 1
    assert len(upstream.requests) == 3 * 4  # every file tried (1 + 2 retries)
    assert len(sleeps) == 2 * 4
    err = capsys.readouterr().err
    assert "HTTP 503 Service Unavailable: database is restarting" in err


def test_a_rejected_file_is_reported_and_the_others_still_load(
    upstream: Upstream, demo_dir: Path, sleeps: list[float], capsys: pytest.CaptureFixture[str]
) -> None:
    victim = sorted(p.name for p in demo_dir.iterdir())[1]
    victim_body = (demo_dir / victim).read_bytes()

    def handler(req: Recorded) -> Reply:
        if req.body == victim_body:
            return outcome(422, "Observation.valueQuantity.value: not a decimal")
        return fhir_ok(req)

    upstream.handler = handler
    assert run("load", str(demo_dir), "--fhir", upstream.url) == 1
    assert len(upstream.requests) == 4
    assert sleeps == []  # a 4xx is not retried
    captured = capsys.readouterr()
    diagnostics = "HTTP 422 Unprocessable Entity: Observation.valueQuantity.value: not a decimal"
    assert f"error: {demo_dir / victim}: {diagnostics}" in captured.err
    assert f"failed: {demo_dir / victim}: HTTP 422" in captured.out
    rows = [line for line in captured.out.splitlines() if line.startswith("│")]
    cells = [c.strip() for c in rows[0].split("│")[1:-1]]
    assert cells[:2] == ["3", "1"]


def test_failed_batch_entries_fail_the_file(
    upstream: Upstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def handler(req: Recorded) -> Reply:
        body = {
            "resourceType": "Bundle",
            "type": "batch-response",
            "entry": [
                {"response": {"status": "201 Created"}},
                {
                    "response": {
                        "status": "400 Bad Request",
                        "outcome": {
                            "resourceType": "OperationOutcome",
                            "issue": [
                                {
                                    "severity": "error",
                                    "code": "invalid",
                                    "diagnostics": "unknown element 'colour'",
                                    "expression": ["Patient.colour"],
                                }
                            ],
                        },
                    }
                },
            ],
        }
        return Reply(body=json.dumps(body).encode())

    upstream.handler = handler
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}}]
        * 2,
    }
    (tmp_path / "b.json").write_bytes(orjson.dumps(batch))
    assert run("load", str(tmp_path), "--fhir", upstream.url) == 1
    assert (
        "1 batch entries failed: entry[1] 400 Bad Request: unknown element 'colour' (at Patient.colour)"
        in capsys.readouterr().err
    )


def test_unreadable_files_are_reported_and_the_rest_loads(
    upstream: Upstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    upstream.handler = fhir_ok
    (tmp_path / "a.json").write_text("{not json")
    (tmp_path / "b.json").write_text('{"hello": "world"}')
    (tmp_path / "c.ndjson").write_text('{"resourceType":"Patient"}\n[1, 2]\n')
    (tmp_path / "d.json").write_text('{"resourceType": "Patient", "id": "ok"}')
    code = run("load", str(tmp_path), str(tmp_path / "missing.json"), "--fhir", upstream.url)
    assert code == 1
    assert [(r.method, r.target) for r in upstream.requests] == [("PUT", "/Patient/ok")]
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'a.json'}: not valid JSON" in err
    assert f"error: {tmp_path / 'b.json'}: the file is not a FHIR resource (no resourceType)" in err
    assert f"error: {tmp_path / 'c.ndjson'}: line 2 is not a FHIR resource (no resourceType)" in err
    assert f"error: {tmp_path / 'missing.json'}: no such file or directory" in err


def test_an_unreachable_server_is_retried_then_reported(
    tmp_path: Path, demo_dir: Path, sleeps: list[float], capsys: pytest.CaptureFixture[str]
) -> None:
    closed = Upstream()
    url = closed.url
    closed.close()
    assert run("load", str(demo_dir), "--fhir", url, "--retries", "1", "--concurrency", "1") == 1
    assert len(sleeps) == 4
    assert "cannot reach the server" in capsys.readouterr().err


def test_a_read_timeout_is_not_retried(
    upstream: Upstream, tmp_path: Path, sleeps: list[float], capsys: pytest.CaptureFixture[str]
) -> None:
    def handler(req: Recorded) -> Reply:
        reply = fhir_ok(req)
        reply.delay = 1.0
        return reply

    upstream.handler = handler
    (tmp_path / "p.json").write_text('{"resourceType": "Patient"}')
    assert run("load", str(tmp_path), "--fhir", upstream.url, "--timeout", "0.2") == 1
    assert len(upstream.requests) == 1
    assert sleeps == []
    assert "not retried" in capsys.readouterr().err


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("load", str(tmp_path), "--fhir", "ftp://x") == 2
    assert "is not an http(s) URL" in capsys.readouterr().err
    assert run("load", str(tmp_path)) == 1
    assert "no .json or .ndjson files" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run("load", str(tmp_path), "--concurrency", "0")


def test_retry_after_parsing() -> None:
    parse: Callable[[str | None], Any] = data_cmd._retry_after
    assert parse(None) is None
    assert parse("12") == 12.0
    assert parse("100000") == data_cmd.RETRY_AFTER_CAP
    assert parse("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert parse("soon") is None
