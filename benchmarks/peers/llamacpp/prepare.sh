#!/usr/bin/env bash
# Make the trimmed llama.cpp source tarball that travels to the GPU machine (which has no network).
#
#     bash benchmarks/peers/llamacpp/prepare.sh          # -> carry/llamacpp/: llama.cpp-src.tar.gz (3.5 MB), gguf wheel
#
# The source is the llama.cpp tree that the llama-cpp-python sdist on PyPI vendors (pinned version and sha256
# below): pip downloads the sdist, and the tarball keeps what CMake needs to configure ggml (CPU and CUDA
# backends), libllama, common and the tools (llama-bench among them), and drops the rest (other backends,
# models, docs, the web UI and the server, test media). Nothing is patched. The llama.cpp commit goes into the
# tarball as LLAMA_COMMIT, for build.sh to stamp into the binaries and for run.py to report.
# It also downloads the wheel of gguf (gguf-py, pure Python) that write_gguf.py and run.py need there.
# `carry/` is git-ignored: name `carry/llamacpp` in the device tool's `carry`.
set -euo pipefail
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
GGUF_VERSION=0.19.0
SHA256=${LLAMA_CPP_PYTHON_SHA256:-832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e}
cd "$(dirname "$0")/../../.."
DEST=${1:-carry/llamacpp}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
WORK=$(mktemp -d /tmp/llamacpp-prepare.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK"
SDIST=$WORK/llama_cpp_python-$VERSION.tar.gz
if [ "$VERSION" = 0.3.36 ]; then
    echo "$SHA256  $SDIST" | sha256sum -c --quiet -
fi
tar -xzf "$SDIST" -C "$WORK"
ROOT=$WORK/llama_cpp_python-$VERSION
SRC=$ROOT/vendor/llama.cpp
COMMIT=$(cat "$ROOT/.git/modules/vendor/llama.cpp/HEAD" 2>/dev/null || echo unknown)

OUT=$WORK/llama.cpp
mkdir -p "$OUT/ggml/src" "$OUT/tools"
cp -r "$SRC"/{CMakeLists.txt,LICENSE,cmake,include,src,common,vendor,licenses} "$OUT/"
cp -r "$SRC"/ggml/{CMakeLists.txt,cmake,include} "$OUT/ggml/"
cp -r "$SRC"/ggml/src/ggml-cpu "$SRC"/ggml/src/ggml-cuda "$OUT/ggml/src/"
find "$SRC/ggml/src" -maxdepth 1 -type f -exec cp {} "$OUT/ggml/src/" \;
cp "$SRC/tools/CMakeLists.txt" "$OUT/tools/"
for tool in "$SRC"/tools/*/; do
    case $(basename "$tool") in ui|server|cli) ;; *) cp -r "$tool" "$OUT/tools/" ;; esac
done
rm -rf "$OUT/tools/mtmd/tests" "$OUT"/tools/mtmd/test-*
printf '%s\n' "$COMMIT" > "$OUT/LLAMA_COMMIT"
printf 'llama-cpp-python==%s (sdist sha256 %s)\n' "$VERSION" "$(sha256sum "$SDIST" | cut -d' ' -f1)" > "$OUT/LLAMA_SOURCE"

tar -C "$WORK" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -cf - llama.cpp | gzip -9n > "$DEST/llama.cpp-src.tar.gz"
rm -f "$DEST"/gguf-*.whl
python3 -m pip download -q --no-deps --only-binary=:all: "gguf==$GGUF_VERSION" -d "$DEST"
echo "$DEST/llama.cpp-src.tar.gz: $(du -h "$DEST/llama.cpp-src.tar.gz" | cut -f1), llama.cpp $COMMIT, llama-cpp-python $VERSION"
