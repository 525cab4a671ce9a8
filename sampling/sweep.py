"""Sweep classifier-free guidance (and optionally top-k): sample K images per setting, score each, plot.

scripts/sweep_cfg.py runs `run(SweepConfig)` (accelerate: samples on every process, scores on the main one).

Per setting: <out_dir>/points/cfg<scale>_topk<k>/samples.npz (+ samples.json, samples.metrics.json); for the
sweep: <out_dir>/sweep.csv and <out_dir>/sweep.png (FID and IS against the scale, one line per top-k), both
rewritten after every setting. A rerun skips the settings already scored, so an interrupted sweep resumes;
an out_dir swept with other settings is refused. The sampler's settings other than cfg_scale and top_k (which
come from the sweep) are `sampler.*` as in conf/sampler/default.yaml.
"""
import csv
import dataclasses
import io
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sampling import zoo
from sampling.metrics import EvalConfig, Evaluator, metrics_path, resolve_inception_weights
from sampling.sampler import ModelFiles, Sampler, SamplerConfig, check_run, write_samples
from tokenizer.common import validate as v
from tokenizer.common.errors import ConfigError
from tokenizer.common.io import atomic_path, read_json, sha256_file, write_json_atomic, write_text_atomic
from tokenizer.common.lock import out_dir_lock
from tokenizer.common.settings import refuse_mismatch

COLUMNS = ["cfg_scale", "top_k", "fid", "sfid", "inception_score", "inception_score_std", "precision", "recall", "kid",
           "kid_std", "num_samples", "samples"]


@dataclass(kw_only=True)
class SweepConfig(ModelFiles):
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # cfg_scale and top_k are set per setting
    out_dir: str
    cfg_scales: list[float]
    evaluate: EvalConfig  # `samples` and `out` are set per setting
    top_ks: list[int] = field(default_factory=list)  # empty: the sampler's top_k only
    num_samples: int = 5000  # K images per setting; sample i has label i mod num_classes and seed (seed, i)
    batch_size: int = 32  # samples per batch and process
    keep_png: bool = False  # keep each setting's PNGs once it is scored (the .npz holds the same pixels)

    def check(self) -> None:
        """Every setting, before anything is loaded or written (the swept values as the sampler's own)."""
        check_run(self)
        if not self.cfg_scales:
            raise ConfigError("cfg_scales=[]: give at least one guidance scale")
        for i, scale in enumerate(self.cfg_scales):
            v.number(scale, f"cfg_scales[{i}]", low=1)
        for i, k in enumerate(self.top_ks):
            v.integer(k, f"top_ks[{i}]", low=0)
        v.non_empty(self.evaluate.reference, "evaluate.reference")


def point_name(cfg_scale: float, top_k: int) -> str:
    return f"cfg{cfg_scale:g}_topk{top_k}"


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def top_k_label(top_k: int, top_k_log2: bool) -> str:
    """The legend of a top-k line: 0 is "no top-k" only where it is k itself (MGVQ's exponent 0 is k = 1)."""
    if top_k_log2:
        return f"top-k 2^{top_k}"
    return "no top-k" if top_k == 0 else f"top-k {top_k}"


def plot(path: Path, rows: list[dict], top_k_log2: bool = False, mark: dict | None = None) -> None:
    """FID and IS against the CFG scale, one line per top-k (figure()), written to `path`."""
    with atomic_path(path) as tmp:
        figure(rows, top_k_log2, mark).savefig(tmp, dpi=120, format="png")


def figure(rows: list[dict], top_k_log2: bool = False, mark: dict | None = None):
    """FID and IS against the CFG scale, one line per top-k; `mark` (sampling.zoo.plot_mark): the published setting,
    a dotted line at its scale and a star at its published FID / IS."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax_fid, ax_is = fig.subplots(1, 2)
    for top_k in sorted({r["top_k"] for r in rows}):
        line = sorted((r for r in rows if r["top_k"] == top_k), key=lambda r: r["cfg_scale"])
        scales = [r["cfg_scale"] for r in line]
        label = top_k_label(top_k, top_k_log2)
        ax_fid.plot(scales, [r.get("fid", float("nan")) for r in line], marker="o", label=label)
        ax_is.plot(scales, [r.get("inception_score", float("nan")) for r in line], marker="o", label=label)
    if mark is not None:
        for ax, key in ((ax_fid, "fid"), (ax_is, "inception_score")):
            ax.axvline(mark["cfg_scale"], color="gray", linestyle=":", label=mark["label"])
            if mark.get(key) is not None:
                ax.plot([mark["cfg_scale"]], [mark[key]], marker="*", markersize=14, color="crimson", linestyle="",
                        label=f"published {key.replace('_', ' ')} (50k samples)")
        ax_is.legend(fontsize="small")
    for ax, name in ((ax_fid, "FID (lower is better)"), (ax_is, "Inception Score")):
        ax.set_xlabel("CFG scale")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    ax_fid.legend()
    fig.suptitle(f"CFG sweep, {rows[0]['num_samples']} samples per setting")
    return fig


def sweep(cfg: SweepConfig, draw: Callable[[float, int, Path], Path], identity: dict,
          accelerator=None, mark: dict | None = None) -> list[dict]:
    """Sample (all processes) and score (main process) every (top_k, cfg_scale) not scored yet.

    `draw(cfg_scale, top_k, point_dir)` writes the setting's samples and returns the .npz path; `identity`
    holds everything else the numbers depend on. Returns the rows of sweep.csv (on the main process).
    """
    is_main = accelerator is None or accelerator.is_main_process
    out_dir = Path(cfg.out_dir)
    if (out_dir / "sweep.json").is_file():  # every process checks, so a refusal stops all of them
        refuse_mismatch(read_json(out_dir / "sweep.json"), identity, f"the sweep in {out_dir}",
                        "use another out_dir or remove it")
    if is_main:
        write_json_atomic(out_dir / "sweep.json", identity)
    evaluator = None  # built on first use: a resumed, finished sweep loads no Inception
    rows = []
    for top_k in cfg.top_ks or [cfg.sampler.top_k]:
        for cfg_scale in cfg.cfg_scales:
            point = out_dir / "points" / point_name(cfg_scale, top_k)
            result_path = metrics_path(point / "samples.npz")
            if not result_path.is_file():  # written last, atomically: present means scored
                samples = draw(cfg_scale, top_k, point)
                if is_main:
                    evaluator = evaluator or Evaluator(cfg.evaluate)
                    result = evaluator.evaluate(samples, cfg.evaluate.reference)
                    result["settings"]["out"] = str(result_path)
                    write_json_atomic(result_path, result)
                    if not cfg.keep_png:
                        shutil.rmtree(point / "png", ignore_errors=True)
                if accelerator is not None:
                    accelerator.wait_for_everyone()  # every process sees this setting scored before the next
            if is_main:
                metrics = read_json(result_path)["metrics"]
                rows.append({"cfg_scale": cfg_scale, "top_k": top_k, **metrics, "num_samples": cfg.num_samples,
                             "samples": str(point / "samples.npz")})
                write_csv(out_dir / "sweep.csv", rows)  # partial results are readable while the sweep runs
                plot(out_dir / "sweep.png", rows, cfg.sampler.top_k_log2, mark)
    return rows


def run(cfg: SweepConfig) -> list[dict]:
    """The sweep with the sampler `cfg` describes, on every process accelerate gives us."""
    from accelerate import Accelerator  # heavy: only the script entry point needs it

    cfg.check()
    entry = zoo.get(cfg.zoo) if cfg.zoo else None
    if entry is not None:
        zoo.check_files(entry, cfg)  # before anything is sampled
    accelerator = Accelerator()
    with out_dir_lock(cfg.out_dir, accelerator):
        return sweep(cfg, *sweep_inputs(cfg, accelerator), accelerator,
                     zoo.plot_mark(entry) if entry is not None else None)


def sweep_inputs(cfg: SweepConfig, accelerator) -> tuple[Callable[[float, int, Path], Path], dict]:
    """`sweep`'s draw function (a Sampler of `cfg`'s models) and identity."""
    sampler = Sampler.from_files(cfg, cfg.sampler, accelerator.device)

    def draw(cfg_scale: float, top_k: int, point: Path) -> Path:
        sampler.config = dataclasses.replace(cfg.sampler, cfg_scale=cfg_scale, top_k=top_k)
        sampler.config.check()
        return write_samples(sampler, cfg.num_samples, point, cfg.batch_size, accelerator)

    # What the numbers depend on besides (cfg_scale, top_k): the sampler's settings and checkpoints by content,
    # the number of samples, and how they are scored.
    sampling = sampler.identity()
    for swept in ("cfg_scale", "top_k"):
        sampling["sampler"].pop(swept)
    scoring = {k: v for k, v in dataclasses.asdict(cfg.evaluate).items()
               if k not in ("samples", "out", "inception_weights", "cache_root", "device", "batch_size",
                            "num_workers", "progress")}
    scoring["inception_weights_sha256"] = sha256_file(resolve_inception_weights(cfg.evaluate.inception_weights))
    return draw, {"sampling": sampling, "num_samples": cfg.num_samples, "evaluate": scoring}


def report(rows: list[dict]) -> None:
    for r in rows:
        print(f"cfg_scale {r['cfg_scale']:g} top_k {r['top_k']}: "
              + ", ".join(f"{k} {r[k]:.4g}" for k in ("fid", "sfid", "inception_score", "precision", "recall")
                          if k in r))
