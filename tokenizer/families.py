"""Tokenizer families: one architecture dataclass, one module and one reader of the official files per name.

`load_tokenizer(path, config, family=...)` dispatches here. A family's `read_weights(path, weights)` returns the
official file's weights already in its module's key names, and which entry it took (`weights`: auto = what the
official AR sampler decodes with, ema or raw).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tokenizer.config import MGVQConfig
from tokenizer.model import MGVQ
from tokenizer.vqgan import PRESETS as VQGAN_PRESETS
from tokenizer.vqgan import VQGAN, VQGANConfig
from tokenizer.vqgan_weights import read_ibq, read_llamagen


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type  # from_dict(d), to_dict(), preset(name, ...)
    model_cls: type  # model_cls(config)
    read_weights: Callable  # (path, weights) -> (state dict in model_cls's names, which entry)
    check_config: Callable | None = None  # raises ValueError when a config does not belong to the family


def _quantizer_is(kind: str, family: str) -> Callable:
    def check(config) -> None:
        if getattr(config, "quantizer", None) != kind:
            raise ValueError(f"family {family!r} has quantizer={kind!r}, the config says "
                             f"{getattr(config, 'quantizer', None)!r}: pass a {family} preset")
    return check


def _read_mgvq(path, weights="auto"):
    from tokenizer.loading import read_mgvq  # loading imports this module
    return read_mgvq(path, weights)


FAMILIES: dict[str, Family] = {
    "mgvq": Family("mgvq", MGVQConfig, MGVQ, _read_mgvq),
    "llamagen_vq": Family("llamagen_vq", VQGANConfig, VQGAN, read_llamagen, _quantizer_is("cosine", "llamagen_vq")),
    "ibq": Family("ibq", VQGANConfig, VQGAN, read_ibq, _quantizer_is("dot", "ibq")),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown tokenizer family {name!r}; families: {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of(config) -> str:
    """The family name of an architecture config (or of a built tokenizer module, by its config)."""
    config = getattr(config, "config", config)
    if isinstance(config, VQGANConfig):
        return "llamagen_vq" if config.quantizer == "cosine" else "ibq"
    for fam in FAMILIES.values():
        if type(config) is fam.config_cls:
            return fam.name
    raise ValueError(f"{type(config).__name__} is not the config of any tokenizer family {sorted(FAMILIES)}")


def named_refs() -> dict:
    """Every family's presets as hydra `tokenizer` group nodes: TokenizerRef(config=arch, family=...)."""
    from tokenizer.config import TokenizerRef

    archs = {**MGVQConfig.named_presets(), **{name: VQGANConfig.preset(name) for name in VQGAN_PRESETS}}
    return {name: TokenizerRef(config=arch, family=family_of(arch)) for name, arch in archs.items()}
