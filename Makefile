# nailkit: two commands on a fresh clone:  `make workbook`  and  `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell tools/find_python.sh)
VENV := .venv
PY := $(VENV)/bin/python
KERNEL := nailkit
STAMP := $(VENV)/.installed
# Subprocesses (onnx2tf shells out to `onnxsim`, papermill starts the `nailkit` kernel) must find the venv's tools.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export HF_HUB_OFFLINE := 1

.PHONY: venv workbook test lab clean-outputs strip

$(STAMP): pyproject.toml constraints.txt tools/find_python.sh
	@test -n "$(PYTHON)" || { echo "No Python 3.12 found (set PYTHON=...)"; exit 1; }
	@echo ">> using $(PYTHON)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24" wheel
	# 1) nailkit with everything except the two packages whose metadata pins clash (see constraints.txt).
	$(PY) -m pip install -c constraints.txt -e .
	# 2) onnx2tf (pins ai-edge-litert==2.1.2 exactly; litert-torch needs 2.3) and onnxsim 0.6.5
	#    (onnx2tf 2.6.9's own pin) without their metadata deps; their real deps are in pyproject.
	$(PY) -m pip install -c constraints.txt --no-deps onnx2tf onnxsim
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (nailkit)"
	touch $(STAMP)

venv: $(STAMP)

workbook: $(STAMP)
	$(PY) -m nailkit workbook

test: $(STAMP)
	$(PY) -m pytest tests

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

strip:
	$(PY) -m nailkit strip-notebooks notebooks

clean-outputs:
	rm -rf outputs/*
