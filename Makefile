# The verbs people expect. Everything the demo and the tests need is installed from here.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --quiet --disable-pip-version-check

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# a .venv left by an unsupported Python would fail every later step: say how to start over
CHECK_PYTHON = @$(BIN)/python -c "import sys; sys.exit(0 if sys.version_info >= (3, 11) else \
	'error: .venv has Python ' + sys.version.split()[0] + '; corral needs 3.11+: run make clean, then make PYTHON=python3.11')"

$(VENV)/.demo: pyproject.toml | $(BIN)/python
	$(CHECK_PYTHON)
	$(PIP) -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(CHECK_PYTHON)
	$(PIP) -e '.[dev]'
	@# the dashboard's browser test: Debian's chromium and its driver
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || { apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }
	touch $@ $(VENV)/.demo

$(VENV)/.bench: pyproject.toml | $(BIN)/python
	$(PIP) -e '.[dev,bench]'
	touch $@ $(VENV)/.dev $(VENV)/.demo

demo: $(VENV)/.demo
	$(BIN)/python examples/demo.py
	$(BIN)/python examples/agents_demo.py

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests bench examples
	$(BIN)/mypy

bench: $(VENV)/.bench
	$(BIN)/python bench/runtime_throughput.py
	$(BIN)/python bench/runtime_concurrency.py
	$(BIN)/python bench/journal_growth.py
	$(BIN)/python bench/scale_out.py
	$(BIN)/python bench/gateway_inprocess.py
	command -v nginx >/dev/null && command -v wrk >/dev/null || apt-get install -y nginx wrk
	$(BIN)/python bench/gateway_overhead.py --install-litellm
	HF_HUB_OFFLINE=1 $(BIN)/python bench/semantic_cache.py
	$(BIN)/python bench/governance.py
	$(BIN)/python bench/decision_log.py
	$(BIN)/python bench/tokens.py
	$(BIN)/python bench/pii.py
	$(BIN)/python bench/peers/langgraph_throughput.py
	$(BIN)/python bench/peers/langgraph_journal_growth.py

clean:
	rm -rf $(VENV) .corral .pytest_cache
