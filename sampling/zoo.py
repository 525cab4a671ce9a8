"""The released class-conditional AR models by name: their files, configs, published sampler settings and numbers.

`ZOO[name]` is one released GPT: the official file names of the GPT and of the tokenizer it decodes with (found
inside a user's `ckpt_dir`), the GPT's preset or official arguments, the tokenizer preset and weights choice, the
sampler settings its authors published, the evaluation size and reference batch, and the published gFID / IS /
precision / recall. Every setting cites where it was read (repository at the commit named in SOURCES, file);
a number not published is None. `run_fields(entry, ckpt_dir)` turns an entry into the fields of a sample or sweep
run config (scripts/_hydra.py applies them under the command line's overrides); `check_files` refuses a missing,
truncated or foreign file before anything is sampled; `provenance` records the entry, its published numbers and
every setting the run changed, for the sample file's sidecar and the metrics JSON.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpt import GPT
from gpt.loading import read_official_weights
from sampling.generate import per_group
from sampling import sampler as sample_files
from sampling.sampler import ModelFiles, SampleRunConfig, SamplerConfig, check_guidance, gpt_config
from tokenizer.common.errors import BadFileError, ConfigError, MissingFileError
from tokenizer.common.settings import flatten, json_ready
from tokenizer.loading import TokenizerRef, check_state_dict, named_refs, read_file, read_weights
from tokenizer.registry import get_family

# Where the facts were read (the `fetch` snapshots; paths below are inside these repositories).
SOURCES = {
    "LlamaGen": "FoundationVision/LlamaGen@ce98ec41803a74a90ce68c40ababa9eaeffeb4ec",
    "SEED-Voken": "TencentARC/SEED-Voken@b9a17eac8e2c0779c12a5429b0bfd6c502788484",
    "MGVQ": "MKJia/MGVQ@f76c2dd5f28084e69b73dc1fcd0617639c5ffe82",
}
METRICS = ("fid", "inception_score", "precision", "recall")
ADM_256 = "VIRTUAL_imagenet256_labeled.npz"  # ADM's ImageNet 256x256 reference batch (guided-diffusion evaluations)


@dataclass(frozen=True)
class Published:
    """Numbers the authors published for 50,000 samples (None: not published), and where."""

    fid: float | None
    inception_score: float | None
    precision: float | None
    recall: float | None
    source: str
    num_samples: int = 50000


@dataclass(frozen=True)
class ZooEntry:
    """One released GPT and everything needed to sample and score it as its authors did."""

    name: str
    gpt_file: str  # official file name, looked up inside ckpt_dir
    gpt_page: str  # where the file is published
    tokenizer_file: str  # may be gpt_file: IBQ-AR and Open-MAGVIT2 AR files carry their tokenizer
    tokenizer_page: str
    gpt_official: dict[str, Any]  # ModelFiles.gpt_official: a preset (LlamaGen, IBQ-AR) or the official arguments
    tokenizer: str  # a tokenizer preset (tokenizer.loading.named_refs)
    tokenizer_weights: str  # auto | ema | raw (TokenizerRef.weights)
    sampler: dict[str, Any]  # SamplerConfig fields, eval_size included; the rest keep their defaults
    reference: str  # the reference batch the published FID was measured against
    published: Published
    params: str | None  # the published GPT size ("111M", "1.4B"); None: not published
    tokenizer_params: str | None  # the published tokenizer size; None: not published
    notes: str = ""  # what the official pipeline does that this one does not pin
    tokenizer_fields: dict[str, Any] = field(default_factory=dict)  # overrides of the preset's fields


def _llamagen(size: str, preset: str, grid: int, cfg: float, cfg_src: str, fid: float, params: str) -> ZooEntry:
    res = grid * 16
    file = f"c2i_{size}_{res}.pt"
    return ZooEntry(
        name=f"llamagen-{size.lower()}-{res}",
        gpt_file=file,  # LlamaGen README.md "AR models" table (the URL's name; XL's link text says c2i_X_384L.pt)
        gpt_page=f"https://huggingface.co/FoundationVision/LlamaGen/resolve/main/{file}",  # README.md, same row
        tokenizer_file="vq_ds16_c2i.pt",  # README.md "VQ-VAE models"; sample_c2i_ddp.py --vq-model VQ-16 (default)
        tokenizer_page="https://huggingface.co/FoundationVision/LlamaGen/resolve/main/vq_ds16_c2i.pt",
        gpt_official={"preset": preset, "grid_size": grid},  # GETTING_STARTED.md --gpt-model; --image-size / 16
        tokenizer="llamagen-vq16",  # sample_c2i_ddp.py: VQ-16, codebook 16384 x 8
        tokenizer_weights="auto",  # sample_c2i_ddp.py loads checkpoint["model"] (auto = model)
        sampler={
            "cfg_scale": cfg,  # GETTING_STARTED.md "Sampling" --cfg-scale of this --gpt-model (cfg_src says which)
            "cfg_interval": -1,  # sample_c2i_ddp.py --cfg-interval default -1
            "cfg_schedule": "constant",  # generate.py: one scale at every position
            "top_k": 0, "top_p": 1.0, "temperature": 1.0,  # sample_c2i_ddp.py defaults; GETTING_STARTED.md's npz name
            "precision": "bf16",  # sample_c2i_ddp.py --precision default bf16
            "eval_size": 256,  # sample_c2i_ddp.py --image-size-eval default 256; README "FID (256x256)"
        },
        reference=ADM_256,  # GETTING_STARTED.md "Evaluation"; evaluations/c2i/README.md
        published=Published(fid=fid, inception_score=None, precision=None, recall=None,
                            source=f"LlamaGen README.md 'AR models' table (FID only; cfg_scale {cfg}: {cfg_src})"),
        params=params,  # README.md "AR models" table
        tokenizer_params="72M",  # README.md "VQ-VAE models" table
        notes=("384px samples are resized to 256 by torch's F.interpolate(mode='bicubic') on the float decoder "
               "output (sample_c2i_ddp.py), here by PIL's antialiased bicubic on uint8, as MGVQ" if res > 256 else ""),
    )


_GS = "GETTING_STARTED.md 'Sampling'"
_SEED = "scripts/evaluation/sample_gpu.sh"
_SV_NOTES = ("official sample.py stores classes in order (50 per class) and rounds 255*(x+1)/2 down; "
             "this sampler interleaves labels and rounds as LlamaGen; the official seed 42 feeds another RNG")


def _ibq(size: str, preset: str, cfg: float, temperature: float, fid: float, isc: float, params: str) -> ZooEntry:
    return ZooEntry(
        name=f"ibq-ar-{size.lower()}",
        gpt_file=f"AR_256_{size}.ckpt",  # docs/IBQ.md "Stage II" table
        gpt_page=f"https://huggingface.co/TencentARC/IBQ-AR-{size}/blob/main/AR_256_{size}.ckpt",  # same row
        tokenizer_file=f"AR_256_{size}.ckpt",  # sample.py builds the tokenizer from the AR file (first_stage_model.*)
        tokenizer_page=f"https://huggingface.co/TencentARC/IBQ-AR-{size}/blob/main/AR_256_{size}.ckpt",
        gpt_official={"preset": preset},  # configs/IBQ/gpu/imagenet_conditional_llama_{size}.yaml transformer_config
        tokenizer="ibq-16384",  # the same yaml: first_stage_config n_embed 16384, embed_dim 256
        tokenizer_weights="auto",  # the yaml: use_ema True; the AR file's first_stage_model.* are those weights
        sampler={
            "cfg_scale": cfg,  # scripts/evaluation/sample_gpu.sh --cfg_scale
            "cfg_interval": -1, "cfg_schedule": "constant",  # src/IBQ/modules/transformer/llama.py sample_IBQ
            "top_k": 0, "top_p": 1.0,  # sample_gpu.sh -k 0 -p 1.0
            "temperature": temperature,  # sample_gpu.sh -t
            "precision": "fp32",  # sample.py runs the model without autocast
            "eval_size": 256,  # 256px model (the yaml's data size 256)
        },
        reference=ADM_256,  # not named by SEED-Voken; ADM's 256px batch, as LlamaGen whose protocol it follows
        published=Published(fid=fid, inception_score=isc, precision=None, recall=None,
                            source=f"SEED-Voken docs/IBQ.md 'Stage II' table (FID, IS); settings: {_SEED}"),
        params=params,  # docs/IBQ.md "Stage II" table
        tokenizer_params=None,  # docs/IBQ.md gives rFID and utilisation, not a size
        notes=_SV_NOTES,
    )


def _open_magvit2(size: str, args: dict, cfg: list, temperature: list, fid: float, isc: float, params: str) -> ZooEntry:
    page = f"https://huggingface.co/TencentARC/Open-MAGVIT2-AR-{size}-256-resolution/blob/main/AR_256_{size}.ckpt"
    return ZooEntry(
        name=f"open-magvit2-ar-{size.lower()}",
        gpt_file=f"AR_256_{size}.ckpt",  # docs/Open-MAGVIT2.md "Stage II" table
        gpt_page=page,
        tokenizer_file=f"AR_256_{size}.ckpt",  # sample.py builds the tokenizer from the AR file (first_stage_model.*)
        tokenizer_page=page,
        gpt_official=args,  # configs/Open-MAGVIT2/gpu/imagenet_conditional_llama_{size}.yaml transformer_config.params
        tokenizer="open-magvit2-f16",  # the same yaml: first_stage_config, factorized_bits [6, 12]
        tokenizer_weights="raw",  # the yaml: use_ema False (an AR file holds the raw tokenizer weights only)
        sampler={
            "cfg_scale": cfg,  # scripts/evaluation/sample_gpu.sh --cfg_scale (one per sub-token)
            "cfg_interval": -1, "cfg_schedule": "constant",  # src/Open_MAGVIT2/modules/transformer/gpt.py
            "top_k": 0, "top_p": 1.0,  # sample_gpu.sh -k 0,0 -p 1.0,1.0
            "temperature": temperature,  # sample_gpu.sh -t
            "precision": "fp32",  # sample.py runs the model without autocast
            "eval_size": 256,
        },
        reference=ADM_256,  # not named by SEED-Voken; ADM's 256px batch
        published=Published(fid=fid, inception_score=isc, precision=None, recall=None,
                            source=f"SEED-Voken docs/Open-MAGVIT2.md 'Stage II' table (FID, IS); settings: {_SEED}"),
        params=params,  # docs/Open-MAGVIT2.md "Stage II" table
        tokenizer_params=None,  # docs/Open-MAGVIT2.md gives rFID, PSNR and utilisation, not a size
        notes=_SV_NOTES,
    )


def _om2_args(n_layer: int, head_layers: int, n_head: int, dim: int) -> dict:
    """transformer_config.params of configs/Open-MAGVIT2/gpu/imagenet_conditional_llama_*.yaml, as written there."""
    return {"vocab_size": 512, "block_size": 256, "spatial_n_layer": n_layer, "factorized_n_layer": head_layers,
            "factorized_bits": [6, 12], "n_head": n_head, "dim": dim, "cond_dim": dim, "token_drop": 0.1,
            "resid_dropout_p": 0.1, "token_factorization": True, "class_num": 1000}


_MGVQ_XXL = ZooEntry(
    name="mgvq-gpt-xxl",
    gpt_file="MGVQ_GPT_XXL.pt",  # MGVQ README.md "Generation Demo&Evaluation"
    gpt_page="https://huggingface.co/datasets/mkjia/MGVQ/blob/main/MGVQ_GPT_XXL.pt",  # README.md, same paragraph
    tokenizer_file="mgvq_f16c32_g4.pt",  # README.md: "test it with our mgvq-f16c32-g4 tokenizer"
    tokenizer_page="https://huggingface.co/mkjia/MGVQ/blob/main/mgvq_f16c32_g4.pt",  # README.md "Model Zoo"
    # evaluation/demo_gen.sh: --gpt-model GPT-XXL (gpt_emb_simple.py: 48 x 1536, 24 heads), --image-size 384 / 16
    gpt_official={"dim": 1536, "n_layer": 48, "n_head": 24, "block_size": 576},
    tokenizer="mgvq-f16c32-g4",  # demo_gen.sh --vq-model mgvq-f16c32 --codebook-groups 4 --codebook-size 32768
    tokenizer_weights="auto",  # sample_c2i_ddp.py loads checkpoint["model"]
    sampler={
        "cfg_scale": 2.0,  # sample_c2i_ddp.py --cfg-scale default 2; the FID file's name gives no scale (demo: 4.0)
        "cfg_interval": -1, "cfg_schedule": "constant",  # sample_c2i_ddp.py --cfg-interval default -1
        "top_k": 12, "top_k_log2": True,  # README's FID file GPT_XXL_300ep_topk_12.npz; --top-k 12 means 2**12
        "top_p": 1.0, "temperature": 1.0,  # sample_c2i_ddp.py defaults (its sampler ignores both)
        "precision": "bf16",  # sample_c2i_ddp.py --precision default bf16
        "eval_size": 256,  # sample_c2i_ddp.py: PIL resize((256, 256), BICUBIC) of the 384px samples
    },
    reference=ADM_256,  # README.md: evaluator.py VIRTUAL_imagenet256_labeled.npz GPT_XXL_300ep_topk_12.npz
    published=Published(fid=3.02, inception_score=294.1, precision=None, recall=None,
                        source="MGVQ paper (arXiv 2507.07997), as DESIGN.md section 1 quotes it; not in the README"),
    params=None,  # gpt_emb_simple.py's "# 1.4B" is LlamaGen's GPT-XXL trunk; nothing counts the AR-head model
    tokenizer_params="216.0M",  # DESIGN.md 4.1 (the official f16c32 G4 key manifest's count)
    notes="the cfg_scale of the published FID is not stated; 2.0 is sample_c2i_ddp.py's default",
)

ZOO: dict[str, ZooEntry] = {e.name: e for e in [
    _MGVQ_XXL,
    # cfg scales: LlamaGen GETTING_STARTED.md "Sampling" (given there for --image-size 384)
    _llamagen("B", "gpt_b", 16, 2.0, f"{_GS} GPT-B, given for 384 only", 5.46, "111M"),
    _llamagen("B", "gpt_b", 24, 2.0, f"{_GS} GPT-B", 6.09, "111M"),
    _llamagen("L", "gpt_l", 16, 2.0, f"{_GS} GPT-L, given for 384 only", 3.80, "343M"),
    _llamagen("L", "gpt_l", 24, 2.0, f"{_GS} GPT-L", 3.07, "343M"),
    _llamagen("XL", "gpt_xl", 24, 1.75, f"{_GS} GPT-XL", 2.62, "775M"),
    _llamagen("XXL", "gpt_xxl", 24, 1.75, f"{_GS} GPT-XXL", 2.34, "1.4B"),
    _llamagen("3B", "gpt_3b", 24, 1.65, f"{_GS} GPT-3B", 2.18, "3.1B"),
    # SEED-Voken scripts/evaluation/sample_gpu.sh (cfg, temperature); docs/IBQ.md (FID, IS, size)
    _ibq("B", "ibq_ar_b", 2.25, 1.1, 2.88, 254.73, "342M"),
    _ibq("L", "ibq_ar_l", 2.0, 1.0, 2.45, 267.48, "649M"),
    _ibq("XL", "ibq_ar_xl", 2.35, 1.15, 2.14, 278.99, "1.1B"),
    _ibq("XXL", "ibq_ar_xxl", 2.85, 1.2, 2.05, 286.73, "2.1B"),
    # SEED-Voken sample_gpu.sh (per sub-token cfg and temperature); docs/Open-MAGVIT2.md (FID, IS, size)
    _open_magvit2("B", _om2_args(24, 2, 16, 1024), [1.9, 2.0], [1.0, 1.0], 3.08, 258.26, "343M"),
    _open_magvit2("L", _om2_args(36, 3, 20, 1280), [1.9, 1.9], [1.1, 1.0], 2.51, 271.70, "804M"),
    _open_magvit2("XL", _om2_args(48, 4, 24, 1536), [1.75, 1.85], [1.1, 1.0], 2.33, 271.77, "1.5B"),
]}
# LlamaGen releases XL, XXL and 3B at 384 only (README.md "AR models"): there are no 256px files to register.


def get(name: str) -> ZooEntry:
    if name not in ZOO:
        raise ConfigError(f"unknown zoo model {name!r}; the released models are: {', '.join(ZOO)}")
    return ZOO[name]


def parse_size(text: str) -> tuple[float, float]:
    """A published size ("111M", "1.4B") -> (count, half a unit of its last digit: the rounding it allows)."""
    scale = {"M": 1e6, "B": 1e9}[text[-1]]
    digits = text[:-1]
    decimals = len(digits.partition(".")[2])
    return float(digits) * scale, 0.5 * 10 ** -decimals * scale


def matches_published(count: int, published: str) -> bool:
    """`count` rounds to the published size, or lies within 1% of it (authors round, and some count loosely)."""
    value, half_unit = parse_size(published)
    return abs(count - value) <= max(half_unit, 0.01 * value)


def tokenizer_ref(entry: ZooEntry, checkpoint: str | None = None) -> TokenizerRef:
    ref = named_refs()[entry.tokenizer]
    config = ref.config.to_dict() | entry.tokenizer_fields
    return TokenizerRef(config=config, checkpoint=checkpoint, family=ref.family, weights=entry.tokenizer_weights)


def model_files(entry: ZooEntry, ckpt_dir: str | os.PathLike | None = None) -> ModelFiles:
    """The entry's files (inside ckpt_dir; bare names without one) and configs, as a sampler loads them."""
    where = Path(ckpt_dir) if ckpt_dir else Path()
    return ModelFiles(gpt_ckpt=str(where / entry.gpt_file), gpt_official=dict(entry.gpt_official),
                      tokenizer=tokenizer_ref(entry, str(where / entry.tokenizer_file)))


def run_fields(entry: ZooEntry, ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """The fields of a sample / sweep run config the entry decides, as plain values (dotted keys)."""
    files = model_files(entry, ckpt_dir)
    ref = files.tokenizer
    return {"gpt_ckpt": files.gpt_ckpt, "gpt_official": files.gpt_official, "tokenizer.config": ref.config.to_dict(),
            "tokenizer.checkpoint": ref.checkpoint, "tokenizer.family": ref.family, "tokenizer.weights": ref.weights,
            **{f"sampler.{k}": v for k, v in entry.sampler.items()}}


def build_on_meta(files: ZooEntry | ModelFiles) -> tuple[GPT, torch.nn.Module]:
    """The GPT and tokenizer of an entry (or of a run's files and configs) with meta tensors (no memory, no file):
    their sizes and key sets."""
    files = model_files(files) if isinstance(files, ZooEntry) else files
    ref = files.tokenizer
    with torch.device("meta"):
        tokenizer = get_family(ref.family).model_cls(ref.config)
        gpt = GPT(gpt_config(files, ref.config))
    return gpt, tokenizer


def check_settings(entry: ZooEntry, gpt: GPT) -> None:
    """The sampler's own checks on the entry's settings, for this GPT (guidance needs a trained null class; per-group
    values need one per group)."""
    config = SamplerConfig(**entry.sampler)
    config.check()
    check_guidance(gpt, config.cfg_scale)
    for name in ("cfg_scale", "temperature", "top_k", "top_p"):
        per_group(getattr(config, name), gpt.config.codebook_groups, name)


def _weights_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's state dict in half precision: the least a file holding those weights can weigh."""
    return sum(2 * t.numel() for t in module.state_dict().values() if t.is_floating_point())


def _require(path: Path, entry: ZooEntry, page: str) -> None:
    if not path.is_file():
        raise MissingFileError(f"zoo model {entry.name!r} needs {path.name} in {path.parent}, which does not exist; "
                                f"it is published at {page} (nothing is downloaded: fetch it yourself)")


def check_files(entry: ZooEntry, files: ModelFiles) -> None:
    """Refuse, before anything is loaded or sampled, a file that is missing, too small for the weights `files`
    describes (a partial download, a git-lfs pointer) or whose weights are not those (other keys or shapes). `files`:
    the run's, i.e. the entry's with the command line's overrides; `entry` names the release pages."""
    gpt, tokenizer = build_on_meta(files)
    gpt_path, tok_path = Path(files.gpt_ckpt), Path(files.tokenizer.checkpoint)
    _require(gpt_path, entry, entry.gpt_page)
    _require(tok_path, entry, entry.tokenizer_page)
    need = {gpt_path: _weights_bytes(gpt)}
    need[tok_path] = need.get(tok_path, 0) + _weights_bytes(tokenizer)
    for path, least in need.items():
        size = path.stat().st_size
        if size < least:
            page = entry.gpt_page if path == gpt_path else entry.tokenizer_page
            raise BadFileError(f"{path} is {size:,} bytes, but the weights of zoo model {entry.name!r} need at least "
                             f"{least:,} (2 bytes each): a partial download, a git-lfs pointer or another model's "
                             f"file? Fetch it from {page}")
    weights = read_official_weights(gpt_path, gpt.config)
    if gpt.config.input_embedding == "codebook":  # the official GPT takes the codebook from the tokenizer
        weights.setdefault("codebook", gpt.codebook)
    _, tok_weights, which = read_weights(read_file(tok_path), tok_path, files.tokenizer.family, files.tokenizer.weights)
    problems = []
    for module, sd, what in ((gpt, weights, f"{gpt_path} (GPT of zoo model {entry.name!r})"),
                             (tokenizer, tok_weights, f"{tok_path} ({which!r} tokenizer weights of {entry.name!r})")):
        try:
            check_state_dict(module, sd, what)
        except RuntimeError as e:
            problems.append(str(e).replace("the tokenizer architecture", "the entry's architecture"))
    if problems:
        raise BadFileError("\n".join(problems))


def available(ckpt_dir: str | os.PathLike) -> list[str]:
    """The entries whose files are in ckpt_dir and pass check_files (IBQ-AR and Open-MAGVIT2 share file names)."""
    names = []
    for name, entry in ZOO.items():
        files = model_files(entry, ckpt_dir)
        if Path(files.gpt_ckpt).is_file() and Path(files.tokenizer.checkpoint).is_file():
            try:
                check_files(entry, files)
            except ValueError:
                continue
            names.append(name)
    return names


def provenance(entry: ZooEntry, run: ModelFiles, sampler: SamplerConfig, ckpt_dir: str | os.PathLike) -> dict:
    """What a sample sidecar records of a zoo run: the entry, its published numbers, and every setting the run
    changed (`overrides`: {dotted key: {"zoo": the entry's value, "used": the run's}})."""
    used = {"gpt_ckpt": run.gpt_ckpt, "gpt_official": run.gpt_official,
            "tokenizer": dataclasses.asdict(run.tokenizer) | {"config": run.tokenizer.config.to_dict()},
            "sampler": dataclasses.asdict(sampler)}
    zoo_fields = json_ready(run_fields(entry, ckpt_dir))
    used = flatten(json_ready(used))
    overrides = {}
    for key, value in zoo_fields.items():
        got = {k[len(key) + 1:]: v for k, v in used.items() if k.startswith(key + ".")} if isinstance(value, dict) \
            else used.get(key)
        if got != (flatten(value) if isinstance(value, dict) else value):
            overrides[key] = {"zoo": value, "used": got}
    return {"name": entry.name, "published": dataclasses.asdict(entry.published), "reference": entry.reference,
            "gpt_file": entry.gpt_file, "tokenizer_file": entry.tokenizer_file, "notes": entry.notes,
            "overrides": overrides}


def sample_run(cfg: SampleRunConfig) -> Path:
    """scripts/sample_c2i_ddp.py: sampling.sampler.run, after a zoo run's files are checked, with the zoo's record
    (published numbers, overrides) in the sidecar."""
    if not cfg.zoo:
        return sample_files.run(cfg)
    entry = get(cfg.zoo)
    check_files(entry, cfg)
    return sample_files.run(cfg, sidecar={"zoo": provenance(entry, cfg, cfg.sampler, cfg.ckpt_dir)})


def comparison(metrics: dict, published: dict, num_samples: int) -> list[str]:
    """Lines of a table: each metric measured here beside the published one (None: not published)."""
    lines = [f"{'metric':<16}{'measured':>12}{'published':>12}",
             f"{'samples':<16}{num_samples:>12}{published['num_samples']:>12}"]
    for m in METRICS:
        have, want = metrics.get(m), published.get(m)
        lines.append(f"{m:<16}{'-' if have is None else f'{have:.4g}':>12}{'-' if want is None else f'{want:g}':>12}")
    lines.append(f"published: {published['source']}")
    if num_samples != published["num_samples"]:
        lines.append(f"measured on {num_samples} samples, published on {published['num_samples']}: FID is biased "
                     f"upwards on fewer samples, so the two are not comparable")
    return lines


def plot_mark(entry: ZooEntry) -> dict:
    """Where a CFG sweep marks the published setting: its scale (the mean of per-group scales), FID and IS."""
    scale = entry.sampler["cfg_scale"]
    x = sum(scale) / len(scale) if isinstance(scale, (list, tuple)) else scale
    label = f"{entry.name} published: cfg {scale}"
    return {"cfg_scale": float(x), "fid": entry.published.fid, "inception_score": entry.published.inception_score,
            "label": label}
