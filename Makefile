# Two commands do everything, on a fresh machine, idempotently:
#   make demo   set up, then train ResNet-20 + DHM on Fashion-MNIST (training: 3-10 min on 2 CPU cores, see README)
#   make test   set up (including the DALI and FFCV extras), then run the whole test suite
# Set-up steps re-run only when their inputs change (stamp files in the virtual environment).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH  := torch==2.14.1 torchvision==0.29.1
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?=

.PHONY: demo test setup setup-dev data lint clean-venv

demo: setup data
	$(PY) train.py $(ARGS)

test: setup-dev data
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup-dev
	$(VENV)/bin/ruff check .

setup: $(VENV)/.stamp-project
setup-dev: $(VENV)/.stamp-dev $(VENV)/.stamp-extras

$(VENV)/.stamp-python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "dhm_fast needs Python >= 3.11 (PYTHON=$(PYTHON) is older); run: make PYTHON=python3.11 ..."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	touch $@

$(VENV)/.stamp-torch: $(VENV)/.stamp-python
	$(PIP) install --quiet $(TORCH) ninja
	touch $@

# The native library kernels._C is compiled here (CUDA kernels too when nvcc is present). Only its
# sources are inputs: the built .so and __pycache__ beside them must not trigger a rebuild.
KERNEL_SOURCES := $(wildcard kernels/*.cpp kernels/*.cu kernels/*.cuh kernels/*.h) kernels/cuda_targets.py
$(VENV)/.stamp-project: $(VENV)/.stamp-torch pyproject.toml setup.py $(KERNEL_SOURCES)
	$(PIP) install --quiet --no-build-isolation -e .
	touch $@

# The dev tools listed in pyproject.toml, installed without reinstalling (and recompiling) the project.
$(VENV)/.stamp-dev: $(VENV)/.stamp-project
	$(PY) -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['dev'], sep='\n')" \
	  | xargs -d '\n' $(PIP) install --quiet
	touch $@

$(VENV)/.stamp-extras: $(VENV)/.stamp-project pipelines/install_extras.sh
	bash pipelines/install_extras.sh $(PIP)
	touch $@

# Debian's dataset-fashion-mnist: the built-in default data.
data:
	@if [ ! -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }; \
	  else \
	    echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' (or set FASHION_MNIST_DIR)"; \
	    exit 1; \
	  fi; \
	fi

clean-venv:
	rm -rf $(VENV)
