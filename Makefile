# One set of targets that developers and CI run verbatim.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck unit bench bench-auth clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## make run: install everything, then run the demo (gateway on :8000 in front of a local FHIR upstream)
run: $(STAMP)
	$(BIN)/python -m fhirgate.demo

## make test: install everything, then lint, type-check and run the whole test suite
test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

## make bench: the gateway against nginx on loopback (installs nginx and wrk with apt if missing)
bench: $(STAMP)
	$(BIN)/python bench/proxy_bench.py

## make bench-fhir: the built-in FHIR server (ingest, read, US Core searches) on SQLite and PostgreSQL
bench-fhir: $(STAMP)
	$(BIN)/python bench/fhir_bench.py

## make bench-auth: tokens/s of the authorization server's token endpoint (client_credentials) on SQLite and PostgreSQL
bench-auth: $(STAMP)
	$(BIN)/python bench/auth_bench.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache
