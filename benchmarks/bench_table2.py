"""The paper's Table 2 on Mixtral-8x7B shapes, in two GPU calls of under 9 minutes each.

    MOE_OFFLOAD_COMMIT=<git hash> OUT=/some/dir python benchmarks/bench_table2.py --call 1
    MOE_OFFLOAD_COMMIT=<git hash> OUT=/some/dir python benchmarks/bench_table2.py --call 2

Call 1: the CUDA tests of the bench (tests/test_bench_gpu.py, toy size: fails fast if anything is
        off), then 4-bit attention + 2-bit experts at 12 GiB: full / no-prefetch / no-cache, own and
        replayed routing, compute-only, and transformers + accelerate at the same budget.
Call 2: 4-bit attention + 3-bit experts at 12 GiB, the same ablation; then the full algorithm
        only (both routings, one repeat) for 4/2, 4/3, 4/4 at 16 and 8 GiB, 4/4 at 12 GiB; then
        bf16 experts at 16 GiB (64 new tokens: a bf16 token moves ~22 GB without hits).

Every `moe-offload bench` run writes its report to $OUT/<name>.json after each measurement and
its progress to $OUT/bench.log (call 1 also $OUT/gpu-tests.log; at most 6 files per call); runs
get --time-limit from what is left of CALL_SECONDS, so the call ends in time and whatever was measured lands. The last line printed is one JSON object:
{"call": N, "runs": {name: {"returncode", "report"}}, "table": [...]}. Plot afterwards with
`moe-offload bench plot --results $OUT/<name>.json --out benchmarks/results/<name>.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CALL_SECONDS = 520          # leaves ~20 s of the 9-minute call for start-up and copying $OUT back
ENTRY_SECONDS = 75          # the longest single entry we expect (decode + prefill of one mode)

ABLATION = ["--synthetic", "mixtral-8x7b", "--budget", "12GiB", "--routing", "own,replay",
            "--modes", "full,no-prefetch,no-cache", "--repeats", "2", "--prefill-repeats", "2", "--profile", "16"]
RUNS = {
    1: [("table2-4-2-12gib", ["--quant", "4/2", *ABLATION, "--accelerate"])],
    2: [("table2-4-3-12gib", ["--quant", "4/3", *ABLATION]),
        ("full-algorithm-budgets", ["--synthetic", "mixtral-8x7b", "--quant", "4/2,4/3,4/4", "--budget", "16GiB,8GiB",
                                    "--routing", "replay,own", "--modes", "full", "--repeats", "1",
                                    "--prefill-repeats", "1", "--no-compute-only"]),
        ("full-algorithm-4-4-12gib", ["--synthetic", "mixtral-8x7b", "--quant", "4/4", "--budget", "12GiB",
                                      "--routing", "replay,own", "--modes", "full", "--repeats", "1",
                                      "--prefill-repeats", "1", "--no-compute-only"]),
        ("full-algorithm-bf16-16gib", ["--synthetic", "mixtral-8x7b", "--quant", "bf16", "--budget", "16GiB",
                                       "--routing", "replay,own", "--modes", "full", "--repeats", "1",
                                       "--new-tokens", "64", "--warmup-tokens", "8", "--prefill-repeats", "1",
                                       "--no-compute-only"])],
}

DRY_RUN = ["--prompt-tokens", "8", "--new-tokens", "4", "--warmup-tokens", "2", "--repeats", "1",
           "--prefill-tokens", "64", "--prefill-repeats", "1"]


def run(name: str, args: list[str], out: Path, deadline: float, env: dict) -> dict:
    left = deadline - time.monotonic()
    if left < ENTRY_SECONDS:
        return {"returncode": None, "skipped": f"{left:.0f} s left"}
    command = [sys.executable, "-m", "moe_offload.cli", "bench", *args, "--out", str(out / f"{name}.json"),
               "--time-limit", str(int(left - ENTRY_SECONDS))]
    print(f"== {name}: {' '.join(command[2:])}", file=sys.stderr, flush=True)
    with open(out / "bench.log", "a") as log:
        log.write(f"== {name}: {' '.join(command[2:])}\n")
        log.flush()
        try:
            proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=log, env=env, timeout=left - 5, cwd=REPO)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    report_path = out / f"{name}.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    print((out / "bench.log").read_text()[-3000:], file=sys.stderr)
    return {"returncode": code, "report": report}


def table(runs: dict) -> list[dict]:
    rows = []
    for name, result in runs.items():
        for e in (result.get("report") or {}).get("results", []):
            rows.append({"run": name, "quant": e.get("quant", "bf16" if e.get("mode") == "accelerate" else None),
                         "budget": e.get("budget"), "routing": (e.get("routing") or "").split(" ")[0], "mode": e.get("mode"),
                         "status": e.get("status"), "decode_tps": e.get("decode_tokens_per_s"),
                         "hit_rate": e.get("hit_rate"), "recall": e.get("prefetch_recall"),
                         "link_busy": e.get("link_busy"), "prefill_tps": e.get("prefill_tokens_per_s"),
                         "peak_gib": e.get("peak_gpu_gib")})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--call", type=int, choices=sorted(RUNS), required=True)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results/raw")))
    parser.add_argument("--seconds", type=float, default=CALL_SECONDS, help="time for the whole call")
    parser.add_argument("--skip-tests", action="store_true", help="call 1 without the CUDA tests first")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same runs on the toy preset with a few tokens, on this machine's device (checks the plumbing)")
    args = parser.parse_args()
    started = time.monotonic()
    deadline = started + args.seconds
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    runs = {}
    if args.call == 1 and not args.skip_tests:
        with open(args.out / "gpu-tests.log", "w") as log:
            try:
                code = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-x", "tests/test_bench_gpu.py"],
                                      stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=150).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        runs["gpu-tests"] = {"returncode": code}
        print((args.out / "gpu-tests.log").read_text()[-2000:], file=sys.stderr)
    for name, bench_args in RUNS[args.call]:
        if args.dry_run:
            bench_args = [("tiny" if a == "mixtral-8x7b" else a) for a in bench_args] + DRY_RUN
        runs[name] = run(name, bench_args, args.out, deadline, env)
    rows = table(runs)
    print(f"{'run':28} {'quant':5} {'budget':6} {'routing':7} {'mode':12} {'status':12} {'tok/s':>7} {'hit':>5} "
          f"{'recall':>6} {'busy':>5} {'prefill':>8} {'peak GiB':>8}", file=sys.stderr)
    def fmt(value, spec):
        return format(value, spec) if isinstance(value, (int, float)) else "-".rjust(int(spec.split(".")[0]))

    for r in rows:
        print(f"{r['run'][:28]:28} {str(r['quant']):5} {str(r['budget']):6} {r['routing'][:7]:7} {str(r['mode'])[:12]:12} "
              f"{str(r['status'])[:12]:12} {fmt(r['decode_tps'], '7.2f')} {fmt(r['hit_rate'], '5.2f')} "
              f"{fmt(r['recall'], '6.2f')} {fmt(r['link_busy'], '5.2f')} {fmt(r['prefill_tps'], '8.0f')} "
              f"{fmt(r['peak_gib'], '8.2f')}", file=sys.stderr)
    summary = {"call": args.call, "seconds": round(time.monotonic() - started, 1),
               "runs": {name: {k: v for k, v in result.items() if k != "report"} for name, result in runs.items()},
               "table": rows}
    (args.out / f"call{args.call}-summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
