#!/usr/bin/env bash
# Build llama-bench from the carried source tarball (prepare.sh makes it): with CUDA for the H100/H200 (sm_90)
# on the GPU machine, or CPU-only to test the pipeline on a machine without a GPU.
#
#     bash benchmarks/peers/llamacpp/build.sh cuda [BUILD_DIR]    # GPU machine: about 3-4 min on 16 cores
#     bash benchmarks/peers/llamacpp/build.sh cpu  [BUILD_DIR]    # here: CPU backend only
#
# BUILD_DIR defaults to /tmp/llamacpp-BACKEND; the binary is BUILD_DIR/build/bin/llama-bench (printed last).
# Configure flags: no server, web UI, tests, examples or OpenSSL, so nothing is fetched; GGML_NATIVE for the
# host it runs on; the llama.cpp commit from the tarball stamped into the binary (llama-bench's build_commit).
set -euo pipefail
BACKEND=${1:?usage: build.sh cuda|cpu [BUILD_DIR]}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
TARBALL=${LLAMACPP_TARBALL:-$REPO/carry/llamacpp/llama.cpp-src.tar.gz}
DIR=${2:-/tmp/llamacpp-$BACKEND}
JOBS=${JOBS:-$(nproc)}

case $BACKEND in
    cuda) flags=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS:-90})
          command -v nvcc >/dev/null || export PATH=$PATH:/usr/local/cuda/bin ;;
    cpu) flags=(-DGGML_CUDA=OFF) ;;
    *) echo "usage: build.sh cuda|cpu [BUILD_DIR]" >&2; exit 2 ;;
esac
mkdir -p "$DIR"
if [ "$(cat "$DIR/llama.cpp/LLAMA_COMMIT" 2>/dev/null)" != "$(tar -xzOf "$TARBALL" llama.cpp/LLAMA_COMMIT)" ]; then
    rm -rf "$DIR/llama.cpp" "$DIR/build"
    tar -xzf "$TARBALL" -C "$DIR"
fi
COMMIT=$(cat "$DIR/llama.cpp/LLAMA_COMMIT")
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
start=$(date +%s)
cmake -S "$DIR/llama.cpp" -B "$DIR/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_COMMIT="${COMMIT:0:12}" -DLLAMA_BUILD_NUMBER=0 "${flags[@]}" >"$DIR/configure.log" 2>&1 \
    || { tail -40 "$DIR/configure.log"; exit 1; }
cmake --build "$DIR/build" --target llama-bench -j "$JOBS" >"$DIR/build.log" 2>&1 || { tail -40 "$DIR/build.log"; exit 1; }
echo "built llama-bench ($BACKEND, llama.cpp ${COMMIT:0:12}) in $(( $(date +%s) - start )) s" >&2
echo "$DIR/build/bin/llama-bench"
