# The two quick-start commands: `make demo` (the main job on the local preset) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= runs/demo/data

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	rm -rf $(DEMO_OUT)
	$(BIN)/apr datagen --config configs/local.yaml --out $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/datagen_speed.py

clean:
	rm -rf $(VENV) runs
