#!/usr/bin/env bash
# Builds llama.cpp's own HTTP server (`llama-server`) for the benchmark's `server` scenario, from the llama.cpp
# sources that the llama-cpp-python source distribution vendors: the same llama.cpp version as the installed
# binding, so the comparison is engine against engine, not version against version.
#
#   bench/build_llama_server.sh            # or: make llama-server
#
# CPU build (GGML_NATIVE, as the binding's own source build), static, only the llama-server target, without the
# web UI (no npm, no download). Takes about 12 minutes on two cores. Result: .cache/llama-server/llama-server and
# .cache/llama-server/VERSION (the llama-cpp-python version it was built from). Nothing is installed system-wide.
#
# Environment: PYTHON (default .venv/bin/python), LLAMA_SERVER_DIR (default .cache/llama-server), JOBS (default 2),
# LLAMA_CPP_PYTHON_VERSION (default: the installed binding's version), CMAKE_ARGS (extra cmake arguments).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${LLAMA_SERVER_DIR:-.cache/llama-server}
JOBS=${JOBS:-2}

command -v cmake >/dev/null || { echo "cmake is required (apt-get install cmake g++)" >&2; exit 1; }
command -v c++ >/dev/null || command -v g++ >/dev/null || { echo "a C++ compiler is required (apt-get install g++)" >&2; exit 1; }

VERSION=${LLAMA_CPP_PYTHON_VERSION:-$("$PYTHON" -c 'import llama_cpp; print(llama_cpp.__version__)')}
mkdir -p "$OUT"
if [ -x "$OUT/llama-server" ] && [ "$(cat "$OUT/VERSION" 2>/dev/null)" = "$VERSION" ]; then
  echo "llama-server from llama-cpp-python $VERSION is already built: $OUT/llama-server"
  exit 0
fi

SDIST="$OUT/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
  "$PYTHON" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$OUT"
fi
SRC="$OUT/llama_cpp_python-$VERSION/vendor/llama.cpp"
if [ ! -f "$SRC/tools/server/CMakeLists.txt" ]; then
  tar -xzf "$SDIST" -C "$OUT" "llama_cpp_python-$VERSION/vendor/llama.cpp"
fi

BUILD="$OUT/build-$VERSION"
start=$(date +%s)
# LLAMA_CURL is the older versions' switch for downloads, LLAMA_OPENSSL the newer ones'; neither is needed here.
# shellcheck disable=SC2086
cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -Wno-dev ${CMAKE_ARGS:-} >/dev/null
cmake --build "$BUILD" --target llama-server -j "$JOBS"
cp "$BUILD/bin/llama-server" "$OUT/llama-server"
echo "$VERSION" > "$OUT/VERSION"
echo "built $OUT/llama-server (llama-cpp-python $VERSION) in $(( $(date +%s) - start )) s"
