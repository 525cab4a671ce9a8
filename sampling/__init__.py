"""Sampling: KV-cached generation of MGVQ group codes, images from codes, sample files."""
from sampling.generate import generate

__all__ = ["generate"]
