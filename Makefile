# make demo: install into .venv and run the example end to end.  make test: install and run every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.nbbatch-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast browser bench typecheck clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) examples/cifar_inference.py

# Chromium for the dashboard's browser tests: Debian's package (Playwright never downloads one).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  ( (command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	     (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)) || \
	    echo "chromium could not be installed: browser tests will be skipped" )

test: install browser
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow and not ui" $(PYTEST_ARGS)

typecheck: install
	$(PY) -m mypy nbbatch

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache nbbatch.duckdb* nbbatch_outputs
