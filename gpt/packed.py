"""CPU decoding at the memory-bandwidth limit: linear layers through packed copies of their weights.

A cached decoding step multiplies a few rows by every weight matrix, so its cost is the time to read the weights.
At 8 rows on an x86 CPU, F.linear (x @ W^T) reads float32 weights at about 12 GB/s and MKL's packed GEMM at about
19 GB/s; under bfloat16 autocast, F.linear casts every weight at every call, and a oneDNN-packed bfloat16 copy
halves what is read instead (`scripts/bench.py sample` prints the figures). `GPT.setup_cache` attaches packs (CPU
weights in float32, MKL present; the bfloat16 kind when it runs under CPU bfloat16 autocast) and `clear_cache`
detaches them, so training and autograd never meet them; a pack is remade when its weight has changed since.
Results equal F.linear's to rounding (another summation order), not bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_PACK_ROWS = 256  # MKL's packing hint (best of 8..1024 at 2..64 rows here); a pack serves any row count


def _mkl_linear(x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
    return torch.ops.mkl._mkl_linear(x, packed, weight, bias, x.numel() // x.shape[-1])


@torch.library.custom_op("gpt::mkl_linear", mutates_args=())
def _mkl_linear_op(x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                   ) -> torch.Tensor:
    """The packed GEMM as an opaque op for torch.compile: inductor lowers MKL's own op only for packs it made."""
    return _mkl_linear(x, packed, weight, bias)


@_mkl_linear_op.register_fake
def _(x, packed, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _bf16_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None
           ) -> torch.Tensor:
    """F.linear(x, weight, bias), through `packed` (a packed copy of `weight`) in inference where it applies."""
    if packed is None or torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    if packed.dtype == torch.bfloat16:  # oneDNN, eager only: a compiled graph does not take oneDNN's opaque tensors
        if not _bf16_autocast() or torch.compiler.is_compiling():
            return F.linear(x, weight, bias)
        bias = None if bias is None else bias.to(torch.bfloat16)
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), packed, bias, "none", [], "")
    if x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        return _mkl_linear_op(x, packed, weight, bias)
    return _mkl_linear(x, packed, weight, bias)


class WeightPack:
    """The packed copy of one weight matrix, kept while the weight is unchanged (same storage and version) and
    the kind fits: float32 for MKL, or bfloat16 for oneDNN when made under CPU bfloat16 autocast."""

    def __init__(self):
        self.key, self.packed = None, None

    def get(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The pack of `weight` (a 2-D float32 CPU tensor, or a row slice of one), or None where none applies."""
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            return None
        bf16 = _bf16_autocast()
        if bf16 and not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return None
        if not bf16 and not torch.backends.mkl.is_available():
            return None
        key = (weight.data_ptr(), tuple(weight.shape), weight._version, bf16)
        if key != self.key:
            self.key, self.packed = key, None  # free the old pack before making the new one
            w = weight.detach().contiguous()
            self.packed = (torch.ops.mkldnn._reorder_linear_weight(w.to(torch.bfloat16), _PACK_ROWS) if bf16 else
                           torch.ops.mkl._mkl_reorder_linear_weight(w, _PACK_ROWS))
        return self.packed

    def clear(self) -> None:
        self.key, self.packed = None, None

    # A pack is a cache (and MKL's and oneDNN's opaque tensors can't be copied): a copy starts empty.
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
