# Two commands on a fresh machine (Python 3.10+, pip, no GPU, no Hub access):
#   make demo   # the whole pipeline on the bundled real CICIoT2023 sample (tiny GPT-2, CPU)
#   make test   # the test suite
# Both create .venv and install what they need first. On a cluster, install your CUDA torch
# yourself and `pip install -e .` instead (setup.py does not pin torch).
PYTHON ?= python3
VENV ?= .venv
# CPU build for the quick start; override e.g. TORCH_SPEC='torch' to take whatever pip resolves.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
# Exact versions the suite passes with; `make test CONSTRAINTS=` takes the newest releases instead.
CONSTRAINTS ?= constraints.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: demo test test-fast install clean

$(VENV)/.installed: setup.py pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(PIP_C) -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/cic-gpt2 demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The fast loop: no multi-process / DeepSpeed-spawning tests (marked slow). CI runs `make test`.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) demo_out runs
