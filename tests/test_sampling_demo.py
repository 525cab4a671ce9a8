"""The demo grid and the hydra configs of the sampling scripts."""
import dataclasses
import importlib.util

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from sampling.sampler import SampleRunConfig, Sampler, sample_seeds
from tokenizer import TokenizerConfig

OFFICIAL = {"dim": 64, "n_layer": 2, "n_head": 4, "block_size": 64, "num_classes": 10}


@pytest.fixture(scope="module")
def demo_module(repo):
    spec = importlib.util.spec_from_file_location("demo_gen", repo / "scripts" / "demo_gen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_grid_with_coarse_to_fine_strips(demo_module, golden, tmp_path):
    tok = torch.load(golden / "tokenizer_tiny_expected.pt", weights_only=True)["config"]
    cfg = demo_module.DemoConfig(
        gpt_ckpt=str(golden / "gpt_tiny.pt"), gpt_official=OFFICIAL, cfg_scale=3.0, top_k=20, seed=3,
        tokenizer=TokenizerConfig.from_dict({**tok, "checkpoint": str(golden / "tokenizer_tiny.pt")}),
        class_ids=[4, 9], coarse_to_fine=True, out=str(tmp_path / "demo.png"))
    grid = np.asarray(Image.open(demo_module.demo(cfg)))
    assert grid.shape == (2 * 66 + 2, 4 * 66 + 2, 3)  # 2 samples x G=4 decodes of 64px, 2px padding
    tiles = [[grid[2 + 66 * r:66 * (r + 1), 2 + 66 * c:66 * (c + 1)] for c in range(4)] for r in range(2)]
    sampler = Sampler.from_config(cfg)
    full = sampler.sample(torch.tensor([4, 9]), sample_seeds(3, torch.arange(2)))  # (2, 64, 64, 3)
    assert np.array_equal(tiles[0][3], full[0]) and np.array_equal(tiles[1][3], full[1])  # all groups = the sample
    assert not np.array_equal(tiles[0][0], tiles[0][3])  # one group decodes to something coarser


@pytest.mark.parametrize("name, schema", [("sample", SampleRunConfig), ("demo_gen", None)])
def test_configs_hold_exactly_the_dataclass_fields(name, schema, repo, demo_module):
    schema = schema or demo_module.DemoConfig
    conf = OmegaConf.to_container(OmegaConf.load(repo / "conf" / f"{name}.yaml"))
    keys = set(conf) - {"defaults", "hydra"}
    assert keys == {f.name for f in dataclasses.fields(schema)}
    assert conf["tokenizer"] == {"checkpoint": "???"}  # the architecture comes from the tokenizer group
