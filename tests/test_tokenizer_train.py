"""Tokenizer training: losses by hand, nested masking, straight-through gradients, code re-seeding, a short run
that learns, export round trip through load_tokenizer, kill + resume equal to a straight run."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from tokenizer import MGVQ, MGVQConfig, TokenizerRef, load_tokenizer
from tokenizer.autoencoders import code_counts, reseed_dead_codes
from tokenizer.common.runs import GlobalBatchSampler
from tokenizer.families.mgvq.quantizer import MultiGroupQuantizer
from tokenizer.losses import LPIPS, charbonnier, hinge_d_loss, hinge_g_loss, l2
from tokenizer.recipes import LossConfig
from tokenizer.train import (
    CodebookConfig,
    ImageDataConfig,
    ImageFolderImages,
    TrainTokenizerConfig,
    build_tokenizer,
    train,
)

TINY = {
    "latent_channels": 8, "codebook_size": 32, "codebook_groups": 2,
    "encoder": {"width_list": [8, 16, 16], "depth_list": [0, 1, 1], "block_type": "ResBlock"},
    "decoder": {"width_list": [8, 16, 16], "depth_list": [0, 1, 1], "block_type": "ResBlock", "norm": "bn2d",
                "act": "relu"},
}


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def run_config(root: Path, out_dir: Path, **overrides) -> TrainTokenizerConfig:
    fields = dict(max_steps=30, global_batch_size=16, lr=3e-3, log_every=10, ckpt_every=1000, seed=3)
    fields.update(overrides)
    return TrainTokenizerConfig(
        data=ImageDataConfig(root=str(root), image_size=16, hflip=True, num_workers=0),
        tokenizer=TokenizerRef(config=MGVQConfig.from_dict(TINY)),
        out_dir=str(out_dir),
        loss=fields.pop("loss", LossConfig(mask_probs=[0.0, 0.3])),
        codebook=fields.pop("codebook", CodebookConfig(reseed_every=5, usage_decay=0.9)),
        **fields,
    )


def read_log(out_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


# ---- losses ------------------------------------------------------------------------------------------------

def test_losses_match_hand_computed_values():
    x = torch.tensor([[0.5, -1.0], [0.25, 0.0]])
    y = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    eps = 0.1
    diffs = [0.5, 0.0, -0.75, 0.0]
    assert charbonnier(x, y, eps).item() == pytest.approx(sum(math.sqrt(d * d + eps * eps) for d in diffs) / 4)
    assert l2(x, y).item() == pytest.approx(sum(d * d for d in diffs) / 4)
    real, fake = torch.tensor([2.0, 0.5, -0.5]), torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - real) = [0, 0.5, 1.5]; relu(1 + fake) = [0, 1, 2.5]
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.0 / 3 + 3.5 / 3))
    assert hinge_g_loss(fake).item() == pytest.approx(0.5 / 3)  # -mean(fake)


def test_vq_and_commit_losses_are_the_squared_distance_to_the_chosen_codes():
    q = MultiGroupQuantizer(codebook_size=12, groups=3, group_dim=2, beta=0.25).train()
    z = torch.randn(2, 6, 3, 3)
    out = q(z)
    zn = F.normalize(z.permute(0, 2, 3, 1).reshape(2, 3, 3, 3, 2), dim=-1)  # (B, h, w, G, d)
    rows = q.normalized_codebook()[torch.arange(3), out.codes]  # (B, h, w, G, d)
    want = (rows - zn).square().mean(dim=(0, 1, 2, 4))  # (G,)
    torch.testing.assert_close(out.vq_loss, want)
    torch.testing.assert_close(out.commit_loss, 0.25 * want)


def test_lpips_from_local_files(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    features = {f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}
    torch.save(features, tmp_path / "vgg16.pth")
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(LPIPS.CHANNELS)}
    torch.save(lins, tmp_path / "lin.pth")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        LPIPS(tmp_path / "absent.pth", tmp_path / "lin.pth")
    lpips = LPIPS(tmp_path / "vgg16.pth", tmp_path / "lin.pth")
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()
    torch.testing.assert_close(lpips(x, x), torch.zeros(2))
    torch.testing.assert_close(lpips(y, x), d)
    # By hand for the first tap: unit-normalised relu1_2 features, squared difference, lin0, spatial mean.
    scale = lambda t: (t - lpips.shift) / lpips.scale  # noqa: E731
    fx, fy = lpips.features[:4](scale(x)), lpips.features[:4](scale(y))
    fx, fy = fx / (fx.norm(dim=1, keepdim=True) + 1e-10), fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
    tap0 = ((fx - fy).square() * lins["lin0.model.1.weight"]).sum(dim=1).mean(dim=(1, 2))
    lins["lin0.model.1.weight"].zero_()
    torch.save(lins, tmp_path / "lin.pth")
    torch.testing.assert_close(d - LPIPS(tmp_path / "vgg16.pth", tmp_path / "lin.pth")(x, y), tap0)


# ---- quantizer in training ---------------------------------------------------------------------------------

def test_nested_masking_drops_trailing_groups_with_the_configured_probabilities():
    probs = [0.0, 0.2, 0.5, 0.7]
    tok = build_tokenizer(TokenizerRef(config=MGVQConfig.from_dict({**TINY, "codebook_groups": 4})),
                          LossConfig(mask_probs=probs))
    q = tok.tokenizer.quantize
    z = torch.randn(1, 8, 2, 2)
    n, masked = 3000, torch.zeros(4)
    for _ in range(n):
        out = q(z)
        zero = (out.z_q.view(1, 4, 2, 2, 2) == 0).all(dim=(0, 2, 3, 4))  # (G,) group entirely zero
        assert (out.vq_loss[zero] == 0).all() and (out.commit_loss[zero] == 0).all()
        assert (out.vq_loss[~zero] > 0).all()
        assert torch.equal(zero, zero.cummax(0).values)  # nested: once a group is dropped, all later ones are
        masked += zero
    # Binomial standard deviations are below 0.01 here: 0.04 is four of them.
    np.testing.assert_allclose((masked / n).numpy(), probs, atol=0.04)
    q.eval()
    assert not (q(z).z_q == 0).all(dim=(0, 2, 3)).any()  # never masked outside training


def test_straight_through_gradient_is_the_identity_on_the_normalised_latent():
    q = MultiGroupQuantizer(codebook_size=16, groups=2, group_dim=4).train()
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    w = torch.randn(2, 8, 3, 3)
    out = q(z)
    # Forward: exactly the chosen (normalised) code rows.
    torch.testing.assert_close(out.z_q, q.lookup(out.codes))
    (out.z_q * w).sum().backward()
    # Backward: as if quantization were not there, i.e. the gradient of the L2 normalisation alone.
    z2 = z.detach().clone().requires_grad_(True)
    zn = F.normalize(z2.view(2, 2, 4, 3, 3), dim=2).view(2, 8, 3, 3)
    (zn * w).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad)
    assert q.embedding.weight.grad is None  # codes learn through the VQ loss only


# ---- code usage and re-seeding -----------------------------------------------------------------------------

def test_code_counts():
    codes = torch.tensor([[[[0, 3], [1, 3]], [[2, 3], [3, 3]]]])  # (1, 2, 2, G=2), K = 4
    torch.testing.assert_close(code_counts(codes, [4, 4]), torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 4]))
    # Groups of different sizes (Open-MAGVIT2's factorized sub-tokens): each group's codes after the previous ones'.
    torch.testing.assert_close(code_counts(codes, [4, 2**3]), torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 4, 0, 0, 0, 0]))


def test_reseed_replaces_dead_codes_with_encoder_outputs():
    torch.manual_seed(0)
    G, K, d = 2, 8, 4
    q = MultiGroupQuantizer(codebook_size=G * K, groups=G, group_dim=d)
    q.embed_prob.fill_(1.0 / K)
    dead = {0: [1, 5], 1: [0, 2, 7]}
    for g, ks in dead.items():
        q.embed_prob[g, ks] = 0.001 / K
    before = q.embedding.weight.detach().clone()
    latents = torch.randn(3, G * d, 4, 4)
    replaced = reseed_dead_codes(q, latents, threshold=0.03, generator=torch.Generator().manual_seed(1))
    assert replaced == [2, 3]
    pixels = F.normalize(latents.permute(0, 2, 3, 1).reshape(-1, G, d), dim=-1)  # (N, G, d)
    w = q.embedding.weight.detach()
    for g in range(G):
        for k in range(K):
            row = w[g * K + k]
            if k in dead[g]:
                # Exactly one of the group's normalised encoder sub-vectors, and now the nearest code for it.
                match = torch.isclose(pixels[:, g], row, atol=1e-6).all(dim=-1).nonzero().flatten()
                assert len(match) == 1
                assert q.embed_prob[g, k] == pytest.approx(1.0 / K)
                p = match.item()
                code = q.nearest(latents)[p // 16, (p % 16) // 4, p % 4, g]
                assert code == k
            else:
                assert torch.equal(row, before[g * K + k])
    assert len({tuple(w[k].tolist()) for k in dead[1]}) == 3  # distinct pixels


def test_step_batches_do_not_depend_on_the_number_of_processes(digits):
    def batches(rank: int, world: int, hflip: bool = True):
        dataset = ImageFolderImages(str(digits), 16, seed=1, hflip=hflip)
        return iter(GlobalBatchSampler(dataset.epoch_plan, len(dataset), 8, 1, rank, world))

    one, two = batches(0, 1), [batches(r, 2) for r in range(2)]
    steps = [next(one) for _ in range(16)]  # 8 steps per epoch: crosses epochs
    assert steps == [next(two[0]) + next(two[1]) for _ in range(16)]
    epoch0 = [i for s in steps[:8] for i, _ in s]
    assert len(set(epoch0)) == 64  # no image twice within an epoch
    assert {f for s in steps[:8] for _, f in s} == {0, 1}
    assert not any(f for _, f in next(batches(0, 1, hflip=False)))


# ---- training runs -----------------------------------------------------------------------------------------

def test_training_lowers_the_loss_and_the_export_round_trips(digits, tmp_path):
    out = tmp_path / "run"
    path = train(run_config(digits, out))
    log = read_log(out)
    assert [r["step"] for r in log] == [10, 20, 30]
    assert log[-1]["l2"] < 0.5 * log[0]["l2"]
    assert log[-1]["charbonnier"] < log[0]["charbonnier"]
    assert all(len(r["perplexity"]) == 2 and len(r["code_usage"]) == 2 for r in log)
    assert sum(map(sum, (r["reseeded"] for r in log))) > 0  # the random initial codebook had dead codes

    # The export is the final training state, in this project's layout, and load_tokenizer needs no config.
    blob = torch.load(path, weights_only=True)
    assert set(blob) == {"model", "config", "family"} and blob["family"] == "mgvq"
    loaded = load_tokenizer(path)
    trained = MGVQ(MGVQConfig.from_dict(TINY))
    state = load_file(out / "checkpoints" / "step_0000030" / "model.safetensors")
    trained.load_state_dict({k.removeprefix("tokenizer."): v for k, v in state.items()})
    trained.eval()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    codes = trained.encode_codes(x)
    assert torch.equal(loaded.encode_codes(x), codes)
    assert torch.equal(loaded.decode_codes(codes), trained.decode_codes(codes))


def test_resume_after_a_kill_equals_a_straight_run(digits, tmp_path):
    """Nested masking, re-seeding, the discriminator and EMA included: all their state is in the checkpoint."""
    loss = LossConfig(mask_probs=[0.0, 0.5], disc_weight=0.1, disc_start=2, disc_channels=8, disc_layers=2)
    common = dict(loss=loss, codebook=CodebookConfig(reseed_every=2, usage_decay=0.5), ema=0.9, ckpt_every=3,
                  log_every=3)
    straight = train(run_config(digits, tmp_path / "a", max_steps=6, **common))
    train(run_config(digits, tmp_path / "b", max_steps=3, **common))  # "killed" after its step-3 checkpoint
    AcceleratorState._reset_state(True)
    resumed = train(run_config(digits, tmp_path / "b", max_steps=6, **common))
    a, b = torch.load(straight, weights_only=True)["model"], torch.load(resumed, weights_only=True)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    timing = ("images_per_s", "steps_per_s")
    log_a, log_b = ([{k: v for k, v in r.items() if k not in timing} for r in read_log(tmp_path / d)]
                    for d in "ab")
    assert [r["step"] for r in log_a] == [3, 6] and log_a == log_b
    assert "d_loss" in log_a[-1] and "g_adv" in log_a[-1]


def test_two_gloo_ranks_through_the_script(digits, tmp_path, repo):
    """scripts/train_tokenizer.py under `accelerate launch` really runs two ranks, and its export loads."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29741",
           str(repo / "scripts" / "train_tokenizer.py"), "+experiment=digits", f"data.root={digits}",
           f"out_dir={out}", "max_steps=4", "global_batch_size=16", "log_every=2", "ckpt_every=4",
           "codebook.reseed_every=2"]
    subprocess.run(cmd, cwd=repo, env=env, check=True, timeout=240, capture_output=True)
    state = json.loads((out / "checkpoints" / "step_0000004" / "train_state.json").read_text())
    assert state["num_processes"] == 2 and state["step"] == 4
    assert {f"random_states_{r}.pkl" for r in range(2)} <= set(os.listdir(out / "checkpoints" / "step_0000004"))
    assert [r["step"] for r in read_log(out)] == [2, 4]
    tok = load_tokenizer(out / "export" / "tokenizer.pt")
    assert tok.config.codebook_groups == 4 and tok.encode_codes(torch.zeros(1, 3, 16, 16)).shape == (1, 4, 4, 4)
