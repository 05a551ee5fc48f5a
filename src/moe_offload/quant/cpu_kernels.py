"""One expert's SwiGLU on the CPU, read in place from its packed buffer: for experts the GPU cache missed.

    fmt = HQQExpertFormat(hidden, ffn, QuantSpec(2))     # or DenseExpertFormat(hidden, ffn, torch.bfloat16)
    buffer = fmt.pack(expert)                             # uint8 (fmt.nbytes,): e.g. one in the pinned host store
    y = cpu_swiglu(fmt, buffer, x)                        # x (rows, hidden) fp32 or bf16 -> w2 (silu(w1 x) * (w3 x))
    y = cpu_linear(weight, x)                             # one matrix: a QuantizedWeight or a dense (N, K) tensor
    backend()                                             # "c", or "torch: <why the C kernels are not in use>"

The first call builds the kernels (seconds, once per machine and version): call backend() at start-up, not in
the decode loop.

At batch 1 a missed expert is read once; the CPU reads it at host-memory speed, where a copy would read it at
the link's. So the kernels stream the packed bytes: all rows of x (1 to MAX_ROWS; more are taken MAX_ROWS at a
time) share one pass over the weight, on `threads` threads (default: every core this process may use), and
nothing is copied or converted first: the weight is read where it lies, pinned or not. Every product is an
fp32 multiply of the exact weight or code by x, sums are fp32, and y comes back in x's dtype: the result is
dequantize-then-matmul in fp32 up to the order of the sums (tests/test_cpu_kernels.py bounds the difference).
HQQ takes 2, 3, 4 and 8 bits with 8-bit or fp16 scales and zeros, at any group size but 3-bit groups of 16
(they end mid-word); dense takes bf16 and fp32. Anything else falls back to torch.

How the HQQ kernel reads its layout (pack.py, weight.py). An (N, K) matrix keeps each row's codes along K in
32-bit words stored (words, padded rows), rows innermost, and per group of K columns a scale and a zero stored
(groups, padded rows): uint8 codes, value = min + code * step with the (step, min) of its run of
meta_group_size consecutive elements of the flattened (groups, padded rows) array, or fp16. So a vector's 16
lanes are 16 consecutive output rows: one 64-byte load is a word of 16 rows, and code c of it is an AND
(code * 2^position, exact as an int) and a conversion, multiplied by x[r, k] * 2^-position (scaled once per
call; the product is code * x exactly as fp32 rounds it) into the group's sums, 8 chains of sums at once; per
group y += scale (sum - zero sum_k x[r, k]). A thread walks down K over a panel of up to 256 rows, reading runs
of 1 KiB, one a word (512-byte runs were 2x slower at 2 bits: the 4 KiB-aligned stride between words makes
short runs hard on the memory system), and asks for the next groups' runs into L2 ahead of use. A 3-bit code
may straddle two words; 3 words hold 32 whole codes. Dense (N, K) row-major bf16 or fp32 puts K in the lanes:
a 64-byte load is 32 bf16 columns, even ones by a shift, odd ones by a mask (x is rearranged to match).

Threads take panels as they come free (OpenMP, dynamic): a thread the OS sets aside holds up one panel, not a
share of the rows. The OpenMP runtime is torch's own libgomp (same soname: one copy in the process), whose
waiting threads spin for a while before they sleep; on a host that also drives a GPU from Python, leave that
thread a core (threads = cores - 1), or start Python with OMP_WAIT_POLICY=passive (a busy 2-core machine:
11 ms an expert with it, 32 ms without).

Why a small C file built on first use. Speed needs explicit vectors (16 rows of a word at once) and threads
that do not pass through Python; a clean install needs no build step and nothing heavy at run time. The C
source (cpu_expert.c) ships in the package and is compiled once with the system's C compiler (`$CC`, else cc,
gcc or clang; -O3 -march=native -fopenmp; 5-15 s) into a per-user cache keyed by the source, the compiler, its
flags and the CPU ($MOE_OFFLOAD_CACHE, else $XDG_CACHE_HOME or ~/.cache, then moe-offload/cpu_kernels),
written to a temporary name and renamed, then called through ctypes on the tensors' data pointers (ctypes lets
go of the GIL for the call). It includes no torch or Python header, so any gcc or clang builds it and a new
torch does not break it; GCC's vector extensions give AVX-512 code where the CPU has it and AVX2 or NEON
elsewhere from one source (one AVX-512 intrinsic, under #ifdef, where GCC 12 would go lane by lane).
torch.utils.cpp_extension would need torch's headers, ninja and a C++ build per torch version; numba is a
heavy dependency whose vectorizer does not see the word-of-16-rows structure. Without a compiler, when it
cannot build the file (no OpenMP, say), or with MOE_OFFLOAD_CPU_KERNELS=torch, every call falls back to
dequantize-then-matmul in torch, slower but the same result, and backend() says why in one line.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from ..experts import DenseExpertFormat, ExpertFormat
from .weight import HQQExpertFormat, QuantizedWeight

MAX_ROWS = 8                     # rows of x one pass over the weight serves (cpu_expert.c's MAX_ROWS)
SOURCE = Path(__file__).with_name("cpu_expert.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
DENSE_F32, DENSE_BF16, HQQ = 0, 1, 2    # cpu_expert.c's enum storage


class Matrix(ctypes.Structure):
    """cpu_expert.c's struct matrix: one (N, K) weight, described by its tensors' addresses."""

    _fields_ = [(name, ctypes.c_int64) for name in
                ("storage", "rows", "cols", "bits", "group_size", "meta_group_size", "padded_rows")]
    _fields_ += [(name, ctypes.c_void_p) for name in ("weight", "scale", "zero", "meta")]


def default_threads() -> int:
    """Every core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def backend() -> str:
    """"c" when the compiled kernels are in use, else "torch: " and the reason in one line."""
    library, reason = _library()
    return "c" if library is not None else f"torch: {reason}"


def cpu_linear(weight: QuantizedWeight | torch.Tensor, x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """x (rows, K) fp32 or bf16 -> x W^T (rows, N) in x's dtype; weight a CPU QuantizedWeight or dense (N, K)."""
    library, _ = _library()
    matrix = describe(weight)
    if library is None or matrix is None:
        return F.linear(x.float(), _dequantized(weight)).to(x.dtype)
    x32 = _rows_of(x, matrix.cols)
    y = torch.empty(x32.shape[0], matrix.rows, dtype=torch.float32)
    for rows in _row_slices(x32.shape[0]):
        if library.moe_cpu_linear(ctypes.byref(matrix), _address(x32[rows]), rows.stop - rows.start,
                                  _address(y[rows]), _thread_count(threads)):
            raise MemoryError(f"cpu_linear: no memory for the activations of {rows.stop - rows.start} rows")
    return y.to(x.dtype)


def cpu_swiglu(expert_format: ExpertFormat, buffer: torch.Tensor, x: torch.Tensor,
               threads: int | None = None) -> torch.Tensor:
    """One expert, its uint8 (nbytes,) CPU buffer read in place: x (rows, hidden) -> w2 (silu(w1 x) * (w3 x)),
    (rows, hidden) in x's dtype."""
    if buffer.device.type != "cpu":
        raise ValueError(f"cpu_swiglu reads the expert where it lies: expected a CPU buffer, got one on "
                         f"{buffer.device}")
    w1, w2, w3 = expert_format.view(buffer)
    library, _ = _library()
    matrices = [describe(w) for w in (w1, w3, w2)]
    if library is None or None in matrices:
        x32 = x.float()
        h = F.silu(F.linear(x32, _dequantized(w1))) * F.linear(x32, _dequantized(w3))
        return F.linear(h, _dequantized(w2)).to(x.dtype)
    x32 = _rows_of(x, matrices[0].cols)
    y = torch.empty(x32.shape[0], matrices[2].rows, dtype=torch.float32)
    for rows in _row_slices(x32.shape[0]):
        status = library.moe_cpu_swiglu(*(ctypes.byref(m) for m in matrices), _address(x32[rows]),
                                        rows.stop - rows.start, _address(y[rows]), _thread_count(threads))
        if status == 2:
            raise ValueError("cpu_swiglu: w1 and w3 of one expert must share a layout (bits, group size, dtype)")
        if status:
            raise MemoryError(f"cpu_swiglu: no memory for the activations of {rows.stop - rows.start} rows")
    return y.to(x.dtype)


def supports(expert_format: ExpertFormat) -> bool:
    """Whether the compiled kernels (when built) take this format; others fall back to torch."""
    if isinstance(expert_format, DenseExpertFormat):
        return all(slot.dtype in (torch.float32, torch.bfloat16) for slot in expert_format.slots)
    return isinstance(expert_format, HQQExpertFormat) and _hqq_supported(expert_format.spec.bits,
                                                                       expert_format.spec.group_size)


def describe(weight: QuantizedWeight | torch.Tensor) -> Matrix | None:
    """The kernel's view of a CPU weight (its tensors' addresses: keep the weight alive), or None where the
    kernels do not take it (fp16 or other dense dtypes, 3-bit groups of 16, non-contiguous tensors)."""
    if isinstance(weight, QuantizedWeight):
        tensors = (weight.packed, weight.scale, weight.zero, weight.meta)
        if not (_hqq_supported(weight.spec.bits, weight.spec.group_size)
                and all(t is None or (t.device.type == "cpu" and t.is_contiguous()) for t in tensors)):
            return None
        n, k = weight.shape
        return Matrix(HQQ, n, k, weight.spec.bits, weight.spec.group_size, weight.spec.meta_group_size,
                      weight.padded_rows, *(None if t is None else t.data_ptr() for t in tensors))
    storage = {torch.float32: DENSE_F32, torch.bfloat16: DENSE_BF16}.get(weight.dtype)
    if storage is None or weight.device.type != "cpu" or weight.dim() != 2 or not weight.is_contiguous():
        return None
    n, k = weight.shape
    return Matrix(storage, n, k, 0, 0, 0, n, weight.data_ptr(), None, None, None)


def _hqq_supported(bits: int, group_size: int) -> bool:
    """A group must be whole chunks: one word, or three at 3 bits (32 codes); 3-bit groups of 16 end mid-word."""
    return bits in (2, 4, 8) or (bits == 3 and group_size % 32 == 0)


def _dequantized(weight: QuantizedWeight | torch.Tensor) -> torch.Tensor:
    return weight.dequantize() if isinstance(weight, QuantizedWeight) else weight.float()


def _rows_of(x: torch.Tensor, k: int) -> torch.Tensor:
    """x (rows, K) on the CPU as contiguous fp32 (a copy only where it is not already)."""
    if x.dim() != 2 or x.shape[1] != k or x.device.type != "cpu":
        raise ValueError(f"expected x of shape (rows, {k}) on the CPU, got {list(x.shape)} on {x.device}")
    return x.float().contiguous()


def _thread_count(threads: int | None) -> int:
    if threads is None:
        return default_threads()
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    return threads


def _row_slices(rows: int) -> list[slice]:
    return [slice(start, min(start + MAX_ROWS, rows)) for start in range(0, rows, MAX_ROWS)]


def _address(tensor: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the compiled kernels, "") or (None, why not): built on the first call, then loaded from the cache."""
    if os.environ.get("MOE_OFFLOAD_CPU_KERNELS") == "torch":
        return None, "MOE_OFFLOAD_CPU_KERNELS=torch"
    compiler = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if compiler is None or shutil.which(compiler) is None:
        return None, f"no C compiler found ({compiler or 'cc, gcc, clang'}); install gcc or set CC"
    path = _cache_dir() / f"cpu_expert-{_build_key(compiler)}.so"
    try:
        if not path.exists():
            _compile(compiler, path)
        library = ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as error:
        return None, str(error)
    signature = [ctypes.c_void_p] * 2 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    library.moe_cpu_linear.argtypes = signature
    library.moe_cpu_swiglu.argtypes = [ctypes.c_void_p] * 2 + signature
    library.moe_cpu_linear.restype = library.moe_cpu_swiglu.restype = ctypes.c_int
    return library, ""


def _cache_dir() -> Path:
    if os.environ.get("MOE_OFFLOAD_CACHE"):
        return Path(os.environ["MOE_OFFLOAD_CACHE"]) / "cpu_kernels"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moe-offload" / "cpu_kernels"


def _build_key(compiler: str) -> str:
    """The source, the compiler and its flags, and the CPU (-march=native code may not run on another)."""
    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(repr((shutil.which(compiler), FLAGS, platform.machine(), _cpu_flags())).encode())
    return key.hexdigest()[:16]


def _cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line for line in lines if line.startswith(("flags", "Features"))), "")


def _compile(compiler: str, path: Path) -> None:
    """Build into a temporary file beside `path`, then rename it there: no reader ever sees half a library."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", temporary, "-lm"],
                                capture_output=True, text=True)
        if result.returncode:
            first_error = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip())
            raise RuntimeError(f"{compiler} could not build {SOURCE.name}: {first_error[:300]}")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
