"""Shared fixtures: where the golden vectors live, and a repo-root path for launching scripts."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO.parent / "shared" / "golden"


@pytest.fixture(scope="session")
def golden() -> Path:
    if not GOLDEN.is_dir():
        pytest.fail(f"golden fixtures not found at {GOLDEN}: the checkout needs ../shared beside it")
    return GOLDEN


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def digits(tmp_path_factory, repo) -> Path:
    """64 handwritten digits (16x16 RGB PNGs) as an ImageFolder: the first 64 that scripts/make_digits.py exports."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("digits")
    subprocess.run([sys.executable, str(repo / "scripts" / "make_digits.py"), "--out", str(out), "--size", "16"],
                   check=True, capture_output=True, timeout=120)
    root = tmp_path_factory.mktemp("digits64")
    for path in sorted((out / "train").rglob("*.png"), key=lambda p: p.name)[:64]:  # names are load_digits indices
        (root / path.parent.name).mkdir(exist_ok=True)
        Image.open(path).save(root / path.parent.name / path.name)
    return root


@pytest.fixture
def fresh_accelerate_state():
    """For tests that build an Accelerator in-process: accelerate's process-wide state must not leak between runs."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(autouse=True)
def _deterministic_cpu():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def hydra_presets() -> None:
    """The tokenizer and model presets in hydra's ConfigStore, as scripts/_hydra.py registers them."""
    from hydra.core.config_store import ConfigStore

    from gpt.config import GPTConfig
    from tokenizer.loading import named_refs

    for name, ref in named_refs().items():
        ConfigStore.instance().store(group="tokenizer", name=name, node=ref)
    for name, model in GPTConfig.named_presets().items():
        ConfigStore.instance().store(group="model", name=name, node=model)


_RANDOMISED: dict = {}


def randomised(official_keys: dict, seed: int) -> dict:
    """A fresh copy of `_randomised` (cached: the draws take seconds on a busy CPU)."""
    key = (seed, tuple(official_keys))
    if key not in _RANDOMISED:
        _RANDOMISED[key] = _randomised(official_keys, seed)
    return {k: v.clone() for k, v in _RANDOMISED[key].items()}


def _randomised(official_keys: dict, seed: int) -> dict:
    """The weights of a golden fixture (tests/fixtures/README.md): keys sorted, one generator, float64 draws cast to
    float32; >= 2-D ~ N(0, 1)/sqrt(numel of one row), 1-D '*weight' ~ 1 + 0.2 N, other floats ~ 0.2 N."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(official_keys):
        shape, dtype = official_keys[key]
        if dtype not in ("torch.float32", "torch.float16", "torch.bfloat16", "torch.float64"):
            out[key] = torch.zeros(shape, dtype=getattr(torch, dtype.split(".")[1]))
            continue
        n = torch.randn(shape, generator=g, dtype=torch.float64)
        if len(shape) >= 2:
            n = n / (torch.Size(shape[1:]).numel() ** 0.5)
        else:
            n = 1 + 0.2 * n if key.endswith("weight") else 0.2 * n
        out[key] = n.float()
    return out


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return REPO / "tests" / "fixtures"


@pytest.fixture(scope="session")
def golden_fixture(fixtures_dir):
    """load(family, name): a golden fixture file tests/fixtures/<family>/<name>.pt."""
    return lambda family, name: torch.load(fixtures_dir / family / f"{name}.pt", weights_only=True)


def family_fixture(fixture_name: str, family: str, name: str):
    """A module-scoped fixture `fixture_name` holding tests/fixtures/<family>/<name>.pt (assign it to that name)."""
    return pytest.fixture(scope="module", name=fixture_name)(lambda golden_fixture: golden_fixture(family, name))


@pytest.fixture(scope="session")
def official_weights():
    """randomised(official_keys, seed): rebuild a golden fixture's official state dict."""
    return randomised


def _wait_for_lock(out_dir: Path, proc: subprocess.Popen, timeout: float = 240) -> dict:
    """The holder a launched run recorded in its out_dir's lock file, once it has (it then holds the out_dir)."""
    path, deadline = out_dir / ".run.lock", time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        text = path.read_text() if path.is_file() else ""
        if text.strip():
            return json.loads(text)
        time.sleep(0.05)
    raise AssertionError(f"no lock recorded in {path} (exit code {proc.poll()})")


def _second_run_refused(cmd: list[str], out_dir: Path, cwd: Path, env: dict) -> None:
    """Launch `cmd`; once it holds out_dir, pause it (so it holds it whatever this machine's speed) and run `cmd`
    again: the second run must be refused at once, naming the first (pid, script); then let the first finish,
    which it must do successfully and without a lock file left."""
    first = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        holder = _wait_for_lock(out_dir, first)
        os.kill(first.pid, signal.SIGSTOP)
        second = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert holder["pid"] == first.pid
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert f"is in use by another run (pid {first.pid} on " in second.stderr
    assert Path(cmd[1]).name in second.stderr  # the holder's command
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    assert not (out_dir / ".run.lock").exists()


@pytest.fixture(scope="session")
def second_run_refused():
    """second_run_refused(cmd, out_dir, cwd, env): two concurrent runs of `cmd` into out_dir (conftest)."""
    return _second_run_refused
