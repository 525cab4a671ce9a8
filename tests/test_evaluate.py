"""Evaluation through torch-fidelity: the real extractor with random weights, ADM conventions, clear errors."""
import csv
import dataclasses
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
from accelerate.state import AcceleratorState
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_isc import isc_features_to_metric

from sampling.metrics import (
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_FILE,
    EvalConfig,
    Evaluator,
    FolderImages,
    NpzImages,
    adm_isc_splits,
    check_sizes,
    compute_metrics,
    metrics_path,
    reference_cache_key,
    resolve_inception_weights,
    run,
    sha256_images,
)
from gpt import GPT, GPTConfig
import sampling.sweep as sweep_module
from sampling.sampler import SamplerConfig
from tokenizer import MGVQConfig, TokenizerRef
from tokenizer.common.io import sha256_file

N = 12  # images per set: Inception runs at a few images per second on a shared CPU


class _Unloaded(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception with its freshly initialised parameters (loads nothing)."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """A weights file with the real keys and shapes and random values: it runs the whole torch-fidelity path."""
    root = tmp_path_factory.mktemp("inception")
    torch.save({}, root / "empty.pth")
    shapes = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(root / "empty.pth"))
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, v in shapes.state_dict().items():
        if v.dtype == torch.long:  # num_batches_tracked
            state[key] = v
        elif v.ndim == 4:  # He init keeps activations O(1) through the 90-odd layers
            state[key] = torch.randn(v.shape, generator=g) * math.sqrt(2 / v[0].numel())
        elif key.endswith(("running_var", "bn.weight")):
            state[key] = torch.ones_like(v)
        elif key == "fc.weight":  # large enough that the logits differ between images
            state[key] = torch.randn(v.shape, generator=g) * 0.3
        else:
            state[key] = 0.1 * torch.randn(v.shape, generator=g)
    path = root / INCEPTION_WEIGHTS_FILE
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory) -> dict[str, Path]:
    """Reference: noise images. Samples: half near-copies of reference images, half blocky noise."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)
    near = np.clip(ref[: N // 2].astype(int) + rng.integers(-8, 9, ref[: N // 2].shape), 0, 255)
    blocky = rng.integers(0, 256, (N - N // 2, 8, 8, 3)).repeat(4, axis=1).repeat(4, axis=2)
    samples = np.concatenate([near, blocky]).astype(np.uint8)
    np.savez(root / "ref.npz", arr_0=ref)
    np.savez(root / "samples.npz", arr_0=samples, labels=np.arange(N) % 10)
    return {"ref": root / "ref.npz", "samples": root / "samples.npz"}


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fidelity_cache")


def _cfg(image_sets, weights, cache_root, **overrides) -> EvalConfig:
    settings = {"samples": str(image_sets["samples"]), "reference": str(image_sets["ref"]),
                "inception_weights": str(weights), "cache_root": str(cache_root), "batch_size": 8,
                "progress": False}
    return EvalConfig(**(settings | overrides))


@pytest.fixture(scope="module")
def features(image_sets, inception_weights, tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """Features of both sets, extracted once, for the hand-written formulas to check the pipeline against."""
    ev = Evaluator(_cfg(image_sets, inception_weights, tmp_path_factory.mktemp("unused")))
    return {name: ev.features(NpzImages(image_sets[name])) for name in ("ref", "samples")}


def _fid(x1: np.ndarray, x2: np.ndarray, mu2: np.ndarray | None = None) -> float:
    """FID of two feature sets, through the low-rank form: tr sqrt(S1 S2) = sum of singular values of A1 A2^T."""
    x1, x2 = x1.astype(np.float64), x2.astype(np.float64)
    a1 = (x1 - x1.mean(0)) / math.sqrt(len(x1) - 1)  # S1 = a1^T a1
    a2 = (x2 - x2.mean(0)) / math.sqrt(len(x2) - 1)
    diff = x1.mean(0) - (x2.mean(0) if mu2 is None else mu2)
    return float(diff @ diff + (a1**2).sum() + (a2**2).sum() - 2 * np.linalg.svd(a1 @ a2.T, compute_uv=False).sum())


def _inception_score(logits: np.ndarray, splits: int) -> tuple[float, float]:
    scores = []
    for part in np.array_split(logits.astype(np.float64), splits):
        p = np.exp(part - part.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        kl = (p * (np.log(p) - np.log(p.mean(0, keepdims=True)))).sum(1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _precision_recall(gen: np.ndarray, real: np.ndarray, k: int = 3) -> tuple[float, float]:
    def dist(a, b):
        return np.sqrt(((a[:, None].astype(np.float64) - b[None].astype(np.float64)) ** 2).sum(-1))

    radius_real = np.sort(dist(real, real), 1)[:, k]  # k-th neighbour, index 0 being the point itself
    radius_gen = np.sort(dist(gen, gen), 1)[:, k]
    precision = (dist(gen, real) <= radius_real[None]).any(1).mean()
    recall = (dist(real, gen) <= radius_gen[None]).any(1).mean()
    return float(precision), float(recall)


def test_missing_weights_fail_at_once_naming_the_file(image_sets, tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cfg = EvalConfig(samples=str(image_sets["samples"]), reference=str(image_sets["ref"]), progress=False)
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILE) as err:
        run(cfg)
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in str(err.value)  # where to put it
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        run(EvalConfig(samples=cfg.samples, reference=cfg.reference, inception_weights=str(missing)))
    assert not metrics_path(image_sets["samples"]).exists()


def test_weights_are_found_by_config_then_env_then_torch_hub(inception_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    hub_copy = tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    hub_copy.parent.mkdir(parents=True)
    hub_copy.write_bytes(b"stand-in")
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    assert resolve_inception_weights(None) == hub_copy
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(inception_weights))
    assert resolve_inception_weights(None) == inception_weights
    assert resolve_inception_weights(str(hub_copy)) == hub_copy


def test_npz_images_are_memory_mapped_and_folders_read_in_order(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", arr_0=images, labels=np.arange(5))
    np.savez_compressed(tmp_path / "packed.npz", arr_0=images)

    plain = NpzImages(tmp_path / "plain.npz")
    assert isinstance(plain._array, np.memmap) and len(plain) == 5
    assert torch.equal(plain[3], torch.from_numpy(images[3]).permute(2, 0, 1))  # (3, H, W) uint8
    assert torch.equal(pickle.loads(pickle.dumps(plain))[4], plain[4])  # what a DataLoader worker gets
    with pytest.warns(UserWarning, match="compressed"):
        packed = NpzImages(tmp_path / "packed.npz")
    assert torch.equal(packed[2], plain[2])
    np.savez(tmp_path / "gray.npz", arr_0=images[..., 0])
    with pytest.raises(ValueError, match="uint8 \\(N,H,W,3\\)"):
        NpzImages(tmp_path / "gray.npz")

    for i, name in enumerate(["b/0.png", "a/1.png", "a/0.png"]):
        (tmp_path / "folder" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(tmp_path / "folder" / name)
    folder = FolderImages(tmp_path / "folder")
    assert [f.relative_to(tmp_path / "folder").as_posix() for f in folder.files] == ["a/0.png", "a/1.png", "b/0.png"]
    assert torch.equal(folder[0], plain[2]) and torch.equal(folder[2], plain[0])
    Image.fromarray(images[0, :5]).save(tmp_path / "folder" / "b" / "1.png")
    with pytest.raises(ValueError, match="1.png is 7x5"):
        FolderImages(tmp_path / "folder")[3]


def test_cache_key_changes_with_the_reference_and_the_weights(tmp_path, image_sets, inception_weights):
    ref = np.load(image_sets["ref"])["arr_0"].copy()
    weights_sha = sha256_file(inception_weights)
    key = reference_cache_key(sha256_images(image_sets["ref"]), weights_sha)
    assert key == reference_cache_key(sha256_images(image_sets["ref"]), weights_sha)
    ref[5, 1, 2, 0] ^= 1  # one bit of one pixel
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    assert reference_cache_key(sha256_images(tmp_path / "ref.npz"), weights_sha) != key
    other_weights = tmp_path / "w.pth"
    data = bytearray(inception_weights.read_bytes())
    data[len(data) // 2] ^= 1
    other_weights.write_bytes(bytes(data))
    assert reference_cache_key(sha256_images(image_sets["ref"]), sha256_file(other_weights)) != key

    (tmp_path / "folder").mkdir()
    for i in range(2):
        Image.fromarray(ref[i]).save(tmp_path / "folder" / f"{i}.png")
    folder_sha = sha256_images(tmp_path / "folder")
    (tmp_path / "folder" / "1.png").rename(tmp_path / "folder" / "2.png")
    assert sha256_images(tmp_path / "folder") != folder_sha


def test_inception_score_uses_adm_contiguous_unshuffled_splits():
    assert [adm_isc_splits(n) for n in (1, 4999, 5000, 12000, 50000)] == [1, 1, 1, 2, 10]
    # 10k samples = 2 splits of 5000: confident logits first, flat ones after, as class-ordered samples are
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10000, 1008, generator=g)
    logits[:5000, :50] += 12 * torch.eye(50).repeat(100, 1)
    cfg = EvalConfig(samples="", reference="", fid=False, prc=False)
    got = compute_metrics(cfg, {"2048": torch.zeros(10000, 2048), "logits_unbiased": logits}, None)
    mean, std = _inception_score(logits.numpy(), splits=2)
    assert got["inception_score"] == pytest.approx(mean, rel=1e-9) and mean > 5
    assert got["inception_score_std"] == pytest.approx(std, rel=1e-9) and std > 1
    shuffled = isc_features_to_metric(logits, splits=2, shuffle=True)  # torch-fidelity's default
    assert shuffled["inception_score_std"] < 0.1 * std


def test_sizes_are_checked_before_any_extraction(image_sets, inception_weights, cache_root, monkeypatch):
    cfg = EvalConfig(samples="", reference="", kid=True, kid_subset_size=10)
    check_sizes(cfg, 10, 10)
    with pytest.raises(ValueError, match="kid_subset_size=10 exceeds the 9 reference images"):
        check_sizes(cfg, 10, 9)
    with pytest.raises(ValueError, match="isc_splits=11 exceeds the 10 samples"):
        check_sizes(EvalConfig(samples="", reference="", isc_splits=11), 10, 10)
    with pytest.raises(ValueError, match="more than 3 samples, got 3"):
        check_sizes(EvalConfig(samples="", reference=""), 3, 10)

    def no_extraction(*args, **kwargs):
        raise AssertionError("features extracted before the sizes were checked")

    monkeypatch.setattr(Evaluator, "features", no_extraction)
    with pytest.raises(ValueError, match=f"kid_subset_size={N + 1} exceeds the {N} samples"):
        run(_cfg(image_sets, inception_weights, cache_root, kid=True, kid_subset_size=N + 1))


def test_evaluate_end_to_end(image_sets, inception_weights, cache_root, features):
    cfg = _cfg(image_sets, inception_weights, cache_root, kid=True, kid_subset_size=6, kid_subsets=4)
    result = run(cfg)
    assert json.loads(metrics_path(image_sets["samples"]).read_text()) == result
    m, s = result["metrics"], result["settings"]
    gen, ref = features["samples"], features["ref"]

    assert m["fid"] == pytest.approx(_fid(gen["2048"].numpy(), ref["2048"].numpy()), rel=1e-5)
    assert m["fid"] > 0.1
    mean, std = _inception_score(gen["logits_unbiased"].numpy(), splits=1)
    assert m["inception_score"] == pytest.approx(mean, rel=1e-9, abs=1e-12) and m["inception_score"] > 1
    precision, recall = _precision_recall(gen["2048"].numpy(), ref["2048"].numpy())
    assert (m["precision"], m["recall"]) == (precision, recall)
    assert 0 < m["precision"] < 1  # the near-copies land on the reference manifold, the blocky ones do not
    assert math.isfinite(m["kid"]) and m["kid"] > 0

    assert s["num_samples"] == N and s["num_reference_images"] == N
    assert s["isc_splits"] == 1 and s["isc_shuffle"] is False
    assert s["fid_reference"] == "reference images" and s["kid_subset_size"] == 6
    assert s["inception_weights_sha256"] == sha256_file(inception_weights)
    assert s["reference_sha256"] == sha256_file(image_sets["ref"])
    assert s["torch_fidelity"] == torch_fidelity.__version__
    cached = list(cache_root.iterdir())
    assert [c.name for c in cached] == [reference_cache_key(s["reference_sha256"], s["inception_weights_sha256"]) + ".pt"]
    assert torch.equal(torch.load(cached[0], weights_only=True)["pool"], ref["2048"])


def test_a_set_against_itself_scores_fid_zero_and_full_precision_recall(image_sets, inception_weights,
                                                                        cache_root, tmp_path):
    cfg = _cfg(image_sets, inception_weights, cache_root, samples=str(image_sets["ref"]),
               out=str(tmp_path / "self.json"))
    m = run(cfg)["metrics"]
    assert abs(m["fid"]) < 1e-5
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    assert len(list(cache_root.iterdir())) == 1  # at most one entry: the reference's, however often it is used


@pytest.fixture(scope="module")
def tiny_sampler_files(golden, tmp_path_factory) -> tuple[str, TokenizerRef]:
    """The golden tokenizer and a random 4x4-code GPT on its codebook: 32px samples in a few seconds."""
    tok = torch.load(golden / "tokenizer_tiny_expected.pt", weights_only=True)["config"]
    tokenizer = TokenizerRef(config=MGVQConfig.from_dict(tok), checkpoint=str(golden / "tokenizer_tiny.pt"))
    config = GPTConfig.preset("tiny", grid_size=4, codebook_groups=4, codebook_size=64, codebook_embed_dim=32,
                              num_classes=10, head="parallel")
    gpt = GPT(config, codebook=tokenizer.load().codebook())
    with torch.no_grad():  # LlamaGen's init zeroes the output head: uniform logits that no guidance changes
        for p in gpt.parameters():
            p.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("gpt") / "model.pt"
    torch.save({"model": gpt.state_dict(), "config": config.to_dict()}, path)
    return str(path), tokenizer


def test_sweep_samples_scores_plots_and_resumes(tiny_sampler_files, image_sets, inception_weights,
                                                cache_root, tmp_path, monkeypatch, fresh_accelerate_state):
    gpt_ckpt, tokenizer = tiny_sampler_files
    cfg = sweep_module.SweepConfig(
        gpt_ckpt=gpt_ckpt, tokenizer=tokenizer, sampler=SamplerConfig(seed=5), out_dir=str(tmp_path / "sweep"), cfg_scales=[1.0, 4.0],
        top_ks=[16], num_samples=N, batch_size=N,
        # FID's 2048x2048 eigendecomposition costs seconds per setting and is checked above; here IS, PRC
        evaluate=_cfg(image_sets, inception_weights, cache_root, samples="", fid=False))
    rows = sweep_module.run(cfg)

    with open(tmp_path / "sweep" / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [(float(r["cfg_scale"]), int(r["top_k"])) for r in table] == [(1.0, 16), (4.0, 16)]
    for row, line, scale in zip(rows, table, cfg.cfg_scales):
        saved = json.loads(metrics_path(row["samples"]).read_text())
        assert float(line["inception_score"]) == saved["metrics"]["inception_score"]
        assert float(line["recall"]) == saved["metrics"]["recall"] and line["fid"] == ""
        assert (saved["sampling"]["sampler"]["cfg_scale"], saved["sampling"]["sampler"]["top_k"]) == (scale, 16)
        assert saved["settings"]["num_samples"] == N and math.isfinite(saved["metrics"]["inception_score"])
        data = np.load(row["samples"])
        assert data["arr_0"].shape == (N, 32, 32, 3) and data["labels"].tolist() == [i % 10 for i in range(N)]
        assert not (Path(row["samples"]).parent / "png").exists()  # keep_png=false
    assert rows[0]["inception_score"] != rows[1]["inception_score"]  # the guidance scale reached the sampler
    with Image.open(tmp_path / "sweep" / "sweep.png") as im:
        assert im.format == "PNG" and im.size[0] > 500

    def unexpected(*args, **kwargs):
        raise AssertionError("a finished setting was sampled or scored again")

    AcceleratorState._reset_state(True)
    monkeypatch.setattr(sweep_module, "write_samples", unexpected)
    monkeypatch.setattr(Evaluator, "evaluate", unexpected)
    assert sweep_module.run(cfg) == rows
    AcceleratorState._reset_state(True)
    with pytest.raises(ValueError, match="sampling.sampler.temperature: 1.0 on disk, 0.9 now"):
        sweep_module.run(dataclasses.replace(cfg, sampler=SamplerConfig(seed=5, temperature=0.9)))


def test_evaluate_script_scores_fid_against_stored_adm_statistics(repo, image_sets, inception_weights, features,
                                                                  tmp_path):
    # ADM-style reference: images plus stored mu/sigma of a *different* population (shifted mean), so FID
    # against the stored statistics differs from FID against the images
    ref = features["ref"]["2048"].numpy().astype(np.float64)
    mu = ref.mean(0) + 0.01
    np.savez(tmp_path / "adm_ref.npz", arr_0=np.load(image_sets["ref"])["arr_0"], mu=mu,
             sigma=np.cov(ref, rowvar=False))
    out = tmp_path / "metrics.json"
    proc = subprocess.run(
        [sys.executable, str(repo / "scripts" / "evaluate.py"), f"samples={image_sets['samples']}",
         f"reference={tmp_path / 'adm_ref.npz'}", "isc=false", "prc=false", f"out={out}", "progress=false",
         "batch_size=12", f"cache_root={tmp_path / 'cache'}"],
        env=os.environ | {"MGVQ_INCEPTION_WEIGHTS": str(inception_weights), "OMP_NUM_THREADS": "1"},
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    want = _fid(features["samples"]["2048"].numpy(), ref, mu2=mu.astype(np.float32))
    assert result["metrics"]["fid"] == pytest.approx(want, rel=1e-5)
    assert want > _fid(features["samples"]["2048"].numpy(), ref) + 0.1
    assert set(result["metrics"]) == {"fid"}
    s = result["settings"]
    assert s["fid_reference"] == "stored mu/sigma" and s["num_reference_images"] == 0
    assert s["inception_weights"] == str(inception_weights)  # found through $MGVQ_INCEPTION_WEIGHTS
    assert not (tmp_path / "cache").exists()  # the reference images were not even read
