"""The open_magvit2 tokenizer family against the official SEED-Voken code (tests/fixtures/open_magvit2, README)."""
from pathlib import Path

import pytest
import torch

from tokenizer.families.magvit2 import Magvit2Config, OpenMagvit2, depth_to_space
from tokenizer.loading import load_tokenizer
from tokenizer.registry import FAMILIES

FIXTURES = Path(__file__).parent / "fixtures" / "open_magvit2"
TINY = {"ch": 32, "ch_mult": [2, 1], "num_res_blocks": 1, "z_channels": 5, "factorized_bits": [2, 3]}


def close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.fixture(scope="module")
def io():
    return torch.load(FIXTURES / "tokenizer_io.pt", weights_only=True)


@pytest.fixture
def lightning_ckpt(tmp_path):
    """The tokenizer's Lightning layout: raw weights and model_ema.<flat name> entries in one state_dict."""
    sd = {**torch.load(FIXTURES / "tokenizer_raw.pt", weights_only=True)["state_dict"],
          **torch.load(FIXTURES / "tokenizer_ema.pt", weights_only=True)["state_dict"]}
    path = tmp_path / "imagenet_tiny.ckpt"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    return path, sd


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_parity_with_official(io, lightning_ckpt, weights):
    model = load_tokenizer(lightning_ckpt[0], TINY, family="open_magvit2", weights=weights)
    want = io[weights]
    latent = model.encode(io["images"])
    close(latent, want["latent"])
    codes = model.encode_codes(io["images"])
    assert codes.shape == (2, 8, 8, 2) and codes.dtype == torch.int64
    assert torch.equal(codes, want["codes_factorized"])
    close(model.decode_codes(codes), want["pixels"])
    # One group of all 5 bits is the official unfactorized index, channel 0 least significant.
    full = load_tokenizer(lightning_ckpt[0], {**TINY, "factorized_bits": [5]}, family="open_magvit2",
                          weights=weights)
    assert torch.equal(full.encode_codes(io["images"])[..., 0], want["codes_full"])
    assert torch.equal(want["codes_full"], want["codes_factorized"][..., 0] + 4 * want["codes_factorized"][..., 1])


def test_auto_weights_and_ar_checkpoint(io, lightning_ckpt, tmp_path):
    path, sd = lightning_ckpt
    auto = load_tokenizer(path, TINY, family="open_magvit2")  # the official AR configs say use_ema: False
    assert torch.equal(auto.encode_codes(io["images"]), io["raw"]["codes_factorized"])
    assert not torch.equal(io["raw"]["codes_factorized"], io["ema"]["codes_factorized"])
    # An AR checkpoint holds the raw tokenizer under first_stage_model. next to the transformer: "auto" = raw.
    ar = {f"first_stage_model.{k}": v for k, v in sd.items() if not k.startswith("model_ema.")}
    ar["transformer.norm.weight"] = torch.ones(4)
    torch.save({"state_dict": ar}, tmp_path / "AR.ckpt")
    model = load_tokenizer(tmp_path / "AR.ckpt", TINY, family="open_magvit2")
    close(model.decode_codes(io["raw"]["codes_factorized"]), io["raw"]["pixels"])
    with pytest.raises(ValueError, match="no model_ema"):
        load_tokenizer(tmp_path / "AR.ckpt", TINY, family="open_magvit2", weights="ema")


def test_strict_loading_names_the_key(lightning_ckpt, tmp_path):
    _, sd = lightning_ckpt
    missing = {k: v for k, v in sd.items() if k != "decoder.up.1.upsample.conv1.bias"}
    torch.save({"state_dict": missing}, tmp_path / "m.ckpt")
    with pytest.raises(RuntimeError, match=r"missing keys \(1\): decoder.up.1.upsample.conv1.bias"):
        load_tokenizer(tmp_path / "m.ckpt", TINY, family="open_magvit2", weights="raw")
    with pytest.raises(ValueError, match="parameters without EMA"):
        load_tokenizer(tmp_path / "m.ckpt", TINY, family="open_magvit2", weights="ema")
    extra = {**sd, "encoder.conv_in.bias": torch.zeros(32)}  # the official conv_in has no bias
    torch.save({"state_dict": extra}, tmp_path / "x.ckpt")
    with pytest.raises(RuntimeError, match=r"unexpected keys \(1\): encoder.conv_in.bias"):
        load_tokenizer(tmp_path / "x.ckpt", TINY, family="open_magvit2", weights="raw")
    with pytest.raises(ValueError, match="stores no config"):
        load_tokenizer(tmp_path / "x.ckpt", None, family="open_magvit2")
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_tokenizer(tmp_path / "nope.ckpt", TINY, family="open_magvit2")


def test_lfq_bits_and_dropped_groups():
    model = OpenMagvit2(Magvit2Config(**TINY))
    latent = torch.tensor([1.0, -2.0, 0.0, 3.0, 0.5]).view(1, 5, 1, 1)  # bits 1 0 | 0 1 1 (0 is not > 0)
    codes = model.codes_of(latent)
    assert codes.flatten().tolist() == [1, 6]
    assert model.latent_of(codes).flatten().tolist() == [1, -1, -1, 1, 1]
    assert model.latent_of(codes, groups_to_use=1).flatten().tolist() == [1, -1, 0, 0, 0]
    every = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(8), indexing="ij"), -1).view(1, 4, 8, 2)
    assert torch.equal(model.codes_of(model.latent_of(every)), every)


def test_depth_to_space_channel_order():
    x = torch.arange(8.0).view(1, 8, 1, 1)  # channel (2*i + j)*2 + c lands at pixel (i, j) of output channel c
    assert depth_to_space(x)[0].tolist() == [[[0.0, 2.0], [4.0, 6.0]], [[1.0, 3.0], [5.0, 7.0]]]


def test_presets_match_the_released_configs():
    f16, f8 = Magvit2Config.preset("open-magvit2-f16"), Magvit2Config.preset("open-magvit2-f8")
    assert (f16.downsample, f8.downsample) == (16, 8)
    assert f16.codes_per_group == [64, 4096] and f16.codebook_groups == 2 and f16.latent_channels == 18
    with torch.device("meta"):
        n = sum(p.numel() for p in OpenMagvit2(f16).parameters())
    assert 100e6 < n < 200e6
    assert FAMILIES["open_magvit2"].model_cls is OpenMagvit2
    with pytest.raises(ValueError, match="sum to z_channels=18"):
        Magvit2Config.preset("open-magvit2-f16", factorized_bits=[6, 6])


def test_checkpoint_with_python_objects_is_refused_clearly(tmp_path):
    torch.save({"state_dict": {}, "hyper_parameters": Magvit2Config()}, tmp_path / "obj.ckpt")
    with pytest.raises(ValueError, match="re-save"):
        load_tokenizer(tmp_path / "obj.ckpt", TINY, family="open_magvit2")
