"""Read an official MGVQ tokenizer file (`{"model": state_dict}`, or `ema` / `state_dict` entries, or a bare state
dict): its names are already MGVQ's."""
from __future__ import annotations

import torch


# Checkpoint entries that may hold the weights, in order of preference: EMA weights are what one samples with.
WEIGHT_KEYS = ("ema", "model", "state_dict")


def is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_official(blob: dict, path, weights: str = "auto") -> tuple[dict, str]:
    """The weights in an MGVQ checkpoint's contents `blob` (read from `path`): the first of `ema`, `model`,
    `state_dict`, or the blob itself if it is a bare state dict. Returns (state_dict, which)."""
    if weights != "auto":
        raise ValueError(f"weights={weights!r}: MGVQ files hold one set of weights (EMA first), use 'auto'")
    for key in WEIGHT_KEYS:
        if key in blob:
            if not is_state_dict(blob[key]):
                raise ValueError(f"{path}: entry {key!r} is not a state dict of tensors")
            return blob[key], key
    if is_state_dict(blob):
        return blob, "<file>"
    raise ValueError(f"{path}: no weights found; expected one of the keys {list(WEIGHT_KEYS)}, "
                     f"found {sorted(map(str, blob))[:10]}")
