"""CPU decoding at the memory-bandwidth limit: linear layers through packed copies of their weights, and one
query's attention as plain matmuls in compiled steps. Attached to a model from outside (gpt-fast's quantize.py
style): `Packs(model).attach()` swaps modules for packed twins that share their parameters, `detach()` puts the
originals back; the model's own files never mention packs.

A cached decoding step multiplies a few rows by every weight matrix, so its cost is the time to read the weights.
At 8 rows on an x86 CPU, F.linear (x @ W^T) reads float32 weights at about 12 GB/s and oneDNN's packed GEMM at
about 18; under bfloat16 autocast, F.linear casts every weight at every call, and a packed bfloat16 copy halves
what is read instead (`scripts/bench.py sample` prints the figures). sampling.decoding attaches packs for a
generation (CPU weights in float32, oneDNN present; the bfloat16 kind when it runs under CPU bfloat16 autocast)
and detaches them after, so training and autograd never meet them; a pack is remade when its weight has changed
since. One pack may hold several weights stacked (the SwiGLU's w1 and w3: one GEMM instead of two). Results
equal F.linear's to rounding (another summation order), not bit for bit.
"""
from __future__ import annotations

import functools
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.heads import ParallelHead
from gpt.layers import FeedForward, KVCache

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


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of one query row per head over every given key: q (B, H, 1, D), k and v (B, H_kv, n, D), H a
    multiple of H_kv -> (B, H, 1, D). Two batched matmuls and a softmax, which inductor fuses into one loop over
    the cached keys: in a step compiled for a CPU that beats SDPA's flash kernel (GPT-B, 8 rows, 129 keys: 12
    layers in 6.8 against 7.7 ms), while eager calls are fewer through SDPA. The query heads sharing a key head
    go in as rows of one matmul. The softmax's sum divides the output, not the weights (as flash attention
    does): written as softmax-then-matmul, inductor's pattern matcher would turn it back into the flash kernel."""
    B, H, _, D = q.shape
    q = q.reshape(B, k.shape[1], H // k.shape[1], D)
    scores = q @ k.transpose(-1, -2) * D ** -0.5  # (B, H_kv, H/H_kv, n)
    weights = (scores - scores.amax(dim=-1, keepdim=True)).exp()
    out = (weights.type_as(v) @ v) / weights.sum(dim=-1, keepdim=True).type_as(v)
    return out.reshape(B, H, 1, D)


class CPUKVCache(KVCache):
    """A KV cache whose exactly causal one-query reads (a decoding step's) run `one_query_attention` in compiled
    graphs."""

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None and q.shape[2] == 1 and torch.compiler.is_compiling():
            return one_query_attention(q, k, v)
        return super().attention(q, k, v, mask)


class PackedLinear(nn.Linear):
    """The twin of an nn.Linear (the same weight and bias Parameters) that runs through a pack of its weight."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.pack, self.packed = WeightPack(), None

    def refresh(self) -> None:
        """Take the pack of the current weight (made now, or kept from before)."""
        self.packed = self.pack.get(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)


class PackedFeedForward(FeedForward):
    """The twin of a FeedForward (its w1, w3 and dropout, w2 as a PackedLinear) that runs w1 and w3 as one GEMM
    through a pack of both stacked."""

    def __init__(self, ff: FeedForward):
        nn.Module.__init__(self)
        self.w1, self.w3, self.w2, self.ffn_dropout = ff.w1, ff.w3, PackedLinear(ff.w2), ff.ffn_dropout
        self.pack, self.packed = WeightPack(), None

    def refresh(self) -> None:
        self.packed = self.pack.get(self.w1.weight, self.w3.weight)
        self.w2.refresh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not serves(self.packed, x):
            return super().forward(x)
        gate, up = packed_linear(x, self.packed, None).chunk(2, dim=-1)
        return self.ffn_dropout(self.w2(F.silu(gate) * up))


class PackedParallelHead(ParallelHead):
    """The twin of a ParallelHead (its proj) whose cached steps run each group's rows through a pack of them."""

    def __init__(self, head: ParallelHead):
        nn.Module.__init__(self)
        self.sizes, self.bounds, self.proj = head.sizes, head.bounds, head.proj
        self.packs, self.packed = [WeightPack() for _ in self.sizes], [None] * len(self.sizes)

    def refresh(self) -> None:
        self.packed = [pack.get(self.rows(g)) for g, pack in enumerate(self.packs)]

    def sub_logits(self, h: torch.Tensor, g: int, prev_sub, embed) -> torch.Tensor:
        return linear(h, self.rows(g), None, self.packed[g]).float()  # (B, V_g)


def _twin(module: nn.Module) -> nn.Module | None:
    """The packed twin of a module, or None where it has none (its children may have)."""
    if isinstance(module, FeedForward):
        return PackedFeedForward(module)
    if isinstance(module, ParallelHead):
        return PackedParallelHead(module)
    if type(module) is nn.Linear:
        return PackedLinear(module)
    return None


class Packs:
    """The packed twins of a model's linear layers, made once, swapped in by `attach` and out by `detach`. Keep
    one per model: its packs (and the twins a compiled step was traced with) carry over between generations. It
    holds the parents weakly (the model itself is one), so keeping it does not keep the model alive."""

    def __init__(self, model: nn.Module):
        self.swaps: list[tuple[weakref.ref, str, nn.Module, nn.Module]] = []  # (parent, name, original, twin)
        self._collect(model)

    def _collect(self, module: nn.Module) -> None:
        for name, child in module.named_children():
            twin = _twin(child)
            if twin is None:
                self._collect(child)
            else:
                self.swaps.append((weakref.ref(module), name, child, twin))

    def attach(self) -> None:
        for parent, name, _, twin in self.swaps:
            twin.refresh()
            setattr(parent(), name, twin)

    def detach(self) -> None:
        for parent, name, original, _ in self.swaps:
            setattr(parent(), name, original)
