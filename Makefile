# The two quick-start commands: `make demo` (the main job on the local preset) and `make test`.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch (this pin installs from the local wheel cache on the dev machines).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO_OUT ?= runs/demo
# Real SGLang on the CPU, in an environment of its own (`make sglang`; the tests find it there).
SGLANG_ENV ?= .venv-sglang

.PHONY: setup sglang demo test bench pipeline clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet '$(TORCH)'
	$(BIN)/python -m pip install --quiet -e '.[dev]'
# helm-sdkpy (Helm's Go library, for the chart tests) declares Python 3.12+ but runs on 3.11.
	$(BIN)/python -m pip install --quiet --ignore-requires-python helm-sdkpy
	touch $@

sglang:
	scripts/sglang-env.sh $(SGLANG_ENV)

demo: setup
	rm -rf $(DEMO_OUT)
	$(BIN)/apr pipeline run --local --workdir $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/datagen_speed.py

pipeline: setup
	$(BIN)/apr pipeline compile

clean:
	rm -rf $(VENV) $(SGLANG_ENV) runs
