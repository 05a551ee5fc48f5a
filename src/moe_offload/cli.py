"""The `moe-offload` command: thin subcommands over Engine.

    moe-offload generate --prompt "def fib(n):"          # the shipped model, on cuda if present
    moe-offload generate --model DIR --prompt TEXT --max-tokens 64 --temperature 0.7 --seed 1
    moe-offload chat --model DIR

Defaults come from the dataclasses in config.py. Bad input prints one line `error: ...` and exits 1.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from .config import OffloadConfig, RuntimeConfig, SamplingParams
from .bench.cli import add_bench_parser
from .engine import Engine
from .errors import UserError
from .offload.planner import parse_size

RUNTIME = {f.name: f.default for f in fields(RuntimeConfig)}
SAMPLING = {f.name: f.default for f in fields(SamplingParams) if f.name != "stop"}
OFFLOAD = {f.name: f.default for f in fields(OffloadConfig)}


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=RUNTIME["model"],
                   help="Hugging Face model folder (config.json, *.safetensors, tokenizer.json); default: the shipped small model")
    p.add_argument("--device", default=RUNTIME["device"], help="cpu, cuda or cuda:N (default: %(default)s: cuda when available)")
    p.add_argument("--dtype", default=RUNTIME["dtype"], help="float32, bfloat16 or float16 (default: %(default)s: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--max-context", type=int, default=RUNTIME["max_context"], help="KV cache length in tokens (default: %(default)s)")


def add_offload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("expert offloading")
    g.add_argument("--offload", action="store_true",
                   help="keep experts in host RAM and stream them through an LRU cache of expert slots on the device")
    g.add_argument("--gpu-memory", default=OFFLOAD["gpu_memory"],
                   help="everything on the device must fit in this, e.g. 12GiB (default: the device's free memory)")
    g.add_argument("--cpu-memory", default=OFFLOAD["cpu_memory"],
                   help="host RAM for experts, e.g. 11GiB; the rest is memory-mapped from disk (default: all in RAM)")
    g.add_argument("--slots", type=int, default=OFFLOAD["slots_per_layer"],
                   help="expert slots per MoE layer (default: as many as --gpu-memory holds)")
    g.add_argument("--prefetch", type=int, default=OFFLOAD["prefetch_experts"],
                   help="experts to predict and prefetch per layer ahead, 0 for none (default: the model's top-k)")
    g.add_argument("--prefetch-depth", type=int, default=OFFLOAD["prefetch_depth"],
                   help="MoE layers ahead to predict (default: %(default)s)")
    g.add_argument("--offload-dir", default=OFFLOAD["offload_dir"],
                   help="folder for experts that do not fit in --cpu-memory (default: the system temp folder)")
    g.add_argument("--stats", action="store_true",
                   help="after each reply, print expert-cache statistics to stderr (with --offload)")


def offload_from(args) -> OffloadConfig:
    if not args.offload:
        given = [flag for flag, value in (("--gpu-memory", args.gpu_memory), ("--cpu-memory", args.cpu_memory),
                                          ("--slots", args.slots), ("--offload-dir", args.offload_dir)) if value is not None]
        if given:
            raise UserError(f"{given[0]} only applies to offloaded experts; add --offload")
        return OffloadConfig()
    return OffloadConfig(
        enabled=True,
        gpu_memory=None if args.gpu_memory is None else parse_size(args.gpu_memory, "--gpu-memory"),
        cpu_memory=None if args.cpu_memory is None else parse_size(args.cpu_memory, "--cpu-memory"),
        slots_per_layer=args.slots, prefetch_experts=args.prefetch, prefetch_depth=args.prefetch_depth,
        offload_dir=args.offload_dir, measure_time=args.stats)


def format_expert_stats(stats: dict[str, float], seconds: float) -> str:
    """One line: hit rate, prefetch quality, bytes moved, link speed while copying, waiting vs the run's time."""
    if not stats:
        return "experts: all resident (no offloading)"
    line = (f"experts: hit rate {stats['hit_rate']:.3f} ({stats['hits']}/{stats['requests']}), "
            f"{stats['loads']} loads ({stats['prefetch_loads']} prefetched, {stats['prefetch_used']} of them used), "
            f"{stats['bytes_loaded'] / 1e9:.2f} GB moved")
    if "prefetch_recall" in stats:
        line += f", prefetch recall {stats['prefetch_recall']:.3f} precision {stats['prefetch_precision']:.3f}"
    line += (f", {stats['h2d_gbps']:.1f} GB/s while copying, waiting for copies {stats['wait_seconds']:.2f} s "
             f"of {seconds:.2f} s")
    return line


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=SAMPLING["max_new_tokens"], help="new tokens at most (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=SAMPLING["temperature"], help="0 is greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=SAMPLING["top_k"], help="0 keeps all (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=SAMPLING["top_p"], help="nucleus sampling mass (default: %(default)s)")
    p.add_argument("--seed", type=int, default=SAMPLING["seed"], help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", default=[], help="stop string; may be repeated")


def runtime_from(args) -> RuntimeConfig:
    return RuntimeConfig(model=args.model, device=args.device, dtype=args.dtype, max_context=args.max_context)


def sampling_from(args, extra_stops: tuple[str, ...] = ()) -> SamplingParams:
    try:
        return SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, stop=tuple(args.stop) + extra_stops)
    except ValueError as e:
        raise UserError(str(e).replace("max_new_tokens", "--max-tokens")) from None


def cmd_generate(args) -> None:
    engine = Engine.load(runtime_from(args), offload=offload_from(args))
    params = sampling_from(args)
    run = engine.stream(engine.tokenizer.encode(args.prompt), params)
    for piece in run:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(run.stats, file=sys.stderr)
    if args.stats:
        print(format_expert_stats(engine.expert_stats(), run.stats.time_to_first_token + run.stats.decode_seconds),
              file=sys.stderr)


def cmd_chat(args) -> None:
    engine = Engine.load(runtime_from(args), offload=offload_from(args))
    params = sampling_from(args, extra_stops=engine.tokenizer.chat_stop_strings)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("moe-offload chat: Ctrl-D or Ctrl-C to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            run = engine.stream(engine.tokenizer.encode_chat(history), params)
        except UserError as e:
            history.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        reply = []
        for piece in run:
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply).strip()})
        if args.stats:
            print(format_expert_stats(engine.expert_stats(), run.stats.time_to_first_token + run.stats.decode_seconds),
                  file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-offload", description="Run Mixture-of-Experts language models on one GPU (or the CPU).")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete a prompt, streaming to stdout; stats on stderr")
    add_runtime_args(gen)
    gen.add_argument("--prompt", required=True, help="text to complete")
    add_sampling_args(gen)
    add_offload_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat with the model's chat template and history")
    add_runtime_args(chat)
    chat.add_argument("--system", default=None, help="system message")
    add_sampling_args(chat)
    add_offload_args(chat)
    chat.set_defaults(func=cmd_chat)

    add_bench_parser(sub)    # bench/cli.py: bench, bench record-routing, bench plot
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
