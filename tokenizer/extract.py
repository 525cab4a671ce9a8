"""Encode an ImageFolder into a code store with a frozen tokenizer (any family), on one or many processes.

Each process encodes a disjoint contiguous slice of the images not yet done and writes straight into the
shared memory-mapped files (no gather, no per-image files). Rerunning the same command resumes; a rerun
with other settings into the same out_dir is refused with the list of what differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from tokenizer.base import group_sizes
from tokenizer.common.io import sha256_file
from tokenizer.common.precision import autocast_dtype, check_precision
from tokenizer.data import ImageViews, files_fingerprint, list_images, num_views
from tokenizer.loading import TokenizerRef
from tokenizer.merged import unmerge
from tokenizer.store import FORMAT_VERSION, CodeStore, StoreWriter, dtype_for


@dataclass
class ExtractDataConfig:
    root: str  # an ImageFolder: one sub-directory per class
    image_size: int = 256
    views: str = "flip"  # plain | flip | tencrop | tencrop_flip (see tokenizer/data.py)
    crop_range: float = 1.1  # ten-crop: crops are cut from the center crop at int(image_size * crop_range)
    skip_bad: bool = False  # True: an unreadable image gets label -1 and zero codes and is listed in meta.json


@dataclass
class ExtractConfig:
    data: ExtractDataConfig
    tokenizer: TokenizerRef
    out_dir: str
    batch_size: int = 32  # images per step and process; the encoder sees batch_size * num_views crops
    num_workers: int = 4
    precision: str = "fp32"  # fp32 | bf16 | fp16: encoder autocast on CUDA (codes can change where two are close); CPU runs fp32
    merged: bool = False  # also keep the merged form (mergevq: K codes in merge order + token map per view)


class BadImageError(RuntimeError):
    """An image could not be read and data.skip_bad is false."""


def build_spec(cfg: ExtractConfig, tok, files: list[str], labels: list[int], classes: list[str],
               precision: str) -> dict:
    """Everything that determines the store's bytes; a resumed or repeated run must match it exactly."""
    size = cfg.data.image_size
    views = num_views(cfg.data.views)
    if size % tok.downsample:
        raise ValueError(f"data.image_size={size} is not a multiple of the tokenizer's downsampling {tok.downsample}")
    sizes = group_sizes(tok)  # (MGVQConfig refuses a codebook that does not split into its groups)
    if max(sizes) > 2**32:
        raise ValueError(f"tokenizer groups of {sizes} codes: at most 2**32 per group fit the store's uint32")
    tencrop = cfg.data.views.startswith("tencrop")
    grid = [size // tok.downsample, size // tok.downsample]
    merged = {}
    if cfg.merged:
        if not hasattr(tok, "merged_tokens"):
            raise ValueError(f"merged=true: tokenizer family {cfg.tokenizer.family!r} has no merged form (mergevq has)")
        merged = {"merged_tokens": tok.merged_tokens(grid)}
    return {
        "format_version": FORMAT_VERSION,
        "dtype": dtype_for(max(sizes)),  # uint32 where a group has more than 65536 codes (IBQ-262144)
        "family": cfg.tokenizer.family,
        "tokenizer": tok.to_dict(),
        "tokenizer_sha256": sha256_file(cfg.tokenizer.checkpoint),
        "tokenizer_weights": cfg.tokenizer.weights,
        "image_size": size,
        "views": cfg.data.views,
        "num_views": views,
        "crop_range": cfg.data.crop_range if tencrop else None,
        "precision": precision,
        "groups": tok.codebook_groups,
        "codes_per_group": sizes[0] if len(set(sizes)) == 1 else sizes,  # one per group where they differ
        "grid": grid,
        "num_images": len(files),
        "num_classes": len(classes),
        "class_names": classes,
        "files_fingerprint": files_fingerprint(cfg.data.root, files, labels),
        **merged,  # absent unless asked for, so stores made before the merged form existed still resume
    }


def encode_views(model, x: torch.Tensor, spec: dict, dtype) -> tuple[np.ndarray, tuple | None]:
    """Views (B, A, 3, S, S) -> grid codes (B, A, h, w, G) in the store's dtype, and where the store keeps the merged
    form (`merged_tokens`), (merged codes (B, A, K, G), token map (B, A, h, w) uint16)."""
    B, A = x.shape[:2]
    (h, w), G = spec["grid"], spec["groups"]
    merged = None
    with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        if spec.get("merged_tokens"):
            merged = model.encode_merged(x.flatten(0, 1))  # (B * A, K, G), (B * A, h, w)
            codes = unmerge(*merged)
        else:
            codes = model.encode_codes(x.flatten(0, 1))  # (B * A, h, w, G)
    if codes.shape != (B * A, h, w, G):
        raise RuntimeError(f"encode_codes returned {tuple(codes.shape)}, expected {(B * A, h, w, G)}")
    codes = codes.view(B, A, h, w, G).cpu().numpy().astype(spec["dtype"])
    if merged is not None:
        merged = (merged[0].view(B, A, -1, G).cpu().numpy().astype(spec["dtype"]),
                  merged[1].view(B, A, h, w).cpu().numpy().astype(np.uint16))
    return codes, merged


def extract(cfg: ExtractConfig) -> dict:
    """Fill (or finish) the code store `cfg.out_dir`; returns its meta."""
    accelerator = Accelerator()
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    precision = check_precision(cfg.precision) if device.type == "cuda" else "fp32"
    checkpoint = cfg.tokenizer.require_checkpoint("the weights file the codes are made with")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"tokenizer.checkpoint={checkpoint} is not a file")
    # The architecture the ref names, else the file's own (loaded now); a mismatch is refused before loading.
    model = None if cfg.tokenizer.config is not None else cfg.tokenizer.load()
    arch = cfg.tokenizer.config if model is None else model.config

    files, labels, classes = list_images(cfg.data.root)
    spec = build_spec(cfg, arch, files, labels, classes, precision)
    writer = StoreWriter(cfg.out_dir, spec)
    state = writer.check()  # every rank checks, so a refusal stops all of them alike
    if state == "complete":
        if accelerator.is_main_process:
            print(f"{cfg.out_dir}: code store already complete ({len(files)} images)")
            writer.remove_progress_files()  # left behind by a kill right after meta.json was written
        return CodeStore(cfg.out_dir).meta
    if state == "new" and accelerator.is_main_process:
        writer.create(np.asarray(labels, dtype=np.int64))
    accelerator.wait_for_everyone()

    todo = writer.open()
    mine = np.array_split(todo, world)[rank]  # contiguous, disjoint, the same split on every rank
    print(f"[rank {rank}/{world}] {len(mine)} of {len(todo)} images left to encode", flush=True)
    dataset = ImageViews(cfg.data.root, cfg.data.image_size, cfg.data.views, cfg.data.crop_range, files, labels)
    loader = DataLoader(Subset(dataset, mine.tolist()), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda")
    model = (model or cfg.tokenizer.load()).to(device)
    dtype = autocast_dtype(precision)
    h, w = spec["grid"]

    # One bar on the main process for all ranks: it counts world_size images per image of its own slice.
    bar = tqdm(total=len(files), initial=len(files) - len(todo), unit="img", dynamic_ncols=True,
               desc=f"extract x{world}" if world > 1 else "extract", disable=not accelerator.is_main_process)
    for index, x, _, errors in loader:
        B, A = x.shape[:2]
        codes, merged = encode_views(model, x.to(device, non_blocking=True), spec, dtype)
        index, bad = index.numpy(), np.array([bool(e) for e in errors])
        if bad.any() and not cfg.data.skip_bad:
            writer.write(index[~bad], codes[~bad], bad[~bad],  # keep the readable images of this batch
                         None if merged is None else (merged[0][~bad], merged[1][~bad]))
            message = next(e for e in errors if e)
            raise BadImageError(f"unreadable image {message}\nEverything extracted so far is kept: fix or remove "
                                f"the file, or rerun with data.skip_bad=true to give it label -1")
        writer.write(index, codes, bad, merged)
        bar.update(min(B * world, bar.total - bar.n))
    bar.close()
    writer.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = writer.finalize(files)
        print(f"{cfg.out_dir}: {len(files)} images x {spec['num_views']} views -> codes "
              f"{tuple([len(files), spec['num_views'], h, w, spec['groups']])}"
              + (f", {len(meta['bad_files'])} unreadable images skipped" if meta["bad_files"] else ""))
    accelerator.wait_for_everyone()
    return CodeStore(cfg.out_dir).meta
