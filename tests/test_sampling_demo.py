"""The demo grid: through the Sampler, one row per sample with coarse_to_fine, the full decode equal to a plain sample."""
import numpy as np
import torch
from PIL import Image

from sampling.demo import DemoConfig, demo
from sampling.sampler import Sampler, SamplerConfig, sample_seeds
from tokenizer import MGVQConfig, TokenizerRef

OFFICIAL = {"dim": 64, "n_layer": 2, "n_head": 4, "block_size": 64, "num_classes": 10}


def test_demo_grid_with_coarse_to_fine_strips(golden, tmp_path):
    tok = torch.load(golden / "tokenizer_tiny_expected.pt", weights_only=True)["config"]
    cfg = DemoConfig(
        gpt_ckpt=str(golden / "gpt_tiny.pt"), gpt_official=OFFICIAL,
        sampler=SamplerConfig(cfg_scale=3.0, top_k=20, seed=3),
        tokenizer=TokenizerRef(config=MGVQConfig.from_dict(tok), checkpoint=str(golden / "tokenizer_tiny.pt")),
        class_ids=[4, 9], coarse_to_fine=True, out=str(tmp_path / "demo.png"))
    grid = np.asarray(Image.open(demo(cfg)))
    assert grid.shape == (2 * 66 + 2, 4 * 66 + 2, 3)  # 2 samples x G=4 decodes of 64px, 2px padding
    tiles = [[grid[2 + 66 * r:66 * (r + 1), 2 + 66 * c:66 * (c + 1)] for c in range(4)] for r in range(2)]
    sampler = Sampler.from_files(cfg, cfg.sampler)
    full = sampler.sample(torch.tensor([4, 9]), sample_seeds(3, torch.arange(2)))  # (2, 64, 64, 3)
    assert np.array_equal(tiles[0][3], full[0]) and np.array_equal(tiles[1][3], full[1])  # all groups = the sample
    assert not np.array_equal(tiles[0][0], tiles[0][3])  # one group decodes to something coarser
