# One-command set-up: `make test` and `make demo` create .venv and install everything first.
# Idempotent: once .venv is complete, a second run installs nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 / torchvision 0.29.1 are the tested pair; override for another platform,
# e.g. make test TORCH="torch==2.9.1 torchvision==0.24.1"
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.mimdet-installed
PYTEST_ARGS ?=

.PHONY: setup test demo mae-demo clean

setup: $(STAMP)

$(STAMP): setup.py tools/install_detectron2.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install $(TORCH)
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install -e ".[dev]"
	$(PY) -c "import models, detectron2; print('mimdet ready: detectron2', detectron2.__version__)"
	touch $(STAMP)

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest tests $(PYTEST_ARGS)

demo: setup
	$(PY) tools/demo.py

mae-demo: setup
	$(PY) tools/demo.py --mae

clean:
	rm -rf $(VENV) .cache output
