# One place for the set-up: `make run` serves the example, `make test` installs and runs the tests.
# Both create .venv and install into it; running them again only installs what is missing.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test check typecheck bench chaos soak install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned: this takes the local CPU build instead of several GB of CUDA packages.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[models,dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/celery-serve run examples.sentiment:app

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# mypy cannot follow setuptools' package-dir mapping (celery_serve -> app/, .workers -> workers/, .api -> api/),
# so it checks a tree of links laid out as the installed package.
typecheck: $(STAMP)
	rm -rf build/typecheck && mkdir -p build/typecheck/celery_serve
	ln -s $(CURDIR)/app/* build/typecheck/celery_serve/
	ln -s $(CURDIR)/workers build/typecheck/celery_serve/workers
	ln -s $(CURDIR)/api build/typecheck/celery_serve/api
	$(BIN)/mypy

check: $(STAMP) typecheck
	$(BIN)/ruff check app workers api tests examples benchmarks
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The whole fault-injection suite (about 10 minutes): every fault of tests/test_chaos.py, and the CI subset.
chaos: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "chaos or not chaos" tests/test_chaos.py tests/test_faults.py

# Ten minutes at about 70% of capacity, a replica killed every 30 s and one Redis restart (see BENCHMARKS.md).
soak: $(STAMP)
	$(BIN)/python benchmarks/soak.py --minutes 10

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/overhead.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/model_throughput.py

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
