"""The seam between the model's math and where its experts live.

The MoE block asks an `ExpertProvider` for the experts a step needs and computes with whatever
comes back; it never knows whether they were resident, streamed from host RAM or quantized.

    provider = ResidentExperts(experts_by_layer)          # all experts on the compute device
    for expert_id, expert in provider.experts(layer, [3, 5], residual):
        y = swiglu(expert, x)

An `Expert` holds three weights (w1 = gate, w3 = up, w2 = down, Mixtral's names). Each is either
a plain tensor of shape (out, in) or a quantized weight object with a `.linear(x)` method.

An `ExpertFormat` turns one expert into ONE contiguous byte buffer and back: `pack` writes the
buffer once (on the CPU), `view` reads an `Expert` out of a buffer on any device without copying.
Offloading moves these buffers; quantization is another format.

    fmt = DenseExpertFormat(config, torch.bfloat16)
    buffer = fmt.pack(expert)               # uint8 (fmt.nbytes,)
    expert = fmt.view(buffer.cuda())        # views into the device buffer
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch


class Expert(NamedTuple):
    w1: object  # gate projection, (ffn, hidden)
    w2: object  # down projection, (hidden, ffn)
    w3: object  # up projection, (ffn, hidden)


class ExpertFormat(Protocol):
    nbytes: int  # size of one expert's buffer

    def pack(self, expert: Expert) -> torch.Tensor:
        """A full-precision expert (CPU tensors) -> uint8 (nbytes,) CPU buffer."""
        ...

    def view(self, buffer: torch.Tensor) -> Expert:
        """uint8 (nbytes,) buffer on any device -> Expert whose weights are views into it."""
        ...


BUFFER_ALIGNMENT = 64  # bytes; every tensor in a packed buffer starts at a multiple of this


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lies inside a packed byte buffer."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer[self.offset:self.offset + self.nbytes].view(self.dtype).view(self.shape)


def lay_out(specs: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> tuple[list[TensorSlot], int]:
    """Place tensors of the given (shape, dtype) one after another, aligned; -> slots, total bytes."""
    slots, offset = [], 0
    for shape, dtype in specs:
        slot = TensorSlot(offset, tuple(shape), dtype)
        slots.append(slot)
        offset += -(-slot.nbytes // BUFFER_ALIGNMENT) * BUFFER_ALIGNMENT
    return slots, offset


class DenseExpertFormat:
    """w1, w2, w3 stored unquantized in `dtype`, one after another."""

    def __init__(self, hidden_size: int, expert_ffn: int, dtype: torch.dtype):
        shapes = ((expert_ffn, hidden_size), (hidden_size, expert_ffn), (expert_ffn, hidden_size))
        self.slots, self.nbytes = lay_out([(shape, dtype) for shape in shapes])

    def pack(self, expert: Expert) -> torch.Tensor:
        buffer = torch.zeros(self.nbytes, dtype=torch.uint8)
        for slot, weight in zip(self.slots, expert):
            slot.view(buffer).copy_(weight)
        return buffer

    def view(self, buffer: torch.Tensor) -> Expert:
        return Expert(*(slot.view(buffer) for slot in self.slots))


class ExpertProvider(Protocol):
    def experts(self, layer: int, expert_ids: Sequence[int], residual: torch.Tensor) -> Iterator[tuple[int, Expert]]:
        """Yield `(expert_id, Expert)` for every id in `expert_ids`, each ready to compute with.

        `residual` is the residual stream entering the MoE block of `layer`, (tokens, hidden);
        a provider may use it to guess the experts of later layers. The order of the yielded
        experts is the provider's choice; the model's result does not depend on it.
        """
        ...


class ResidentExperts:
    """Every expert of every MoE layer on the compute device."""

    def __init__(self, experts_by_layer: dict[int, list[Expert]]):
        self.experts_by_layer = experts_by_layer

    def experts(self, layer, expert_ids, residual):
        layer_experts = self.experts_by_layer[layer]
        for expert_id in expert_ids:
            yield expert_id, layer_experts[expert_id]
