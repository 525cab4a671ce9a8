"""The quantizer and adversarial loss terms of the LlamaGen VQ, IBQ and Open-MAGVIT2 (LFQ) training recipes.

Each function is one term as the official training code computes it (parity: tests/test_family_losses.py against
tests/fixtures/<family>/losses.pt, made by the official modules):
- `cosine_vq` (LlamaGen `VectorQuantizer`, l2_norm): nearest L2-normalised code, codebook loss
  mean (e - sg[z])^2, commitment beta * mean (sg[e] - z)^2, straight-through z + sg(e - z);
- `index_propagation` (IBQ `IndexPropagationQuantize`): code = argmax z . E, and z_q = (onehot - sg[softmax] +
  softmax) . E, so every code's row receives a gradient; loss mean (z_q - z)^2 + mean (sg[e] - z)^2 +
  beta * mean (e - sg[z])^2 with e the hard code's row;
- `lookup_free` (Open-MAGVIT2 `LFQ`): sign quantization with straight-through gradient and commitment
  mean (z - sg[sign z])^2; no codebook parameter, so no code receives a gradient;
- `entropy_terms`: per-sample entropy and codebook entropy of softmax(logits / T) (MAGVIT-2's entropy loss is
  their difference); `lfq_entropy_terms` gives the same two numbers for LFQ's 2^d implicit codes without building
  2^d logits per pixel (the softmax over sign vectors is a product of per-bit Bernoullis);
- GAN (the hinge losses are tokenizer/losses.py's): the non-saturating generator loss of SEED-Voken, and LeCAM
  regularisation with EMAs of the mean logits.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer.losses import hinge_g_loss

ENTROPY_EPS = 1e-5  # inside log(avg_probs + eps), as the official entropy losses


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (half precision is computed in float32, float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def entropy_terms(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean per-sample entropy, entropy of the mean distribution) of softmax(logits / T); logits (N, K)."""
    scaled = _wide(logits) / temperature
    log_probs = F.log_softmax(scaled, dim=-1)
    probs = log_probs.exp()
    sample = -(probs * log_probs).sum(dim=-1).mean()
    avg = probs.mean(dim=0)
    return sample, -(avg * torch.log(avg + ENTROPY_EPS)).sum()


def _code_probs(p_one: torch.Tensor) -> torch.Tensor:
    """(N, b) per-bit probabilities of +1 -> (N, 2^b) probability of every code, bit i having place value 2^i."""
    probs = p_one.new_ones(p_one.shape[0], 1)
    for i in range(p_one.shape[1]):
        p = p_one[:, i:i + 1]
        probs = torch.cat([probs * (1 - p), probs * p], dim=1)  # codes with bit i = 0, then bit i = 1
    return probs


def lfq_entropy_terms(z: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LFQ's (per-sample entropy, codebook entropy) for latents z (N, d), equal to `entropy_terms` on the logits
    2 z . c over the 2^d sign vectors c, computed without them.

    softmax_c(2 z.c / T) factorises into independent bits with P(bit i = +1) = sigmoid(4 z_i / T), so the
    per-sample entropy is the sum of the bits' binary entropies. The mean distribution is not a product, but
    splitting the bits in two halves (lo, hi) makes it one matrix product: avg[lo, hi] = mean_n A[n, lo] B[n, hi],
    with A, B (N, 2^(d/2)) the code probabilities of each half; memory O(N 2^(d/2) + 2^d)."""
    t = 4 * _wide(z) / temperature  # (N, d) logit of each bit
    log_p, log_q = F.logsigmoid(t), F.logsigmoid(-t)
    sample = -(log_p.exp() * log_p + log_q.exp() * log_q).sum(dim=-1).mean()
    half = z.shape[1] // 2
    p_one = torch.sigmoid(t)
    avg = _code_probs(p_one[:, :half]).t() @ _code_probs(p_one[:, half:]) / z.shape[0]  # (2^half, 2^(d-half))
    return sample, -(avg * torch.log(avg + ENTROPY_EPS)).sum()


def _pixels(z: torch.Tensor) -> torch.Tensor:
    """(B, d, h, w) -> (B*h*w, d), at least float32."""
    return _wide(z).permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def _grid(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B*h*w, d) -> (B, d, h, w) shaped as `like`."""
    B, d, h, w = like.shape
    return rows.view(B, h, w, d).permute(0, 3, 1, 2)


def _with_entropy(terms: dict, logits: torch.Tensor, temperature: float | None) -> dict:
    """The terms plus sample_entropy / codebook_entropy of softmax(logits / T); temperature None: not computed."""
    if temperature is not None:
        terms["sample_entropy"], terms["codebook_entropy"] = entropy_terms(logits, temperature)
    return terms


def cosine_vq(z: torch.Tensor, weight: torch.Tensor, beta: float, temperature: float | None = None):
    """LlamaGen's l2-normalised VQ on z (B, d, h, w) with codebook `weight` (K, d). Returns z_q (B, d, h, w)
    (straight-through, as the decoder sees it), codes (B, h, w) and the terms {vq, commit} plus, given a
    temperature, {sample_entropy, codebook_entropy} on affinities -||z - e||^2 (LlamaGen's entropy_loss_ratio)."""
    zn = F.normalize(_pixels(z), dim=-1)
    table = F.normalize(_wide(weight), dim=-1)
    dist = zn.square().sum(-1, keepdim=True) + table.square().sum(-1) - 2 * zn @ table.t()  # (N, K)
    codes = dist.detach().argmin(dim=-1)
    e = table[codes]
    terms = _with_entropy({"vq": (e - zn.detach()).square().mean(), "commit": beta * (e.detach() - zn).square().mean()},
                          -dist, temperature)
    z_q = zn + (e - zn).detach()
    return _grid(z_q, z), codes.view(z.shape[0], *z.shape[2:]), terms


def index_propagation(z: torch.Tensor, weight: torch.Tensor, beta: float, temperature: float | None = None):
    """IBQ's index-propagation quantizer on z (B, d, h, w) with codebook `weight` (K, d). Returns z_q (B, d, h, w),
    codes (B, h, w) and the terms {quant} plus, given a temperature, the entropy pair of softmax(z . E / T)."""
    flat, table = _pixels(z), _wide(weight)
    logits = flat @ table.t()  # (N, K)
    soft = logits.softmax(dim=-1)
    codes = soft.detach().argmax(dim=-1)
    hard = F.one_hot(codes, table.shape[0]).to(soft.dtype)
    z_q = (hard - soft.detach() + soft) @ table  # the hard row's value, the softmax's gradient
    e = table[codes]
    quant = ((z_q - flat).square().mean() + (e.detach() - flat).square().mean()
             + beta * (e - flat.detach()).square().mean())
    return _grid(z_q, z), codes.view(z.shape[0], *z.shape[2:]), _with_entropy({"quant": quant}, logits, temperature)


def lookup_free(z: torch.Tensor, temperature: float | None = None):
    """Open-MAGVIT2's LFQ on z (B, d, h, w). Returns the straight-through sign latent (B, d, h, w) and the terms
    {commit} (unweighted, as the official LFQ returns it) plus, given a temperature, the entropy pair."""
    flat = _pixels(z)
    signs = torch.where(flat > 0, 1.0, -1.0)
    terms = {"commit": (flat - signs).square().mean()}
    if temperature is not None:
        terms["sample_entropy"], terms["codebook_entropy"] = lfq_entropy_terms(flat, temperature)
    return _grid(flat + (signs - flat).detach(), z), terms


# ---- adversarial terms -------------------------------------------------------------------------------------

def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """SEED-Voken's generator loss: softplus(-m) averaged over images, m = an image's mean logit."""
    return F.softplus(-_wide(logits_fake).flatten(1).mean(dim=1)).mean()


G_LOSSES = {"hinge": hinge_g_loss, "non_saturating": non_saturating_g_loss}


class LeCAM(nn.Module):
    """LeCAM regularisation (Tseng et al. 2021) with EMAs of the discriminator's mean logits on real and fake
    images, kept as buffers so they are checkpointed. `forward` first moves the EMAs towards the given means
    (which the caller averages over every rank), then returns
    mean relu(D(real) - ema_fake)^2 + mean relu(ema_real - D(fake))^2."""

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema", torch.zeros(2, dtype=torch.float64))  # (real, fake)

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
        """means: (2,) the mean real and fake logits of the whole step."""
        self.ema.mul_(self.decay).add_(means.detach().double() * (1 - self.decay))
        real, fake = _wide(logits_real), _wide(logits_fake)
        ema = self.ema.to(real.dtype)
        return F.relu(real - ema[1]).square().mean() + F.relu(ema[0] - fake).square().mean()
