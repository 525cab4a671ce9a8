"""Training-run plumbing shared by the tokenizer and GPT trainers: EMA weights, atomic checkpoints, resume.

A run's `out_dir/checkpoints/step_XXXXXXX/` holds accelerate's state (models, optimizers, schedulers, every
rank's RNG states, registered objects such as the EMA) and our `train_state.json` (step, data position,
resolved config). A checkpoint is written under a `.tmp_` name and renamed into place, so a directory named
`step_*` with a state file in it is always complete, and a crash mid-write leaves the previous one intact.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import Accelerator

from tokenizer.store import write_json_atomic

STATE_FILE = "train_state.json"


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
            raise FileExistsError(f"{out_dir} already holds checkpoints (newest {existing[-1].name}): pass "
                                  f"resume=auto to continue them, or choose another out_dir")
        return None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume={resume}: not a checkpoint directory (no {STATE_FILE} in it)")
    return path


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


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
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if not resumed:
        log_path.unlink(missing_ok=True)
    if not log_path.is_file():
        return
    keep = [line for line in log_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = log_path.with_name(log_path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, log_path)


def json_ready(obj):
    """`obj` as it reads back from JSON (tuples become lists), so a saved state compares equal to a fresh one."""
    return json.loads(json.dumps(obj))
