"""FSDP2 training on two gloo CPU ranks, through accelerate's own FSDP2 path and conf/accelerate/fsdp.yaml.

accelerate never selects FSDP on CPU; tests/fsdp_cpu_train.py sets it by hand after the Accelerator is built
and runs scripts/train_gpt.py unchanged (its docstring says why that is the GPU path: same plugin from the same
YAML, same `fully_shard` wrap policy with each `Block` a unit, same mixed-precision policy, same sharded
checkpoints, same training step).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import gpt.train as T
from gpt import load_gpt
from test_train import tiny_model, train_config, write_store

# No dropout of any kind: the ranks' dropout streams differ by design, so only a dropout-free run can equal one
# process. EMA on, so the sharded EMA is checkpointed, resumed and gathered for the export.
RUN = dict(max_steps=6, global_batch_size=8, lr=3e-3, lr_schedule="cosine", warmup_steps=2, log_every=2,
           ckpt_every=2, keep_last=3, ema=0.9, seed=3)
NO_DROPOUT = dict(class_dropout_prob=0.0, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)


def launch_fsdp(repo, store, golden, out_dir, precision: str, env_extra: dict, **run) -> subprocess.CompletedProcess:
    overrides = [f"data.codes_dir={store}", f"tokenizer.checkpoint={golden / 'tokenizer_tiny.pt'}", "model=tiny",
                 "model.dim=32", "model.n_layer=2", "model.n_head=2", "data.num_workers=0", f"precision={precision}",
                 f"out_dir={out_dir}", *(f"model.{k}={v}" for k, v in NO_DROPOUT.items()),
                 *(f"{k}={v}" for k, v in {**RUN, **run}.items())]
    # scripts/ on PYTHONPATH: the helper runs scripts/train_gpt.py, which imports _hydra from beside it. The caller's
    # PYTHONPATH is kept after it (a checkout tested with an environment installed from another one).
    path = os.pathsep.join(p for p in (str(repo / "scripts"), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": path,
           **env_extra}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(repo / "conf/accelerate/fsdp.yaml"),
           "--num_processes", "2", "--mixed_precision", {"fp32": "no"}.get(precision, precision),
           "--main_process_port", "0", str(repo / "tests/fsdp_cpu_train.py"), *overrides]
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=240)


def read_log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture
def store(tmp_path, golden):
    return write_store(tmp_path / "codes", golden)


def test_fsdp_killed_and_resumed_equals_one_process(tmp_path, store, golden, repo, fresh_accelerate_state):
    """float32, 2 ranks: killed at step 5 (after the sharded checkpoint of step 4), rerun, it resumes and ends
    where one process with the same global batch ends (grad_accum 2; test_train shows that run equals DDP):
    losses to 1e-5 relative, exported EMA weights to 1e-6 (measured: 4e-9). Equal weights also mean the two ranks
    built the same initial model: FSDP shards each rank's own copy and broadcasts nothing (with a per-rank seed
    at model build, this test fails)."""
    killed = launch_fsdp(repo, store, golden, tmp_path / "fsdp", "fp32", {"FSDP_KILL_AT": "5"})
    assert killed.returncode != 0 and not (tmp_path / "fsdp/export").exists()
    step4 = tmp_path / "fsdp/checkpoints/step_0000004"
    assert sorted(p.name for p in (step4 / "pytorch_model_fsdp_0").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (step4 / "custom_checkpoint_0.pkl").is_file() and (step4 / "random_states_1.pkl").is_file()
    resumed = launch_fsdp(repo, store, golden, tmp_path / "fsdp", "fp32", {})
    assert resumed.returncode == 0, resumed.stderr[-4000:]

    one = T.train(train_config(store, tmp_path / "one", golden, model=tiny_model(**NO_DROPOUT), grad_accum=2,
                               precision="fp32", **RUN))
    fsdp_log, one_log = read_log(tmp_path / "fsdp"), read_log(tmp_path / "one")
    assert [r["step"] for r in fsdp_log] == [2, 4, 6] and [r["num_processes"] for r in fsdp_log] == [2, 2, 2]
    np.testing.assert_allclose([r["loss"] for r in fsdp_log], [r["loss"] for r in one_log], rtol=1e-5)
    a = torch.load(one, weights_only=True)["model"]
    b = load_gpt(tmp_path / "fsdp/export/model.pt").state_dict()  # the sampler's loader reads the FSDP export
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    live = torch.load(tmp_path / "fsdp/checkpoints/step_0000006/custom_checkpoint_0.pkl", weights_only=True)
    assert all(torch.equal(live[k], b[k]) for k in b)  # the export is the EMA, gathered


def test_fsdp_bf16_loss_is_float32(tmp_path, store, golden, repo, fresh_accelerate_state):
    """Our contract under bf16 FSDP2, whatever dtype accelerate hands the loss its logits in (bf16 under 1.15's
    output_dtype policy, float32 under 1.16): every linear layer of the forward computes in bf16, the loss and its
    per-group terms are float32, and the loss of steps 3-4 is within 0.1% of a float32 run's (measured: 3e-6
    relative). Weights are not compared: Adam turns bf16 noise in near-zero gradients into full-size steps (up to
    11% of a tensor's scale here)."""
    probe = tmp_path / "probe.jsonl"
    result = launch_fsdp(repo, store, golden, tmp_path / "bf16", "bf16", {"FSDP_PROBE": str(probe)}, max_steps=4)
    assert result.returncode == 0, result.stderr[-4000:]
    seen = [json.loads(line) for line in probe.read_text().splitlines()]
    assert len(seen) == 4 and all(s == {"linear": ["torch.bfloat16"], "loss": "torch.float32",
                                        "per_group": "torch.float32"} for s in seen), seen
    reference = T.train(train_config(store, tmp_path / "fp32", golden, model=tiny_model(**NO_DROPOUT), grad_accum=2,
                                     precision="fp32", **{**RUN, "max_steps": 4}))
    assert reference.is_file()
    bf16, fp32 = read_log(tmp_path / "bf16")[-1], read_log(tmp_path / "fp32")[-1]
    assert bf16["num_processes"] == 2 and abs(bf16["loss"] - fp32["loss"]) < 1e-3 * fp32["loss"]
    assert load_gpt(tmp_path / "bf16/export/model.pt").config.dim == 32
