"""MGVQ tokenizer (images <-> multi-group codes), code extraction and the code store."""
from tokenizer.config import BackboneConfig, MGVQConfig, TokenizerRef
from tokenizer.loading import load_tokenizer, read_codebook, save_tokenizer
from tokenizer.model import MGVQ
from tokenizer.quantizer import MultiGroupQuantizer, QuantizerOutput

__all__ = ["MGVQ", "MGVQConfig", "TokenizerRef", "BackboneConfig", "MultiGroupQuantizer", "QuantizerOutput",
           "load_tokenizer", "read_codebook", "save_tokenizer"]
