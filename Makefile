# The two commands a user needs: `make up` and `make test`. Everything else is set-up they call.
SHELL := /bin/bash
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
export UV_PYTHON ?= 3.11

.PHONY: setup tools system-packages lint test test-fast bench-tokenizer speedrun-tiny up clean

# uv itself comes from PyPI when missing; `uv sync` then builds the venv, the Rust extension
# (maturin, rebuilt only when its sources change) and every workspace member from the lock file.
$(UV):
	$(PYTHON) -m pip install --user --quiet uv

setup: $(UV)
	$(UV) sync --locked

# What `make test` cannot fetch from a package registry: a Rust toolchain and Go (the infra
# validators). Checked first, so a machine without them stops in seconds, not minutes in.
tools:
	@missing=""; for t in cargo go; do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then echo "make test needs:$$missing (cargo from https://rustup.rs, go from https://go.dev/dl)" >&2; exit 1; fi

# The Debian packages the tests need that no package registry carries: chromium, the browser the
# web UI tests drive through Playwright (Playwright's own download needs its CDN), and bubblewrap,
# the sandbox HumanEval's answers run in. Missing ones are installed with apt-get when we are root
# or have passwordless sudo; otherwise the run stops here, in its first seconds, with the command
# to run. $$CHROMIUM may name another browser binary, $$NANOCHAT_BWRAP another bwrap.
system-packages:
	@need=""; \
	if [ -z "$$CHROMIUM" ] && ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then \
		need="$$need chromium"; fi; \
	if [ -z "$$NANOCHAT_BWRAP" ] && ! command -v bwrap >/dev/null; then need="$$need bubblewrap"; fi; \
	if [ -n "$$need" ]; then \
		if [ "$$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo"; else \
			echo "make test needs Debian's$$need (chromium for the browser tests, bubblewrap for the HumanEval" \
				"sandbox) and cannot install it here (not root, no passwordless sudo). Run:" >&2; \
			echo "    sudo apt-get update && sudo apt-get install -y$$need" >&2; exit 1; fi; \
		echo "installing Debian packages for the tests: $${sudo:+sudo }apt-get install$$need"; \
		$$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need >/dev/null; \
	fi

# Each suite runs in its own pytest process: suites share module names (conftest, test_events);
# tests/faults (the fault suite, its own conftest) is a suite of its own, not part of tests.
# A suite that fails, or collects no test (pytest's exit 5), stops the run with its exit code;
# `make test-fast` deselects slow tests, so there a suite left empty (exit 5) is fine.
SUITES := rustbpe/tests libs/nanochat/tests libs/testing/tests libs/registry_client/tests libs/service_kit/tests libs/contracts/tests \
	services/registry/tests services/trainer/tests services/inference/tests services/webui/tests tests tests/faults
PYTEST_ARGS ?=
ALLOW_EMPTY ?=

# ruff (lint and format check) on all Python code; mypy on the service kit and the contracts, the
# two libraries every service imports.
lint: setup
	$(UV) run --locked ruff check .
	$(UV) run --locked ruff format --check .
	$(UV) run --locked mypy libs/service_kit/service_kit libs/contracts/nanochat_contracts

test: tools system-packages setup lint
	cargo test --release --quiet --manifest-path rustbpe/Cargo.toml
	cd infra/validate && go test -count=1 ./...
	@for suite in $(wildcard $(SUITES)); do \
		echo "=== pytest $$suite"; \
		if [ $$suite = tests ]; then nested=--ignore=tests/faults; else nested=; fi; \
		$(UV) run --locked pytest $$suite $$nested $(PYTEST_ARGS); rc=$$?; \
		if [ $$rc -ne 0 ] && ! { [ $$rc -eq 5 ] && [ -n "$(ALLOW_EMPTY)" ]; }; then exit $$rc; fi; \
	done

test-fast:
	$(MAKE) test PYTEST_ARGS='-m "not slow"' ALLOW_EMPTY=1


bench-tokenizer: setup
	$(UV) run --locked python bench/tokenizer.py

# The whole speedrun pipeline on this CPU with the tiny preset (report: runs/speedrun-tiny/report/).
speedrun-tiny: setup
	$(UV) run --locked bash libs/nanochat/scripts/speedrun_tiny.sh runs/speedrun-tiny

# Every service as a local process (infra/local/up.py); Ctrl-C stops them all.
up: setup
	$(UV) run --locked python infra/local/up.py

clean:
	rm -rf .venv rustbpe/target
