# Each target does all set-up on a fresh machine: a virtualenv, the CPU torch build, the package.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.halludec-installed
# The oldest supported transformers, tested once beside the newest (design: supported >=5.17,<6).
OLDEST_VENV ?= .venv-oldest
OLDEST_TRANSFORMERS ?= transformers==5.17.0
OLDEST_STAMP := $(OLDEST_VENV)/.halludec-installed

.PHONY: demo test test-newest test-oldest test-fast lint format venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU build of torch first, so no dependency pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,bench,lmeval]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/halludec demo

$(OLDEST_STAMP): pyproject.toml
	test -x $(OLDEST_VENV)/bin/python || $(PY) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(OLDEST_VENV)/bin/python -m pip install --quiet "$(OLDEST_TRANSFORMERS)" -e ".[dev]"
	touch $(OLDEST_STAMP)

# The README's test command (what CI runs): lint, the full suite on the newest transformers, then the fast
# tier on the oldest supported one.
test: test-newest test-oldest

test-newest: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

test-oldest: $(OLDEST_STAMP)
	$(OLDEST_VENV)/bin/python -m pytest -q -m "not slow" -p no:cacheprovider

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(OLDEST_VENV) build *.egg-info .pytest_cache .ruff_cache
