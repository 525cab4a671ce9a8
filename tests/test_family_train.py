"""Training every tokenizer family with one trainer: the recipes, a short run per family that learns and exports a
file load_tokenizer reads back, collapse warnings, bf16, and (two gloo ranks through the script) kill + resume
equal to an uninterrupted run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenizer import TokenizerRef, load_tokenizer
from tokenizer.autoencoders import AUTOENCODERS
from tokenizer.extract import ExtractConfig, ExtractDataConfig, extract
from tokenizer.families.magvit2 import Magvit2Config
from tokenizer.families.mergevq import MergeVQConfig
from tokenizer.families.vqgan.model import VQGANConfig
from tokenizer.recipes import RECIPES, LossConfig, resolve_loss
from tokenizer.train import (
    CodebookConfig,
    ImageDataConfig,
    ImageFolderImages,
    TrainTokenizerConfig,
    build_tokenizer,
    resolve,
    train,
)

TINY = {
    "llamagen_vq": VQGANConfig(codebook_size=32, codebook_dim=4, quantizer="cosine", ch=32, ch_mult=[1, 1],
                               num_res_blocks=1, attn_levels=[], z_channels=32),
    "ibq": VQGANConfig(codebook_size=32, codebook_dim=8, quantizer="dot", ch=32, ch_mult=[1, 1], num_res_blocks=1,
                       attn_levels=[], z_channels=32),
    "open_magvit2": Magvit2Config(ch=32, ch_mult=[1, 1], num_res_blocks=1, z_channels=6, factorized_bits=[2, 4]),
    # 8x8 grid, K drawn per step from 25, 36, 49; a distillation head as wide as the tiny teacher below.
    "mergevq": MergeVQConfig(ch=32, ch_mult=[1, 1], num_res_blocks=1, z_channels=6, factorized_bits=[2, 4],
                             num_att_blocks=2, num_heads=2, merge_num=28, cand_distribution="gaussian-3",
                             dist_head="mlp", num_classes=16),
}
FAMILIES = sorted(TINY)
LFQ_FAMILIES = ("open_magvit2", "mergevq")
# No LPIPS weights in the tests; a small discriminator that starts at step 1.
TEST_LOSS = dict(perceptual_weight=0.0, disc_start=1, disc_channels=8, disc_layers=1)


@pytest.fixture(scope="session")
def teacher(tmp_path_factory) -> Path:
    """A tiny random-weight DINOv2 (width 16, 4x4 patches of 16x16 images) in a local directory."""
    from transformers import Dinov2Config, Dinov2Model  # transformers is slow to import: only these tests pay

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("dinov2")
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             patch_size=4, image_size=16)).save_pretrained(path)
    return path


def family_loss(family: str, teacher: Path) -> dict:
    """The test loss plus, for MergeVQ, its distillation to the tiny teacher at the teacher's image size."""
    return {"distill_teacher": str(teacher), "distill_image_size": 16} if family == "mergevq" else {}

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def config(family: str, root: Path, out: Path, **overrides) -> TrainTokenizerConfig:
    loss = LossConfig(**{**TEST_LOSS, **overrides.pop("loss", {})})
    fields = dict(max_steps=30, global_batch_size=8, lr=3e-3, log_every=10, ckpt_every=1000, seed=5)
    fields.update(overrides)
    return TrainTokenizerConfig(data=ImageDataConfig(root=str(root), image_size=16, hflip=False, num_workers=0),
                                tokenizer=TokenizerRef(config=TINY[family], family=family), out_dir=str(out),
                                loss=loss, codebook=fields.pop("codebook", CodebookConfig()), **fields)


def read_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


# ---- recipes -----------------------------------------------------------------------------------------------

def test_recipes_fill_unset_fields_with_the_official_values_and_keep_set_ones():
    lfq = resolve_loss(LossConfig(), "open_magvit2")
    assert (lfq.l1_weight, lfq.perceptual_weight, lfq.entropy_weight, lfq.beta) == (1, 1, 0.1, 0.25)
    assert lfq.disc_weight == 0.1 and lfq.disc_loss_weight == 1.0
    assert (lfq.g_loss, lfq.lecam_weight, lfq.lecam_decay, lfq.disc_start) == ("non_saturating", 0.05, 0.999, 0)
    ibq = resolve_loss(LossConfig(entropy_weight=0.2), "ibq")
    assert (ibq.entropy_weight, ibq.codebook_weight, ibq.disc_weight, ibq.disc_loss_weight) == (0.2, 1, 0.1, 1)
    vq = resolve_loss(LossConfig(), "llamagen_vq")
    assert (vq.l2_weight, vq.l1_weight, vq.disc_weight, vq.disc_loss_weight, vq.disc_start) == (1, 0, 0.5, 0.5, 20000)
    mgvq = resolve_loss(LossConfig(disc_weight=0.3), "mgvq")
    assert mgvq.disc_loss_weight == 0.3 and mgvq.mask_probs == [0.0, 0.2, 0.3, 0.4]
    merge = resolve_loss(LossConfig(), "mergevq")
    assert (merge.l1_weight, merge.perceptual_weight, merge.entropy_weight, merge.beta, merge.disc_weight) == \
        (1, 1, 0.1, 0.25, 0.1)
    assert (merge.g_loss, merge.lecam_weight, merge.disc_start, merge.distill_weight, merge.distill_temperature) == \
        ("non_saturating", 0.01, 0, 1.0, 4.0)
    assert resolve_loss(LossConfig(), "ibq").distill_weight == 0
    cfg = resolve(config("ibq", Path("."), Path("out"), lr=None, ema=None))
    assert (cfg.lr, cfg.betas, cfg.weight_decay, cfg.grad_clip, cfg.ema) == (1e-4, [0.5, 0.9], 0.0, 0.0, 0.999)
    assert resolve(config("llamagen_vq", Path("."), Path("out"), lr=None)).betas == [0.9, 0.95]
    with pytest.raises(ValueError, match="nested masking is MGVQ's"):
        resolve_loss(LossConfig(mask_probs=[0.0, 0.5]), "ibq")
    with pytest.raises(ValueError, match="g_loss"):
        resolve_loss(LossConfig(g_loss="wasserstein"), "ibq")
    assert set(RECIPES) == set(AUTOENCODERS)


def test_ibq_training_forward_sends_gradient_to_every_code_and_lfq_has_no_codebook():
    torch.manual_seed(0)
    ibq = build_tokenizer(TokenizerRef(config=TINY["ibq"], family="ibq"), LossConfig())
    recon, codes, terms, _ = ibq(torch.rand(2, 3, 16, 16) * 2 - 1)
    (recon.square().mean() + ibq.aux_loss(terms)).backward()
    grad = ibq.tokenizer.quantize.embedding.weight.grad
    assert codes.shape == (2, 8, 8, 1) and (grad.abs().sum(dim=1) > 0).all()
    lfq = build_tokenizer(TokenizerRef(config=TINY["open_magvit2"], family="open_magvit2"), LossConfig())
    recon, codes, terms, _ = lfq(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert codes.shape == (2, 8, 8, 2) and codes[..., 0].max() < 4 and codes[..., 1].max() < 16
    assert set(terms) == {"commit", "sample_entropy", "codebook_entropy"}
    assert not any("quantize" in name for name, _ in lfq.named_parameters())


def test_mergevq_draws_k_per_step_and_distills_its_class_token(teacher, tmp_path):
    torch.manual_seed(0)
    ae = build_tokenizer(TokenizerRef(config=TINY["mergevq"], family="mergevq"),
                         LossConfig(distill_teacher=str(teacher), distill_image_size=16))
    tok, x = ae.tokenizer, torch.rand(3, 3, 16, 16) * 2 - 1
    kept = []
    for step in (0, 50, 99):
        ae.before_step(step)
        kept.append(int(ae(x)[2]["merged_tokens"]))
    assert kept == [25, 36, 49]
    ae.before_step(50)  # K = 36 = the config's: training codes and reconstruction are the tokenizer's own
    recon, codes, terms, latent = ae(x)
    assert latent.shape == (3, 36, 6) and torch.equal(codes, tok.encode_codes(x))
    # The straight-through latent z + (sign(z) - z) is sign(z) up to float rounding, which the decoder's group norms
    # of the code map amplify where a group of codes is constant (variance ~ 0): 1e-3 of the scale.
    want = tok.decode_codes(codes)
    torch.testing.assert_close(recon, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())
    # KL(teacher || student) at T = 4, times 16, by hand: the teacher's class token and the student's head.
    student = tok.encoder.dist_head(tok.encoder(x)[1]) / 4
    target = ae.teacher(x) / 4
    p = target.softmax(-1)
    want = (p * (p.log() - student.log_softmax(-1))).sum(-1).mean() * 16
    torch.testing.assert_close(terms["distill"], want, rtol=1e-5, atol=0)
    assert set(terms) == {"commit", "sample_entropy", "codebook_entropy", "distill", "merged_tokens"}
    ae.aux_loss(terms).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tok.encoder.dist_head.parameters())
    with pytest.raises(FileNotFoundError, match=f"distill_teacher={tmp_path / 'none'}: no DINOv2 model there"):
        build_tokenizer(TokenizerRef(config=TINY["mergevq"], family="mergevq"),
                        LossConfig(distill_teacher=str(tmp_path / "none")))
    with pytest.raises(ValueError, match="needs loss.distill_teacher"):
        build_tokenizer(TokenizerRef(config=TINY["mergevq"], family="mergevq"), LossConfig())
    with pytest.raises(ValueError, match="class-token distillation is MergeVQ's"):
        resolve_loss(LossConfig(distill_weight=1.0), "open_magvit2")


# ---- runs --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_learns_and_its_export_loads_back(digits, tmp_path, teacher, family):
    out = tmp_path / family
    path = train(config(family, digits, out, loss=family_loss(family, teacher)))
    log = read_log(out)
    rec = "l2" if family == "llamagen_vq" else "l1"
    assert [r["step"] for r in log] == [10, 20, 30] and log[-1][rec] < 0.8 * log[0][rec]
    assert "g_adv" in log[-1] and "d_loss" in log[-1]
    if family == "mergevq":  # step s keeps the K at quantile s/100 of 25 / 36 / 49 (cumulative 0.13046, 0.86954, 1)
        assert [r["merged_tokens"] for r in log] == pytest.approx([25, (4 * 25 + 6 * 36) / 10, 36])
        assert log[-1]["distill"] > 0
    sizes = [32] if family not in LFQ_FAMILIES else [4, 16]
    assert all(len(r["code_usage"]) == len(sizes) and all(0 < u <= 1 for u in r["code_usage"]) for r in log)
    assert all(r["codes_used"] == [round(u * K) for u, K in zip(r["code_usage"], sizes)] for r in log)
    assert all(1 <= p <= K for r in log for p, K in zip(r["perplexity"], sizes))
    if family != "llamagen_vq":  # the entropy terms of IBQ and LFQ are logged; LlamaGen's weight is 0
        assert log[-1]["codebook_entropy"] > 0 and "lecam" in log[-1]
    tok = load_tokenizer(path, family=family)
    assert tok.config.to_dict() == TINY[family].to_dict()
    if family == "mergevq":  # merge_num is how the weights run, not what they are: another K loads
        unmerged = load_tokenizer(path, {**TINY[family].to_dict(), "merge_num": 0}, family=family)
        assert unmerged.encode_merged(torch.zeros(1, 3, 16, 16))[0].shape == (1, 64, 2)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    codes = tok.encode_codes(x)
    assert codes.shape == (3, 8, 8, len(sizes)) and tok.decode_codes(codes).shape == x.shape
    # The exported file is what extract_codes takes: the store holds the same codes as the tokenizer gives.
    meta = extract(ExtractConfig(data=ExtractDataConfig(root=str(digits), image_size=16, views="plain"),
                                 tokenizer=TokenizerRef(checkpoint=str(path), family=family),
                                 out_dir=str(tmp_path / "codes"), batch_size=16, num_workers=0))
    stored = np.load(tmp_path / "codes" / "codes.npy")  # (N, 1, 8, 8, G)
    first = torch.stack([ImageFolderImages(str(digits), 16, hflip=False)[(i, False)] for i in range(4)])
    assert meta["family"] == family and stored.shape == (64, 1, 8, 8, len(sizes))
    assert np.array_equal(stored[:4, 0].astype(np.int64), tok.encode_codes(first).numpy())


def test_collapse_warns_naming_the_step(digits, tmp_path):
    cfg = config("ibq", digits, tmp_path / "c", max_steps=3, log_every=1,
                 codebook=CodebookConfig(collapse_usage=1.01, collapse_lines=2))  # every window "collapses"
    with pytest.warns(RuntimeWarning, match=r"codebook collapse at step 2: group\(s\) \[0\]") as record:
        train(cfg)
    assert [str(w.message).split(":")[0] for w in record if "collapse" in str(w.message)] == \
        ["codebook collapse at step 2", "codebook collapse at step 3"]


def test_bf16_run_is_finite(digits, tmp_path):
    train(config("open_magvit2", digits, tmp_path / "bf16", max_steps=4, log_every=2, precision="bf16"))
    log = read_log(tmp_path / "bf16")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log) and log[-1]["codebook_entropy"] > 0


# ---- two processes: kill + resume == straight --------------------------------------------------------------

PRESET = {"llamagen_vq": "llamagen-vq-digits", "ibq": "ibq-digits", "open_magvit2": "open-magvit2-digits",
          "mergevq": "mergevq-digits"}
# The digits preset has no distillation head: one as wide as the tiny teacher.
PRESET_ARGS = {"mergevq": ["tokenizer.config.dist_head=mlp", "tokenizer.config.num_classes=16"]}


def launch(repo: Path, family: str, root: Path, out: Path, max_steps: int, port: int, teacher: Path) -> None:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(repo / "scripts" / "train_tokenizer.py"), f"tokenizer={PRESET[family]}", f"data.root={root}",
           "data.image_size=16", "data.hflip=true", "data.num_workers=0", f"out_dir={out}", f"max_steps={max_steps}",
           "global_batch_size=8", "log_every=2", "ckpt_every=2", "ema=0.9", "lr=2e-3",
           *[f"loss.{k}={v}" for k, v in {**TEST_LOSS, **family_loss(family, teacher)}.items()],
           *PRESET_ARGS.get(family, [])]
    done = subprocess.run(cmd, cwd=repo, env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("family", FAMILIES)
def test_two_ranks_killed_and_resumed_equal_a_straight_run(digits, tmp_path, repo, teacher, family):
    port = 29750 + FAMILIES.index(family)
    launch(repo, family, digits, tmp_path / "a", 4, port, teacher)
    launch(repo, family, digits, tmp_path / "b", 2, port, teacher)  # "killed" after its step-2 checkpoint
    launch(repo, family, digits, tmp_path / "b", 4, port, teacher)
    state = json.loads((tmp_path / "b" / "checkpoints" / "step_0000004" / "train_state.json").read_text())
    assert state["num_processes"] == 2 and state["config"]["loss"]["g_loss"] == RECIPES[family]["g_loss"]
    a, b = (torch.load(tmp_path / d / "export" / "tokenizer.pt", weights_only=True)["model"] for d in "ab")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    timing = ("images_per_s", "steps_per_s")
    log_a, log_b = ([{k: v for k, v in r.items() if k not in timing} for r in read_log(tmp_path / d)] for d in "ab")
    assert [r["step"] for r in log_a] == [2, 4] and log_a == log_b and "d_loss" in log_a[-1]
    assert family != "mergevq" or log_a[-1]["distill"] > 0  # the class token distilled to the tiny teacher
