#!/usr/bin/env bash
# Builds llama.cpp's llama-bench twice (three times where the default build crashes), for
# `mycel bench inference --llama-bench ... --llama-bench-portable ...`; with --server, also
# llama-server with the flags of the build llama-bench runs from (default, or native-noamx
# where the default crashes) into .cache/llama.cpp/server-<that build>/bin/llama-server, for
# `mycel bench serve --llama-server ...`:
#   .cache/llama.cpp/default/bin/llama-bench   llama.cpp's default build, as its users build
#                                             it: native CPU (GGML_NATIVE, the default) and
#                                             OpenMP (the default);
#   .cache/llama.cpp/portable/bin/llama-bench  a portable x86-64 build (AVX2/FMA/F16C chosen
#                                             at build time, no -march=native, no OpenMP),
#                                             like our own portable binary.
# The source is the llama.cpp vendored in the llama-cpp-python sdist on PyPI (the only
# registry this machine reaches). Beside each binary, llama-bench.build records the exact
# source and commands; the benchmark reports it. About 10-20 minutes per build on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
ROOT="$PWD/.cache/llama.cpp"
mkdir -p "$ROOT"
if [ ! -d "$ROOT/src/llama_cpp_python-$VERSION" ]; then
  echo "fetching the llama-cpp-python $VERSION sdist from PyPI" >&2
  python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python -d "$ROOT/src" \
    "llama-cpp-python==$VERSION"
  tar xzf "$ROOT/src/llama_cpp_python-$VERSION.tar.gz" -C "$ROOT/src"
fi
SRC="$ROOT/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
command -v cmake >/dev/null || python3 -m pip install --quiet cmake
if ! echo 'int main(void){return 0;}' | gcc -fopenmp -x c - -o /dev/null 2>/dev/null; then
  echo "gcc cannot link OpenMP; installing libgomp (Debian)" >&2
  apt-get install -y -qq libgomp1 >/dev/null
fi

COMMON=(-DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF)
SERVER=0
[ "${1:-}" = "--server" ] && SERVER=1
# Builds TARGET (llama-bench or llama-server) into .cache/llama.cpp/DIR with the flags given.
build_target() {
  local target="$1" name="$2"
  shift 2
  local out="$ROOT/$name"
  if [ -x "$out/bin/$target" ] && [ -f "$out/bin/$target.build" ]; then
    echo "$name: already built ($out/bin/$target)" >&2
    return
  fi
  echo "building $target ($name) into $out" >&2
  cmake -S "$SRC" -B "$out" "${COMMON[@]}" "$@" >"$out.log" 2>&1 ||
    { tail -20 "$out.log"; exit 1; }
  cmake --build "$out" --target "$target" -j"$(nproc)" >>"$out.log" 2>&1 ||
    { tail -20 "$out.log"; exit 1; }
  {
    echo "source: llama.cpp vendored in llama-cpp-python $VERSION (PyPI sdist)"
    echo "configure: cmake -S <llama.cpp> -B <build> ${COMMON[*]} $*"
    echo "build: cmake --build <build> --target $target -j$(nproc)"
  } >"$out/bin/$target.build"
  echo "$name: $out/bin/$target" >&2
}
build() {
  build_target llama-bench "$@"
}
# llama-server from the same source and flags as the llama-bench build NAME.
build_server() {
  local name="$1"
  shift
  build_target llama-server "server-$name" -DLLAMA_BUILD_SERVER=ON "$@"
}
# llama.cpp's defaults: GGML_NATIVE=ON, GGML_OPENMP=ON.
build default
# Where the CPU reports AMX but the machine does not grant its tile state (some VMs), the
# default build dies at its first AMX instruction (SIGSEGV/SIGILL in ldtilecfg). What its users
# do then: the same native build with AMX turned off; the benchmark takes that one instead.
model="$PWD/.cache/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
status=0
if [ -f "$model" ]; then
  # In a subshell without core dumps; a status of 128 or more is a signal.
  (ulimit -c 0; "$ROOT/default/bin/llama-bench" -m "$model" -p 8 -n 4 -r 1 >/dev/null 2>&1) || status=$?
else
  echo "no $model: run scripts/fetch-models.sh first to check that the default build runs here" >&2
fi
if [ "$status" -ge 128 ]; then
  echo "the default build is killed by signal $((status - 128)) on this machine (AMX granted by the CPU, not by the kernel?)" >&2
  NOAMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  build native-noamx -DCMAKE_C_FLAGS="$NOAMX" -DCMAKE_CXX_FLAGS="$NOAMX"
  echo "default build crashed here; use $ROOT/native-noamx/bin/llama-bench as --llama-bench" >&2
  [ "$SERVER" = 1 ] && build_server native-noamx -DCMAKE_C_FLAGS="$NOAMX" -DCMAKE_CXX_FLAGS="$NOAMX"
elif [ "$SERVER" = 1 ]; then
  build_server default
fi
build portable -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_OPENMP=OFF
