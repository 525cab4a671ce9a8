"""Read the released LlamaGen VQ and SEED-Voken IBQ tokenizer files into tokenizer.families.vqgan.model.VQGAN's key names.

- LlamaGen (`vq_ds16_c2i.pt`): `{"model": sd, "ema": sd (when trained with --ema), "args": argparse.Namespace, ...}`.
  The pickled `args` is accepted by allowing exactly `argparse.Namespace` in the weights-only unpickler. Its
  sampler decodes with `model`, so `weights="auto"` means raw. Names: `encoder.conv_blocks.{level}.res.{i}`,
  `mid.{0,1,2}`, and a decoder whose `conv_blocks` run from the coarsest level.
- IBQ (`imagenet256_*.ckpt`, Lightning): `{"state_dict": sd, ...}` with raw weights, `loss.*` (the
  discriminator) and `model_ema.*`, EMA copies named without dots (`model_ema.encoderconv_inweight`). The
  AR stage builds its tokenizer from the EMA weights, so `weights="auto"` means EMA where present. An IBQ-AR
  checkpoint holds the tokenizer it decodes with under `first_stage_model.*` (already EMA): read as `which`
  `first_stage_model`.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from tokenizer.common.errors import BadFileError

TOKENIZER_PREFIXES = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")
# Training statistics in the official files that no forward reads.
LLAMAGEN_UNUSED = ("quantize.codebook_used",)
IBQ_EMA_UNUSED = ("model_ema.decay", "model_ema.num_updates")


def llamagen_to_vqgan(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LlamaGen VQModel names -> VQGAN names (the decoder's conv_blocks index counts from the coarsest level)."""
    dec_levels = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"decoder\.conv_blocks\.(\d+)\.", k))),
                         default=-1)
    mid = {"0": "block_1", "1": "attn_1", "2": "block_2"}
    out = {}
    for key, value in sd.items():
        if key in LLAMAGEN_UNUSED:
            continue
        new = re.sub(r"^(encoder|decoder)\.mid\.(\d)\.", lambda m: f"{m.group(1)}.mid.{mid[m.group(2)]}.", key)
        new = re.sub(r"^encoder\.conv_blocks\.(\d+)\.res\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"^encoder\.conv_blocks\.", "encoder.down.", new)
        m = re.match(r"^decoder\.conv_blocks\.(\d+)\.(res\.)?", new)
        if m:
            level = dec_levels - 1 - int(m.group(1))
            new = f"decoder.up.{level}.{'block.' if m.group(2) else ''}" + new[m.end():]
        out[new] = value
    return out


def read_llamagen(blob: dict, path: str | Path, weights: str = "auto") -> tuple[dict, str]:
    """(state dict in VQGAN names, which entry) of a LlamaGen VQ file's contents `blob` (read from `path`);
    auto = `model`, what its sampler decodes with."""
    which = "ema" if weights == "ema" else "model"
    if not isinstance(blob.get(which), dict):
        raise BadFileError(f"{path} has no {which!r} weights (weights={weights!r}); its entries: {sorted(map(str, blob))}")
    return llamagen_to_vqgan(blob[which]), which


def _ibq_ema(sd: dict, path) -> dict:
    """EMA weights under the raw names: `model_ema.<name without dots>` for every raw tokenizer key."""
    out, missing = {}, []
    for key in sd:
        if key.startswith(TOKENIZER_PREFIXES):
            ema_key = "model_ema." + key.replace(".", "")
            if ema_key in sd:
                out[key] = sd[ema_key]
            else:
                missing.append(ema_key)
    if missing:
        raise BadFileError(f"{path}: EMA weights missing for {len(missing)} keys: {', '.join(missing)}")
    return out


def read_ibq(blob: dict, path: str | Path, weights: str = "auto") -> tuple[dict, str]:
    """(state dict in VQGAN names, which) of a SEED-Voken IBQ Lightning checkpoint's contents `blob` (read from
    `path`); auto = EMA where present."""
    sd = blob.get("state_dict")
    if not isinstance(sd, dict):
        raise BadFileError(f"{path} is not a Lightning checkpoint with a 'state_dict'; its entries: {sorted(map(str, blob))}")
    if not any(k.startswith(TOKENIZER_PREFIXES) for k in sd) and any(k.startswith("first_stage_model.") for k in sd):
        if weights == "raw":
            raise BadFileError(f"{path} is an IBQ-AR checkpoint: its tokenizer (first_stage_model.*) holds EMA weights only")
        n = len("first_stage_model.")
        return {k[n:]: v for k, v in sd.items() if k.startswith("first_stage_model.")}, "first_stage_model"
    has_ema = any(k.startswith("model_ema.") for k in sd)
    if weights == "ema" and not has_ema:
        raise BadFileError(f"{path} has no model_ema.* weights: pass weights=raw")
    if weights == "raw" or (weights == "auto" and not has_ema):
        return {k: v for k, v in sd.items() if not k.startswith(("loss.", "model_ema."))}, "raw"
    ema = _ibq_ema(sd, path)
    # Unused EMA entries: the counters and the discriminator's (model_ema.loss*); any other one names a mismatch.
    used = {"model_ema." + key.replace(".", "") for key in ema}
    extra = [k for k in sd if k.startswith("model_ema.") and k not in used and k not in IBQ_EMA_UNUSED
             and not k.startswith("model_ema.loss")]
    return {**ema, **{k: sd[k] for k in extra}}, "ema"
