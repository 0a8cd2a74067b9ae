#!/bin/sh
# llama.cpp's own server (`llama-server`), built from the llama.cpp sources inside the llama-cpp-python sdist that
# ayar's gguf extra pins (constraints.txt), so `ayar bench serve --llama-server` compares ayar's llama.cpp backend
# with the same llama.cpp. Prints the binary's path. CPU build, no curl; a few minutes on 2 cores the first time.
#   benchmarks/build-llama-server.sh [VENV]
set -eu
VENV=${1:-.venv}
VERSION=$(grep -i '^llama[-_]cpp[-_]python==' constraints.txt | cut -d= -f3)
OUT="$VENV/share/ayar-tools/llama-server-$VERSION"
if [ -x "$OUT/bin/llama-server" ]; then
    echo "$OUT/bin/llama-server"
    exit 0
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: -d "$WORK" "llama-cpp-python==$VERSION" >&2
tar -xzf "$WORK"/llama_cpp_python-*.tar.gz -C "$WORK"
SRC=$(echo "$WORK"/llama_cpp_python-*/vendor/llama.cpp)
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$WORK/build" --target llama-server -j "$(nproc)" >&2
mkdir -p "$OUT/bin"
cp "$WORK/build/bin/llama-server" "$OUT/bin/"
echo "$OUT/bin/llama-server"
