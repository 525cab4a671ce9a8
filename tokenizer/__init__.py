"""MGVQ tokenizer (images <-> multi-group codes), code extraction and the code store."""
from tokenizer.config import BackboneConfig, MGVQConfig, TokenizerConfig
from tokenizer.loading import load_tokenizer, save_tokenizer, sha256_file
from tokenizer.model import MGVQ
from tokenizer.quantizer import MultiGroupQuantizer, QuantizerOutput

__all__ = ["MGVQ", "MGVQConfig", "TokenizerConfig", "BackboneConfig", "MultiGroupQuantizer", "QuantizerOutput",
           "load_tokenizer", "save_tokenizer", "sha256_file"]
