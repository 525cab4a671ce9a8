"""Training-run machinery shared by the tokenizer and GPT trainers: one skeleton, so a fix reaches both.

`Trainer` holds what every run does in the order of accelerate's examples: the Accelerator and the seed, the
refusal of a checkpoint written by another run, `prepare`, resume, then the loop (the trainer's own step, EMA,
a log line every `log_every` steps, a checkpoint every `ckpt_every`), and the end. A trainer supplies its data,
its model and a `step_fn` that runs one optimizer step and returns on-device metrics.

A run's `out_dir/checkpoints/step_XXXXXXX/` holds accelerate's state (models, optimizers, schedulers, every
rank's RNG states, registered objects such as the EMA) and our `train_state.json` (step, the run's identity,
resolved config). A checkpoint is written under a `.tmp_` name and renamed into place, so a directory named
`step_*` with a state file in it is always complete, and a crash mid-write leaves the previous one intact.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from accelerate import Accelerator, DistributedType, PartialState
from accelerate.utils import set_seed
from torch.utils.data import Sampler
from tqdm import tqdm

from tokenizer.common import validate as v
from tokenizer.common.errors import ConfigError, MissingFileError, OutputExistsError
from tokenizer.common.io import read_json, write_json_atomic, write_text_atomic
from tokenizer.common.lock import lock_out_dir, unlock_out_dir
from tokenizer.common.memory import keep_freed_cpu_memory
from tokenizer.common.precision import PRECISIONS, accelerate_precision
from tokenizer.common.settings import json_ready, refuse_mismatch

STATE_FILE = "train_state.json"
LR_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


@dataclass(kw_only=True)
class RunConfig:
    """What every training run has: where it writes, the optimizer and schedule, precision, EMA, logging, resume."""

    out_dir: str
    max_steps: int | None = None  # optimizer steps
    global_batch_size: int = 256  # = per-process batch * num_processes * grad_accum
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.05  # on matrices only (not norms, biases, or what the trainer exempts)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0  # 0 = no clipping (the norm is still logged)
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine | linear (after the warmup)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast)
    ema: float = 0.0  # EMA decay of the exported weights; 0 = off
    log_every: int = 100
    ckpt_every: int = 5000
    keep_last: int = 2  # checkpoints kept; 0 = all
    seed: int = 0
    resume: str = "auto"  # auto (newest checkpoint in out_dir, if any) | none | <checkpoint dir>

    def check(self) -> None:
        """Every run setting of the right type, finite and in range (ConfigError naming it), before anything is
        written. Trainers extend it with their own fields."""
        v.non_empty(self.out_dir, "out_dir")
        v.optional_integer(self.max_steps, "max_steps", low=1)
        v.integer(self.global_batch_size, "global_batch_size", low=1)
        v.integer(self.grad_accum, "grad_accum", low=1)
        v.number(self.lr, "lr", low=0)
        v.number(self.weight_decay, "weight_decay", low=0)
        if len(v.per_group(self.betas, "betas", low=0, high=1, high_open=True)) != 2:
            raise ConfigError(f"betas={self.betas}: expected two numbers in [0, 1)")
        v.number(self.grad_clip, "grad_clip", low=0)
        v.integer(self.warmup_steps, "warmup_steps", low=0)
        v.choice(self.lr_schedule, "lr_schedule", sorted(LR_SCHEDULES))
        v.choice(self.precision, "precision", list(PRECISIONS))
        v.number(self.ema, "ema", low=0, high=1, high_open=True)
        v.integer(self.log_every, "log_every", low=1)
        v.integer(self.ckpt_every, "ckpt_every", low=1)
        v.integer(self.keep_last, "keep_last", low=0)
        v.integer(self.seed, "seed", low=0, high=2**32 - 1)
        v.non_empty(self.resume, "resume")


class EMA:
    """Exponential moving average of a model's parameters, kept in float32 beside it; buffers (BatchNorm
    statistics, codebook usage) follow the live model."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        torch._foreach_lerp_(list(self.model.parameters()), [p.float() for p in model.parameters()], 1.0 - self.decay)
        for mine, live in zip(self.model.buffers(), model.buffers()):
            mine.copy_(live)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


class ShardedEMA:
    """EMA of an FSDP2 model's parameters, sharded as they are: each rank keeps float32 copies of its own shards
    (DTensors), so the EMA costs one float32 model per world, not per rank. Gathered only to be written: for a
    checkpoint (`state_dict`, main process; every rank reads it back and keeps its shard) and for the export.
    Buffers are the live model's, as with `EMA`."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.live = decay, model
        self.names = [name for name, _ in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for p in model.parameters()]  # DTensors, sharded like the model

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in model.parameters()], 1.0 - self.decay)

    @torch.no_grad()
    def state_dict(self) -> dict:
        """The full EMA weights and the live buffers, on the CPU of the main process ({} elsewhere). Collective:
        every rank must call it (accelerate's save_state does)."""
        from torch.distributed.tensor import DTensor  # heavy, and only FSDP runs need it

        main = PartialState().is_main_process
        shadow, out = dict(zip(self.names, self.shadow)), {}
        for name, value in self.live.state_dict().items():
            value = shadow.get(name, value)
            value = value.full_tensor() if isinstance(value, DTensor) else value  # one tensor gathered at a time
            if main:
                out[name] = value.detach().cpu()
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Take this rank's shards of the full weights `state` (buffers come back with the model)."""
        from torch.distributed.tensor import distribute_tensor  # heavy, and only FSDP runs need it

        for name, mine in zip(self.names, self.shadow):
            full = state[name].to(device=mine.device, dtype=mine.dtype)
            mine.copy_(distribute_tensor(full, mine.device_mesh, mine.placements))


# ---- checkpoints -------------------------------------------------------------------------------------------

def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (an interrupted write leaves only a `.tmp_` directory)."""
    root = out_dir / "checkpoints"
    found = [p for p in root.glob("step_*") if (p / STATE_FILE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


def find_resume_checkpoint(out_dir: Path, resume: str) -> Path | None:
    """`resume`: auto (the newest checkpoint, if any), none (refuse an out_dir with checkpoints) or a directory."""
    existing = list_checkpoints(out_dir)
    if resume == "auto":
        return existing[-1] if existing else None
    if resume == "none":
        if existing:
            raise OutputExistsError(f"{out_dir} already holds checkpoints (newest {existing[-1].name}): pass "
                                  f"resume=auto to continue them, or choose another out_dir")
        return None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise MissingFileError(f"resume={resume}: not a checkpoint directory (no {STATE_FILE} in it)")
    return path


def read_state(checkpoint: Path) -> dict:
    return read_json(checkpoint / STATE_FILE)


def save_checkpoint(accelerator: Accelerator, out_dir: Path, step: int, state: dict, keep_last: int) -> Path:
    """Write accelerate's state and ours (`state` plus the step) into a temporary directory, rename it into
    place, then drop all but the newest `keep_last` checkpoints (0 keeps all). Every rank must call it."""
    root = out_dir / "checkpoints"
    final, tmp = root / f"step_{step:07d}", root / f".tmp_step_{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank writes its RNG state; model and optimizer come from rank 0 (or shards)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / STATE_FILE, {**state, "step": step})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def start_log(log_path: Path, step: int, resumed: bool) -> None:
    """Make the JSON-lines log fit a run starting at `step`: a fresh run starts an empty log; a resumed one drops
    the lines past its step (written after the checkpoint by the run that stopped). Main process only."""
    if not resumed:
        log_path.unlink(missing_ok=True)
    if not log_path.is_file():
        return
    keep = [line for line in log_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    write_text_atomic(log_path, "".join(line + "\n" for line in keep))


# ---- data order --------------------------------------------------------------------------------------------

class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """This rank's micro-batches of (item, attribute) keys, endlessly, from optimizer step `start_step` on.

    `plan(epoch)` gives that epoch's item order and a per-item attribute (the view or the flip), from the seed
    and the epoch only. Step s of epoch e = s // steps_per_epoch takes the next `global_batch_size` items of the
    order (the tail that does not fill a global batch is left out); micro-step a of it is the slice
    [a * world * micro, (a + 1) * world * micro), of which rank r takes the r-th `micro` items. So the samples
    behind a step do not depend on the number of processes, and the data position is just the step.
    """

    def __init__(self, plan: Callable[[int], tuple[np.ndarray, np.ndarray]], num_items: int, global_batch_size: int,
                 grad_accum: int = 1, rank: int = 0, world_size: int = 1, start_step: int = 0):
        if global_batch_size % (world_size * grad_accum):
            raise ConfigError(f"global_batch_size={global_batch_size} is not divisible by "
                             f"num_processes * grad_accum = {world_size} * {grad_accum}")
        self.steps_per_epoch = num_items // global_batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"global_batch_size={global_batch_size} exceeds the {num_items} usable items")
        self.plan, self.global_batch_size, self.grad_accum = plan, global_batch_size, grad_accum
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size = global_batch_size // (world_size * grad_accum)
        self.start_step = start_step

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, global batch within the epoch) that optimizer step `step` (0-based) consumes."""
        return divmod(step, self.steps_per_epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step, plan_epoch = self.start_step, None
        while True:
            epoch, batch = self.position(step)
            if epoch != plan_epoch:
                order, attribute = self.plan(epoch)
                plan_epoch = epoch
            items = order[batch * self.global_batch_size:(batch + 1) * self.global_batch_size]
            for chunk in items.reshape(self.grad_accum, self.world_size, self.micro_batch_size):
                yield [(int(i), int(attribute[i])) for i in chunk[self.rank]]
            step += 1


# ---- optimizer ---------------------------------------------------------------------------------------------

def make_optimizer(model: nn.Module, cfg: RunConfig, *, no_decay: tuple[str, ...] = (), lr: float | None = None,
                   fused: bool = False) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (LlamaGen's rule); parameters named in `no_decay` get none."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and not name.endswith(no_decay) else rest).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=cfg.lr if lr is None else lr, betas=tuple(cfg.betas), fused=fused or None)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig, max_steps: int):
    from transformers import get_scheduler  # transformers takes seconds to import: only a trainer pays

    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"lr_schedule={cfg.lr_schedule!r}: choose one of {sorted(LR_SCHEDULES)}")
    return get_scheduler(LR_SCHEDULES[cfg.lr_schedule], optimizer, num_warmup_steps=cfg.warmup_steps,
                         num_training_steps=max_steps)


# ---- logging -----------------------------------------------------------------------------------------------

class MetricWindow:
    """On-device sums of each step's metrics between two log lines: logging costs one reduction, not one per step.

    A metric may be a scalar or a tensor (e.g. per-group losses, code counts); a metric missing from some steps
    (a loss that starts late) is averaged over the steps that had it.
    """

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.steps, self.start = 0, time.perf_counter()

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for name, value in metrics.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
            self.counts[name] = self.counts.get(name, 0) + 1
        self.steps += 1

    def flush(self, accelerator: Accelerator) -> tuple[dict[str, torch.Tensor], int, float]:
        """(per-step means averaged over ranks, on the CPU; steps; seconds) since the last flush, then reset."""
        names = sorted(self.sums)
        means = [self.sums[n].flatten() / self.counts[n] for n in names]
        reduced = accelerator.reduce(torch.cat(means), reduction="mean").cpu() if means else torch.zeros(0)
        out, offset = {}, 0
        for name, m in zip(names, means):
            out[name] = reduced[offset:offset + m.numel()].view(self.sums[name].shape)
            offset += m.numel()
        steps, seconds = self.steps, time.perf_counter() - self.start
        self.__init__()
        return out, steps, seconds


# ---- the skeleton ------------------------------------------------------------------------------------------

class Trainer:
    """One training run: build it, give it the identity a checkpoint must match, prepare, then `run`."""

    def __init__(self, cfg: RunConfig, **accelerator_kwargs):
        cfg.check()  # every setting, before anything is built or written
        self.cfg, self.out_dir = cfg, Path(cfg.out_dir)
        self.accelerator = Accelerator(mixed_precision=accelerate_precision(cfg.precision),
                                       gradient_accumulation_steps=cfg.grad_accum,
                                       step_scheduler_with_optimizer=False,  # the schedule counts optimizer steps
                                       **accelerator_kwargs)
        # The same stream on every rank while the model is built: FSDP does not broadcast rank 0's weights as DDP
        # does, so a per-rank seed here would shard a different model on every rank. prepare() then seeds per rank.
        set_seed(cfg.seed)
        self.device = self.accelerator.device
        if self.device.type == "cpu":
            keep_freed_cpu_memory()  # a step's freed activations serve the next step's without page faults
        self.is_fsdp = self.accelerator.distributed_type == DistributedType.FSDP
        self.ema: EMA | ShardedEMA | None = None
        self.first_bad = torch.zeros((), dtype=torch.long, device=self.device)  # first non-finite step, 0: none
        self.step, self.resume_from, self.identity = 0, None, {}
        self.log_path = self.out_dir / "log.jsonl"

    @property
    def fused_optimizer(self) -> bool:
        """Whether AdamW runs fused: on CUDA, and on a CPU outside FSDP (8x the foreach step on GPT-B's embedding
        and head matrices here, scripts/bench_llamagen.py), as LlamaGen's train_c2i.py asks wherever it exists."""
        return self.device.type == "cuda" or (self.device.type == "cpu" and not self.is_fsdp)

    def check_resume(self, identity: dict) -> Path | None:
        """The checkpoint to resume from (per `cfg.resume`), refused unless it was written by a run of this identity:
        the settings that fix what the steps compute (model, data, batch, seed). Call before building the model,
        once the data and settings are checked: it takes the out_dir's lock (tokenizer.common.lock), held until
        `end`."""
        lock_out_dir(self.out_dir, self.accelerator)
        self.identity = json_ready(identity)
        self.resume_from = find_resume_checkpoint(self.out_dir, self.cfg.resume)
        if self.resume_from is not None:
            saved = read_state(self.resume_from).get("identity", {})
            refuse_mismatch(saved, self.identity, f"checkpoint {self.resume_from}",
                            "pass another out_dir, or resume=none after removing its checkpoints")
        return self.resume_from

    def prepare(self, model: nn.Module, *objects, ema_of: nn.Module | None = None, compile: bool = False):
        """accelerate's `prepare` of the model, optimizers and schedulers; before it, an EMA of `ema_of` (default:
        the model) when cfg.ema > 0, registered for checkpointing, and `compile` of the model in place (parameter
        names, so checkpoints and exports, stay the plain model's); after it, the resume. Under FSDP the EMA is
        built after `prepare`, from the model's shards (ShardedEMA). Returns the prepared objects."""
        set_seed(self.cfg.seed, device_specific=True)  # dropout / masking streams differ per rank from here on
        if self.cfg.ema and self.is_fsdp and ema_of is not None:
            raise ConfigError("ema of a part of the model is not supported with FSDP: set ema=0")
        if self.cfg.ema and not self.is_fsdp:
            self.ema = EMA(ema_of if ema_of is not None else model, self.cfg.ema)
            self.ema.model.to(self.device)
            self.accelerator.register_for_checkpointing(self.ema)
        if compile:
            model.compile()
        prepared = self.accelerator.prepare(model, *objects)
        if self.cfg.ema and self.is_fsdp:
            self.ema = ShardedEMA(prepared[0] if objects else prepared, self.cfg.ema)
            self.accelerator.register_for_checkpointing(self.ema)
        if self.resume_from is not None:
            if not (self.resume_from / f"random_states_{self.accelerator.process_index}.pkl").is_file():
                self.accelerator.print(f"warning: {self.resume_from} holds no RNG state for rank "
                                       f"{self.accelerator.process_index} (written by another number of processes): "
                                       f"dropout streams restart")
            self.accelerator.load_state(str(self.resume_from))
            self.step = read_state(self.resume_from)["step"]
        if self.accelerator.is_main_process:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            start_log(self.log_path, self.step, resumed=self.resume_from is not None)
        return prepared

    def apply_gradients(self, model: nn.Module, optimizer, scheduler, loss: torch.Tensor) -> torch.Tensor:
        """After the step's last backward: clip, step the optimizer and the schedule; returns the gradient norm
        before clipping. Nothing here waits for the device: a non-finite loss or gradient norm is only recorded
        (the first such step, on the device), and `check_finite` stops the run at the next log line or checkpoint,
        before anything computed after it is logged or saved."""
        grad_norm = self.accelerator.clip_grad_norm_(model.parameters(), self.cfg.grad_clip or math.inf)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
        bad = ~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
        self.first_bad = torch.where(bad & (self.first_bad == 0), self.step + 1, self.first_bad)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def check_finite(self) -> None:
        """Raise FloatingPointError, on every rank alike, if a step since the start had a non-finite loss or
        gradient norm. One read of the device per call: at log lines and checkpoints only."""
        flags = self.accelerator.gather(self.first_bad[None])  # (num_processes,)
        bad = flags[flags > 0]
        if len(bad):
            last = list_checkpoints(self.out_dir)
            raise FloatingPointError(
                f"loss or gradient norm is not finite at step {int(bad.min())}: stopping at step {self.step} without "
                f"logging or saving it; the last good checkpoint is "
                f"{last[-1] if last else 'none (no checkpoint written yet)'}")

    def end(self) -> None:
        """The out_dir's lock released (once every rank is done), then accelerate's end of training (trackers; it
        takes the process group down)."""
        unlock_out_dir(self.out_dir, self.accelerator)
        self.accelerator.end_training()

    def run(self, max_steps: int, step_fn: Callable[[], dict[str, torch.Tensor]], *, ema_source: nn.Module | None = None,
            describe: Callable[[dict, dict, int, float], dict], lr: Callable[[], float], state: Callable[[int], dict],
            desc: str = "train") -> None:
        """Steps until `max_steps`: `step_fn()` runs one optimizer step and returns its metrics (on-device tensors);
        `ema_source`: the unwrapped module the EMA follows;
        `describe(record, means, steps, seconds)` turns a window's means into the log line's fields; `state(step)`
        adds to the checkpoint's train_state.json (the identity and step are always there)."""
        cfg, acc = self.cfg, self.accelerator
        window = MetricWindow()
        progress = tqdm(total=max_steps, initial=self.step, desc=desc, unit="step", dynamic_ncols=True,
                        disable=not acc.is_main_process)
        while self.step < max_steps:
            window.add(step_fn())
            self.step += 1
            progress.update()
            if self.ema is not None:
                self.ema.update(ema_source)
            if self.step % cfg.log_every == 0 or self.step == max_steps:
                self.check_finite()
                means, steps, seconds = window.flush(acc)
                record = describe({"step": self.step, "lr": lr(), "steps_per_s": steps / seconds,
                                   "num_processes": acc.num_processes}, means, steps, seconds)
                if acc.is_main_process:
                    with open(self.log_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                acc.log({k: v for k, v in record.items() if isinstance(v, float)}, step=self.step)
            if self.step % cfg.ckpt_every == 0 or self.step == max_steps:
                self.check_finite()
                save_checkpoint(acc, self.out_dir, self.step, {
                    **state(self.step), "identity": self.identity, "num_processes": acc.num_processes,
                    "config": json_ready(dataclasses.asdict(cfg))}, cfg.keep_last)
        progress.close()
