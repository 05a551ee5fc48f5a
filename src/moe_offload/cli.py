"""The `moe-offload` command: thin subcommands over Engine.

    moe-offload generate --prompt "def fib(n):"          # the shipped model, on cuda if present
    moe-offload generate --model DIR --prompt TEXT --max-tokens 64 --temperature 0.7 --seed 1
    echo "def f(x):" | moe-offload generate --prompt-file -     # the prompt from a file, - for stdin
    moe-offload chat --model DIR
    moe-offload serve --model DIR --port 8000 --api-key KEY   # OpenAI-compatible HTTP API

Defaults come from the dataclasses in config.py. Bad input prints one line `error: ...` and exits 1.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
from dataclasses import fields, replace
from pathlib import Path

from tqdm import tqdm

from .config import (PAPER_BITS, QUANT_BITS, QUANT_GROUP_SIZES, FinetuneConfig, LoraConfig, OffloadConfig, QuantConfig,
                     QuantSpec, RuntimeConfig, SamplingParams)
from .perplexity import METHOD as PERPLEXITY_METHOD, WINDOW as PERPLEXITY_WINDOW
from .bench.cli import add_bench_parser
from .engine import Engine
from .errors import UserError
from .offload.cpu_tier import CHOICES as CPU_EXPERTS
from .offload.planner import parse_size
from .quant.checkpoint import is_quantized
from .server.config import ServerConfig
from .tokenizer import check_utf8

RUNTIME = {f.name: f.default for f in fields(RuntimeConfig)}
SAMPLING = {f.name: f.default for f in fields(SamplingParams) if f.name != "stop"}
OFFLOAD = {f.name: f.default for f in fields(OffloadConfig)}
SERVER = {f.name: f.default for f in fields(ServerConfig)}
QUANT_SPEC = {f.name: f.default for f in fields(QuantSpec)}
LORA = {f.name: f.default for f in fields(LoraConfig)}
FINETUNE = {f.name: f.default for f in fields(FinetuneConfig)}


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=RUNTIME["model"],
                   help="Hugging Face model folder (config.json, *.safetensors, tokenizer.json); default: the shipped small model")
    p.add_argument("--device", default=RUNTIME["device"], help="cpu, cuda or cuda:N (default: %(default)s: cuda when available)")
    p.add_argument("--dtype", default=RUNTIME["dtype"], help="float32, bfloat16 or float16 (default: %(default)s: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--max-context", type=int, default=RUNTIME["max_context"], help="KV cache length in tokens (default: %(default)s)")
    p.add_argument("--quant", default=None, metavar="A/E",
                   help="quantize a Hugging Face folder on load with HQQ: attention (and dense layers) at A bits, experts "
                        "at E, the paper's group sizes, 8-bit scales and zeros, e.g. 4/2 (default: none; a folder written "
                        "by `moe-offload quantize` is already quantized)")


def add_lora_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", default=RUNTIME["lora"], metavar="ADAPTER_DIR",
                   help="apply a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors, e.g. from "
                        "`moe-offload finetune`): added into unquantized weights, on the fly for quantized ones")


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
    g.add_argument("--prefetch-depth", type=int, default=None,
                   help=f"MoE layers ahead to predict (default: {OFFLOAD['prefetch_depth']})")
    g.add_argument("--offload-dir", default=OFFLOAD["offload_dir"],
                   help="folder for experts that do not fit in --cpu-memory (default: the system temp folder)")
    g.add_argument("--cpu-moe-layers", type=int, default=None, metavar="N",
                   help="keep the experts of the first N MoE layers in host RAM and compute them on the CPU, as "
                        "llama.cpp's --n-cpu-moe; implies --offload (default: 0)")
    g.add_argument("--cpu-experts", choices=CPU_EXPERTS, default=None,
                   help="auto: in decode, compute each missed expert on the CPU or copy it to the device, whichever a "
                        "cost model calibrated at start says finishes sooner (off on --device cpu); off: always copy "
                        f"(default: {OFFLOAD['cpu_experts']})")
    g.add_argument("--stats", action="store_true",
                   help="after each reply, print expert-cache statistics to stderr (with --offload)")


def offload_from(args) -> OffloadConfig:
    if args.cpu_moe_layers is not None and args.cpu_moe_layers < 0:
        raise UserError(f"--cpu-moe-layers {args.cpu_moe_layers}: use 0 or more (the MoE layers whose experts run on the CPU)")
    if not (args.offload or args.cpu_moe_layers):
        given = [flag for flag, value in (("--gpu-memory", args.gpu_memory), ("--cpu-memory", args.cpu_memory),
                                          ("--slots", args.slots), ("--prefetch", args.prefetch),
                                          ("--prefetch-depth", args.prefetch_depth), ("--offload-dir", args.offload_dir),
                                          ("--cpu-experts", args.cpu_experts))
                 if value is not None]
        if given:
            raise UserError(f"{given[0]} only applies to offloaded experts; add --offload")
        return OffloadConfig()
    return OffloadConfig(
        enabled=True,
        gpu_memory=None if args.gpu_memory is None else parse_size(args.gpu_memory, "--gpu-memory"),
        cpu_memory=None if args.cpu_memory is None else parse_size(args.cpu_memory, "--cpu-memory"),
        slots_per_layer=args.slots, prefetch_experts=args.prefetch,
        prefetch_depth=OFFLOAD["prefetch_depth"] if args.prefetch_depth is None else args.prefetch_depth,
        offload_dir=args.offload_dir, measure_time=args.stats,
        cpu_moe_layers=args.cpu_moe_layers or OFFLOAD["cpu_moe_layers"],
        cpu_experts=args.cpu_experts or OFFLOAD["cpu_experts"])


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
    if stats["cpu_uses"]:
        line += (f"; CPU ran {stats['cpu_uses']} expert uses at {stats['cpu_gbps']:.1f} GB/s, busy "
                 f"{stats['cpu_seconds']:.2f} s ({busy_share(stats['cpu_seconds'], seconds):.0%}), link busy "
                 f"{stats['copy_seconds']:.2f} s ({busy_share(stats['copy_seconds'], seconds):.0%})")
    return line


def busy_share(busy: float, seconds: float) -> float:
    return busy / seconds if seconds > 0 else 0.0


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=SAMPLING["max_new_tokens"], help="new tokens at most (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=SAMPLING["temperature"], help="0 is greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=SAMPLING["top_k"], help="0 keeps all (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=SAMPLING["top_p"], help="nucleus sampling mass (default: %(default)s)")
    p.add_argument("--min-p", type=float, default=SAMPLING["min_p"],
                   help="drop tokens less likely than this times the likeliest one; 0 keeps all (default: %(default)s)")
    p.add_argument("--repetition-penalty", type=float, default=SAMPLING["repetition_penalty"],
                   help="divide the logits of prompt and output tokens by this (multiply when negative), as "
                        "transformers; 1 is off (default: %(default)s)")
    p.add_argument("--presence-penalty", type=float, default=SAMPLING["presence_penalty"],
                   help="subtract this from the logit of every token already generated, -2 to 2 (default: %(default)s)")
    p.add_argument("--frequency-penalty", type=float, default=SAMPLING["frequency_penalty"],
                   help="subtract this once per time a token was generated, -2 to 2 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=SAMPLING["seed"], help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", default=[], help="stop string; may be repeated")


def runtime_from(args) -> RuntimeConfig:
    if args.quant and is_quantized(args.model):
        raise UserError(f"--quant {args.quant}: {args.model} is already quantized (by `moe-offload quantize`); "
                        f"drop --quant")
    quant = QuantConfig.parse(args.quant) if args.quant else None
    return RuntimeConfig(model=args.model, device=args.device, dtype=args.dtype, max_context=args.max_context, quant=quant,
                         max_batch=getattr(args, "max_batch", RUNTIME["max_batch"]), lora=getattr(args, "lora", None))


def load_engine(args) -> Engine:
    """The Engine of generate, chat and serve: every runtime, offload and quantization flag flows through here."""
    return Engine.load(runtime_from(args), offload=offload_from(args))


def sampling_from(args, extra_stops: tuple[str, ...] = ()) -> SamplingParams:
    try:
        return SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                              presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                              seed=args.seed, stop=tuple(args.stop) + extra_stops)
    except ValueError as e:   # "<field> must be ...": name the flag instead
        field, rest = str(e).split(" ", 1)
        flag = "--max-tokens" if field == "max_new_tokens" else "--" + field.replace("_", "-")
        raise UserError(f"{flag} {rest}") from None


def read_prompt(args) -> str:
    """--prompt, or the UTF-8 text of --prompt-file ("-": standard input) less one final newline, as
    llama.cpp's -f reads a file."""
    if args.prompt is not None:
        check_utf8(args.prompt, "--prompt")
        return args.prompt
    name = "standard input" if args.prompt_file == "-" else args.prompt_file
    try:
        data = sys.stdin.buffer.read() if args.prompt_file == "-" else Path(args.prompt_file).read_bytes()
    except OSError as e:
        raise UserError(f"--prompt-file {name}: cannot read it ({e.strerror})") from None
    try:
        return data.decode("utf-8").removesuffix("\n")
    except UnicodeDecodeError as e:
        raise UserError(f"--prompt-file {name}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def cmd_generate(args) -> None:
    prompt = read_prompt(args)
    params = sampling_from(args)
    engine = load_engine(args)
    run = engine.stream(engine.tokenizer.encode(prompt), params)
    for piece in run:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(run.stats, file=sys.stderr)
    if args.stats:
        print(format_expert_stats(engine.expert_stats(), run.stats.time_to_first_token + run.stats.decode_seconds),
              file=sys.stderr)


def fit_conversation(tokenizer, messages: list[dict], limit: int) -> tuple[list[dict], int]:
    """`messages` less their oldest exchanges (a user turn and the reply to it), until the rendered
    conversation has at most `limit` tokens or only the system message (if any) and the newest turn
    are left; -> (the messages kept, how many were dropped)."""
    first = 1 if messages[0]["role"] == "system" else 0
    kept = list(messages)
    while len(kept) - first > 1 and len(tokenizer.encode_chat(kept)) > limit:
        del kept[first:first + 2]
    return kept, len(messages) - len(kept)


def cmd_chat(args) -> None:
    engine = load_engine(args)
    params = sampling_from(args, extra_stops=engine.tokenizer.chat_stop_strings)
    history = [{"role": "system", "content": args.system}] if args.system else []
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="surrogateescape")   # a line that is not UTF-8 is refused below, not fatal
    print("moe-offload chat: Ctrl-D or Ctrl-C to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if not line.strip():
            continue
        try:
            check_utf8(line, "that line")
            messages, dropped = fit_conversation(engine.tokenizer, history + [{"role": "user", "content": line}],
                                                 engine.max_context - params.max_new_tokens)
            run = engine.stream(engine.tokenizer.encode_chat(messages), params)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        if dropped:
            print(f"(dropped the {dropped} oldest messages: the conversation and --max-tokens {params.max_new_tokens} "
                  f"must fit the context of {engine.max_context} tokens)", file=sys.stderr)
        history = messages
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


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=SERVER["host"], help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=SERVER["port"], help="TCP port (default: %(default)s)")
    p.add_argument("--api-key", default=SERVER["api_key"],
                   help="require `Authorization: Bearer KEY` on every endpoint but /health (default: none)")
    p.add_argument("--max-batch", type=int, default=SERVER["max_batch"],
                   help="sequences decoded together, each with its own KV cache of --max-context tokens; joining and "
                        "leaving between steps (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=SERVER["max_queue"],
                   help="requests allowed to wait for the model before new ones get 429 (default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=SERVER["max_body_bytes"],
                   help="larger request bodies get 413 (default: %(default)s)")
    p.add_argument("--body-timeout", type=float, default=SERVER["body_timeout"],
                   help="seconds a client has to send a whole request body, else 408 (default: %(default)s)")


def cmd_serve(args) -> None:
    from .server.app import bind, serve

    config = ServerConfig(host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
                          max_queue=args.max_queue, max_body_bytes=args.max_body_bytes, body_timeout=args.body_timeout)
    sock = bind(config)
    serve(load_engine(args), config, sock)


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=RUNTIME["model"], help="Hugging Face model folder to quantize (default: the shipped model)")
    p.add_argument("--out", required=True, help="new folder for the quantized checkpoint (must not exist)")
    p.add_argument("--device", default=RUNTIME["device"], help="where to run the quantizer (default: %(default)s)")
    bits_choices, group_choices = ", ".join(map(str, QUANT_BITS)), ", ".join(map(str, QUANT_GROUP_SIZES))
    for role, bits, what, default in (("attn", PAPER_BITS[0], "attention", "%(default)s"),
                                      ("expert", PAPER_BITS[1], "routed experts", "%(default)s"),
                                      ("shared", None, "dense MLP layers and shared experts", "as attention"),
                                      ("router", None, "routers", "16"), ("head", None, "lm_head", "16")):
        p.add_argument(f"--{role}-bits", type=int, default=bits,
                       help=f"bits for {what}: {bits_choices}, or 16 to keep them unquantized (default: {default})")
        p.add_argument(f"--{role}-group", type=int, default=QUANT_SPEC["group_size"],
                       help=f"group size for {what}: {group_choices} (default: the paper's for the bits)")
    p.add_argument("--no-quant-meta", action="store_true",
                   help="keep each group's scale and zero in fp16 instead of quantizing them to 8 bits")


def quant_from(args) -> QuantConfig:
    def spec(bits, group):
        return None if bits in (None, 16) else QuantSpec(bits, group, quant_meta=not args.no_quant_meta)

    attention = spec(args.attn_bits, args.attn_group)
    shared = attention if args.shared_bits is None else spec(args.shared_bits, args.shared_group)
    return QuantConfig(attention=attention, experts=spec(args.expert_bits, args.expert_group), shared=shared,
                       router=spec(args.router_bits, args.router_group), head=spec(args.head_bits, args.head_group))


def cmd_quantize(args) -> None:
    from .engine import resolve_device
    from .quant.checkpoint import describe, write_quantized

    quant = quant_from(args)
    size = write_quantized(args.model, args.out, quant, resolve_device(args.device),
                           progress_bar=lambda total: tqdm(total=total, desc="quantizing", unit="tensor", file=sys.stderr,
                                                                      disable=None))
    print(f"wrote {args.out}: {size / 2**20:.1f} MiB of weights ({describe(quant)})", file=sys.stderr)


def cmd_perplexity(args) -> None:
    from .perplexity import perplexity

    if not os.path.isfile(args.text):      # checked before the model loads
        raise UserError(f"--text {args.text}: no such file; pass a UTF-8 text file to measure on")
    try:
        text = open(args.text, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--text {args.text}: cannot read it as UTF-8 text ({e})") from None
    engine = Engine.load(runtime_from(args))
    token_ids = engine.tokenizer.encode(text)
    result = perplexity(engine, token_ids, args.window, args.max_windows, progress_bar=lambda total: tqdm(
        total=total, desc="perplexity", unit="window", file=sys.stderr, disable=None))
    print(f"perplexity {result.perplexity:.4f} over {result.windows} windows of {result.window} tokens "
          f"({result.predicted} predicted tokens of {len(token_ids)})")


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, type=Path,
                   help='JSON lines: {"text": ...} (loss on every token), {"prompt": ..., "completion": ...} (loss on '
                        'the completion), or with --chat {"messages": [...]}')
    p.add_argument("--chat", action="store_true",
                   help="render each line's messages with the model's chat template; loss on the assistant's turns")
    p.add_argument("--out", required=True, type=Path,
                   help="adapter folder (PEFT files, and a state to resume from: run the same command again)")
    p.add_argument("--lora-rank", type=int, default=LORA["rank"], help="rank of each adapter (default: %(default)s)")
    p.add_argument("--lora-alpha", type=float, default=LORA["alpha"], help="scale alpha / rank (default: %(default)s)")
    p.add_argument("--targets", default=",".join(LORA["targets"]),
                   help="comma-separated: attention, router, experts (each expert its own adapter) (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=FINETUNE["seq_len"], help="tokens a row (default: %(default)s)")
    p.add_argument("--batch-tokens", type=int, default=FINETUNE["batch_tokens"],
                   help="tokens a step, in rows of --seq-len (default: %(default)s)")
    p.add_argument("--micro-batch-tokens", type=int, default=FINETUNE["micro_batch_tokens"],
                   help="tokens a forward and backward, in rows of --seq-len: a step accumulates its gradients over "
                        "passes of this many, for less activation memory, the same result (default: the whole step)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=FINETUNE["steps"], help="optimizer steps (default: --epochs)")
    length.add_argument("--epochs", type=float, default=FINETUNE["epochs"], help="passes over the data (default: %(default)s)")
    p.add_argument("--lr", type=float, default=FINETUNE["lr"], help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=FINETUNE["weight_decay"], help="AdamW (default: %(default)s)")
    p.add_argument("--save-every", type=int, default=FINETUNE["save_every"],
                   help="steps between saved adapters and resumable states (default: %(default)s)")
    p.add_argument("--seed", type=int, default=FINETUNE["seed"], help="adapter init and data order (default: %(default)s)")


def cmd_finetune(args) -> None:
    from .tokenizer import Tokenizer
    from .train import finetune, read_examples, training_bytes

    lora = LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, targets=tuple(t.strip() for t in args.targets.split(",")))
    settings = FinetuneConfig(data=args.data, out=args.out, chat=args.chat, seq_len=args.seq_len,
                              batch_tokens=args.batch_tokens, micro_batch_tokens=args.micro_batch_tokens,
                              steps=args.steps, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                              save_every=args.save_every, seed=args.seed)
    runtime = replace(runtime_from(args), max_context=settings.seq_len)
    examples = read_examples(settings.data, Tokenizer.from_folder(runtime.model), settings.chat)
    engine = Engine.load(runtime, offload=offload_from(args),
                         extra_workspace=lambda config, dtype: training_bytes(config, lora, settings, dtype), training=True)
    summary = finetune(engine, lora, settings, examples)
    print(f"wrote {settings.out}: {summary['steps']} steps, last loss {summary['loss']:.4f}, "
          f"{summary['tokens_per_second']:.0f} tokens/s", file=sys.stderr)
    if args.stats:
        print(format_expert_stats(engine.expert_stats(), summary["seconds"]), file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-offload", description="Run Mixture-of-Experts language models on one GPU (or the CPU).")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete a prompt, streaming to stdout; stats on stderr")
    add_runtime_args(gen)
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text to complete")
    prompt.add_argument("--prompt-file", metavar="PATH",
                        help="complete the UTF-8 text of this file, - for standard input (one final newline is dropped)")
    add_lora_arg(gen)
    add_sampling_args(gen)
    add_offload_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat with the model's chat template and history")
    add_runtime_args(chat)
    chat.add_argument("--system", default=None, help="system message")
    add_lora_arg(chat)
    add_sampling_args(chat)
    add_offload_args(chat)
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /metrics)")
    add_runtime_args(serve)
    add_lora_arg(serve)
    add_offload_args(serve)
    add_server_args(serve)
    serve.set_defaults(func=cmd_serve)

    quantize = sub.add_parser("quantize", help="write an HQQ-quantized checkpoint (safetensors + quantization.json)",
                              description="Quantize a Hugging Face model folder with HQQ into a new folder that "
                                          "--model loads directly, memory-mapped. Defaults: the paper's 4-bit attention, "
                                          "2-bit experts, group sizes 64/16, 8-bit scales and zeros.")
    add_quantize_args(quantize)
    quantize.set_defaults(func=cmd_quantize)

    ppl = sub.add_parser("perplexity", help="perplexity of the model on a text file, over non-overlapping windows",
                         description=PERPLEXITY_METHOD, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_runtime_args(ppl)
    add_lora_arg(ppl)
    ppl.add_argument("--text", required=True, help="UTF-8 text file, e.g. WikiText2's wiki.test.raw")
    ppl.add_argument("--window", type=int, default=PERPLEXITY_WINDOW, help="tokens per window (default: %(default)s)")
    ppl.add_argument("--max-windows", type=int, default=0, help="only the first N windows (default: all)")
    ppl.set_defaults(func=cmd_perplexity)

    tune = sub.add_parser("finetune", help="train LoRA adapters on a JSON-lines file (experts may stay offloaded)",
                          description="LoRA fine-tuning: base weights frozen (as loaded: bf16 or HQQ), fp32 adapters, "
                                      "AdamW, each layer checkpointed; experts resident or streamed with --offload. "
                                      "Writes a PEFT adapter that --lora (and peft) loads. See docs/finetune.md.")
    add_runtime_args(tune)
    add_finetune_args(tune)
    add_offload_args(tune)
    tune.set_defaults(func=cmd_finetune)

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
    except BrokenPipeError:
        # The reader of stdout left (`moe-offload generate ... | head -1`): stop quietly, as Unix tools do,
        # with stdout on /dev/null so that the interpreter's last flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return 0


if __name__ == "__main__":
    sys.exit(main())
