"""Bit packing of quantized codes: each output row's codes as one bit stream along K, in 32-bit words.

    words = pack(q, bits)               # q uint8 (N, K) -> int32 (words_per_row(K, bits), padded_rows(N))
    q = unpack(words, bits, K)          # uint8 (padded_rows(N), K); the first N rows are q

Code k of a row sits at bits [k * bits, (k + 1) * bits) of the row's stream, word j holding
stream bits [32 j, 32 j + 32): 16 codes a word at 2 bits, 8 at 4, 4 at 8, and at 3 bits a code
may straddle two words (32 codes fill 3 words; nothing is wasted). Words are stored word-major
(word j of row n at [j, n]), so the GPU threads that own consecutive rows read consecutive
words, and a thread's few rows are one vector load (quant/kernel_gemv.py). Rows are padded to a
multiple of ROW_MULTIPLE by repeating the last row.
"""

from __future__ import annotations

import torch

ROW_MULTIPLE = 32


def padded_rows(rows: int) -> int:
    return -(-rows // ROW_MULTIPLE) * ROW_MULTIPLE


def words_per_row(k: int, bits: int) -> int:
    return -(-k * bits // 32)


def pad_rows(matrix: torch.Tensor) -> torch.Tensor:
    """matrix (N, ...) -> (padded_rows(N), ...), the last row repeated."""
    pad = padded_rows(matrix.shape[0]) - matrix.shape[0]
    return torch.cat([matrix, matrix[-1:].expand(pad, *matrix.shape[1:])]) if pad else matrix


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    rows, k = q.shape
    start = torch.arange(k, device=q.device) * bits
    word, offset = start // 32, start % 32
    shifted = pad_rows(q).long() << offset                             # (NP, K), below 2^39
    stream = torch.zeros(padded_rows(rows), words_per_row(k, bits) + 1, dtype=torch.int64, device=q.device)
    stream.index_add_(1, word, shifted & 0xFFFFFFFF)                   # distinct bits: the sums are ORs
    stream.index_add_(1, word + 1, shifted >> 32)                      # the part of a straddling code
    stream = stream[:, :-1]
    return torch.where(stream >= 2 ** 31, stream - 2 ** 32, stream).to(torch.int32).t().contiguous()


def unpack(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    stream = words.t().long() & 0xFFFFFFFF                              # (NP, W)
    stream = torch.cat([stream, torch.zeros_like(stream[:, :1])], dim=1)
    start = torch.arange(k, device=words.device) * bits
    word, offset = start // 32, start % 32
    pair = stream[:, word] | (stream[:, word + 1] << 32)                # both words a code may touch
    return ((pair >> offset) & (2 ** bits - 1)).to(torch.uint8)
