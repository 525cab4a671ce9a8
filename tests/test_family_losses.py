"""Parity of the LlamaGen VQ, IBQ and Open-MAGVIT2 loss terms with the official modules (tests/fixtures/*/losses.pt,
see tests/fixtures/README.md), gradients included, and the LFQ entropy computed without its 2^d logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.vgg import cfgs, make_layers

from tokenizer.family_losses import (
    LeCAM,
    cosine_vq,
    entropy_terms,
    index_propagation,
    lfq_entropy_terms,
    lookup_free,
    non_saturating_g_loss,
)
from tokenizer.losses import LPIPS, hinge_d_loss, hinge_g_loss

RTOL = 1e-5


def fixture(repo, family: str) -> dict:
    return torch.load(repo / "tests" / "fixtures" / family / "losses.pt", weights_only=True)


def close(actual, expected, atol=1e-12):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=RTOL, atol=atol)


@pytest.mark.parametrize("case", ["bits6", "bits10"])
def test_lfq_terms_and_gradient(repo, case):
    f = fixture(repo, "open_magvit2")["lfq"][case]
    x = f["x"].clone().requires_grad_(True)
    quantized, terms = lookup_free(x, 0.01)
    close(quantized, f["quantized"])
    close(terms["sample_entropy"], f["per_sample_entropy"])
    close(terms["codebook_entropy"], f["codebook_entropy"])
    close(terms["sample_entropy"] - terms["codebook_entropy"], f["entropy_loss"])
    close(terms["commit"], f["commitment"])
    w = f["loss_weights"]
    loss = (w["entropy"] * (terms["sample_entropy"] - terms["codebook_entropy"]) + w["commitment"] * terms["commit"]
            + (quantized * f["R"]).mean())
    grad, = torch.autograd.grad(loss, x)
    close(grad, f["grad_x"])
    x2 = f["x"].clone().requires_grad_(True)
    _, t2 = lookup_free(x2, 0.01)
    grad_entropy, = torch.autograd.grad(w["entropy"] * (t2["sample_entropy"] - t2["codebook_entropy"]), x2)
    close(grad_entropy, f["grad_x_entropy"])


def test_lfq_entropy_equals_materialised_softmax():
    """The factorised entropies equal the softmax over all 2^d sign vectors (odd d: unequal halves)."""
    g = torch.Generator().manual_seed(0)
    for d in (1, 5, 8):
        z = torch.randn(40, d, generator=g, dtype=torch.float64) * 0.01
        codes = torch.tensor([[1.0 if (c >> i) & 1 else -1.0 for i in range(d)] for c in range(2**d)],
                             dtype=torch.float64)
        want = entropy_terms(2 * z @ codes.t(), 0.01)
        got = lfq_entropy_terms(z, 0.01)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-7)


def test_lfq_has_no_codebook_gradient():
    """LFQ's codes are fixed sign vectors: the quantizer has nothing trainable, only the encoder gets gradients."""
    x = torch.randn(2, 4, 2, 2, requires_grad=True)
    q, terms = lookup_free(x, 0.01)
    (q.sum() + terms["commit"] + terms["sample_entropy"] - terms["codebook_entropy"]).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_ibq_terms_and_gradients(repo):
    f = fixture(repo, "ibq")["quantizer"]
    z = f["z"].clone().requires_grad_(True)
    weight = f["embedding"].clone().requires_grad_(True)
    z_q, codes, terms = index_propagation(z, weight, f["beta"], f["temperature"])
    assert torch.equal(codes, f["codes"].long())
    close(z_q, f["z_q"])
    close(terms["quant"], f["quant_loss"])
    close(terms["sample_entropy"], f["sample_entropy"])
    close(terms["codebook_entropy"], f["avg_entropy"])
    close(terms["sample_entropy"] - terms["codebook_entropy"], f["entropy_loss"])
    w = f["loss_weights"]
    loss = (w["quant"] * terms["quant"] + w["entropy"] * (terms["sample_entropy"] - terms["codebook_entropy"])
            + (z_q * f["R"]).mean())
    gz, gw = torch.autograd.grad(loss, [z, weight])
    close(gz, f["grad_z"])
    close(gw, f["grad_embedding"])
    # Index propagation: every code's row receives a gradient, not only the chosen ones.
    assert (gw.abs().sum(dim=1) > 0).all() and len(codes.unique()) < weight.shape[0]


def test_llamagen_vq_terms_and_gradients(repo):
    f = fixture(repo, "llamagen_vq")["quantizer"]
    z = f["z"].clone().requires_grad_(True)
    weight = f["embedding"].clone().requires_grad_(True)
    z_q, codes, terms = cosine_vq(z, weight, f["beta"], 0.01)
    assert torch.equal(codes, f["codes"].long())
    close(z_q, f["z_q"])
    close(terms["vq"], f["vq_loss"])
    close(terms["commit"], f["commit_loss"])
    ratio = f["entropy_loss_ratio"]
    entropy = ratio * (terms["sample_entropy"] - terms["codebook_entropy"])
    close(entropy, f["entropy_loss"])
    loss = terms["vq"] + terms["commit"] + entropy + (z_q * f["R"]).mean()
    gz, gw = torch.autograd.grad(loss, [z, weight])
    close(gz, f["grad_z"])
    close(gw, f["grad_embedding"])


@pytest.mark.parametrize("family", ["open_magvit2", "ibq", "llamagen_vq"])
def test_gan_terms(repo, family):
    f = fixture(repo, family)["gan"]
    real, fake = f["logits_real"], f["logits_fake"].clone().requires_grad_(True)
    close(hinge_d_loss(real, fake), f["hinge_d_loss"])
    if "hinge_gen_loss" in f:
        close(hinge_g_loss(fake), f["hinge_gen_loss"])
        return
    g_loss = non_saturating_g_loss(fake)
    close(g_loss, f["non_saturate_gen_loss"])
    grad, = torch.autograd.grad(g_loss, fake)
    close(grad, f["grad_non_saturate_gen_loss"])
    lecam = LeCAM(0.999)
    for step in f["lecam"]:
        r, fk = step["real"].clone().requires_grad_(True), step["fake"].clone().requires_grad_(True)
        reg = lecam(r, fk, torch.stack([r.mean(), fk.mean()]))
        close(lecam.ema, torch.stack([step["ema_real"], step["ema_fake"]]).double())
        close(reg, step["lecam"])
        d_loss = 0.05 * reg + hinge_d_loss(r, fk)
        close(d_loss, step["d_loss"])
        gr, gf = torch.autograd.grad(d_loss, [r, fk])
        close(gr, step["grad_real"])
        close(gf, step["grad_fake"])


def test_lecam_state_round_trips():
    a = LeCAM(0.9)
    a(torch.ones(2, 1, 2, 2), -torch.ones(2, 1, 2, 2), torch.tensor([1.0, -1.0]))
    b = LeCAM(0.9)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.ema, a.ema) and torch.allclose(a.ema, torch.tensor([0.1, -0.1], dtype=torch.float64))


def test_entropy_terms_by_hand():
    logits = torch.tensor([[0.0, 0.0], [0.02, 0.0]])
    sample, codebook = entropy_terms(logits, 0.01)
    p = F.softmax(torch.tensor([2.0, 0.0]), dim=0)
    want_sample = (torch.log(torch.tensor(2.0)) - (p * p.log()).sum()) / 2
    avg = (torch.tensor([0.5, 0.5]) + p) / 2
    torch.testing.assert_close(sample, want_sample)
    torch.testing.assert_close(codebook, -(avg * torch.log(avg + 1e-5)).sum())


def test_lpips_matches_the_official_module(repo, tmp_path):
    """LPIPS (the same taming-transformers module in SEED-Voken and LlamaGen, the same vgg.pth) on a seeded random
    VGG16, rebuilt here with the fixture's rule, and its gradient to the reconstruction."""
    f = torch.load(repo / "tests" / "fixtures" / "open_magvit2" / "lpips.pt", weights_only=True)
    features = make_layers(cfgs["D"])
    g = torch.Generator().manual_seed(f["vgg_seed"])
    with torch.no_grad():
        for conv in (m for m in features if isinstance(m, torch.nn.Conv2d)):
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64) * (2 / fan_in) ** 0.5)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g, dtype=torch.float64) * 0.1)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, tmp_path / "vgg16.pth")
    torch.save(f["lin"], tmp_path / "lin.pth")
    lpips = LPIPS(tmp_path / "vgg16.pth", tmp_path / "lin.pth")
    recon = f["reconstructions"].clone().requires_grad_(True)
    d = lpips(recon, f["inputs"])
    torch.testing.assert_close(d, f["lpips"], rtol=RTOL, atol=0)
    grad, = torch.autograd.grad(d.sum(), recon)
    scale = f["grad_reconstructions"].abs().max().item()
    torch.testing.assert_close(grad, f["grad_reconstructions"], rtol=RTOL, atol=RTOL * scale)
