"""The Open-MAGVIT2 tokenizer (SEED-Voken): a bias-free conv encoder, lookup-free quantization (LFQ), and a decoder
with depth-to-space upsampling and adaptive group norm conditioned on the quantized code map.

Parameter names follow the official `improved_model.py` Encoder / Decoder, so the released Lightning checkpoints
load strictly (`read_official`). A latent of C channels quantizes to C signs; they are split into G sub-tokens of
`factorized_bits` bits each (channels in order, the first channel of a group its least significant bit), the
factorization the released AR models predict: [6, 12] is a 64-code then a 4096-code sub-token.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from tokenizer.common.errors import BadFileError, ConfigError
from tokenizer.common.settings import known_fields, preset_fields
from tokenizer.base import IMAGE_CHANNELS, CodeTokenizer, swish

NORM_GROUPS = 32
EPS = 1e-6

# The released ImageNet tokenizers (configs/Open-MAGVIT2/gpu/imagenet_lfqgan_{256,128}_L.yaml): 2^18 codes,
# 16x16 codes for 256px (f16) and for 128px (f8). The AR models read them as sub-tokens of 6 and 12 bits.
PRESETS = {
    "open-magvit2-f16": {"ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 4, "z_channels": 18},
    "open-magvit2-f8": {"ch": 128, "ch_mult": [1, 2, 2, 4], "num_res_blocks": 4, "z_channels": 18},
    # The quickstart's: 16x16 digits -> 4x4 codes of 18 bits, two 512-code sub-tokens (16 bits, two 256-code
    # sub-tokens, gave 23.6 dB held-out PSNR after 600 steps; the quickstart asks for 24).
    "open-magvit2-digits": {"ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "z_channels": 18,
                            "factorized_bits": [9, 9]},
}
RELEASED_FACTORIZED_BITS = [6, 12]


@dataclass
class Magvit2Config:
    """Architecture of an Open-MAGVIT2 tokenizer; `factorized_bits` (summing to z_channels) splits each code.
    (MergeVQ's config extends it: the same CNN widths and LFQ codes.)"""

    PRESETS: ClassVar[dict] = PRESETS
    NAME: ClassVar[str] = "Open-MAGVIT2"

    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 4
    z_channels: int = 18
    factorized_bits: list[int] = field(default_factory=lambda: list(RELEASED_FACTORIZED_BITS))

    def __post_init__(self):
        self.ch_mult, self.factorized_bits = list(self.ch_mult), list(self.factorized_bits)
        widths = [self.ch * m for m in self.ch_mult]
        if any(w % NORM_GROUPS for w in widths) or not self.ch_mult:
            raise ConfigError(f"ch={self.ch} x ch_mult={self.ch_mult} gives widths {widths}: each must be a positive "
                             f"multiple of {NORM_GROUPS} (group norm)")
        if sum(self.factorized_bits) != self.z_channels or min(self.factorized_bits) < 1:
            raise ConfigError(f"factorized_bits={self.factorized_bits} must be positive and sum to "
                             f"z_channels={self.z_channels}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_channels(self) -> int:
        return self.z_channels

    @property
    def codebook_groups(self) -> int:
        return len(self.factorized_bits)

    @property
    def codes_per_group(self) -> list[int]:
        return [2**b for b in self.factorized_bits]

    @classmethod
    def preset(cls, name: str, **fields) -> Magvit2Config:
        return cls(**{**preset_fields(cls.PRESETS, name, cls.NAME), **fields})

    @classmethod
    def named_presets(cls) -> dict[str, Magvit2Config]:
        """The released ImageNet tokenizers under their hydra names, factorized as the released AR models read them."""
        return {name: cls.preset(name) for name in cls.PRESETS}

    @classmethod
    def from_dict(cls, d: dict) -> Magvit2Config:
        return cls(**known_fields(cls, d))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, channels, eps=EPS)


class ResBlock(nn.Module):
    """norm-swish-conv twice, bias-free 3x3 convs; a bias-free 1x1 shortcut where the width changes."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.norm2 = group_norm(c_in), group_norm(c_out)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


def depth_to_space(x: torch.Tensor) -> torch.Tensor:
    """(B, 4C, H, W) -> (B, C, 2H, 2W), channel (2*i + j)*C + c going to pixel offset (i, j): the official DCR
    order, not nn.PixelShuffle's (c*4 + 2*i + j)."""
    B, C4, H, W = x.shape
    x = x.view(B, 2, 2, C4 // 4, H, W).permute(0, 3, 4, 1, 5, 2)  # (B, C, H, i, W, j)
    return x.reshape(B, C4 // 4, 2 * H, 2 * W)


class Upsampler(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, 4 * c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depth_to_space(self.conv1(x))


class AdaptiveGroupNorm(nn.Module):
    """Group norm without affine; scale = gamma(std of the code map), shift = beta(mean), per channel.

    The statistics are over the whole (h, w) code map of each image: std is the unbiased one plus eps under the
    root, as the official code computes it.
    """

    def __init__(self, z_channels: int, c: int):
        super().__init__()
        self.gn = nn.GroupNorm(NORM_GROUPS, c, eps=EPS, affine=False)
        self.gamma = nn.Linear(z_channels, c)
        self.beta = nn.Linear(z_channels, c)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        flat = style.flatten(2)  # (B, Z, h*w)
        scale = self.gamma((flat.var(-1) + EPS).sqrt())[..., None, None]  # (B, C, 1, 1)
        shift = self.beta(flat.mean(-1))[..., None, None]
        return self.gn(x) * scale + shift


class Level(nn.Module):
    """One resolution: res blocks, then (optionally) the resampling layer, named as in the official code."""

    def __init__(self, blocks: list[nn.Module], resample_name: str | None = None, resample: nn.Module | None = None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample_name is not None:
            self.add_module(resample_name, resample)
        self.resample_name = resample_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.resample_name is None else getattr(self, self.resample_name)(x)


def down_levels(cfg: Magvit2Config) -> tuple[nn.ModuleList, int]:
    """The encoder's levels from ch channels: num_res_blocks res blocks each, a stride-2 conv after all but the
    last. Returns them and the output width."""
    widths, down, c = [cfg.ch * m for m in cfg.ch_mult], nn.ModuleList(), cfg.ch
    for i, w in enumerate(widths):
        blocks = []
        for _ in range(cfg.num_res_blocks):
            blocks.append(ResBlock(c, w))
            c = w
        last = i == len(widths) - 1
        down.append(Level(blocks, None if last else "downsample",
                          None if last else nn.Conv2d(w, w, 3, stride=2, padding=1)))
    return down, c


def up_levels(cfg: Magvit2Config, num_blocks: list[int]) -> tuple[nn.ModuleList, nn.ModuleList, int]:
    """The decoder's levels, built from the coarsest (index -1) to the finest (index 0), with num_blocks[i] res
    blocks at level i, an upsampler after all but the finest, and each level's adaptive group norm. Returns
    (levels, adaptive norms, output width)."""
    widths = [cfg.ch * m for m in cfg.ch_mult]
    up, adaptive, c = [], [], widths[-1]
    for i in reversed(range(len(widths))):
        adaptive.insert(0, AdaptiveGroupNorm(cfg.z_channels, c))
        blocks = []
        for _ in range(num_blocks[i]):
            blocks.append(ResBlock(c, widths[i]))
            c = widths[i]
        up.insert(0, Level(blocks, "upsample" if i > 0 else None, Upsampler(c) if i > 0 else None))
    return nn.ModuleList(up), nn.ModuleList(adaptive), c


class Encoder(nn.Module):
    """Images (B, 3, H, W) -> latent (B, Z, H/f, W/f)."""

    def __init__(self, cfg: Magvit2Config):
        super().__init__()
        self.conv_in = nn.Conv2d(IMAGE_CHANNELS, cfg.ch, 3, padding=1, bias=False)
        self.down, c = down_levels(cfg)
        self.mid_block = nn.ModuleList(ResBlock(c, c) for _ in range(cfg.num_res_blocks))
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        for block in self.mid_block:
            x = block(x)
        return self.conv_out(swish(self.norm_out(x)))


class Decoder(nn.Module):
    """Quantized latent (B, Z, h, w) -> images (B, 3, h*f, w*f); levels run from the coarsest (last) to the finest,
    each starting with an adaptive group norm conditioned on the decoder's input."""

    def __init__(self, cfg: Magvit2Config):
        super().__init__()
        c = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid_block = nn.ModuleList(ResBlock(c, c) for _ in range(cfg.num_res_blocks))
        self.up, self.adaptive, c = up_levels(cfg, [cfg.num_res_blocks] * len(cfg.ch_mult))
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, IMAGE_CHANNELS, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        for block in self.mid_block:
            x = block(x)
        for i in reversed(range(len(self.up))):
            x = self.up[i](self.adaptive[i](x, z))
        return self.conv_out(swish(self.norm_out(x)))


def _bit_tables(factorized_bits: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(Z,) group of each latent channel, and its weight 2**(channel - the group's first channel)."""
    group = torch.cat([torch.full((b,), g, device=device) for g, b in enumerate(factorized_bits)])
    weight = torch.cat([2 ** torch.arange(b, device=device) for b in factorized_bits])
    return group, weight


def lfq_quantize(latent: torch.Tensor, factorized_bits: list[int]) -> torch.Tensor:
    """Lookup-free quantization of a channels-last latent (..., Z) -> codes (..., G) int64: bit = latent > 0,
    sub-token g = sum of its channels' bits * 2**(place in the group), the first channel least significant."""
    group, weight = _bit_tables(factorized_bits, latent.device)
    bits = (latent > 0).long()
    codes = bits.new_zeros(*bits.shape[:-1], len(factorized_bits))
    return codes.index_add_(-1, group, bits * weight)


def lfq_grid_latent(codes: torch.Tensor, config: Magvit2Config, groups_to_use: int | None = None) -> torch.Tensor:
    """Grid codes (B, h, w, G) -> latent (B, Z, h, w) of +-1 in float32; channels of groups >= groups_to_use are 0."""
    G = config.codebook_groups
    if codes.ndim != 4 or codes.shape[-1] != G:
        raise ValueError(f"codes must be (B, h, w, {G}), got {tuple(codes.shape)}")
    group, weight = _bit_tables(config.factorized_bits, codes.device)
    quant = ((codes[..., group] // weight) % 2).float() * 2 - 1  # (B, h, w, Z)
    if groups_to_use is not None:
        quant = quant * (group < groups_to_use)
    return quant.permute(0, 3, 1, 2).contiguous()


class OpenMagvit2(CodeTokenizer):
    """Open-MAGVIT2 tokenizer. Images are float (B, 3, H, W) in [-1, 1]; codes are (B, h, w, G) sub-token indices,
    sub-token g taking values in [0, 2**factorized_bits[g])."""

    def __init__(self, config: Magvit2Config):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> pre-quantization latent (B, Z, H/f, W/f)."""
        return self.encoder(x)

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """Quantized latent (B, Z, h, w) of +-1 (or 0 for dropped groups) -> images, unclamped."""
        return self.decoder(quant)

    def codes_of(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent (B, Z, h, w) -> codes (B, h, w, G) (lfq_quantize)."""
        return lfq_quantize(latent.permute(0, 2, 3, 1), self.config.factorized_bits)

    def latent_of(self, codes: torch.Tensor, groups_to_use: int | None = None) -> torch.Tensor:
        """Codes (B, h, w, G) -> latent (B, Z, h, w) of +-1; channels of groups >= groups_to_use are 0."""
        return lfq_grid_latent(codes, self.config, groups_to_use)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the codes (no gradient: training goes through tokenizer/autoencoders.py)."""
        return self.decode(self.latent_of(self.codes_of(self.encode(x))))

    def codebook(self) -> None:
        """None: LFQ has no code table to hand a GPT; the GPT learns its own code embeddings."""
        return None


def read_official(blob: dict, path: str | os.PathLike, weights: str = "auto") -> tuple[dict, str]:
    """The encoder/decoder weights of an official Lightning checkpoint `blob` (read from `path`), in OpenMagvit2's
    key names.

    `["state_dict"]` holds the raw weights under `encoder.` / `decoder.` (an AR checkpoint: under
    `first_stage_model.`) and, in a tokenizer checkpoint, their EMA under `model_ema.<name without dots>`.
    weights: "ema", "raw", or "auto" = raw: the official AR configs load the tokenizer with `use_ema: False`, so the
    released AR models were trained on codes of the raw weights and decode with them. Returns (state_dict, which);
    the discriminator, the EMA counters and an AR file's transformer are left out, every other key must be the
    model's (the caller checks them strictly).
    """
    sd = blob.get("state_dict")
    if not isinstance(sd, dict):
        raise BadFileError(f"{path}: not a Lightning checkpoint (no 'state_dict' entry)")
    prefix = "first_stage_model." if any(k.startswith("first_stage_model.encoder.") for k in sd) else ""
    raw = {k[len(prefix):]: v for k, v in sd.items() if k.startswith((prefix + "encoder.", prefix + "decoder."))}
    ema = {k[len("model_ema."):]: v for k, v in sd.items() if k.startswith(("model_ema.encoder", "model_ema.decoder"))}
    if not raw:
        raise BadFileError(f"{path}: no encoder./decoder. weights in its state_dict")
    if weights != "ema":
        return raw, "raw"
    if not ema:
        raise BadFileError(f"{path}: weights='ema' but the file has no model_ema.encoder*/decoder* entries "
                         f"(an AR checkpoint holds only the raw tokenizer weights)")
    return ema_by_raw_names(raw, ema, path), "ema"


def ema_by_raw_names(raw: dict, ema: dict, path) -> dict:
    """Lightning LitEma weights (named like the parameters without their dots) under the raw weights' names; a
    ValueError names the EMA entries that match no raw weight and the raw weights without EMA."""
    dotted = {k.replace(".", ""): k for k in raw}
    unknown = sorted(k for k in ema if k not in dotted)
    missing = sorted(k for flat, k in dotted.items() if flat not in ema)
    if unknown or missing:
        raise BadFileError(f"{path}: EMA weights do not match the raw ones: unknown EMA entries {unknown[:10]}, "
                         f"parameters without EMA {missing[:10]}")
    return {dotted[k]: v for k, v in ema.items()}
