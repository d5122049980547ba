# fedretina: the README's two commands are `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# uv reads uv.lock and ignores this machine's pip configuration (whose CPU-only torch breaks torchvision).
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
VENV := .venv/bin
FR := $(VENV)/fedretina
PROFILE ?= cpu

.PHONY: help uv sync demo test test-fast bench lint format clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

uv:  # bootstrap uv from pip when it is missing
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install -q uv

sync: uv  ## install the locked environment into .venv
	@$(UV) sync --locked --extra dev --quiet

demo: sync  ## the main job on the embedded synthetic default (cpu profile)
	$(FR) config --profile $(PROFILE)

test: sync  ## the whole test suite (what CI runs)
	$(VENV)/pytest -q

test-fast: sync  ## unit tests only
	$(VENV)/pytest -q -m "not integration and not e2e"

bench: sync  ## benchmarks: ratios measured in one run, written to runs/bench/
	$(VENV)/python -m tests.bench

lint: sync  ## ruff lint and format check
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .

format: sync  ## apply ruff's formatting and safe fixes
	$(VENV)/ruff check --fix .
	$(VENV)/ruff format .

clean:  ## stop this project's local SuperLink; remove generated data, runs and caches
	-$(FR) env --stop
	rm -rf .flwr data runs sites/generated .pytest_cache .ruff_cache
