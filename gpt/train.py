"""GPT training on a code store with accelerate: DDP / FSDP, gradient accumulation, EMA, atomic resumable checkpoints.

`train(cfg)` runs the shared training skeleton (tokenizer/common/runs.py: Accelerator, seed, prepare, resume, the
loop with log / EMA / checkpoints) with the GPT's data, model and step, then exports the model file.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.utils import ProjectConfiguration
from torch.utils.data import DataLoader

from gpt.config import GPTConfig
from gpt.data import CodeDataset
from gpt.loading import load_gpt
from gpt.model import GPT
from tokenizer.base import group_sizes
from tokenizer.common import validate as v
from tokenizer.common.errors import BadFileError, ConfigError, MissingFileError
from tokenizer.common.io import atomic_path, sha256_file
from tokenizer.common.runs import GlobalBatchSampler, RunConfig, Trainer, make_optimizer, make_scheduler
from tokenizer.common.settings import flatten
from tokenizer.loading import TokenizerRef, read_codebook
from tokenizer.registry import get_family


@dataclass
class CodeDataConfig:
    codes_dir: str
    augment: bool = True  # one random view per image per epoch; False = always view 0 (the plain center crop)
    # Reader processes per rank and micro-batches each keeps in flight: a worker reads a batch of 2 KB records
    # in one sorted pass (about 100-200 batches/s from a cold 2 GB store here, scripts/bench.py data); several
    # workers keep several batches' reads outstanding when the store sits on network storage.
    num_workers: int = 4
    prefetch_factor: int = 4


@dataclass(kw_only=True)
class TrainConfig(RunConfig):
    """The run's fields (out_dir, lr, precision, ema, resume, ... in RunConfig) and the GPT's own."""

    data: CodeDataConfig
    model: GPTConfig
    tokenizer: TokenizerRef  # its checkpoint: the tokenizer the codes were extracted with (gives the codebook)
    epochs: int | None = 300  # passes over the store's usable images, when max_steps is None
    precision: str = "bf16"
    compile: bool = False
    init_from: str | None = None  # GPT weights to start from (this project's or the official MGVQ layout)

    def check(self) -> None:
        super().check()
        v.non_empty(self.data.codes_dir, "data.codes_dir")
        v.integer(self.data.num_workers, "data.num_workers", low=0)
        v.integer(self.data.prefetch_factor, "data.prefetch_factor", low=1)
        v.optional_integer(self.epochs, "epochs", low=1)
        if self.max_steps is None and self.epochs is None:
            raise ConfigError("max_steps and epochs are both null: set one")
        for name in ("class_dropout_prob", "token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p",
                     "drop_path_rate"):
            v.number(getattr(self.model, name), f"model.{name}", low=0, high=1, high_open=True)


def cross_entropy_per_group(logits: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over positions and groups, and its per-group means (G,).

    logits (B, L, G, V), codes (B, L, G). Every group has B * L targets, so the mean equals the mean of the
    per-group means. The logits are cast to float32 here, whatever dtype they arrive in: the model returns float32,
    but accelerate's bf16 FSDP2 policy (output_dtype=bf16) casts the root module's output back to bf16, and the
    log-softmax, its backward and the mean would then run in bf16.
    The loss is reduced by nll_loss's own mean, as `F.cross_entropy(logits, codes)` in LlamaGen's train_c2i.py: for
    G = 1 it is the same float32 number bit for bit (a `.mean()` of per-token losses sums in another order).
    """
    logp = F.log_softmax(logits.float().flatten(0, 2), dim=-1)  # (B * L * G, V), computed once
    targets = codes.flatten()
    per_group = F.nll_loss(logp.detach(), targets, reduction="none").view(codes.shape).mean(dim=(0, 1))  # (G,)
    return F.nll_loss(logp, targets), per_group


def resolve_model_config(model: GPTConfig, dataset: CodeDataset, codebook_dim: int | None) -> GPTConfig:
    """Fill the model's data-dependent fields from the store's meta; refuse values that contradict it."""
    h, w = dataset.grid
    if h != w:
        raise ConfigError(f"{dataset.codes_dir}: the GPT needs a square code grid, the store holds {h}x{w}")
    meta = dataset.meta
    per_group = meta["codes_per_group"]  # an int, or one per group (Open-MAGVIT2: [64, 4096])
    from_store = {
        "codebook_groups": dataset.groups,
        "codes_per_group": [int(k) for k in per_group] if isinstance(per_group, list) else int(per_group),
        "grid_size": h,
        "codebook_embed_dim": codebook_dim,
    }
    resolved = {}
    for name, value in from_store.items():
        mine = getattr(model, name)
        if value is None or mine == value:
            continue
        if mine is not None:
            raise ConfigError(f"model.{name}={mine} contradicts the code store {dataset.codes_dir} ({name}={value}); "
                             f"set it to null to take it from the store")
        resolved[name] = value
    num_classes = int(meta["num_classes"])
    if model.num_classes is None:
        resolved["num_classes"] = num_classes
    elif model.num_classes < num_classes:
        raise ConfigError(f"model.num_classes={model.num_classes} is smaller than the {num_classes} classes of "
                         f"the code store {dataset.codes_dir}")
    return dataclasses.replace(model, **resolved)


def load_codebook(tokenizer: TokenizerRef, dataset: CodeDataset,
                  needed: bool = True) -> tuple[torch.Tensor | None, str | None]:
    """Raw tokenizer codebook (codebook_size, latent/G) and its file's sha256, which must be the store's: the
    sha256 match proves this is the tokenizer the extraction loaded and checked against the store's architecture.
    `needed` False (a GPT that learns its code embeddings): only the sha256 is checked; the codebook is None.
    Reading the codebook with another family than the store's is refused."""
    if tokenizer.checkpoint is None:
        return None, None
    path = Path(tokenizer.checkpoint)
    if not path.is_file():
        raise MissingFileError(f"tokenizer.checkpoint {path} does not exist")
    sha = sha256_file(path)
    want = dataset.meta["tokenizer_sha256"]
    if sha != want:
        raise ConfigError(f"tokenizer.checkpoint {path} (sha256 {sha[:16]}...) is not the tokenizer the codes in "
                         f"{dataset.codes_dir} were extracted with (sha256 {want[:16]}...)")
    if not needed:
        return None, sha
    family = dataset.meta.get("family", "mgvq")  # stores written before families existed are MGVQ's
    if tokenizer.family != family:
        raise ConfigError(f"tokenizer.family={tokenizer.family!r}, but the codes in {dataset.codes_dir} were made by "
                         f"a {family!r} tokenizer")
    codebook = read_codebook(path, family, tokenizer.weights)  # (G*K, latent/G)
    arch = get_family(family).config_cls.from_dict(dataset.meta["tokenizer"])
    want_shape = (sum(group_sizes(arch)), arch.latent_channels // arch.codebook_groups)
    if tuple(codebook.shape) != want_shape:
        raise BadFileError(f"{path}: the codebook has shape {tuple(codebook.shape)}, the store's tokenizer "
                         f"config implies {want_shape}")
    return codebook, sha


class GPTStep:
    """One optimizer step: `grad_accum` micro-batches of teacher-forced cross-entropy, then the update."""

    def __init__(self, trainer: Trainer, batches, model: nn.Module, optimizer, scheduler, groups: int):
        self.trainer, self.batches, self.model = trainer, batches, model
        self.optimizer, self.scheduler, self.groups = optimizer, scheduler, groups

    def __call__(self) -> dict[str, torch.Tensor]:
        acc, A = self.trainer.accelerator, self.trainer.cfg.grad_accum
        step_loss = torch.zeros((), device=acc.device)
        group_loss = torch.zeros(self.groups, device=acc.device)
        for _ in range(A):
            codes, labels = next(self.batches)
            codes = codes.to(acc.device, non_blocking=True)  # (B, L, G)
            labels = labels.to(acc.device, non_blocking=True)
            with acc.accumulate(self.model):
                loss, per_group = cross_entropy_per_group(self.model(codes, labels), codes)  # logits (B, L, G, V)
                acc.backward(loss)
            step_loss += loss.detach() / A
            group_loss += per_group.detach() / A
        grad_norm = self.trainer.apply_gradients(self.model, self.optimizer, self.scheduler, step_loss)
        return {"loss": step_loss, "group_loss": group_loss, "grad_norm": grad_norm}


def describe(record: dict, means: dict, steps: int, seconds: float, tokens_per_step: int, epoch: int) -> dict:
    """A log line: the loss, per-group losses, gradient norm, tokens/s."""
    return {**record, "epoch": epoch, "loss": float(means["loss"]),
            **{f"loss_g{g}": float(v) for g, v in enumerate(means["group_loss"].tolist())},
            "grad_norm": float(means["grad_norm"]), "tokens_per_s": tokens_per_step * steps / seconds}


def build_model(cfg: TrainConfig, model_cfg: GPTConfig, codebook: torch.Tensor | None, resuming: bool) -> GPT:
    model = GPT(model_cfg, codebook=codebook)
    if cfg.init_from and not resuming:
        model.load_state_dict(load_gpt(cfg.init_from, config=model_cfg, codebook=codebook).state_dict())
    return model


def train(cfg: TrainConfig) -> Path:
    """Train a GPT on the code store `cfg.data.codes_dir`; returns the path of the exported model file."""
    tensorboard = importlib.util.find_spec("tensorboard") is not None  # optional
    trainer = Trainer(cfg, log_with="tensorboard" if tensorboard else None,
                      project_config=ProjectConfiguration(project_dir=cfg.out_dir,
                                                          logging_dir=str(Path(cfg.out_dir) / "tensorboard")))
    acc = trainer.accelerator
    # Data, the tokenizer codebook and the model config: every mismatch is refused before anything is built.
    dataset = CodeDataset(cfg.data.codes_dir, seed=cfg.seed, augment=cfg.data.augment)
    if cfg.model.input_embedding == "codebook" and cfg.tokenizer.checkpoint is None:
        raise ConfigError("model.input_embedding=codebook needs tokenizer.checkpoint (the codebook the GPT embeds)")
    codebook, tokenizer_sha = load_codebook(cfg.tokenizer, dataset, needed=cfg.model.input_embedding == "codebook")
    model_cfg = resolve_model_config(cfg.model, dataset, None if codebook is None else codebook.shape[1] * dataset.groups)
    sampler = GlobalBatchSampler(dataset.epoch_plan, len(dataset), cfg.global_batch_size, cfg.grad_accum,
                                 acc.process_index, acc.num_processes)
    max_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * sampler.steps_per_epoch
    identity = {"model": model_cfg.to_dict(), "store_fingerprint": dataset.fingerprint,
                "tokenizer_sha256": tokenizer_sha, "global_batch_size": cfg.global_batch_size, "seed": cfg.seed,
                "augment": cfg.data.augment}
    resuming = trainer.check_resume(identity) is not None

    model = build_model(cfg, model_cfg, codebook, resuming)
    optimizer = make_optimizer(model, cfg, fused=trainer.fused_optimizer)
    model, optimizer, scheduler = trainer.prepare(model, optimizer, make_scheduler(optimizer, cfg, max_steps),
                                                  compile=cfg.compile)
    sampler.start_step = trainer.step
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                        prefetch_factor=cfg.data.prefetch_factor if cfg.data.num_workers else None,
                        pin_memory=acc.device.type == "cuda",
                        generator=torch.Generator())  # its own generator: iterating draws nothing from the global RNG
    acc.print(f"training {model_cfg.to_dict()} for {max_steps} steps from step {trainer.step} on {acc.num_processes} "
              f"process(es), {len(dataset)} images, {sampler.steps_per_epoch} steps per epoch")
    if tensorboard:
        acc.init_trackers("train_gpt", config=_flat_hparams(cfg))

    batches = iter(loader)
    tokens_per_step = cfg.global_batch_size * dataset.grid[0] * dataset.grid[1]
    model.train()
    trainer.run(max_steps, GPTStep(trainer, batches, model, optimizer, scheduler, model_cfg.codebook_groups),
                ema_source=acc.unwrap_model(model), lr=lambda: scheduler.get_last_lr()[0],
                describe=lambda r, m, n, s: describe(r, m, n, s, tokens_per_step, sampler.position(r["step"] - 1)[0]),
                state=lambda step: dict(zip(("epoch", "batch_in_epoch"), sampler.position(step))))
    del batches  # shuts down the loader's workers

    export = export_model(trainer, model, model_cfg, {**identity, "step": trainer.step})
    trainer.end()
    return export


def export_model(trainer: Trainer, model: nn.Module, model_cfg: GPTConfig, state: dict) -> Path:
    """`out_dir/export/model.pt`: {"model": weights (EMA when enabled), "config": GPTConfig dict, provenance}."""
    acc, ema = trainer.accelerator, trainer.ema
    weights = ema.state_dict() if ema is not None else acc.get_state_dict(model)  # gathers FSDP shards
    path = trainer.out_dir / "export" / "model.pt"
    if acc.is_main_process:
        blob = {"model": {k: v.detach().cpu() for k, v in weights.items()}, "config": model_cfg.to_dict(),
                "tokenizer_sha256": state["tokenizer_sha256"], "store_fingerprint": state["store_fingerprint"],
                "step": state["step"]}
        with atomic_path(path) as tmp:
            torch.save(blob, tmp)
    acc.wait_for_everyone()
    return path


def _flat_hparams(cfg: TrainConfig) -> dict:
    """Trackers take flat scalars and strings."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v)
            for k, v in flatten(dataclasses.asdict(cfg)).items()}
