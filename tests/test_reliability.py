"""Issue 24's probes: bad input stops before anything is written and names its culprit; one run per out_dir;
damaged files are named and caught; expected errors end in one clean line. (The two concurrent CLI runs are in
test_train.py and test_sample_ddp.py, beside their single-run references.)"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gpt import GPT, GPTConfig
from sampling.generate import generate
from sampling.sampler import SampleRunConfig, SamplerConfig, run, write_npz
from test_extract import config as extract_config
from test_sample_ddp import model_files
from test_train import T, train_config, write_store
from tokenizer.common.errors import BadFileError, ConfigError, LayoutError, OutDirBusyError, UserError
from tokenizer.common.lock import LOCK_NAME, acquire, release
from tokenizer.extract import extract
from tokenizer.loading import load_tokenizer, named_refs
from tokenizer.store import CodeStore

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sample_run(golden: Path, out_dir: Path, **sampler) -> SampleRunConfig:
    files = model_files(golden)
    settings = {"cfg_scale": 2.0, "top_k": 32, "eval_size": 32, "seed": 7, **sampler}
    return SampleRunConfig(gpt_ckpt=files.gpt_ckpt, gpt_official=files.gpt_official, tokenizer=files.tokenizer,
                           sampler=SamplerConfig(**settings), out_dir=str(out_dir), num_samples=2, batch_size=2)


# ---- 1, 2, 5: settings are checked (type, finite, range, not empty) before the out_dir is touched -----------

BAD_SAMPLER = [
    ({"temperature": float("nan")}, "sampler.temperature=nan"),
    ({"temperature": float("inf")}, "sampler.temperature=inf"),
    ({"cfg_scale": float("nan")}, "sampler.cfg_scale=nan"),
    ({"cfg_scale": float("inf")}, "sampler.cfg_scale=inf"),
    ({"cfg_scale": [1.5, float("nan")]}, r"sampler.cfg_scale\[1\]=nan"),
    ({"cfg_scale": "two"}, "sampler.cfg_scale='two'"),
    ({"temperature": "hot"}, "sampler.temperature='hot'"),
    ({"top_p": 1.5}, r"sampler.top_p=1.5: expected a finite number in \(0, 1\]"),
    ({"top_k": -1}, "sampler.top_k=-1"),
    ({"groups_to_use": 0}, "sampler.groups_to_use=0"),
    ({"eval_size": 0}, "sampler.eval_size=0"),
    ({"temperature": []}, r"sampler.temperature=\[\]"),
]


@pytest.mark.parametrize("bad, message", BAD_SAMPLER, ids=[m for _, m in BAD_SAMPLER])
def test_bad_sampler_settings_are_refused_before_anything_is_written(golden, tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message):
        run(sample_run(golden, tmp_path / "out", **bad))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value", [("num_samples", 0), ("batch_size", 0), ("num_samples", -3)])
def test_bad_run_sizes_are_refused_before_anything_is_written(golden, tmp_path, field, value):
    cfg = dataclasses.replace(sample_run(golden, tmp_path / "out"), **{field: value})
    with pytest.raises(ConfigError, match=f"{field}={value}: expected an integer in \\[1, inf\\)"):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_groups_to_use_beyond_the_model_and_per_group_lengths_are_refused(golden, tmp_path):
    with pytest.raises(ConfigError, match=r"sampler.groups_to_use=5: expected an integer in \[1, 4\]"):
        run(sample_run(golden, tmp_path / "a", groups_to_use=5))
    with pytest.raises(ConfigError, match=r"sampler.top_p=\[0.9, 0.9\]: expected a number or 4 values"):
        run(sample_run(golden, tmp_path / "b", top_p=[0.9, 0.9]))
    assert not (tmp_path / "a" / "settings.json").exists() and not (tmp_path / "b" / "settings.json").exists()


def test_the_corrected_command_runs_in_the_same_out_dir(golden, tmp_path):
    """The issue's repro: top_p=1.5 is refused; the same command with top_p=0.9 then runs in that out_dir."""
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="top_p=1.5"):
        run(sample_run(golden, out, top_p=1.5))
    path = run(sample_run(golden, out, top_p=0.9))
    assert np.load(path)["arr_0"].shape == (2, 32, 32, 3)
    assert json.loads((out / "settings.json").read_text())["sampler"]["top_p"] == 0.9
    assert not (out / LOCK_NAME).exists()  # released at the end


def tiny_gpt(num_classes: int = 10) -> GPT:
    """Random weights of scale 0.5 (the output head starts at zero): logits of a few units, finite."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", codebook_groups=2, codes_per_group=16, grid_size=2, num_classes=num_classes,
                                 codebook_embed_dim=8, dim=32, n_layer=1, n_head=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("settings", [{"temperature": 1e-45}, {"cfg_scale": 3e38}], ids=["temperature", "cfg"])
def test_guidance_or_temperature_turning_finite_logits_non_finite_is_caught(settings):
    """The check covers what is sampled from: finite logits divided by a tiny temperature, or mixed with a huge
    guidance scale, overflow to inf/NaN (before, the check looked at the raw logits only, and the samples were
    drawn from garbage without a word)."""
    model = tiny_gpt()
    codes = generate(model, torch.tensor([1, 2]), seeds=torch.tensor([0, 1]), cfg_scale=3.0)  # finite logits
    assert codes.shape == (2, 4, 2)
    with pytest.raises(FloatingPointError, match="non-finite"):
        generate(model, torch.tensor([1, 2]), seeds=torch.tensor([0, 1]), **settings)


@pytest.mark.parametrize("label", [10, 11, -1])
def test_generate_refuses_labels_outside_the_classes(label):
    """Label 10 (== num_classes) is the null class: it used to draw unconditional samples silently; 11 raised a bare
    IndexError inside the embedding."""
    with pytest.raises(ConfigError, match=rf"labels \[{label}\] are outside the model's classes 0..9"):
        generate(tiny_gpt(), torch.tensor([3, label]))


TRAIN_BAD = [("lr", float("nan")), ("max_steps", 0), ("global_batch_size", 0), ("ema", 1.0), ("grad_clip", float("inf")),
             ("warmup_steps", -1), ("betas", [0.9]), ("log_every", 0)]


@pytest.mark.parametrize("field, value", TRAIN_BAD, ids=[f for f, _ in TRAIN_BAD])
def test_bad_training_settings_are_refused_before_anything_is_written(tmp_path, golden, field, value):
    store = write_store(tmp_path / "codes", golden)
    with pytest.raises(ConfigError, match=field):
        T.train(train_config(store, tmp_path / "run", golden, **{field: value}))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("num_workers", -1)])
def test_bad_extraction_settings_are_refused_before_anything_is_written(tmp_path, golden, field, value):
    tiny = torch.load(golden / "tokenizer_tiny_expected.pt", weights_only=True)["config"]
    cfg = dataclasses.replace(extract_config(golden, tiny, tmp_path / "codes"), **{field: value})
    with pytest.raises(ConfigError, match=f"{field}={value}"):
        extract(cfg)
    assert not (tmp_path / "codes").exists()


def test_extraction_loads_the_tokenizer_before_writing_so_the_fixed_file_reruns(tmp_path, golden):
    """A truncated tokenizer file is named, nothing is written; the same command with the file fixed runs (before,
    spec.json recorded the broken file's hash and the fixed rerun was refused as 'other settings')."""
    tiny = torch.load(golden / "tokenizer_tiny_expected.pt", weights_only=True)["config"]
    ckpt = tmp_path / "tok.pt"
    good = (golden / "tokenizer_tiny.pt").read_bytes()
    ckpt.write_bytes(good[: len(good) // 2])
    cfg = extract_config(golden, tiny, tmp_path / "codes", checkpoint=ckpt)
    with pytest.raises(BadFileError, match=f"tokenizer checkpoint {ckpt} is unreadable or damaged"):
        extract(cfg)
    assert not (tmp_path / "codes").exists()
    ckpt.write_bytes(good)
    meta = extract(cfg)
    assert meta["num_images"] == 6 and (tmp_path / "codes" / "meta.json").is_file()


# ---- 3: one run per out_dir -----------------------------------------------------------------------------

HOLD = """import sys, time
from tokenizer.common.lock import acquire
acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def test_a_live_holder_is_named_and_a_dead_ones_lock_is_taken_over(tmp_path, repo):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), "--marker"], cwd=repo, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(repo)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutDirBusyError, match=rf"{out} is in use by another run \(pid {holder.pid} on .*--marker"):
            acquire(out)
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: no release, the lock file keeps its record
        holder.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid
    note = acquire(out)
    assert note is not None and f"took over the lock of a run that ended without releasing it (pid {holder.pid}" in note
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    release(out)
    assert not (out / LOCK_NAME).exists()
    assert acquire(out) is None  # a cleanly released lock leaves nothing to take over
    release(out)


# ---- 4: damaged files are named; damage inside a checkpoint is caught -----------------------------------

def damaged(src: Path, dst: Path, how: str) -> Path:
    data = bytearray(src.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:  # 4 KB zeroed in the middle: a tensor's bytes, which torch.load alone does not check
        data[len(data) // 2: len(data) // 2 + 4096] = bytes(4096)
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("how", ["truncated", "zeroed"])
def test_a_damaged_gpt_file_is_named(golden, tmp_path, how):
    bad = damaged(golden / "gpt_tiny.pt", tmp_path / "gpt.pt", how)
    cfg = dataclasses.replace(sample_run(golden, tmp_path / "out"), gpt_ckpt=str(bad))
    with pytest.raises(BadFileError, match=f"GPT model file {bad}"):
        run(cfg)
    assert not (tmp_path / "out" / "settings.json").exists()


def test_a_damaged_tokenizer_file_is_named(golden, tmp_path):
    bad = damaged(golden / "tokenizer_tiny.pt", tmp_path / "tok.pt", "zeroed")
    files = model_files(golden)
    with pytest.raises(BadFileError, match=f"tokenizer checkpoint {bad} is damaged"):
        dataclasses.replace(files.tokenizer, checkpoint=str(bad)).load()


def test_a_truncated_png_is_named(tmp_path):
    png = tmp_path / "png"
    png.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(png / f"{i:06d}.png")
    data = (png / "000001.png").read_bytes()
    (png / "000001.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadFileError, match=f"sample image {png / '000001.png'} is unreadable.*delete it and rerun"):
        write_npz(tmp_path / "samples.npz", png, 3, 10)


def test_a_truncated_codes_file_is_named(tmp_path, golden):
    """A code store whose codes.npy was cut short: training names the file (the message used to be 'mmap length
    is greater than file size' after the store's directory)."""
    store = write_store(tmp_path / "codes", golden)
    codes = store / "codes.npy"
    codes.write_bytes(codes.read_bytes()[:-100])
    with pytest.raises(BadFileError, match=f"code store file {codes} is unreadable or damaged"):
        T.train(train_config(store, tmp_path / "run", golden))
    assert not (tmp_path / "run").exists()


# ---- 5: a store's meta.json is checked against its codes ----------------------------------------------------

@pytest.mark.parametrize("codes_per_group", [32, 128])
def test_meta_json_that_does_not_describe_the_codes_is_refused(tmp_path, golden, codes_per_group):
    """Smaller than the codes: the embedding used to fail 45 lines deep; larger: a model trained for hours that
    the sampler later refuses."""
    store = write_store(tmp_path / "codes", golden)
    meta = json.loads((store / "meta.json").read_text())
    meta["codes_per_group"] = codes_per_group
    (store / "meta.json").write_text(json.dumps(meta))
    message = rf"meta.json: codes_per_group={codes_per_group} does not fit groups=4 and the tokenizer it records \(\[64"
    with pytest.raises(BadFileError, match=message):
        CodeStore(store)


def test_codes_beyond_meta_are_found_in_the_sampled_rows(tmp_path, golden):
    store = write_store(tmp_path / "codes", golden)
    codes = np.load(store / "codes.npy", mmap_mode="r+")
    codes[-1, 1, 0, 0, 2] = 64  # the last image is always among the checked rows
    codes.flush()
    del codes
    with pytest.raises(BadFileError, match="group 2 has code 64"):
        CodeStore(store)


# ---- 6: an official file of another family says which family it is ------------------------------------------

@pytest.mark.parametrize("preset", ["ibq-16384", "mgvq-f16c32-g4", "llamagen-vq16"])
def test_an_official_file_of_another_family_names_its_family(fixtures_dir, preset):
    ref = named_refs()[preset]
    path = fixtures_dir / "open_magvit2" / "tokenizer_raw.pt"
    with pytest.raises(LayoutError, match=r"layout of family 'open_magvit2'. Pass tokenizer=open-magvit2-\S+ \(family open_magvit2"):
        load_tokenizer(path, ref.config, family=ref.family)


# ---- 7: expected errors end cleanly, unexpected ones keep their traceback ----------------------------------

SCRIPT_PROBES = [
    ("sample_c2i_ddp.py", ["gpt_ckpt=g.pt", "tokenizer.checkpoint=t.pt", "out_dir=o", "sampler.cfg_scale=two"],
     "sampler.cfg_scale='two'"),
    ("train_gpt.py", ["data.codes_dir=c", "tokenizer.checkpoint=t.pt", "out_dir=o", "lr=nan"], "lr=nan"),
    ("extract_codes.py", ["data.root=r", "tokenizer.checkpoint=t.pt", "out_dir=o", "batch_size=0"], "batch_size=0"),
    ("sweep_cfg.py", ["gpt_ckpt=g.pt", "tokenizer.checkpoint=t.pt", "out_dir=o", "cfg_scales=[]",
                      "evaluate.reference=r.npz"], "cfg_scales=[]"),
    ("evaluate.py", ["samples=s.npz", "reference=r.npz", "inception_weights=missing.pth"], "missing.pth"),
    ("demo_gen.py", ["gpt_ckpt=g.pt", "tokenizer.checkpoint=t.pt", "sampler.top_p=2"], "sampler.top_p=2"),
    ("train_tokenizer.py", ["data.root=r", "out_dir=o", "lr=-1"], "lr=-1"),
    ("eval_recon.py", ["data.root=missing_dir", "tokenizer.checkpoint=t.pt", "out=r.json"], "missing_dir"),
    ("train_gpt.py", ["data.codes_dir=c", "tokenizer.checkpoint=t.pt", "lr=1e-4"], "missing mandatory value: out_dir"),
    ("extract_codes.py", ["data.root=r", "tokenizer.checkpoint=t.pt", "out_dir=o", "batch_size=many"], "batch_size"),
]


@pytest.mark.parametrize("script, args, culprit", SCRIPT_PROBES, ids=[f"{s}-{a[-1]}" for s, a, _ in SCRIPT_PROBES])
def test_every_script_ends_an_expected_error_with_one_line_naming_the_culprit(repo, tmp_path, script, args, culprit):
    result = subprocess.run([sys.executable, str(repo / "scripts" / script), *args], cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) <= 3, result.stderr[-3000:]
    assert lines[-1].startswith("error: ") and culprit in lines[-1]
    assert not (tmp_path / "o").exists()


def test_hydra_full_error_shows_the_traceback_and_unexpected_errors_keep_theirs(repo, tmp_path):
    args = [str(repo / "scripts" / "sample_c2i_ddp.py"), "gpt_ckpt=g.pt", "tokenizer.checkpoint=t.pt", "out_dir=o",
            "num_samples=0"]
    full = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"})
    assert full.returncode == 1 and "Traceback" in full.stderr and "num_samples=0" in full.stderr
    bug = ("import _hydra; from sampling.metrics import EvalConfig\n"
           "_hydra.main('evaluate', EvalConfig, lambda cfg: 1 / 0)")
    crash = subprocess.run([sys.executable, "-c", bug, "samples=s.npz", "reference=r.npz"], cwd=repo,
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "scripts")]),
                                "OMP_NUM_THREADS": "1"})
    assert crash.returncode == 1 and "Traceback" in crash.stderr and "ZeroDivisionError" in crash.stderr
    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)
