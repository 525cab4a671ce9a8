"""GPT model files: this project's `{"model": state_dict, "config": GPTConfig dict}` and the official MGVQ,
Open-MAGVIT2 AR, LlamaGen c2i and IBQ-AR layouts, all translated here and nowhere else.

LlamaGen's trunk has this model's names (G = 1, learned input); its head is `output`. IBQ-AR's Lightning file
keeps the GPT under `transformer.` (`tok_emb`, `class_emb`, `blocks`, adaLN `ada_lin` per block, `head_nm` the
modulated final norm, `head`) and its tokenizer under `first_stage_model.`. The MGVQ AR head keeps q/k/v as
three matrices (fused into `wqkv` here), names the output projection `proj` (`wo` here) and the start token `sos_emb_for_image` (`sos`),
carries an unused `adaLN_modulation` per block and a `pos_emb` of block_size rows of which only G+1 are used.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from gpt.config import TRAINING_ONLY, GPTConfig
from gpt.model import GPT
from tokenizer.common.errors import BadFileError, ConfigError
from tokenizer.common.io import load_weights_file
from tokenizer.common.settings import differences

OFFICIAL_WEIGHT_KEYS = ("model", "ema", "state_dict", "module")  # where official / LlamaGen files keep weights
_QKV = ("query", "key", "value")


def from_official_mgvq_state_dict(sd: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Official MGVQ GPT state dict -> this model's (head="ar", input_embedding="codebook"; no codebook)."""
    groups = config.codebook_groups
    out, qkv = {}, {}
    for key, value in sd.items():
        if not key.startswith("ar_head."):
            out[key] = value  # the trunk keeps LlamaGen's names
            continue
        name = key[len("ar_head."):]
        block = re.fullmatch(r"causal_space_blocks\.(\d+)\.(.+)", name)
        if block:
            i, rest = block.groups()
            if rest.startswith("adaLN_modulation."):
                continue  # never used by the official forward
            part = re.fullmatch(r"attention\.(query|key|value)\.weight", rest)
            if part:
                qkv.setdefault(i, {})[part.group(1)] = value
                continue
            out[f"head.layers.{i}.{rest.replace('attention.proj.', 'attention.wo.')}"] = value
        elif name == "sos_emb_for_image":
            out["head.sos"] = value
        elif name == "pos_emb":
            if value.ndim != 3 or value.shape[1] < groups + 1:
                raise BadFileError(f"ar_head.pos_emb of shape {tuple(value.shape)} has fewer than G+1={groups + 1} rows")
            out["head.pos_emb"] = value[:, :groups + 1].clone()  # rows beyond G+1 are never read
        else:
            out[f"head.{name}"] = value
    for i, parts in sorted(qkv.items()):
        missing = [f"ar_head.causal_space_blocks.{i}.attention.{p}.weight" for p in _QKV if p not in parts]
        if missing:
            raise BadFileError(f"official GPT state dict lacks {missing}")
        out[f"head.layers.{i}.attention.wqkv.weight"] = torch.cat([parts[p] for p in _QKV])
    return out


def from_open_magvit2_state_dict(sd: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """An Open-MAGVIT2 AR Lightning state dict (`transformer.*`; the tokenizer's `first_stage_model.*` is left
    out) -> this model's (head="factorized"). Its pre_emb / post_emb are the two groups' rows of tok_embeddings,
    spatial_blocks the trunk, factorized_blocks / norm / head.g the factorized head."""
    sd = {k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")}
    tables = ["pre_emb.weight", "post_emb.weight"]  # sub-tokens 0 and 1
    missing = [k for k in tables if k not in sd]
    if missing or config.codebook_groups != 2:
        raise BadFileError(f"Open-MAGVIT2 state dict: expected two sub-token tables, missing {missing} "
                         f"(codebook_groups={config.codebook_groups})")
    out = {"tok_embeddings.weight": torch.cat([sd.pop(k) for k in tables])}
    for key, value in sd.items():
        for old, new in (("spatial_blocks.", "layers."), ("factorized_blocks.", "head.layers."),
                         ("class_emb.", "cls_embedding."), ("norm.", "head.norm."), ("head.", "head.heads.")):
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            out[key] = value  # an unknown key: strict loading names it
    return out


def to_official_mgvq_state_dict(sd: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """This model's state dict -> the official MGVQ layout (zero adaLN weights, pos_emb zero-padded to L rows).

    The padding is what official training leaves there: pos_emb starts at zero and unused rows get no gradient.
    """
    if config.head != "ar" or config.input_embedding != "codebook":
        raise ConfigError(f"the official MGVQ layout has an ar head and codebook input, not head={config.head!r} "
                         f"with input_embedding={config.input_embedding!r}")
    dim, out = config.dim, {}
    for key, value in sd.items():
        if key == "codebook":
            continue  # the official GPT takes the codebook from the tokenizer at run time
        if not key.startswith("head."):
            out[key] = value
            continue
        name = key[len("head."):]
        block = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if block:
            i, rest = block.groups()
            prefix = f"ar_head.causal_space_blocks.{i}."
            if rest == "attention.wqkv.weight":
                for part, w in zip(_QKV, value.chunk(3)):
                    out[f"{prefix}attention.{part}.weight"] = w
                out[f"{prefix}adaLN_modulation.1.weight"] = value.new_zeros(6 * dim, 3 * dim)
            else:
                out[prefix + rest.replace("attention.wo.", "attention.proj.")] = value
        elif name == "sos":
            out["ar_head.sos_emb_for_image"] = value
        elif name == "pos_emb":
            padded = value.new_zeros(1, config.seq_len, dim)
            padded[:, :value.shape[1]] = value
            out["ar_head.pos_emb"] = padded
        else:
            out[f"ar_head.{name}"] = value
    return out


def from_llamagen_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LlamaGen c2i GPT -> this model (G = 1, parallel head, learned input): only the head is renamed."""
    return {("head.proj.weight" if k == "output.weight" else k): v for k, v in sd.items()}


def from_ibq_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """IBQ-AR Lightning state dict (`transformer.*`, plus the tokenizer under `first_stage_model.*`) -> this model
    with class_adaln. Keys outside both prefixes are kept, so that loading names them."""
    renames = [(r"^tok_emb\.", "tok_embeddings."), (r"^class_emb\.", "cls_embedding."), (r"^blocks\.", "layers."),
               (r"^head_nm\.rmsnorm\.", "norm."), (r"^head_nm\.ada_lin\.", "norm_ada_lin."), (r"^head\.", "head.proj.")]
    out = {}
    for key, value in sd.items():
        if key.startswith("first_stage_model."):
            continue  # the tokenizer: load it with load_tokenizer(path, family="ibq")
        if key.startswith("transformer."):
            key = key[len("transformer."):]
            for pattern, repl in renames:
                key, n = re.subn(pattern, repl, key)
                if n:
                    break
        out[key] = value
    return out


def _read(path: Path) -> dict:
    blob = load_weights_file(path, "GPT model file")  # weights only (LlamaGen's pickled argparse args accepted)
    if not isinstance(blob, dict):
        raise BadFileError(f"{path} holds a {type(blob).__name__}, not a dict of weights")
    return blob


def _official_weights(blob: dict, path: Path, config: GPTConfig | None) -> dict:
    """The weights of an official MGVQ, Open-MAGVIT2, LlamaGen or IBQ-AR file, translated to this model's names."""
    key = next((k for k in OFFICIAL_WEIGHT_KEYS if isinstance(blob.get(k), dict)), None)
    sd = blob[key] if key else blob  # FSDP-style files are the bare state dict
    if "transformer.pre_emb.weight" in sd:
        layout = "Open-MAGVIT2"
    elif any(k.startswith("transformer.") for k in sd):
        layout = "IBQ-AR"
    elif "norm.weight" in sd:
        layout = "LlamaGen" if "output.weight" in sd else "MGVQ"
    else:
        raise BadFileError(f"{path} is neither this project's GPT file ({{'model', 'config'}}) nor an official GPT "
                         f"checkpoint (weights under one of {OFFICIAL_WEIGHT_KEYS}); top-level keys: {list(blob)[:8]}")
    if config is None:
        raise ConfigError(f"{path} is in the official {layout} layout, which stores no config: pass one, e.g. "
                         f"GPTConfig.single_codebook('gpt_b' or 'ibq_ar_b', codes_per_group=16384) for LlamaGen/IBQ-AR, "
                         f"GPTConfig.from_open_magvit2({{...}}) (its yaml's transformer_config.params) for Open-MAGVIT2, "
                         f"GPTConfig.from_official_mgvq({{...}}) for MGVQ")
    translate = {"Open-MAGVIT2": from_open_magvit2_state_dict, "IBQ-AR": lambda sd, c: from_ibq_state_dict(sd),
                 "LlamaGen": lambda sd, c: from_llamagen_state_dict(sd), "MGVQ": from_official_mgvq_state_dict}
    return translate[layout](sd, config)


def read_official_weights(path: str | Path, config: GPTConfig) -> dict[str, torch.Tensor]:
    """The weights of an official GPT file in this model's names, not loaded (memory-mapped where the file allows):
    what load_gpt would load, for a caller that checks keys and shapes first."""
    return _official_weights(_read(Path(path)), Path(path), config)


def _model_fields(config: GPTConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in TRAINING_ONLY}


def load_gpt(path: str | Path, config: GPTConfig | None = None, codebook: torch.Tensor | None = None) -> GPT:
    """A float32 GPT in eval mode from this project's model file or an official MGVQ GPT checkpoint.

    This project's files carry their config; a given `config` must then agree with it except in training-only
    fields (dropouts, init). Official files carry none: `config` is required (`GPTConfig.from_official_mgvq(...)`).
    The codebook comes from the file when it holds one (a given one must be equal), else from `codebook`.
    Loading is strict: missing, unexpected or misshapen weights raise an error naming them.
    """
    path = Path(path)
    blob = _read(path)
    if isinstance(blob.get("config"), dict) and isinstance(blob.get("model"), dict):
        stored = GPTConfig.from_dict(blob["config"])
        if config is not None:
            differ = differences(_model_fields(stored), _model_fields(config))
            if differ:
                raise ConfigError(f"{path} was saved with a different GPT config (training-only fields aside): "
                                  + "; ".join(differ))
        config = config or stored
        sd = dict(blob["model"])
    else:
        sd = _official_weights(blob, path, config)
    if config.input_embedding == "codebook":
        if "codebook" in sd:
            if codebook is not None and not torch.equal(codebook.float().cpu(), sd["codebook"].float()):
                raise ConfigError(f"{path} stores a different tokenizer codebook than the one passed")
        elif codebook is None:
            raise ConfigError(f"{path} carries no tokenizer codebook: pass codebook= (the raw "
                             f"quantize.embedding.weight of the tokenizer the model was trained on)")
        else:
            sd["codebook"] = codebook.detach().cpu()
    with torch.device("meta"):
        model = GPT(config)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise BadFileError(f"{path}: the weights do not fit the GPT config {config}: {e}") from None
    model.float().init_buffers()
    return model.eval()
