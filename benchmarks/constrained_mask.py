"""Per-token cost of constrained decoding: the allowed-token mask of a JSON schema, per library and vocabulary.

    python benchmarks/constrained_mask.py --bpe 32000 --bpe 151936 --out RESULT.json     # trains the tokenizers
    python benchmarks/constrained_mask.py --tokenizer DIR/tokenizer.json --device cuda      # or uses given ones

No hub downloads: `--bpe V` trains a byte-level BPE tokenizer of V tokens (Mixtral's 32000, Qwen's
151936) on the Python sources of the installed packages (the first 150 MB of site-packages' .py
files), a stand-in for a real model's vocabulary of that size.
For each tokenizer and library (llguidance, xgrammar), compiles one JSON schema
(nested objects, enums, arrays, numbers, free strings), then walks a document that satisfies it,
token by token as the tokenizer splits it: each step computes the mask of allowed tokens into a
bitmask (timed) and consumes the token. Times are medians over the document's tokens, after one
warm-up walk, on this machine's CPU, one thread of the library per call. Then, per vocabulary, the
greedy pick under a mask as the engine makes it (pick_costs): on the host (sample(): the logits row
read back from `--device`, masked, argmax) and on the device (masked_greedy: the bitmask uploaded,
unpacked, masked argmax). Prints one JSON line per (tokenizer, library) and all of them last.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from moe_offload.config import SamplingParams
from moe_offload.constrain import bitmask_words, unpack_bitmask
from moe_offload.generate import masked_greedy, sample

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "kind": {"enum": ["function", "class", "module"]},
        "lines": {"type": "integer", "minimum": 0},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "owner": {"type": "object", "properties": {"login": {"type": "string"}, "admin": {"type": "boolean"}},
                  "required": ["login", "admin"]},
    },
    "required": ["name", "kind", "lines", "score", "tags", "owner"],
    "additionalProperties": False,
}
DOCUMENT = {"name": "fibonacci_memoized", "kind": "function", "lines": 42, "score": 0.875,
            "tags": ["recursion", "dynamic programming", "cache"], "owner": {"login": "ada", "admin": True}}


def walk(fill_mask, consume, tokens: list[int], vocab: int) -> dict:
    bitmask = torch.zeros(bitmask_words(vocab), dtype=torch.int32)
    mask_s = []
    for token in tokens:
        start = time.perf_counter()
        fill_mask(bitmask)
        mask_s.append(time.perf_counter() - start)
        assert (bitmask[token // 32] >> (token % 32)) & 1, f"token {token} masked out"
        consume(token)
    return {"mask_us_median": 1e6 * statistics.median(mask_s), "mask_us_p90": 1e6 * sorted(mask_s)[int(0.9 * len(mask_s))],
            "mask_us_max": 1e6 * max(mask_s)}


def pick_costs(vocab: int, device: str, repeats: int = 200) -> dict:
    """Median microseconds of a greedy pick under a grammar's bitmask, from fp32 logits (1, vocab) on `device`: on the
    host (read back, masked, argmax), on the device waited for, and on the device as the host pays for it (launches
    only: the engine reads the step's tokens once afterwards, whatever picked them)."""
    logits = torch.randn(1, vocab, device=device)
    bitmask = torch.randint(-2**31, 2**31 - 1, (1, bitmask_words(vocab)), dtype=torch.int32,
                            pin_memory=device.startswith("cuda"))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def host():
        sample(logits[0], SamplingParams(), allowed=unpack_bitmask(bitmask[0], vocab))

    def on_device(wait: bool):
        masked_greedy(logits, bitmask)
        if wait:
            sync()

    def median_us(pick) -> float:
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            pick()
            times.append(time.perf_counter() - start)
        return 1e6 * statistics.median(times[repeats // 10:])
    return {"device": device, "host_pick_us": median_us(host), "device_pick_us": median_us(lambda: on_device(True)),
            "device_pick_launch_us": median_us(lambda: on_device(False))}


def llguidance_run(tokenizer_json: str, tokens: list[int], vocab: int) -> dict:
    import llguidance
    import llguidance.torch

    start = time.perf_counter()
    tokenizer = llguidance.LLTokenizer(tokenizer_json)
    setup = time.perf_counter() - start
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    result = {}
    for _ in range(2):   # the first walk warms caches up
        start = time.perf_counter()
        matcher = llguidance.LLMatcher(tokenizer, grammar)
        compile_s = time.perf_counter() - start

        def fill(bitmask):
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask[None])

        result = walk(fill, matcher.consume_token, tokens, vocab)
        assert not matcher.is_error(), matcher.get_error()
    return {"library": f"llguidance {llguidance.__version__}", "tokenizer_s": setup, "compile_s": compile_s, **result}


def xgrammar_run(tokenizer_path: Path, tokens: list[int], vocab: int) -> dict:
    import xgrammar
    from importlib.metadata import version
    from transformers import PreTrainedTokenizerFast

    start = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_path)),
                                                   vocab_size=vocab)
    compiler = xgrammar.GrammarCompiler(info, max_threads=1)
    setup = time.perf_counter() - start
    result = {}
    for _ in range(2):
        start = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
        compile_s = time.perf_counter() - start
        matcher = xgrammar.GrammarMatcher(compiled)

        def fill(bitmask):
            matcher.fill_next_token_bitmask(bitmask[None])

        result = walk(fill, matcher.accept_token, tokens, vocab)
        compiler.clear_cache()
    return {"library": f"xgrammar {version('xgrammar')}", "tokenizer_s": setup, "compile_s": compile_s, **result}


def train_bpe(vocab: int, folder: Path, corpus_bytes: int = 150_000_000) -> Path:
    """A byte-level BPE tokenizer.json of `vocab` tokens trained on site-packages' Python sources."""
    import site

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = folder / "corpus.txt"
    if not corpus.exists():
        with open(corpus, "wb") as out:
            for source in sorted(Path(site.getsitepackages()[0]).rglob("*.py")):
                out.write(source.read_bytes())
                if out.tell() > corpus_bytes:
                    break
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train([str(corpus)], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    path = folder / f"bpe-{vocab}.json"
    tokenizer.save(str(path))
    return path


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", action="append", default=[], help="a tokenizer.json; may be repeated")
    parser.add_argument("--bpe", type=int, action="append", default=[], help="train a BPE tokenizer of this vocabulary")
    parser.add_argument("--device", default="cpu", help="where the logits are for the pick's timing (cpu, cuda)")
    parser.add_argument("--out", help="write all results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    text = json.dumps(DOCUMENT, separators=(",", ":"))
    folder = Path(tempfile.mkdtemp(prefix="constrained-mask-"))
    for path in [*map(Path, args.tokenizer), *(train_bpe(vocab, folder) for vocab in args.bpe)]:
        from tokenizers import Tokenizer

        tokenizer_json = path.read_text()
        hf = Tokenizer.from_str(tokenizer_json)
        tokens, vocab = hf.encode(text, add_special_tokens=False).ids, hf.get_vocab_size()
        for run in (lambda: llguidance_run(tokenizer_json, tokens, vocab), lambda: xgrammar_run(path, tokens, vocab)):
            result = {"tokenizer": path.name, "vocab": vocab, "document_tokens": len(tokens), **run()}
            results.append(result)
            print(json.dumps(result), flush=True)
        result = {"tokenizer": path.name, "vocab": vocab, "pick": pick_costs(vocab, args.device)}
        results.append(result)
        print(json.dumps(result), flush=True)
    summary = {"machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
               "command": "python benchmarks/constrained_mask.py " + " ".join(
                   [*(f"--tokenizer {t}" for t in args.tokenizer), *(f"--bpe {v}" for v in args.bpe),
                    f"--device {args.device}"]),
               "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
