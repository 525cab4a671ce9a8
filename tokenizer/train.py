"""Tokenizer training with accelerate, for every family, on the official recipe of each (tokenizer/recipes.py).

A family contributes its tokenizer and its quantizer's training forward and auxiliary terms
(tokenizer/autoencoders.py: MGVQ's groups with nested masking and dead-code re-seeding, LlamaGen's cosine VQ,
IBQ's index propagation, Open-MAGVIT2's LFQ with its entropy loss, MergeVQ's LFQ on merged tokens with K drawn
per step and its class-token distillation); the trainer adds the reconstruction losses
(L1, Charbonnier, L2), LPIPS, and the PatchGAN with a hinge or non-saturating generator loss and LeCAM
(tokenizer/losses.py, tokenizer/family_losses.py). Code usage and perplexity per group go to every log line, and a
run whose usage stays below `codebook.collapse_usage` for `codebook.collapse_lines` lines warns. `train(cfg)` runs
the shared skeleton (tokenizer/common/runs.py) and writes `<out_dir>/export/tokenizer.pt`, this project's tokenizer
file, which `load_tokenizer(path, family=...)` reads as it is.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tokenizer.autoencoders import AUTOENCODERS, Autoencoder, code_counts
from tokenizer.common.runs import GlobalBatchSampler, RunConfig, Trainer, make_optimizer, make_scheduler
from tokenizer.data import center_crop_arr, list_images
from tokenizer.family_losses import G_LOSSES, LeCAM
from tokenizer.loading import TokenizerRef, load_tokenizer, save_tokenizer
from tokenizer.losses import LPIPS, PatchDiscriminator, charbonnier, hinge_d_loss, l2
from tokenizer.recipes import LossConfig, resolve_loss, resolve_optimizer
from tokenizer.recon import codebook_usage
from tokenizer.registry import get_family


@dataclass
class ImageDataConfig:
    root: str  # an ImageFolder (labels are ignored)
    image_size: int = 256  # ADM center crop
    hflip: bool = True  # random horizontal flips (off for data where a mirror image is another thing, e.g. digits)
    num_workers: int = 2


@dataclass
class CodebookConfig:
    usage_decay: float = 0.99  # EMA of each code's frequency (all ranks), kept in quantize.embed_prob
    reseed_every: int = 100  # steps between re-seedings of dead codes; 0 = never
    reseed_until: int | None = None  # last step that re-seeds (None = to the end); EMA weights settle after it
    reseed_threshold: float = 0.03  # a code is dead when its frequency EMA is below this fraction of 1/K
    collapse_usage: float = 0.01  # warn when a group uses less than this share of its codes in a log window ...
    collapse_lines: int = 3  # ... for this many log lines in a row; 0 = never warn


@dataclass(kw_only=True)
class TrainTokenizerConfig(RunConfig):
    """The run's fields (out_dir, precision, resume, ... in RunConfig) and the tokenizer's own. The loss and the
    optimizer fields below default to None: the family's official recipe (tokenizer/recipes.py).
    grad_accum must stay 1 (re-seeding and code statistics work on whole steps)."""

    data: ImageDataConfig
    tokenizer: TokenizerRef  # config = the architecture; checkpoint = weights to start from (null: random init)
    loss: LossConfig = field(default_factory=LossConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    max_steps: int | None = 100000
    global_batch_size: int = 128  # = per-process batch * num_processes
    lr: float | None = None
    betas: list[float] | None = None
    weight_decay: float | None = None  # 0 = Adam
    grad_clip: float | None = None  # 0 = no clipping
    ema: float | None = None


def resolve(cfg: TrainTokenizerConfig) -> TrainTokenizerConfig:
    """The config with every None of the loss and optimizer taken from the tokenizer family's recipe."""
    family = cfg.tokenizer.family
    return dataclasses.replace(cfg, loss=resolve_loss(cfg.loss, family), **resolve_optimizer(cfg, family))


# ---- data --------------------------------------------------------------------------------------------------

class ImageFolderImages(Dataset):
    """Item (index, flip) -> image (3, S, S) in [-1, 1]: ADM center crop, flipped when asked."""

    def __init__(self, root: str, image_size: int, seed: int = 0, hflip: bool = True):
        self.root, self.image_size, self.seed, self.hflip = Path(root), image_size, seed, hflip
        self.files = list_images(root)[0]
        if not self.files:
            raise ValueError(f"data.root {root} holds no images")

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's image order and every image's flip (0/1), from (seed, epoch) only."""
        rng = np.random.default_rng([self.seed, epoch])
        order, flips = rng.permutation(len(self.files)), rng.random(len(self.files)) < 0.5
        return order, flips & self.hflip

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, bool]) -> torch.Tensor:
        index, flip = item
        path = self.root / self.files[index]
        try:
            with Image.open(path) as image:
                image = center_crop_arr(image.convert("RGB"), self.image_size)
        except Exception as e:  # PIL raises several types for corrupt data
            raise RuntimeError(f"cannot read training image {path}: {e}") from e
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1
        return x.flip(-1) if flip else x


# ---- training ----------------------------------------------------------------------------------------------

def build_tokenizer(ref: TokenizerRef, loss: LossConfig) -> Autoencoder:
    """The trainable tokenizer of the reference's family and architecture inside its family's training forward:
    from `ref.checkpoint` when given, else randomly initialised; `loss` None fields come from the recipe."""
    if ref.config is None:
        raise ValueError("tokenizer.config is required to train a tokenizer: pick a preset, e.g. tokenizer=digits")
    family = get_family(ref.family)
    arch = family.config_cls.from_dict(ref.config.to_dict())
    model = family.model_cls(arch)
    if ref.checkpoint:
        model.load_state_dict(load_tokenizer(ref.checkpoint, arch, ref.family, ref.weights).state_dict())
    return AUTOENCODERS[ref.family](model.train().requires_grad_(True), resolve_loss(loss, ref.family))


class Adversary:
    """The PatchGAN, its optimizer, LeCAM, and the generator / discriminator losses of the recipe."""

    def __init__(self, cfg: TrainTokenizerConfig, trainer: Trainer, disc: nn.Module, disc_opt, lecam: LeCAM | None):
        self.cfg, self.trainer, self.disc, self.disc_opt, self.lecam = cfg, trainer, disc, disc_opt, lecam
        self.g_loss = G_LOSSES[cfg.loss.g_loss]

    def generator_loss(self, recon: torch.Tensor) -> torch.Tensor:
        return self.g_loss(self.disc(recon))

    def step(self, x: torch.Tensor, recon: torch.Tensor) -> dict[str, torch.Tensor]:
        """One discriminator step on real images and detached reconstructions; returns its terms."""
        acc, lc = self.trainer.accelerator, self.cfg.loss
        self.disc_opt.zero_grad(set_to_none=True)  # the generator's loss reached it too
        with acc.autocast():
            real, fake = self.disc(x), self.disc(recon.detach())
            terms = {"d_hinge": hinge_d_loss(real, fake)}
            d_loss = terms["d_hinge"]
            if self.lecam is not None:  # the EMAs follow the whole step's mean logits, whatever the process count
                means = acc.reduce(torch.stack([real.detach().float().mean(), fake.detach().float().mean()]), "mean")
                terms["lecam"] = self.lecam(real, fake, means)
                d_loss = d_loss + lc.lecam_weight * terms["lecam"]
            terms["d_loss"] = lc.disc_loss_weight * d_loss
        acc.backward(terms["d_loss"])
        if lc.disc_grad_clip:
            acc.clip_grad_norm_(self.disc.parameters(), lc.disc_grad_clip)
        self.disc_opt.step()
        self.disc_opt.zero_grad(set_to_none=True)
        return terms


class TokenizerStep:
    """One optimizer step: reconstruction, the family's quantizer terms, optional LPIPS / adversarial losses, then
    the discriminator's step, the code counts over all ranks and the family's codebook maintenance."""

    def __init__(self, cfg: TrainTokenizerConfig, trainer: Trainer, batches, model, optimizer, scheduler,
                 lpips: LPIPS | None, adversary: Adversary | None):
        self.cfg, self.trainer, self.batches = cfg, trainer, batches
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.lpips, self.adversary = lpips, adversary
        self.autoencoder: Autoencoder = trainer.accelerator.unwrap_model(model)

    def losses(self, x: torch.Tensor, use_disc: bool):
        lc = self.cfg.loss
        recon, codes, terms, z = self.model(x)
        loss = self.autoencoder.aux_loss(terms)
        reconstruction = (("l1", lc.l1_weight, lambda: (recon.float() - x.float()).abs().mean()),
                          ("charbonnier", lc.charbonnier_weight, lambda: charbonnier(recon, x, lc.charbonnier_eps)),
                          ("l2", lc.l2_weight, lambda: l2(recon, x)))
        for name, weight, fn in reconstruction:
            if weight:
                terms[name] = fn()
                loss = loss + weight * terms[name]
        if self.lpips is not None:
            terms["lpips"] = self.lpips(recon, x).mean()
            loss = loss + lc.perceptual_weight * terms["lpips"]
        if use_disc:
            terms["g_adv"] = self.adversary.generator_loss(recon)
            loss = loss + lc.disc_weight * terms["g_adv"]
        return loss, terms, recon, codes, z

    def __call__(self) -> dict[str, torch.Tensor]:
        cfg, acc = self.cfg, self.trainer.accelerator
        step = self.trainer.step  # steps done before this one
        x = next(self.batches).to(acc.device, non_blocking=True)  # (B, 3, S, S) in [-1, 1]
        use_disc = self.adversary is not None and step >= cfg.loss.disc_start
        self.autoencoder.before_step(step)
        with acc.autocast():
            loss, terms, recon, codes, z = self.losses(x, use_disc)
        acc.backward(loss)
        grad_norm = self.trainer.apply_gradients(self.model, self.optimizer, self.scheduler, loss)
        if use_disc:
            terms.update(self.adversary.step(x, recon))
        counts = acc.reduce(code_counts(codes, self.autoencoder.group_sizes), reduction="sum")  # all ranks
        extra = self.autoencoder.after_step(acc, counts, z, step + 1, cfg.codebook, cfg.seed)
        return {"loss": loss, **terms, "grad_norm": grad_norm, "code_counts": counts, **extra}


class CollapseWatch:
    """Warns when some group's code usage stays below `share` for `lines` log lines in a row, naming the step."""

    def __init__(self, share: float, lines: int):
        self.share, self.lines, self.run = share, lines, 0

    def update(self, step: int, usage: list[float]) -> str | None:
        low = [g for g, u in enumerate(usage) if u < self.share]
        self.run = self.run + 1 if low and self.lines else 0
        if self.run < self.lines or not self.lines:
            return None
        return (f"codebook collapse at step {step}: group(s) {low} used {[round(usage[g], 4) for g in low]} of their "
                f"codes for {self.run} log lines in a row (below codebook.collapse_usage={self.share})")


def describe(record: dict, means: dict, steps: int, seconds: float, global_batch: int, sizes: list[int],
             watch: CollapseWatch | None = None) -> dict:
    """A log line: every loss term, per group the distinct codes used in the window (`codes_used`, and as a share
    of the group's codes, `code_usage`) and the perplexity, codes re-seeded (MGVQ), images/s; a collapse warning
    when `watch` says so."""
    groups = means.pop("code_counts").split(sizes)
    usage = [codebook_usage(part[None]) for part in groups]  # scale-free: means of counts serve as counts
    used, perplexity = [u[0][0] for u in usage], [u[1][0] for u in usage]
    extra = {"reseeded": [round(float(r) * steps) for r in means.pop("reseeded")]} if "reseeded" in means else {}
    line = {**record, **{k: float(v) for k, v in means.items()}, "codes_used": [int((g > 0).sum()) for g in groups],
            "code_usage": used, "perplexity": perplexity, **extra, "images_per_s": steps * global_batch / seconds}
    message = watch.update(record["step"], used) if watch is not None else None
    if message:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return line


def train(cfg: TrainTokenizerConfig) -> Path:
    """Train a tokenizer on the images under `cfg.data.root`; returns the exported tokenizer file."""
    cfg = resolve(cfg)
    if cfg.grad_accum != 1:
        raise ValueError(f"grad_accum={cfg.grad_accum}: tokenizer training steps whole batches (set grad_accum=1)")
    trainer = Trainer(cfg)
    acc, lc = trainer.accelerator, cfg.loss
    dataset = ImageFolderImages(cfg.data.root, cfg.data.image_size, cfg.seed, cfg.data.hflip)
    model = build_tokenizer(cfg.tokenizer, cfg.loss)
    tokenizer = model.tokenizer
    if cfg.data.image_size % tokenizer.downsample:
        raise ValueError(f"data.image_size={cfg.data.image_size} is not a multiple of the tokenizer's "
                         f"downsampling {tokenizer.downsample}")
    sampler = GlobalBatchSampler(dataset.epoch_plan, len(dataset), cfg.global_batch_size, 1, acc.process_index,
                                 acc.num_processes)
    trainer.check_resume({"tokenizer": tokenizer.config.to_dict(), "family": cfg.tokenizer.family,
                          "global_batch_size": cfg.global_batch_size, "seed": cfg.seed,
                          "image_size": cfg.data.image_size, "hflip": cfg.data.hflip})

    lpips = LPIPS(lc.lpips_vgg, lc.lpips_lin).to(acc.device) if lc.perceptual_weight > 0 else None
    optimizer = make_optimizer(model, cfg, no_decay=("quantize.embedding.weight",))  # codes are compared by angle
    gan, lecam = [], None
    if lc.disc_weight > 0:
        disc = PatchDiscriminator(lc.disc_channels, lc.disc_layers)
        gan = [disc, make_optimizer(disc, cfg, lr=lc.disc_lr or cfg.lr)]
        if lc.lecam_weight > 0:
            lecam = LeCAM(lc.lecam_decay).to(acc.device)
            acc.register_for_checkpointing(lecam)
    model, optimizer, scheduler, *gan = trainer.prepare(model, optimizer, make_scheduler(optimizer, cfg, cfg.max_steps),
                                                        *gan, ema_of=tokenizer)
    sampler.start_step = trainer.step
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                        pin_memory=acc.device.type == "cuda", generator=torch.Generator())
    acc.print(f"training a {sum(p.numel() for p in tokenizer.parameters()) / 1e6:.2f}M-parameter "
              f"{cfg.tokenizer.family} tokenizer for {cfg.max_steps} steps from step {trainer.step} on "
              f"{acc.num_processes} process(es), {len(dataset)} images, {sampler.steps_per_epoch} steps per epoch")
    batches = iter(loader)
    adversary = Adversary(cfg, trainer, *gan, lecam) if gan else None
    step_fn = TokenizerStep(cfg, trainer, batches, model, optimizer, scheduler, lpips, adversary)
    watch = CollapseWatch(cfg.codebook.collapse_usage, cfg.codebook.collapse_lines)
    sizes = step_fn.autoencoder.group_sizes
    trainer.run(cfg.max_steps, step_fn, ema_source=tokenizer, lr=lambda: scheduler.get_last_lr()[0],
                describe=lambda r, m, n, s: describe(r, m, n, s, cfg.global_batch_size, sizes, watch),
                state=lambda step: {"epoch": sampler.position(step)[0]}, desc="train tokenizer")
    del batches  # shuts the loader's workers down

    path = trainer.out_dir / "export" / "tokenizer.pt"
    if acc.is_main_process:
        save_tokenizer((trainer.ema.model if trainer.ema is not None else tokenizer).cpu(), path)
        acc.print(f"tokenizer ({'EMA' if trainer.ema is not None else 'trained'} weights) written to {path}")
    acc.wait_for_everyone()
    trainer.end()
    return path
