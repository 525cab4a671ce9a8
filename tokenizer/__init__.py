"""Tokenizers (images <-> codes) of every family (MGVQ, LlamaGen VQ, IBQ), code extraction and the code store."""
from tokenizer.config import BackboneConfig, MGVQConfig, TokenizerRef
from tokenizer.families import FAMILIES, Family
from tokenizer.loading import load_tokenizer, read_codebook, save_tokenizer
from tokenizer.model import MGVQ
from tokenizer.quantizer import MultiGroupQuantizer, QuantizerOutput
from tokenizer.vqgan import VQGAN, VQGANConfig

__all__ = ["MGVQ", "MGVQConfig", "TokenizerRef", "BackboneConfig", "MultiGroupQuantizer", "QuantizerOutput",
           "VQGAN", "VQGANConfig", "FAMILIES", "Family", "load_tokenizer", "read_codebook", "save_tokenizer"]
