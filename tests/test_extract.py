"""Code extraction: golden codes, 1 vs 2 processes, kill and resume, refusal of mismatched reruns, bad images."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image
from torchvision import transforms

from tokenizer import MGVQConfig, TokenizerRef
from tokenizer.data import center_crop_arr, image_views, list_images
from tokenizer.extract import BadImageError, ExtractConfig, ExtractDataConfig, extract
from tokenizer.store import CodeStore, StoreMismatchError, StoreWriter

STORE_FILES = ["codes.npy", "labels.npy", "meta.json"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def tiny(golden) -> dict:
    return torch.load(golden / "tokenizer_tiny_expected.pt", weights_only=True)["config"]


@pytest.fixture(scope="module")
def expected(golden) -> dict:
    return torch.load(golden / "e2e" / "extract_expected.pt", weights_only=True)


def config(golden: Path, tiny: dict, out_dir: Path, root: Path | None = None, checkpoint: Path | None = None,
           batch_size: int = 4, **data) -> ExtractConfig:
    tokenizer = TokenizerRef(config=MGVQConfig.from_dict(tiny), checkpoint=str(checkpoint or golden / "tokenizer_tiny.pt"))
    data = ExtractDataConfig(root=str(root or golden / "e2e" / "images"), **{"image_size": 64, "views": "flip", **data})
    return ExtractConfig(data=data, tokenizer=tokenizer, out_dir=str(out_dir), batch_size=batch_size, num_workers=0)


def store_bytes(directory: Path) -> dict[str, bytes]:
    assert sorted(os.listdir(directory)) == STORE_FILES  # no progress files left behind
    return {name: (directory / name).read_bytes() for name in STORE_FILES}


def assert_golden_codes(store: CodeStore, expected: dict) -> None:
    codes, want = torch.from_numpy(store.codes.astype(np.int64)), expected["codes"]
    sure = expected["margins"] > 1e-4  # below this, float noise may pick the other code
    assert codes.shape == want.shape
    assert torch.equal(codes[sure], want[sure])
    assert torch.equal(torch.from_numpy(store.labels), expected["labels"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory, golden, tiny) -> Path:
    """An uninterrupted single-process run of the golden e2e images (flip views, batch 4)."""
    AcceleratorState._reset_state(True)
    out = tmp_path_factory.mktemp("straight") / "codes"
    extract(config(golden, tiny, out))
    return out


def test_listing_and_views_follow_imagefolder_and_llamagen(golden, expected):
    files, labels, classes = list_images(golden / "e2e" / "images")
    assert ["images/" + f for f in files] == expected["files"]
    assert labels == expected["labels"].tolist() and classes == ["n01440764", "n01443537"]

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (150, 230, 3), dtype=np.uint8))
    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
    # LlamaGen's ten-crop: ADM crop to int(32 * 1.1) = 35, then torchvision TenCrop(32).
    tl, tr, bl, br, center, *mirrored = [to_tensor(c) for c in transforms.TenCrop(32)(center_crop_arr(image, 35))]
    plain = to_tensor(center_crop_arr(image, 32))
    x = image_views(image, 32, "tencrop")  # [C, TL, TR, BL, BR, flips of those]
    assert x.shape == (10, 3, 32, 32)
    for got, want in zip(x, [plain, tl, tr, bl, br, plain.flip(-1)]):
        assert torch.equal(got, want)
    assert torch.equal(x[6], mirrored[1]) and torch.equal(x[7], mirrored[0])  # flip(TL) is TR of the mirror
    y = image_views(image, 32, "tencrop_flip")
    assert y.shape == (20, 3, 32, 32) and torch.equal(y[:5], x[:5]) and torch.equal(y[5], center)
    assert torch.equal(y[10:], y[:10].flip(-1))
    assert torch.equal(image_views(image, 32, "flip"), torch.stack([plain, plain.flip(-1)]))
    # ADM crop of a 128x64 (w x h) image to 32: one BOX halving (2x2 means) to 64x32, no resize, middle columns.
    a = rng.integers(0, 256, (64, 128, 3)).astype(np.float64)
    halved = (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]) / 4  # (32, 64, 3)
    got = np.asarray(center_crop_arr(Image.fromarray(a.astype(np.uint8)), 32), dtype=np.float64)
    assert got.shape == (32, 32, 3) and np.abs(got - halved[:, 16:48]).max() <= 1  # PIL rounds in fixed point


def test_extraction_reproduces_the_official_codes(straight, expected, tiny):
    store = CodeStore(straight)
    assert_golden_codes(store, expected)
    m = store.meta
    assert (m["num_images"], m["num_views"], m["grid"], m["groups"], m["codes_per_group"]) == (6, 2, [8, 8], 4, 64)
    assert m["class_names"] == ["n01440764", "n01443537"] and m["num_classes"] == 2 and m["bad_files"] == []
    assert m["tokenizer"]["encoder"]["width_list"] == tiny["encoder"]["width_list"]


def test_batch_size_does_not_change_the_store(straight, tmp_path, golden, tiny):
    extract(config(golden, tiny, tmp_path / "codes", batch_size=1))
    assert store_bytes(tmp_path / "codes") == store_bytes(straight)
    assert CodeStore(tmp_path / "codes").fingerprint == CodeStore(straight).fingerprint


def test_kill_and_resume_gives_the_same_bytes(straight, tmp_path, golden, tiny, monkeypatch):
    out = tmp_path / "codes"
    calls = []

    def die_on_second_batch(self, indices):  # codes of batch 2 are written, its done bits never are
        calls.append(indices)
        if len(calls) == 2:
            raise KeyboardInterrupt
        self.done[indices] = 1
        self.done.flush()

    monkeypatch.setattr(StoreWriter, "_mark_done", die_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        extract(config(golden, tiny, out, batch_size=2))
    monkeypatch.undo()
    done = np.load(out / "done.npy")
    assert done.tolist() == [1, 1, 0, 0, 0, 0] and not (out / "meta.json").exists()
    with pytest.raises(ValueError, match="incomplete"):
        CodeStore(out)
    codes = np.load(out / "codes.npy", mmap_mode="r+")
    codes[2:] = 65535  # whatever a crash left in the unfinished images must be overwritten
    codes.flush()
    del codes

    AcceleratorState._reset_state(True)
    extract(config(golden, tiny, out, batch_size=3))  # the same command, resumed (batch size is not part of it)
    assert store_bytes(out) == store_bytes(straight)


@pytest.mark.parametrize("change", ["image_size", "views", "tokenizer", "files", "groups"])
def test_a_mismatched_rerun_is_refused(straight, tmp_path, golden, tiny, change):
    out = tmp_path / "codes"
    shutil.copytree(straight, out)
    before = store_bytes(out)
    kwargs, asked = {}, tiny
    if change == "image_size":
        kwargs, expect = {"image_size": 32}, "image_size: 64 on disk, 32 now"
    elif change == "views":
        kwargs, expect = {"views": "tencrop"}, "views: 'flip' on disk, 'tencrop' now"
    elif change == "tokenizer":
        other = tmp_path / "other.pt"
        state = torch.load(golden / "tokenizer_tiny.pt", weights_only=True)
        next(v for v in state["model"].values() if v.is_floating_point()).add_(1.0)
        torch.save(state, other)
        kwargs, expect = {"checkpoint": other}, "tokenizer_sha256"
    elif change == "files":
        root = tmp_path / "images"
        shutil.copytree(golden / "e2e" / "images", root)
        (root / "n01443537" / "img_2.png").unlink()
        kwargs, expect = {"root": root}, "files_fingerprint"
    else:
        asked = dict(tiny, codebook_groups=2)
        expect = "tokenizer.codebook_groups: 4 on disk, 2 now"
    with pytest.raises(StoreMismatchError, match=expect):
        extract(config(golden, asked, out, **kwargs))
    assert store_bytes(out) == before
    # A rerun of the same command is not a mismatch: the store is complete and stays as it is.
    AcceleratorState._reset_state(True)
    extract(config(golden, tiny, out))
    assert store_bytes(out) == before


def test_unreadable_image_stops_or_is_skipped(straight, tmp_path, golden, tiny):
    root = tmp_path / "images"
    shutil.copytree(golden / "e2e" / "images", root)
    bad = root / "n01443537" / "img_0.png"  # index 3
    bad.write_bytes(bad.read_bytes()[:200])  # truncated PNG
    out = tmp_path / "codes"
    with pytest.raises(BadImageError, match="n01443537/img_0.png"):
        extract(config(golden, tiny, out, root=root, batch_size=2))
    # Everything readable up to the bad image is kept, including image 2 of the failing batch [2, 3].
    assert np.load(out / "done.npy").tolist() == [1, 1, 1, 0, 0, 0]

    AcceleratorState._reset_state(True)
    extract(config(golden, tiny, out, root=root, batch_size=2, skip_bad=True))
    store, good = CodeStore(out), CodeStore(straight)
    assert store.meta["bad_files"] == ["n01443537/img_0.png"]
    assert store.labels.tolist() == [0, 0, 0, -1, 1, 1]
    assert not store.codes[3].any()
    keep = [0, 1, 2, 4, 5]
    assert np.array_equal(store.codes[keep], good.codes[keep])


def test_code_store_rejects_what_it_cannot_trust(straight, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CodeStore(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a code store"):
        CodeStore(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(straight, broken)
    np.save(broken / "labels.npy", np.zeros(5, dtype=np.int64))
    with pytest.raises(ValueError, match=r"labels.npy is int64 \(5,\)"):
        CodeStore(broken)


def tiny_overrides(tiny: dict) -> list[str]:
    """The tiny architecture as command-line overrides of the official field names, every per-stage list spelled out."""
    def listing(values):
        return "[" + ",".join(str(v) for v in values) + "]"

    fields = MGVQConfig.from_dict(tiny).to_dict()
    overrides = [f"tokenizer.config.{k}={v}" for k, v in fields.items()
                 if k in ("latent_channels", "codebook_size", "codebook_groups")]
    for part in ("encoder", "decoder"):
        overrides += [f"tokenizer.config.{part}.{k}={listing(v)}" for k, v in fields[part].items()]
    return overrides


def test_two_processes_write_the_same_store_as_one(straight, tmp_path, golden, tiny, repo, expected):
    """The command of the issue, on two gloo ranks: byte-identical to the in-process single-rank store."""
    overrides = tiny_overrides(tiny)
    out = tmp_path / "codes"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(repo / "scripts" / "extract_codes.py"), f"data.root={golden / 'e2e' / 'images'}",
           "data.image_size=64", "data.views=flip", f"out_dir={out}", "batch_size=2", "num_workers=0",
           f"tokenizer.checkpoint={golden / 'tokenizer_tiny.pt'}", *overrides]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "[rank 0/2] 3 of 6 images" in run.stdout and "[rank 1/2] 3 of 6 images" in run.stdout
    assert store_bytes(out) == store_bytes(straight)
    assert_golden_codes(CodeStore(out), expected)


def test_sigkill_then_the_same_command_gives_the_same_bytes(tmp_path, golden, tiny, repo):
    """A real crash: SIGKILL to the script's process group mid-run, then the same command finishes the store."""
    root = tmp_path / "images"
    sources = sorted((golden / "e2e" / "images").rglob("*.png"))
    for i in range(48):  # distinct images (shifted copies), so a write to the wrong index would show
        src = sources[i % len(sources)]
        (root / src.parent.name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.roll(np.asarray(Image.open(src).convert("RGB")), i, axis=1)).save(
            root / src.parent.name / f"img_{i:03d}.png")
    out = tmp_path / "codes"
    cmd = [sys.executable, str(repo / "scripts" / "extract_codes.py"), f"data.root={root}", "data.image_size=128",
           "data.views=flip", f"out_dir={out}", "batch_size=1", "num_workers=0",
           f"tokenizer.checkpoint={golden / 'tokenizer_tiny.pt'}", *tiny_overrides(tiny)]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    first = subprocess.Popen(cmd, cwd=repo, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, done = time.monotonic() + 120, 0
    while time.monotonic() < deadline and first.poll() is None and done < 2:
        time.sleep(0.01)
        if (out / "done.npy").is_file():
            done = int(np.load(out / "done.npy").sum())
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done = int(np.load(out / "done.npy").sum())
    assert 2 <= done < 48 and not (out / "meta.json").exists(), f"the kill came too late ({done} images done)"

    rerun = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"[rank 0/1] {48 - done} of {48 - done} images left" in rerun.stdout  # only what the kill left undone

    extract(config(golden, tiny, tmp_path / "straight", root=root, image_size=128))
    assert store_bytes(out) == store_bytes(tmp_path / "straight")
