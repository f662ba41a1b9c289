# The two commands of the README: `make quickstart` and `make test`. Both create the virtual
# environment on first use and reuse it afterwards (the stamp is renewed when setup.py changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
QUICKSTART_OUT ?= runs/quickstart
PYTEST_ARGS ?=

.PHONY: install quickstart test lint clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(VENV)/bin/unitok quickstart --out $(QUICKSTART_OUT)

# Tiny models run faster and steadier on one intra-op thread per process (the suite spawns several).
test: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs build *.egg-info
