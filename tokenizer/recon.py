"""Reconstruction quality of a tokenizer over an ImageFolder: PSNR, SSIM and per-group codebook usage.

Images are ADM center crops at image_size, encoded to codes and decoded (optionally with only the first
`groups_to_use` groups, MGVQ's coarse-to-fine decoding); both sides are clamped to [-1, 1] and mapped to
[0, 1]. PSNR follows MGVQ's eval_recon.py: 10 log10(1 / MSE) with the MSE averaged over all images.
SSIM is the Gaussian-window SSIM of Wang et al. (11x11, sigma 1.5, on [0, 1]), averaged over images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from tokenizer.base import group_sizes
from tokenizer.common.io import write_json_atomic
from tokenizer.data import ImageViews
from tokenizer.loading import TokenizerRef


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB of images in [0, 1]; inf for identical images."""
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x**2 / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM of each image pair (B,) for x, y (B, C, H, W) in [0, 1]: valid-region Gaussian filtering, mean over C, H, W."""
    C1, C2 = 0.01**2, 0.03**2  # (K * data_range)^2 with data_range 1
    B, C = x.shape[:2]
    g = _gaussian_window(size, sigma).to(x.device)  # float64, as x and y below
    x, y = x.double(), y.double()

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable depthwise Gaussian, no padding
        t = F.conv2d(t, g.view(1, 1, 1, -1).expand(C, 1, 1, size), groups=C)
        return F.conv2d(t, g.view(1, 1, -1, 1).expand(C, 1, size, 1), groups=C)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + C1) * (2 * cov + C2)) / ((mu_x**2 + mu_y**2 + C1) * (var_x + var_y + C2))
    return s.flatten(1).mean(1).float()


def codebook_usage(counts: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per group: fraction of codes used at least once, and perplexity exp(entropy) of the histogram.

    counts (G, K) code histogram; a uniform histogram over K codes has perplexity K, a single code 1.
    """
    counts = counts.double()
    p = counts / counts.sum(1, keepdim=True)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(1)
    used = (counts > 0).double().mean(1)
    return used.tolist(), entropy.exp().tolist()


@dataclass
class ReconDataConfig:
    root: str  # an ImageFolder
    image_size: int = 256
    max_images: int | None = None  # the first N images in ImageFolder order; None = all


@dataclass
class ReconConfig:
    data: ReconDataConfig
    tokenizer: TokenizerRef
    out: str  # JSON file to write
    groups_to_use: int | None = None  # decode with the first groups only (MGVQ's coarse-to-fine); None = all
    batch_size: int = 32
    num_workers: int = 4
    device: str = "auto"  # auto = cuda if available, else cpu


@torch.no_grad()
def eval_recon(cfg: ReconConfig) -> dict:
    """Reconstruction metrics of `cfg.tokenizer` on `cfg.data.root`, written to `cfg.out` as JSON and returned."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    dataset = ImageViews(cfg.data.root, cfg.data.image_size, "plain")
    n = len(dataset) if cfg.data.max_images is None else min(cfg.data.max_images, len(dataset))
    loader = DataLoader(Subset(dataset, range(n)), batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    model = cfg.tokenizer.load().to(device)
    sizes = group_sizes(model.config)
    sq_err, ssim_sum, counts = 0.0, 0.0, [torch.zeros(K, dtype=torch.int64) for K in sizes]
    for _, x, _, errors in tqdm(loader, unit="batch", desc="eval_recon", dynamic_ncols=True):
        if any(errors):
            raise RuntimeError(f"unreadable image {next(e for e in errors if e)}")
        x = x[:, 0].to(device)  # (B, 3, S, S), the plain view
        codes = model.encode_codes(x)  # (B, h, w, G)
        grid = tuple(codes.shape[1:3])
        recon = model.decode_codes(codes, groups_to_use=cfg.groups_to_use)
        real, fake = (x.clamp(-1, 1) + 1) / 2, (recon.float().clamp(-1, 1) + 1) / 2
        sq_err += (fake - real).double().pow(2).flatten(1).mean(1).sum().item()
        ssim_sum += ssim(fake, real).double().sum().item()
        for g, K in enumerate(sizes):
            counts[g] += torch.bincount(codes[..., g].flatten().cpu(), minlength=K)

    usage = [codebook_usage(c[None]) for c in counts]  # per group: its own K
    used, perplexity = [u[0][0] for u in usage], [u[1][0] for u in usage]
    result = {
        "num_images": n,
        "image_size": cfg.data.image_size,
        "groups_to_use": cfg.groups_to_use,
        "psnr": psnr_from_mse(sq_err / n),
        "mse": sq_err / n,
        "ssim": ssim_sum / n,
        "codebook_used": used,  # per group: fraction of the K codes used at least once
        "codebook_perplexity": perplexity,  # per group: exp(entropy) of the code histogram, at most K
        "codes_per_group": sizes[0] if len(set(sizes)) == 1 else sizes,
        "tokenizer_checkpoint": str(cfg.tokenizer.checkpoint),
        "tokenizer_family": cfg.tokenizer.family,
    }
    if hasattr(model.config, "merged_tokens"):  # MergeVQ: the K merged tokens the grid codes came from
        result["merged_tokens"] = model.config.merged_tokens(grid)
    write_json_atomic(cfg.out, result)
    return result
