"""Model size and perplexity for 16-bit and HQQ mixed quantization (the table in docs/quantization.md).

    python benchmarks/quant_perplexity.py [--settings 16,4/4,4/3,4/2] [--max-windows N] --out RESULT.json

For each setting (16-bit, then attention/expert bits "A/E" with the paper's group sizes and 8-bit
scales and zeros), loads the model in fp32 on the CPU, quantized on load, and measures perplexity
as `moe-offload perplexity` does (perplexity.py states the method). On the CPU a quantized weight is
dequantized and multiplied; to save time this script dequantizes every weight once up front and
first checks, on one window, that the logits are bit-identical to dequantizing on every call.
Size: the bytes `moe-offload quantize` writes (16-bit tensors at 2 bytes a weight). Prints one
JSON line per setting and a JSON line of all of them last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from moe_offload.config import QuantConfig, RuntimeConfig
from moe_offload.engine import Engine
from moe_offload.experts import Expert
from moe_offload.generate import prefill
from moe_offload.perplexity import WINDOW, perplexity, windows_of
from moe_offload.quant.checkpoint import open_checkpoint, quantized_size
from moe_offload.quant.weight import QuantizedWeight

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "reference-moe"
TEXT = Path(__file__).resolve().parents[1] / "data" / "eval-networkx.txt"    # held-out text, in the repository only
PAPER = {"16": (3.59, 87.0), "4/4": (None, None), "4/3": (4.05, 21.4), "4/2": (4.61, 17.5)}  # Mixtral WikiText2, GB


def dequantized(value):
    """A copy of model weights with every QuantizedWeight replaced by its fp32 dequantization."""
    if isinstance(value, QuantizedWeight):
        return value.dequantize(torch.float32)
    if isinstance(value, Expert):
        return Expert(*(dequantized(w) for w in value))
    if isinstance(value, list):
        return [dequantized(v) for v in value]
    if isinstance(value, dict):
        return {k: dequantized(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: dequantized(getattr(value, f.name)) for f in dataclasses.fields(value)})
    return value


def model_bytes(folder: Path, quant: QuantConfig | None) -> int:
    if quant is None:
        return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return quantized_size(open_checkpoint(folder, quant))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=FIXTURE)
    parser.add_argument("--text", type=Path, default=TEXT)
    parser.add_argument("--window", type=int, default=WINDOW)
    parser.add_argument("--max-windows", type=int, default=0, help="0: every window of the file")
    parser.add_argument("--settings", default="16,4/4,4/3,4/2")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    rows = []
    for setting in args.settings.split(","):
        quant = None if setting == "16" else QuantConfig.parse(setting)
        started = time.perf_counter()
        engine = Engine.load(RuntimeConfig(model=args.model, device="cpu", dtype="float32", quant=quant), progress=False)
        token_ids = engine.tokenizer.encode(args.text.read_text())
        if quant is not None:
            first = windows_of(token_ids, args.window)[0]
            per_call = prefill(engine.model, engine.cache, first, "cpu", last_only=False)
            engine.model.weights = dequantized(engine.model.weights)
            for slots in engine.model.provider.slots_by_layer.values():     # the CPU runs one expert at a time
                slots.experts = dequantized(slots.experts)
            once = prefill(engine.model, engine.cache, first, "cpu", last_only=False)
            if not torch.equal(per_call, once):
                sys.exit(f"{setting}: dequantizing once changed the logits; refusing to report")
        result = perplexity(engine, token_ids, args.window, args.max_windows or None)
        paper = PAPER.get(setting, (None, None))     # the paper reports only its own settings
        row = dict(setting=setting, quant=quant.to_json() if quant else None, model_bytes=model_bytes(args.model, quant),
                   perplexity=result.perplexity, windows=result.windows, window=result.window,
                   predicted_tokens=result.predicted, file_tokens=len(token_ids),
                   paper_mixtral_wikitext2=paper[0], paper_mixtral_gb=paper[1],
                   seconds=round(time.perf_counter() - started, 1))
        print(json.dumps(row), flush=True)
        rows.append(row)
    base = rows[0]["perplexity"] if rows and rows[0]["setting"] == "16" else None
    summary = dict(benchmark="quant_perplexity", model=str(args.model.name), text=args.text.name, rows=rows,
                   relative_to_16bit={r["setting"]: r["perplexity"] / base for r in rows} if base else None,
                   device="cpu", dtype="float32", torch=torch.__version__, machine=platform.machine(),
                   git_commit=subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
                   command=" ".join(sys.argv), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
