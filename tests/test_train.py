"""GPT training: the loss, the data order, exact resume, refusals, the NaN guard and a two-process run."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

import gpt.train as T
from gpt import GPTConfig, load_gpt
from gpt.data import CodeDataset
from tokenizer.common.runs import GlobalBatchSampler, list_checkpoints
from tokenizer.common.io import sha256_file
from tokenizer.store import StoreWriter

G, V, HW, CLASSES = 4, 64, 4, 4  # the golden tiny tokenizer: 4 groups of 64 codes, 32 latent channels


def write_store(root: Path, golden: Path, num_images: int = 32, unlabeled: tuple[int, ...] = (), hw: int = HW,
                classes: int = CLASSES) -> Path:
    """A learnable code store: codes are a fixed function of label, position and group; view 1 is the flip."""
    labels = np.arange(num_images) % classes
    labels[list(unlabeled)] = -1
    t = np.arange(hw * hw).reshape(hw, hw)
    grid = (labels[:, None, None, None] * 7 + t[None, :, :, None] * 3 + np.arange(G) * 5) % V  # (N, h, w, G)
    spec = {
        "tokenizer": torch.load(golden / "tokenizer_tiny_expected.pt", weights_only=True)["config"],
        "tokenizer_sha256": sha256_file(golden / "tokenizer_tiny.pt"),
        "image_size": 64, "views": "flip", "num_views": 2, "groups": G, "codes_per_group": V, "grid": [hw, hw],
        "num_images": num_images, "num_classes": classes, "class_names": [f"c{i}" for i in range(classes)],
        "files_fingerprint": f"synthetic-{num_images}-{unlabeled}",
    }
    writer = StoreWriter(root, spec)
    assert writer.check() == "new"
    writer.create(labels)
    writer.open()
    writer.write(np.arange(num_images), np.stack([grid, grid[:, :, ::-1]], axis=1), np.zeros(num_images, bool))
    writer.finalize([f"img{i}.png" for i in range(num_images)])
    writer.close()
    return root


@pytest.fixture
def store(tmp_path, golden) -> Path:
    return write_store(tmp_path / "codes", golden)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """train() builds an Accelerator; its process-wide state must not leak between in-process runs.
    One thread: the tiny model gains nothing from two, and the suite shares two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
    torch.set_num_threads(threads)


def tiny_model(**overrides) -> GPTConfig:
    return GPTConfig.preset("tiny", dim=32, n_layer=2, n_head=2, codebook_groups=None, codes_per_group=None,
                            grid_size=None, num_classes=None, codebook_embed_dim=None, **overrides)


def train_config(store: Path, out_dir: Path, golden: Path, model: GPTConfig | None = None, **overrides) -> T.TrainConfig:
    fields = dict(max_steps=6, global_batch_size=8, grad_accum=2, lr=3e-3, lr_schedule="cosine", warmup_steps=2,
                  precision="fp32", log_every=2, ckpt_every=2, keep_last=2, ema=0.9, seed=3)
    fields.update(overrides)
    return T.TrainConfig(data=T.CodeDataConfig(str(store), num_workers=0), model=model or tiny_model(),
                         tokenizer=T.TokenizerRef(checkpoint=str(golden / "tokenizer_tiny.pt")), out_dir=str(out_dir),
                         **fields)


def test_loss_is_mean_cross_entropy_over_positions_and_groups():
    torch.manual_seed(0)
    logits, codes = torch.randn(2, 5, 3, 7), torch.randint(7, (2, 5, 3))
    loss, per_group = T.cross_entropy_per_group(logits, codes)
    nll = torch.zeros(3)
    for b in range(2):
        for t in range(5):
            for g in range(3):
                row = logits[b, t, g].double()
                nll[g] += (row.exp().sum().log() - row[codes[b, t, g]]).item()
    torch.testing.assert_close(per_group, nll / 10, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, nll.sum() / 30, rtol=1e-6, atol=1e-6)


def test_loss_is_float32_for_bf16_logits():
    """accelerate's bf16 FSDP2 policy hands the loss bf16 logits; log-softmax and the mean still run in float32."""
    torch.manual_seed(0)
    logits, codes = torch.randn(4, 16, 3, 64).bfloat16().requires_grad_(), torch.randint(64, (4, 16, 3))
    loss, per_group = T.cross_entropy_per_group(logits, codes)
    assert loss.dtype == per_group.dtype == torch.float32
    want, _ = T.cross_entropy_per_group(logits.detach().float(), codes)
    assert torch.equal(loss, want)
    loss.backward()
    upcast = logits.detach().float().requires_grad_()
    T.cross_entropy_per_group(upcast, codes)[0].backward()
    assert torch.equal(logits.grad, upcast.grad.bfloat16())  # the float32 gradient, rounded once at the end


def test_data_order_is_the_same_for_any_number_of_processes(tmp_path, golden):
    dataset = CodeDataset(write_store(tmp_path / "codes", golden, num_images=21, unlabeled=(2, 9)), seed=5)
    assert len(dataset) == 19  # label -1 left out
    one = iter(GlobalBatchSampler(dataset.epoch_plan, len(dataset), global_batch_size=8, grad_accum=2))
    two = [iter(GlobalBatchSampler(dataset.epoch_plan, len(dataset), global_batch_size=8, grad_accum=1, rank=r,
                                    world_size=2)) for r in (0, 1)]
    seen = []
    for _ in range(2 * 4):  # 4 epochs of 2 steps; 3 of the 19 images wait for another epoch
        single = next(one) + next(one)  # the two micro-steps of one optimizer step
        assert single == next(two[0]) + next(two[1])
        seen.append(single)
    for epoch in range(4):
        images = [i for step in seen[2 * epoch:2 * epoch + 2] for i, _ in step]
        assert len(set(images)) == 16 and not {2, 9} & set(images)
    views = [dict(step) for step in seen]
    assert {v for step in views for v in step.values()} == {0, 1}
    # The stream restarts exactly where a checkpoint says: step 5 on.
    resumed = iter(GlobalBatchSampler(dataset.epoch_plan, len(dataset), global_batch_size=8, grad_accum=2, start_step=5))
    assert [next(resumed) + next(resumed) for _ in range(3)] == seen[5:8]
    codes, label = dataset[(4, 1)]
    assert codes.shape == (HW * HW, G) and codes.dtype == torch.int64 and label.item() == 0
    flipped = codes.view(HW, HW, G).flip(1).reshape(-1, G)
    torch.testing.assert_close(flipped, dataset[(4, 0)][0])


def test_batched_reads_equal_item_reads(tmp_path, golden):
    """`__getitems__` (sorted, one pass, what the DataLoader calls) returns exactly the per-item samples."""
    dataset = CodeDataset(write_store(tmp_path / "codes", golden, num_images=40, hw=8), seed=5)
    keys = [(37, 1), (3, 0), (20, 1), (3, 1), (37, 1), (0, 0), (39, 1)]  # unsorted, a repeat, both views of one
    batched = dataset.__getitems__(keys)
    assert len(batched) == len(keys)
    for (codes, label), key in zip(batched, keys):
        want_codes, want_label = dataset[key]
        assert torch.equal(codes, want_codes) and torch.equal(label, want_label) and codes.dtype == torch.int64
    sampler = GlobalBatchSampler(dataset.epoch_plan, len(dataset), global_batch_size=8, grad_accum=1)
    for workers in (0, 1):
        loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers))
        plan = iter(sampler)
        for _ in range(6):  # across an epoch boundary
            codes, labels = next(loader)
            items = [dataset[k] for k in next(plan)]
            assert torch.equal(codes, torch.stack([c for c, _ in items]))
            assert torch.equal(labels, torch.stack([y for _, y in items]))
        del loader


def test_batched_reads_ask_for_exactly_the_pages_of_their_records(tmp_path, golden):
    """MADV_WILLNEED ranges: page-aligned, disjoint, sorted, covering every record's bytes and nothing more."""
    import mmap

    dataset = CodeDataset(write_store(tmp_path / "codes", golden, num_images=40, hw=8))
    calls = []

    class Recorder:
        def __len__(self):
            return len(real)

        def madvise(self, option, start, length):
            calls.append((option, start, length))

    real, dataset._map = dataset._map, Recorder()
    record_bytes = 8 * 8 * G * 2
    assert dataset._record_bytes == record_bytes and dataset._data_start == 128  # after the .npy header
    keys = [(37, 1), (3, 0), (20, 1), (3, 1), (0, 0), (39, 1), (21, 0)]
    dataset.__getitems__(keys)
    page = mmap.PAGESIZE
    assert all(op == mmap.MADV_WILLNEED and start % page == 0 and length > 0 for op, start, length in calls)
    ranges = [(start, start + length) for _, start, length in calls]
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:]))  # sorted, with a gap between
    wanted = set()
    for i, v in keys:
        begin = 128 + (i * 2 + v) * record_bytes
        wanted |= set(range(begin // page, (begin + record_bytes - 1) // page + 1))
    assert {p for a, b in ranges for p in range(a // page, -(-b // page))} == wanted


def test_stop_and_resume_equals_a_straight_run(tmp_path, store, golden, monkeypatch):
    """Dropouts and EMA on, cosine schedule, grad accumulation; the run is killed while writing checkpoint 4.
    The straight run reads through two loader workers, the others in-process: the batches are the same."""
    cfg = train_config(store, tmp_path / "straight", golden)
    cfg.data.num_workers = 2
    straight = T.train(cfg)
    AcceleratorState._reset_state(True)

    real_save, calls = Accelerator.save_state, []

    def killed_on_second_save(self, output_dir, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            Path(output_dir, "model.safetensors").write_bytes(b"half a file")
            raise KeyboardInterrupt("killed while writing a checkpoint")
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", killed_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        T.train(train_config(store, tmp_path / "resumed", golden))
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    AcceleratorState._reset_state(True)
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step_0000002"]  # the torn one is ignored
    resumed = T.train(train_config(store, tmp_path / "resumed", golden))  # resume=auto: from step 2

    for name in ("straight", "resumed"):
        assert json.loads((tmp_path / name / "checkpoints/step_0000006/train_state.json").read_text())["step"] == 6
    a = load_file(tmp_path / "straight/checkpoints/step_0000006/model.safetensors")
    b = load_file(tmp_path / "resumed/checkpoints/step_0000006/model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    ema_a, ema_b = torch.load(straight, weights_only=True), torch.load(resumed, weights_only=True)
    assert max((ema_a["model"][k] - ema_b["model"][k]).abs().max().item() for k in ema_a["model"]) < 1e-6
    assert any((ema_a["model"][k] - a[k]).abs().max() > 1e-4 for k in a)  # the export holds the EMA weights
    log = [json.loads(line) for line in (tmp_path / "resumed/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6]
    assert [p.name for p in list_checkpoints(tmp_path / "straight")] == ["step_0000004", "step_0000006"]

    model = load_gpt(resumed)  # what the sampler reads
    assert model.config.codebook_groups == G and model.config.codes_per_group == V and model.config.grid_size == HW
    loaded = model.state_dict()
    assert loaded.keys() == ema_b["model"].keys()
    assert all(torch.equal(loaded[k], ema_b["model"][k]) for k in loaded)


def test_fine_tuning_starts_from_an_official_checkpoint(tmp_path, golden):
    """init_from reads the official MGVQ layout (AR head), as for the released GPT-XXL; lr 0 keeps it as loaded."""
    expected = torch.load(golden / "gpt_tiny_expected.pt", weights_only=True)
    model = GPTConfig.from_official_mgvq(expected["config"])
    store = write_store(tmp_path / "codes", golden, num_images=10, hw=model.grid_size, classes=model.num_classes)
    cfg = train_config(store, tmp_path / "run", golden, model=model, init_from=str(golden / "gpt_tiny.pt"),
                       max_steps=1, lr=0.0, lr_schedule="constant", warmup_steps=0, ema=0.0, grad_accum=1,
                       global_batch_size=4)
    tuned = load_gpt(T.train(cfg))
    assert tuned.config.head == "ar"
    torch.testing.assert_close(tuned(expected["codes"], expected["labels"]), expected["logits"],
                               rtol=1e-4, atol=1e-4 * expected["logits"].abs().max().item())


@pytest.mark.parametrize("fault", ["other_tokenizer", "groups", "grid", "missing_store", "missing_tokenizer"])
def test_mismatches_are_refused_before_any_step(tmp_path, store, golden, fault):
    cfg = train_config(store, tmp_path / "run", golden)
    if fault == "other_tokenizer":
        other = tmp_path / "tokenizer.pt"
        blob = torch.load(golden / "tokenizer_tiny.pt", weights_only=True)
        blob["model"]["quantize.embedding.weight"] += 1.0
        torch.save(blob, other)
        cfg.tokenizer.checkpoint, match = str(other), "not the tokenizer the codes"
    elif fault == "groups":
        cfg.model, match = dataclasses.replace(tiny_model(), codebook_groups=2), "codebook_groups=2 contradicts"
    elif fault == "grid":
        cfg.model, match = dataclasses.replace(tiny_model(), grid_size=8), "grid_size=8 contradicts"
    elif fault == "missing_store":
        cfg.data.codes_dir, match = str(tmp_path / "nowhere"), "nowhere"
    else:
        cfg.tokenizer.checkpoint, match = str(tmp_path / "gone.pt"), "gone.pt"
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        T.train(cfg)
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_continues_only_its_own_run(tmp_path, store, golden):
    T.train(train_config(store, tmp_path / "run", golden, max_steps=2))
    AcceleratorState._reset_state(True)
    with pytest.raises(FileExistsError, match="resume=auto"):
        T.train(train_config(store, tmp_path / "run", golden, resume="none"))
    AcceleratorState._reset_state(True)
    with pytest.raises(ValueError, match="global_batch_size: 8 on disk, 4 now"):
        T.train(train_config(store, tmp_path / "run", golden, global_batch_size=4))
    AcceleratorState._reset_state(True)
    other = write_store(tmp_path / "other", golden, num_images=24)
    with pytest.raises(ValueError, match="store_fingerprint"):
        T.train(train_config(other, tmp_path / "run", golden))


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, store, golden, monkeypatch):
    real, calls = T.cross_entropy_per_group, []

    def nan_on_step_5(logits, codes):  # grad_accum 2: micro-step 9 belongs to optimizer step 5
        calls.append(1)
        loss, per_group = real(logits, codes)
        return (loss * float("nan"), per_group) if len(calls) == 9 else (loss, per_group)

    monkeypatch.setattr(T, "cross_entropy_per_group", nan_on_step_5)
    cfg = train_config(store, tmp_path / "run", golden)
    with pytest.raises(FloatingPointError, match=r"not finite at step 5: stopping at step 6.*step_0000004"):
        T.train(cfg)  # no host sync per step: seen at the next log line (step 6), before it is logged or saved
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_0000002", "step_0000004"]
    assert not (tmp_path / "run/export").exists()
    assert [json.loads(line)["step"] for line in (tmp_path / "run/log.jsonl").read_text().splitlines()] == [2, 4]
    state = json.loads((tmp_path / "run/checkpoints/step_0000004/train_state.json").read_text())
    weights = load_file(tmp_path / "run/checkpoints/step_0000004/model.safetensors")
    assert state["step"] == 4 and all(torch.isfinite(w).all() for w in weights.values())


def test_two_processes_learn_and_match_one_process(tmp_path, store, golden, repo, hydra_presets):
    """Two gloo ranks through `accelerate launch` and hydra; the same global batch on one rank gives the same run."""
    overrides = [f"data.codes_dir={store}", f"tokenizer.checkpoint={golden / 'tokenizer_tiny.pt'}", "model=tiny",
                 "model.dim=32", "model.n_layer=2", "model.n_head=2", "max_steps=50", "global_batch_size=16",
                 "lr=3e-3", "precision=fp32", "log_every=10", "ckpt_every=50", "data.num_workers=0", "seed=1",
                 "model.class_dropout_prob=0", "model.token_dropout_p=0", "model.resid_dropout_p=0",
                 "model.ffn_dropout_p=0"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(repo / "scripts/train_gpt.py"), f"out_dir={tmp_path / 'two'}", *overrides]
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]

    log = [json.loads(line) for line in (tmp_path / "two/log.jsonl").read_text().splitlines()]
    assert [r["num_processes"] for r in log] == [2] * 5
    assert (tmp_path / "two/checkpoints/step_0000050/random_states_1.pkl").is_file()
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]  # ln(64) = 4.16 at the start
    assert log[-1]["loss"] < 2.0
    assert all(log[-1][f"loss_g{g}"] < log[0][f"loss_g{g}"] for g in range(G))

    # One process with grad_accum 2 sees the same 16 images per step: the same run up to summation order.
    with initialize_config_dir(str(repo / "conf"), version_base=None):
        composed = compose("train_gpt", overrides=[f"out_dir={tmp_path / 'one'}", "grad_accum=2", *overrides])
    T.train(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(T.TrainConfig), composed)))
    one = [json.loads(line) for line in (tmp_path / "one/log.jsonl").read_text().splitlines()]
    assert [r["num_processes"] for r in one] == [1] * 5
    np.testing.assert_allclose([r["loss"] for r in one], [r["loss"] for r in log], rtol=1e-5)
    a = load_file(tmp_path / "one/checkpoints/step_0000050/model.safetensors")
    b = load_file(tmp_path / "two/checkpoints/step_0000050/model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_a_second_run_into_the_same_out_dir_is_refused_and_the_first_finishes_as_alone(tmp_path, store, golden,
                                                                                      repo, second_run_refused):
    """Two train_gpt.py runs into one out_dir: the second is refused naming the first (its pid and command); the
    first, paused meanwhile, then ends with the log and weights of a run alone (before, both wrote the same
    .tmp_step_* directory and log.jsonl)."""
    overrides = [f"data.codes_dir={store}", f"tokenizer.checkpoint={golden / 'tokenizer_tiny.pt'}", "model=tiny",
                 "model.dim=32", "model.n_layer=2", "model.n_head=2", "max_steps=6", "global_batch_size=8",
                 "lr=3e-3", "precision=fp32", "log_every=2", "ckpt_every=2", "data.num_workers=0", "seed=1"]
    cmd = [sys.executable, str(repo / "scripts/train_gpt.py"), f"out_dir={tmp_path / 'run'}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    second_run_refused(cmd, tmp_path / "run", repo, env)

    alone = subprocess.run([*cmd[:2], f"out_dir={tmp_path / 'alone'}", *overrides], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-3000:]
    timing = ("steps_per_s", "tokens_per_s")
    logs = [[{k: v for k, v in json.loads(line).items() if k not in timing}
             for line in (tmp_path / name / "log.jsonl").read_text().splitlines()] for name in ("run", "alone")]
    assert [r["step"] for r in logs[0]] == [2, 4, 6] and logs[0] == logs[1]
    a, b = (load_file(tmp_path / name / "checkpoints/step_0000006/model.safetensors") for name in ("run", "alone"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
