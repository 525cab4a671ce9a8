"""Taming-VQGAN tokenizers with one code per pixel: LlamaGen's VQ (family llamagen_vq) and SEED-Voken's IBQ (ibq).

Both use the taming-transformers encoder/decoder (GroupNorm-SiLU res blocks, single-head attention blocks,
stride-2 conv downsampling, nearest x2 upsampling); they differ in blocks per level, where attention sits and
the quantizer:
- `cosine` (LlamaGen): codes and latents are L2-normalised, the nearest code is the one of highest cosine, and
  the decoder sees the normalised code row;
- `dot` (IBQ): the code is the argmax of the raw dot product z . E (IBQ trains with a softmax over these
  logits), not the nearest in Euclidean distance, and the decoder sees the raw row.
Parameter names follow IBQ's taming layout (`encoder.down.{level}.block.{i}`, `mid.block_1`, ...); LlamaGen's
files are translated when read (tokenizer/families/vqgan/official.py). Parity with both official implementations is
tested against tests/fixtures/{llamagen_vq,ibq}.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer.common.settings import known_fields, preset_fields
from tokenizer.base import IMAGE_CHANNELS, VQTokenizer, swish

QUANTIZERS = ("cosine", "dot")


@dataclass
class VQGANConfig:
    """Architecture of a single-codebook taming VQGAN. Level 0 is full resolution; each later level halves it."""

    codebook_size: int
    codebook_dim: int  # latent channels the codes live in (LlamaGen 8, IBQ 256)
    quantizer: str  # cosine (LlamaGen) | dot (IBQ)
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2  # encoder blocks per level; the decoder has one more
    attn_levels: list[int] = field(default_factory=lambda: [4])  # levels whose res blocks are followed by attention
    z_channels: int = 256

    def __post_init__(self):
        self.ch_mult, self.attn_levels = list(self.ch_mult), list(self.attn_levels)
        problems = []
        if self.quantizer not in QUANTIZERS:
            problems.append(f"quantizer={self.quantizer!r} is not one of {QUANTIZERS}")
        if len(self.ch_mult) < 1 or self.num_res_blocks < 1:
            problems.append(f"ch_mult={self.ch_mult} and num_res_blocks={self.num_res_blocks} must be non-empty")
        if any(not 0 <= lv < len(self.ch_mult) for lv in self.attn_levels):
            problems.append(f"attn_levels={self.attn_levels} must index the {len(self.ch_mult)} levels of ch_mult")
        if any(self.ch * m % 32 for m in self.ch_mult):  # z (z_channels) meets no GroupNorm
            problems.append(f"ch={self.ch} x ch_mult={self.ch_mult} gives widths that must be multiples of 32 "
                            f"(GroupNorm with 32 groups)")
        if problems:
            raise ValueError("invalid VQGANConfig: " + "; ".join(problems))

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def codebook_groups(self) -> int:
        return 1

    @property
    def codes_per_group(self) -> int:
        return self.codebook_size

    @property
    def latent_channels(self) -> int:
        return self.codebook_dim

    @classmethod
    def preset(cls, name: str, **fields) -> VQGANConfig:
        return cls.from_dict({**preset_fields(PRESETS, name, "VQGAN"), **fields})

    @classmethod
    def from_dict(cls, d: dict) -> VQGANConfig:
        return cls(**known_fields(cls, d))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_LLAMAGEN = {"quantizer": "cosine", "codebook_dim": 8, "num_res_blocks": 2, "z_channels": 256, "ch": 128}
_IBQ = {"quantizer": "dot", "codebook_dim": 256, "num_res_blocks": 4, "z_channels": 256, "ch": 128,
        "ch_mult": [1, 1, 2, 2, 4], "attn_levels": [4]}  # attn_resolutions [16] of a 256px image = level 4
# The released files: LlamaGen vq_ds16_c2i.pt / vq_ds8_c2i.pt; SEED-Voken imagenet256_{1024,...,262144}.ckpt.
PRESETS = {
    "llamagen-vq16": {**_LLAMAGEN, "codebook_size": 16384, "ch_mult": [1, 1, 2, 2, 4], "attn_levels": [4]},
    "llamagen-vq8": {**_LLAMAGEN, "codebook_size": 16384, "ch_mult": [1, 2, 2, 4], "attn_levels": [3]},
    **{f"ibq-{n}": {**_IBQ, "codebook_size": n} for n in (1024, 8192, 16384, 262144)},
    # The quickstart's: 16x16 digits -> 4x4 codes of one 1024-code book (f4, one block per level).
    "llamagen-vq-digits": {**_LLAMAGEN, "codebook_size": 1024, "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1,
                           "attn_levels": [], "z_channels": 32},
    "ibq-digits": {**_IBQ, "codebook_size": 1024, "codebook_dim": 32, "ch": 32, "ch_mult": [1, 2, 2],
                   "num_res_blocks": 1, "attn_levels": [], "z_channels": 32},
}


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w pixels, 1x1 conv projections."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # the official order of operations (two bmm, the scale applied to the scores), not SDPA, whose other
        # rounding flipped a near-tied code; attention sits only at the coarsest level (16x16 at 256px), where its
        # cost is small beside the convolutions
        q, k, v = (m(h).flatten(2) for m in (self.q, self.k, self.v))  # (B, C, HW)
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * int(C) ** -0.5, dim=2)  # (B, HW queries, HW keys)
        y = torch.bmm(v, weights.transpose(1, 2)).reshape(B, C, H, W)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming's asymmetric padding: right and bottom only


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The res blocks of one resolution, each followed by attention when the level has it."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, attention: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out) for i in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(n_blocks if attention else 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class Middle(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Images (B, 3, H, W) -> (B, z_channels, H/f, W/f)."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(IMAGE_CHANNELS, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for lv, c_out in enumerate(widths):
            level = Level(cfg.ch if lv == 0 else widths[lv - 1], c_out, cfg.num_res_blocks, lv in cfg.attn_levels)
            if lv < len(widths) - 1:
                level.downsample = Downsample(c_out)
            self.down.append(level)
        self.mid = Middle(widths[-1])
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
            if hasattr(level, "downsample"):
                x = level.downsample(x)
        return self.conv_out(swish(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> images (B, 3, h*f, w*f); `up[level]` runs from the coarsest level to level 0."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = Middle(widths[-1])
        up = []
        for lv, c_out in enumerate(widths):
            c_in = widths[-1] if lv == len(widths) - 1 else widths[lv + 1]
            level = Level(c_in, c_out, cfg.num_res_blocks + 1, lv in cfg.attn_levels)
            if lv > 0:
                level.upsample = Upsample(c_out)
            up.append(level)
        self.up = nn.ModuleList(up)
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], IMAGE_CHANNELS, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
            if hasattr(level, "upsample"):
                x = level.upsample(x)
        return self.conv_out(swish(self.norm_out(x)))


def chunked_argmax(z: torch.Tensor, table: torch.Tensor, max_elems: int = 2**24) -> torch.Tensor:
    """argmax_k z . table[k] for z (N, d), table (K, d) -> (N,) int64, scoring at most max_elems pairs at a time,
    so a 262144-code table never meets the whole batch at once (IBQ's own code builds (B, K, h, w) logits)."""
    rows = max(1, max_elems // table.shape[0])
    return torch.cat([(part @ table.t()).argmax(dim=-1) for part in z.split(rows)])


class SingleQuantizer(nn.Module):
    """One codebook `embedding.weight` (K, d); `cosine` scores and decodes L2-normalised rows, `dot` raw ones."""

    def __init__(self, codebook_size: int, dim: int, kind: str):
        super().__init__()
        self.kind, self.codebook_size = kind, codebook_size
        self.embedding = nn.Embedding(codebook_size, dim)

    def table(self) -> torch.Tensor:
        """(K, d) float32 rows the codes stand for (what the decoder sees)."""
        w = self.embedding.weight.float()
        return F.normalize(w, dim=-1) if self.kind == "cosine" else w

    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(B, d, h, w) latent -> (B, h, w, 1) int64 codes (float32 scores, outside any autocast)."""
        B, d, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.float().permute(0, 2, 3, 1).reshape(-1, d)
            if self.kind == "cosine":
                flat = F.normalize(flat, dim=-1)
            codes = chunked_argmax(flat, self.table())
        return codes.view(B, h, w, 1)

    def lookup(self, codes: torch.Tensor, groups_to_use: int | None = None) -> torch.Tensor:
        """(B, h, w, 1) codes -> (B, d, h, w) latent; groups_to_use=0 gives zeros (the one group left out)."""
        if codes.ndim != 4 or codes.shape[-1] != 1:
            raise ValueError(f"codes must be (B, h, w, 1), got {tuple(codes.shape)}")
        if groups_to_use not in (None, 0, 1):
            raise ValueError(f"groups_to_use={groups_to_use} must lie in [0, 1] (one codebook)")
        codes = codes.long()
        lo, hi = torch.stack([codes.min(), codes.max()]).tolist()
        if lo < 0 or hi >= self.codebook_size:
            raise ValueError(f"codes range over [{lo}, {hi}], outside [0, {self.codebook_size})")
        rows = F.embedding(codes[..., 0], self.table())  # (B, h, w, d)
        if groups_to_use == 0:
            rows = torch.zeros_like(rows)
        return rows.permute(0, 3, 1, 2).contiguous()


class VQGAN(VQTokenizer):
    """Images (B, 3, H, W) in [-1, 1] <-> codes (B, H/f, W/f, 1); the same public surface as tokenizer.MGVQ."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = c = config
        self.encoder, self.decoder = Encoder(c), Decoder(c)
        self.quantize = SingleQuantizer(c.codebook_size, c.codebook_dim, c.quantizer)
        self.quant_conv = nn.Conv2d(c.z_channels, c.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.codebook_dim, c.z_channels, 1)
