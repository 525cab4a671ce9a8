"""MergeVQ (ApexGen-X/MergeVQ, CVPR 2025): a CNN + ViT encoder that merges its tokens with ToMe, Open-MAGVIT2's
lookup-free quantizer on the K merged tokens, and a decoder that copies each merged code back to every grid position
it covers, then runs a ViT (depthwise-conv position and MLP terms) and Open-MAGVIT2's AdaGN / depth-to-space levels.

Parameter names follow the official `model_mergevq.py` MergeVQEncoder / MergeVQDecoder (timm ViT blocks), so their
Lightning checkpoints load strictly (tokenizer.families.mergevq.official). Codes come in two forms:
- on the grid, (B, h, w, G): each position carries the code of the merged token covering it (what MergeVQ's stage 2
  trains Open-MAGVIT2's factorized GPT on, and what this project's store, GPT and sampler read);
- merged, (B, K, G) codes in merge order plus a token map (B, h, w): which merged token covers each position
  (the official source matrix S, stored compactly: S[b, k, p] = token_map[b, p] == k).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer.base import IMAGE_CHANNELS, CodeTokenizer, check_images
from tokenizer.families.magvit2 import (Magvit2Config, down_levels, group_norm, lfq_grid_latent, lfq_quantize,
                                        up_levels)
from tokenizer.families.mergevq.tome import Merge, merge_schedule, parse_distribution, tokens_left
from tokenizer.merged import check_token_map, unmerge

DIST_HEADS = (None, "layer3", "mlp")  # the official dist_head 'layer3', True (-> "mlp"), or none
LAYER_SCALE_INIT = 1e-5

# configs/gpu_s1 of the official repository (256px; G+R: f16, 256 grid tokens; G: f8, 1024). merge_num is the
# training config's (G+R: K = 144, G: K = 256) and cand_distribution the K its training draws around it (G+R:
# 121..256, G: 225..529); the eval configs set merge_num per K (G+R k64/100/144/196/256: 192/156/112/60/0). The
# stage-2 (AR) configs decode with merge_num 0 and factorize the 18 bits as [6, 12].
_GR = {"ch_mult": [1, 1, 2, 4, 8], "dist_head": "layer3", "merge_num": 112, "cand_distribution": "gaussian-6"}
_G = {"dist_head": "mlp", "merge_num": 768, "cand_distribution": "gaussian-9"}
PRESETS = {
    "mergevq-gr-d32": {**_GR, "ch": 32, "ch_mult": [2, 2, 4, 8, 12], "num_heads": 8},
    "mergevq-gr-d64": {**_GR, "ch": 64, "num_heads": 8},
    "mergevq-gr-d96": {**_GR, "ch": 96, "num_heads": 12},
    "mergevq-g-d32": {**_G, "ch": 32, "ch_mult": [2, 4, 8, 12], "num_heads": 8},
    "mergevq-g-d64": {**_G, "ch": 64, "ch_mult": [1, 2, 4, 8], "num_heads": 8},
    # The quickstart's: 16x16 digits -> 4x4 grid of 16-bit codes (two 256-code sub-tokens); training keeps K = 9 of
    # the 16 tokens most of the time (candidates 4, 9, 16); no distillation head (no DINOv2 teacher there).
    "mergevq-digits": {"ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "z_channels": 16,
                       "factorized_bits": [8, 8], "num_att_blocks": 4, "num_heads": 4, "merge_num": 7,
                       "cand_distribution": "gaussian-3", "dist_head": None},
}


@dataclass
class MergeVQConfig(Magvit2Config):
    """Architecture of a MergeVQ tokenizer (the official ddconfig names): Open-MAGVIT2's CNN widths and LFQ codes
    plus the transformers. merge_num: tokens the encoder merges away (K = grid tokens - merge_num); the decoder's
    levels above the finest have num_res_extra more res blocks."""

    PRESETS: ClassVar[dict] = PRESETS
    NAME: ClassVar[str] = "MergeVQ"
    # Settings of how the weights are run, not of the weights: a tokenizer file loads with other values of these.
    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("merge_num", "cand_distribution")
    ch: int = 64
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 4, 8])
    num_res_extra: int = 1
    num_att_blocks: int = 12
    num_heads: int = 8
    merge_num: int = 112
    dist_head: str | None = "layer3"
    num_classes: int = 768  # outputs of the distillation head (the teacher's width)
    # Training only: K is drawn every step around grid tokens - merge_num ("gaussian-6": tome.merge_candidates);
    # None = always merge_num.
    cand_distribution: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.embed_dim % self.num_heads:
            raise ValueError(f"transformer width {self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.dist_head not in DIST_HEADS:
            raise ValueError(f"dist_head={self.dist_head!r}: expected one of {DIST_HEADS}")
        merge_schedule(self.num_att_blocks, self.merge_num)  # refuses a schedule that cannot exist
        if self.cand_distribution is not None:
            parse_distribution(self.cand_distribution)

    @property
    def embed_dim(self) -> int:
        return self.ch * self.ch_mult[-1]

    def merged_tokens(self, grid: tuple[int, int]) -> int:
        """K, the merged tokens of an (h, w) grid; a ValueError where the schedule cannot merge that many."""
        return tokens_left(grid[0] * grid[1], merge_schedule(self.num_att_blocks, self.merge_num))


class Attention(nn.Module):
    """Multi-head self-attention (timm names); an optional additive bias per key, and the head-mean keys out."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, N, D) each
        mask = None if key_bias is None else key_bias.to(q.dtype)[:, None, None, :]  # (B, 1, 1, N); autocast: q's dtype
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, C)), k.mean(1)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1, GELU, fc2; with dw_conv, a depthwise 3x3 conv over the (h, w) token grid sits before the GELU (the
    official MixMlp, which takes the grid as sqrt(N) x sqrt(N): square only)."""

    def __init__(self, dim: int, hidden: int, dw_conv: bool):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden) if dw_conv else None
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        x = self.fc1(x)
        if self.dwconv is not None:
            B, N, C = x.shape
            x = self.dwconv(x.transpose(1, 2).reshape(B, C, *grid)).flatten(2).transpose(1, 2)
        return self.fc2(F.gelu(x))


class Block(nn.Module):
    """A pre-norm ViT block with layer scale, in two halves so that token merging can run between them."""

    def __init__(self, dim: int, heads: int, dw_conv: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim, dw_conv)
        self.ls2 = LayerScale(dim)

    def attend(self, x: torch.Tensor, key_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out, keys = self.attn(self.norm1(x), key_bias)
        return x + self.ls1(out), keys

    def feed(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return x + self.ls2(self.mlp(self.norm2(x), grid))


class MergingViT(nn.Module):
    """The encoder's transformer: a class token, no position embedding, and ToMe inside every block (after the
    attention residual, before the MLP), merged tokens averaged by size and attended with a log(size) key bias."""

    def __init__(self, dim: int, depth: int, heads: int):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))

    def forward(self, x: torch.Tensor, schedule: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, L, C), merges per block -> (class token + K merged tokens (B, 1 + K, C), token map (B, L)
        into the merged tokens)."""
        B, L, _ = x.shape
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        where = torch.arange(L + 1, device=x.device).expand(B, -1)  # each input token's current index
        size = None  # tokens each one stands for; None until the first merge (all 1)
        for block, r in zip(self.blocks, schedule):
            x, keys = block.attend(x, None if size is None else size.log()[..., 0])
            if r > 0:
                merge = Merge(keys, r)
                x, size = merge.weighted(x, size)
                where = merge.new_index().gather(1, where)
            x = block.feed(x)
        return x, where[:, 1:] - 1


class ConvViT(nn.Module):
    """The decoder's transformer over the full (h, w) grid: a depthwise-conv position term, blocks with MixMlp."""

    def __init__(self, dim: int, depth: int, heads: int):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.blocks = nn.ModuleList(Block(dim, heads, dw_conv=True) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, h, w = x.shape
        x = (x + self.pos_embed(x)).flatten(2).transpose(1, 2)  # (B, h*w, C)
        for block in self.blocks:
            x = block.feed(block.attend(x)[0], (h, w))
        return x.transpose(1, 2).reshape(B, C, h, w)


def distillation_head(kind: str, dim: int, classes: int) -> nn.Sequential:
    hidden = 4 * dim
    if kind == "layer3":
        return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                             nn.Linear(hidden, classes))
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, classes))


class Encoder(nn.Module):
    """Images (B, 3, H, W) -> (pre-quantization latent of the K merged tokens (B, K, Z), their class token (B, C),
    token map (B, h, w))."""

    def __init__(self, cfg: MergeVQConfig):
        super().__init__()
        self.config = cfg
        self.conv_in = nn.Conv2d(IMAGE_CHANNELS, cfg.ch, 3, padding=1, bias=False)
        self.down, c = down_levels(cfg)
        self.attn = MergingViT(c, cfg.num_att_blocks, cfg.num_heads)
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 1)
        if cfg.dist_head is not None:
            self.dist_head = distillation_head(cfg.dist_head, c, cfg.num_classes)

    def forward(self, x: torch.Tensor, merge_num: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """merge_num: tokens to merge away in this call (training draws it per step); None = the config's."""
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        B, C, h, w = x.shape
        merge_num = self.config.merge_num if merge_num is None else merge_num
        schedule = merge_schedule(self.config.num_att_blocks, merge_num)
        tokens_left(h * w, schedule)  # a clear error where this grid is too small for merge_num
        x, token_map = self.attn(x.flatten(2).transpose(1, 2), schedule)
        # The official code lays the K tokens out as a sqrt(K) x sqrt(K) pseudo-grid here: group norm and the 1x1
        # conv see the same values as on this (K, 1) column.
        merged = x[:, 1:].transpose(1, 2)[..., None]  # (B, C, K, 1)
        latent = self.conv_out(F.silu(self.norm_out(merged)))[..., 0].transpose(1, 2)  # (B, K, Z)
        return latent, x[:, 0], token_map.view(B, h, w)


class Decoder(nn.Module):
    """Quantized grid latent (B, Z, h, w) -> images (B, 3, h*f, w*f)."""

    def __init__(self, cfg: MergeVQConfig):
        super().__init__()
        c = cfg.embed_dim
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.attn = ConvViT(c, cfg.num_att_blocks, cfg.num_heads)
        extra = [0] + [cfg.num_res_extra] * (len(cfg.ch_mult) - 1)  # the finest level has no extra block
        self.up, self.adaptive, c = up_levels(cfg, [cfg.num_res_blocks + e for e in extra])
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, IMAGE_CHANNELS, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            x = self.up[i](self.adaptive[i](x, z))
        return self.conv_out(F.silu(self.norm_out(x)))


class MergeVQ(CodeTokenizer):
    """MergeVQ tokenizer. Images are float (B, 3, H, W) in [-1, 1]; grid codes (B, h, w, G) of sub-tokens with
    2**factorized_bits[g] values; merged codes (B, K, G) with a token map (B, h, w). Its `encode` gives the merged
    latent (B, K, Z) and the token map (B, h, w)."""

    def __init__(self, config: MergeVQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def encode_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (pre-quantization latent of the merged tokens (B, K, Z), token map (B, h, w))."""
        latent, _, token_map = self.encoder(x)
        return latent, token_map

    def codes_of(self, encoded: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """(merged latent, token map) -> grid codes (B, h, w, G): each position the code of its merged token."""
        latent, token_map = encoded
        return unmerge(lfq_quantize(latent, self.config.factorized_bits), token_map)

    def latent_of(self, codes: torch.Tensor, groups_to_use: int | None = None) -> torch.Tensor:
        """Grid codes (B, h, w, G) -> latent (B, Z, h, w) of +-1; channels of groups >= groups_to_use are 0."""
        return lfq_grid_latent(codes, self.config, groups_to_use)

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """Quantized grid latent (B, Z, h, w) -> images, unclamped."""
        return self.decoder(quant)

    def codebook(self) -> None:
        """None: LFQ has no code table to hand a GPT; the GPT learns its own code embeddings."""
        return None

    def distill_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The distillation head on the encoder's class token (B, num_classes): what training matches to a teacher."""
        if self.config.dist_head is None:
            raise ValueError("this MergeVQ config has dist_head=None: no distillation head")
        check_images(x, self.downsample)
        return self.encoder.dist_head(self.encoder(x)[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the codes (no straight-through estimator)."""
        return self.decode_merged(*self.encode_merged(x))

    @torch.no_grad()
    def encode_merged(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (merged codes (B, K, G) int64 in merge order, token map (B, h, w) int64)."""
        latent, token_map = self.encode(x)
        return lfq_quantize(latent, self.config.factorized_bits), token_map

    @torch.no_grad()
    def decode_merged(self, codes: torch.Tensor, token_map: torch.Tensor,
                      groups_to_use: int | None = None) -> torch.Tensor:
        """Merged codes (B, K, G) + token map (B, h, w) -> images: each code decodes at every position it covers."""
        check_token_map(token_map, codes)
        return self.decode_codes(unmerge(codes, token_map), groups_to_use)
