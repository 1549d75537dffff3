# The two commands: `make train` and `make test`. Each builds .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PRESET ?= default
ARGS ?=

.PHONY: train test bench clean

# The venv is rebuilt when pyproject.toml changes; the project is installed editable.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

train: $(VENV)/.installed
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(PY) -m iai_dist.train --preset $(PRESET) $(ARGS)

test: $(VENV)/.installed
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(PY) -m pytest tests $(ARGS)

bench: $(VENV)/.installed
	$(PY) -m iai_dist.bench quality $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info
