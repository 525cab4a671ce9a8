"""Tokenizer families: one architecture dataclass, one nn.Module and one reader of its official files each.

Every family's module has the surface of tokenizer.MGVQ: encode_codes (B, 3, H, W) -> (B, h, w, G) int64,
decode_codes(codes, groups_to_use=None), codebook() (None where the GPT embeds codes itself), and a config with
downsample, codebook_groups and codes_per_group (an int, or one int per group).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from tokenizer import loading, magvit2
from tokenizer.config import MGVQConfig
from tokenizer.model import MGVQ


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type
    model_cls: type
    read_weights: Callable  # (path, weights: "auto"|"ema"|"raw") -> (state_dict in model_cls's key names, which)


def _read_mgvq(path, weights: str = "auto") -> tuple[dict, str]:
    if weights != "auto":
        raise ValueError(f"weights={weights!r}: MGVQ files hold one set of weights (EMA first), use 'auto'")
    return loading.pick_state_dict(torch.load(path, map_location="cpu", weights_only=True), path)


FAMILIES: dict[str, Family] = {
    "mgvq": Family("mgvq", MGVQConfig, MGVQ, _read_mgvq),
    "open_magvit2": Family("open_magvit2", magvit2.Magvit2Config, magvit2.OpenMagvit2, magvit2.read_weights),
}


def group_sizes(config) -> list[int]:
    """Codes per group of a tokenizer config, one entry per group."""
    per_group = config.codes_per_group
    return list(per_group) if isinstance(per_group, (list, tuple)) else [per_group] * config.codebook_groups


def load_tokenizer(path: str | os.PathLike, config: Any = None, family: str = "mgvq", weights: str = "auto",
                   map_location="cpu") -> torch.nn.Module:
    """A tokenizer of `family` from `path` in eval mode with gradients off; keys and shapes must match exactly.

    MGVQ files may store their config (see tokenizer.loading.load_tokenizer); the official files of the other
    families do not, so `config` (the family's dataclass or a dict of its fields) is required for them.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tokenizer family {family!r}; expected one of {sorted(FAMILIES)}")
    fam = FAMILIES[family]
    if family == "mgvq":
        if weights != "auto":
            raise ValueError(f"weights={weights!r}: MGVQ files hold one set of weights (EMA first), use 'auto'")
        return loading.load_tokenizer(path, config, map_location)
    if config is None:
        raise ValueError(f"{path}: an official {family} checkpoint stores no config: pass one, e.g. "
                         f"{fam.config_cls.__name__}.preset(...)")
    if isinstance(config, dict):
        config = fam.config_cls.from_dict(config)
    state_dict, which = fam.read_weights(path, weights)
    with torch.device("meta"):
        model = fam.model_cls(config)
    loading.check_state_dict(model, state_dict, f"{path} ({which} weights)")
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(map_location).eval().requires_grad_(False)
