"""The MGVQ tokenizer: DC-AE encoder -> grouped 1x1 conv -> multi-group quantizer -> grouped 1x1 conv -> decoder.

Structure and parameter names follow the official MGVQ code (efficientvit/models/tokenizer/mgvq.py), so the
released checkpoints load strictly; the numbers match it to float32 rounding (tests/test_tokenizer.py).
"""
import torch
import torch.nn as nn

from tokenizer.base import IMAGE_CHANNELS, VQTokenizer
from tokenizer.families.mgvq.config import BackboneConfig, MGVQConfig
from tokenizer.families.mgvq.layers import (
    ChannelAveragingDown,
    ChannelDuplicatingUp,
    ConvLayer,
    ConvPixelShuffle,
    ConvPixelUnshuffle,
    OpSequential,
    Residual,
    make_act,
    make_block,
    make_norm,
)
from tokenizer.families.mgvq.quantizer import MultiGroupQuantizer, QuantizerOutput

def stage_blocks(cfg: BackboneConfig, i: int) -> list[nn.Module]:
    return [make_block(cfg.block_type[i], cfg.width_list[i], cfg.norm[i], cfg.act[i]) for _ in range(cfg.depth_list[i])]


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> latent (B, C, H/f, W/f) with f = 2**(stages-1)."""

    def __init__(self, cfg: BackboneConfig, latent_channels: int):
        super().__init__()
        w, n = cfg.width_list, cfg.num_stages
        # An empty first stage is skipped: project_in then downsamples straight to the second stage's width.
        if cfg.depth_list[0] > 0:
            self.project_in = ConvLayer(IMAGE_CHANNELS, w[0], 3)
        else:
            self.project_in = ConvPixelUnshuffle(IMAGE_CHANNELS, w[1])
        stages = []
        for i in range(n):
            blocks = stage_blocks(cfg, i)
            if i < n - 1 and blocks:
                blocks.append(Residual(ConvPixelUnshuffle(w[i], w[i + 1]), ChannelAveragingDown(w[i], w[i + 1], 2)))
            stages.append(OpSequential(blocks))
        self.stages = nn.ModuleList(stages)
        self.project_out = Residual(OpSequential([ConvLayer(w[-1], latent_channels, 3)]),
                                    ChannelAveragingDown(w[-1], latent_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project_in(x)
        for stage in self.stages:
            x = stage(x)
        return self.project_out(x)


class Decoder(nn.Module):
    """Latent (B, C, h, w) -> image (B, 3, h*f, w*f); stages run from the coarsest to the finest."""

    def __init__(self, cfg: BackboneConfig, latent_channels: int):
        super().__init__()
        w, n = cfg.width_list, cfg.num_stages
        self.project_in = Residual(ConvLayer(latent_channels, w[-1], 3), ChannelDuplicatingUp(latent_channels, w[-1], 1))
        stages = []
        for i in range(n):
            blocks = stage_blocks(cfg, i)
            if i < n - 1 and blocks:
                blocks.insert(0, Residual(ConvPixelShuffle(w[i + 1], w[i]), ChannelDuplicatingUp(w[i + 1], w[i], 2)))
            stages.append(OpSequential(blocks))
        self.stages = nn.ModuleList(stages)
        # The output head: trms2d + relu, then a conv (or, for an empty first stage, a x2 pixel-shuffle conv).
        c = w[0] if cfg.depth_list[0] > 0 else w[1]
        head = ConvLayer(c, IMAGE_CHANNELS, 3) if cfg.depth_list[0] > 0 else ConvPixelShuffle(c, IMAGE_CHANNELS)
        self.project_out = OpSequential([make_norm("trms2d", c), make_act("relu"), head])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project_in(x)
        for stage in reversed(self.stages):
            x = stage(x)
        return self.project_out(x)


class MGVQ(VQTokenizer):
    """MGVQ tokenizer. Images are float (B, 3, H, W) in [-1, 1]; codes are (B, h, w, G) group indices."""

    def __init__(self, config: MGVQConfig):
        super().__init__()
        self.config = config
        C, G = config.latent_channels, config.codebook_groups
        self.encoder = Encoder(config.encoder, C)
        self.decoder = Decoder(config.decoder, C)
        self.quantize = MultiGroupQuantizer(config.codebook_size, G, C // G)
        self.quant_conv = nn.Conv2d(C, C, 1, groups=G)
        self.post_quant_conv = nn.Conv2d(C, C, 1, groups=G)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """Reconstruction and quantizer output (codes, straight-through latent, losses): the training path."""
        q = self.quantize(self.encode(x))
        return self.decode(q.z_q), q
