"""The GEMV's launch configuration and tiling rules: plain Python, importable and testable without Triton.

    config = default_config(bits=2, group_size=16, n=14336, k=4096, rows_of_x=1, sm_count=132)
    quantizes_x(2, 16, 1), x_bytes(2), gemv_tiles(3, 16), weight_eviction(2, 1)

kernels.py launches the kernels (kernel_gemv.py, kernel_dequantize.py) with what these functions choose;
why each default is what it is, with its measurements: docs/quantization.md, "Tiling defaults".
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


MAGIC = 0x4B000000          # the bits of 2^23: with a code ORed into the mantissa, 2^23 + code
PAIR_MAGIC = 0x64006400     # two fp16 1024s: with a code ORed into each half's mantissa, 1024 + code
MAX_GEMV_ROWS = 8           # more rows of x than this: dequantize, then cuBLAS
MAX_SPLITS = 64             # programs that add partial sums into one row (_add_partial's accumulator)
SPLIT_COLUMNS = 128         # input columns a warp covers by default
ROWS_PER_THREAD = 4         # the default configs' rows a thread
PROGRAMS_PER_SM = 4         # one row of x: programs of 4 warps an SM holds at once (at most 128 registers a thread)
# A warp's groups loaded before the wait hold their registers through it: 7 was the fastest cap at 2 bits
# (docs/quantization.md, "Tiling defaults")
MAX_EARLY_GROUPS = 7


@dataclass(frozen=True)
class KernelConfig:
    rows_per_thread: int    # consecutive output rows a thread owns (one vector load of words)
    warps: int              # warps per program, each on its own input columns of the program's rows
    groups_per_split: int   # quantization groups each program sums before the programs' partials are added
    unrolled: bool          # a program's groups as straight-line code (else a loop: fewer registers)
    early_groups: int = 0   # unrolled: groups whose weight is loaded before waiting for the kernel before
    dependent_launch: bool = True   # start before the kernel before has finished, where possible (_dependent_launch)
    max_registers: int | None = None    # a thread's registers at most (Triton's maxnreg; None: the compiler's choice)


@functools.cache     # hqq_gemv asks on every call, in the decode loop; the config is frozen
def default_config(bits: int, group_size: int, n: int, k: int, rows_of_x: int = 1,
                   sm_count: int | None = None) -> KernelConfig:
    """4 rows a thread. For one row of x, 4 warps and the groups unrolled, about half of them loaded before the
    wait for the kernel before (early_groups); SPLIT_COLUMNS input columns a warp, with integer x at 2 and 4 bits
    twice that, or a few groups fewer where that still fits one wave on the card's sm_count SMs (one_wave_groups);
    with integer x at most 72 registers a thread at 3 bits and 128 at 2 (so that a call's programs fit the GPU at
    once). For more rows of x, 2 warps a program, the groups in a loop, loop_columns a warp. Each choice is the
    fastest measured; the measurements are in docs/quantization.md, "Tiling defaults"."""
    integer_x = quantizes_x(bits, group_size, rows_of_x)
    if rows_of_x == 1:
        warps, columns = 4, (2 * SPLIT_COLUMNS if integer_x and bits in (2, 4) else SPLIT_COLUMNS)
        groups = one_wave_groups(max(1, columns // group_size), warps, n, k // group_size, sm_count)
    else:
        warps, columns = 2, loop_columns(bits, rows_of_x)
        groups = max(1, columns // group_size)
    groups = max(groups, -(-k // group_size // (warps * MAX_SPLITS)))     # wider rows: more a split
    early = early_groups(bits, group_size, rows_of_x, groups)
    registers = {2: 128, 3: 72}.get(bits) if integer_x else None
    return KernelConfig(ROWS_PER_THREAD, warps, groups, unrolled=rows_of_x == 1, early_groups=early,
                        max_registers=registers)


def one_wave_groups(groups: int, warps: int, n: int, k_groups: int, sm_count: int | None) -> int:
    """`groups` a warp for one row of x, or fewer, down to 3/4 of it: the fewest with which K's k_groups split
    evenly among a block of rows' programs and all n rows' programs are at work at once (at most
    PROGRAMS_PER_SM an SM): more, smaller programs and none waiting for a slot, faster than ragged splits
    (measured at 2 bits only; Mixtral's shapes at 3 and 4 bits have no such split: docs/quantization.md,
    "Tiling defaults"). sm_count None (not known): `groups`."""
    if sm_count is None:
        return groups
    blocks = -(-n // (32 * ROWS_PER_THREAD))
    for fewer in range(-(-3 * groups // 4), groups):
        per_program = fewer * warps
        if k_groups % per_program == 0 and blocks * (k_groups // per_program) <= PROGRAMS_PER_SM * sm_count:
            return fewer
    return groups


def loop_columns(bits: int, rows_of_x: int) -> int:
    """Input columns a warp of the loop (2 to 8 rows of x) covers by default: fewer programs add fewer partial
    sums into each row, but fewer are at work. At 4 bits 256 columns up to 4 rows of x and 512 above, elsewhere
    SPLIT_COLUMNS: the fastest measured (docs/quantization.md, "Tiling defaults"; 8 bits not measured). Rows of x
    between those measured take the next measured count's."""
    if bits != 4:
        return SPLIT_COLUMNS
    return 2 * SPLIT_COLUMNS if rows_of_x <= 4 else 4 * SPLIT_COLUMNS


def early_groups(bits: int, group_size: int, rows_of_x: int, groups_per_split: int) -> int:
    """Groups a warp loads before it waits for the kernel before: with integer x half of them, at most
    MAX_EARLY_GROUPS; else none."""
    return min(MAX_EARLY_GROUPS, max(1, groups_per_split // 2)) if quantizes_x(bits, group_size, rows_of_x) else 0


def x_lanes(bits: int, group_size: int) -> int:
    """Lanes that hold one group of quantized x (_quantize_x): one a plane word of four codes, so GROUP / 4, or
    at 3 bits 9 a 32-code block (_three_bit_plane) rounded up to a power of 2."""
    if bits == 3:
        return 1 << (9 * group_size // 32 - 1).bit_length()
    return group_size // 4


def x_bytes(bits: int) -> int:
    """Bytes a value of integer x takes (_quantize_x). One at 2 bits: x_k as an int8 in steps of 1/127 of its
    group's largest |x| (as llama.cpp's q8_1, here in the weight's groups), the codes that sit 2 bits up their
    bytes summed on their own so that no x_k loses bits to them; about 2^-8 of the group's largest |x| in place of
    2^-16, for fewer instructions and a faster GEMV (docs/quantization.md, "Tiling defaults"). Two elsewhere: at 3
    bits the codes of one plane word sit 0-2 bits up by byte, so each x_k is scaled by its byte's 2^-o and one byte
    would lose up to 2 of its bits; 4 and 8 bits were not measured with one."""
    return 1 if bits == 2 else 2


def quantizes_x(bits: int, group_size: int, rows_of_x: int, config: KernelConfig | None = None) -> bool:
    """Whether the GEMV quantizes x to integers and sums codes times x by DP4A (_group_int_sums): one row of x,
    unrolled groups, at most 4 rows a thread (the default config's 4 when None), and a group's plane words on
    at most a warp's 32 lanes (not so for 3-bit groups of 128: 36 planes). Its warp shuffles take element t of
    a (threads, 1) tensor to be thread t's: so it is while a thread's words are one vector load; 8 rows' words
    Triton spreads over two threads."""
    unrolled, rows_per_thread = (True, 4) if config is None else (config.unrolled, config.rows_per_thread)
    return (rows_of_x == 1 and unrolled and rows_per_thread <= 4 and bits in (2, 3, 4, 8)
            and x_lanes(bits, group_size) <= 32)


def codes_per_step(bits: int) -> int:
    """Codes the GEMV decodes from one run of whole words: 16 (1, 2 or 4 words), or 32 in 3 words at 3 bits."""
    return 32 if bits == 3 else 16


def decodes_in_pairs(bits: int) -> bool:
    """Whether the GEMV decodes codes two at a time in fp16: a word's two halves hold codes at the same places
    (not at 3 bits), and a group's fp16 sums stay far from fp16's largest value (not with 8-bit codes)."""
    return bits in (2, 4)


def gemv_tiles(bits: int, group_size: int) -> bool:
    """Whether a group is a whole number of the GEMV's steps (not so for 3-bit groups of 16)."""
    return group_size % codes_per_step(bits) == 0



def weight_eviction(bits: int, rows_of_x: int) -> str:
    """The cache eviction policy of a GEMV's loads of words and codes, which it reads once: evict first (Triton: in
    L1, and an L2 cache hint) at 2 and 3 bits with one row of x, where it was faster; normal elsewhere, where it was
    not (docs/quantization.md, "Tiling defaults")."""
    return "evict_first" if bits in (2, 3) and rows_of_x == 1 else ""


def _masks_groups(integer_x: bool, groups: int, config: KernelConfig) -> bool:
    """Whether the GEMV zeroes the groups past a warp's share (a select per row and group): needed where some
    split is ragged; kept for codes as floats, where dropping it was slower at 3 bits (compiler scheduling:
    docs/quantization.md, "Tiling defaults")."""
    return not integer_x or groups % (config.groups_per_split * config.warps) != 0
