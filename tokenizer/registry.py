"""Tokenizer families by name: each one's architecture dataclass, its nn.Module (a tokenizer.base.CodeTokenizer)
and the reader of its official files.

A family's `read_official(blob, path, weights)` takes the already-loaded contents of an official file and returns
its weights in the module's key names and which entry it took (`weights`: auto = what the family's official AR
sampler decodes with, ema or raw). Loading itself is tokenizer.loading's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tokenizer.families import magvit2, mergevq
from tokenizer.families.mgvq import official as mgvq_official
from tokenizer.families.mgvq.config import MGVQConfig
from tokenizer.families.mgvq.model import MGVQ
from tokenizer.families.vqgan.model import VQGAN, VQGANConfig
from tokenizer.families.vqgan.official import read_ibq, read_llamagen


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type
    model_cls: type
    read_official: Callable  # (blob, path, weights) -> (state_dict in model_cls's key names, which entry)
    check_config: Callable | None = None  # raises ValueError when a config does not belong to the family


def _quantizer_is(kind: str, family: str) -> Callable:
    def check(config) -> None:
        if getattr(config, "quantizer", None) != kind:
            raise ValueError(f"family {family!r} has quantizer={kind!r}, the config says "
                             f"{getattr(config, 'quantizer', None)!r}: pass a {family} preset")
    return check


FAMILIES: dict[str, Family] = {
    "mgvq": Family("mgvq", MGVQConfig, MGVQ, mgvq_official.read_official),
    "open_magvit2": Family("open_magvit2", magvit2.Magvit2Config, magvit2.OpenMagvit2, magvit2.read_official),
    "llamagen_vq": Family("llamagen_vq", VQGANConfig, VQGAN, read_llamagen, _quantizer_is("cosine", "llamagen_vq")),
    "ibq": Family("ibq", VQGANConfig, VQGAN, read_ibq, _quantizer_is("dot", "ibq")),
    "mergevq": Family("mergevq", mergevq.MergeVQConfig, mergevq.MergeVQ, mergevq.read_official),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown tokenizer family {name!r}; expected one of {sorted(FAMILIES)}")
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
