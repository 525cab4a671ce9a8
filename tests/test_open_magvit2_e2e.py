"""End to end on Open-MAGVIT2 codes: extract -> train a factorized and an ar GPT on them (2 gloo ranks each) ->
sample -> reconstruction metrics, with the tiny official-layout tokenizer of tests/fixtures/open_magvit2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from sampling.sampler import SampleRunConfig, SamplerConfig, run
from tokenizer.data import ImageViews, list_images
from tokenizer.extract import ExtractConfig, ExtractDataConfig, extract
from tokenizer.families.magvit2 import Magvit2Config
from tokenizer.loading import TokenizerRef
from tokenizer.recon import ReconConfig, ReconDataConfig, eval_recon
from tokenizer.store import CodeStore

FIXTURES = Path(__file__).parent / "fixtures" / "open_magvit2"
TINY = {"ch": 32, "ch_mult": [2, 1], "num_res_blocks": 1, "z_channels": 5, "factorized_bits": [2, 3]}


def lightning_ckpt(path: Path) -> Path:
    sd = {**torch.load(FIXTURES / "tokenizer_raw.pt", weights_only=True)["state_dict"],
          **torch.load(FIXTURES / "tokenizer_ema.pt", weights_only=True)["state_dict"]}
    torch.save({"state_dict": sd}, path)
    return path


def train_two_ranks(repo: Path, store: Path, ckpt: Path, out_dir: Path, head: str) -> list[dict]:
    overrides = [f"data.codes_dir={store}", f"tokenizer.checkpoint={ckpt}", "model=tiny", "model.dim=32",
                 "model.n_layer=2", "model.n_head=2", "model.codebook_groups=null", "model.codes_per_group=null",
                 "model.grid_size=null", "model.num_classes=null", "model.input_embedding=learned",
                 f"model.head={head}", "model.ar_head_layers=1", "max_steps=20", "global_batch_size=4", "lr=3e-3",
                 "precision=fp32", "log_every=10", "ckpt_every=20", "data.num_workers=0", "model.token_dropout_p=0",
                 "model.resid_dropout_p=0", "model.ffn_dropout_p=0", f"out_dir={out_dir}"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(repo / "scripts/train_gpt.py"), *overrides]
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def test_extract_train_sample_recon(tmp_path, golden, repo, fresh_accelerate_state):
    root = golden / "e2e" / "images"
    ckpt = lightning_ckpt(tmp_path / "tokenizer.ckpt")
    ref = TokenizerRef(config=Magvit2Config(**TINY), checkpoint=str(ckpt), family="open_magvit2", weights="raw")

    store = tmp_path / "codes"
    meta = extract(ExtractConfig(data=ExtractDataConfig(root=str(root), image_size=8, views="flip"), tokenizer=ref,
                                 out_dir=str(store), batch_size=4, num_workers=0))
    assert (meta["family"], meta["codes_per_group"], meta["grid"], meta["groups"]) == ("open_magvit2", [4, 8], [4, 4], 2)
    codes = torch.from_numpy(CodeStore(store).codes[:].astype(np.int64))  # (6, 2, 4, 4, 2)
    files, labels, _ = list_images(str(root))
    views = torch.stack([ImageViews(str(root), 8, "flip", 1.1, files, labels)[i][1] for i in range(len(files))])
    assert torch.equal(codes, ref.load().encode_codes(views.flatten(0, 1)).view(codes.shape))

    for head in ("factorized", "ar"):
        log = train_two_ranks(repo, store, ckpt, tmp_path / head, head)
        assert [r["num_processes"] for r in log] == [2, 2]
        assert log[-1]["loss"] < log[0]["loss"]
        config = torch.load(tmp_path / head / "export" / "model.pt", weights_only=True)["config"]
        assert (config["codes_per_group"], config["head"]) == ([4, 8], head)

        npz = run(SampleRunConfig(gpt_ckpt=str(tmp_path / head / "export" / "model.pt"), tokenizer=ref,
                                  sampler=SamplerConfig(cfg_scale=[1.5, 2.0], temperature=[1.1, 1.0]),
                                  out_dir=str(tmp_path / f"samples_{head}"), num_samples=4, batch_size=2))
        images = np.load(npz)["arr_0"]
        assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8

    result = eval_recon(ReconConfig(data=ReconDataConfig(root=str(root), image_size=16), tokenizer=ref,
                                    out=str(tmp_path / "recon.json"), num_workers=0, device="cpu"))
    assert result["codes_per_group"] == [4, 8] and np.isfinite(result["psnr"])
    assert all(0 < u <= 1 for u in result["codebook_used"]) and result["codebook_perplexity"][0] <= 4
