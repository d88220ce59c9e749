# The two commands of the README. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck unit bench fuzz clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[cli,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dreamo demo

test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check dreamo_async tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	@command -v redis-server >/dev/null 2>&1 || echo "note: redis-server not found, so the Redis tests \
	(tests/test_redis_limits.py) are skipped; install it with: sudo apt-get install redis-server"
	$(BIN)/pytest

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
