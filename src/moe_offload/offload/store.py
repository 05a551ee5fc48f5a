"""The host tier: every expert's packed bytes, in (pinned) RAM, the overflow memory-mapped from disk.

    store = ExpertStore(layers=[0, 1], num_experts=8, nbytes=fmt.nbytes, ram_experts=12, pin=True)
    store.write(0, 3, fmt.pack(expert))      # once, at load time
    buffer = store.buffer(0, 3)              # uint8 (nbytes,): a view, pinned when in RAM and pin=True

Each expert is ONE contiguous buffer of `nbytes` (the ExpertFormat's packing: dense or quantized,
the store does not care), so a load is a single copy. The RAM tier holds one tensor per layer,
(experts, nbytes), page-locked with cudaHostRegister rather than allocated pinned: PyTorch's pinned
allocator rounds every block up to a power of two, which would waste up to half of the RAM budget.
The first `ram_experts` experts in (layer, expert) order live in RAM; the rest are written to a
file in `disk_dir`, memory-mapped, and the file unlinked at once, so nothing is left on disk when
the process ends. Disk reads go through the page cache, which the kernel may drop under pressure.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import UserError


class ExpertStore:
    def __init__(self, layers: Sequence[int], num_experts: int, nbytes: int, ram_experts: int | None = None,
                 pin: bool = False, disk_dir: str | os.PathLike | None = None):
        self.nbytes = nbytes
        self.layers, self.num_experts = list(layers), num_experts
        total = len(layers) * num_experts
        ram_experts = total if ram_experts is None else max(0, min(ram_experts, total))
        self.ram_experts, self.disk_experts = ram_experts, total - ram_experts
        self.pinned = pin
        self._buffers: dict[tuple[int, int], torch.Tensor] = {}
        self._ram_tensors = []
        disk = self._map_disk_file(disk_dir) if self.disk_experts else None
        index = 0
        for layer in layers:
            in_ram = min(num_experts, max(0, ram_experts - index))
            if in_ram:
                ram = torch.empty((in_ram, nbytes), dtype=torch.uint8)
                if pin:
                    _register(ram)
                self._ram_tensors.append(ram)
            for expert in range(num_experts):
                if expert < in_ram:
                    self._buffers[layer, expert] = ram[expert]
                else:
                    offset = (index + expert - ram_experts) * nbytes
                    self._buffers[layer, expert] = disk[offset:offset + nbytes]
            index += num_experts

    @property
    def ram_bytes(self) -> int:
        return self.ram_experts * self.nbytes

    @property
    def disk_bytes(self) -> int:
        return self.disk_experts * self.nbytes

    def buffer(self, layer: int, expert: int) -> torch.Tensor:
        return self._buffers[layer, expert]

    def write(self, layer: int, expert: int, data: torch.Tensor) -> None:
        if data.dtype != torch.uint8 or data.numel() != self.nbytes:
            raise ValueError(f"expert ({layer}, {expert}): expected a uint8 buffer of {self.nbytes} bytes, "
                             f"got {data.dtype} of {data.numel()}")
        self._buffers[layer, expert].copy_(data)

    def _map_disk_file(self, disk_dir) -> torch.Tensor:
        folder = Path(disk_dir) if disk_dir is not None else Path(tempfile.gettempdir())
        size = self.disk_experts * self.nbytes
        try:
            fd, path = tempfile.mkstemp(prefix="moe-offload-experts-", suffix=".bin", dir=folder)
            try:
                os.ftruncate(fd, size)
                mapped = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
            finally:
                os.close(fd)
                os.unlink(path)   # the mapping keeps the data; nothing is left behind on exit
        except OSError as e:
            raise UserError(f"--offload-dir {folder}: cannot create a {size / 2**30:.2f} GiB expert file there ({e}); "
                            f"pick a folder with room, or raise --cpu-memory") from None
        return mapped


def _register(tensor: torch.Tensor) -> None:
    """Page-lock `tensor`'s memory for fast asynchronous host-to-device copies, until it is freed."""
    cudart = torch.cuda.cudart()
    ptr, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    err = cudart.cudaHostRegister(ptr, size, 0)
    if int(err) != 0:
        raise UserError(f"cannot page-lock {size / 2**30:.2f} GiB of host memory for experts (CUDA error {int(err)}); "
                        f"lower --cpu-memory")
    weakref.finalize(tensor, cudart.cudaHostUnregister, ptr)
