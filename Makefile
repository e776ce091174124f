# `make demo` and `make test` set everything up on a fresh machine (a .venv at the repository root).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA := data/synthetic

.PHONY: demo test setup clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vlab data synth --out $(DEMO_DATA)
	$(BIN)/vlab data check $(DEMO_DATA)
	$(BIN)/vlab validate experiments/*.toml experiments/quick/*.toml
	$(BIN)/vlab plugins

test: $(STAMP)
	$(BIN)/python -m pytest

clean-demo:
	rm -rf $(DEMO_DATA) runs
