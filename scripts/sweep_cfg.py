"""Sweep classifier-free guidance (and optionally top-k): sample K images per setting, score each, then plot.

    python scripts/sweep_cfg.py out_dir=runs/sweep_gpt_b cfg_scales=[1.5,1.75,2.0,2.25] top_ks=[0,4096] \
        num_samples=10000 sample.gpt_ckpt=runs/gpt_b/export/model.pt sample.tokenizer.checkpoint=mgvq.pt \
        evaluate.reference=data/VIRTUAL_imagenet256_labeled.npz evaluate.inception_weights=weights/...pth

Writes <out_dir>/samples/cfg<scale>_topk<k>.npz (+ .metrics.json), <out_dir>/sweep.csv and <out_dir>/sweep.png.
A rerun skips the settings whose metrics already exist, so an interrupted sweep resumes.
"""
import csv
import dataclasses
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from sampling.metrics import EvalConfig, Evaluator, adm_isc_splits, metrics_path, open_images, write_json

COLUMNS = ["cfg_scale", "top_k", "fid", "inception_score", "inception_score_std", "precision", "recall", "kid",
           "kid_std", "num_samples", "samples"]


@dataclass
class SweepConfig:
    out_dir: str
    cfg_scales: list[float]
    evaluate: EvalConfig  # `samples` and `out` are set per setting
    top_ks: list[int] = field(default_factory=list)  # empty: the sampler's own top_k only
    num_samples: int = 5000  # K images per setting; sample i has label i mod num_classes


def point_name(cfg_scale: float, top_k: int) -> str:
    return f"cfg{cfg_scale:g}_topk{top_k}"


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


def plot(path: Path, rows: list[dict]) -> None:
    """FID and IS against the CFG scale, one line per top-k."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax_fid, ax_is = fig.subplots(1, 2)
    for top_k in sorted({r["top_k"] for r in rows}):
        line = sorted((r for r in rows if r["top_k"] == top_k), key=lambda r: r["cfg_scale"])
        scales = [r["cfg_scale"] for r in line]
        label = "top-k off" if top_k == 0 else f"top-k {top_k}"
        ax_fid.plot(scales, [r.get("fid", float("nan")) for r in line], marker="o", label=label)
        ax_is.plot(scales, [r.get("inception_score", float("nan")) for r in line], marker="o", label=label)
    for ax, name in ((ax_fid, "FID (lower is better)"), (ax_is, "Inception Score")):
        ax.set_xlabel("CFG scale")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    ax_fid.legend()
    n = {r["num_samples"] for r in rows}
    fig.suptitle(f"CFG sweep, {'/'.join(map(str, sorted(n)))} samples per point")
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def is_current(result: dict | None, cfg: SweepConfig, evaluator: Evaluator) -> bool:
    """Whether metrics left by an earlier run were computed the way this sweep would compute them."""
    if result is None:
        return False
    s, e = result["settings"], cfg.evaluate
    return (s["num_samples"] == cfg.num_samples and s["reference"] == str(e.reference)
            and s["isc_splits"] == (e.isc_splits or adm_isc_splits(cfg.num_samples))
            and s["inception_weights_sha256"] == evaluator.weights_sha256
            and all(s[k] == getattr(e, k) for k in ("fid", "isc", "prc", "kid", "prc_neighborhood",
                                                     "kid_subsets", "kid_subset_size", "seed")))


def sweep(cfg: SweepConfig, draw: Callable[[float, int, int, Path], None], default_top_k: int) -> list[dict]:
    """Score every (top_k, cfg_scale): `draw(cfg_scale, top_k, num_samples, path)` writes a samples .npz."""
    out_dir = Path(cfg.out_dir)
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    evaluator = Evaluator(cfg.evaluate)
    rows = []
    for top_k in cfg.top_ks or [default_top_k]:
        for cfg_scale in cfg.cfg_scales:
            samples = out_dir / "samples" / f"{point_name(cfg_scale, top_k)}.npz"
            result_path = metrics_path(samples)
            result = json.loads(result_path.read_text()) if result_path.is_file() else None
            if not is_current(result, cfg, evaluator):
                if not samples.is_file() or len(open_images(samples)) != cfg.num_samples:
                    draw(cfg_scale, top_k, cfg.num_samples, samples)
                result = evaluator.evaluate(samples, cfg.evaluate.reference)
                result["settings"]["out"] = str(result_path)
                write_json(result_path, result)
            rows.append({"cfg_scale": cfg_scale, "top_k": top_k, **result["metrics"],
                         "num_samples": cfg.num_samples, "samples": str(samples)})
            write_csv(out_dir / "sweep.csv", rows)  # partial results are readable while the sweep runs
            plot(out_dir / "sweep.png", rows)
    return rows
