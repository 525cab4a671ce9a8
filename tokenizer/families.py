"""Tokenizer families: one architecture dataclass, one nn.Module and one reader of its official files each.

Every family's module has the surface of tokenizer.MGVQ: encode_codes (B, 3, H, W) -> (B, h, w, G) int64,
decode_codes(codes, groups_to_use=None), codebook(), and a config with downsample, codebook_groups and
codes_per_group (an int, or one int per group). A family's `read_weights(path, weights)` returns the official
file's weights in its module's key names and which entry it took (`weights`: auto = what the official AR
sampler decodes with, ema or raw).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from tokenizer import loading, magvit2
from tokenizer.common.errors import ConfigError, DamagedFileError, LayoutError
from tokenizer.config import MGVQConfig
from tokenizer.model import MGVQ
from tokenizer.vqgan import PRESETS as VQGAN_PRESETS
from tokenizer.vqgan import VQGAN, VQGANConfig
from tokenizer.vqgan_weights import read_ibq, read_llamagen
from tokenizer.common.io import load_weights_file


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type
    model_cls: type
    read_weights: Callable  # (path, weights: "auto"|"ema"|"raw") -> (state_dict in model_cls's key names, which)
    check_config: Callable | None = None  # raises ValueError when a config does not belong to the family


def _read_mgvq(path, weights: str = "auto") -> tuple[dict, str]:
    if weights != "auto":
        raise ConfigError(f"weights={weights!r}: MGVQ files hold one set of weights (EMA first), use 'auto'")
    return loading.pick_state_dict(load_weights_file(path, "tokenizer checkpoint"), path)


def _quantizer_is(kind: str, family: str) -> Callable:
    def check(config) -> None:
        if getattr(config, "quantizer", None) != kind:
            raise ConfigError(f"family {family!r} has quantizer={kind!r}, the config says "
                             f"{getattr(config, 'quantizer', None)!r}: pass a {family} preset")
    return check


FAMILIES: dict[str, Family] = {
    "mgvq": Family("mgvq", MGVQConfig, MGVQ, _read_mgvq),
    "open_magvit2": Family("open_magvit2", magvit2.Magvit2Config, magvit2.OpenMagvit2, magvit2.read_weights),
    "llamagen_vq": Family("llamagen_vq", VQGANConfig, VQGAN, read_llamagen, _quantizer_is("cosine", "llamagen_vq")),
    "ibq": Family("ibq", VQGANConfig, VQGAN, read_ibq, _quantizer_is("dot", "ibq")),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"unknown tokenizer family {name!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of(config) -> str:
    """The family name of an architecture config (or of a built tokenizer module, by its config)."""
    config = getattr(config, "config", config)
    if isinstance(config, VQGANConfig):  # one architecture class, two families
        return "llamagen_vq" if config.quantizer == "cosine" else "ibq"
    for fam in FAMILIES.values():
        if type(config) is fam.config_cls:
            return fam.name
    raise ValueError(f"{type(config).__name__} is not the config of any tokenizer family {sorted(FAMILIES)}")


def named_refs() -> dict:
    """Every family's presets as hydra `tokenizer` group nodes: TokenizerRef(config=arch, family=...)."""
    from tokenizer.config import TokenizerRef

    archs = {**MGVQConfig.named_presets(), **magvit2.Magvit2Config.named_presets(),
             **{name: VQGANConfig.preset(name) for name in VQGAN_PRESETS}}
    return {name: TokenizerRef(config=arch, family=family_of(arch)) for name, arch in archs.items()}


def group_sizes(config) -> list[int]:
    """Codes per group of a tokenizer config, one entry per group."""
    per_group = config.codes_per_group
    return list(per_group) if isinstance(per_group, (list, tuple)) else [per_group] * config.codebook_groups


def _key_layout(keys) -> set[str]:
    """Weight names with their block indices masked (`encoder.down.#.block.#.conv1.weight`): what a family's
    layout fixes, whatever the depth of a preset."""
    return {re.sub(r"\.\d+(?=\.)", ".#", k) for k in keys}


def fitting_families(path: str | os.PathLike, but: str) -> list[str]:
    """The families other than `but` whose official reader takes the file `path` and one of whose presets has
    exactly its key layout: the families the file belongs to (empty when none)."""
    fits = []
    for name, ref in named_refs().items():
        if ref.family == but or ref.family in fits:
            continue
        try:
            state_dict, _ = FAMILIES[ref.family].read_weights(path, "auto")
        except (ValueError, KeyError, RuntimeError):
            continue
        with torch.device("meta"):
            model = FAMILIES[ref.family].model_cls(ref.config)
        if _key_layout(state_dict) == _key_layout(model.state_dict()):
            fits.append(ref.family)
    return fits


def load_tokenizer(path: str | os.PathLike, config: Any = None, family: str = "mgvq", weights: str = "auto",
                   map_location="cpu") -> torch.nn.Module:
    """A tokenizer of `family` from `path` in eval mode with gradients off; keys and shapes must match exactly
    (tokenizer.loading.load_tokenizer). `config`: the family's dataclass or a dict of its fields; None reads the
    config this project's files store (official files store none). An official file of another family is
    refused naming the family whose layout it has."""
    if isinstance(config, dict):
        config = get_family(family).config_cls.from_dict(config)
    try:
        return loading.load_tokenizer(path, config, map_location, family=family, weights=weights)
    except (LayoutError, ValueError, KeyError) as e:
        if isinstance(e, DamagedFileError) or not (fits := fitting_families(path, family)):
            raise
        presets = sorted(n for n, ref in named_refs().items() if ref.family in fits)
        raise LayoutError(f"{path} is not a {family!r} tokenizer file: its weights have the layout of family "
                          f"{' or '.join(map(repr, fits))}. Pass tokenizer={presets[0]} (family {fits[0]}; presets "
                          f"{presets}) instead of family={family!r}") from None
