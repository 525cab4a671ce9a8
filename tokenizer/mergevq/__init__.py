"""The MergeVQ tokenizer family: token-merging encoder, LFQ codes on the grid or merged, official checkpoints."""
from tokenizer.mergevq.model import MergeVQ, MergeVQConfig
from tokenizer.mergevq.official import read_weights

__all__ = ["MergeVQ", "MergeVQConfig", "read_weights"]
