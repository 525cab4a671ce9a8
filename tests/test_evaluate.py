"""Evaluation through torch-fidelity: the real extractor with random weights, ADM conventions, clear errors."""
import csv
import dataclasses
import json
import math
import os
import pickle
import subprocess
import sys
import types
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
    SPATIAL,
    EvalConfig,
    Evaluator,
    FolderImages,
    NpzImages,
    Reference,
    _exact_float32_convs,
    adm_stats,
    check_resolution,
    check_sizes,
    check_torch_fidelity,
    compute_metrics,
    finite_metrics,
    inception_score,
    metrics_path,
    npz_shape,
    reference_cache_key,
    resolve_inception_weights,
    run,
    sha256_images,
)
from gpt import GPT, GPTConfig
import sampling.sweep as sweep_module
from sampling.sampler import SamplerConfig, resize_bicubic
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


def _adm_chunk_scores(logits: np.ndarray, bounds: list[tuple[int, int]]) -> list[float]:
    """ADM's evaluator by hand: softmax, then per chunk exp(mean KL(p(y|x) || mean p(y))) (float64 here)."""
    scores = []
    for lo, hi in bounds:
        part = np.exp(logits[lo:hi] - logits[lo:hi].max(1, keepdims=True))
        part /= part.sum(1, keepdims=True)
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(math.exp(np.mean(np.sum(kl, 1))))
    return scores


def test_inception_score_of_12000_samples_is_adm_three_chunks_5000_5000_2000():
    # three populations of different sharpness, in the chunks ADM cuts: IS depends on where the cuts fall
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12000, 1008, generator=g, dtype=torch.float64)
    logits[:5000, :50] += 12 * torch.eye(50, dtype=torch.float64).repeat(100, 1)
    logits[5000:10000, :500] += 4 * torch.eye(500, dtype=torch.float64).repeat(10, 1)
    cfg = EvalConfig(samples="", reference="", fid=False, sfid=False, prc=False)
    got = compute_metrics(cfg, {"2048": torch.zeros(12000, 2048), "logits_unbiased": logits.float()}, None)

    scores = _adm_chunk_scores(logits.float().double().numpy(), [(0, 5000), (5000, 10000), (10000, 12000)])
    assert got["inception_score"] == pytest.approx(np.mean(scores), rel=1e-9)
    assert got["inception_score_std"] == pytest.approx(np.std(scores), rel=1e-9)
    assert min(scores) < 2 < 40 < max(scores)  # the chunks really differ
    equal_halves, _ = _inception_score(logits.float().numpy(), splits=2)  # torch-fidelity's 2 x 6000
    assert abs(equal_halves - got["inception_score"]) > 1

    # where N is a multiple of 5000 the chunks are torch-fidelity's equal, unshuffled splits
    tf = isc_features_to_metric(logits[:10000].float(), splits=2, shuffle=False)
    mean, std = inception_score(logits[:10000].float())
    assert (mean, std) == pytest.approx((tf["inception_score_mean"], tf["inception_score_std"]), rel=1e-12)
    assert inception_score(logits[:7], split_size=3)[0] == pytest.approx(
        np.mean(_adm_chunk_scores(logits[:7].numpy(), [(0, 3), (3, 6), (6, 7)])), rel=1e-12)


def test_sizes_are_checked_before_any_extraction(image_sets, inception_weights, cache_root, monkeypatch):
    cfg = EvalConfig(samples="", reference="", kid=True, kid_subset_size=10)
    check_sizes(cfg, 10, 10)
    with pytest.raises(ValueError, match="kid_subset_size=10 exceeds the 9 reference images"):
        check_sizes(cfg, 10, 9)
    with pytest.raises(ValueError, match="isc_split_size=0"):
        check_sizes(EvalConfig(samples="", reference="", isc_split_size=0), 10, 10)
    with pytest.raises(ValueError, match="sFID need at least 2 samples"):
        check_sizes(EvalConfig(samples="", reference="", fid=False, prc=False), 1, None)
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
    assert gen[SPATIAL].shape == (N, 2023)
    assert m["sfid"] == pytest.approx(_fid(gen[SPATIAL].numpy(), ref[SPATIAL].numpy()), rel=1e-5)
    assert m["sfid"] > 0.1 and m["sfid"] != pytest.approx(m["fid"], rel=0.01)
    mean, std = _inception_score(gen["logits_unbiased"].numpy(), splits=1)
    assert m["inception_score"] == pytest.approx(mean, rel=1e-9, abs=1e-12) and m["inception_score"] > 1
    precision, recall = _precision_recall(gen["2048"].numpy(), ref["2048"].numpy())
    assert (m["precision"], m["recall"]) == (precision, recall)
    assert 0 < m["precision"] < 1  # the near-copies land on the reference manifold, the blocky ones do not
    assert math.isfinite(m["kid"]) and m["kid"] > 0

    assert s["num_samples"] == N and s["num_reference_images"] == N
    assert s["isc_chunks"] == 1 and s["isc_split_size"] == 5000 and s["isc_shuffle"] is False
    assert s["fid_reference"] == s["sfid_reference"] == "reference images" and s["kid_subset_size"] == 6
    assert s["sample_size"] == s["reference_size"] == [32, 32]
    assert s["inception_weights_sha256"] == sha256_file(inception_weights)
    assert s["reference_sha256"] == sha256_file(image_sets["ref"])
    assert s["torch_fidelity"] == torch_fidelity.__version__
    cached = list(cache_root.iterdir())
    assert [c.name for c in cached] == [reference_cache_key(s["reference_sha256"], s["inception_weights_sha256"]) + ".pt"]
    assert torch.equal(torch.load(cached[0], weights_only=True)["pool"], ref["2048"])
    assert torch.equal(torch.load(cached[0], weights_only=True)["spatial"], ref[SPATIAL])


def test_a_set_against_itself_scores_fid_zero_and_full_precision_recall(image_sets, inception_weights,
                                                                        cache_root, tmp_path):
    cfg = _cfg(image_sets, inception_weights, cache_root, samples=str(image_sets["ref"]),
               out=str(tmp_path / "self.json"), sfid=False)  # sFID's eigendecomposition: checked elsewhere
    m = run(cfg)["metrics"]
    assert abs(m["fid"]) < 1e-5
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    assert len(list(cache_root.iterdir())) == 1  # at most one entry: the reference's, however often it is used


@pytest.fixture(scope="module")
def tiny_sampler_files(golden, tmp_path_factory) -> tuple[str, TokenizerRef]:
    """The golden tokenizer and a random 4x4-code GPT on its codebook: 32px samples in a few seconds."""
    tok = torch.load(golden / "tokenizer_tiny_expected.pt", weights_only=True)["config"]
    tokenizer = TokenizerRef(config=MGVQConfig.from_dict(tok), checkpoint=str(golden / "tokenizer_tiny.pt"))
    config = GPTConfig.preset("tiny", grid_size=4, codebook_groups=4, codes_per_group=64, codebook_embed_dim=32,
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
        # FID's and sFID's 2k x 2k eigendecompositions cost seconds per setting and are checked above; here IS, PRC
        evaluate=_cfg(image_sets, inception_weights, cache_root, samples="", fid=False, sfid=False))
    rows = sweep_module.run(cfg)

    with open(tmp_path / "sweep" / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [(float(r["cfg_scale"]), int(r["top_k"])) for r in table] == [(1.0, 16), (4.0, 16)]
    for row, line, scale in zip(rows, table, cfg.cfg_scales):
        saved = json.loads(metrics_path(row["samples"]).read_text())
        assert float(line["inception_score"]) == saved["metrics"]["inception_score"]
        assert float(line["recall"]) == saved["metrics"]["recall"] and line["fid"] == line["sfid"] == ""
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
    # ADM-style reference: images plus stored mu/sigma and mu_s/sigma_s of a *different* population (shifted
    # means), so FID and sFID against the stored statistics differ from those against the images
    ref = features["ref"]["2048"].numpy().astype(np.float64)
    ref_s = features["ref"][SPATIAL].numpy().astype(np.float64)
    mu, mu_s = ref.mean(0) + 0.01, ref_s.mean(0) + 0.01
    np.savez(tmp_path / "adm_ref.npz", arr_0=np.load(image_sets["ref"])["arr_0"], mu=mu,
             sigma=np.cov(ref, rowvar=False), mu_s=mu_s, sigma_s=np.cov(ref_s, rowvar=False))
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
    gen_s = features["samples"][SPATIAL].numpy()
    assert result["metrics"]["sfid"] == pytest.approx(_fid(gen_s, ref_s, mu2=mu_s.astype(np.float32)), rel=1e-5)
    assert result["metrics"]["sfid"] > _fid(gen_s, ref_s) + 0.1
    assert set(result["metrics"]) == {"fid", "sfid"}
    s = result["settings"]
    assert s["fid_reference"] == "stored mu/sigma" and s["sfid_reference"] == "stored mu_s/sigma_s"
    assert s["num_reference_images"] == 0
    assert s["inception_weights"] == str(inception_weights)  # found through $MGVQ_INCEPTION_WEIGHTS
    assert not (tmp_path / "cache").exists()  # the reference images were not even read


def test_sfid_features_are_tf_mixed_6_conv_first_7_channels_in_hwc_order(image_sets, inception_weights, tmp_path):
    """The hook's features equal ADM's slice of TF's mixed_6/conv, computed by hand from Mixed_6d's input:
    the 1x1 conv, the batch norm (eps 1e-3), the ReLU, NHWC [..., :7] flattened per image."""
    ev = Evaluator(_cfg(image_sets, inception_weights, tmp_path, isc=False))
    block_input = []
    ev.extractor.Mixed_6d.register_forward_hook(lambda m, i, o: block_input.append(i[0].double()))
    images = NpzImages(image_sets["samples"])
    feats = ev.features(torch.utils.data.Subset(images, [0, 7, 9]))
    x = block_input[0]  # (3, 768, 17, 17): Mixed_6c's output
    branch = ev.extractor.Mixed_6d.branch1x1
    y = torch.einsum("oc,bchw->bhwo", branch.conv.weight[:, :, 0, 0].double(), x)  # NHWC, as TF lays it out
    bn = branch.bn
    y = (y - bn.running_mean.double()) / torch.sqrt(bn.running_var.double() + 1e-3) * bn.weight.double() + bn.bias.double()
    want = y.clamp(min=0)[..., :7].reshape(3, -1)  # ADM: spatial[..., :7], then reshape([N, -1])
    assert feats[SPATIAL].shape == (3, 17 * 17 * 7) and feats[SPATIAL].dtype == torch.float32
    assert torch.allclose(feats[SPATIAL].double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert (want > 0).float().mean() > 0.2  # not a dead layer: the comparison means something
    assert feats["2048"].shape == (3, 2048) and len(block_input) == 1  # one pass gave both


def test_sfid_uses_stored_mu_s_sigma_s_when_present_else_the_reference_images(tmp_path):
    # 64 features stand in for the 2023 (the formula does not care; a 2023-wide eigendecomposition costs a minute
    # on a busy CPU): the Frechet distance of the spatial features against the reference images' ...
    g = torch.Generator().manual_seed(3)
    gen, real = torch.rand(40, 64, generator=g, dtype=torch.float64), torch.rand(30, 64, generator=g) * 1.2
    pool = torch.rand(40, 2048, generator=g)
    cfg = EvalConfig(samples="", reference="", fid=False, isc=False, prc=False)
    gen = gen.float()
    from_images = compute_metrics(cfg, {"2048": pool, SPATIAL: gen}, Reference({SPATIAL: real}, {}, ""))["sfid"]
    assert from_images == pytest.approx(_fid(gen.numpy(), real.numpy()), rel=1e-5)
    # ... or against stored statistics of another population (shifted mean), which win over the images
    mu_s = real.double().mean(0).numpy() + 0.05
    stats = {"sfid": {"mu": mu_s.astype(np.float32), "sigma": np.cov(real.double().numpy(), rowvar=False)}}
    stored = compute_metrics(cfg, {"2048": pool, SPATIAL: gen}, Reference({SPATIAL: real}, stats, ""))["sfid"]
    assert stored == pytest.approx(_fid(gen.numpy(), real.numpy(), mu2=mu_s.astype(np.float32)), rel=1e-5)
    shift = 64 * 0.05**2 - 2 * 0.05 * (gen.double().mean(0) - real.double().mean(0)).sum().item()  # |d - 0.05|^2
    assert stored == pytest.approx(from_images + shift, rel=1e-5) and abs(shift) > 0.1

    # ADM's reference .npz carries them as mu_s / sigma_s beside mu / sigma and the images
    sigma_s = np.eye(2023) * 0.5
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=np.ones(2048), sigma=np.eye(2048),
             mu_s=np.full(2023, 0.25), sigma_s=sigma_s)
    stats = adm_stats(tmp_path / "ref.npz")
    assert set(stats) == {"fid", "sfid"} and stats["sfid"]["mu"].dtype == np.float32
    assert np.array_equal(stats["sfid"]["mu"], np.full(2023, 0.25)) and np.array_equal(stats["sfid"]["sigma"], sigma_s)
    assert np.array_equal(stats["fid"]["mu"], np.ones(2048))
    np.savez(tmp_path / "bad.npz", mu_s=np.zeros(100), sigma_s=sigma_s)
    with pytest.raises(ValueError, match=r"mu_s/sigma_s must be \(2023,\)"):
        adm_stats(tmp_path / "bad.npz")


def test_a_384px_sample_file_against_a_256px_reference_is_refused_and_passes_at_eval_size_256(
        inception_weights, cache_root, tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "ref256.npz", arr_0=rng.integers(0, 256, (3, 256, 256, 3), dtype=np.uint8))
    drawn = rng.integers(0, 256, (3, 384, 384, 3), dtype=np.uint8)
    np.savez(tmp_path / "s384.npz", arr_0=drawn)
    assert npz_shape(tmp_path / "ref256.npz") == (3, 256, 256, 3)
    # IS only: the size check is what is tested, and IS needs neither the reference's features nor an eigensolver
    cfg = EvalConfig(samples=str(tmp_path / "s384.npz"), reference=str(tmp_path / "ref256.npz"), fid=False,
                     sfid=False, prc=False, inception_weights=str(inception_weights), cache_root=str(cache_root),
                     progress=False)

    def no_extraction(*args, **kwargs):
        raise AssertionError("features extracted before the resolution was checked")

    with monkeypatch.context() as m:
        m.setattr(Evaluator, "features", no_extraction)
        with pytest.raises(ValueError, match="are 384x384 but the reference .* is 256x256.*eval_size=256"):
            run(cfg)
    assert check_resolution(cfg.samples, cfg.reference, allow_mismatch=True) == ((384, 384), (256, 256))

    # what the sampler writes with eval_size=256: the same images resized down (bicubic); smaller ones are kept
    np.savez(tmp_path / "s256.npz", arr_0=resize_bicubic(drawn, 256))
    assert resize_bicubic(drawn[:, :64, :64], 256).shape == (3, 64, 64, 3)
    result = run(dataclasses.replace(cfg, samples=str(tmp_path / "s256.npz")))
    assert result["settings"]["sample_size"] == result["settings"]["reference_size"] == [256, 256]
    assert all(math.isfinite(v) for v in result["metrics"].values())
    assert set(result["metrics"]) == {"inception_score", "inception_score_std"}

    # a reference holding only statistics cannot be checked: said, not silently passed
    np.savez(tmp_path / "stats_only.npz", mu=np.zeros(2048))
    with pytest.warns(UserWarning, match="cannot be checked"):
        assert check_resolution(tmp_path / "s256.npz", tmp_path / "stats_only.npz") == ((256, 256), None)


def test_torch_fidelity_pre_releases_and_old_releases_are_refused():
    for version in ("0.4.0", "0.4.1", "0.10.0", "1.0.0"):
        check_torch_fidelity(version)
    for version in ("0.4.0-beta", "0.3.0", "0.3.0-alpha8", "0.4.0rc1", "0.2.0"):
        with pytest.raises(ImportError, match=f"torch-fidelity {version} .*>= 0.4.0"):
            check_torch_fidelity(version)


def test_exact_float32_convs_falls_back_to_allow_tf32_before_torch_2_9(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "conv", types.SimpleNamespace(), raising=False)  # no fp32_precision
    before = torch.backends.cudnn.allow_tf32
    with _exact_float32_convs():
        assert torch.backends.cudnn.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 == before


def test_sweep_legend_calls_top_k_0_no_top_k_only_without_log2():
    assert sweep_module.top_k_label(0, top_k_log2=False) == "no top-k"
    assert sweep_module.top_k_label(4096, top_k_log2=False) == "top-k 4096"
    assert sweep_module.top_k_label(0, top_k_log2=True) == "top-k 2^0"  # k = 1: greedy, not "no top-k"
    assert sweep_module.top_k_label(12, top_k_log2=True) == "top-k 2^12"


def test_non_finite_reference_statistics_or_metrics_are_refused_and_nothing_is_written(
        image_sets, inception_weights, cache_root, tmp_path):
    """A reference whose stored mu holds a NaN used to write "fid": NaN (not valid JSON) into the metrics file."""
    d = 2048
    mu = np.zeros(d)
    mu[5] = np.nan
    np.savez(tmp_path / "adm_ref.npz", mu=mu, sigma=np.eye(d))
    out = tmp_path / "metrics.json"
    cfg = _cfg(image_sets, inception_weights, cache_root, reference=str(tmp_path / "adm_ref.npz"), sfid=False,
               isc=False, prc=False, out=str(out))
    with pytest.raises(ValueError, match=f"{tmp_path / 'adm_ref.npz'}: mu/sigma hold NaN or infinite values"):
        run(cfg)
    assert not out.exists()
    with pytest.raises(ValueError, match=r"fid=nan scoring the samples s.npz against the reference r.npz"):
        finite_metrics({"fid": float("nan"), "inception_score": 3.0}, "s.npz", "r.npz")
    assert finite_metrics({"fid": 1.5}, "s.npz", "r.npz") == {"fid": 1.5}
