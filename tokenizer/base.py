"""What every tokenizer family shares: the `CodeTokenizer` surface, the image check, the codes-per-group rule and
the choice of weights in an official file. Every family (tokenizer.families) builds on this file; it imports none."""
from __future__ import annotations

import torch
import torch.nn as nn

IMAGE_CHANNELS = 3


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), computed as the taming-style official encoders compute it (LlamaGen, IBQ, Open-MAGVIT2):
    F.silu rounds differently (up to 5e-7 here), enough to flip a near-tied VQ-16 code against LlamaGen's own
    extraction. Without autograd the product is written into the sigmoid's buffer (the same numbers, one
    activation-sized allocation fewer)."""
    if x.requires_grad and torch.is_grad_enabled():
        return x * torch.sigmoid(x)
    return torch.sigmoid(x).mul_(x)


# Which weights of an official file to load: auto = what the family's official AR sampler decodes with.
WEIGHT_CHOICES = ("auto", "ema", "raw")


def check_images(x: torch.Tensor, f: int) -> None:
    """Raise unless x is (B, 3, H, W) with H and W multiples of the downsampling factor f."""
    if x.ndim != 4 or x.shape[1] != IMAGE_CHANNELS or x.shape[-1] % f or x.shape[-2] % f:
        raise ValueError(f"images must be (B, 3, H, W) with H and W multiples of {f}, got {tuple(x.shape)}")


def check_weights_choice(weights: str) -> None:
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights={weights!r} is not one of {WEIGHT_CHOICES}")


def group_sizes(config) -> list[int]:
    """Codes per group of a tokenizer or GPT config (`codes_per_group`: one int for all groups, or one per group),
    one entry per group."""
    per_group = config.codes_per_group
    return list(per_group) if isinstance(per_group, (list, tuple)) else [per_group] * config.codebook_groups


class CodeTokenizer(nn.Module):
    """The surface every family implements: images (B, 3, H, W) in [-1, 1] <-> codes (B, H/f, W/f, G) int64.

    A family sets `config` (with downsample, codebook_groups, codes_per_group) and defines `encode_latent`
    (images -> pre-quantization latent), `decode` (quantized latent -> images), `codes_of` (latent -> codes),
    `latent_of` (codes -> quantized latent, groups >= groups_to_use zero) and `codebook()`.
    """

    config: object

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def group_sizes(self) -> list[int]:
        return group_sizes(self.config)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> pre-quantization latent (B, C, H/f, W/f)."""
        check_images(x, self.downsample)
        return self.encode_latent(x)

    @torch.no_grad()
    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> codes (B, H/f, W/f, G) int64."""
        return self.codes_of(self.encode(x))

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor, groups_to_use: int | None = None) -> torch.Tensor:
        """Codes (B, h, w, G) -> images (B, 3, h*f, w*f), unclamped. Groups >= groups_to_use contribute zeros."""
        weight = next(self.decoder.parameters())
        return self.decode(self.latent_of(codes.to(weight.device), groups_to_use).to(weight.dtype))

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def codes_of(self, latent: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def latent_of(self, codes: torch.Tensor, groups_to_use: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def codebook(self) -> torch.Tensor | None:
        """The raw code rows a GPT with codebook input embeds; None where the family has no table."""
        raise NotImplementedError


class VQTokenizer(CodeTokenizer):
    """A code table between 1x1 convolutions: encoder -> quant_conv -> quantize (nearest row / row lookup) ->
    post_quant_conv -> decoder (MGVQ, LlamaGen VQ, IBQ). `quantize.embedding.weight` is the raw code table."""

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """Quantized latent (B, C, h, w) -> images (B, 3, h*f, w*f), unclamped."""
        return self.decoder(self.post_quant_conv(quant))

    def codes_of(self, latent: torch.Tensor) -> torch.Tensor:
        return self.quantize.nearest(latent)

    def latent_of(self, codes: torch.Tensor, groups_to_use: int | None = None) -> torch.Tensor:
        return self.quantize.lookup(codes, groups_to_use)

    def codebook(self) -> torch.Tensor:
        """Raw (unnormalised) code rows (codebook_size, C/G): what the official GPT embeds."""
        return self.quantize.embedding.weight.detach()
