"""Reconstruction metrics: PSNR, SSIM and codebook usage against hand-computed values, and eval_recon end to end."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import torch
import torch.nn.functional as F

from tokenizer import MGVQConfig, TokenizerRef
from tokenizer.data import ImageViews
from tokenizer.recon import ReconConfig, ReconDataConfig, codebook_usage, eval_recon, psnr_from_mse, ssim


def reference_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Wang et al. written out: a full 11x11 Gaussian window at every valid position, float64."""
    g = torch.exp(-(torch.arange(11, dtype=torch.float64) - 5) ** 2 / (2 * 1.5**2))
    w = torch.outer(g, g) / torch.outer(g, g).sum()  # (11, 11)
    px = F.unfold(x.double(), 11).unflatten(1, (x.shape[1], 121))  # (B, C, 121, positions)
    py = F.unfold(y.double(), 11).unflatten(1, (y.shape[1], 121))
    w = w.flatten()[:, None]
    mx, my = (px * w).sum(2), (py * w).sum(2)
    vx, vy = (px**2 * w).sum(2) - mx**2, (py**2 * w).sum(2) - my**2
    cxy = (px * py * w).sum(2) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def test_ssim_psnr_and_usage_match_hand_computed_values():
    x = torch.rand(3, 3, 20, 24)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    torch.testing.assert_close(ssim(x, y).double(), reference_ssim(x, y), rtol=0, atol=1e-6)
    torch.testing.assert_close(ssim(x, x), torch.ones(3))
    # Constant images: no variance, so SSIM is the luminance term (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 0.3, 0.7
    want = (2 * a * b + 1e-4) / (a * a + b * b + 1e-4)
    got = ssim(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b))
    assert abs(got.item() - want) < 1e-6

    assert psnr_from_mse(0.0) == math.inf
    assert abs(psnr_from_mse(0.01) - 20.0) < 1e-12  # a uniform error of 0.1 on [0, 1] images is 20 dB

    K = 8
    counts = torch.stack([torch.full((K,), 5), torch.tensor([9, 0, 0, 0, 0, 0, 0, 0]), torch.tensor([3, 3, 3, 3, 0, 0, 0, 0])])
    used, perplexity = codebook_usage(counts)
    assert used == [1.0, 1 / K, 0.5]
    np.testing.assert_allclose(perplexity, [K, 1.0, K / 2], rtol=1e-12)


def test_eval_recon_on_the_golden_tokenizer(tmp_path, golden):
    config = TokenizerRef(
        config=MGVQConfig.from_dict(torch.load(golden / "tokenizer_tiny_expected.pt", weights_only=True)["config"]),
        checkpoint=str(golden / "tokenizer_tiny.pt"))
    cfg = ReconConfig(data=ReconDataConfig(root=str(golden / "e2e" / "images"), image_size=64), tokenizer=config,
                      out=str(tmp_path / "recon.json"), batch_size=4, num_workers=0, device="cpu")
    result = eval_recon(cfg)
    assert json.loads((tmp_path / "recon.json").read_text()) == result

    # The same numbers by hand, on all six images at once.
    model = config.load()
    x = torch.stack([ImageViews(cfg.data.root, 64)[i][1][0] for i in range(6)])  # (6, 3, 64, 64)
    with torch.no_grad():
        codes = model.encode_codes(x)
        recon = model.decode_codes(codes)
    real, fake = (x + 1) / 2, (recon.clamp(-1, 1) + 1) / 2
    mse = (fake - real).double().pow(2).mean().item()
    assert result["num_images"] == 6
    assert abs(result["psnr"] - 10 * math.log10(1 / mse)) < 1e-6
    assert abs(result["ssim"] - reference_ssim(fake, real).mean().item()) < 1e-5
    counts = torch.stack([torch.bincount(codes[..., g].flatten(), minlength=64) for g in range(4)])
    used, perplexity = codebook_usage(counts)
    assert result["codebook_used"] == used and np.allclose(result["codebook_perplexity"], perplexity, rtol=1e-12)
    assert all(1 <= p <= 64 for p in perplexity)

    coarse = eval_recon(dataclasses.replace(cfg, groups_to_use=2, out=str(tmp_path / "coarse.json")))
    with torch.no_grad():
        fake2 = (model.decode_codes(codes, groups_to_use=2).clamp(-1, 1) + 1) / 2
    mse2 = (fake2 - real).double().pow(2).mean().item()
    assert mse2 != mse and abs(coarse["mse"] - mse2) < 1e-9
    assert coarse["groups_to_use"] == 2 and coarse["codebook_used"] == used  # same codes, fewer groups decoded
