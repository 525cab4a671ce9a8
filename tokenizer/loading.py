"""Load and save tokenizer weights: the official MGVQ layout and this project's, strictly, without downloads."""
import os
from pathlib import Path

import torch

from tokenizer.common.io import atomic_path
from tokenizer.common.settings import refuse_mismatch
from tokenizer.config import MGVQConfig
from tokenizer.model import MGVQ

# Checkpoint entries that may hold the weights, in order of preference: EMA weights are what one samples with.
WEIGHT_KEYS = ("ema", "model", "state_dict")
CODEBOOK_KEY = "quantize.embedding.weight"  # the raw code rows the GPT embeds (official and this project's layout)


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def pick_state_dict(ckpt, path) -> tuple[dict, str]:
    """The weights in a checkpoint: the first of `ema`, `model`, `state_dict`, or the file itself if it is a
    bare state dict. Returns (state_dict, which)."""
    if isinstance(ckpt, dict):
        for key in WEIGHT_KEYS:
            if key in ckpt:
                if not _is_state_dict(ckpt[key]):
                    raise ValueError(f"{path}: entry {key!r} is not a state dict of tensors")
                return ckpt[key], key
        if _is_state_dict(ckpt):
            return ckpt, "<file>"
        raise ValueError(f"{path}: no weights found; expected one of the keys {list(WEIGHT_KEYS)}, "
                         f"found {sorted(map(str, ckpt))[:10]}")
    raise ValueError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")


def check_state_dict(model: torch.nn.Module, state_dict: dict, source) -> None:
    """Raise one error naming every missing key, unexpected key and shape mismatch (strict loading)."""
    want = model.state_dict()
    missing = [k for k in want if k not in state_dict]
    unexpected = [k for k in state_dict if k not in want]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in want.items() if k in state_dict and state_dict[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes)}")
    if problems:
        raise RuntimeError(f"{source} does not match the tokenizer architecture:\n  " + "\n  ".join(problems))


def load_tokenizer(path: str | os.PathLike, config: MGVQConfig | None = None, map_location="cpu") -> MGVQ:
    """An MGVQ tokenizer from `path`, in eval mode with gradients off.

    The file is the official layout (`{"state_dict": sd}`, `{"model": sd}`, `{"ema": sd}`; EMA wins over model
    over state_dict) or this project's `{"model": sd, "config": MGVQConfig.to_dict()}`. `config` None reads the
    stored config; a config given for a file that stores one must equal it. Keys and shapes must match exactly.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer checkpoint {path} does not exist (nothing is downloaded: pass a local file)")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    state_dict, which = pick_state_dict(ckpt, path)
    stored = ckpt.get("config") if isinstance(ckpt, dict) else None
    if stored is not None:
        stored = MGVQConfig.from_dict(stored)
    if config is None:
        if stored is None:
            raise ValueError(f"{path} stores no config: pass one, e.g. MGVQConfig.preset('mgvq-f16c32', groups=4)")
        config = stored
    elif stored is not None:
        # Keys and shapes would not catch e.g. a different activation: refuse any difference.
        refuse_mismatch(stored.to_dict(), config.to_dict(), f"tokenizer file {path}",
                        "its stored config differs from the one given (leave the config out to use the stored one)")
    with torch.device("meta"):
        model = MGVQ(config)
    check_state_dict(model, state_dict, f"{path} ({which!r} weights)")
    # Floating tensors become float32 (a checkpoint may be saved in half precision); counters keep their dtype.
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def save_tokenizer(model: MGVQ, path: str | os.PathLike) -> None:
    """Write this project's tokenizer file `{"model": state_dict, "config": dict}` atomically."""
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "config": model.config.to_dict()}, tmp)


def read_codebook(path: str | os.PathLike) -> torch.Tensor:
    """The raw codebook table (codebook_size, latent/G) of a tokenizer file, in float32, reading only that tensor
    (memory-mapped where the file allows): what a GPT with codebook input embeds."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer checkpoint {path} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # an old (non-zip) torch file cannot be memory-mapped
        blob = torch.load(path, map_location="cpu", weights_only=True)
    weights, _ = pick_state_dict(blob, path)
    if CODEBOOK_KEY not in weights:
        raise KeyError(f"tokenizer checkpoint {path} has no {CODEBOOK_KEY!r}")
    return weights[CODEBOOK_KEY].float().clone()
