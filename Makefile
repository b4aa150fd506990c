# Each target creates .venv on first use, so a fresh machine needs only Python 3.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pytest-xdist workers. The end-to-end tests mostly wait on sockets, so four workers keep
# two cores busy (measured on two cores: 2 workers 230 s, 3 177 s, 4 146 s, 6 150 s).
WORKERS ?= 4
# More pytest options, e.g. PYTEST_ARGS=--durations=20 for the slowest tests.
PYTEST_ARGS ?=

.PHONY: demo test test-slow lint clean

$(BIN)/ready: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

demo: $(BIN)/ready
	$(BIN)/python demo/run_demo.py

lint: $(BIN)/ready
	$(BIN)/ruff check .

# Everything but the long runs (tests marked slow).
test: lint
	$(BIN)/python -m pytest -n $(WORKERS) -m "not slow" $(PYTEST_ARGS)

# The long runs alone: every soak seed, the scale runs, the demo, the wheel install and
# the kill points whose S3-state run repeats the local one.
test-slow: $(BIN)/ready
	$(BIN)/python -m pytest -n $(WORKERS) -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .venv-py39 .pytest_cache
