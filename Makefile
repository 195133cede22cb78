PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[models,cluster,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rsdist demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf runs
