"""The seam between the model's math and where its experts live.

The MoE block asks an `ExpertProvider` for the experts of a step's routing and computes with
whatever comes back; it never knows whether they were resident, streamed from host RAM or quantized.

    provider = ResidentExperts(fmt, {layer: ExpertSlots(fmt, num_experts, slot_stride(fmt.nbytes), device)})
    for batch in provider.experts(layer, ids, residual, x):    # ids: (tokens, top_k) on the device
        ...   # batch.memory: the layer's slots; batch.slots: each (token, choice) pair's slot;
              # batch.computed: pairs a provider computed elsewhere (the CPU, offload/cpu_tier.py)

An `Expert` holds three weights (w1 = gate, w3 = up, w2 = down, Mixtral's names). Each is either
a plain tensor of shape (out, in) or a weight object with a `.linear(x)` method: quantized, or
`Biased` (gpt-oss's experts carry a bias on each matrix).

An `ExpertFormat` turns one expert into ONE contiguous byte buffer and back: `pack` writes the
buffer once (on the CPU), `view` reads an `Expert` out of a buffer on any device without copying.
Offloading moves these buffers; quantization is another format. A layer's experts on the device
sit in one (slots, stride) buffer (`ExpertSlots`), so that a format with grouped kernels can run
every expert of a decode step in one launch per matrix, reading the slot of each from a device table.

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
import torch.nn.functional as F


class Expert(NamedTuple):
    w1: object  # gate projection, (ffn, hidden)
    w2: object  # down projection, (hidden, ffn)
    w3: object  # up projection, (ffn, hidden)


@dataclass(frozen=True)
class Biased:
    """A weight (a tensor (out, in) or a quantized weight) and its bias (out,): `.linear(x)` is x W^T + b, the bias
    added in x's dtype."""

    weight: object
    bias: torch.Tensor

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.weight, torch.Tensor):
            return F.linear(x, self.weight, self.bias.to(x.dtype))
        y = self.weight.linear(x)
        return y + self.bias.to(y.dtype)


def split_biases(expert: Expert) -> tuple[list, list[torch.Tensor]]:
    """An expert of Biased weights -> its three weights and its three biases (none for unbiased experts)."""
    weights = [w.weight if isinstance(w, Biased) else w for w in expert]
    return weights, [w.bias for w in expert if isinstance(w, Biased)]


def with_biases(weights: Sequence, biases: Sequence[torch.Tensor]) -> Expert:
    """split_biases' inverse."""
    return Expert(*(Biased(w, b) for w, b in zip(weights, biases))) if biases else Expert(*weights)


def bias_shapes(hidden_size: int, expert_ffn: int) -> tuple[tuple[int], ...]:
    """The biases of w1, w2, w3."""
    return (expert_ffn,), (hidden_size,), (expert_ffn,)


class ExpertFormat(Protocol):
    nbytes: int  # size of one expert's buffer

    def pack(self, expert: Expert) -> torch.Tensor:
        """A full-precision expert (CPU tensors) -> uint8 (nbytes,) CPU buffer."""
        ...

    def view(self, buffer: torch.Tensor) -> Expert:
        """uint8 (nbytes,) buffer on any device -> Expert whose weights are views into it."""
        ...

    def runs_grouped(self, x: torch.Tensor, top_k: int) -> bool:
        """Whether `grouped_swiglu` serves a step of these tokens x (tokens, hidden) here."""
        ...

    def grouped_swiglu(self, batch: "ExpertBatch", x: torch.Tensor, top_k: int) -> torch.Tensor:
        """Every (token, choice) pair's SwiGLU at once, each from the slot `batch.slots` gives it (on the device):
        x (tokens, hidden) -> (tokens * top_k, hidden), pair p from token p // top_k."""
        ...


BUFFER_ALIGNMENT = 64  # bytes; every tensor in a packed buffer starts at a multiple of this
SLOT_ALIGNMENT = 512   # bytes: a slot starts where a fresh CUDA allocation would, so kernels
                       # that pick their algorithm by alignment do what they do on a lone buffer


def slot_stride(expert_nbytes: int) -> int:
    """Bytes between consecutive expert slots of a layer."""
    return -(-expert_nbytes // SLOT_ALIGNMENT) * SLOT_ALIGNMENT


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
    """w1, w2, w3 (then their biases, with `biases`) stored unquantized in `dtype`, one after another."""

    def __init__(self, hidden_size: int, expert_ffn: int, dtype: torch.dtype, biases: bool = False):
        shapes = ((expert_ffn, hidden_size), (hidden_size, expert_ffn), (expert_ffn, hidden_size))
        shapes += bias_shapes(hidden_size, expert_ffn) if biases else ()
        self.slots, self.nbytes = lay_out([(shape, dtype) for shape in shapes])

    def pack(self, expert: Expert) -> torch.Tensor:
        buffer = torch.zeros(self.nbytes, dtype=torch.uint8)
        weights, biases = split_biases(expert)
        for slot, tensor in zip(self.slots, weights + biases):
            slot.view(buffer).copy_(tensor)
        return buffer

    def view(self, buffer: torch.Tensor) -> Expert:
        views = [slot.view(buffer) for slot in self.slots]
        return with_biases(views[:3], views[3:])

    def runs_grouped(self, x: torch.Tensor, top_k: int) -> bool:
        return False

    def grouped_swiglu(self, batch, x, top_k):
        raise NotImplementedError("dense experts run one expert at a time")


class Computed(NamedTuple):
    """Products of a step's pairs that the provider computed elsewhere (on the CPU), already on the device."""

    rows: torch.Tensor                  # (pairs, hidden): pair p's product in row p
    mask: torch.Tensor | None           # bool (pairs,): the rows to take over the slots' products; None: every row
                                        # (the layer has no slots)


class ExpertBatch(NamedTuple):
    """Experts of one MoE step that are ready together, in the layer's slot buffer.

    The step's (token, choice) pairs are numbered token-major (pair p is token p // top_k's choice p % top_k);
    a batch serves all of them (`pairs` None) or some (`pairs`), each from the slot that holds its expert, but
    for the pairs of `computed` (their products come with the batch)."""

    memory: torch.Tensor | None         # uint8 (slots, stride): the layer's expert slots, one buffer
    experts: Sequence[Expert] | None    # slot -> an Expert viewing that slot (made once)
    slots: torch.Tensor | None          # int32 (pairs,) on the device: each pair's slot, for the grouped kernels
    host_slots: list[int] | None        # the same on the host, where the provider knows it (None: read `slots`)
    pairs: torch.Tensor | None = None   # int64 (pairs,) on the device: the step's pairs this batch serves
    computed: Computed | None = None    # pairs whose products were computed elsewhere (with `pairs` None)


class ExpertProvider(Protocol):
    expert_format: "ExpertFormat"

    def experts(self, layer: int, ids: torch.Tensor, residual: torch.Tensor,
                x: torch.Tensor) -> Iterator[ExpertBatch]:
        """Yield batches that cover every (token, choice) pair of `ids` (int64 (tokens, top_k), on the device),
        each batch ready to compute with when it is yielded and until the next is asked for.

        `residual` is the residual stream entering the MoE block of `layer`, (tokens, hidden); a provider may
        use it to guess the experts of later layers. `x` (tokens, hidden) is the experts' input: a provider may
        compute some pairs itself (ExpertBatch.computed). The model's result does not depend on how the pairs are
        split into batches nor on their order.
        """
        ...

    def slot_experts(self, layer: int) -> dict[int, int]:
        """Slot -> the expert it holds, valid while a batch of `layer` is being computed with (LoRA's per-expert
        adapters find their expert by it, lora.py)."""
        ...


class ExpertSlots:
    """A layer's expert slots on the compute device: ONE tensor (slots, stride), and an Expert viewing each slot."""

    def __init__(self, expert_format: ExpertFormat, count: int, stride: int, device):
        self.memory = torch.empty((count, stride), dtype=torch.uint8, device=device)
        self.experts = [expert_format.view(self.memory[slot, :expert_format.nbytes]) for slot in range(count)]


class ResidentExperts:
    """Every expert of every MoE layer on the compute device: slot e of a layer holds expert e, so the router's
    ids are the slots and a step needs nothing from the host."""

    def __init__(self, expert_format: ExpertFormat, slots_by_layer: dict[int, ExpertSlots]):
        self.expert_format = expert_format
        self.slots_by_layer = slots_by_layer
        self.graph = None     # set while a CUDA graph captures a step (step.py); a resident step needs no cut

    def holds_at_once(self, experts: int, tokens: int) -> bool:
        return True

    def slot_experts(self, layer: int) -> dict[int, int]:
        """Slot -> the expert it holds: slot e, expert e."""
        return dict(enumerate(range(len(self.slots_by_layer[layer].experts))))

    def experts(self, layer, ids, residual, x):
        slots = self.slots_by_layer[layer]
        yield ExpertBatch(slots.memory, slots.experts, ids.flatten().to(torch.int32), None)
