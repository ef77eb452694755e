# shoal: `make demo` runs a local swarm, `make test` runs lint, types and tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv demo test lint unit bench soak clean netlab-deps

venv: $(STAMP)

$(STAMP): pyproject.toml deploy/install-torch.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	deploy/install-torch.sh $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: venv
	deploy/local-swarm.sh

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint netlab-deps
	$(BIN)/python -m pytest -q

# The NAT lab's tools (iptables, miniupnpd) when root and missing; lab tests skip otherwise.
netlab-deps:
	deploy/netlab-deps.sh

unit: venv
	$(BIN)/python -m pytest -q tests/unit

soak: venv
	CHAOS_S=$${CHAOS_S:-1800} $(BIN)/python -m pytest -q -s tests/integration/test_chaos.py

bench: venv
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	@for b in tests/bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .demo .mypy_cache .ruff_cache .pytest_cache
