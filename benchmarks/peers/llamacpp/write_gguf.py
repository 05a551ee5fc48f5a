"""A GGUF with Mixtral-8x7B's exact shapes and random but finite weights, for llama.cpp's llama-bench.

    python benchmarks/peers/llamacpp/write_gguf.py --experts q2_k --out /tmp/mixtral-q2_k.gguf      # 14.3 GiB
    python benchmarks/peers/llamacpp/write_gguf.py --experts q3_k --out /tmp/mixtral-q3_k.gguf
    python benchmarks/peers/llamacpp/write_gguf.py --tiny --experts q4_k --out /tmp/tiny.gguf        # 4 layers, 7 MB

Needs numpy and gguf (gguf-py from PyPI: `pip install gguf`; tested with 0.19.0); not a dependency of
moe-offload itself.

The tensors are laid out as llama.cpp's own conversion lays out Mixtral (conversion/llama.py: architecture
`llama`, each layer's 8 experts stacked into `blk.N.ffn_{gate,up,down}_exps.weight` of shape (experts, rows,
cols)), with the same quantization roles as our `--quant A/E`:
- experts (w1 = gate, w3 = up, w2 = down) in Q2_K, Q3_K or Q4_K (2.625, 3.4375, 4.5 bits per weight);
- attention (q, k, v, o) in Q4_K (4.5 bits per weight; ours: 4 bits, groups of 64, 8-bit scales: 4.27);
- output (lm_head) and token embeddings in F16 (ours: bf16, unquantized), the router and norms in F32.
gguf-py has no K-quant quantizer, so the blocks are written directly: random bytes for the codes and the
packed sub-block scales, then each block's fp16 super-scales (d, and dmin where the format has one) set to one
finite value per tensor, chosen with gguf-py's own dequantizer so that the weights have mean ~0 and a trained
layer's deviation, 1 / sqrt(fan-in) (as our synthetic model does). Every byte a real checkpoint in that
format would move and every kernel it would run is there; the logits are finite and meaningless.
The tokenizer is a stand-in SentencePiece vocabulary (<unk>, <s>, </s>, 256 byte tokens, then placeholders):
llama-bench feeds random token ids and never detokenizes.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T


@dataclass(frozen=True)
class Shapes:
    hidden: int = 4096
    ffn: int = 14336
    layers: int = 32
    experts: int = 8
    top_k: int = 2
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 32000
    context: int = 32768
    rope_theta: float = 1e6
    rms_eps: float = 1e-5


MIXTRAL_8X7B = Shapes()
TINY = Shapes(hidden=256, ffn=512, layers=4, heads=4, kv_heads=2, vocab=1024, context=4096)

EXPERT_TYPES = {"q2_k": T.Q2_K, "q3_k": T.Q3_K, "q4_k": T.Q4_K}
ATTENTION_TYPE = T.Q4_K
FILE_TYPE = {T.Q2_K: 10, T.Q3_K: 11, T.Q4_K: 14}        # llama_ftype: MOSTLY_Q2_K, MOSTLY_Q3_K_S, MOSTLY_Q4_K_S

# Byte offsets of a block's fp16 super-scale d and super-min dmin (ggml-common.h's block_q*_K structs).
SUPER_SCALES = {T.Q2_K: (80, 82), T.Q3_K: (108, None), T.Q4_K: (0, 2)}


def tensor_plan(s: Shapes, expert_type: T) -> list[tuple[str, tuple[int, ...], T]]:
    """(name, numpy shape with the row length last, type), in the order llama.cpp's conversion writes them."""
    head_dim = s.hidden // s.heads
    plan = [("token_embd.weight", (s.vocab, s.hidden), T.F16)]
    for i in range(s.layers):
        b = f"blk.{i}."
        plan += [
            (b + "attn_norm.weight", (s.hidden,), T.F32),
            (b + "attn_q.weight", (s.heads * head_dim, s.hidden), ATTENTION_TYPE),
            (b + "attn_k.weight", (s.kv_heads * head_dim, s.hidden), ATTENTION_TYPE),
            (b + "attn_v.weight", (s.kv_heads * head_dim, s.hidden), ATTENTION_TYPE),
            (b + "attn_output.weight", (s.hidden, s.heads * head_dim), ATTENTION_TYPE),
            (b + "ffn_norm.weight", (s.hidden,), T.F32),
            (b + "ffn_gate_inp.weight", (s.experts, s.hidden), T.F32),
            (b + "ffn_gate_exps.weight", (s.experts, s.ffn, s.hidden), expert_type),
            (b + "ffn_down_exps.weight", (s.experts, s.hidden, s.ffn), expert_type),
            (b + "ffn_up_exps.weight", (s.experts, s.ffn, s.hidden), expert_type),
        ]
    plan += [("output_norm.weight", (s.hidden,), T.F32), ("output.weight", (s.vocab, s.hidden), T.F16)]
    return plan


def nbytes(shape: tuple[int, ...], qtype: T) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def super_scales(qtype: T, rng: np.random.Generator) -> tuple[float, float]:
    """(d, dmin) per unit of target deviation: dequantize random blocks with gguf-py (d = 1, dmin = 0, then d = 0,
    dmin = 1), take the dmin/d ratio that cancels the mean, and scale both so the deviation is 1."""
    block = gguf.GGML_QUANT_SIZES[qtype][1]
    d_at, dmin_at = SUPER_SCALES[qtype]
    blocks = rng.integers(0, 256, (4096, block), dtype=np.uint8)

    def weights(d: float, dmin: float) -> np.ndarray:
        blocks[:, d_at:d_at + 2] = np.full((len(blocks), 1), d, np.float16).view(np.uint8)
        if dmin_at is not None:
            blocks[:, dmin_at:dmin_at + 2] = np.full((len(blocks), 1), dmin, np.float16).view(np.uint8)
        return gguf.quants.dequantize(blocks, qtype)

    ratio = 0.0 if dmin_at is None else float(-weights(1, 0).mean() / weights(0, 1).mean())
    std = float(weights(1, ratio).std())
    return 1 / std, ratio / std


def random_blocks(shape: tuple[int, ...], qtype: T, scales: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """uint8 (..., bytes per row): random codes and sub-block scales, fp16 super-scales for a deviation of
    1 / sqrt(row length)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block
    data = np.frombuffer(rng.bytes(n_blocks * size), np.uint8).reshape(n_blocks, size).copy()
    deviation = shape[-1] ** -0.5
    d_at, dmin_at = SUPER_SCALES[qtype]
    data[:, d_at:d_at + 2] = np.float16(scales[0] * deviation).reshape(1).view(np.uint8)
    if dmin_at is not None:
        data[:, dmin_at:dmin_at + 2] = np.float16(scales[1] * deviation).reshape(1).view(np.uint8)
    return data.reshape(*shape[:-1], shape[-1] // block * size)


def random_tensor(name: str, shape: tuple[int, ...], qtype: T, scales: dict, rng: np.random.Generator) -> np.ndarray:
    if qtype in SUPER_SCALES:
        return random_blocks(shape, qtype, scales[qtype], rng)
    if name.endswith("norm.weight"):
        return np.ones(shape, np.float32)
    dtype = np.float16 if qtype == T.F16 else np.float32
    deviation = 1.0 if name == "token_embd.weight" else shape[-1] ** -0.5
    return (rng.standard_normal(shape, np.float32) * deviation).astype(dtype)


def add_metadata(writer: gguf.GGUFWriter, s: Shapes, expert_type: T, name: str) -> None:
    writer.add_name(name)
    writer.add_file_type(FILE_TYPE[expert_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(s.context)
    writer.add_embedding_length(s.hidden)
    writer.add_block_count(s.layers)
    writer.add_feed_forward_length(s.ffn)
    writer.add_head_count(s.heads)
    writer.add_head_count_kv(s.kv_heads)
    writer.add_rope_dimension_count(s.hidden // s.heads)
    writer.add_rope_freq_base(s.rope_theta)
    writer.add_layer_norm_rms_eps(s.rms_eps)
    writer.add_expert_count(s.experts)
    writer.add_expert_used_count(s.top_k)
    writer.add_vocab_size(s.vocab)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(s.vocab - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (s.vocab - 259)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(s.vocab - 259)])
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)


def write(path: str, s: Shapes, expert_type: T, seed: int = 0, name: str = "Mixtral-8x7B random") -> int:
    """Write the GGUF one tensor at a time (memory: one stacked expert tensor); returns its size in bytes."""
    rng = np.random.default_rng(seed)
    scales = {qtype: super_scales(qtype, rng) for qtype in {expert_type, ATTENTION_TYPE}}
    plan = tensor_plan(s, expert_type)
    writer = gguf.GGUFWriter(path, "llama")
    add_metadata(writer, s, expert_type, name)
    for tensor_name, shape, qtype in plan:
        if qtype in SUPER_SCALES:
            byte_shape = (*shape[:-1], nbytes(shape[-1:], qtype))
            writer.add_tensor_info(tensor_name, byte_shape, np.dtype(np.uint8), nbytes(shape, qtype), raw_dtype=qtype)
        else:
            dtype = np.dtype(np.float16 if qtype == T.F16 else np.float32)
            writer.add_tensor_info(tensor_name, shape, dtype, nbytes(shape, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor_name, shape, qtype in plan:
        writer.write_tensor_data(random_tensor(tensor_name, shape, qtype, scales, rng))
    writer.close()
    return sum(nbytes(shape, qtype) for _, shape, qtype in plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", choices=sorted(EXPERT_TYPES), default="q2_k", help="expert format")
    parser.add_argument("--out", required=True, help="the .gguf file to write")
    parser.add_argument("--tiny", action="store_true", help="4 layers of width 256 (a CPU test of the pipeline)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shapes = TINY if args.tiny else MIXTRAL_8X7B
    start = time.perf_counter()
    size = write(args.out, shapes, EXPERT_TYPES[args.experts], args.seed,
                 f"{'tiny' if args.tiny else 'Mixtral-8x7B'} random, experts {args.experts}")
    print(f"wrote {args.out}: {size / 2 ** 30:.2f} GiB of tensors, experts {args.experts}, "
          f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
