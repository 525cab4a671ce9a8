"""MGVQ's multi-group quantizer: G independent L2-normalised sub-codebooks stored in one table."""
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

# Size of the official `codebook_used` buffer's last axis (a ring of recent codes, kept for strict loading).
USAGE_WINDOW = 65536


class QuantizerOutput(NamedTuple):
    z_q: torch.Tensor  # (B, C, h, w) quantized latent; straight-through gradient to the normalised input
    codes: torch.Tensor  # (B, h, w, G) int64, code index within each group
    vq_loss: torch.Tensor  # (G,) mean (z_q - sg[z])^2 per group, zero for masked groups
    commit_loss: torch.Tensor  # (G,) beta * mean (sg[z_q] - z)^2 per group, zero for masked groups


class MultiGroupQuantizer(nn.Module):
    """Splits the C latent channels into G groups of d = C/G; group g picks the nearest of its own K codes.

    `embedding.weight` is (G*K, d): group g owns rows [g*K, (g+1)*K). Latent sub-vectors and code rows are
    both L2-normalised, so the nearest code is the one of highest cosine similarity. `chunk_size` bounds
    memory: similarities are computed for that many pixels at a time (G*K floats per pixel).

    Training extras: `mask_probs[g]` is the probability that group g (and, the probabilities being
    non-decreasing, every later group) is zeroed in a forward pass: MGVQ's nested coarse-to-fine masking
    (the official first stage uses (0, 0.2, 0.3, 0.4)). Default off, as in MGVQ's second stage.
    """

    def __init__(self, codebook_size: int, groups: int, group_dim: int, beta: float = 0.25,
                 mask_probs: tuple[float, ...] = (), chunk_size: int | None = None):
        super().__init__()
        if codebook_size % groups:
            raise ValueError(f"codebook_size={codebook_size} is not divisible by groups={groups}")
        self.groups, self.group_dim, self.codes_per_group = groups, group_dim, codebook_size // groups
        self.beta = beta
        self.mask_probs = tuple(mask_probs)
        # Default: about 256 MiB of float32 similarities per chunk.
        self.chunk_size = chunk_size or max(1, 2**26 // codebook_size)
        self.embedding = nn.Embedding(codebook_size, group_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        # Usage statistics of the official training loop; unused here, present so official files load strictly.
        self.register_buffer("codebook_used", torch.zeros(groups, USAGE_WINDOW))
        self.register_buffer("embed_prob", torch.zeros(groups, self.codes_per_group))

    @property
    def mask_probs(self) -> tuple[float, ...]:
        return self._mask_probs

    @mask_probs.setter
    def mask_probs(self, probs: tuple[float, ...]):
        probs = tuple(float(p) for p in probs)
        if len(probs) > self.groups or any(not 0 <= p <= 1 for p in probs) or list(probs) != sorted(probs):
            raise ValueError(f"mask_probs={probs}: expected at most {self.groups} non-decreasing probabilities")
        if probs and probs[0] > 0:
            raise ValueError(f"mask_probs={probs}: group 0 is never masked (its probability must be 0)")
        self._mask_probs = probs

    def normalized_codebook(self) -> torch.Tensor:
        """(G, K, d) L2-normalised code rows, in float32."""
        return F.normalize(self.embedding.weight.float(), dim=-1).view(self.groups, self.codes_per_group, -1)

    def _split(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latent -> (B, h, w, G, d) L2-normalised float32 sub-vectors."""
        C = z.shape[1]
        if C != self.groups * self.group_dim:
            raise ValueError(f"latent has {C} channels, the quantizer expects {self.groups}x{self.group_dim}")
        return F.normalize(rearrange(z.float(), "b (g d) h w -> b h w g d", g=self.groups), dim=-1)

    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code of every group at every pixel: (B, C, h, w) latent -> (B, h, w, G) int64."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            zn = self._split(z)
            B, h, w, G, d = zn.shape
            zn = zn.reshape(-1, G, d).transpose(0, 1)  # (G, N, d)
            table_t = self.normalized_codebook().transpose(1, 2)  # (G, d, K)
            codes = torch.cat([torch.bmm(part, table_t).argmax(dim=-1)  # (G, n, K) -> (G, n)
                               for part in zn.split(self.chunk_size, dim=1)], dim=1)
        return codes.transpose(0, 1).reshape(B, h, w, G)

    def lookup(self, codes: torch.Tensor, groups_to_use: int | None = None) -> torch.Tensor:
        """Codes (B, h, w, G) -> quantized latent (B, C, h, w) of normalised rows; groups >= groups_to_use are zero."""
        G, K = self.groups, self.codes_per_group
        if codes.ndim != 4 or codes.shape[-1] != G:
            raise ValueError(f"codes must be (B, h, w, {G}), got {tuple(codes.shape)}")
        if groups_to_use is None:
            groups_to_use = G
        if not 0 <= groups_to_use <= G:
            raise ValueError(f"groups_to_use={groups_to_use} must lie in [0, {G}]")
        codes = codes.long()
        lo, hi = torch.stack([codes.min(), codes.max()]).tolist()  # one device sync
        if lo < 0 or hi >= K:
            raise ValueError(f"codes range over [{lo}, {hi}], outside [0, {K}) of a group")
        table = self.normalized_codebook().view(G * K, -1)
        rows = F.embedding(codes + torch.arange(G, device=codes.device) * K, table)  # (B, h, w, G, d)
        rows[..., groups_to_use:, :] = 0
        return _merge(rows)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize with a straight-through gradient; in training, apply nested group masking and losses."""
        codes = self.nearest(z)  # (B, h, w, G)
        with torch.autocast(device_type=z.device.type, enabled=False):
            zn = self._split(z)  # (B, h, w, G, d)
            zq = self.normalized_codebook()[torch.arange(self.groups, device=z.device), codes]  # (B, h, w, G, d)
            G = self.groups
            keep = torch.ones(G, dtype=torch.bool, device=z.device)
            zero = zn.new_zeros(G)
            vq_loss, commit_loss = zero, zero
            if self.training:
                if self.mask_probs:
                    u = torch.rand(()).item()  # one draw per batch, as MGVQ: masks a suffix of the groups
                    probs = torch.tensor(self.mask_probs + (0.0,) * (G - len(self.mask_probs)))
                    keep = (u >= probs).to(z.device)
                vq_loss = (zq - zn.detach()).square().mean(dim=(0, 1, 2, 4)) * keep
                commit_loss = self.beta * (zq.detach() - zn).square().mean(dim=(0, 1, 2, 4)) * keep
            zq = zn + (zq - zn).detach()  # straight-through
            zq = zq * keep[:, None]
        z_q = _merge(zq).to(z.dtype)
        return QuantizerOutput(z_q, codes, vq_loss, commit_loss)


def _merge(rows: torch.Tensor) -> torch.Tensor:
    """(B, h, w, G, d) group rows -> (B, G*d, h, w) latent, group g in channels [g*d, (g+1)*d)."""
    return rearrange(rows, "b h w g d -> b (g d) h w").contiguous()
