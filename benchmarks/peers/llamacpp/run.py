"""llama.cpp's llama-bench on one GGUF at GPU memory budgets: the system our users would pick instead of us.

    python benchmarks/peers/llamacpp/run.py --bench /tmp/llamacpp-cuda/build/bin/llama-bench \\
        --model /tmp/llamacpp-mixtral-q2_k.gguf --budgets 12,8,16 --out $OUT [--threads 16] [--time-limit 300]

Needs gguf (gguf-py from PyPI) and numpy, and nvidia-smi for the GPU memory; not dependencies of moe-offload.

Placement is llama.cpp's own: `-ngl 99` puts every layer on the GPU and `--n-cpu-moe N` keeps the experts of
the first N layers in host RAM, computed there by the CPU (static: nothing moves per token; for prompts of
32 tokens or more llama.cpp copies those experts to the GPU for the batch unless `--no-op-offload`). In order:
1. every expert on the CPU (N = layers): its peak GPU memory is the base that all other placements add to;
2. each budget: the smallest N whose predicted peak (the base plus the GGUF's bytes of the experts of the
   layers on the GPU) fits, then measured; while the measured peak exceeds the budget, N grows by the layers
   whose experts make up the excess (at least 1), and again (--max-retries);
3. everything on the GPU (N = 0).
Each placement is one llama-bench process (prompts --prompts, --gen generated tokens, --threads, --reps
repetitions after llama-bench's warm-up; tokens are random ids), with nvidia-smi sampling the card's used
memory every 100 ms: the peak less the used memory before the process started (so it counts the CUDA context,
which torch's max_memory_allocated, our side's measure, does not). Without nvidia-smi (a CPU build) the
placements are chosen from the GGUF's sizes and --overhead, and the memory is reported as not measured.
Prints a table, then one JSON line last; writes the JSON and llama-bench's log to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import gguf

GIB, MIB = 2 ** 30, 2 ** 20
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


def parse_size(text: str) -> int:
    """'12', '12GiB', '900MiB' -> bytes (a bare number is GiB)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(GiB|MiB|G|M)?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 12GiB, 900MiB)")
    return int(float(match[1]) * (MIB if (match[2] or "G").startswith("M") else GIB))


def describe_model(path: str) -> dict:
    """Layers, experts, formats and the bytes that decide placement, read from the GGUF's tensor table."""
    reader = gguf.GGUFReader(path)
    field = reader.fields["llama.block_count"]
    layers = int(field.parts[field.data[0]][0])
    field = reader.fields["llama.expert_count"]
    experts = int(field.parts[field.data[0]][0])
    tensors = {t.name: t for t in reader.tensors}
    expert_bytes = [sum(int(tensors[f"blk.{i}.ffn_{m}_exps.weight"].n_bytes) for m in ("gate", "up", "down"))
                    for i in range(layers)]
    total = sum(int(t.n_bytes) for t in reader.tensors)

    def fmt(name: str) -> dict:
        qtype = tensors[name].tensor_type
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        return {"type": qtype.name, "bits_per_weight": round(8 * size / block, 4)}

    return {
        "path": path, "file_bytes": os.path.getsize(path), "tensor_bytes": total,
        "layers": layers, "experts": experts,
        "experts_format": fmt("blk.0.ffn_gate_exps.weight"), "attention_format": fmt("blk.0.attn_q.weight"),
        "output_format": fmt("output.weight"), "token_embd_format": fmt("token_embd.weight"),
        "bytes_per_expert": expert_bytes[0] // experts,         # w1, w2 and w3 of one expert
        "expert_bytes_per_layer": expert_bytes[0],
        "expert_bytes": sum(expert_bytes),
        # llama.cpp keeps the token embeddings in host RAM whatever -ngl says
        "non_expert_gpu_bytes": total - sum(expert_bytes) - int(tensors["token_embd.weight"].n_bytes),
    }


def nvidia_smi(*query: str, gpu: int = 0) -> list[str] | None:
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "-i", str(gpu), f"--query-gpu={','.join(query)}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True)
    return [part.strip() for part in out.stdout.strip().split(",")] if out.returncode == 0 else None


class MemorySampler:
    """The card's used memory (MiB) every 100 ms while a process runs: nvidia-smi's own loop, read on a thread."""

    def __init__(self, gpu: int):
        self.gpu, self.samples, self.proc = gpu, [], None

    def __enter__(self):
        before = nvidia_smi("memory.used", gpu=self.gpu)
        self.before = int(before[0]) if before else None
        if self.before is not None:
            self.proc = subprocess.Popen(["nvidia-smi", "-i", str(self.gpu), "--query-gpu=memory.used",
                                          "--format=csv,noheader,nounits", "-lms", "100"],
                                         stdout=subprocess.PIPE, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.samples.append(int(line))

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()
            self.proc.wait()
            self.thread.join(timeout=2)

    def peak_bytes(self) -> int | None:
        """Peak used memory less the used memory before the process started; None without nvidia-smi."""
        if self.before is None or not self.samples:
            return None
        return (max(self.samples) - self.before) * MIB


def run_bench(args, model: dict, n_cpu_moe: int, log, timeout: float | None) -> dict:
    """One llama-bench process at one placement: its speeds per test (those it finished within `timeout`
    seconds) and the GPU memory it took."""
    cmd = [args.bench, "-m", model["path"], "-p", ",".join(map(str, args.prompts)), "-n", str(args.gen),
           "-t", str(args.threads), "-r", str(args.reps), "-ngl", "99", "--n-cpu-moe", str(n_cpu_moe), "-o", "jsonl"]
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    start = time.perf_counter()
    with MemorySampler(args.gpu) as sampler:
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, timeout=timeout)
            stdout, returncode = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as expired:
            stdout, returncode = expired.stdout or "", "timeout"
            stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
    seconds = time.perf_counter() - start
    log.write(stdout)
    tests = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    row = {"n_cpu_moe": n_cpu_moe, "returncode": returncode, "seconds": round(seconds, 1),
           "gpu_peak_bytes": sampler.peak_bytes(), "command": " ".join(cmd), "tests": {}}
    for test in tests:
        name = f"pp{test['n_prompt']}" if test["n_prompt"] else f"tg{test['n_gen']}"
        row["tests"][name] = {"tokens_per_s": round(test["avg_ts"], 2), "stddev": round(test["stddev_ts"], 2),
                              "samples": test["samples_ts"]}
    if tests:
        row["llama_bench"] = {k: tests[0].get(k) for k in ("build_commit", "cpu_info", "gpu_info", "backends",
                                                          "model_type", "model_size", "n_threads", "n_batch",
                                                          "n_ubatch", "flash_attn", "type_k", "type_v", "repack")}
    return row


def choose_n_cpu_moe(budget: int, base: int, model: dict) -> int | None:
    """The fewest layers whose experts stay on the CPU for a predicted peak within the budget; None: none fits."""
    layers, per_layer = model["layers"], model["expert_bytes_per_layer"]
    for n in range(layers + 1):
        if base + (layers - n) * per_layer <= budget:
            return n
    return None


def host_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        mem = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        mem = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem}


def git_commit() -> str:
    if os.environ.get("MOE_OFFLOAD_COMMIT"):
        return os.environ["MOE_OFFLOAD_COMMIT"]
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def fmt_size(n: int | None) -> str:
    return "" if n is None else f"{n / GIB:.2f} GiB" if n >= GIB / 4 else f"{n / MIB:.1f} MiB"


def table(report: dict) -> str:
    tests = [f"pp{p}" for p in report["settings"]["prompts"]] + [f"tg{report['settings']['gen']}"]
    lines = ["| placement | --n-cpu-moe | GPU peak | predicted | budget | fits | " + " | ".join(f"{t} tok/s" for t in tests) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(tests)]
    for row in report["rows"]:
        fits = {True: "yes", False: "NO", None: "not measured"}[row.get("fits")] if row.get("budget_bytes") else ""
        speeds = [str(row["tests"].get(t, {}).get("tokens_per_s", "")) for t in tests]
        lines.append(f"| {row['placement']} | {row['n_cpu_moe']} | {fmt_size(row['gpu_peak_bytes'])} | "
                     f"{fmt_size(row.get('predicted_gpu_bytes'))} | {fmt_size(row.get('budget_bytes'))} | {fits} | "
                     + " | ".join(speeds) + " |")
    lines += [f"skipped: {skip['placement']}: {skip['why']}" for skip in report["skipped"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", required=True, help="the llama-bench binary (build.sh prints its path)")
    parser.add_argument("--model", required=True, help="a GGUF written by write_gguf.py")
    parser.add_argument("--budgets", default="12,8,16", help="GPU memory budgets, in order (GiB, or 900MiB ...)")
    parser.add_argument("--prompts", default="512,2048", help="prompt lengths (llama-bench -p)")
    parser.add_argument("--gen", type=int, default=128, help="generated tokens (llama-bench -n)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--reps", type=int, default=2, help="repetitions of each test (llama-bench -r)")
    parser.add_argument("--gpu", type=int, default=0, help="nvidia-smi's index of the card llama.cpp uses")
    parser.add_argument("--overhead", type=parse_size, default=parse_size("1GiB"),
                        help="without nvidia-smi: the GPU memory assumed beside the weights (KV cache, buffers, context)")
    parser.add_argument("--max-retries", type=int, default=2, help="re-runs with a larger N when a budget's peak overflows")
    parser.add_argument("--time-limit", type=float, default=0, help="seconds; skip a placement that would end past it (0: none)")
    parser.add_argument("--out", required=True, help="folder for llamacpp_<experts>.json and its log")
    args = parser.parse_args()
    args.prompts = [int(p) for p in args.prompts.split(",")]
    budgets = [parse_size(b) for b in args.budgets.split(",") if b]
    start = time.perf_counter()

    model = describe_model(args.model)
    card = nvidia_smi("name", "memory.total", "driver_version", gpu=args.gpu)
    llama_dir = Path(args.bench).resolve().parents[2] / "llama.cpp"
    read = lambda name: (llama_dir / name).read_text().strip() if (llama_dir / name).exists() else None
    tag = model["experts_format"]["type"].lower()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "system": "llama.cpp llama-bench", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "llama_cpp_commit": read("LLAMA_COMMIT"), "llama_cpp_source": read("LLAMA_SOURCE"),
        "moe_offload_commit": git_commit(),
        "card": dict(zip(("name", "memory_mib", "driver"), card)) if card else None,
        "host": host_info(), "model": model,
        "settings": {"prompts": args.prompts, "gen": args.gen, "threads": args.threads, "reps": args.reps,
                     "budgets_bytes": budgets, "gpu_memory": "nvidia-smi peak less idle" if card else "not measured (no nvidia-smi)"},
        "rows": [], "skipped": [],
    }
    if not card:
        report["note"] = "no GPU: a CPU test of the pipeline, not a measurement of llama.cpp on a GPU"
    durations: list[float] = []

    with open(out / f"llamacpp_{tag}.log", "w") as log:
        def measure(placement: str, n: int, budget: int | None = None, predicted: int | None = None) -> dict | None:
            elapsed = time.perf_counter() - start
            if args.time_limit and elapsed + max(durations, default=0) > args.time_limit:
                report["skipped"].append({"placement": placement, "n_cpu_moe": n, "why": "time limit"})
                print(f"skipped {placement} (--n-cpu-moe {n}): time limit", flush=True)
                return None
            row = run_bench(args, model, n, log, args.time_limit - elapsed if args.time_limit else None)
            durations.append(row["seconds"])
            row.update(placement=placement, budget_bytes=budget, predicted_gpu_bytes=predicted)
            if budget is not None and row["gpu_peak_bytes"] is not None:
                row["fits"] = row["gpu_peak_bytes"] <= budget
            report["rows"].append(row)
            tests = ", ".join(f"{k} {v['tokens_per_s']}" for k, v in row["tests"].items())
            print(f"{placement}: --n-cpu-moe {n}, GPU peak {fmt_size(row['gpu_peak_bytes']) or 'not measured'}, {tests} tok/s "
                  f"({row['seconds']} s{'' if row['returncode'] == 0 else ', exit ' + str(row['returncode'])})", flush=True)
            (out / f"llamacpp_{tag}.json").write_text(json.dumps(report, indent=1))
            return row

        layers = model["layers"]
        base_row = measure("all experts on CPU", layers)
        base = base_row["gpu_peak_bytes"] if base_row and base_row["gpu_peak_bytes"] is not None else None
        if base is None:
            base = model["non_expert_gpu_bytes"] + args.overhead
            report["settings"]["base_bytes"] = {"predicted": base}
        else:
            report["settings"]["base_bytes"] = {"measured": base}
        for budget in budgets:
            n = choose_n_cpu_moe(budget, base, model)
            name = f"budget {budget // GIB} GiB" if budget % GIB == 0 else f"budget {budget / MIB:g} MiB"
            if n is None:
                report["skipped"].append({"placement": name, "why": f"every expert on the CPU already takes {fmt_size(base)}"})
                print(f"skipped {name}: every expert on the CPU already takes {fmt_size(base)}", flush=True)
                continue
            for _ in range(args.max_retries + 1):
                row = measure(name, n, budget, base + (layers - n) * model["expert_bytes_per_layer"])
                if row is None or row.get("fits") is not False or n == layers:
                    break
                over = row["gpu_peak_bytes"] - budget          # move that many bytes of experts back to the CPU
                n = min(layers, n + max(1, -(-over // model["expert_bytes_per_layer"])))
        measure("all on GPU", 0, predicted=base + layers * model["expert_bytes_per_layer"])

    report["seconds"] = round(time.perf_counter() - start, 1)
    (out / f"llamacpp_{tag}.json").write_text(json.dumps(report, indent=1))
    card_text = report["card"]["name"] if report["card"] else "no GPU (CPU build: a pipeline check)"
    print(f"\nllama.cpp {(report['llama_cpp_commit'] or '?')[:12]}, {card_text}, {report['host']['cpu']} "
          f"({args.threads} threads), experts {model['experts_format']['type']} "
          f"({model['experts_format']['bits_per_weight']} bits/weight, {model['bytes_per_expert'] / MIB:.1f} MiB/expert), "
          f"attention {model['attention_format']['type']}")
    print(table(report))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
