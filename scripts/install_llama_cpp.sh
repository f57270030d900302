#!/usr/bin/env bash
# Install llama-cpp-python into a virtual environment from a wheel cached outside the repository,
# building the wheel (6-10 minutes on 2 cores) only when the cache has none for this CPU.
# The default build uses GGML_NATIVE=ON, which ties the wheel to the CPU it was built on, so the
# cache key includes the CPU's feature flags. Set LLAMA_CPP_CMAKE_ARGS to build differently (e.g. CUDA).
set -euo pipefail
python=$1
cache=$2
version=0.3.36

default_args="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF"
# On CPUs with AMX (Xeon Sapphire Rapids and later) -march=native turns on llama.cpp's AMX kernels, whose
# q8_0 matmul crashed llama.cpp here (segfault in llama_decode on a q8_0 file; measured 2026-11-30):
# keep them out of the build. Explicit -mno-* flags win over -march=native in GCC and Clang.
if grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
  default_args="$default_args -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'"
fi
cmake_args=${LLAMA_CPP_CMAKE_ARGS:-$default_args}
cpu_flags=$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || uname -m)
key=$(printf '%s|%s' "$cpu_flags" "$cmake_args" | sha256sum | cut -c1-12)
wheels="$cache/wheels/llama-cpp-python-$version-$key"
# The installed build is the one for these flags: nothing to do.
marker="$("$python" -c 'import sys; print(sys.prefix)')/llama-cpp-python.build"
if [ "$(cat "$marker" 2>/dev/null)" = "$version-$key" ] \
  && "$python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$version')" 2>/dev/null; then
  exit 0
fi
sdist="$cache/sdist/llama_cpp_python-$version.tar.gz"

if ! ls "$wheels"/llama_cpp_python-"$version"-*.whl >/dev/null 2>&1; then
  if [ ! -f "$sdist" ]; then
    "$python" -m pip download -q --no-deps --no-binary :all: -d "$cache/sdist" "llama-cpp-python==$version"
  fi
  echo "Building llama-cpp-python $version once into $wheels (6-10 minutes on 2 cores)..."
  rm -rf "$wheels.partial"
  CMAKE_ARGS="$cmake_args" "$python" -m pip wheel -q --no-deps -w "$wheels.partial" "$sdist"
  mv "$wheels.partial" "$wheels"
fi
"$python" -m pip install -q --no-deps --force-reinstall "$wheels"/llama_cpp_python-"$version"-*.whl
if ! failure=$("$python" -c "import llama_cpp" 2>&1); then
  if printf '%s' "$failure" | grep -q "ModuleNotFoundError"; then
    printf 'llama-cpp-python is installed but a dependency is missing (install requirements.lock):
%s
' "$failure" >&2
    exit 1
  fi
  rm -rf "$wheels"  # built for another CPU, or damaged
  echo "The cached llama-cpp-python wheel does not load on this machine; removed it. Run the command again." >&2
  exit 1
fi
echo "$version-$key" > "$marker"
