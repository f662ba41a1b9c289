# The two commands of the README: `make quickstart` and `make test`. Both create the virtual
# environment on first use and reuse it afterwards (a stamp is renewed when setup.py changes).
# Each installs only what it uses: the quick start the core package with lmms-eval, the tests `.[test]` (dev tools,
# DeepSpeed, lmms-eval, gradio); `make install-all` adds the rest (wandb).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CORE_STAMP := $(VENV)/.installed-core
STAMP := $(VENV)/.installed
ALL_STAMP := $(VENV)/.installed-all
QUICKSTART_OUT ?= runs/quickstart
PYTEST_ARGS ?=

.PHONY: install install-core install-all quickstart test lint check-floors clean browser

# A new environment takes about 8 GB (PyPI's Linux torch is the CUDA build): say so before pip runs out of disk.
$(VENV)/.venv-created:
	@free_kb=$$(df -Pk . | awk 'NR == 2 {print $$4}'); \
	if [ -n "$$free_kb" ] && [ "$$free_kb" -lt 10000000 ]; then \
		echo "WARNING: $$((free_kb / 1048576)) GiB free here; the virtual environment needs about 8 GiB (torch and its CUDA libraries)"; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	touch $@

$(CORE_STAMP): setup.py $(VENV)/.venv-created
	$(PY) -m pip install --quiet -e '.[quickstart]'
	touch $@

$(STAMP): setup.py $(VENV)/.venv-created
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -e '.[test]'
	touch $@ $(CORE_STAMP)

$(ALL_STAMP): setup.py $(VENV)/.venv-created
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -e '.[all]'
	touch $@ $(STAMP) $(CORE_STAMP)

install-core: $(CORE_STAMP)

install: $(STAMP)

install-all: $(ALL_STAMP)

quickstart: install-core
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

# Installs the dependency floors of setup.py into a scratch folder and imports the whole package with them.
check-floors: install-core
	$(PY) -m unitok.scripts.check_floors

clean:
	rm -rf $(VENV) runs build *.egg-info
