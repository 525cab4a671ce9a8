"""A PNG grid of class-conditional samples, optionally with each sample's coarse-to-fine strip.

    python scripts/demo_gen.py gpt_ckpt=runs/gpt_b/export/model.pt tokenizer=mgvq-f16c32-g4 \
        tokenizer.checkpoint=mgvq_f16c32_g4.pt cfg_scale=4.0 out=demo.png
    python scripts/demo_gen.py ... class_ids=[207,360] coarse_to_fine=true   # one row per sample: 1..G groups

Every key of SamplerConfig (conf/sample.yaml) and of DemoConfig below can be set as KEY=VALUE.
"""
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torchvision.utils import make_grid

from sampling.sampler import Sampler, SamplerConfig, sample_seeds


@dataclass(kw_only=True)
class DemoConfig(SamplerConfig):
    # golden retriever, otter, red panda, geyser, macaw, valley, balloon, arctic fox (LlamaGen's demo classes)
    class_ids: list[int] = field(default_factory=lambda: [207, 360, 387, 974, 88, 979, 417, 279])
    out: str = "demo.png"
    nrow: int = 4  # images per row of the grid (ignored with coarse_to_fine: one row per sample)
    coarse_to_fine: bool = False  # each sample decoded with its first 1, 2, ..., G groups


def demo(cfg: DemoConfig) -> Path:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sampler_cfg = SamplerConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(SamplerConfig)})
    sampler = Sampler.from_config(sampler_cfg, device)
    labels = torch.tensor(cfg.class_ids)
    if (labels < 0).any() or (labels >= sampler.num_classes).any():
        raise ValueError(f"class_ids={cfg.class_ids}: the model has classes 0..{sampler.num_classes - 1}")
    codes = sampler.codes(labels, sample_seeds(cfg.seed, torch.arange(len(labels))))  # (N, L, G)
    if cfg.coarse_to_fine:
        G = codes.shape[-1]
        strips = [sampler.decode(codes, n) for n in range(1, G + 1)]  # G x (N, H, W, 3)
        images, nrow = torch.from_numpy(np.stack(strips, 1)).flatten(0, 1), G  # (N * G, H, W, 3)
    else:
        images, nrow = torch.from_numpy(sampler.decode(codes, cfg.groups_to_use)), cfg.nrow
    grid = make_grid(images.permute(0, 3, 1, 2), nrow=nrow, padding=2, pad_value=255)  # (3, H', W') uint8
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    os.replace(tmp, out)
    print(f"wrote {out}: classes {cfg.class_ids}" + (" with coarse-to-fine strips" if cfg.coarse_to_fine else ""))
    return out


@hydra.main(version_base=None, config_path="../conf", config_name="demo_gen")
def main(cfg: DictConfig) -> None:
    cfg = OmegaConf.merge(OmegaConf.structured(DemoConfig), cfg)
    demo(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()
