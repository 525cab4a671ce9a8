"""GPT training on a code store with accelerate: DDP / FSDP, gradient accumulation, EMA, atomic resumable checkpoints.

`train(cfg)` runs in the order of accelerate's examples: Accelerator, seed, data, model, optimizer, scheduler,
one `prepare`, resume, then the loop (accumulate, backward, clip, step, EMA, log, save) and the export.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator, DistributedType
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm import tqdm

from gpt import GPT, GPTConfig, load_gpt
from gpt.data import CodeDataset, GlobalBatchSampler
from tokenizer import sha256_file
from tokenizer.loading import pick_state_dict
from tokenizer.runs import (EMA, find_resume_checkpoint, json_ready, list_checkpoints, read_state, save_checkpoint,
                            start_log)

CODEBOOK_KEY = "quantize.embedding.weight"  # the raw code rows the GPT embeds (official and this project's layout)
LR_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


@dataclass
class DataConfig:
    codes_dir: str
    augment: bool = True  # one random view per image per epoch; False = always view 0 (the plain center crop)
    num_workers: int = 2


@dataclass
class TokenizerRef:
    checkpoint: str | None  # the tokenizer the codes were extracted with; gives the codebook the GPT embeds


@dataclass
class TrainConfig:
    data: DataConfig
    model: GPTConfig
    tokenizer: TokenizerRef
    out_dir: str
    max_steps: int | None = None  # optimizer steps; takes precedence over epochs
    epochs: int | None = 300  # passes over the store's usable images, when max_steps is None
    global_batch_size: int = 256
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0  # 0 = no clipping (the norm is still logged)
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine | linear (after the warmup)
    precision: str = "bf16"  # no | fp16 | bf16
    ema: float = 0.0  # EMA decay; 0 = off
    compile: bool = False
    log_every: int = 100
    ckpt_every: int = 5000
    keep_last: int = 2
    seed: int = 0
    resume: str = "auto"  # auto (newest checkpoint in out_dir, if any) | none | <checkpoint dir>
    init_from: str | None = None  # GPT weights to start from (this project's or the official MGVQ layout)


def cross_entropy_per_group(logits: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over positions and groups, and its per-group means (G,).

    logits (B, L, G, V), codes (B, L, G). Every group has B * L targets, so the mean equals the mean of the
    per-group means. Under autocast, cross_entropy runs in float32.
    """
    ce = F.cross_entropy(logits.flatten(0, 2), codes.flatten(), reduction="none").view(codes.shape)  # (B, L, G)
    per_group = ce.mean(dim=(0, 1))
    return per_group.mean(), per_group


def resolve_model_config(model: GPTConfig, dataset: CodeDataset, codebook_dim: int | None) -> GPTConfig:
    """Fill the model's data-dependent fields from the store's meta; refuse values that contradict it."""
    h, w = dataset.grid
    if h != w:
        raise ValueError(f"{dataset.codes_dir}: the GPT needs a square code grid, the store holds {h}x{w}")
    meta = dataset.meta
    from_store = {
        "codebook_groups": dataset.groups,
        "codebook_size": int(meta["codes_per_group"]),
        "grid_size": h,
        "codebook_embed_dim": codebook_dim,
    }
    resolved = {}
    for name, value in from_store.items():
        mine = getattr(model, name)
        if value is None or mine == value:
            continue
        if mine is not None:
            raise ValueError(f"model.{name}={mine} contradicts the code store {dataset.codes_dir} ({name}={value}); "
                             f"set it to null to take it from the store")
        resolved[name] = value
    num_classes = int(meta["num_classes"])
    if model.num_classes is None:
        resolved["num_classes"] = num_classes
    elif model.num_classes < num_classes:
        raise ValueError(f"model.num_classes={model.num_classes} is smaller than the {num_classes} classes of "
                         f"the code store {dataset.codes_dir}")
    return dataclasses.replace(model, **resolved)


def load_codebook(checkpoint: str | None, dataset: CodeDataset) -> tuple[torch.Tensor | None, str | None]:
    """Raw tokenizer codebook (codebook_size, latent/G) and its file's sha256, which must be the store's.

    Only the `quantize.embedding.weight` table is read (memory-mapped where the file allows): the sha256 match
    already proves this is the tokenizer the extraction loaded and checked against the store's architecture.
    """
    if checkpoint is None:
        return None, None
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer.checkpoint {path} does not exist")
    sha = sha256_file(path)
    want = dataset.meta["tokenizer_sha256"]
    if sha != want:
        raise ValueError(f"tokenizer.checkpoint {path} (sha256 {sha[:16]}...) is not the tokenizer the codes in "
                         f"{dataset.codes_dir} were extracted with (sha256 {want[:16]}...)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # an old (non-zip) torch file cannot be memory-mapped
        blob = torch.load(path, map_location="cpu", weights_only=True)
    weights, _ = pick_state_dict(blob, path)
    if CODEBOOK_KEY not in weights:
        raise KeyError(f"tokenizer.checkpoint {path} has no {CODEBOOK_KEY!r}")
    codebook = weights[CODEBOOK_KEY].float().clone()  # (G*K, latent/G)
    tokenizer = dataset.meta["tokenizer"]
    want_shape = (tokenizer["codebook_size"], tokenizer["latent_channels"] // tokenizer["codebook_groups"])
    if tuple(codebook.shape) != want_shape:
        raise ValueError(f"{path}: {CODEBOOK_KEY} has shape {tuple(codebook.shape)}, the store's tokenizer "
                         f"config implies {want_shape}")
    return codebook, sha


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas, fused: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (no decay on 1-D gains and biases), as LlamaGen."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused or None)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, max_steps: int):
    from transformers import get_scheduler

    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule={cfg.lr_schedule!r}: choose one of {sorted(LR_SCHEDULES)}")
    return get_scheduler(LR_SCHEDULES[cfg.lr_schedule], optimizer, num_warmup_steps=cfg.warmup_steps,
                         num_training_steps=max_steps)


# ---- checkpoints -------------------------------------------------------------------------------------------

def check_resume_state(saved: dict, state: dict, path: Path) -> None:
    """A checkpoint continues only the run that wrote it: same model, store, batch and data order."""
    for key in ("model", "store_fingerprint", "tokenizer_sha256", "global_batch_size", "seed", "augment"):
        if saved[key] != state[key]:
            raise ValueError(f"cannot resume from {path}: its {key} differs from this run's\n"
                             f"  checkpoint: {saved[key]}\n  this run:   {state[key]}")


# ---- training ----------------------------------------------------------------------------------------------

def train(cfg: TrainConfig) -> Path:
    """Train a GPT on the code store `cfg.data.codes_dir`; returns the path of the exported model file."""
    out_dir = Path(cfg.out_dir)
    trackers = "tensorboard" if importlib.util.find_spec("tensorboard") else None  # optional
    accelerator = Accelerator(
        mixed_precision=cfg.precision,
        gradient_accumulation_steps=cfg.grad_accum,
        step_scheduler_with_optimizer=False,  # the schedule counts optimizer steps, whatever the number of ranks
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "tensorboard")),
    )
    set_seed(cfg.seed, device_specific=True)  # dropout streams differ per rank; data order does not use them
    is_fsdp = accelerator.distributed_type == DistributedType.FSDP
    if cfg.ema and is_fsdp:
        raise ValueError("ema is not supported with FSDP (the EMA copy would need sharding too): set ema=0")

    # Data, the tokenizer codebook and the model config: every mismatch is refused before anything is built.
    dataset = CodeDataset(cfg.data.codes_dir, seed=cfg.seed, augment=cfg.data.augment)
    if cfg.model.input_embedding == "codebook" and cfg.tokenizer.checkpoint is None:
        raise ValueError("model.input_embedding=codebook needs tokenizer.checkpoint (the codebook the GPT embeds)")
    codebook, tokenizer_sha = load_codebook(cfg.tokenizer.checkpoint, dataset)
    model_cfg = resolve_model_config(cfg.model, dataset, None if codebook is None else codebook.shape[1] * dataset.groups)
    sampler = GlobalBatchSampler(dataset, cfg.global_batch_size, cfg.grad_accum, accelerator.process_index,
                                 accelerator.num_processes)
    if cfg.max_steps is None and cfg.epochs is None:
        raise ValueError("set max_steps or epochs")
    max_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * sampler.steps_per_epoch
    state = json_ready({
        "model": model_cfg.to_dict(),
        "store_fingerprint": dataset.fingerprint,
        "tokenizer_sha256": tokenizer_sha,
        "global_batch_size": cfg.global_batch_size,
        "seed": cfg.seed,
        "augment": cfg.data.augment,
    })
    resume_from = find_resume_checkpoint(out_dir, cfg.resume)
    if resume_from is not None:
        check_resume_state(read_state(resume_from), state, resume_from)

    model = GPT(model_cfg, codebook=codebook)
    if cfg.init_from and resume_from is None:
        model.load_state_dict(load_gpt(cfg.init_from, config=model_cfg, codebook=codebook).state_dict())
    ema = EMA(model, cfg.ema) if cfg.ema else None
    if ema is not None:
        ema.model.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    if cfg.compile:
        model.compile()  # in place: parameter names (checkpoints, export) stay those of the plain model
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, fused=accelerator.device.type == "cuda")
    scheduler = make_scheduler(optimizer, cfg, max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step = 0
    if resume_from is not None:
        if not (resume_from / f"random_states_{accelerator.process_index}.pkl").is_file():
            accelerator.print(f"warning: {resume_from} holds no RNG state for rank {accelerator.process_index} "
                              f"(written by another number of processes): dropout streams restart")
        accelerator.load_state(str(resume_from))
        step = read_state(resume_from)["step"]
    sampler.start_step = step
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                        pin_memory=accelerator.device.type == "cuda",
                        generator=torch.Generator())  # its own generator: iterating draws nothing from the global RNG
    batches = iter(loader)

    log_path = out_dir / "log.jsonl"
    if accelerator.is_main_process:
        start_log(log_path, step, resumed=resume_from is not None)
        accelerator.print(f"training {model_cfg.to_dict()} for {max_steps} steps from step {step} on "
                          f"{accelerator.num_processes} process(es), {len(dataset)} images, "
                          f"{sampler.steps_per_epoch} steps per epoch")
    if trackers:
        accelerator.init_trackers("train_gpt", config=_flat_hparams(cfg))

    tokens_per_step = cfg.global_batch_size * dataset.grid[0] * dataset.grid[1]
    window = LossWindow(model_cfg.codebook_groups, accelerator.device)
    progress = tqdm(total=max_steps, initial=step, disable=not accelerator.is_main_process,
                    desc="train", unit="step", dynamic_ncols=True)
    model.train()
    while step < max_steps:
        step_loss = torch.zeros((), device=accelerator.device)
        for _ in range(cfg.grad_accum):
            codes, labels = next(batches)
            codes = codes.to(accelerator.device, non_blocking=True)  # (B, L, G)
            labels = labels.to(accelerator.device, non_blocking=True)
            with accelerator.accumulate(model):
                logits = model(codes, labels)  # (B, L, G, V)
                loss, group_loss = cross_entropy_per_group(logits, codes)
                accelerator.backward(loss)
                step_loss += loss.detach() / cfg.grad_accum
                window.add_micro(group_loss.detach() / cfg.grad_accum)
                if accelerator.sync_gradients:
                    # Same value on every rank, so all stop together; nothing is stepped or saved after it.
                    mean_loss = accelerator.reduce(step_loss, reduction="mean").item()
                    if not math.isfinite(mean_loss):
                        progress.close()
                        last = list_checkpoints(out_dir)
                        raise FloatingPointError(
                            f"loss is {mean_loss} at step {step + 1}: stopping; the last good checkpoint is "
                            f"{last[-1] if last else 'none (no checkpoint written yet)'}")
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
                    lr = scheduler.get_last_lr()[0]
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
        step += 1
        progress.update()
        if ema is not None:
            ema.update(accelerator.unwrap_model(model))
        window.end_step(mean_loss, grad_norm)

        if step % cfg.log_every == 0 or step == max_steps:
            record = window.flush(accelerator, step, lr, tokens_per_step, sampler.position(step - 1)[0])
            if accelerator.is_main_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
            accelerator.log({k: v for k, v in record.items() if isinstance(v, float)}, step=step)
        if step % cfg.ckpt_every == 0 or step == max_steps:
            epoch, batch = sampler.position(step)
            save_checkpoint(accelerator, out_dir, step, {
                **state, "step": step, "epoch": epoch, "batch_in_epoch": batch,
                "num_processes": accelerator.num_processes, "config": dataclasses.asdict(cfg),
            }, cfg.keep_last)
    progress.close()
    del batches  # shuts down the loader's workers

    export = export_model(accelerator, model, ema, model_cfg, out_dir, {**state, "step": step})
    accelerator.end_training()
    return export


def export_model(accelerator: Accelerator, model: nn.Module, ema: EMA | None, model_cfg: GPTConfig,
                 out_dir: Path, state: dict) -> Path:
    """`out_dir/export/model.pt`: {"model": weights (EMA when enabled), "config": GPTConfig dict, provenance}."""
    weights = ema.state_dict() if ema is not None else accelerator.get_state_dict(model)  # gathers FSDP shards
    path = out_dir / "export" / "model.pt"
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {"model": {k: v.detach().cpu() for k, v in weights.items()}, "config": model_cfg.to_dict(),
                "tokenizer_sha256": state["tokenizer_sha256"], "store_fingerprint": state["store_fingerprint"],
                "step": state["step"]}
        tmp = path.with_name(path.name + ".tmp")
        torch.save(blob, tmp)
        os.replace(tmp, path)
    accelerator.wait_for_everyone()
    return path


class LossWindow:
    """Running sums between two log lines, kept on the device so logging costs one reduction."""

    def __init__(self, groups: int, device: torch.device):
        self.group_sum = torch.zeros(groups, device=device)
        self.loss_sum, self.grad_norm_sum, self.steps = 0.0, 0.0, 0
        self.start = time.perf_counter()

    def add_micro(self, group_loss: torch.Tensor) -> None:
        self.group_sum += group_loss

    def end_step(self, loss: float, grad_norm: torch.Tensor) -> None:
        self.loss_sum += loss
        self.grad_norm_sum += float(grad_norm)
        self.steps += 1

    def flush(self, accelerator: Accelerator, step: int, lr: float, tokens_per_step: int, epoch: int) -> dict:
        groups = accelerator.reduce(self.group_sum, reduction="mean") / self.steps
        elapsed = time.perf_counter() - self.start
        record = {
            "step": step,
            "epoch": epoch,
            "loss": self.loss_sum / self.steps,
            **{f"loss_g{g}": float(v) for g, v in enumerate(groups.tolist())},
            "lr": lr,
            "grad_norm": self.grad_norm_sum / self.steps,
            "tokens_per_s": tokens_per_step * self.steps / elapsed,
            "steps_per_s": self.steps / elapsed,
            "num_processes": accelerator.num_processes,
        }
        self.group_sum.zero_()
        self.loss_sum, self.grad_norm_sum, self.steps = 0.0, 0.0, 0
        self.start = time.perf_counter()
        return record


def _flat_hparams(cfg: TrainConfig) -> dict:
    """Trackers take flat scalars and strings."""
    flat = {}

    def walk(prefix: str, obj) -> None:
        for key, value in obj.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                flat[prefix + key] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", dataclasses.asdict(cfg))
    return flat
