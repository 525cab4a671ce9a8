"""MGVQ tokenizer training with accelerate: reconstruction + VQ losses, nested masking, code re-seeding, EMA, resume.

The recipe of the MGVQ paper: the full 32-channel latent split into G groups, L2-normalised sub-codebooks and a
straight-through estimator (tokenizer/quantizer.py), VQ + commitment (beta 0.25) losses, nested masking of
trailing groups, Charbonnier + L2 reconstruction, optional LPIPS and PatchGAN hinge losses (tokenizer/losses.py).
Codes whose usage (an EMA of their frequency over all ranks) falls below a threshold are re-seeded from the
current step's encoder outputs. `train(cfg)` runs in the order of accelerate's examples and writes
`<out_dir>/export/tokenizer.pt`, this project's tokenizer file, which `load_tokenizer(path)` reads as it is.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from tokenizer.config import MGVQConfig, TokenizerConfig
from tokenizer.data import center_crop_arr, list_images
from tokenizer.loading import load_tokenizer, save_tokenizer
from tokenizer.losses import LPIPS, PatchDiscriminator, charbonnier, hinge_d_loss, hinge_g_loss, l2
from tokenizer.model import MGVQ
from tokenizer.quantizer import MultiGroupQuantizer
from tokenizer.recon import codebook_usage
from tokenizer.runs import EMA, find_resume_checkpoint, json_ready, read_state, save_checkpoint, start_log

@dataclass
class DataConfig:
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


@dataclass
class TrainTokenizerConfig:
    data: DataConfig
    tokenizer: TokenizerConfig  # the architecture; `checkpoint` = weights to start from (null: random init)
    out_dir: str
    loss: LossConfig = field(default_factory=LossConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    max_steps: int = 100000
    global_batch_size: int = 128  # = per-process batch * num_processes
    lr: float = 1e-4
    weight_decay: float = 0.05  # on conv / linear weights only (not norms, biases or the codebook)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 0
    grad_clip: float = 1.0  # 0 = off
    precision: str = "no"  # no | bf16 | fp16 (autocast; the quantizer stays fp32)
    ema: float = 0.0  # EMA decay of the exported weights; 0 = export the trained weights
    log_every: int = 100
    ckpt_every: int = 5000
    keep_last: int = 2
    seed: int = 0
    resume: str = "auto"  # auto (newest checkpoint in out_dir, if any) | none | <checkpoint dir>


# ---- data --------------------------------------------------------------------------------------------------

class ImageFolderImages(Dataset):
    """Item (index, flip) -> image (3, S, S) in [-1, 1]: ADM center crop, flipped when asked."""

    def __init__(self, root: str, image_size: int):
        self.root, self.image_size = Path(root), image_size
        self.files = list_images(root)[0]
        if not self.files:
            raise ValueError(f"data.root {root} holds no images")

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


class StepBatches(torch.utils.data.Sampler):
    """This rank's share of each global batch, from `start_step` on, forever.

    Epoch e shuffles the images with a generator seeded by (seed, e) and draws its flips with it; global
    batch b of an epoch is images [b*B, (b+1)*B) of that order, split into contiguous per-rank slices. So
    the images of a step depend only on the seed and the step, whatever the number of processes.
    """

    def __init__(self, num_images: int, global_batch: int, rank: int, world: int, seed: int, hflip: bool):
        if global_batch % world:
            raise ValueError(f"global_batch_size={global_batch} is not divisible by the {world} processes")
        if num_images < global_batch:
            raise ValueError(f"global_batch_size={global_batch} exceeds the {num_images} training images")
        self.n, self.B, self.rank, self.world = num_images, global_batch, rank, world
        self.seed, self.hflip = seed, hflip
        self.steps_per_epoch = num_images // global_batch
        self.start_step = 0

    def batch(self, step: int) -> list[tuple[int, bool]]:
        epoch, b = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order, flips = torch.randperm(self.n, generator=g), torch.rand(self.n, generator=g) < 0.5
        idx = order[b * self.B:(b + 1) * self.B].view(self.world, -1)[self.rank]
        return [(i, bool(flips[i]) and self.hflip) for i in idx.tolist()]

    def __iter__(self):
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1


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


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas) -> torch.optim.AdamW:
    """AdamW with decay on conv / linear weights; norms, biases and the codebook (compared by angle) get none."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.endswith("quantize.embedding.weight") else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=tuple(betas))


def warmup(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / steps) if steps else 1.0)


# ---- checkpoints -------------------------------------------------------------------------------------------

# ---- training ----------------------------------------------------------------------------------------------

def build_tokenizer(cfg: TokenizerConfig, loss: LossConfig) -> MGVQ:
    """A trainable MGVQ of the config's architecture, from `cfg.checkpoint` when given, else randomly initialised,
    its quantizer set to the loss config's commitment weight and nested-masking probabilities."""
    arch = MGVQConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "checkpoint"})
    model = MGVQ(arch)
    if cfg.checkpoint:
        model.load_state_dict(load_tokenizer(cfg.checkpoint, arch).state_dict())
    model.quantize.beta = loss.beta
    model.quantize.mask_probs = tuple(loss.mask_probs[: arch.codebook_groups])  # validated by the quantizer
    return model.train().requires_grad_(True)


def train(cfg: TrainTokenizerConfig) -> Path:
    """Train a tokenizer on the images under `cfg.data.root`; returns the exported tokenizer file."""
    out_dir = Path(cfg.out_dir)
    accelerator = Accelerator(mixed_precision=cfg.precision)
    set_seed(cfg.seed, device_specific=True)  # masking draws differ per rank; data order and re-seeding do not use them
    device, lc, cc = accelerator.device, cfg.loss, cfg.codebook

    dataset = ImageFolderImages(cfg.data.root, cfg.data.image_size)
    if cfg.data.image_size % cfg.tokenizer.downsample:
        raise ValueError(f"data.image_size={cfg.data.image_size} is not a multiple of the tokenizer's "
                         f"downsampling {cfg.tokenizer.downsample}")
    sampler = StepBatches(len(dataset), cfg.global_batch_size, accelerator.process_index, accelerator.num_processes,
                          cfg.seed, cfg.data.hflip)

    mgvq = build_tokenizer(cfg.tokenizer, cfg.loss)
    K = mgvq.quantize.codes_per_group
    model = AutoencoderStep(mgvq)
    ema = EMA(mgvq, cfg.ema) if cfg.ema else None
    if ema is not None:
        ema.model.to(device)
        accelerator.register_for_checkpointing(ema)
    lpips = LPIPS(lc.lpips_vgg, lc.lpips_lin).to(device) if lc.perceptual_weight > 0 else None
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas)
    scheduler = warmup(optimizer, cfg.warmup_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    disc = None
    if lc.disc_weight > 0:
        disc = PatchDiscriminator(lc.disc_channels, lc.disc_layers)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=lc.disc_lr or cfg.lr, betas=tuple(cfg.betas),
                                     weight_decay=cfg.weight_decay)
        disc, disc_opt = accelerator.prepare(disc, disc_opt)

    state = {"tokenizer": MGVQConfig.to_dict(mgvq.config), "global_batch_size": cfg.global_batch_size,
             "seed": cfg.seed, "data_root": str(cfg.data.root), "image_size": cfg.data.image_size,
             "num_processes": accelerator.num_processes, "config": json_ready(dataclasses.asdict(cfg))}
    step = 0
    resume_from = find_resume_checkpoint(out_dir, cfg.resume)
    if resume_from is not None:
        saved = read_state(resume_from)
        for key in ("tokenizer", "global_batch_size", "seed", "image_size"):
            if saved[key] != json_ready(state[key]):
                raise ValueError(f"cannot resume from {resume_from}: its {key} differs from this run's\n"
                                 f"  checkpoint: {saved[key]}\n  this run:   {state[key]}")
        accelerator.load_state(str(resume_from))
        step = saved["step"]
    sampler.start_step = step
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator())
    batches = iter(loader)

    log_path = out_dir / "log.jsonl"
    if accelerator.is_main_process:
        start_log(log_path, step, resumed=resume_from is not None)
        n_params = sum(p.numel() for p in mgvq.parameters())
        accelerator.print(f"training a {n_params / 1e6:.2f}M-parameter tokenizer for {cfg.max_steps} steps from step "
                          f"{step} on {accelerator.num_processes} process(es), {len(dataset)} images, "
                          f"{sampler.steps_per_epoch} steps per epoch")

    window = Window(device, cfg.tokenizer.codebook_groups, K)
    unwrapped = accelerator.unwrap_model(model).mgvq
    progress = tqdm(total=cfg.max_steps, initial=step, desc="train tokenizer", unit="step", dynamic_ncols=True,
                    disable=not accelerator.is_main_process)
    while step < cfg.max_steps:
        x = next(batches).to(device, non_blocking=True)  # (B, 3, S, S) in [-1, 1]
        use_disc = disc is not None and step >= lc.disc_start
        with accelerator.autocast():
            recon, q, z = model(x)
            terms = {"charbonnier": charbonnier(recon, x, lc.charbonnier_eps), "l2": l2(recon, x),
                     "vq": q.vq_loss.mean(), "commit": q.commit_loss.mean()}
            loss = (lc.charbonnier_weight * terms["charbonnier"] + lc.l2_weight * terms["l2"]
                    + lc.codebook_weight * (terms["vq"] + terms["commit"]))
            if lpips is not None:
                terms["lpips"] = lpips(recon, x).mean()
                loss = loss + lc.perceptual_weight * terms["lpips"]
            if use_disc:
                terms["g_adv"] = hinge_g_loss(disc(recon))
                loss = loss + lc.disc_weight * terms["g_adv"]
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if use_disc:
            disc_opt.zero_grad(set_to_none=True)  # the generator's loss reached it too
            with accelerator.autocast():
                terms["d_loss"] = lc.disc_weight * hinge_d_loss(disc(x), disc(recon.detach()))
            accelerator.backward(terms["d_loss"])
            disc_opt.step()
            disc_opt.zero_grad(set_to_none=True)
        step += 1

        # Code usage over all ranks: the EMA that decides re-seeding, and the window's counts for the log.
        counts = accelerator.reduce(code_counts(q.codes, K), reduction="sum")  # (G, K)
        usage = unwrapped.quantize.embed_prob
        usage.lerp_(counts / counts.sum(dim=1, keepdim=True), 1 - cc.usage_decay)
        if cc.reseed_every and step % cc.reseed_every == 0 and (cc.reseed_until is None or step <= cc.reseed_until):
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # the same on every rank
            window.reseeded += torch.tensor(reseed_dead_codes(unwrapped.quantize, accelerator.gather(z),
                                                              cc.reseed_threshold, generator), device=device)
        if ema is not None:
            ema.update(unwrapped)
        window.add(loss.detach(), terms, grad_norm, counts)
        progress.update()

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            record = window.flush(accelerator, step, scheduler.get_last_lr()[0], cfg.global_batch_size)
            if accelerator.is_main_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                progress.set_postfix(loss=f"{record['loss']:.4f}", l2=f"{record['l2']:.4f}",
                                     ppl=",".join(f"{p:.0f}" for p in record["perplexity"]))
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
            save_checkpoint(accelerator, out_dir, step, state, cfg.keep_last)
    progress.close()
    del batches  # shuts the loader's workers down

    path = out_dir / "export" / "tokenizer.pt"
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tokenizer((ema.model if ema is not None else unwrapped).cpu(), path)
        accelerator.print(f"tokenizer ({'EMA' if ema is not None else 'trained'} weights) written to {path}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return path


class Window:
    """Sums between two log lines, kept on the device so that logging costs one reduction per value."""

    def __init__(self, device: torch.device, groups: int, codes_per_group: int):
        self.device, self.shape = device, (groups, codes_per_group)
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.n: dict[str, int] = {}  # steps that produced each term (the adversarial ones start late)
        self.counts = torch.zeros(self.shape, device=self.device)
        self.reseeded = torch.zeros(self.shape[0], device=self.device)
        self.steps, self.start = 0, time.perf_counter()

    def add(self, loss: torch.Tensor, terms: dict, grad_norm: torch.Tensor, counts: torch.Tensor) -> None:
        for name, value in {"loss": loss, **terms, "grad_norm": grad_norm}.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach().float()
            self.n[name] = self.n.get(name, 0) + 1
        self.counts += counts
        self.steps += 1

    def flush(self, accelerator: Accelerator, step: int, lr: float, global_batch: int) -> dict:
        names = sorted(self.sums)
        means = accelerator.reduce(torch.stack([self.sums[n] / self.n[n] for n in names]), reduction="mean")
        used, perplexity = codebook_usage(self.counts)
        seconds = time.perf_counter() - self.start
        record = {"step": step, **dict(zip(names, means.tolist())), "lr": lr, "code_usage": used,
                  "perplexity": perplexity, "reseeded": self.reseeded.long().tolist(),
                  "images_per_s": self.steps * global_batch / seconds}
        self.reset()
        return record


