"""A PNG grid of class-conditional samples, optionally with each sample's coarse-to-fine strip (scripts/demo_gen.py)."""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from sampling import zoo
from sampling.sampler import ModelFiles, Sampler, SamplerConfig, sample_seeds
from tokenizer.common.errors import ConfigError
from tokenizer.common.io import atomic_path


@dataclass(kw_only=True)
class DemoConfig(ModelFiles):
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(cfg_scale=4.0))
    # golden retriever, otter, red panda, geyser, macaw, valley, balloon, arctic fox (LlamaGen's demo classes)
    class_ids: list[int] = field(default_factory=lambda: [207, 360, 387, 974, 88, 979, 417, 279])
    out: str = "demo.png"
    nrow: int = 4  # images per row of the grid (ignored with coarse_to_fine: one row per sample)
    coarse_to_fine: bool = False  # each sample decoded with its first 1, 2, ..., G groups


def demo(cfg: DemoConfig) -> Path:
    if cfg.zoo:
        zoo.check_files(zoo.get(cfg.zoo), cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sampler = Sampler.from_files(cfg, cfg.sampler, device)
    labels = torch.tensor(cfg.class_ids)
    if (labels < 0).any() or (labels >= sampler.num_classes).any():
        raise ConfigError(f"class_ids={cfg.class_ids}: the model has classes 0..{sampler.num_classes - 1}")
    codes = sampler.codes(labels, sample_seeds(cfg.sampler.seed, torch.arange(len(labels))))  # (N, L, G)
    if cfg.coarse_to_fine:
        G = codes.shape[-1]
        strips = [sampler.decode(codes, n) for n in range(1, G + 1)]  # G x (N, H, W, 3)
        images, nrow = torch.from_numpy(np.stack(strips, 1)).flatten(0, 1), G  # (N * G, H, W, 3)
    else:
        images, nrow = torch.from_numpy(sampler.decode(codes, cfg.sampler.groups_to_use)), cfg.nrow
    grid = make_grid(images.permute(0, 3, 1, 2), nrow=nrow, padding=2, pad_value=255)  # (3, H', W') uint8
    out = Path(cfg.out)
    with atomic_path(out) as tmp:
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    print(f"wrote {out}: classes {cfg.class_ids}" + (" with coarse-to-fine strips" if cfg.coarse_to_fine else ""))
    return out
