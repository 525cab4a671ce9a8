"""Load and save tokenizers of every family (tokenizer.registry), strictly, without downloads: `load_tokenizer`
(the one loader), `TokenizerRef` (which file, family and architecture: the hydra `tokenizer` group),
`save_tokenizer` and `read_codebook`. Each file is read once per load; a family's reader takes its contents."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenizer.base import check_weights_choice
from tokenizer.common.errors import BadFileError, ConfigError, LayoutError
from tokenizer.common.io import atomic_path, load_weights_file
from tokenizer.common.settings import refuse_mismatch
from tokenizer.families.magvit2 import Magvit2Config
from tokenizer.families.mergevq import MergeVQConfig
from tokenizer.families.mgvq.config import MGVQConfig
from tokenizer.families.mgvq.official import is_state_dict
from tokenizer.families.vqgan.model import PRESETS as VQGAN_PRESETS
from tokenizer.families.vqgan.model import VQGANConfig
from tokenizer.registry import family_of, get_family

CODEBOOK_KEY = "quantize.embedding.weight"  # the raw code rows the GPT embeds (official and this project's layout)


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


def read_file(path: str | os.PathLike) -> dict:
    """A tokenizer file's contents (weights only, memory-mapped where the format allows), which must be a dict:
    the one read of the file per load."""
    blob = load_weights_file(path, "tokenizer checkpoint")
    if not isinstance(blob, dict):
        raise BadFileError(f"{path} holds a {type(blob).__name__}, not a dict checkpoint")
    return blob


def is_project_file(blob: dict) -> bool:
    """Whether file contents are this project's `{"model", "config", "family"}` (else an official layout)."""
    return isinstance(blob.get("config"), dict) and is_state_dict(blob.get("model"))


def read_weights(blob: dict, path: Path, family: str, weights: str) -> tuple[Any, dict, str]:
    """(stored config or None, state dict in the family's key names, which entry) of a tokenizer file's contents
    `blob` (read_file): this project's `{"model", "config", "family"}` or the family's official layout (read by
    the family)."""
    check_weights_choice(weights)
    fam = get_family(family)
    if is_project_file(blob):
        stored_family = blob.get("family", "mgvq")  # files written before families existed are MGVQ
        if stored_family != family:
            raise ConfigError(f"{path} holds a {stored_family!r} tokenizer, not family={family!r}")
        return fam.config_cls.from_dict(blob["config"]), blob["model"], "model"
    return None, *fam.read_official(blob, path, weights)


def load_tokenizer(path: str | os.PathLike, config: Any = None, family: str = "mgvq", weights: str = "auto",
                   map_location="cpu") -> torch.nn.Module:
    """A tokenizer of `family` from `path`, in eval mode with gradients off.

    The file is this project's `{"model": sd, "config": dict, "family": name}` or the family's official layout,
    whose weights the family reads (`weights`: auto = what the family's official AR sampler decodes with, ema or
    raw; MGVQ: EMA wins over model over state_dict). `config`: the family's dataclass or a dict of its fields;
    None reads the stored config (official files store none); a config given for a file that stores one must
    equal it. Keys and shapes must match exactly.
    """
    fam, path = get_family(family), Path(path)
    if isinstance(config, dict):
        config = fam.config_cls.from_dict(config)
    if config is not None and fam.check_config is not None:
        fam.check_config(config)
    blob = read_file(path)
    try:
        model, state_dict = _checked_weights(blob, path, fam, config, weights)
    except (LayoutError, ValueError, KeyError) as e:  # an official file of another family says which one it is
        raise _other_family_hint(blob, path, family) or e
    # Floating tensors become float32 (a checkpoint may be saved in half precision); counters keep their dtype.
    state_dict = {k: v.to(map_location).float() if v.is_floating_point() else v.to(map_location)
                  for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _checked_weights(blob: dict, path: Path, fam, config, weights: str) -> tuple[torch.nn.Module, dict]:
    """(the family's model built on the meta device, the file's state dict whose keys and shapes match it
    exactly) for the contents `blob` of tokenizer file `path`, its config given or stored."""
    stored_config, state_dict, which = read_weights(blob, path, fam.name, weights)
    if config is None:
        if stored_config is None:
            raise ConfigError(f"{path}: an official {fam.name} checkpoint stores no config: pass one, e.g. "
                              f"{fam.config_cls.__name__}.preset(...)")
        config = stored_config
    elif stored_config is not None:
        # Keys and shapes would not catch e.g. a different activation: refuse any difference, but in the settings of
        # how the weights run (MergeVQ's merge_num: the given one is used).
        runtime = getattr(fam.config_cls, "RUNTIME_FIELDS", ())
        have, want = ({k: v for k, v in c.to_dict().items() if k not in runtime} for c in (stored_config, config))
        refuse_mismatch(have, want, f"tokenizer file {path}",
                        "its stored config differs from the one given (leave the config out to use the stored one)")
    with torch.device("meta"):
        model = fam.model_cls(config)
    check_state_dict(model, state_dict, f"{path} ({which!r} weights)")
    return model, state_dict


def _key_layout(keys) -> set[str]:
    """Weight names with their block indices masked (`encoder.down.#.block.#.conv1.weight`): what a family's
    layout fixes, whatever the depth of a preset."""
    return {re.sub(r"\.\d+(?=\.)", ".#", k) for k in keys}


def _preset_fit(blob: dict, path, ref: TokenizerRef) -> str | None:
    """How the official file contents `blob` fit preset `ref`: "exact" (keys and shapes), "layout" (the same
    keys up to block counts) or None (its family's reader refuses them, or other keys)."""
    fam = get_family(ref.family)
    try:
        state_dict, _ = fam.read_official(blob, path, "auto")
    except (ValueError, KeyError, RuntimeError):
        return None
    with torch.device("meta"):
        want = fam.model_cls(ref.config).state_dict()
    if state_dict.keys() == want.keys() and all(state_dict[k].shape == v.shape for k, v in want.items()):
        return "exact"
    return "layout" if _key_layout(state_dict) == _key_layout(want) else None


def fitting_families(blob: dict, path, but: str) -> list[str]:
    """The families other than `but` whose official reader takes the file contents `blob` and one of whose presets
    has exactly its key layout: the families the file belongs to (empty when none)."""
    fits = []
    for ref in named_refs().values():
        if ref.family != but and ref.family not in fits and _preset_fit(blob, path, ref):
            fits.append(ref.family)
    return fits


def _other_family_hint(blob: dict, path, family: str) -> LayoutError | None:
    """The error for an official file of another family than `family`, naming the family whose layout it has and
    its presets (first the ones whose shapes it fits exactly); None when it fits none or is this project's file,
    which names its family (the first error then stands)."""
    fits = [] if is_project_file(blob) else fitting_families(blob, path, family)
    if not fits:
        return None
    refs = {n: ref for n, ref in sorted(named_refs().items()) if ref.family in fits}
    presets = sorted(refs, key=lambda n: _preset_fit(blob, path, refs[n]) != "exact")  # exact fits first
    return LayoutError(f"{path} is not a {family!r} tokenizer file: its weights have the layout of family "
                       f"{' or '.join(map(repr, fits))}. Pass tokenizer={presets[0]} (family {refs[presets[0]].family}; "
                       f"presets {sorted(presets)}) instead of family={family!r}")


def save_tokenizer(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write this project's tokenizer file `{"model": state_dict, "config": dict, "family": name}` atomically."""
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "config": model.config.to_dict(), "family": family_of(model)}, tmp)


def read_codebook(path: str | os.PathLike, family: str = "mgvq", weights: str = "auto") -> torch.Tensor:
    """The raw codebook table (codebook_size, latent/G) of a tokenizer file, in float32, copying only that tensor
    out of the memory-mapped file: what a GPT with codebook input embeds. Official files give the weights
    `load_tokenizer(path, family=family, weights=weights)` would load."""
    path = Path(path)
    state_dict = read_weights(read_file(path), path, family, weights)[1]
    if CODEBOOK_KEY not in state_dict:
        raise KeyError(f"tokenizer checkpoint {path} has no {CODEBOOK_KEY!r}")
    return state_dict[CODEBOOK_KEY].float().clone()


@dataclass
class TokenizerRef:
    """Which tokenizer to load: a weights file, its family and its architecture (the hydra `tokenizer` group).

    `config` None means the architecture the file stores (this project's tokenizer files carry it); official
    checkpoints store none, so their preset gives it (`tokenizer=mgvq-f16c32-g4`).
    """

    config: Any = None  # the architecture (or its dict): MGVQConfig, VQGANConfig (llamagen_vq, ibq), Magvit2Config
    checkpoint: str | None = None  # the weights file
    family: str = "mgvq"  # a name in tokenizer.registry.FAMILIES
    weights: str = "auto"  # official files: auto (what the family's official AR sampler decodes with) | ema | raw

    def __post_init__(self):
        family = get_family(self.family)  # names the families on a typo
        check_weights_choice(self.weights)
        if isinstance(self.config, dict):
            self.config = family.config_cls.from_dict(self.config)

    def require_checkpoint(self, why: str) -> str:
        if not self.checkpoint:
            raise ConfigError(f"tokenizer.checkpoint is required: {why}")
        return self.checkpoint

    def load(self, map_location="cpu") -> torch.nn.Module:
        """The tokenizer in eval mode with gradients off (see load_tokenizer)."""
        return load_tokenizer(self.require_checkpoint("the weights to load"), self.config, self.family,
                              self.weights, map_location)


def named_refs() -> dict[str, TokenizerRef]:
    """Every family's presets as hydra `tokenizer` group nodes: TokenizerRef(config=arch, family=...)."""
    archs = {**MGVQConfig.named_presets(), **Magvit2Config.named_presets(), **MergeVQConfig.named_presets(),
             **{name: VQGANConfig.preset(name) for name in VQGAN_PRESETS}}
    return {name: TokenizerRef(config=arch, family=family_of(arch)) for name, arch in archs.items()}
