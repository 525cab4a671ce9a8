"""Shared fixtures: where the golden vectors live, and a repo-root path for launching scripts."""
from pathlib import Path

import pytest
import torch

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
    from tokenizer.config import MGVQConfig, TokenizerRef
    from tokenizer.magvit2 import Magvit2Config

    for name, arch in MGVQConfig.named_presets().items():
        ConfigStore.instance().store(group="tokenizer", name=name, node=TokenizerRef(config=arch))
    for name, arch in Magvit2Config.named_presets().items():
        ConfigStore.instance().store(group="tokenizer", name=name, node=TokenizerRef(config=arch, family="open_magvit2"))
    for name, model in GPTConfig.named_presets().items():
        ConfigStore.instance().store(group="model", name=name, node=model)
