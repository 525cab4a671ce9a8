"""The MergeVQ tokenizer family: token-merging encoder, LFQ codes on the grid or merged, official checkpoints."""
from tokenizer.families.mergevq.model import MergeVQ, MergeVQConfig
from tokenizer.families.mergevq.official import read_official

__all__ = ["MergeVQ", "MergeVQConfig", "read_official"]
