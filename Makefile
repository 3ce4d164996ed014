# The two commands of the README:
#   make backup   a daily backup of the database in .env, in-process (no broker needed)
#   make test     the whole test suite (installs what it needs first)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Three test processes on two cores: most of a test's time is spent waiting on PostgreSQL, Celery and the
# clock. A file's tests stay together, in order, sharing its module fixtures (each process starts its own
# clusters and Redis). `make test PYTEST_PARALLEL=` runs them one by one.
PYTEST_PARALLEL ?= -n 3 --dist loadfile

.PHONY: backup test lint bench clean

backup: $(VENV)/.deps .env
	$(BIN)/pgbeat backup daily

test: $(VENV)/.test-deps
	bash scripts/system-deps.sh pg_config initdb pg_dump psql redis-server gzip sha256sum runuser promtool sshd ssh ssh-keygen age age-keygen pigz zstd faketime chromium
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_PARALLEL)

lint: $(VENV)/.test-deps
	$(BIN)/ruff check .

bench: $(VENV)/.test-deps
	bash scripts/system-deps.sh pg_config initdb pg_dump psql gzip runuser pigz zstd
	$(BIN)/python bench/run.py $(BENCH_ARGS)

.env:
	cp .env.example .env
	@echo "Created .env from .env.example: edit it to point at your database."

$(VENV)/.deps: pyproject.toml
	bash scripts/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test-deps: pyproject.toml $(VENV)/.deps
	$(BIN)/pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
