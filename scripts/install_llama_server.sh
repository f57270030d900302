#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` once from the llama.cpp source vendored in the pinned llama-cpp-python
# sdist (the same llama.cpp that reads our GGUF files in-process), cached outside the repository like the
# wheel; link it as $venv/bin/llama-server. The web UI is left out (its prebuilt assets would be downloaded).
set -euo pipefail
python=$1
cache=$2
version=0.3.36
venv_bin="$("$python" -c 'import sys; print(sys.prefix)')/bin"

cmake_args="-DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
-DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release"
# Same reason as scripts/install_llama_cpp.sh: llama.cpp's AMX q8_0 kernels crashed here.
if grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
  cmake_args="$cmake_args -DCMAKE_C_FLAGS=-mno-amx-tile\ -mno-amx-int8\ -mno-amx-bf16"
  cmake_args="$cmake_args -DCMAKE_CXX_FLAGS=-mno-amx-tile\ -mno-amx-int8\ -mno-amx-bf16"
fi
cpu_flags=$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || uname -m)
key=$(printf '%s|%s' "$cpu_flags" "$cmake_args" | sha256sum | cut -c1-12)
home="$cache/llama-server/$version-$key"
if [ ! -x "$home/llama-server" ] || ! "$home/llama-server" --version >/dev/null 2>&1; then
  sdist="$cache/sdist/llama_cpp_python-$version.tar.gz"
  if [ ! -f "$sdist" ]; then
    "$python" -m pip download -q --no-deps --no-binary :all: -d "$cache/sdist" "llama-cpp-python==$version"
  fi
  echo "Building llama-server from llama-cpp-python $version's llama.cpp once into $home (5-10 minutes on 2 cores)..."
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  tar xzf "$sdist" -C "$work"
  src="$work/llama_cpp_python-$version/vendor/llama.cpp"
  eval cmake -S "$src" -B "$work/build" "$cmake_args" >"$work/configure.log" 2>&1 \
    || { cat "$work/configure.log" >&2; exit 1; }
  cmake --build "$work/build" --target llama-server -j "$(nproc)" >"$work/build.log" 2>&1 \
    || { tail -50 "$work/build.log" >&2; exit 1; }
  rm -rf "$home.partial" && mkdir -p "$home.partial"
  cp "$work/build/bin/llama-server" "$home.partial/"
  rm -rf "$home" && mv "$home.partial" "$home"
fi
ln -sf "$home/llama-server" "$venv_bin/llama-server"
