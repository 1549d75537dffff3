# The two commands: `make train` and `make test`. Each builds .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PRESET ?= default
ARGS ?=

RUNS ?= runs
UI_PORT ?= 5000

.PHONY: train test bench ui clean fashion-mnist-deb fashion-mnist browser-deb

# The venv is rebuilt when pyproject.toml changes; the project is installed editable.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

train: $(VENV)/.installed
	$(PY) -m iai_dist.train --preset $(PRESET) $(ARGS)

# OMP_WAIT_POLICY=PASSIVE: on a CPU shared with other jobs, spinning OpenMP threads made the suite 10x slower.
test: $(VENV)/.installed fashion-mnist-deb browser-deb
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(PY) -m pytest tests $(ARGS)

# The MLflow UI over the project's store (runs/mlflow.db, or MLFLOW_TRACKING_URI), on this machine only.
ui: $(VENV)/.installed
	$(PY) -m mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///$(abspath $(RUNS))/mlflow.db} \
	  --host 127.0.0.1 --port $(UI_PORT)

bench: $(VENV)/.installed
	$(PY) -m iai_dist.bench quality $(ARGS)

# Real Fashion-MNIST offline: Debian's dataset-fashion-mnist (four .gz IDX files). `make test` installs it
# where it can (root with apt-get); the tests that read it skip only when it is absent.
FASHION_DEB := /usr/share/datasets/fashion-mnist
fashion-mnist-deb:
	@test -d $(FASHION_DEB) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	  && { apt-get install -y -q dataset-fashion-mnist >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }; } \
	  || echo "note: could not install dataset-fashion-mnist (needs root and apt-get); tests on real Fashion-MNIST will skip"; }

# Headless Chromium and its driver for the browser test of the MLflow UI (Debian packages).
browser-deb:
	@command -v chromedriver >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	  && { apt-get install -y -q chromium chromium-driver >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }; } \
	  || echo "note: could not install chromium and chromium-driver (needs root and apt-get); the browser test will fail"; }

# ... staged into the layout torchvision reads, under task.image.root's default (~/.cache/iai_dist/data).
fashion-mnist: $(VENV)/.installed fashion-mnist-deb
	$(PY) -m iai_dist.data stage fashion_mnist --from $(FASHION_DEB)

clean:
	rm -rf $(VENV) *.egg-info
