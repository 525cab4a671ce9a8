"""The training forward of every tokenizer family: image -> (reconstruction, codes, the quantizer's terms).

One module per quantizer kind, chosen by family name (`AUTOENCODERS`); the trainer (tokenizer/train.py) never asks
which family it trains. Each wraps the family's tokenizer module (exported as it is) and adds what training needs:
- `forward(x)` -> recon (B, 3, H, W), codes (B, h, w, G), unweighted terms {name: scalar}, latent (detached);
- `aux_loss(terms)`: the quantizer's part of the loss with the recipe's weights (tokenizer/recipes.py);
- `before_step(step)`: per-step settings (MergeVQ draws its number of merged tokens K; others none);
- `after_step(...)`: per-step codebook maintenance (MGVQ's usage EMA and dead-code re-seeding; others none).
The quantizer terms are computed in float32 outside autocast (tokenizer/family_losses.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from tokenizer.base import check_images, group_sizes
from tokenizer.distill import Teacher, distill_kl
from tokenizer.families.mergevq.model import MergeVQ
from tokenizer.families.mergevq.tome import sampled_merge_num
from tokenizer.families.mgvq.model import MGVQ
from tokenizer.families.mgvq.quantizer import MultiGroupQuantizer
from tokenizer.family_losses import cosine_vq, index_propagation, lookup_free
from tokenizer.merged import unmerge
from tokenizer.recipes import LossConfig


def code_counts(codes: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """How often each code was chosen: codes (..., G) -> (sum of sizes,) float counts, group g's codes at
    [sum(sizes[:g]), sum(sizes[:g+1]))."""
    G = codes.shape[-1]
    offsets = torch.tensor([0, *sizes[:-1]], device=codes.device).cumsum(0)
    flat = codes.reshape(-1, G) + offsets
    return torch.bincount(flat.flatten(), minlength=sum(sizes)).float()


@torch.no_grad()
def reseed_dead_codes(quantizer: MultiGroupQuantizer, latents: torch.Tensor, threshold: float,
                      generator: torch.Generator) -> list[int]:
    """Replace every code whose usage EMA (`quantizer.embed_prob`, (G, K)) is below threshold / K.

    A dead code of group g takes the L2-normalised group-g sub-vector of a randomly chosen pixel of `latents`
    (B, C, h, w), so it lands where the encoder's outputs are; its usage EMA restarts at 1/K, which gives
    it time to be chosen before it can be judged again. Returns how many codes were replaced per group.
    Call it with the same latents and generator state on every rank (the replacement is then identical).
    """
    G, K = quantizer.groups, quantizer.codes_per_group
    zn = quantizer._split(latents).reshape(-1, G, quantizer.group_dim)  # (N, G, d) unit vectors
    weight, usage = quantizer.embedding.weight, quantizer.embed_prob
    replaced = []
    for g in range(G):
        dead = torch.nonzero(usage[g] < threshold / K).flatten()
        if len(dead):
            n = len(dead)
            # Distinct pixels while there are enough of them.
            pick = torch.randperm(len(zn), generator=generator)[:n] if n <= len(zn) else \
                torch.randint(len(zn), (n,), generator=generator)
            weight[g * K + dead] = zn[pick.to(zn.device), g].to(weight.dtype)
            usage[g, dead] = 1.0 / K
        replaced.append(len(dead))
    return replaced


class Autoencoder(nn.Module):
    """Base: a family's tokenizer (`self.tokenizer`, what is exported) and the resolved loss config."""

    def __init__(self, tokenizer: nn.Module, loss: LossConfig):
        super().__init__()
        self.tokenizer, self.loss = tokenizer, loss
        self.group_sizes = group_sizes(tokenizer.config)

    @property
    def temperature(self) -> float | None:
        """The entropy terms' temperature, None when their weight is 0 (they are then not computed)."""
        return self.loss.entropy_temperature if self.loss.entropy_weight else None

    def entropy_loss(self, terms: dict) -> torch.Tensor | float:
        if "sample_entropy" not in terms:
            return 0.0
        return self.loss.entropy_weight * (terms["sample_entropy"] - terms["codebook_entropy"])

    def before_step(self, step: int) -> None:
        """Settings of the training step `step` (0-based, the same on every process)."""

    def after_step(self, accelerator, counts: torch.Tensor, latents: torch.Tensor, done: int, codebook_cfg,
                   seed: int) -> dict[str, torch.Tensor]:
        """Codebook maintenance after the optimizer step `done` (1-based); returns metrics for the log."""
        return {}


class MGVQAutoencoder(Autoencoder):
    """MGVQ: G L2-normalised sub-codebooks, VQ + commitment, nested masking, dead-code re-seeding."""

    def __init__(self, tokenizer: MGVQ, loss: LossConfig):
        super().__init__(tokenizer, loss)
        tokenizer.quantize.beta = loss.beta
        tokenizer.quantize.mask_probs = tuple(loss.mask_probs[: tokenizer.config.codebook_groups])  # validated there

    def forward(self, x: torch.Tensor):
        z = self.tokenizer.encode(x)  # (B, C, h, w) pre-quantization latent
        q = self.tokenizer.quantize(z)
        return self.tokenizer.decode(q.z_q), q.codes, {"vq": q.vq_loss.mean(), "commit": q.commit_loss.mean()}, \
            z.detach()

    def aux_loss(self, terms: dict) -> torch.Tensor:
        return self.loss.codebook_weight * (terms["vq"] + terms["commit"])

    def after_step(self, accelerator, counts, latents, done, codebook_cfg, seed):
        """The code-usage EMA over all ranks (`quantize.embed_prob`) and, every `reseed_every` steps, re-seeding."""
        quantizer, cc = self.tokenizer.quantize, codebook_cfg
        counts = counts.view(quantizer.groups, quantizer.codes_per_group)
        quantizer.embed_prob.lerp_(counts / counts.sum(dim=1, keepdim=True), 1 - cc.usage_decay)
        reseeded = torch.zeros(quantizer.groups, device=counts.device)
        if cc.reseed_every and done % cc.reseed_every == 0 and (cc.reseed_until is None or done <= cc.reseed_until):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + done)  # the same on every rank
            reseeded += torch.tensor(reseed_dead_codes(quantizer, accelerator.gather(latents), cc.reseed_threshold,
                                                       generator), device=counts.device)
        return {"reseeded": reseeded}


class CodebookAutoencoder(Autoencoder):
    """A single-codebook VQGAN (tokenizer/families/vqgan) trained through `quantizer(z, weight, beta, temperature)`."""

    quantizer = staticmethod(cosine_vq)

    def forward(self, x: torch.Tensor):
        tok = self.tokenizer
        z = tok.encode(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            z_q, codes, terms = self.quantizer(z, tok.quantize.embedding.weight, self.loss.beta, self.temperature)
        return tok.decode(z_q.to(z.dtype)), codes[..., None], terms, z.detach()


class CosineVQAutoencoder(CodebookAutoencoder):
    """LlamaGen VQ: one L2-normalised codebook, codebook + commitment losses (and optionally its entropy loss)."""

    def aux_loss(self, terms: dict) -> torch.Tensor:
        return self.loss.codebook_weight * (terms["vq"] + terms["commit"]) + self.entropy_loss(terms)


class IndexPropagationAutoencoder(CodebookAutoencoder):
    """IBQ: the straight-through one-hot over the whole codebook, its quantization loss and entropy loss."""

    quantizer = staticmethod(index_propagation)

    def aux_loss(self, terms: dict) -> torch.Tensor:
        return self.loss.codebook_weight * terms["quant"] + self.entropy_loss(terms)


class LookupFreeAutoencoder(Autoencoder):
    """Open-MAGVIT2: sign quantization (LFQ) with commitment and entropy losses; codes are the factorized
    sub-tokens of the config's `factorized_bits`."""

    def forward(self, x: torch.Tensor):
        tok = self.tokenizer
        z = tok.encode(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            quantized, terms = lookup_free(z, self.temperature)
        terms["commit"] = self.loss.beta * terms["commit"]
        return tok.decode(quantized.to(z.dtype)), tok.codes_of(z.detach()), terms, z.detach()

    def aux_loss(self, terms: dict) -> torch.Tensor:
        return self.loss.codebook_weight * terms["commit"] + self.entropy_loss(terms)


class MergeVQAutoencoder(Autoencoder):
    """MergeVQ: LFQ (commitment, entropy) on the K merged tokens, their straight-through codes copied back to every
    grid position they cover before decoding; K drawn per step from the config's candidates
    (tome.sampled_merge_num); optionally the class token distilled to a DINOv2 teacher (tokenizer/distill.py)."""

    def __init__(self, tokenizer: MergeVQ, loss: LossConfig):
        super().__init__(tokenizer, loss)
        self.step = None  # None (outside the trainer): the config's merge_num
        self.teacher = None
        if not loss.distill_weight and tokenizer.config.dist_head is not None:
            tokenizer.encoder.dist_head.requires_grad_(False)  # unused: no gradient (DDP would wait for one)
        if loss.distill_weight:
            if tokenizer.config.dist_head is None:
                raise ValueError(f"loss.distill_weight={loss.distill_weight} needs a distillation head: this config "
                                 f"has dist_head=None (set loss.distill_weight=0, or dist_head=layer3 | mlp)")
            if not loss.distill_teacher:
                raise ValueError(f"loss.distill_weight={loss.distill_weight} needs loss.distill_teacher, a local "
                                 f"directory with a DINOv2 model (nothing is downloaded); or set loss.distill_weight=0")
            self.teacher = Teacher(loss.distill_teacher, loss.distill_image_size)
            if self.teacher.width != tokenizer.config.num_classes:
                raise ValueError(f"the teacher {loss.distill_teacher} has width {self.teacher.width}, the "
                                 f"distillation head {tokenizer.config.num_classes} outputs (config num_classes)")

    def before_step(self, step: int) -> None:
        """The step whose K the next forward draws (the trainer calls it on every process with the same step)."""
        self.step = step

    def forward(self, x: torch.Tensor):
        tok = self.tokenizer
        check_images(x, tok.downsample)
        h, w = x.shape[-2] // tok.downsample, x.shape[-1] // tok.downsample
        merge_num = tok.config.merge_num if self.step is None else \
            sampled_merge_num(h * w, tok.config.merge_num, tok.config.cand_distribution, self.step)
        latent, cls_token, token_map = tok.encoder(x, merge_num)  # (B, K, Z), (B, C), (B, h, w)
        with torch.autocast(device_type=x.device.type, enabled=False):
            quantized, terms = lookup_free(latent.transpose(1, 2)[..., None], self.temperature)  # (B, Z, K, 1)
        terms["commit"] = self.loss.beta * terms["commit"]
        grid = unmerge(quantized[..., 0].transpose(1, 2), token_map).permute(0, 3, 1, 2)  # (B, Z, h, w)
        if self.teacher is not None:
            terms["distill"] = distill_kl(tok.encoder.dist_head(cls_token), self.teacher(x),
                                          self.loss.distill_temperature)
        terms["merged_tokens"] = torch.tensor(float(latent.shape[1]), device=x.device)
        codes = tok.codes_of((latent.detach(), token_map))
        return tok.decode(grid.to(latent.dtype)), codes, terms, latent.detach()

    def aux_loss(self, terms: dict) -> torch.Tensor:
        loss = self.loss.codebook_weight * terms["commit"] + self.entropy_loss(terms)
        return loss + self.loss.distill_weight * terms["distill"] if "distill" in terms else loss


AUTOENCODERS: dict[str, type[Autoencoder]] = {
    "mgvq": MGVQAutoencoder,
    "llamagen_vq": CosineVQAutoencoder,
    "ibq": IndexPropagationAutoencoder,
    "open_magvit2": LookupFreeAutoencoder,
    "mergevq": MergeVQAutoencoder,
}
