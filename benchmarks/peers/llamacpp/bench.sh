#!/usr/bin/env bash
# llama.cpp on Mixtral-8x7B's shapes, in one call: build llama-bench from the carried source (build.sh) while the
# GGUF is written (write_gguf.py), then run.py: every expert on the CPU, each budget, everything on the GPU.
# Logs and JSON go to $OUT (default: ./out). Needs carry/llamacpp from prepare.sh (and nothing from the network).
#
#     bash benchmarks/peers/llamacpp/bench.sh                        # lent GPU: Q2_K experts, 12, 8, 16 GiB
#     EXPERTS=q3_k bash benchmarks/peers/llamacpp/bench.sh            # Q3_K (or q4_k) experts
#     BACKEND=cpu TINY=1 bash benchmarks/peers/llamacpp/bench.sh --budgets 3MiB,4MiB,5MiB --overhead 1MiB \
#         --prompts 64,256 --gen 16                                   # here: a CPU test of the whole pipeline
#
# Arguments go to run.py; MOE_OFFLOAD_COMMIT=<hash> names our commit where the copy has no .git. LIMIT (default 570 s) is the time the whole script may take; run.py skips placements
# that would end past it. A second call on the same (still warm) machine reuses the build and the GGUF in /tmp.
set -uo pipefail
cd "$(dirname "$0")/../../.."
HERE=benchmarks/peers/llamacpp
OUT=${OUT:-out}
EXPERTS=${EXPERTS:-q2_k}
BACKEND=${BACKEND:-cuda}
LIMIT=${LIMIT:-570}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import gguf" 2>/dev/null; then
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-index --no-deps --no-compile --upgrade \
        --target /tmp/llamacpp-site carry/llamacpp/gguf-*.whl || exit 1
    export PYTHONPATH=/tmp/llamacpp-site${PYTHONPATH:+:$PYTHONPATH}
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

tiny=()
[ -n "${TINY:-}" ] && tiny=(--tiny)
model=/tmp/llamacpp-mixtral${TINY:+-tiny}-$EXPERTS.gguf
writer=
for other in /tmp/llamacpp-mixtral*.gguf*; do      # one GGUF at a time: the three full ones need 63 GB of disk
    [ "$other" = "$model" ] || rm -f "$other"
done
if [ ! -s "$model" ]; then
    (python3 $HERE/write_gguf.py "${tiny[@]}" --experts "$EXPERTS" --out "$model.part" && mv "$model.part" "$model") &
    writer=$!
fi
bench=$(bash $HERE/build.sh "$BACKEND" /tmp/llamacpp-$BACKEND) || exit 1
tail -n 30 /tmp/llamacpp-$BACKEND/build.log > "$OUT/llamacpp_build.log"
if [ -n "$writer" ]; then
    wait $writer || exit 1
fi
python3 $HERE/run.py --bench "$bench" --model "$model" --out "$OUT" --threads "${THREADS:-$(nproc)}" \
    --time-limit $((LIMIT - SECONDS)) "$@"
