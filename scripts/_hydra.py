"""The one hydra entry point of every script: compose conf/<name>.yaml onto a dataclass schema, run a function.

The presets of the `tokenizer` and `model` groups are registered here from the library (tokenizer.families.mgvq.config,
gpt.config): they exist in Python only. Settings come from conf/<name>.yaml, overridden as key=value.
"""
import os
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, ValidationError

from gpt.config import GPTConfig
from sampling import zoo
from tokenizer.common.errors import ConfigError, UserError
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
        raise ConfigError(f"zoo={cfg.zoo} needs ckpt_dir=<folder holding {entry.gpt_file} and {entry.tokenizer_file}>")
    out = cfg.copy()
    for key, value in zoo.run_fields(entry, cfg.ckpt_dir).items():
        OmegaConf.update(out, key, value, merge=False)
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if not key.startswith("hydra"):
            OmegaConf.update(out, key, OmegaConf.select(cfg, key), merge=False)
    return out


def message(error: Exception) -> str:
    """An expected error's message; OmegaConf's on one line, led by the key at fault."""
    if isinstance(error, UserError):
        return str(error).strip()
    first = str(error).strip().splitlines()[0]
    return f"{error.full_key}: {first}" if getattr(error, "full_key", None) else first


def main(config_name: str, schema: type, fn, report=None) -> None:
    """Run `fn(config)` on conf/<config_name>.yaml merged onto `schema` (unknown keys and wrong types fail here,
    before any work) with the command line's overrides; `report(result)` prints what it returned.

    An expected error (tokenizer.common.errors.UserError: a bad setting, a missing or damaged file, an out_dir in
    use; OmegaConf's for a required value left unset or a value of the wrong type) prints its message, which
    names the culprit, and exits with status 1 without a traceback; HYDRA_FULL_ERROR=1 shows the traceback
    anyway. Any other exception keeps its traceback."""
    register_presets()

    @hydra.main(version_base=None, config_path=str(CONF), config_name=config_name)
    def entry(cfg: DictConfig) -> None:
        try:  # a required value left at ??? or a value of the wrong type is the user's to fix, as a UserError
            cfg = apply_zoo(cfg, HydraConfig.get().overrides.task)
            config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))
            result = fn(config)
        except (UserError, MissingMandatoryValue, ValidationError) as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {message(e)}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        if report is not None:
            report(result)

    entry()
