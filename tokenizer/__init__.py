"""Tokenizers (images <-> codes) of every family (MGVQ, LlamaGen VQ, IBQ), code extraction and the code store."""
from tokenizer.families.mgvq.config import BackboneConfig, MGVQConfig, TokenizerRef
from tokenizer.registry import FAMILIES, Family
from tokenizer.loading import load_tokenizer, read_codebook, save_tokenizer
from tokenizer.families.mgvq.model import MGVQ
from tokenizer.families.mgvq.quantizer import MultiGroupQuantizer, QuantizerOutput
from tokenizer.families.vqgan.model import VQGAN, VQGANConfig

__all__ = ["MGVQ", "MGVQConfig", "TokenizerRef", "BackboneConfig", "MultiGroupQuantizer", "QuantizerOutput",
           "VQGAN", "VQGANConfig", "FAMILIES", "Family", "load_tokenizer", "read_codebook", "save_tokenizer"]
