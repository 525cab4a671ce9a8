"""Sampling: KV-cached generation of codes, images from codes, sample files, and their evaluation.

The names below are imported on first use (PEP 562), so that `sampling.metrics` (evaluation, which needs no GPT
nor tokenizer) imports without building the sampler's stack.
"""
import importlib

_WHERE = {"generate": "sampling.generate", "Sampler": "sampling.sampler", "SamplerConfig": "sampling.sampler"}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'sampling' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
