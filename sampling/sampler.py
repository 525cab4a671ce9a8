"""From class labels to uint8 images, and from there to an ADM sample file on one or many processes.

`Sampler` = GPT + tokenizer (any family) + settings: labels and seeds -> codes (sampling.generate) -> decode -> uint8
(rounded as LlamaGen/MGVQ) -> bicubic resize down to `eval_size` (PIL, as MGVQ's evaluation). Sample i always has
label i mod num_classes and seed (seed, i), so any subset of indices can be drawn anywhere, in any batch.

`write_samples` draws indices [0, N) in fixed batches of `batch_size` consecutive indices, batch b dealt to
process b mod world: a batch holds the same samples whatever the number of processes, the deal does not depend
on what any process sees on disk, and a rerun after a kill redoes only the batches with missing PNGs. The main
process then packs the PNGs into `.npz` (arr_0 uint8 (N,H,W,3), labels int64 (N,)), stored uncompressed with
fixed zip timestamps, so it can be memory-mapped and equal runs give byte-identical files, plus a JSON sidecar
with every setting and the checkpoints' hashes.
"Equal runs" means equal settings on the same kind of device with the same intra-op thread count per process:
on CPU the thread count changes the order of float reductions, which can move a decoded pixel across a rounding
boundary (one pixel off by 1 was seen between 1 and 2 threads).
"""
from __future__ import annotations

import dataclasses
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from gpt import GPT, GPTConfig, load_gpt
from sampling.generate import CFG_SCHEDULES, check_cfg_scale, generate
from tokenizer import CodeTokenizer, TokenizerRef
from tokenizer.base import group_sizes
from tokenizer.common import validate as v
from tokenizer.common.errors import BadFileError, ConfigError
from tokenizer.common.io import atomic_path, read_json, reading, sha256_file, write_json_atomic
from tokenizer.common.lock import out_dir_lock
from tokenizer.common.precision import autocast_dtype
from tokenizer.common.settings import refuse_mismatch

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # zip's epoch: no wall-clock time in the file, so equal runs give equal bytes


@dataclass
class SamplerConfig:
    """How a sampler samples (conf/sampler/default.yaml). Every field is recorded in the sample file's sidecar."""

    cfg_scale: Any = 2.0  # a number or one per group (Open-MAGVIT2 XL: [1.75, 1.85])
    cfg_interval: float = -1  # LlamaGen's: guidance off at positions t > cfg_interval + 1; -1 never
    cfg_schedule: str = "constant"  # constant | linear (ramp from 1 at the first position to cfg_scale at the last)
    temperature: Any = 1.0  # a number or one per group
    top_k: Any = 0  # a number or one per group; 0: no filtering, 1: greedy
    top_k_log2: bool = False  # read top_k as MGVQ's --top-k exponent: 12 -> k = 4096, 0 -> k = 1
    top_p: Any = 1.0  # a number or one per group; 1.0: no filtering
    groups_to_use: Optional[int] = None  # decode with the first n groups only (MGVQ coarse-to-fine); None: all
    # resize larger images down (bicubic) to this side, e.g. 384 -> 256 for FID, as MGVQ; smaller ones are kept.
    # None: keep (the library and demo default; the FID sample runs, conf/sample.yaml and sweep_cfg.yaml, say 256)
    eval_size: Optional[int] = None
    seed: int = 0  # sample i draws from the random stream of seed (seed, i)
    precision: str = "fp32"  # fp32 | bf16 (autocast of the GPT; logits, sampling and the decoder stay fp32)
    # torch.compile each position's step (trunk, sub-tokens, CFG, filters, draw: sampling.generate); CUDA graphs
    # on GPU. None: on CUDA only, where it removes the launch overhead that dominates; on CPU it compiles for
    # minutes per batch size and settings for a small gain (README, benchmarks). The codes are the same either way.
    compile: Optional[bool] = None

    def check(self) -> None:
        """Every setting of the right type, finite and in range, before anything is loaded or written (ConfigError
        naming it); the per-group lengths are checked against the model in `Sampler`."""
        v.choice(self.precision, "sampler.precision", ("fp32", "bf16"))
        v.choice(self.cfg_schedule, "sampler.cfg_schedule", CFG_SCHEDULES)
        check_cfg_scale(self.cfg_scale, "sampler.cfg_scale")
        v.number(self.cfg_interval, "sampler.cfg_interval", low=-1)
        v.per_group(self.temperature, "sampler.temperature", low=0, low_open=True)  # greedy is top_k=1
        for k in v.per_group(self.top_k, "sampler.top_k", low=0):
            v.integer(k, "sampler.top_k", low=0)
        v.per_group(self.top_p, "sampler.top_p", low=0, high=1, low_open=True)
        v.optional_integer(self.groups_to_use, "sampler.groups_to_use", low=1)
        v.optional_integer(self.eval_size, "sampler.eval_size", low=1)
        v.integer(self.seed, "sampler.seed", low=0, high=2**31 - 1)
        if not isinstance(self.top_k_log2, bool) or not isinstance(self.compile, (bool, type(None))):
            raise ConfigError(f"sampler.top_k_log2={self.top_k_log2!r}, sampler.compile={self.compile!r}: "
                              f"expected true or false")

    def check_model(self, groups: int) -> None:
        """The settings given per group have one value per group of a model with `groups` groups."""
        for name in ("cfg_scale", "temperature", "top_k", "top_p"):
            v.per_group(getattr(self, name), f"sampler.{name}", groups)
        v.optional_integer(self.groups_to_use, "sampler.groups_to_use", low=1, high=groups)


@dataclass
class ModelFiles:
    """The GPT and the tokenizer a sampler draws with (the `gpt_ckpt`, `gpt_official`, `tokenizer` of a run config)."""

    gpt_ckpt: str  # this project's model file (e.g. <train out_dir>/export/model.pt) or an official MGVQ GPT
    tokenizer: TokenizerRef  # the hydra `tokenizer` group; tokenizer.checkpoint is required
    # Official-layout GPT checkpoints store no config. MGVQ: their ModelArgs fields, e.g. GPT-XXL at 384px
    # {dim: 1536, n_layer: 48, n_head: 24, block_size: 576}; vocab_size, codebook_groups and codebook_embed_dim
    # default to the tokenizer's. With an Open-MAGVIT2 tokenizer: its AR yaml's transformer_config.params, e.g.
    # AR-XL {spatial_n_layer: 48, factorized_n_layer: 4, n_head: 24, dim: 1536}; factorized_bits default to the
    # tokenizer's. LlamaGen c2i / IBQ-AR: {preset: gpt_b} or {preset: ibq_ar_b} (grid_size: 16 by default; the
    # codebook size is the tokenizer's). None: the file's own config (this project's model files).
    gpt_official: Optional[dict[str, Any]] = None
    # A released model by name (sampling.zoo): its official files inside ckpt_dir, its configs and published sampler
    # settings, each overridable (scripts/_hydra.py applies them under the command line's KEY=VALUE).
    zoo: Optional[str] = None
    ckpt_dir: Optional[str] = None


def sample_seeds(seed: int, indices: torch.Tensor) -> torch.Tensor:
    """The random stream of sample i: seed in the high 32 bits, i in the low ones (int64, non-negative)."""
    if indices.numel() and (indices.min() < 0 or indices.max() >= 2**32):
        raise ValueError("sample indices must lie in [0, 2**32)")
    return seed * 2**32 + indices.to(torch.int64)


def gpt_config(files: ModelFiles, t) -> GPTConfig | None:
    """The GPT config of an official file from `files.gpt_official` and the tokenizer's config `t`; None for this
    project's files, which store theirs."""
    if files.gpt_official is None:
        return None
    if "preset" in files.gpt_official:
        return GPTConfig.single_codebook(codes_per_group=t.codes_per_group, **files.gpt_official)
    if files.tokenizer.family == "open_magvit2":
        return GPTConfig.from_open_magvit2({"factorized_bits": t.factorized_bits, **files.gpt_official})
    return GPTConfig.from_official_mgvq({"vocab_size": t.codebook_size, "codebook_groups": t.codebook_groups,
                                         "codebook_embed_dim": t.latent_channels, **files.gpt_official})


def load_models(files: ModelFiles, device: torch.device | str = "cpu") -> tuple[GPT, torch.nn.Module]:
    """The GPT and tokenizer `files` names, on `device`, in eval mode."""
    tokenizer = files.tokenizer.load()
    t = tokenizer.config
    gpt = load_gpt(files.gpt_ckpt, gpt_config(files, t), codebook=tokenizer.codebook())
    if gpt.config.group_sizes != group_sizes(t):
        raise ConfigError(f"{files.gpt_ckpt} samples groups of {gpt.config.group_sizes} codes but the tokenizer "
                         f"{files.tokenizer.checkpoint} has groups of {group_sizes(t)}")
    return gpt.to(device), tokenizer.to(device)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoder output (B, 3, H, W), nominally in [-1, 1] -> uint8 (B, H, W, 3), rounded as LlamaGen and MGVQ do."""
    return (127.5 * images + 128.0).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def resize_bicubic(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (B, H, W, 3) -> (B, size, size, 3) with PIL's bicubic (antialiased), as MGVQ's FID samples.

    Images no larger than `size` are returned as they are: upscaling adds no detail, and the evaluation
    refuses samples whose size differs from the reference's.
    """
    if max(images.shape[1:3]) <= size:
        return images
    return np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.BICUBIC)) for x in images])


def check_guidance(gpt: GPT, cfg_scale) -> None:
    """Refuse classifier-free guidance (a scale, or one per group, other than 1) with a GPT whose null class was
    never trained."""
    scales = [cfg_scale] if isinstance(cfg_scale, (int, float)) else list(cfg_scale)
    if any(s != 1 for s in scales) and gpt.config.class_dropout_prob == 0:
        raise ConfigError(
            f"cfg_scale={cfg_scale} needs a GPT trained with class dropout, but this one has class_dropout_prob=0: "
            f"its null class (label {gpt.config.num_classes}) never replaced a label in training, so the "
            f"unconditional logits guidance mixes in come from an untrained embedding. Sample with cfg_scale=1, "
            f"or train with model.class_dropout_prob > 0 (LlamaGen: 0.1)")


class Sampler:
    """labels + seeds -> uint8 images (N, H, W, 3). Demo, DDP sampler and CFG sweep all draw through it."""

    def __init__(self, gpt: GPT, tokenizer: CodeTokenizer, config: SamplerConfig, files: ModelFiles | None = None):
        config.check()
        config.check_model(gpt.config.codebook_groups)
        check_guidance(gpt, config.cfg_scale)
        self.gpt, self.tokenizer, self.config, self.files = gpt.eval(), tokenizer.eval(), config, files
        self.device = next(gpt.parameters()).device
        self.num_classes = gpt.config.num_classes
        self._hashes: dict[str, str] = {}
        self.compile = self.device.type == "cuda" if config.compile is None else config.compile

    @classmethod
    def from_files(cls, files: ModelFiles, config: SamplerConfig, device: torch.device | str = "cpu") -> Sampler:
        config.check()
        files.tokenizer.require_checkpoint("the tokenizer weights that decode the codes")
        return cls(*load_models(files, device), config, files)

    def codes(self, labels: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """Codes (B, L, G) int64 for labels (B,) and seeds (B,)."""
        c, dtype = self.config, autocast_dtype(self.config.precision)
        c.check_model(self.gpt.config.codebook_groups)  # again here: a sweep swaps `config` on a built sampler
        check_guidance(self.gpt, c.cfg_scale)
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            return generate(self.gpt, labels.to(self.device), cfg_scale=c.cfg_scale, cfg_interval=c.cfg_interval,
                            cfg_schedule=c.cfg_schedule, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                            seeds=seeds, top_k_log2=c.top_k_log2, compile=self.compile)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, groups_to_use: int | None = None) -> np.ndarray:
        """Codes (B, L, G) -> uint8 images (B, H, W, 3), resized to eval_size."""
        grid = self.gpt.config.grid_size
        images = self.tokenizer.decode_codes(codes.view(codes.shape[0], grid, grid, -1), groups_to_use)
        images = to_uint8(images)
        return resize_bicubic(images, self.config.eval_size) if self.config.eval_size else images

    def sample(self, labels: torch.Tensor, seeds: torch.Tensor) -> np.ndarray:
        """uint8 images (B, H, W, 3) for labels (B,) and seeds (B,)."""
        return self.decode(self.codes(labels, seeds), self.config.groups_to_use)

    def sample_indices(self, indices: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """Samples number `indices` of the sample file: labels i mod num_classes, seeds (seed, i)."""
        labels = indices % self.num_classes
        return labels, self.sample(labels, sample_seeds(self.config.seed, indices))

    def settings(self) -> dict:
        """Every setting, the models' configs and their files' hashes, for a sidecar."""
        files = {}
        if self.files is not None:
            files = {"gpt_ckpt": self.files.gpt_ckpt, "gpt_sha256": self._sha256(self.files.gpt_ckpt),
                     "tokenizer_checkpoint": self.files.tokenizer.checkpoint,
                     "tokenizer_sha256": self._sha256(self.files.tokenizer.checkpoint)}
        return {"sampler": dataclasses.asdict(self.config), **files, "gpt_config": self.gpt.config.to_dict(),
                "tokenizer_config": self.tokenizer.config.to_dict(), "num_classes": self.num_classes}

    def identity(self) -> dict:
        """What decides the pixels: every setting but the compile switch, the files by content (not by path)."""
        settings = self.settings()
        settings["sampler"].pop("compile")
        return {k: v for k, v in settings.items() if k not in ("gpt_ckpt", "tokenizer_checkpoint")}

    def _sha256(self, path: str) -> str:
        """Hashed once per file: a sweep asks for the settings of every point, and GPT-XXL is 6 GB."""
        if path not in self._hashes:
            self._hashes[path] = sha256_file(path, progress=True)
        return self._hashes[path]


def png_path(png_dir: Path, i: int) -> Path:
    return png_dir / f"{i:06d}.png"


def read_png(path: Path) -> np.ndarray:
    """A sample PNG as uint8 (H, W, 3); a damaged one is named, with the way out."""
    with reading(path, "sample image", hint="delete it and rerun the same command to draw it again"):
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))


def write_npz(path: Path, png_dir: Path, num_samples: int, num_classes: int) -> None:
    """Pack PNGs 0..N-1 into an uncompressed .npz (arr_0, labels), streamed: 50k images never sit in RAM."""
    first = read_png(png_path(png_dir, 0))
    shape = (num_samples, *first.shape)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open(zipfile.ZipInfo("arr_0.npy", _ZIP_TIME), "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for i in tqdm(range(num_samples), desc=f"pack {path.name}", unit="img", dynamic_ncols=True):
                image = read_png(png_path(png_dir, i))
                if image.shape != first.shape:
                    raise BadFileError(f"{png_path(png_dir, i)} is {image.shape}, sample 0 is {first.shape}")
                f.write(image.tobytes())
        with zf.open(zipfile.ZipInfo("labels.npy", _ZIP_TIME), "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.arange(num_samples, dtype=np.int64) % num_classes)


def write_samples(sampler: Sampler, num_samples: int, out_dir: str | os.PathLike, batch_size: int = 32,
                  accelerator=None, sidecar: dict | None = None) -> Path:
    """Draw samples 0..N-1 as PNGs in out_dir/png (keeping those already there), then pack the .npz and sidecar.

    With an `accelerate.Accelerator` the batches are dealt over its processes. Returns the .npz path,
    out_dir/samples.npz (the sidecar is out_dir/samples.json; `sidecar` adds entries to it).
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    is_main = rank == 0
    out_dir = Path(out_dir)
    png_dir = out_dir / "png"
    npz_path = out_dir / "samples.npz"
    identity = sampler.identity()
    made_by = out_dir / "settings.json"
    if made_by.is_file():  # every rank checks, so a refusal stops all of them alike
        refuse_mismatch(read_json(made_by), identity, f"the samples in {out_dir}", "use another out_dir or remove it")
    if is_main:
        png_dir.mkdir(parents=True, exist_ok=True)
        for stale in png_dir.glob(".*.png.tmp*"):  # PNG writes a kill interrupted
            stale.unlink()
        if not made_by.is_file():
            write_json_atomic(made_by, identity)
    _barrier(accelerator)  # the PNG folder exists and holds no stale part-written file

    # Batch b belongs to rank b mod world, fixed before anything is listed: each rank lists only its own batches,
    # so a rank that lists late (another rank already finished batches) still draws exactly its share.
    mine = [s for s in range(rank * batch_size, num_samples, world * batch_size)
            if not all(png_path(png_dir, i).is_file() for i in range(s, min(s + batch_size, num_samples)))]
    bar = tqdm(total=sum(min(s + batch_size, num_samples) - s for s in mine), unit="img", dynamic_ncols=True,
               disable=not is_main, desc=f"sample (rank 0 of {world})" if world > 1 else "sample")
    for s in mine:
        indices = torch.arange(s, min(s + batch_size, num_samples))
        _, images = sampler.sample_indices(indices)
        for i, image in zip(indices.tolist(), images):
            path = png_path(png_dir, i)
            if not path.is_file():
                with atomic_path(path) as tmp:
                    Image.fromarray(image).save(tmp, format="PNG")
        bar.update(len(indices))
    bar.close()
    _barrier(accelerator)

    if is_main:
        write_npz(npz_path, png_dir, num_samples, sampler.num_classes)
        write_json_atomic(npz_path.with_suffix(".json"), {
            **sampler.settings(), "num_samples": num_samples, "samples": str(npz_path),
            "run": {"batch_size": batch_size, "num_processes": world, "device": str(sampler.device)},
            **(sidecar or {})})
    _barrier(accelerator)
    return npz_path


def _barrier(accelerator) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()


@dataclass(kw_only=True)
class SampleRunConfig(ModelFiles):
    """conf/sample.yaml: the models, how to sample, how many samples, where, and in which batches."""

    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    out_dir: str  # PNGs in out_dir/png, the .npz and its sidecar at out_dir/samples.{npz,json}
    num_samples: int = 50000  # sample i has label i mod num_classes
    batch_size: int = 32  # samples per batch and process (the GPT runs 2x that with CFG)

    def check(self) -> None:
        check_run(self)


def check_run(cfg) -> None:
    """The settings a sampling run (SampleRunConfig, SweepConfig) shares, checked before anything is written."""
    v.non_empty(cfg.gpt_ckpt, "gpt_ckpt")
    v.non_empty(cfg.tokenizer.checkpoint, "tokenizer.checkpoint")
    v.non_empty(cfg.out_dir, "out_dir")
    v.integer(cfg.num_samples, "num_samples", low=1)
    v.integer(cfg.batch_size, "batch_size", low=1)
    cfg.sampler.check()


def run(cfg: SampleRunConfig, sidecar: dict | None = None) -> Path:
    """Draw cfg.num_samples on every process accelerate gives us; returns the .npz path. `sidecar`: entries the
    sample file's JSON sidecar also records."""
    from accelerate import Accelerator  # heavy: only the script entry point needs it

    cfg.check()
    accelerator = Accelerator()
    with out_dir_lock(cfg.out_dir, accelerator):
        sampler = Sampler.from_files(cfg, cfg.sampler, accelerator.device)
        s = cfg.sampler
        accelerator.print(f"sampling {cfg.num_samples} images on {accelerator.num_processes} process(es), "
                          f"{accelerator.device}: {cfg.gpt_ckpt}, cfg_scale {s.cfg_scale}, top_k {s.top_k}, "
                          f"top_p {s.top_p}, temperature {s.temperature}")
        path = write_samples(sampler, cfg.num_samples, cfg.out_dir, cfg.batch_size, accelerator,
                             sidecar=sidecar)
    accelerator.print(f"wrote {path} ({cfg.num_samples} images) and {path.with_suffix('.json')}")
    return path
