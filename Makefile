# The two commands of the README (and `make docs`). Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck unit unit-here docs bench fuzz chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[cli,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dreamo demo

test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check dreamo_async tests benchmarks examples fuzz noxfile.py

typecheck: $(STAMP)
	$(BIN)/mypy

# The suite once per CPython of noxfile.py (3.11, 3.12, 3.13), in turn; ARGS go to pytest.
# `make unit-here` runs it once, on .venv's interpreter only.
unit: $(STAMP)
	@command -v redis-server >/dev/null 2>&1 || echo "note: redis-server not found, so the Redis tests \
	(tests/test_redis_limits.py) are skipped; install it with: sudo apt-get install redis-server"
	$(BIN)/nox -- $(ARGS)

unit-here: $(STAMP)
	$(BIN)/pytest $(ARGS)

# The docs site (docs/, mkdocs.yml) into site/; --strict: a broken reference or a
# docstring the API reference cannot read fails the build.
docs: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[cli,dev,docs]'
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[cli,dev,bench]'
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# Long fuzzing (atheris when it installs, else hypothesis alone) and the chaos suite at
# scale. FUZZ_SECONDS per atheris target, FUZZ_EXAMPLES per hypothesis property.
FUZZ_SECONDS  ?= 60
FUZZ_EXAMPLES ?= 10000
CHAOS_JOBS    ?= 5000
FUZZ_TARGETS  := image response error_body retry_after

fuzz: $(STAMP)
	mkdir -p .fuzz-corpus
	$(BIN)/python -m pip install --quiet -e '.[fuzz]' || echo "atheris did not install: hypothesis only"
	if $(BIN)/python -c 'import atheris' 2>/dev/null; then \
	  for t in $(FUZZ_TARGETS); do \
	    $(BIN)/python fuzz/atheris_run.py $$t $(FUZZ_SECONDS) > .fuzz-corpus/$$t.log 2>&1 \
	      || { tail -40 .fuzz-corpus/$$t.log; exit 1; }; \
	    echo "atheris $$t: $$(grep '^Done' .fuzz-corpus/$$t.log)"; \
	  done; \
	fi
	DREAMO_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) DREAMO_FUZZ_RANDOM=1 \
	  $(BIN)/pytest tests/test_fuzz.py -q -o timeout=0 --hypothesis-show-statistics
	$(MAKE) chaos

chaos: $(STAMP)
	$(BIN)/python fuzz/chaos.py $(CHAOS_JOBS)

clean:
	rm -rf $(VENV) .nox .mypy_cache .pytest_cache .ruff_cache .fuzz-corpus site
