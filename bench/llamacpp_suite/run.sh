#!/usr/bin/env bash
# Runs llama.cpp's own server test suite (tools/server/tests of the llama.cpp that the installed
# llama-cpp-python vendors) against a Velesio router, as llama.cpp's CI runs it against llama-server: the
# suite starts "llama-server" for each test, and LLAMA_SERVER_BIN_PATH points it at llama_server_shim.py,
# which starts one velesio-router and one velesio-worker serving the embedded SmolLM2 instead.
#
#   bench/llamacpp_suite/run.sh                         # or: make llamacpp-suite
#   bench/llamacpp_suite/run.sh unit/test_tokenize.py   # other modules or test ids (paths in the suite)
#
# Results (in .cache/llamacpp-suite/): junit.xml, pytest.log, and summary.md (pass/fail counts and each
# failure's category from classification.py; an unknown failure says "unclassified"). RESULTS.md next to
# this script is the reviewed report. Exit status 0 when pytest ran (failures are the measurement), else 2.
#
# Setup, all under .cache/ (git-ignored): the llama-cpp-python source distribution (downloaded from PyPI as
# `make llama-server` does, and only its tests unpacked when the full tree is not there already), and a
# virtual environment of its own with the suite's requirements.txt (the project's .venv is left alone).
# The router and worker come from .venv (make setup). Nothing is built, nothing is downloaded from Hugging
# Face: the plugin suite_plugin.py turns the suite's model download fixture into a no-op.
#
# Environment: PYTHON (the project's interpreter, default .venv/bin/python), SUITE_PYTHON (the interpreter of
# the suite's own venv, default python3), LLAMA_SERVER_DIR (default .cache/llama-server), LLAMACPP_SUITE_DIR
# (default .cache/llamacpp-suite), LLAMACPP_SUITE_PORT (the port the suite's servers listen on, default
# 18089), LLAMA_CPP_PYTHON_VERSION (default: the installed binding's), SLOW_TESTS=1 (also the tests marked
# slow), DEBUG=1 (the suite's --verbose: DEBUG logs from router and worker).
set -euo pipefail

cd "$(dirname "$0")/../.."
ROOT=$(pwd)
PYTHON=${PYTHON:-.venv/bin/python}
SUITE_PYTHON=${SUITE_PYTHON:-python3}
SRC_DIR=${LLAMA_SERVER_DIR:-.cache/llama-server}
OUT=${LLAMACPP_SUITE_DIR:-.cache/llamacpp-suite}
export PORT=${LLAMACPP_SUITE_PORT:-18089}

# The modules run by default: llama.cpp's server API as the router speaks it. test_infill is only listed
# (collected, not run: infill is outside the router's scope).
MODULES=(unit/test_basic.py unit/test_completion.py unit/test_chat_completion.py unit/test_tokenize.py
         unit/test_embedding.py unit/test_template.py unit/test_tool_call.py unit/test_ctx_shift.py
         unit/test_ignore_eos.py unit/test_security.py unit/test_stream.py)
LISTED=(unit/test_infill.py)

VERSION=${LLAMA_CPP_PYTHON_VERSION:-$("$PYTHON" -c 'import llama_cpp; print(llama_cpp.__version__)')}
TESTS="$SRC_DIR/llama_cpp_python-$VERSION/vendor/llama.cpp/tools/server/tests"
if [ ! -f "$TESTS/utils.py" ]; then
  SDIST="$SRC_DIR/llama_cpp_python-$VERSION.tar.gz"
  mkdir -p "$SRC_DIR"
  [ -f "$SDIST" ] || "$PYTHON" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$SRC_DIR"
  tar -xzf "$SDIST" -C "$SRC_DIR" "llama_cpp_python-$VERSION/vendor/llama.cpp/tools/server/tests"
fi
TESTS=$(cd "$TESTS" && pwd)

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
VENV="$OUT/venv"
REQS_HASH=$(sha256sum "$TESTS/requirements.txt" | cut -c1-16)
if [ "$(cat "$VENV/.installed" 2>/dev/null)" != "$REQS_HASH" ]; then
  rm -rf "$VENV"
  "$SUITE_PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r "$TESTS/requirements.txt"
  echo "$REQS_HASH" > "$VENV/.installed"
fi

export LLAMA_SERVER_BIN_PATH="$ROOT/bench/llamacpp_suite/llama_server_shim.py"
export VELESIO_BIN="$ROOT/$(dirname "$PYTHON")"
export PYTHONPATH="$ROOT/bench/llamacpp_suite${PYTHONPATH:+:$PYTHONPATH}"
unset API_TOKENS ADMIN_TOKENS

if [ $# -gt 0 ]; then
  SELECTED=("$@")
else
  SELECTED=("${MODULES[@]}")
fi
MARKS=()
if [ "${SLOW_TESTS:-0}" != 1 ] && [ "${SLOW_TESTS:-}" != ON ]; then
  MARKS=(-m "not slow")
fi

cd "$TESTS"
PYTEST=("$VENV/bin/python" -m pytest -p suite_plugin -p no:xdist -p no:cacheprovider)
"${PYTEST[@]}" --collect-only -q "${LISTED[@]}" 2>/dev/null | grep '::' > "$OUT/listed.txt" || true
COMMIT=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)
set +e
"${PYTEST[@]}" "${MARKS[@]}" -rfE --tb=short --durations=20 --junitxml="$OUT/junit.xml" "${SELECTED[@]}" \
  2>&1 | tee "$OUT/pytest.log"
rc=${PIPESTATUS[0]}
set -e
cd "$ROOT"
"$PYTHON" bench/llamacpp_suite/summarize.py "$OUT/junit.xml" --listed "$OUT/listed.txt" --commit "$COMMIT" \
  > "$OUT/summary.md"
echo "summary: $OUT/summary.md (pytest exit status $rc)"
[ "$rc" -le 1 ] || exit 2
