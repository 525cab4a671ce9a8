"""Load and save tokenizer weights of every family (tokenizer.families): official layouts and this project's,
strictly, without downloads."""
import os
from pathlib import Path

import torch

from tokenizer.common.errors import BadFileError, ConfigError, LayoutError
from tokenizer.common.io import atomic_path
from tokenizer.common.settings import refuse_mismatch
from tokenizer.vqgan_weights import load_official

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
                    raise BadFileError(f"{path}: entry {key!r} is not a state dict of tensors")
                return ckpt[key], key
        if _is_state_dict(ckpt):
            return ckpt, "<file>"
        raise BadFileError(f"{path}: no weights found; expected one of the keys {list(WEIGHT_KEYS)}, "
                         f"found {sorted(map(str, ckpt))[:10]}")
    raise BadFileError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")


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
        raise LayoutError(f"{source} does not match the tokenizer architecture:\n  " + "\n  ".join(problems))


def _stored(blob: dict, path, family: str):
    """(config, state dict) of this project's file `{"model", "config", "family"}`, or None for an official file."""
    if not (isinstance(blob.get("config"), dict) and _is_state_dict(blob.get("model"))):
        return None
    from tokenizer.families import get_family  # families imports this module

    stored_family = blob.get("family", "mgvq")  # files written before families existed are MGVQ
    if stored_family != family:
        raise ConfigError(f"{path} holds a {stored_family!r} tokenizer, not family={family!r}")
    return get_family(family).config_cls.from_dict(blob["config"]), blob["model"]


def load_tokenizer(path: str | os.PathLike, config=None, map_location="cpu", family: str = "mgvq",
                   weights: str = "auto") -> torch.nn.Module:
    """A tokenizer of `family` (tokenizer.families) from `path`, in eval mode with gradients off.

    The file is this project's `{"model": sd, "config": dict, "family": name}` or the family's official layout,
    whose weights the family reads (`weights`: auto = what the official AR sampler decodes with, ema or raw;
    MGVQ: EMA wins over model over state_dict). `config` None reads the stored config; a config given for a
    file that stores one must equal it. Keys and shapes must match exactly.
    """
    from tokenizer.families import get_family

    fam = get_family(family)
    if config is not None and fam.check_config is not None:
        fam.check_config(config)
    path = Path(path)
    stored = _stored(load_official(path), path, family)
    if stored is None and config is None and family != "mgvq":  # (MGVQ: a file without weights says so first)
        raise ConfigError(f"{path}: an official {family} checkpoint stores no config: pass one, e.g. "
                         f"{fam.config_cls.__name__}.preset(...)")
    if stored is not None:
        stored_config, state_dict, which = *stored, "model"
    else:
        stored_config, (state_dict, which) = None, fam.read_weights(path, weights)
    if config is None:
        if stored_config is None:
            raise ConfigError(f"{path} stores no config: pass one, e.g. {fam.config_cls.__name__}.preset(...)")
        config = stored_config
    elif stored_config is not None:
        # Keys and shapes would not catch e.g. a different activation: refuse any difference.
        refuse_mismatch(stored_config.to_dict(), config.to_dict(), f"tokenizer file {path}",
                        "its stored config differs from the one given (leave the config out to use the stored one)")
    with torch.device("meta"):
        model = fam.model_cls(config)
    check_state_dict(model, state_dict, f"{path} ({which!r} weights)")
    # Floating tensors become float32 (a checkpoint may be saved in half precision); counters keep their dtype.
    state_dict = {k: v.to(map_location).float() if v.is_floating_point() else v.to(map_location)
                  for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def save_tokenizer(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write this project's tokenizer file `{"model": state_dict, "config": dict, "family": name}` atomically."""
    from tokenizer.families import family_of

    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "config": model.config.to_dict(), "family": family_of(model)}, tmp)


def read_codebook(path: str | os.PathLike, family: str = "mgvq", weights: str = "auto") -> torch.Tensor:
    """The raw codebook table (codebook_size, latent/G) of a tokenizer file, in float32, reading only that tensor
    (memory-mapped where the file allows): what a GPT with codebook input embeds. Official files give the
    weights `load_tokenizer(path, family=family, weights=weights)` would load."""
    from tokenizer.families import get_family

    path = Path(path)
    stored = _stored(load_official(path), path, family)
    weights = stored[1] if stored is not None else get_family(family).read_weights(path, weights)[0]
    if CODEBOOK_KEY not in weights:
        raise KeyError(f"tokenizer checkpoint {path} has no {CODEBOOK_KEY!r}")
    return weights[CODEBOOK_KEY].float().clone()
