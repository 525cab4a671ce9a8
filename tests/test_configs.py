"""Every entry point's conf/<name>.yaml composes onto its dataclass schema, and the presets exist once, in Python."""
import dataclasses

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gpt.config import PRESETS, GPTConfig
from gpt.train import TrainConfig
from sampling.demo import DemoConfig
from sampling.metrics import EvalConfig
from sampling.sampler import SampleRunConfig, SamplerConfig
from sampling.sweep import SweepConfig
from tokenizer.extract import ExtractConfig
from tokenizer.families.mgvq.config import MGVQConfig
from tokenizer.loading import TokenizerRef
from tokenizer.recon import ReconConfig
from tokenizer.train import TrainTokenizerConfig

ENTRY_POINTS = {"extract_codes": ExtractConfig, "eval_recon": ReconConfig, "train_tokenizer": TrainTokenizerConfig,
                "train_gpt": TrainConfig, "sample": SampleRunConfig, "demo_gen": DemoConfig, "sweep_cfg": SweepConfig,
                "evaluate": EvalConfig}


def composed(repo, name: str, overrides: list[str] = ()):
    with initialize_config_dir(str(repo / "conf"), version_base=None):
        return compose(name, overrides=list(overrides))


def field_names(schema) -> set[str]:
    return {f.name for f in dataclasses.fields(schema)}


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_conf_holds_exactly_the_schema_fields(repo, name, hydra_presets):
    cfg = composed(repo, name)
    schema = ENTRY_POINTS[name]
    assert set(cfg) == field_names(schema)
    merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)  # unknown keys or wrong types would raise here
    for part in ("sampler", "data", "evaluate", "loss", "codebook"):
        if part in cfg:  # nested settings: exactly their dataclass's fields too
            assert set(cfg[part]) == set(OmegaConf.structured(merged[part]))
    if "tokenizer" in cfg:
        assert set(cfg.tokenizer) <= field_names(TokenizerRef)


def test_sampler_settings_are_written_once(repo, hydra_presets):
    """The three sampling entry points compose the same sampler group; the demo only raises the guidance, and
    the FID sample files (sample, sweep) are resized down to 256, as MGVQ scores ImageNet-256."""
    settings = {name: OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SamplerConfig),
                                                          composed(repo, name).sampler))
                for name in ("sample", "demo_gen", "sweep_cfg")}
    assert settings["sample"] == settings["sweep_cfg"] == dataclasses.replace(SamplerConfig(), eval_size=256)
    assert settings["demo_gen"] == dataclasses.replace(SamplerConfig(), cfg_scale=4.0)


def tokenizer_ref(repo, overrides: list[str]) -> TokenizerRef:
    cfg = composed(repo, "extract_codes", ["tokenizer.checkpoint=w.pt", "data.root=x", "out_dir=y", *overrides])
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExtractConfig), cfg)).tokenizer


@pytest.mark.parametrize("preset", ["mgvq-f8c32-g4", "mgvq-f16c32-g8", "mgvq-f32c32-g4", "digits"])
def test_tokenizer_presets_compose(repo, preset, hydra_presets):
    want = MGVQConfig.named_presets()[preset]
    assert tokenizer_ref(repo, [f"tokenizer={preset}"]) == TokenizerRef(config=want, checkpoint="w.pt")


def test_tokenizer_architecture_overrides(repo, hydra_presets):
    ref = tokenizer_ref(repo, ["tokenizer.config.codebook_groups=8", "tokenizer.config.codebook_size=16384"])
    assert ref.config == MGVQConfig.preset("mgvq-f16c32", 8)  # the default preset, mgvq-f16c32-g4, made G8


@pytest.mark.parametrize("name", list(PRESETS))
def test_model_presets_leave_the_store_fields_unset(repo, name, hydra_presets):
    cfg = composed(repo, "train_gpt", [f"model={name}", "data.codes_dir=x", "tokenizer.checkpoint=t", "out_dir=y"])
    model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)).model
    assert model == GPTConfig.named_presets()[name]
    assert all(getattr(model, f) is None for f in ("num_classes", "codebook_groups", "codes_per_group", "grid_size"))
    assert model.norm_eps == 1e-5


@pytest.mark.parametrize("preset, family", [("llamagen-vq16", "llamagen_vq"), ("ibq-262144", "ibq")])
def test_other_family_presets_compose(repo, preset, family, hydra_presets):
    from tokenizer.families.vqgan.model import VQGANConfig

    ref = tokenizer_ref(repo, [f"tokenizer={preset}", "tokenizer.weights=raw"])
    assert ref == TokenizerRef(config=VQGANConfig.preset(preset), checkpoint="w.pt", family=family, weights="raw")
    with pytest.raises(Exception, match="unknown tokenizer family 'vq'"):
        tokenizer_ref(repo, [f"tokenizer={preset}", "tokenizer.family=vq"])
