"""One pipeline for every tokenizer family: extract -> train (2 gloo ranks) -> sample -> recon, with a tiny
random-weight LlamaGen VQ and IBQ tokenizer saved in this project's file format."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sampling.sampler import ModelFiles, Sampler, SamplerConfig
from tokenizer import TokenizerRef, save_tokenizer
from tokenizer.data import ImageViews
from tokenizer.extract import ExtractConfig, ExtractDataConfig, extract
from tokenizer.recon import ReconConfig, ReconDataConfig, eval_recon
from tokenizer.store import CodeStore, StoreMismatchError
from tokenizer.families.vqgan.model import VQGAN, VQGANConfig

# IBQ with more than 65536 codes: the store holds uint32.
FAMILIES = {"llamagen_vq": ("cosine", 64, np.uint16), "ibq": ("dot", 65600, np.uint32)}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory, golden):
    """(family, TokenizerRef, images dir, code store dir): a tiny tokenizer saved and its codes extracted."""
    name = request.param
    quantizer, codes, _ = FAMILIES[name]
    torch.manual_seed(3)
    model = VQGAN(VQGANConfig(codebook_size=codes, codebook_dim=8, quantizer=quantizer, ch=32, ch_mult=[1, 2, 2],
                              num_res_blocks=1, attn_levels=[2], z_channels=32)).eval()
    tmp = tmp_path_factory.mktemp(name)
    save_tokenizer(model, tmp / "tokenizer.pt")
    ref = TokenizerRef(checkpoint=str(tmp / "tokenizer.pt"), family=name)
    images = golden / "e2e" / "images"
    extract(ExtractConfig(data=ExtractDataConfig(root=str(images), image_size=16), tokenizer=ref,
                          out_dir=str(tmp / "codes"), batch_size=4, num_workers=0))
    return name, ref, images, tmp / "codes"


def test_extraction_records_the_family_and_dtype(family):
    name, ref, images, codes_dir = family
    store = CodeStore(codes_dir)
    assert store.meta["family"] == name and store.codes.dtype == FAMILIES[name][2]
    assert store.meta["dtype"] == np.dtype(FAMILIES[name][2]).name and store.meta["codes_per_group"] == FAMILIES[name][1]
    x = torch.stack([ImageViews(str(images), 16)[i][1][0] for i in range(len(store))])  # view 0 of every image
    want = ref.load().encode_codes(x).numpy()  # (N, 4, 4, 1)
    np.testing.assert_array_equal(store.codes[:, 0].astype(np.int64), want)


def test_a_rerun_with_another_family_is_refused(family, tmp_path):
    name, ref, images, codes_dir = family
    other = "ibq" if name == "llamagen_vq" else "llamagen_vq"
    quantizer, codes, _ = FAMILIES[other]
    save_tokenizer(VQGAN(VQGANConfig.from_dict({**ref.load().config.to_dict(), "quantizer": quantizer,
                                                "codebook_size": codes})), tmp_path / "other.pt")
    with pytest.raises(StoreMismatchError, match=f"family: '{name}' on disk, '{other}' now"):
        extract(ExtractConfig(data=ExtractDataConfig(root=str(images), image_size=16),
                              tokenizer=TokenizerRef(checkpoint=str(tmp_path / "other.pt"), family=other),
                              out_dir=str(codes_dir), batch_size=4, num_workers=0))


def test_train_two_ranks_then_sample_and_recon(family, repo, tmp_path):
    name, ref, images, codes_dir = family
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(repo / "scripts/train_gpt.py"), f"data.codes_dir={codes_dir}", f"tokenizer.checkpoint={ref.checkpoint}",
           f"tokenizer.family={name}", "model=tiny", "model.dim=16", "model.n_head=2", "model.input_embedding=learned",
           "max_steps=3", "global_batch_size=4", "precision=fp32", "log_every=1", "ckpt_every=1000",
           "data.num_workers=0", f"out_dir={tmp_path / 'run'}"]
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [r["num_processes"] for r in log] == [2] * 3 and all(np.isfinite(r["loss"]) for r in log)
    assert abs(log[0]["loss"] - np.log(FAMILIES[name][1])) < 1.0  # near-uniform start over the whole codebook

    files = ModelFiles(gpt_ckpt=str(tmp_path / "run/export/model.pt"), tokenizer=ref)
    sampler = Sampler.from_files(files, SamplerConfig(cfg_scale=1.5, top_k=8, seed=0))
    assert sampler.gpt.config.codes_per_group == FAMILIES[name][1] and sampler.gpt.config.codebook_groups == 1
    labels = torch.tensor([0, 1])
    codes = sampler.codes(labels, torch.tensor([5, 6]))
    assert codes.shape == (2, 16, 1) and 0 <= codes.min() and codes.max() < FAMILIES[name][1]
    images_u8 = sampler.sample(labels, torch.tensor([5, 6]))
    assert images_u8.shape == (2, 16, 16, 3) and images_u8.dtype == np.uint8
    assert np.array_equal(images_u8, sampler.sample(labels, torch.tensor([5, 6])))  # seeded

    out = eval_recon(ReconConfig(data=ReconDataConfig(root=str(images), image_size=16), tokenizer=ref,
                                 out=str(tmp_path / "recon.json"), batch_size=4, num_workers=0, device="cpu"))
    assert out["tokenizer_family"] == name and out["codes_per_group"] == FAMILIES[name][1]
    assert np.isfinite(out["psnr"]) and 0 < out["codebook_used"][0] <= 1
