"""Each tokenizer family's official training recipe: loss weights, discriminator, optimizer.

`LossConfig` and the optimizer fields of the tokenizer trainer default to None, meaning "the family's value
here"; a value set in the config or on the command line wins (`resolve`). Every value cites the official file it
comes from. SEED-Voken = TencentARC/SEED-Voken at b9a17eac; LlamaGen = FoundationVision/LlamaGen at ce98ec41.
Where the official code differs from the papers' or a reader's summary, the code is what is written here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tokenizer.family_losses import G_LOSSES


@dataclass
class LossConfig:
    """The tokenizer loss. None = the family's official value (RECIPES below)."""

    l1_weight: float | None = None  # mean |x - recon|
    charbonnier_weight: float | None = None
    charbonnier_eps: float = 1e-3
    l2_weight: float | None = None  # mean (x - recon)^2
    codebook_weight: float | None = None  # times the quantizer's codebook + commitment terms (beta inside)
    beta: float | None = None  # commitment weight
    entropy_weight: float | None = None  # times (per-sample entropy - codebook entropy); 0 = not computed
    entropy_temperature: float | None = None
    mask_probs: list[float] | None = None  # MGVQ's nested masking (others: [])
    perceptual_weight: float | None = None  # LPIPS; > 0 needs both weight files below
    lpips_vgg: str | None = None  # torchvision vgg16 state dict (ImageNet weights), a local file
    lpips_lin: str | None = None  # LPIPS linear layers (the vgg.pth of LlamaGen / MGVQ / SEED-Voken), a local file
    disc_weight: float | None = None  # generator's adversarial loss weight; 0 = no discriminator
    disc_loss_weight: float | None = None  # factor of the discriminator's own loss
    g_loss: str | None = None  # hinge | non_saturating
    lecam_weight: float | None = None  # LeCAM regularisation of the discriminator; 0 = off
    lecam_decay: float | None = None  # EMA decay of the mean logits LeCAM compares with
    disc_start: int | None = None  # step from which the discriminator trains and the generator sees its loss
    disc_grad_clip: float | None = None  # gradient-norm clipping of the discriminator; 0 = none
    disc_channels: int = 64
    disc_layers: int = 3
    disc_lr: float | None = None  # None = the generator's lr
    # MergeVQ's distillation of the encoder's class token to a DINOv2 teacher (KL at a temperature, times T^2).
    distill_weight: float | None = None  # 0 = off (every family but mergevq); > 0 needs distill_teacher
    distill_temperature: float | None = None
    distill_teacher: str | None = None  # a local directory holding a transformers Dinov2Model (never downloaded)
    distill_image_size: int | None = None  # the teacher sees the training images resized to this size


# Optimizer fields of the trainer config the recipe fills: lr, betas, weight_decay (0 = Adam), grad_clip, ema.
_SEED_VOKEN_OPT = {  # models/{lfqgan,ibqgan}.py configure_optimizers: Adam(lr, betas=(0.5, 0.9)), no clipping;
    "lr": 1e-4, "betas": [0.5, 0.9], "weight_decay": 0.0, "grad_clip": 0.0,  # learning_rate: 1e-4 in the configs
    "ema": 0.999,  # use_ema: True -> LitEma(self), modules/ema.py decay=0.999, use_num_upates=False
}
_SEED_VOKEN_GAN = {  # modules/losses/vqperceptual.py VQLPIPSWithDiscriminator
    "l1_weight": 1.0, "charbonnier_weight": 0.0, "l2_weight": 0.0,  # rec_loss = |inputs - reconstructions|
    "perceptual_weight": 1.0,  # perceptual_weight=1.0 (default, not overridden by the configs)
    "disc_weight": 0.1,  # gen_loss_weight: 0.1 (config) replaces the adaptive weight; disc_weight is then unused
    "g_loss": "non_saturating",  # g_loss = non_saturate_gen_loss(logits_fake)
    "disc_loss_weight": 1.0,  # disc_factor=1.0; d_loss = disc_factor * (lecam * lecam_loss_weight + hinge)
    "lecam_weight": 0.05, "lecam_decay": 0.999,  # lecam_loss_weight: 0.05 (config); LeCAM_EMA(decay=0.999)
    "disc_start": 0,  # disc_start: 0 (config)
    "disc_grad_clip": 0.0,  # manual optimisation, no clipping
    "mask_probs": [],
}

RECIPES: dict[str, dict] = {
    # MGVQ: this project's recipe as before (MGVQ released no training code): Charbonnier + L2, VQ + commitment.
    "mgvq": {
        "l1_weight": 0.0, "charbonnier_weight": 1.0, "l2_weight": 1.0, "codebook_weight": 1.0, "beta": 0.25,
        "entropy_weight": 0.0, "entropy_temperature": 0.01, "mask_probs": [0.0, 0.2, 0.3, 0.4],
        "perceptual_weight": 0.0, "disc_weight": 0.0, "disc_loss_weight": None, "g_loss": "hinge",
        "lecam_weight": 0.0, "lecam_decay": 0.999, "disc_start": 20000, "disc_grad_clip": 0.0,
        "lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.05, "grad_clip": 1.0, "ema": 0.0,
    },
    # LlamaGen tokenizer/tokenizer_image/vq_train.py (argparse defaults) and vq_loss.py VQLoss.
    "llamagen_vq": {
        "l1_weight": 0.0, "charbonnier_weight": 0.0,
        "l2_weight": 1.0,  # --reconstruction-loss l2, --reconstruction-weight 1.0
        "codebook_weight": 1.0,  # VQLoss adds codebook_loss[0] + [1] + [2] unweighted (--codebook-weight unused)
        "beta": 0.25,  # --commit-loss-beta 0.25
        "entropy_weight": 0.0,  # --entropy-loss-ratio 0.0
        "entropy_temperature": 0.01,  # vq_model.py compute_entropy_loss(temperature=0.01)
        "mask_probs": [],
        "perceptual_weight": 1.0,  # --perceptual-weight 1.0
        "disc_weight": 0.5,  # --disc-weight 0.5 (generator side: disc_weight * hinge_gen_loss)
        "disc_loss_weight": 0.5,  # d_adversarial_loss = disc_weight * disc_loss
        "g_loss": "hinge",  # --gen-loss hinge (the discriminator: --disc-loss hinge)
        "lecam_weight": 0.0, "lecam_decay": 0.999,
        "disc_start": 20000,  # --disc-start 20000
        "disc_grad_clip": 1.0,  # --max-grad-norm 1.0 clips the discriminator too
        "lr": 1e-4, "betas": [0.9, 0.95],  # --lr 1e-4, --beta1 0.9, --beta2 0.95
        "weight_decay": 0.0,  # torch.optim.Adam(vq_model.parameters(), lr, betas): --weight-decay is never passed
        "grad_clip": 1.0,  # --max-grad-norm 1.0 (generator and discriminator)
        "ema": 0.0,  # --ema off by default
    },
    # SEED-Voken configs/IBQ/gpu/imagenet_ibqgan_16384.yaml, src/IBQ/modules/vqvae/quantize.py, losses/vqperceptual.py.
    "ibq": {
        **_SEED_VOKEN_GAN, **_SEED_VOKEN_OPT,
        "codebook_weight": 1.0,  # quant_loss_weight: 1.0
        "beta": 0.25,  # beta: 0.25
        "entropy_weight": 0.05,  # entropy_loss_weight: 0.05
        "entropy_temperature": 0.01,  # entropy_temperature: 0.01
    },
    # SEED-Voken configs/Open-MAGVIT2/gpu/imagenet_lfqgan_256_L.yaml, src/Open_MAGVIT2/modules/vqvae/
    # lookup_free_quantize.py, losses/vqperceptual.py.
    "open_magvit2": {
        **_SEED_VOKEN_GAN, **_SEED_VOKEN_OPT,
        "codebook_weight": 1.0,  # LFQ has no codebook loss: only the commitment, weighted by beta
        "beta": 0.25,  # commit_weight: 0.25
        "entropy_weight": 0.1,  # codebook_weight: 0.1 multiplies the entropy loss; codebook_enlarge_ratio: 0
        "entropy_temperature": 0.01,  # entropy_loss(temperature=0.01)
    },
    # MergeVQ = ApexGen-X/MergeVQ at 5267198: configs/gpu_s1/imagenet_mergevq_256_GR_d64_8gpu_200ep.yaml,
    # taming/models/lfqgan_rep.py MergeVQModel, taming/modules/losses/vqperceptual.py (SEED-Voken's, with cls_loss).
    "mergevq": {
        **_SEED_VOKEN_GAN, **_SEED_VOKEN_OPT,  # L1 + 1.0 LPIPS, 0.1 non-saturating GAN, hinge D; Adam (0.5, 0.9) 1e-4
        "lecam_weight": 0.01,  # lecam_loss_weight: 0.01
        "codebook_weight": 1.0, "beta": 0.25,  # commit_weight: 0.25
        "entropy_weight": 0.1, "entropy_temperature": 0.01,  # codebook_weight: 0.1 times LFQ's entropy loss
        "distill_weight": 1.0,  # cls_loss_weight: 1.0 (the G configs: 0.1)
        "distill_temperature": 4.0,  # distill_cls_loss(temperature=4): KL(batchmean) * T^2
        "distill_image_size": 224,  # the teacher's view: a 224 crop (size: [256, 224, 224])
    },
}

OPTIMIZER_FIELDS = ("lr", "betas", "weight_decay", "grad_clip", "ema")


def recipe(family: str) -> dict:
    if family not in RECIPES:
        raise ValueError(f"no training recipe for tokenizer family {family!r}; expected one of {sorted(RECIPES)}")
    return RECIPES[family]


def resolve_loss(loss: LossConfig, family: str) -> LossConfig:
    """`loss` with every None replaced by the family's official value, checked."""
    values = recipe(family)
    out = dataclasses.replace(loss, **{f.name: values[f.name] for f in dataclasses.fields(loss)
                                       if getattr(loss, f.name) is None and f.name in values})
    if out.g_loss not in G_LOSSES:
        raise ValueError(f"loss.g_loss={out.g_loss!r}: expected one of {sorted(G_LOSSES)}")
    if out.disc_loss_weight is None:
        out.disc_loss_weight = out.disc_weight  # MGVQ as before: one weight for both sides
    if family != "mgvq" and out.mask_probs:
        raise ValueError(f"loss.mask_probs={out.mask_probs}: nested masking is MGVQ's; family {family!r} has one "
                         f"code per pixel (set loss.mask_probs=[])")
    if out.distill_weight is None:
        out.distill_weight = 0.0  # families without a distillation term
    if out.distill_weight and family != "mergevq":
        raise ValueError(f"loss.distill_weight={out.distill_weight}: the class-token distillation is MergeVQ's")
    if family == "mgvq" and out.entropy_weight:
        raise ValueError(f"loss.entropy_weight={out.entropy_weight}: MGVQ's recipe has no entropy loss (set 0)")
    return out


def resolve_optimizer(cfg, family: str) -> dict:
    """The optimizer fields of a trainer config that are None, from the family's recipe."""
    values = recipe(family)
    return {name: values[name] for name in OPTIMIZER_FIELDS if getattr(cfg, name) is None}
