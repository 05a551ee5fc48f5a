"""Bit packing of quantized codes, along the output dimension, in whole words.

    packed = pack(q, bits)              # q uint8 (N, K) -> uint8 (word_bytes(bits), packed_rows(N, bits), K)
    q = unpack(packed, bits, N)         # exact inverse

A word holds PER_WORD[bits] codes of one input column k, from rows r, r + R, r + 2R, ... (R =
packed_rows): code s of word (r, k) is row s * R + r, at bits [s * bits, (s + 1) * bits). Words are
1 byte for 2, 4 and 8 bits and 3 bytes for 3 bits (8 codes in 24 bits: no bit is wasted), stored
as byte planes: plane b holds byte b of every word. A GPU tile of words along k then yields
PER_WORD full tiles of rows with a shift and a mask each, and the input x is read once for all
of them. N is padded to a multiple of PER_WORD with zero codes.
"""

from __future__ import annotations

import torch

PER_WORD = {2: 4, 3: 8, 4: 2, 8: 1}   # codes per word


def word_bytes(bits: int) -> int:
    return bits * PER_WORD[bits] // 8


def packed_rows(rows: int, bits: int) -> int:
    return -(-rows // PER_WORD[bits])


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    per, rows = PER_WORD[bits], packed_rows(q.shape[0], bits)
    padded = q.new_zeros((rows * per, q.shape[1]), dtype=torch.int32)
    padded[:q.shape[0]] = q
    word = torch.zeros((rows, q.shape[1]), dtype=torch.int32, device=q.device)
    for s in range(per):
        word |= padded[s * rows:(s + 1) * rows] << (bits * s)
    return torch.stack([(word >> (8 * b)) & 0xFF for b in range(word_bytes(bits))]).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    word = torch.zeros(packed.shape[1:], dtype=torch.int32, device=packed.device)
    for b in range(word_bytes(bits)):
        word |= packed[b].int() << (8 * b)
    mask = 2 ** bits - 1
    codes = torch.cat([(word >> (bits * s)) & mask for s in range(PER_WORD[bits])])
    return codes[:rows].to(torch.uint8)
