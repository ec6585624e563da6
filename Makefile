# Two entry points for a fresh machine: `make demo` (main job) and `make test` (test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: install demo test clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps "tensorflow-serving-api==2.21.*"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/resic demo --out $(DEMO_OUT)

# Two pytest-xdist workers (CI has 2 cores), each test module one work unit, the heaviest sent
# first (tests/conftest.py).
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=15 -n $(TEST_WORKERS) --dist loadfile \
		--no-loadscope-reorder

clean:
	rm -rf $(VENV) runs *.egg-info
