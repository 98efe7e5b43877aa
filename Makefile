# Two commands do everything on a fresh machine:  make lab  ·  make test
# Both create .venv and install kvlab (editable, with its dev extras) at the exact versions in
# requirements/lock.txt; the install is redone only when pyproject.toml or the lock file changes.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kvlab-installed
# JupyterLab refuses to run as root unless told to.
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)
PYTEST_ARGS ?=

.PHONY: setup lab test clean

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

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
