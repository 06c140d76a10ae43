# The two commands a user needs: `make up` and `make test`. Everything else is set-up they call.
SHELL := /bin/bash
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
export UV_PYTHON ?= 3.11

.PHONY: setup test test-fast bench-tokenizer up clean

# uv itself comes from PyPI when missing; `uv sync` then builds the venv, the Rust extension
# (maturin, rebuilt only when its sources change) and every workspace member from the lock file.
$(UV):
	$(PYTHON) -m pip install --user --quiet uv

setup: $(UV)
	$(UV) sync --locked

test: setup
	cargo test --release --quiet --manifest-path rustbpe/Cargo.toml
	cd infra/validate && go test -count=1 ./...
	$(UV) run --locked pytest

test-fast: setup
	cargo test --release --quiet --manifest-path rustbpe/Cargo.toml
	$(UV) run --locked pytest -m "not slow"

bench-tokenizer: setup
	$(UV) run --locked python bench/tokenizer.py

up: setup
	@echo "make up will start every service locally (registry, trainer, inference, web UI) once the stack lands; today it only sets up the environment."

clean:
	rm -rf .venv rustbpe/target
