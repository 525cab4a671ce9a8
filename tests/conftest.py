"""Shared fixtures: where the golden vectors live, and a repo-root path for launching scripts."""
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
