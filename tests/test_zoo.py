"""The registry of released models (sampling.zoo): every entry builds at its published size with settings the
sampler accepts; `zoo=<name>` samples on 2 ranks from official-layout files and scores beside the published
numbers; a missing, truncated or foreign file and an unknown name fail naming what is wrong."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import family_fixture
from sampling import zoo
from sampling.sampler import SampleRunConfig
from sampling.sweep import figure
from sampling.zoo import Published, ZooEntry
from test_evaluate import inception_weights  # noqa: F401 (a fixture: random weights with the real keys)
from test_sample_ddp import free_port

ibq = family_fixture("ibq", "ibq", "gpt")


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_every_entry_builds_at_its_published_size_with_settings_the_sampler_accepts(name):
    entry = zoo.get(name)
    gpt, tokenizer = zoo.build_on_meta(entry)
    n_gpt, n_tok = (sum(p.numel() for p in m.parameters()) for m in (gpt, tokenizer))
    if entry.params is None:  # only MGVQ's AR-head GPT-XXL has no published count (its code says LlamaGen's 1.4B)
        assert name == "mgvq-gpt-xxl" and n_gpt == 1_462_531_584 and gpt.config.head == "ar"
    else:
        assert zoo.matches_published(n_gpt, entry.params), (n_gpt, entry.params)
    if entry.tokenizer_params is not None:
        assert zoo.matches_published(n_tok, entry.tokenizer_params), (n_tok, entry.tokenizer_params)
    zoo.check_settings(entry, gpt)
    # the entry's fields make a valid run config (as scripts/_hydra.py applies them) with the entry's tokenizer
    fields = OmegaConf.create({})
    for key, value in {**zoo.run_fields(entry, "/ckpt"), "out_dir": "x", "zoo": name, "ckpt_dir": "/ckpt"}.items():
        OmegaConf.update(fields, key, value, merge=False)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SampleRunConfig), fields))
    assert cfg.gpt_ckpt == f"/ckpt/{entry.gpt_file}" and cfg.tokenizer.checkpoint == f"/ckpt/{entry.tokenizer_file}"
    assert dataclasses.asdict(cfg.sampler) | entry.sampler == dataclasses.asdict(cfg.sampler)
    assert cfg.sampler.eval_size == 256 and entry.reference == "VIRTUAL_imagenet256_labeled.npz"
    assert entry.published.fid is not None and entry.published.source


def test_published_sizes_are_checked_to_their_precision():
    assert zoo.parse_size("1.4B") == (1.4e9, 0.05e9) and zoo.parse_size("111M") == (111e6, 0.5e6)
    b, l = (sum(p.numel() for p in zoo.build_on_meta(zoo.get(n))[0].parameters()) for n in ("llamagen-b-256",
                                                                                             "llamagen-l-256"))
    assert not zoo.matches_published(b, "343M") and not zoo.matches_published(l, "111M")
    assert not zoo.matches_published(1_480_000_000, "1.4B")  # 5.7% off: beyond its rounding and 1%


def test_unknown_name_lists_the_released_ones():
    with pytest.raises(ValueError, match=r"unknown zoo model 'llamagen-b'.*llamagen-b-256, llamagen-b-384"):
        zoo.get("llamagen-b")


# A stand-in release: the IBQ-AR layout (one Lightning file holds the GPT as transformer.* and the tokenizer it decodes
# with as first_stage_model.*), tiny, built from the golden fixture's official key names.
def stand_in(tok_config: dict, gpt_config: dict) -> ZooEntry:
    c = gpt_config
    return ZooEntry(
        name="tiny-ibq-ar", gpt_file="AR_256_B.ckpt", gpt_page="https://example.org/tiny/AR_256_B.ckpt",
        tokenizer_file="AR_256_B.ckpt", tokenizer_page="https://example.org/tiny/AR_256_B.ckpt",
        gpt_official={"preset": "tiny", "grid_size": 4, "dim": c["n_embd"], "n_layer": c["n_layer"],
                      "n_head": c["n_head"], "num_classes": c["class_num"], "multiple_of": c["multiple_of"],
                      "class_adaln": True},
        tokenizer="ibq-16384", tokenizer_fields=tok_config, tokenizer_weights="auto",
        sampler={"cfg_scale": 2.25, "temperature": 1.1, "top_k": 0, "top_p": 1.0, "eval_size": 16},
        reference="tiny_ref.npz",
        published=Published(fid=12.5, inception_score=3.25, precision=0.75, recall=None, source="a stand-in table"),
        params=None, tokenizer_params=None)


@pytest.fixture(scope="module")
def release(ibq, golden_fixture, official_weights, tmp_path_factory):
    """(entry, ckpt_dir, weights): a tiny AR_256_B.ckpt in the official layout inside ckpt_dir."""
    keys = ibq["official_keys"]
    gpt_keys = {k[len("transformer."):]: v for k, v in keys.items() if k.startswith("transformer.")}
    tok_keys = {k: v for k, v in keys.items() if k.startswith("first_stage_model.")}
    sd = {**{f"transformer.{k}": v for k, v in official_weights(gpt_keys, ibq["seed"]).items()},
          **official_weights(tok_keys, 3)}
    ckpt_dir = tmp_path_factory.mktemp("ckpt")
    torch.save({"state_dict": sd, "epoch": 1, "global_step": 9}, ckpt_dir / "AR_256_B.ckpt")
    return stand_in(golden_fixture("ibq", "tokenizer")["config"], ibq["config"]), ckpt_dir, sd


def test_missing_truncated_and_foreign_files_fail_before_sampling(release, tmp_path):
    entry, ckpt_dir, sd = release
    zoo.check_files(entry, zoo.model_files(entry, ckpt_dir))  # the right file passes
    with pytest.raises(FileNotFoundError, match=r"needs AR_256_B.ckpt in .*https://example.org/tiny/AR_256_B.ckpt"):
        zoo.check_files(entry, zoo.model_files(entry, tmp_path))
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n"
    (tmp_path / "AR_256_B.ckpt").write_text(pointer)
    with pytest.raises(ValueError, match=rf"is {len(pointer)} bytes, but the weights .* need at least [\d,]+ .*lfs"):
        zoo.check_files(entry, zoo.model_files(entry, tmp_path))
    # a file of another release: the GPT lacks a block's adaLN, the tokenizer has an extra table
    other = {k: v for k, v in sd.items() if k != "transformer.blocks.1.ada_lin.1.bias"}
    other["first_stage_model.quantize.extra.weight"] = torch.zeros(64, 16)
    torch.save({"state_dict": other}, tmp_path / "AR_256_B.ckpt")
    with pytest.raises(ValueError, match=r"(?s)GPT of zoo model 'tiny-ibq-ar'.*missing keys \(1\): layers.1.ada_lin.1."
                                         r"bias.*tokenizer weights.*unexpected keys \(1\): quantize.extra.weight"):
        zoo.check_files(entry, zoo.model_files(entry, tmp_path))
    del other["first_stage_model.quantize.extra.weight"]
    other["transformer.blocks.1.ada_lin.1.bias"] = sd["transformer.blocks.1.ada_lin.1.bias"]
    other["first_stage_model.quant_conv.weight"] = torch.zeros(8, 32, 1, 1)  # another shape (16, 32, 1, 1)
    torch.save({"state_dict": other}, tmp_path / "AR_256_B.ckpt")
    with pytest.raises(ValueError, match=r"(?s)tokenizer weights of 'tiny-ibq-ar'.*shape mismatches \(1\): quant_conv"):
        zoo.check_files(entry, zoo.model_files(entry, tmp_path))


LAUNCH = """import json, runpy
from sampling import zoo
kw = json.load(open({entry!r}))
kw["published"] = zoo.Published(**kw["published"])
zoo.ZOO[kw["name"]] = zoo.ZooEntry(**kw)
runpy.run_path({script!r}, run_name="__main__")
"""


def launcher(repo, tmp_path, entry: ZooEntry, script: str):
    """A script that registers the stand-in entry, then runs scripts/<script> as its main."""
    (tmp_path / "entry.json").write_text(json.dumps(dataclasses.asdict(entry)))
    path = tmp_path / f"launch_{script}"
    path.write_text(LAUNCH.format(scripts=str(repo / "scripts"), entry=str(tmp_path / "entry.json"),
                                  script=str(repo / "scripts" / script)))
    return path


def test_zoo_run_on_two_ranks_then_scored_beside_the_published_numbers(release, repo, tmp_path, inception_weights):
    entry, ckpt_dir, _ = release
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "scripts")])}
    out = tmp_path / "samples"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(launcher(repo, tmp_path, entry, "sample_c2i_ddp.py")),
           f"zoo={entry.name}", f"ckpt_dir={ckpt_dir}", f"out_dir={out}", "num_samples=8", "batch_size=2",
           "sampler.temperature=1.3"]
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    side = json.loads((out / "samples.json").read_text())
    assert side["run"]["num_processes"] == 2  # two ranks really ran
    assert side["gpt_ckpt"] == side["tokenizer_checkpoint"] == str(ckpt_dir / "AR_256_B.ckpt")
    assert side["sampler"]["cfg_scale"] == 2.25 and side["sampler"]["temperature"] == 1.3  # the entry's, the override
    record = side["zoo"]
    assert record["name"] == "tiny-ibq-ar" and record["published"]["fid"] == 12.5
    assert record["overrides"] == {"sampler.temperature": {"zoo": 1.1, "used": 1.3}}
    images = np.load(out / "samples.npz")["arr_0"]
    assert images.shape == (8, 16, 16, 3) and images.std() > 5

    reference = tmp_path / "tiny_ref.npz"
    np.savez(reference, arr_0=np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    cmd = [sys.executable, str(repo / "scripts" / "evaluate.py"), f"samples={out / 'samples.npz'}",
           f"reference={reference}", f"inception_weights={inception_weights}", f"cache_root={tmp_path / 'cache'}",
           "batch_size=8", "progress=false"]
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "samples.metrics.json").read_text())
    assert metrics["published"] == record["published"]
    fid = metrics["metrics"]["fid"]
    row = next(line for line in result.stdout.splitlines() if line.startswith("fid "))
    assert row.split()[1:] == [f"{fid:.4g}", "12.5"]  # measured beside published
    assert "recall" in result.stdout and "a stand-in table" in result.stdout
    assert "measured on 8 samples, published on 50000" in result.stdout


def test_unknown_zoo_name_on_the_command_line(repo, tmp_path):
    cmd = [sys.executable, str(repo / "scripts" / "sample_c2i_ddp.py"), "zoo=ibq-ar-m", f"ckpt_dir={tmp_path}",
           f"out_dir={tmp_path / 'out'}"]
    result = subprocess.run(cmd, cwd=repo, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "scripts")])}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    assert "unknown zoo model 'ibq-ar-m'" in result.stderr and "ibq-ar-b, ibq-ar-l" in result.stderr


def test_sweep_plot_marks_the_published_setting():
    rows = [{"cfg_scale": scale, "top_k": 0, "fid": fid, "inception_score": isc, "num_samples": 100}
            for scale, fid, isc in ((1.5, 9.0, 50.0), (2.0, 8.0, 60.0), (2.5, 8.5, 70.0))]
    mark = zoo.plot_mark(zoo.get("open-magvit2-ar-xl"))  # per-sub-token scales [1.75, 1.85]: marked at their mean
    assert mark["cfg_scale"] == pytest.approx(1.8) and (mark["fid"], mark["inception_score"]) == (2.33, 271.77)
    for ax, published in zip(figure(rows, mark=mark).axes, (2.33, 271.77)):
        stars = [line for line in ax.lines if line.get_marker() == "*"]
        assert len(stars) == 1 and stars[0].get_xydata().tolist() == [[pytest.approx(1.8), published]]
        dotted = [line for line in ax.lines if line.get_linestyle() == ":"]
        assert len(dotted) == 1 and dotted[0].get_xdata()[0] == pytest.approx(1.8)
        assert dotted[0].get_label() == "open-magvit2-ar-xl published: cfg [1.75, 1.85]"
    assert not [line for ax in figure(rows).axes for line in ax.lines if line.get_marker() == "*"]


def test_an_mgvq_layout_release_passes_its_file_checks(golden, tmp_path):
    """The MGVQ GPT file stores no codebook (the tokenizer's table is its input) and unused adaLN weights: the
    official tiny GPT + tokenizer of ../shared/golden pass; for a narrower GPT the file fails naming the shapes, for a
    wider one it is too small."""
    from test_sample_ddp import OFFICIAL

    tok = torch.load(golden / "tokenizer_tiny_expected.pt", weights_only=True)["config"]
    entry = dataclasses.replace(
        zoo.get("mgvq-gpt-xxl"), name="tiny-mgvq", gpt_file="gpt_tiny.pt", tokenizer_file="tokenizer_tiny.pt",
        gpt_official=OFFICIAL, tokenizer="mgvq-f8c32-g4", tokenizer_fields=tok)
    zoo.check_files(entry, zoo.model_files(entry, golden))
    narrower = dataclasses.replace(entry, gpt_official={**OFFICIAL, "dim": 32})
    with pytest.raises(ValueError, match=r"(?s)GPT of zoo model 'tiny-mgvq'.*shape mismatches.*img_projector"):
        zoo.check_files(narrower, zoo.model_files(narrower, golden))
    wider = dataclasses.replace(entry, gpt_official={**OFFICIAL, "dim": 128})  # needs more bytes than the file has
    with pytest.raises(ValueError, match=r"gpt_tiny.pt is 1,722,757 bytes.*need at least 2,162,432.*another model"):
        zoo.check_files(wider, zoo.model_files(wider, golden))
