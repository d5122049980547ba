# fedretina: the README's two commands are `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# uv reads uv.lock and ignores this machine's pip configuration (whose CPU-only torch breaks torchvision).
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
VENV := .venv/bin
FR := $(VENV)/fedretina
PROFILE ?= cpu
ifndef DEMO_RUN
DEMO_RUN := demo-$(shell date +%Y%m%d-%H%M%S)
endif
# the natural scenario's four sites, one Ray actor per CPU
DEMO_NODES := 4
# HOST:PORT of a running Ray cluster's head to run the simulation's actors on (docs/scale.md); empty: local
RAY_ADDRESS ?=

# Debian packages the tests need: nginx (the server's Fleet-only proxy), chromium (the dashboard tests' browser)
SYSTEM_PACKAGES := nginx-light chromium
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: help uv sync system demo test test-faults test-security test-fast bench lint format clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

uv:  # bootstrap uv from pip when it is missing
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install -q uv

# --compile-bytecode: every process of the tests (Flower's, Ray's actors, each CLI run) imports torch; where
# PYTHONDONTWRITEBYTECODE is set (as on our development machine) none would ever find a .pyc (measured: 6.4 -> 3.4 s
# of CPU per process importing torch, torchvision, flwr and ray; the compile costs 35 s once).
sync: uv  ## install the locked environment into .venv
	@$(UV) sync --locked --extra dev --extra mlflow --quiet --compile-bytecode

# The demo's fine-tuning: 16 rounds with class-weighted losses. The DR head sees only the EyePACS-like
# site's images while the encoder is averaged with the MMAC site's each round; in 6 unweighted rounds it
# stayed at the majority grade (test kappa 0.000, referable AUC 0.841), in 16 weighted ones it reached
# referable AUC 0.950 and kappa 0.557 on the site's 186 held-out test images (docs/compare.md).
DEMO_SET := federation.tasks=[dr,mmac] federation.rounds_finetune=16 finetune.class_weighting=true

demo: sync  ## the main job on the embedded synthetic default (cpu profile, about 9 minutes on 2 cores from a fresh clone)
	$(FR) synth --profile $(PROFILE)
	$(FR) site check sites/generated/*.yaml | grep -E "^site |images listed|^  (FATAL|excluded)"
	eval "$$($(FR) env $(if $(RAY_ADDRESS),--ray-address $(RAY_ADDRESS)))" && flwr run . --stream \
		--federation-config "num-supernodes=$(DEMO_NODES) client-resources-num-cpus=1" \
		--run-config 'profile="$(PROFILE)" scenario="natural" run-name="$(DEMO_RUN)" set="$(DEMO_SET)"'
	$(FR) server summary --no-table runs/$(DEMO_RUN)
	$(FR) site evaluate sites/generated/eyepacs.yaml -m runs/$(DEMO_RUN)/federation/model.safetensors

system:  ## install the Debian packages the tests need (nginx, chromium), when missing
	@command -v nginx >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; }

# Three workers on two cores, a test file each at a time: most integration tests wait on real processes
# (Flower's polls, process starts), so they overlap; each worker computes on one thread (tests/conftest.py).
# The 15 slowest tests are listed at the end: CI's 20-minute budget is watched where it is spent.
test: sync system  ## the test suite CI runs (all but the fault tests)
	$(VENV)/pytest -q -m "not faults" -n 3 --dist loadfile --durations=15

test-faults: sync system  ## deployment fault tests: killed, stalled and restarted processes (about 25 minutes) and a slow link (3.5 minutes)
	$(VENV)/pytest -q -m faults

test-security: sync system  ## the adversarial suite, all of it: hostile server, site, network and files (about 10 minutes)
	FUZZ_CASES=60 $(VENV)/pytest -q -m security

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
