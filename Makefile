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

.PHONY: venv workbook test lab clean-outputs strip gpu-driver

# SwiftShader's Vulkan driver (Debian's `chromium` ships it as /usr/lib/chromium/libvk_swiftshader.so; the Vulkan
# loader libvulkan.so.1 is only a Recommends of chromium, so it is named too). LiteRT's WebGPU accelerator runs on it,
# which is how tests/test_gpu.py gets the real GPU delegate's verdict on a CPU-only machine. Idempotent: nothing is
# done when both are present. Without root/apt the step only warns, and the GPU tests skip with a one-line reason.
SWIFTSHADER_ICD := /usr/lib/chromium/vk_swiftshader_icd.json

$(STAMP): pyproject.toml constraints.txt constraints-frozen.txt tools/find_python.sh
	@test -n "$(PYTHON)" || { echo "No Python 3.12 found (set PYTHON=...)"; exit 1; }
	@echo ">> using $(PYTHON)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24" wheel
	# 1) nailkit with everything except the two packages whose metadata pins clash (see constraints.txt).
	# constraints-frozen.txt: every transitive package at the version the suite passed with (see its header).
	$(PY) -m pip install -c constraints.txt -c constraints-frozen.txt -e .
	# 2) onnx2tf (pins ai-edge-litert==2.1.2 exactly; litert-torch needs 2.3) and onnxsim 0.6.5
	#    (onnx2tf 2.6.9's own pin) without their metadata deps; their real deps are in pyproject.
	$(PY) -m pip install -c constraints.txt -c constraints-frozen.txt --no-deps onnx2tf onnxsim
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (nailkit)"
	touch $(STAMP)

venv: $(STAMP)

workbook: $(STAMP)
	$(PY) -m nailkit workbook

gpu-driver:
	@if [ -f $(SWIFTSHADER_ICD) ] && ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1 '; then \
	  echo ">> SwiftShader Vulkan driver present ($(SWIFTSHADER_ICD))"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo ">> installing SwiftShader Vulkan driver (apt-get install chromium libvulkan1)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  { apt-get install -y --no-install-recommends chromium libvulkan1 >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y --no-install-recommends chromium libvulkan1; }; } \
	  || echo "!! could not install chromium/libvulkan1: GPU delegate tests will skip"; \
	else \
	  echo "!! SwiftShader Vulkan driver missing and not root/apt: GPU delegate tests will skip" \
	       "(sudo apt-get install -y chromium libvulkan1)"; \
	fi

test: $(STAMP) gpu-driver
	$(PY) -m pytest tests --durations=15

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

strip:
	$(PY) -m nailkit strip-notebooks notebooks

clean-outputs:
	rm -rf outputs/*
