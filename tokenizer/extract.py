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
from tokenizer.common import validate as v
from tokenizer.common.errors import ConfigError, MissingFileError, UserError
from tokenizer.common.io import sha256_file
from tokenizer.common.lock import out_dir_lock
from tokenizer.common.memory import keep_freed_cpu_memory
from tokenizer.common.precision import PRECISIONS, autocast_dtype, check_precision
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
    # fp32 | bf16 | fp16 (fp16: CUDA only): the encoder under autocast, the code search in float32. Codes can
    # change where two codes are nearly equally close; the store records the precision, so reruns must match it.
    precision: str = "fp32"
    merged: bool = False  # also keep the merged form (mergevq: K codes in merge order + token map per view)

    def check(self) -> None:
        """Every setting of the right type and in range, before anything is loaded or written."""
        v.non_empty(self.data.root, "data.root")
        v.integer(self.data.image_size, "data.image_size", low=1)
        num_views(self.data.views)
        v.number(self.data.crop_range, "data.crop_range", low=1)
        v.non_empty(self.out_dir, "out_dir")
        v.integer(self.batch_size, "batch_size", low=1)
        v.integer(self.num_workers, "num_workers", low=0)
        check_precision(self.precision)


# Families whose encoders run faster channels_last on a CPU under bf16: oneDNN's NHWC convolutions run LlamaGen's
# VQ-16 encoder 1.18x faster there (README, benchmarks). In float32 the encoder keeps the default layout: NHWC sums in
# another order, which flipped 1 of 16,384 VQ-16 codes against LlamaGen's own extraction, and fp32 codes are
# promised identical to the official loop's. The other families are not measured and keep the default layout.
CPU_CHANNELS_LAST = ("llamagen_vq", "ibq")


def encoder_layout(device: torch.device, family: str, dtype: torch.dtype | None) -> torch.memory_format:
    """The memory format the encoder runs in: channels_last only for a bf16 (`dtype`) CPU run of CPU_CHANNELS_LAST."""
    fast = device.type == "cpu" and dtype is not None and family in CPU_CHANNELS_LAST
    return torch.channels_last if fast else torch.contiguous_format


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); only a warning depends on it. torch asks its
    private checks; a torch without them counts as no."""
    return any(getattr(torch.cpu, check, lambda: False)() for check in ("_is_avx512_bf16_supported",
                                                                       "_is_amx_tile_supported"))

class BadImageError(UserError, RuntimeError):
    """An image could not be read and data.skip_bad is false."""


def build_spec(cfg: ExtractConfig, tok, files: list[str], labels: list[int], classes: list[str],
               precision: str) -> dict:
    """Everything that determines the store's bytes; a resumed or repeated run must match it exactly."""
    size = cfg.data.image_size
    views = num_views(cfg.data.views)
    if size % tok.downsample:
        raise ConfigError(f"data.image_size={size} is not a multiple of the tokenizer's downsampling {tok.downsample}")
    sizes = group_sizes(tok)  # (MGVQConfig refuses a codebook that does not split into its groups)
    if max(sizes) > 2**32:
        raise ConfigError(f"tokenizer groups of {sizes} codes: at most 2**32 per group fit the store's uint32")
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


def encode_views(model, x: torch.Tensor, spec: dict, dtype, layout=torch.contiguous_format
                 ) -> tuple[np.ndarray, tuple | None]:
    """Views (B, A, 3, S, S) -> grid codes (B, A, h, w, G) in the store's dtype, and where the store keeps the merged
    form (`merged_tokens`), (merged codes (B, A, K, G), token map (B, A, h, w) uint16). The encoder runs under
    autocast to `dtype` (None: float32) on images in `layout` (the encoder_layout of the family)."""
    B, A = x.shape[:2]
    (h, w), G = spec["grid"], spec["groups"]
    merged = None
    x = x.flatten(0, 1).contiguous(memory_format=layout)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        if spec.get("merged_tokens"):
            merged = model.encode_merged(x)  # (B * A, K, G), (B * A, h, w)
            codes = unmerge(*merged)
        else:
            codes = model.encode_codes(x)  # (B * A, h, w, G)
    if codes.shape != (B * A, h, w, G):
        raise RuntimeError(f"encode_codes returned {tuple(codes.shape)}, expected {(B * A, h, w, G)}")
    codes = codes.view(B, A, h, w, G).cpu().numpy().astype(spec["dtype"])
    if merged is not None:
        merged = (merged[0].view(B, A, -1, G).cpu().numpy().astype(spec["dtype"]),
                  merged[1].view(B, A, h, w).cpu().numpy().astype(np.uint16))
    return codes, merged


def extract(cfg: ExtractConfig) -> dict:
    """Fill (or finish) the code store `cfg.out_dir`; returns its meta."""
    cfg.check()
    accelerator = Accelerator()
    # bf16 runs on a CPU too (the encoder under autocast); fp16 only on CUDA
    precision = check_precision(cfg.precision, ("fp32", "bf16") if accelerator.device.type == "cpu" else PRECISIONS)
    checkpoint = cfg.tokenizer.require_checkpoint("the weights file the codes are made with")
    if not Path(checkpoint).is_file():
        raise MissingFileError(f"tokenizer.checkpoint={checkpoint} is not a file")
    # The architecture the ref names, else the file's own (loaded now); a store made with other settings is
    # refused before the load, and the load (which checks the file) comes before the out_dir is touched, so a bad
    # file leaves nothing that would refuse the corrected command.
    model = None if cfg.tokenizer.config is not None else cfg.tokenizer.load()
    arch = cfg.tokenizer.config if model is None else model.config
    files, labels, classes = list_images(cfg.data.root)
    spec = build_spec(cfg, arch, files, labels, classes, precision)
    StoreWriter(cfg.out_dir, spec).check()  # read-only; checked again under the lock
    model = model or cfg.tokenizer.load()
    with out_dir_lock(cfg.out_dir, accelerator):
        fill_store(cfg, accelerator, model, spec, files, labels)
    return CodeStore(cfg.out_dir).meta


def fill_store(cfg: ExtractConfig, accelerator: Accelerator, model: torch.nn.Module, spec: dict, files: list[str],
               labels: list[int]) -> None:
    """Create, resume or recognise as complete the store of `spec` in cfg.out_dir, and encode what is missing."""
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    writer = StoreWriter(cfg.out_dir, spec)
    state = writer.check()  # every rank checks, so a refusal stops all of them alike
    if state == "complete":
        if accelerator.is_main_process:
            print(f"{cfg.out_dir}: code store already complete ({len(files)} images)")
            writer.remove_progress_files()  # left behind by a kill right after meta.json was written
        return
    if state == "new" and accelerator.is_main_process:
        writer.create(np.asarray(labels, dtype=np.int64))
    accelerator.wait_for_everyone()

    todo = writer.open()
    mine = np.array_split(todo, world)[rank]  # contiguous, disjoint, the same split on every rank
    print(f"[rank {rank}/{world}] {len(mine)} of {len(todo)} images left to encode", flush=True)
    dataset = ImageViews(cfg.data.root, cfg.data.image_size, cfg.data.views, cfg.data.crop_range, files, labels)
    loader = DataLoader(Subset(dataset, mine.tolist()), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda")
    if device.type == "cpu":
        keep_freed_cpu_memory()  # the encoder's freed activations serve the next batch's, without page faults
    dtype = autocast_dtype(spec["precision"])
    layout = encoder_layout(device, cfg.tokenizer.family, dtype)
    model = model.to(device, memory_format=layout)
    if device.type == "cpu" and dtype is not None and not native_cpu_bf16():
        print(f"warning: precision={spec['precision']} on a CPU without AVX512-BF16 or AMX: its bf16 convolutions "
              f"are emulated and slower than fp32 (README, benchmarks)", flush=True)
    h, w = spec["grid"]

    # One bar on the main process for all ranks: it counts world_size images per image of its own slice.
    bar = tqdm(total=len(files), initial=len(files) - len(todo), unit="img", dynamic_ncols=True,
               desc=f"extract x{world}" if world > 1 else "extract", disable=not accelerator.is_main_process)
    for index, x, _, errors in loader:
        B, A = x.shape[:2]
        codes, merged = encode_views(model, x.to(device, non_blocking=True), spec, dtype, layout)
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
