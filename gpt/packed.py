"""CPU decoding at the memory-bandwidth limit: linear layers through packed copies of their weights.

A cached decoding step multiplies a few rows by every weight matrix, so its cost is the time to read the weights.
At 8 rows on an x86 CPU, F.linear (x @ W^T) reads float32 weights at about 12 GB/s and oneDNN's packed GEMM at
about 18; under bfloat16 autocast, F.linear casts every weight at every call, and a packed bfloat16 copy halves
what is read instead (`scripts/bench.py sample` prints the figures). `GPT.setup_cache` attaches packs (CPU weights
in float32, oneDNN present; the bfloat16 kind when it runs under CPU bfloat16 autocast) and `clear_cache` detaches
them, so training and autograd never meet them; a pack is remade when its weight has changed since. One pack may
hold several weights stacked (the SwiGLU's w1 and w3: one GEMM instead of two). Results equal F.linear's to
rounding (another summation order), not bit for bit.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

_PACK_ROWS = 64  # oneDNN's row-count hint (8..256 within 5% at 8..128 rows here); a pack serves any row count
# oneDNN's packing ops are private to torch (torch.ops.mkldnn._*): where a torch lacks any of them, nothing is
# packed and every layer runs through F.linear, with the same results.
_ONEDNN_OPS = ("_reorder_linear_weight", "_linear_pointwise", "_is_mkldnn_bf16_supported")


@functools.cache
def packing_available() -> bool:
    """oneDNN is built in and this torch has every op the packs need."""
    return torch.backends.mkldnn.is_available() and all(hasattr(torch.ops.mkldnn, op) for op in _ONEDNN_OPS)


def _onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


# The packed GEMM as an op of our own for torch.compile: inductor lowers oneDNN's op only for weights it packed
# itself (frozen constants). A plain library op (not torch.library.custom_op) keeps its dispatch at a few
# microseconds, which matters at about 60 GEMMs per decoding step.
_LIB = torch.library.Library("gpt", "FRAGMENT")
_LIB.define("packed_linear(Tensor x, Tensor packed, Tensor? bias) -> Tensor")
_LIB.impl("packed_linear", _onednn_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("gpt::packed_linear")
def _(x, packed, bias):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


def _bf16_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def serves(packed: torch.Tensor | None, x: torch.Tensor) -> bool:
    """Whether `packed` may compute a linear layer on x here: inference only (a pack has no backward); a float32
    pack for float32 x outside autocast, a bfloat16 pack under CPU bfloat16 autocast (F.linear's own dtypes)."""
    if packed is None or torch.is_grad_enabled():
        return False
    if packed.dtype == torch.bfloat16:
        return _bf16_autocast()
    return x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T + bias through the pack of W; the caller checked `serves(packed, x)`."""
    if packed.dtype == torch.bfloat16:
        x, bias = x.to(torch.bfloat16), None if bias is None else bias.to(torch.bfloat16)
    if torch.compiler.is_compiling():
        return torch.ops.gpt.packed_linear(x, packed, bias)
    return _onednn_linear(x, packed, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None
           ) -> torch.Tensor:
    """F.linear(x, weight, bias), through `packed` (a packed copy of `weight`) where it serves."""
    return packed_linear(x, packed, bias) if serves(packed, x) else F.linear(x, weight, bias)


class WeightPack:
    """The packed copy of one weight matrix (or of several stacked along the output rows), kept while the
    weights are unchanged (same storage and version) and the kind fits: float32, or bfloat16 when made under
    CPU bfloat16 autocast."""

    def __init__(self):
        self.key, self.packed = None, None

    def get(self, *weights: torch.Tensor) -> torch.Tensor | None:
        """The pack of `weights` (2-D float32 CPU tensors of one width, or row slices of them), stacked in
        order; None where none applies (another device or dtype, no oneDNN)."""
        if any(w.device.type != "cpu" or w.dtype != torch.float32 for w in weights):
            return None
        if not packing_available():
            return None
        bf16 = _bf16_autocast()
        if bf16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return None
        key = tuple((w.data_ptr(), tuple(w.shape), w._version) for w in weights) + (bf16,)
        if key != self.key:
            self.key, self.packed = key, None  # free the old pack before making the new one
            w = torch.cat([w.detach() for w in weights]) if len(weights) > 1 else weights[0].detach().contiguous()
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w.to(torch.bfloat16) if bf16 else w, _PACK_ROWS)
        return self.packed

    def clear(self) -> None:
        self.key, self.packed = None, None

    # A pack is a cache (and oneDNN's opaque tensors can't be copied): a copy starts empty.
    def __deepcopy__(self, memo) -> WeightPack:
        return WeightPack()

    def __getstate__(self) -> dict:
        return {"key": None, "packed": None}


class Linear(nn.Linear):
    """nn.Linear that runs through a packed copy of its weight while one is attached (`attach_pack`)."""

    packed: torch.Tensor | None = None
    _pack: WeightPack | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)

    def attach_pack(self, on: bool, keep: bool = True) -> None:
        """on: attach the pack of the current weight (made now, or kept from before); off: detach it, keeping it
        for the next attach unless `keep` is False."""
        if self._pack is None:
            self._pack = WeightPack()
        self.packed = self._pack.get(self.weight) if on else None
        if not on and not keep:
            self._pack.clear()
