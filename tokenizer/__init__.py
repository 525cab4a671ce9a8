"""Tokenizers (images <-> codes) of every family (MGVQ, LlamaGen VQ, IBQ, Open-MAGVIT2, MergeVQ), code extraction and the
code store.

The names below are imported on first use (PEP 562), not with the package: `tokenizer.common` (files, settings,
run plumbing) sits under every stage, and importing it, e.g. from sampling.metrics, must not build every family.
"""
import importlib

_WHERE = {
    "MGVQ": "tokenizer.families.mgvq.model",
    "MGVQConfig": "tokenizer.families.mgvq.config",
    "BackboneConfig": "tokenizer.families.mgvq.config",
    "MultiGroupQuantizer": "tokenizer.families.mgvq.quantizer",
    "QuantizerOutput": "tokenizer.families.mgvq.quantizer",
    "VQGAN": "tokenizer.families.vqgan.model",
    "VQGANConfig": "tokenizer.families.vqgan.model",
    "OpenMagvit2": "tokenizer.families.magvit2",
    "Magvit2Config": "tokenizer.families.magvit2",
    "MergeVQ": "tokenizer.families.mergevq",
    "MergeVQConfig": "tokenizer.families.mergevq",
    "CodeTokenizer": "tokenizer.base",
    "FAMILIES": "tokenizer.registry",
    "Family": "tokenizer.registry",
    "TokenizerRef": "tokenizer.loading",
    "load_tokenizer": "tokenizer.loading",
    "read_codebook": "tokenizer.loading",
    "save_tokenizer": "tokenizer.loading",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'tokenizer' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
