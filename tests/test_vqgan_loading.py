"""Strict loading of LlamaGen VQ and IBQ files in their official layouts (key names recorded in tests/fixtures)."""
import argparse

import pytest
import torch

from tokenizer import load_tokenizer, save_tokenizer
from tokenizer.families.vqgan.model import VQGAN, VQGANConfig


class NotAllowed:
    """A class the weights-only unpickler must refuse (it is never instantiated by loading)."""


@pytest.fixture(scope="module")
def llamagen(golden_fixture):
    fx = golden_fixture("llamagen_vq", "tokenizer")
    fx["vq_config"] = VQGANConfig(quantizer="cosine", attn_levels=[2], **fx["config"])
    return fx


@pytest.fixture(scope="module")
def ibq(golden_fixture):
    fx = golden_fixture("ibq", "tokenizer")
    fx["vq_config"] = VQGANConfig(quantizer="dot", **fx["config"])
    return fx


def llamagen_file(tmp_path, fx, official_weights, drop=None, extra=None, ema=True):
    sd = official_weights(fx["official_keys"], fx["seed"])
    if drop:
        del sd[drop]
    if extra:
        sd[extra] = torch.zeros(1)
    blob = {"model": sd, "args": argparse.Namespace(vq_model="VQ-16", codebook_size=64, ema=ema), "steps": 10}
    if ema:
        blob["ema"] = {k: v * 0.5 if v.is_floating_point() else v for k, v in sd.items()}
    path = tmp_path / "vq_ds16_c2i.pt"
    torch.save(blob, path)
    return path


def test_llamagen_file_loads_model_weights_by_default(tmp_path, llamagen, official_weights):
    path = llamagen_file(tmp_path, llamagen, official_weights)
    model = load_tokenizer(path, llamagen["vq_config"], family="llamagen_vq")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    pixels = model.decode_codes(llamagen["codes"][..., None])
    assert ((pixels - llamagen["pixels"]).abs().max() / llamagen["pixels"].abs().max()) < 1e-4
    ema = load_tokenizer(path, llamagen["vq_config"], family="llamagen_vq", weights="ema")
    assert torch.equal(ema.quant_conv.weight, model.quant_conv.weight * 0.5)
    assert torch.equal(load_tokenizer(path, llamagen["vq_config"], family="llamagen_vq", weights="raw")
                       .quant_conv.weight, model.quant_conv.weight)
    no_ema = llamagen_file(tmp_path, llamagen, official_weights, ema=False)
    with pytest.raises(ValueError, match="no 'ema' weights"):
        load_tokenizer(no_ema, llamagen["vq_config"], family="llamagen_vq", weights="ema")


@pytest.mark.parametrize("drop, extra, named", [
    ("encoder.conv_blocks.2.attn.1.q.bias", None, "encoder.down.2.attn.1.q.bias"),
    ("decoder.conv_blocks.0.res.2.conv1.weight", None, "decoder.up.2.block.2.conv1.weight"),
    (None, "decoder.conv_blocks.0.extra.weight", "decoder.up.2.extra.weight"),
])
def test_llamagen_missing_or_extra_key_names_itself(tmp_path, llamagen, official_weights, drop, extra, named):
    path = llamagen_file(tmp_path, llamagen, official_weights, drop=drop, extra=extra)
    with pytest.raises(RuntimeError, match=("missing" if drop else "unexpected") + r" keys \(1\): " + named):
        load_tokenizer(path, llamagen["vq_config"], family="llamagen_vq")


def lightning_file(tmp_path, fx, official_weights, name="imagenet256_16384.ckpt", edit=None):
    sd = official_weights(fx["official_keys"], fx["seed"])
    sd = {k: sd[k] for k in fx["official_keys"]}
    if edit:
        edit(sd)
    path = tmp_path / name
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 1000, "pytorch-lightning_version": "2.3.0",
                "hyper_parameters": {"n_embed": 64, "embed_dim": 16, "use_ema": True}}, path)
    return path


@pytest.mark.parametrize("weights, expect", [("auto", "ema"), ("ema", "ema"), ("raw", "raw")])
def test_ibq_lightning_file_ema_by_default(tmp_path, ibq, official_weights, weights, expect):
    model = load_tokenizer(lightning_file(tmp_path, ibq, official_weights), ibq["vq_config"], family="ibq",
                           weights=weights)
    want = ibq[expect]
    sure = want["margin"] > 1e-4
    assert torch.equal(model.encode_codes(ibq["images"])[..., 0][sure], want["codes"][sure])
    pixels = model.decode_codes(want["codes"][..., None])
    assert ((pixels - want["pixels"]).abs().max() / want["pixels"].abs().max()) < 1e-4


def test_ibq_ar_checkpoint_carries_its_tokenizer(tmp_path, ibq, official_weights, golden_fixture):
    ar_keys = golden_fixture("ibq", "gpt")["official_keys"]
    tok = {k[len("first_stage_model."):]: v for k, v in ar_keys.items() if k.startswith("first_stage_model.")}
    sd = {f"first_stage_model.{k}": v for k, v in official_weights(tok, 5).items()}
    sd["transformer.head.weight"] = torch.zeros(64, 64)
    torch.save({"state_dict": sd}, tmp_path / "AR_256_B.ckpt")
    model = load_tokenizer(tmp_path / "AR_256_B.ckpt", ibq["vq_config"], family="ibq")
    assert torch.equal(model.quantize.embedding.weight, sd["first_stage_model.quantize.embedding.weight"])
    with pytest.raises(ValueError, match="EMA weights only"):
        load_tokenizer(tmp_path / "AR_256_B.ckpt", ibq["vq_config"], family="ibq", weights="raw")


def _drop_ema(sd):
    del sd["model_ema.decoderup1block2conv2weight"]


def _extra_ema(sd):
    sd["model_ema.encoderextraweight"] = torch.zeros(1)


def _extra_raw(sd):
    sd["quant_conv.scale"] = torch.zeros(1)


@pytest.mark.parametrize("edit, weights, error, named", [
    (_drop_ema, "auto", ValueError, "model_ema.decoderup1block2conv2weight"),
    (_extra_ema, "ema", RuntimeError, "unexpected keys \\(1\\): model_ema.encoderextraweight"),
    (_extra_raw, "raw", RuntimeError, "unexpected keys \\(1\\): quant_conv.scale"),
    (lambda sd: sd.pop("encoder.mid.attn_1.k.bias"), "raw", RuntimeError, "missing keys \\(1\\): encoder.mid.attn_1.k.bias"),
])
def test_ibq_missing_or_extra_key_names_itself(tmp_path, ibq, official_weights, edit, weights, error, named):
    path = lightning_file(tmp_path, ibq, official_weights, edit=edit)
    with pytest.raises(error, match=named):
        load_tokenizer(path, ibq["vq_config"], family="ibq", weights=weights)


def test_project_file_round_trip_records_the_family(tmp_path, ibq):
    model = VQGAN(ibq["vq_config"]).eval()
    save_tokenizer(model, tmp_path / "tok.pt")
    blob = torch.load(tmp_path / "tok.pt", weights_only=True)
    assert blob["family"] == "ibq" and blob["config"]["quantizer"] == "dot"
    again = load_tokenizer(tmp_path / "tok.pt", family="ibq")
    assert torch.equal(again.decode_codes(ibq["ema"]["codes"][..., None]), model.decode_codes(ibq["ema"]["codes"][..., None]))
    with pytest.raises(ValueError, match="holds a 'ibq' tokenizer, not family='llamagen_vq'"):
        load_tokenizer(tmp_path / "tok.pt", family="llamagen_vq")
    with pytest.raises(ValueError, match="holds a 'ibq' tokenizer, not family='mgvq'"):
        load_tokenizer(tmp_path / "tok.pt")
    with pytest.raises(ValueError, match="quantizer='cosine'"):  # an IBQ file read as LlamaGen's architecture
        load_tokenizer(lightning_file(tmp_path, ibq, lambda keys, seed: {k: torch.zeros(s) for k, (s, _) in keys.items()}),
                       ibq["vq_config"], family="llamagen_vq")
    with pytest.raises(ValueError, match="unknown tokenizer family 'vq'"):
        load_tokenizer(tmp_path / "tok.pt", family="vq")


def test_unsafe_pickles_are_refused_by_name(tmp_path):
    torch.save({"model": {"w": torch.ones(1)}, "args": NotAllowed()}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="NotAllowed"):
        load_tokenizer(tmp_path / "bad.pt", family="llamagen_vq")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_tokenizer(tmp_path / "absent.pt", family="ibq")
