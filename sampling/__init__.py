"""Sampling: KV-cached generation of MGVQ group codes, images from codes, sample files."""
from sampling.generate import generate
from sampling.sampler import Sampler, SamplerConfig

__all__ = ["generate", "Sampler", "SamplerConfig"]
