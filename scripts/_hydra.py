"""The one hydra entry point of every script: compose conf/<name>.yaml onto a dataclass schema, run a function.

The presets of the `tokenizer` and `model` groups are registered here from the library (tokenizer.families.mgvq.config,
gpt.config): they exist in Python only. Settings come from conf/<name>.yaml, overridden as key=value.
"""
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gpt.config import GPTConfig
from sampling import zoo
from tokenizer.loading import named_refs

CONF = Path(__file__).resolve().parents[1] / "conf"


def register_presets() -> None:
    store = ConfigStore.instance()
    for name, ref in named_refs().items():
        store.store(group="tokenizer", name=name, node=ref)
    for name, model in GPTConfig.named_presets().items():
        store.store(group="model", name=name, node=model)


def apply_zoo(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """`zoo=<name>`: the entry's files (inside ckpt_dir) and settings replace the yaml's defaults, and every
    KEY=VALUE of the command line (`overrides`) keeps the value it gave."""
    if not cfg.get("zoo"):
        return cfg
    entry = zoo.get(cfg.zoo)
    if not cfg.get("ckpt_dir"):
        raise ValueError(f"zoo={cfg.zoo} needs ckpt_dir=<folder holding {entry.gpt_file} and {entry.tokenizer_file}>")
    out = cfg.copy()
    for key, value in zoo.run_fields(entry, cfg.ckpt_dir).items():
        OmegaConf.update(out, key, value, merge=False)
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if not key.startswith("hydra"):
            OmegaConf.update(out, key, OmegaConf.select(cfg, key), merge=False)
    return out


def main(config_name: str, schema: type, fn, report=None) -> None:
    """Run `fn(config)` on conf/<config_name>.yaml merged onto `schema` (unknown keys and wrong types fail here,
    before any work) with the command line's overrides; `report(result)` prints what it returned."""
    register_presets()

    @hydra.main(version_base=None, config_path=str(CONF), config_name=config_name)
    def entry(cfg: DictConfig) -> None:
        cfg = apply_zoo(cfg, HydraConfig.get().overrides.task)
        result = fn(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg)))
        if report is not None:
            report(result)

    entry()
