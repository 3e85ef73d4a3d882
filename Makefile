# ¿Who Knows? — `make run` serves on the embedded PostgreSQL, `make test` tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test migrate import clean bench bench-cluster bench-crawl relevance verify lint

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

run: $(STAMP)  ## serve on http://127.0.0.1:8080 (embedded PostgreSQL unless DATABASE_URL is set)
	$(BIN)/python app.py serve

test: $(STAMP)  ## run the test suite against a real PostgreSQL
	$(BIN)/python -m pytest $(PYTEST_ARGS)

migrate: $(STAMP)  ## apply pending migrations
	$(BIN)/python app.py migrate

import: $(STAMP)  ## import pages: make import FILE=path/to/whoknows.db
	$(BIN)/python app.py import $(FILE)

clean:  ## remove the virtualenv (the data in .data/ stays)
	rm -rf $(VENV)

N ?= 100000
CLUSTER_N ?= 20000
bench: $(STAMP)  ## the search benchmark at N pages, then the cluster run (needs wrk and nginx)
	$(BIN)/python bench/run.py --pages $(N) $(BENCH_ARGS)
	$(BIN)/python bench/cluster.py --pages $(CLUSTER_N)

bench-cluster: $(STAMP)  ## one app process vs two behind nginx with a standby: make bench-cluster CLUSTER_N=20000 (needs wrk, nginx)
	$(BIN)/python bench/cluster.py --pages $(CLUSTER_N) $(BENCH_ARGS)

PAGES ?= 10000
bench-crawl: $(STAMP)  ## the crawl benchmark: crawl PAGES local pages (politeness off), then import them (bench/README.md)
	$(BIN)/python bench/crawl.py --pages $(PAGES) $(BENCH_CRAWL_ARGS)

relevance: $(STAMP)  ## the relevance benchmark on CISI, against a BM25 anchor (bench/README.md)
	$(BIN)/python bench/relevance.py $(RELEVANCE_ARGS)

verify: $(STAMP)  ## checks from outside: contract fuzzing, sqlmap, faults and limits, soak (slow)
	$(BIN)/python -m pytest -m external tests/external $(PYTEST_ARGS)

lint: $(STAMP)  ## static checks: ruff (lint and format) and bandit
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/bandit -q -c pyproject.toml -r app.py crawler.py bench
