# One place for the install step: every target that needs the environment depends on $(STAMP).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock 2>/dev/null | sha1sum | cut -c1-10)
PYTEST_ARGS ?=

.PHONY: install demo test bench clean-venv

$(STAMP):
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "environment ready in $(VENV)"

install: $(STAMP)

demo: install  ## the whole pipeline on the embedded default (toy world, tiny models, CPU)
	$(PY) ray_jobs/run_all.py --config local

test: install  ## the test suite (CI runs this)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) bench/run_all.py

clean-venv:
	rm -rf $(VENV)
