"""Sweep classifier-free guidance (and optionally top-k): sample K images per setting, score each, plot.

    python scripts/sweep_cfg.py gpt_ckpt=runs/gpt_b/export/model.pt tokenizer=mgvq-f16c32-g4 \
        tokenizer.checkpoint=mgvq_f16c32_g4.pt out_dir=runs/sweep_gpt_b cfg_scales=[1.5,1.75,2.0,2.25] \
        top_ks=[0,4096] num_samples=10000 evaluate.reference=data/VIRTUAL_imagenet256_labeled.npz
    accelerate launch scripts/sweep_cfg.py ...   # samples on every process, scores on the main one

Per setting: <out_dir>/points/cfg<scale>_topk<k>/samples.npz (+ samples.json, samples.metrics.json); for the
sweep: <out_dir>/sweep.csv and <out_dir>/sweep.png (FID and IS against the scale, one line per top-k), both
rewritten after every setting. A rerun skips the settings already scored, so an interrupted sweep resumes;
an out_dir swept with other settings is refused. Every key of sampling.sampler.SamplerConfig (see
conf/sample.yaml) and of SweepConfig below can be set as KEY=VALUE; cfg_scale and top_k come from the sweep.
"""
import csv
import dataclasses
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from sampling.metrics import EvalConfig, Evaluator, metrics_path, resolve_inception_weights, write_json
from sampling.sampler import Sampler, SamplerConfig, write_samples
from tokenizer import sha256_file

COLUMNS = ["cfg_scale", "top_k", "fid", "inception_score", "inception_score_std", "precision", "recall", "kid",
           "kid_std", "num_samples", "samples"]


@dataclass(kw_only=True)
class SweepConfig(SamplerConfig):
    out_dir: str
    cfg_scales: list[float]
    evaluate: EvalConfig  # `samples` and `out` are set per setting
    top_ks: list[int] = field(default_factory=list)  # empty: the sampler's top_k only
    num_samples: int = 5000  # K images per setting; sample i has label i mod num_classes and seed (seed, i)
    batch_size: int = 32  # samples per batch and process
    keep_png: bool = False  # keep each setting's PNGs once it is scored (the .npz holds the same pixels)


def point_name(cfg_scale: float, top_k: int) -> str:
    return f"cfg{cfg_scale:g}_topk{top_k}"


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
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
        label = "no top-k" if top_k == 0 else f"top-k {top_k}"
        ax_fid.plot(scales, [r.get("fid", float("nan")) for r in line], marker="o", label=label)
        ax_is.plot(scales, [r.get("inception_score", float("nan")) for r in line], marker="o", label=label)
    for ax, name in ((ax_fid, "FID (lower is better)"), (ax_is, "Inception Score")):
        ax.set_xlabel("CFG scale")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    ax_fid.legend()
    fig.suptitle(f"CFG sweep, {rows[0]['num_samples']} samples per setting")
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def check_identity(path: Path, identity: dict) -> None:
    """Refuse to resume a sweep that was run with other settings (every process checks, so all stop)."""
    if path.is_file():
        old = json.loads(path.read_text())
        differ = sorted(k for k in old.keys() | identity.keys() if old.get(k) != identity.get(k))
        if differ:
            raise ValueError(f"{path.parent} holds a sweep run with other settings ({', '.join(differ)}): "
                             f"use another out_dir or remove it")


def sweep(cfg: SweepConfig, draw: Callable[[float, int, Path], Path], identity: dict,
          accelerator=None) -> list[dict]:
    """Sample (all processes) and score (main process) every (top_k, cfg_scale) not scored yet.

    `draw(cfg_scale, top_k, point_dir)` writes the setting's samples and returns the .npz path; `identity`
    holds everything else the numbers depend on. Returns the rows of sweep.csv (on the main process).
    """
    is_main = accelerator is None or accelerator.is_main_process
    out_dir = Path(cfg.out_dir)
    check_identity(out_dir / "sweep.json", identity)
    if is_main:
        write_json(out_dir / "sweep.json", identity)
    evaluator = None  # built on first use: a resumed, finished sweep loads no Inception
    rows = []
    for top_k in cfg.top_ks or [cfg.top_k]:
        for cfg_scale in cfg.cfg_scales:
            point = out_dir / "points" / point_name(cfg_scale, top_k)
            result_path = metrics_path(point / "samples.npz")
            if not result_path.is_file():  # written last, atomically: present means scored
                samples = draw(cfg_scale, top_k, point)
                if is_main:
                    evaluator = evaluator or Evaluator(cfg.evaluate)
                    result = evaluator.evaluate(samples, cfg.evaluate.reference)
                    result["settings"]["out"] = str(result_path)
                    write_json(result_path, result)
                    if not cfg.keep_png:
                        shutil.rmtree(point / "png", ignore_errors=True)
                if accelerator is not None:
                    accelerator.wait_for_everyone()  # every process sees this setting scored before the next
            if is_main:
                metrics = json.loads(result_path.read_text())["metrics"]
                rows.append({"cfg_scale": cfg_scale, "top_k": top_k, **metrics, "num_samples": cfg.num_samples,
                             "samples": str(point / "samples.npz")})
                write_csv(out_dir / "sweep.csv", rows)  # partial results are readable while the sweep runs
                plot(out_dir / "sweep.png", rows)
    return rows


def run(cfg: SweepConfig) -> list[dict]:
    """The sweep with the sampler `cfg` describes, on every process accelerate gives us."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    base = SamplerConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(SamplerConfig)})
    sampler = Sampler.from_config(base, accelerator.device)

    def draw(cfg_scale: float, top_k: int, point: Path) -> Path:
        sampler.config = dataclasses.replace(base, cfg_scale=cfg_scale, top_k=top_k)
        sampler.config.check()
        return write_samples(sampler, cfg.num_samples, point, cfg.batch_size, accelerator)

    # What the numbers depend on besides (cfg_scale, top_k): the sampler's settings and checkpoints by content,
    # the number of samples, and how they are scored.
    sampling = {k: v for k, v in sampler.settings().items() if k not in ("cfg_scale", "top_k", "compile", "gpt_ckpt")}
    sampling["tokenizer"] = {k: v for k, v in sampling["tokenizer"].items() if k != "checkpoint"}
    scoring = {k: v for k, v in dataclasses.asdict(cfg.evaluate).items()
               if k not in ("samples", "out", "inception_weights", "cache_root", "device", "batch_size",
                            "num_workers", "progress")}
    scoring["inception_weights_sha256"] = sha256_file(resolve_inception_weights(cfg.evaluate.inception_weights))
    identity = {"sampling": sampling, "num_samples": cfg.num_samples, "evaluate": scoring}
    return sweep(cfg, draw, identity, accelerator)


@hydra.main(version_base=None, config_path="../conf", config_name="sweep_cfg")
def main(cfg: DictConfig) -> None:
    # Merge onto the dataclass schema: unknown keys and wrong types fail here, before any work.
    cfg = OmegaConf.merge(OmegaConf.structured(SweepConfig), cfg)
    rows = run(OmegaConf.to_object(cfg))
    for r in rows:
        print(f"cfg_scale {r['cfg_scale']:g} top_k {r['top_k']}: "
              + ", ".join(f"{k} {r[k]:.4g}" for k in ("fid", "inception_score", "precision", "recall") if k in r))


if __name__ == "__main__":
    main()
