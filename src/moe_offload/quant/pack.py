"""Bit packing of quantized codes into 32-bit words, along the output dimension, stored k-major.

    words = pack(q, bits)               # q uint8 (N, K) -> int32 (K // 16, R // T, 16, T), R = packed_rows(N, bits)
    q = unpack(words, bits, N)          # exact inverse

A word holds PER_WORD[bits] codes of one input column k, from rows r, r + R, r + 2R, ... (R =
packed_rows): code s of word (k, r) is row s * R + r, at bits [s * bits, (s + 1) * bits). Words
are stored k-major (word (k, r) at k * R + r), so a GPU thread that owns a few consecutive r reads
whole words along k: every word it loads is PER_WORD rows times one input x_k, and the sum over
a quantization group stays inside the thread (quant/kernels.py). 2, 4 and 8 bits fill the word;
3 bits put 10 codes in 30 bits (2 bits of 32 unused). R is a multiple of 4 (a 16-byte load of
words); the rows beyond N are padding.
"""

from __future__ import annotations

import torch

PER_WORD = {2: 16, 3: 10, 4: 8, 8: 4}   # codes per 32-bit word
TILE_K = 16                               # input columns per tile: the smallest group size


def packed_rows(rows: int, bits: int) -> int:
    """R: words per input column, a multiple of 32 (of 4 below 256 words)."""
    words = -(-rows // PER_WORD[bits])
    multiple = 32 if words >= 256 else 4
    return -(-words // multiple) * multiple


def tile_rows(packed: int) -> int:
    return 32 if packed % 32 == 0 else 4


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    per, rows, k = PER_WORD[bits], packed_rows(q.shape[0], bits), q.shape[1]
    tile = tile_rows(rows)
    padded = q.new_zeros((per * rows, k), dtype=torch.int64)
    padded[:q.shape[0]] = q
    slots = padded.view(per, rows, k).transpose(1, 2)                   # (PER, K, R)
    shifts = torch.arange(per, device=q.device).view(per, 1, 1) * bits
    word = (slots << shifts).sum(0)                                     # (K, R); distinct bits: the sum is an OR
    word = torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)
    return word.view(k // TILE_K, TILE_K, rows // tile, tile).transpose(1, 2).contiguous()


def unpack(words: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    per = PER_WORD[bits]
    k_tiles, r_tiles, tile_k, tile = words.shape
    word = words.transpose(1, 2).reshape(k_tiles * tile_k, r_tiles * tile)  # (K, R)
    shifts = torch.arange(per, device=words.device).view(per, 1, 1) * bits
    slots = (word.long()[None] >> shifts) & (2 ** bits - 1)              # (PER, K, R)
    return slots.transpose(1, 2).reshape(per * word.shape[1], -1)[:rows].to(torch.uint8)
