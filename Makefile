# The two set-up commands of the README:
#   make demo   install into .venv (first time only) and run the demo on synthetic phantoms
#   make test   install into .venv (first time only) and run the test suite
# The install pins torch/torchvision (constraints.txt) so that they import together; pyproject.toml keeps ranges.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medssl-installed
DEMO_OUT ?= demo
PYTEST_ARGS ?=

.PHONY: install demo test bench clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e '.[test,dicom,nnunet]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m medssl.pretrain demo --out $(DEMO_OUT)

test: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/loader.py

clean-demo:
	rm -rf $(DEMO_OUT)
