# Two commands on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch lies on local disk here; pinning it avoids a multi-GB CUDA download.
TORCH_SPEC ?= torch==2.13.0

.PHONY: quickstart test install install-test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

quickstart: $(VENV)/.installed
	$(PY) examples/quickstart.py

test: $(VENV)/.installed-test
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs/quickstart
