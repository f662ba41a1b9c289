# The two commands of the README: `make quickstart` and `make test`. Both create the virtual
# environment on first use and reuse it afterwards (the stamp is renewed when setup.py changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
QUICKSTART_OUT ?= runs/quickstart
PYTEST_ARGS ?=

.PHONY: install quickstart test lint clean browser

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(VENV)/bin/unitok quickstart --out $(QUICKSTART_OUT)

# The demo's browser test drives Debian's Chromium. Install it where we can (root with apt); never fail
# here: without it that test skips loudly, and .ci/run turns the skip into a failure.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium + chromium-driver for the browser test"; \
		( apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium chromium-driver >/dev/null ) \
		|| echo "WARNING: could not install chromium + chromium-driver: the browser test will be skipped"; \
	else \
		echo "WARNING: no chromium/chromedriver and no apt as root: the browser test will be skipped"; \
	fi

# Tiny models run faster and steadier on one intra-op thread per process (the suite spawns several).
test: install browser
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs build *.egg-info
