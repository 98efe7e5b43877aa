# Two commands do everything on a fresh machine:  make lab  ·  make test
# Both create .venv and install kvlab (editable, with its dev extras) at the exact versions in
# requirements/lock.txt; the install is redone only when pyproject.toml or the lock file changes.
# make test-browser also runs every notebook in JupyterLab, in headless Chromium (see browser/).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kvlab-installed
# JupyterLab refuses to run as root unless told to.
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)
SUDO       := $(if $(filter 0,$(shell id -u)),,sudo)
# Where Debian's chromium and chromium-driver put them (browser/conftest.py uses the same paths).
CHROMIUM     := /usr/bin/chromium
CHROMEDRIVER := /usr/bin/chromedriver
PYTEST_ARGS ?=

.PHONY: setup lab test test-browser browser-deps clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/lock.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "kvlab needs Python >= 3.11"'
	@# A venv whose pip is missing (python3-venv absent when it was made) is remade, not reused.
	@$(PY) -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV); $(PYTHON) -m venv $(VENV); } || \
	  { rm -rf $(VENV); echo "could not create $(VENV): on Debian, apt-get install python3-venv"; exit 1; }
	$(PY) -m pip install --quiet --disable-pip-version-check \
	  --constraint requirements/lock.txt --editable '.[dev]'
	@$(PY) -c 'import kvlab, kvlab.kernels; print("kvlab installed in $(VENV):", kvlab.__file__)'
	@touch $(STAMP)

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(ALLOW_ROOT)

test: setup
	$(PY) -m pytest --nbval-lax --nbval-current-env tests notebooks $(PYTEST_ARGS)

# Screenshots and a summary (per notebook: cells run, explorers moved, seconds) go to build/browser/.
test-browser: setup browser-deps
	$(PY) -m pytest browser $(PYTEST_ARGS)

# Debian's Chromium and its driver: Selenium drives these and never downloads a browser of its own.
browser-deps:
	@if [ ! -x $(CHROMIUM) ] || [ ! -x $(CHROMEDRIVER) ]; then \
	  command -v apt-get >/dev/null || { echo "make test-browser needs $(CHROMIUM) and" \
	    "$(CHROMEDRIVER) (Debian: apt-get install chromium chromium-driver)"; exit 1; }; \
	  $(SUDO) apt-get update && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; \
	fi

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
