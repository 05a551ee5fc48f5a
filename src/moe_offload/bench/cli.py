"""`moe-offload bench`: the benchmark subcommands (the top-level cli.py only registers them).

    moe-offload bench --synthetic mixtral-8x7b --quant 4/2,4/3 --budget 12GiB --routing own,replay \\
        --modes full,no-prefetch,no-cache --accelerate --out results.json --plot results.png
    moe-offload bench --budget 6GiB,12GiB --routing replay --cpu-experts off,auto --cpu-moe-layers 0,10   # CPU experts
    moe-offload bench record-routing --model DIR --text FILE --tokens 3072 --out trace.safetensors
    moe-offload bench plot --results results.json --out results.png
    moe-offload bench table --results a.json b.json [--quant 4/2 --budget 12GiB]     # Markdown for docs/benchmarks.md

Progress goes to stderr; the last line on stdout is the report as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from ..errors import UserError

REPO = Path(__file__).resolve().parents[3]   # src/moe_offload/bench/cli.py -> the repository (an editable install)


def _defaults() -> dict:
    from .runner import BenchSettings
    return {f.name: f.default for f in fields(BenchSettings)}


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in _csv(text))
    except ValueError:
        raise UserError(f"--concurrency {text!r}: expected counts of sequences, e.g. 1,4,16") from None
    if any(n < 1 for n in counts):
        raise UserError(f"--concurrency {text!r}: every count must be at least 1")
    return counts


def _train_defaults() -> dict:
    from .train import TrainBenchSettings
    return {f.name: f.default for f in fields(TrainBenchSettings)}


def _cpu_experts(text: str) -> tuple[str, ...]:
    from ..offload.cpu_tier import CHOICES

    choices = _csv(text)
    if not choices or any(choice not in CHOICES for choice in choices):
        raise UserError(f"--cpu-experts {text!r}: use {' or '.join(CHOICES)}, comma-separated")
    return choices


def _layer_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in _csv(text))
    except ValueError:
        counts = ()
    if not counts or any(n < 0 for n in counts):
        raise UserError(f"--cpu-moe-layers {text!r}: expected counts of MoE layers, e.g. 0,8")
    return counts


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_bench_parser(sub) -> None:
    from .routing import RECORD_DEPTH, RECORD_RANKED, RECORD_WINDOW

    d, TRAIN = _defaults(), _train_defaults()
    bench = sub.add_parser("bench", help="benchmark decode/prefill speed under a memory budget (last stdout line: JSON)",
                           description="Benchmark an offloaded model: every quantization x budget x routing x mode, "
                                       "side by side; optionally transformers + accelerate at the same budget.")
    source = bench.add_mutually_exclusive_group()
    source.add_argument("--synthetic", default=d["synthetic"],
                        help="preset of random weights made in the target format on the device: mixtral-8x7b or tiny "
                             "(default: %(default)s)")
    source.add_argument("--model", type=Path, default=None, help="a Hugging Face or quantized model folder instead")
    bench.add_argument("--quant", default=",".join(d["quants"]),
                       help="comma-separated ATTENTION/EXPERT bits (4/2, 4/3, 4/4) or bf16 (default: %(default)s)")
    bench.add_argument("--budget", default=",".join(d["budgets"]), help="comma-separated GPU memory budgets (default: %(default)s)")
    bench.add_argument("--routing", default=",".join(d["routings"]), help="comma-separated: own, replay (default: %(default)s)")
    bench.add_argument("--modes", default=",".join(d["modes"]),
                       help="comma-separated: full (LRU + prefetch), no-prefetch, no-cache (default: %(default)s)")
    bench.add_argument("--accelerate", action="store_true", help="also measure transformers + accelerate offloading (bf16)")
    bench.add_argument("--trace", type=Path, default=None,
                       help=f"routing trace for --routing replay (default: the repository's {d['trace']}, from any folder)")
    bench.add_argument("--prompt-tokens", type=int, default=d["prompt_tokens"], help="decode prompt length (default: %(default)s)")
    bench.add_argument("--new-tokens", type=int, default=d["new_tokens"], help="tokens decoded per repeat (default: %(default)s)")
    bench.add_argument("--warmup-tokens", type=int, default=d["warmup_tokens"], help="tokens of the warm-up run (default: %(default)s)")
    bench.add_argument("--repeats", type=int, default=d["repeats"], help="timed decode runs; the median is reported (default: %(default)s)")
    bench.add_argument("--prefill-tokens", type=int, default=d["prefill_tokens"], help="prefill prompt length (default: %(default)s)")
    bench.add_argument("--prefill-repeats", type=int, default=d["prefill_repeats"], help="timed prefills (default: %(default)s)")
    bench.add_argument("--cpu-memory", default=d["cpu_memory"],
                       help="host RAM for experts, e.g. 11GiB; the rest is memory-mapped from disk (default: all in RAM)")
    bench.add_argument("--concurrency", default="", metavar="N,N,...",
                       help="also decode N sequences at once (continuous batching, own routing), e.g. 1,4,16,32")
    bench.add_argument("--no-resident", dest="resident", action="store_false",
                       help="skip the row with every expert on the device (no offloading, no budget)")
    bench.add_argument("--no-compute-only", dest="compute_only", action="store_false",
                       help="skip the compute-only decode (every expert a hit) per budget")
    bench.add_argument("--profile", type=int, default=d["profile_tokens"], metavar="TOKENS",
                       help="profile this many decode tokens of each full and compute-only entry: compute, copies, "
                            "sync waits, host time, top operators (default: off)")
    bench.add_argument("--prefetch", type=int, default=d["prefetch_experts"], help="experts prefetched per layer ahead (default: top-k)")
    bench.add_argument("--prefetch-depth", type=int, default=d["prefetch_depth"], help="MoE layers ahead to predict (default: %(default)s)")
    bench.add_argument("--cpu-experts", default=",".join(d["cpu_experts"]),
                       help="comma-separated: off (copy every miss), auto (the CPU computes the decode misses the cost "
                            "model sends it); each mode runs with each (default: %(default)s)")
    bench.add_argument("--cpu-moe-layers", default=",".join(map(str, d["cpu_moe_layers"])), metavar="N,N,...",
                       help="comma-separated counts of MoE layers whose experts run on the CPU; each mode runs with "
                            "each (default: %(default)s)")
    bench.add_argument("--device", default=d["device"], help="cuda, cuda:N or cpu (default: %(default)s)")
    bench.add_argument("--time-limit", type=float, default=d["time_limit"],
                       help="seconds; entries not started by then are reported as skipped (default: none)")
    bench.add_argument("--out", type=Path, default=None, help="write the report JSON here too, after every measurement")
    bench.add_argument("--plot", type=Path, default=None, help="write a PNG of tokens/s per configuration (needs matplotlib)")
    train = bench.add_argument_group("training (--train)")
    train.add_argument("--train", action="store_true",
                       help="measure LoRA training steps instead (bench/train.py): the first --quant, each --budget")
    train.add_argument("--seq-len", type=int, default=TRAIN["seq_len"], help="tokens a training step (default: %(default)s)")
    train.add_argument("--lora-rank", type=int, default=TRAIN["lora"].rank, help="(default: %(default)s)")
    train.add_argument("--targets", default=",".join(TRAIN["lora"].targets), help="LoRA targets (default: %(default)s)")
    train.add_argument("--train-steps", type=int, default=TRAIN["steps"], help="timed steps after one warm-up (default: %(default)s)")
    bench.set_defaults(func=cmd_bench)

    tools = bench.add_subparsers(dest="bench_command")
    record = tools.add_parser("record-routing", help="record a trained model's routing on held-out text (trace for --routing replay)")
    record.add_argument("--model", type=Path, required=True, help="the trained model folder (e.g. reference-moe-32l)")
    record.add_argument("--text", type=Path, required=True, help="held-out text file")
    record.add_argument("--tokens", type=int, default=3072, help="tokens to record (default: %(default)s)")
    record.add_argument("--window", type=int, default=RECORD_WINDOW, help="teacher-forced window length (default: %(default)s)")
    record.add_argument("--depth", type=int, default=RECORD_DEPTH, help="layers ahead to record predictions for (default: %(default)s)")
    record.add_argument("--ranked", type=int, default=RECORD_RANKED, help="experts kept per prediction (default: %(default)s)")
    record.add_argument("--out", type=Path, required=True, help="trace file to write (.safetensors)")
    record.set_defaults(func=cmd_record_routing)

    plot = tools.add_parser("plot", help="PNG of a report's tokens/s per configuration against the transfer-bound ceiling")
    plot.add_argument("--results", type=Path, nargs="+", required=True,
                      help="report JSONs written by `moe-offload bench --out` (entries of several are drawn side by side)")
    plot.add_argument("--out", type=Path, required=True, help="PNG to write")
    plot.set_defaults(func=cmd_plot)

    table = tools.add_parser("table", help="Markdown: the paper's Table 2 beside ours (ratios to accelerate), and every entry")
    table.add_argument("--results", type=Path, nargs="+", required=True, help="report JSONs written by `moe-offload bench --out`")
    table.add_argument("--quant", default="4/2", help="configuration of the Table 2 comparison (default: %(default)s)")
    table.add_argument("--budget", default="12GiB", help="budget of the Table 2 comparison (default: %(default)s)")
    table.set_defaults(func=cmd_table)


def cmd_bench(args) -> None:
    from .runner import BenchSettings, run_benchmarks

    if args.train:
        return cmd_bench_train(args)

    for flag in ("prompt_tokens", "new_tokens", "repeats", "prefill_tokens", "prefill_repeats"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.plot is not None:
        from .plot import require_matplotlib
        require_matplotlib()
    settings = BenchSettings(
        synthetic=None if args.model else args.synthetic, model=args.model, quants=_csv(args.quant),
        budgets=_csv(args.budget), routings=_csv(args.routing), modes=_csv(args.modes), accelerate=args.accelerate,
        trace=args.trace or REPO / _defaults()["trace"], prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
        warmup_tokens=args.warmup_tokens,
        repeats=args.repeats, prefill_tokens=args.prefill_tokens, prefill_repeats=args.prefill_repeats,
        cpu_memory=args.cpu_memory, resident=args.resident, concurrency=_counts(args.concurrency), compute_only=args.compute_only, profile_tokens=args.profile, prefetch_experts=args.prefetch, prefetch_depth=args.prefetch_depth,
        cpu_experts=_cpu_experts(args.cpu_experts), cpu_moe_layers=_layer_counts(args.cpu_moe_layers),
        device=args.device, time_limit=args.time_limit, out=args.out)
    report = run_benchmarks(settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    if args.plot is not None:
        from .plot import plot_report
        plot_report(report, args.plot)
    print(json.dumps(report))


def cmd_bench_train(args) -> None:
    from ..config import LoraConfig
    from .train import TrainBenchSettings, run_training_bench

    if args.seq_len < 1 or args.train_steps < 1:
        raise UserError("--seq-len and --train-steps must be at least 1")
    lora = LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank, targets=_csv(args.targets))
    settings = TrainBenchSettings(synthetic=args.synthetic, quant=_csv(args.quant)[0], budgets=_csv(args.budget),
                                  seq_len=args.seq_len, lora=lora, steps=args.train_steps, device=args.device)
    print(json.dumps(run_training_bench(settings, log=lambda line: print(line, file=sys.stderr, flush=True))))


def cmd_record_routing(args) -> None:
    from .routing import record_routing

    trace = record_routing(args.model, args.text, args.tokens, window=args.window, depth=args.depth, ranked=args.ranked)
    trace.save(args.out)
    print(json.dumps({"trace": str(args.out), "tokens": trace.num_tokens, "layers": trace.num_layers,
                      "top_k": trace.top_k, **trace.metadata}))


def read_report(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--results {path}: cannot read a report ({e})") from None


def cmd_plot(args) -> None:
    from .plot import plot_report

    reports = [read_report(path) for path in args.results]
    merged = {**reports[0], "results": [e for report in reports for e in report.get("results", [])]}
    plot_report(merged, args.out)
    print(json.dumps({"plot": str(args.out)}))


def cmd_table(args) -> None:
    from .report import entries_markdown, table2_markdown

    reports = [read_report(path) for path in args.results]
    print(table2_markdown(reports, args.quant, args.budget))
    print()
    print(entries_markdown(reports))
