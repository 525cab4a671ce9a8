"""One precision vocabulary for every stage: fp32 | bf16 | fp16, and what each means to torch and accelerate."""
from __future__ import annotations

import torch

from tokenizer.common.errors import ConfigError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(name: str, allowed: tuple[str, ...] = tuple(PRECISIONS)) -> str:
    if name not in allowed:
        raise ConfigError(f"precision={name!r}: expected one of {list(allowed)}")
    return name


def autocast_dtype(name: str) -> torch.dtype | None:
    """The autocast dtype of a precision name (None: no autocast, float32)."""
    return PRECISIONS[check_precision(name)]


def accelerate_precision(name: str) -> str:
    """accelerate's `mixed_precision` value: fp32 -> 'no'."""
    return "no" if check_precision(name) == "fp32" else name
