"""MergeVQ's official Lightning checkpoint (`taming.models.lfqgan_rep.MergeVQModel`), read strictly.

Its `state_dict` holds the raw weights under `encoder.` / `decoder.`, the loss (discriminator, LPIPS) under `loss.`,
the frozen DINOv2 teacher under `dist_model.`, and with use_ema their EMA as `model_ema.<name without dots>` (the
loss's trainable weights too) plus `model_ema.decay` / `model_ema.num_updates`. Every other entry is refused.
"""
from __future__ import annotations

import os

from tokenizer.base import check_weights_choice
from tokenizer.families.magvit2 import ema_by_raw_names

SKIPPED = ("loss.", "dist_model.")  # training-only modules
MODEL = ("encoder.", "decoder.")
EMA = "model_ema."
EMA_COUNTERS = ("decay", "num_updates")


def _state_dict(blob: dict, path) -> dict:
    sd = blob.get("state_dict")
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: not a Lightning checkpoint (no 'state_dict' entry)")
    unknown = sorted(k for k in sd if not k.startswith(MODEL + SKIPPED + (EMA,)))
    if unknown:
        raise ValueError(f"{path}: unexpected entries {unknown[:10]} (a MergeVQ checkpoint holds encoder., decoder., "
                         f"loss., dist_model. and model_ema. entries; a learned source recovery is not supported)")
    return sd


def read_official(blob: dict, path: str | os.PathLike, weights: str = "auto") -> tuple[dict, str]:
    """The tokenizer's weights of an official checkpoint `blob` (read from `path`) in MergeVQ's key names, and which set: "raw", "ema", or "auto" = raw, what MergeVQ's
    stage 2 encodes and decodes with (its configs load the tokenizer with use_ema: False). Keys are checked
    strictly by the caller; EMA names that match no raw weight, and raw weights without EMA, fail here."""
    check_weights_choice(weights)
    sd = _state_dict(blob, path)
    raw = {k: v for k, v in sd.items() if k.startswith(MODEL)}
    if not raw:
        raise ValueError(f"{path}: no encoder./decoder. weights in its state_dict")
    if weights in ("auto", "raw"):
        return raw, "raw"
    ema = {k[len(EMA):]: v for k, v in sd.items()
           if k.startswith(EMA) and not k[len(EMA):].startswith(("loss", *EMA_COUNTERS))}
    if not ema:
        raise ValueError(f"{path}: weights='ema' but the file has no model_ema.encoder*/decoder* entries "
                         f"(it was trained with use_ema: False)")
    return ema_by_raw_names(raw, ema, path), "ema"
