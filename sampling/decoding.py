"""What a generation attaches to a model, and detaches after (sampling.generate): KV caches and, on a CPU with
oneDNN, the packed weights and one-query attention of gpt.packed. Both are kept per model between generations
(weakly: the model may go), so a compiled step sees the same buffers and modules batch after batch (CUDA graphs
re-record on new addresses, dynamo re-traces on new modules) and packs are made once while the weights hold."""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch.nn as nn

from gpt.layers import Attention, KVCache
from gpt.packed import CPUKVCache, Packs, packing_available


@dataclass
class _Kept:
    packs: Packs | None = None
    key: tuple | None = None  # (batch, dtype, device) of the caches
    caches: list = field(default_factory=list)


_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def attach(model: nn.Module, batch: int) -> None:
    """Attach KV caches for `batch` rows (the last generation's, where batch, dtype and device match) and, on a
    CPU with oneDNN, the packs (made under the caller's autocast: bfloat16 ones under CPU bfloat16 autocast)."""
    kept = _KEPT.setdefault(model, _Kept())
    weight = next(model.parameters())
    cpu = weight.device.type == "cpu"
    if cpu and packing_available():
        kept.packs = kept.packs or Packs(model)
        kept.packs.attach()
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    key = (batch, weight.dtype, weight.device)
    if kept.key == key:
        for attention, cache in zip(attentions, kept.caches):
            attention.kv_cache = cache
        return
    model.setup_cache(batch, cache=CPUKVCache if cpu else KVCache)
    kept.key, kept.caches = key, [attention.kv_cache for attention in attentions]


def detach(model: nn.Module) -> None:
    """The model as it was before `attach`: no caches, no packs."""
    kept = _KEPT.get(model)
    if kept is not None and kept.packs is not None:
        kept.packs.detach()
    model.clear_cache()
