"""Sampling: KV-cached generation of codes, images from codes, sample files, and their evaluation.

`Sampler` and `SamplerConfig` are imported on first use (PEP 562), so that `sampling.metrics` (evaluation, which
needs no tokenizer) imports without building every tokenizer family. `generate` is imported here: a lazy name
would be shadowed by its own submodule, `sampling.generate`, once that is imported.
"""
import importlib

from sampling.generate import generate

_WHERE = {"Sampler": "sampling.sampler", "SamplerConfig": "sampling.sampler"}
__all__ = ["generate", *_WHERE]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'sampling' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
