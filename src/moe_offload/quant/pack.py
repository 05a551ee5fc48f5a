"""Bit packing of quantized codes into 32-bit words, along the output dimension, stored k-major.

    words = pack(q, bits)               # q uint8 (N, K) -> int32 (K, packed_rows(N, bits))
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


def packed_rows(rows: int, bits: int) -> int:
    """R: words per input column, a multiple of 4."""
    return -(-rows // (PER_WORD[bits] * 4)) * 4


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    per, rows = PER_WORD[bits], packed_rows(q.shape[0], bits)
    padded = q.new_zeros((per * rows, q.shape[1]), dtype=torch.int64)
    padded[:q.shape[0]] = q
    slots = padded.view(per, rows, -1).transpose(1, 2)                 # (PER, K, R)
    shifts = torch.arange(per, device=q.device).view(per, 1, 1) * bits
    word = (slots << shifts).sum(0)                                     # distinct bits: the sum is an OR
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)


def unpack(words: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    per = PER_WORD[bits]
    shifts = torch.arange(per, device=words.device).view(per, 1, 1) * bits
    slots = (words.long()[None] >> shifts) & (2 ** bits - 1)            # (PER, K, R)
    return slots.transpose(1, 2).reshape(per * words.shape[1], -1)[:rows].to(torch.uint8)
