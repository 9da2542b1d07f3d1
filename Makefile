# The two README commands:  make demo  |  make test
# Both install what is missing first (tools/setup_env.sh is idempotent and fast when done).
# the environment: make ... VENV=path, or MAE_VENV=path make ... (default .venv)
VENV := $(or $(VENV),$(MAE_VENV),.venv)
PY := $(VENV)/bin/python
export MAE_VENV := $(abspath $(VENV))

.PHONY: setup demo test lint format benchmark clean

setup:
	@tools/setup_env.sh

demo: setup
	$(PY) tools/demo.py $(DEMO_ARGS)

test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

benchmark: setup
	$(PY) tools/benchmark.py $(BENCH_ARGS)

clean:
	rm -rf demo_output .pytest_cache
