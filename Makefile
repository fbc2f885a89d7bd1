# Two entry points: `make demo` (the main job) and `make test` (the whole suite). Both set up
# everything themselves on a fresh machine: .venv, the Rust extension, Python dependencies.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup engine build demo test test-rust test-types test-python bench bench-quick clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# SGLang 0.5.23 and its serving dependencies (CPU build here, stock SGLang on a GPU host), then
# the PD transport pieces for CPU. Both scripts are idempotent and return at once when up to date.
engine: | $(BIN)/python
	scripts/install_engine.sh $(abspath $(VENV))
	@if [ -x scripts/install_pd_cpu.sh ]; then scripts/install_pd_cpu.sh $(abspath $(VENV)); fi

$(VENV)/.deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "maturin>=1.8,<2" "pytest>=8" "hypothesis>=6.100" "matplotlib>=3.7" "mypy==2.4.1"
	touch $@

# smg (SGLang Model Gateway), the stock PD router bench/ttft_vs_stock.py compares against, in a
# venv of its own: its pinned protobuf/grpcio must not meet SGLang's.
SMG := $(VENV)/smg/bin/smg
$(SMG): | $(BIN)/python
	$(PYTHON) -m venv $(VENV)/smg
	$(VENV)/smg/bin/pip install -q "smg==1.13.0"

# Editable install of the package; maturin rebuilds the Rust extension incrementally.
build: $(VENV)/.deps engine $(SMG)
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(BIN)):$$PATH $(BIN)/maturin develop --release
	$(BIN)/python -c "import sglang_eldr.router_rs"

setup: build

demo: setup
	$(BIN)/python -m sglang_eldr.demo --host 127.0.0.1

test: test-rust test-types test-python

# The Rust core under the generic and the native-flags build (separate target dirs), the
# certified kernel's agreement with the exact rule, and a native-vs-generic latency check.
test-rust:
	cargo test -p eldr-router --release -q
	RUSTFLAGS="-C target-cpu=native" cargo test -p eldr-router --release -q --target-dir target/flags-native
	cargo run -q --release -p eldr-router --example router_check -- agreement 10000
	$(PYTHON) bench/native_flags.py --quick --out target/native_flags_quick.json

test-types: setup
	$(BIN)/mypy --ignore-missing-imports sglang_eldr

test-python: setup
	ELDR_REQUIRE_ENGINE=1 $(BIN)/python -m pytest -q --durations=25 tests

bench: setup
	cargo bench -p eldr-router
	$(BIN)/python bench/router_micro.py --out bench/results/router_micro.json

bench-quick: setup
	$(BIN)/python bench/router_micro.py --quick --out bench/results/router_micro_quick.json

clean:
	rm -rf $(VENV) target
