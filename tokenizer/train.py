"""MGVQ tokenizer training with accelerate: reconstruction + VQ losses, nested masking, code re-seeding, EMA, resume.

The recipe of the MGVQ paper: the full 32-channel latent split into G groups, L2-normalised sub-codebooks and a
straight-through estimator (tokenizer/families/mgvq/quantizer.py), VQ + commitment (beta 0.25) losses, nested masking of
trailing groups, Charbonnier + L2 reconstruction, optional LPIPS and PatchGAN hinge losses (tokenizer/losses.py).
Codes whose usage (an EMA of their frequency over all ranks) falls below a threshold are re-seeded from the
current step's encoder outputs. `train(cfg)` runs the shared skeleton (tokenizer/common/runs.py) and writes
`<out_dir>/export/tokenizer.pt`, this project's tokenizer file, which `load_tokenizer(path)` reads as it is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tokenizer.common.runs import GlobalBatchSampler, RunConfig, Trainer, make_optimizer, make_scheduler
from tokenizer.data import center_crop_arr, list_images
from tokenizer.families.mgvq.config import MGVQConfig
from tokenizer.families.mgvq.model import MGVQ
from tokenizer.families.mgvq.quantizer import MultiGroupQuantizer
from tokenizer.loading import TokenizerRef, load_tokenizer, save_tokenizer
from tokenizer.losses import LPIPS, PatchDiscriminator, charbonnier, hinge_d_loss, hinge_g_loss, l2
from tokenizer.recon import codebook_usage


@dataclass
class ImageDataConfig:
    root: str  # an ImageFolder (labels are ignored)
    image_size: int = 256  # ADM center crop
    hflip: bool = True  # random horizontal flips (off for data where a mirror image is another thing, e.g. digits)
    num_workers: int = 2


@dataclass
class LossConfig:
    charbonnier_weight: float = 1.0
    charbonnier_eps: float = 1e-3
    l2_weight: float = 1.0
    codebook_weight: float = 1.0  # times (VQ + commitment), each averaged over groups
    beta: float = 0.25  # commitment weight inside the quantizer
    mask_probs: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.3, 0.4])  # nested masking, group 0 never
    perceptual_weight: float = 0.0  # LPIPS; > 0 needs both weight files below
    lpips_vgg: str | None = None  # torchvision vgg16 state dict (ImageNet weights)
    lpips_lin: str | None = None  # LPIPS linear layers (the vgg.pth of LlamaGen / MGVQ)
    disc_weight: float = 0.0  # PatchGAN hinge loss weight; 0 = no discriminator
    disc_start: int = 20000  # step from which the discriminator trains and the generator sees its loss
    disc_channels: int = 64
    disc_layers: int = 3
    disc_lr: float | None = None  # None = the generator's lr


@dataclass
class CodebookConfig:
    usage_decay: float = 0.99  # EMA of each code's frequency (all ranks), kept in quantize.embed_prob
    reseed_every: int = 100  # steps between re-seedings of dead codes; 0 = never
    reseed_until: int | None = None  # last step that re-seeds (None = to the end); EMA weights settle after it
    reseed_threshold: float = 0.03  # a code is dead when its frequency EMA is below this fraction of 1/K


@dataclass(kw_only=True)
class TrainTokenizerConfig(RunConfig):
    """The run's fields (out_dir, lr, precision, ema, resume, ... in RunConfig) and the tokenizer's own.
    grad_accum must stay 1 (re-seeding and code statistics work on whole steps)."""

    data: ImageDataConfig
    tokenizer: TokenizerRef  # config = the architecture; checkpoint = weights to start from (null: random init)
    loss: LossConfig = field(default_factory=LossConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    max_steps: int | None = 100000
    global_batch_size: int = 128  # = per-process batch * num_processes


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


# ---- model pieces ------------------------------------------------------------------------------------------

class AutoencoderStep(nn.Module):
    """The training forward in one module (so DDP sees it): image -> (recon, quantizer output, latent)."""

    def __init__(self, mgvq: MGVQ):
        super().__init__()
        self.mgvq = mgvq

    def forward(self, x: torch.Tensor):
        z = self.mgvq.encode(x)  # (B, C, h, w) pre-quantization latent
        q = self.mgvq.quantize(z)
        return self.mgvq.decode(q.z_q), q, z.detach()


def code_counts(codes: torch.Tensor, codes_per_group: int) -> torch.Tensor:
    """How often each code was chosen: codes (..., G) -> (G, K) float counts."""
    G = codes.shape[-1]
    flat = codes.reshape(-1, G) + torch.arange(G, device=codes.device) * codes_per_group
    return torch.bincount(flat.flatten(), minlength=G * codes_per_group).view(G, codes_per_group).float()


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


# ---- training ----------------------------------------------------------------------------------------------

def build_tokenizer(ref: TokenizerRef, loss: LossConfig) -> MGVQ:
    """A trainable MGVQ of the reference's architecture, from `ref.checkpoint` when given, else randomly
    initialised, its quantizer set to the loss config's commitment weight and nested-masking probabilities."""
    if ref.config is None:
        raise ValueError("tokenizer.config is required to train a tokenizer: pick a preset, e.g. tokenizer=digits")
    arch = MGVQConfig.from_dict(ref.config.to_dict())
    model = MGVQ(arch)
    if ref.checkpoint:
        model.load_state_dict(load_tokenizer(ref.checkpoint, arch).state_dict())
    model.quantize.beta = loss.beta
    model.quantize.mask_probs = tuple(loss.mask_probs[: arch.codebook_groups])  # validated by the quantizer
    return model.train().requires_grad_(True)


class TokenizerStep:
    """One optimizer step: reconstruction, VQ and optional LPIPS / adversarial losses, then the discriminator's
    step, the code-usage EMA over all ranks and, every `reseed_every` steps, the re-seeding of dead codes."""

    def __init__(self, cfg: TrainTokenizerConfig, trainer: Trainer, batches, model, optimizer, scheduler,
                 lpips: LPIPS | None, disc: nn.Module | None, disc_opt):
        self.cfg, self.trainer, self.batches = cfg, trainer, batches
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.lpips, self.disc, self.disc_opt = lpips, disc, disc_opt
        self.mgvq = trainer.accelerator.unwrap_model(model).mgvq

    def losses(self, x: torch.Tensor, use_disc: bool):
        lc = self.cfg.loss
        recon, q, z = self.model(x)
        terms = {"charbonnier": charbonnier(recon, x, lc.charbonnier_eps), "l2": l2(recon, x),
                 "vq": q.vq_loss.mean(), "commit": q.commit_loss.mean()}
        loss = (lc.charbonnier_weight * terms["charbonnier"] + lc.l2_weight * terms["l2"]
                + lc.codebook_weight * (terms["vq"] + terms["commit"]))
        if self.lpips is not None:
            terms["lpips"] = self.lpips(recon, x).mean()
            loss = loss + lc.perceptual_weight * terms["lpips"]
        if use_disc:
            terms["g_adv"] = hinge_g_loss(self.disc(recon))
            loss = loss + lc.disc_weight * terms["g_adv"]
        return loss, terms, recon, q, z

    def __call__(self) -> dict[str, torch.Tensor]:
        cfg, acc, lc, cc = self.cfg, self.trainer.accelerator, self.cfg.loss, self.cfg.codebook
        step = self.trainer.step  # steps done before this one
        x = next(self.batches).to(acc.device, non_blocking=True)  # (B, 3, S, S) in [-1, 1]
        use_disc = self.disc is not None and step >= lc.disc_start
        with acc.autocast():
            loss, terms, recon, q, z = self.losses(x, use_disc)
        acc.backward(loss)
        grad_norm = self.trainer.apply_gradients(self.model, self.optimizer, self.scheduler, loss)
        if use_disc:
            self.disc_opt.zero_grad(set_to_none=True)  # the generator's loss reached it too
            with acc.autocast():
                terms["d_loss"] = lc.disc_weight * hinge_d_loss(self.disc(x), self.disc(recon.detach()))
            acc.backward(terms["d_loss"])
            self.disc_opt.step()
            self.disc_opt.zero_grad(set_to_none=True)

        # Code usage over all ranks: the EMA that decides re-seeding, and the counts for the log.
        K = self.mgvq.quantize.codes_per_group
        counts = acc.reduce(code_counts(q.codes, K), reduction="sum")  # (G, K)
        self.mgvq.quantize.embed_prob.lerp_(counts / counts.sum(dim=1, keepdim=True), 1 - cc.usage_decay)
        reseeded = torch.zeros(counts.shape[0], device=acc.device)
        done = step + 1
        if cc.reseed_every and done % cc.reseed_every == 0 and (cc.reseed_until is None or done <= cc.reseed_until):
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + done)  # the same on every rank
            reseeded += torch.tensor(reseed_dead_codes(self.mgvq.quantize, acc.gather(z), cc.reseed_threshold,
                                                       generator), device=acc.device)
        return {"loss": loss, **terms, "grad_norm": grad_norm, "code_counts": counts, "reseeded": reseeded}


def describe(record: dict, means: dict, steps: int, seconds: float, global_batch: int) -> dict:
    """A log line: every loss term, per-group code usage and perplexity, codes re-seeded, images/s."""
    counts, reseeded = means.pop("code_counts"), means.pop("reseeded")
    used, perplexity = codebook_usage(counts)  # scale-free: means of counts serve as counts
    return {**record, **{k: float(v) for k, v in means.items()}, "code_usage": used, "perplexity": perplexity,
            "reseeded": [round(float(r) * steps) for r in reseeded], "images_per_s": steps * global_batch / seconds}


def train(cfg: TrainTokenizerConfig) -> Path:
    """Train a tokenizer on the images under `cfg.data.root`; returns the exported tokenizer file."""
    if cfg.grad_accum != 1:
        raise ValueError(f"grad_accum={cfg.grad_accum}: tokenizer training steps whole batches (set grad_accum=1)")
    trainer = Trainer(cfg)
    acc, lc = trainer.accelerator, cfg.loss
    dataset = ImageFolderImages(cfg.data.root, cfg.data.image_size, cfg.seed, cfg.data.hflip)
    mgvq = build_tokenizer(cfg.tokenizer, cfg.loss)
    if cfg.data.image_size % mgvq.downsample:
        raise ValueError(f"data.image_size={cfg.data.image_size} is not a multiple of the tokenizer's "
                         f"downsampling {mgvq.downsample}")
    sampler = GlobalBatchSampler(dataset.epoch_plan, len(dataset), cfg.global_batch_size, 1, acc.process_index,
                                 acc.num_processes)
    trainer.check_resume({"tokenizer": mgvq.config.to_dict(), "global_batch_size": cfg.global_batch_size,
                          "seed": cfg.seed, "image_size": cfg.data.image_size, "hflip": cfg.data.hflip})

    lpips = LPIPS(lc.lpips_vgg, lc.lpips_lin).to(acc.device) if lc.perceptual_weight > 0 else None
    model = AutoencoderStep(mgvq)
    optimizer = make_optimizer(model, cfg, no_decay=("quantize.embedding.weight",))  # codes are compared by angle
    disc = disc_opt = None
    if lc.disc_weight > 0:
        disc = PatchDiscriminator(lc.disc_channels, lc.disc_layers)
        disc_opt = make_optimizer(disc, cfg, lr=lc.disc_lr or cfg.lr)
    model, optimizer, scheduler, *gan = trainer.prepare(model, optimizer, make_scheduler(optimizer, cfg, cfg.max_steps),
                                                        *([disc, disc_opt] if disc is not None else []), ema_of=mgvq)
    sampler.start_step = trainer.step
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                        pin_memory=acc.device.type == "cuda", generator=torch.Generator())
    acc.print(f"training a {sum(p.numel() for p in mgvq.parameters()) / 1e6:.2f}M-parameter tokenizer for "
              f"{cfg.max_steps} steps from step {trainer.step} on {acc.num_processes} process(es), {len(dataset)} "
              f"images, {sampler.steps_per_epoch} steps per epoch")
    batches = iter(loader)
    step_fn = TokenizerStep(cfg, trainer, batches, model, optimizer, scheduler, lpips, *(gan or [None, None]))
    trainer.run(cfg.max_steps, step_fn, ema_source=step_fn.mgvq, lr=lambda: scheduler.get_last_lr()[0],
                describe=lambda r, m, n, s: describe(r, m, n, s, cfg.global_batch_size),
                state=lambda step: {"epoch": sampler.position(step)[0]}, desc="train tokenizer")
    del batches  # shuts the loader's workers down

    path = trainer.out_dir / "export" / "tokenizer.pt"
    if acc.is_main_process:
        save_tokenizer((trainer.ema.model if trainer.ema is not None else step_fn.mgvq).cpu(), path)
        acc.print(f"tokenizer ({'EMA' if trainer.ema is not None else 'trained'} weights) written to {path}")
    acc.wait_for_everyone()
    trainer.end()
    return path
