"""The released LlamaGen c2i and IBQ-AR GPTs: their official files load strictly into `GPT` and give the official
logits (teacher-forced and cached, tests/fixtures/{llamagen_vq,ibq}/gpt.pt)."""
import argparse

import pytest
import torch

from conftest import family_fixture
from gpt.config import GPTConfig
from gpt.loading import load_gpt
from gpt.model import GPT

RTOL = 1e-4


def close(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def tiny(fx: dict, adaln: bool) -> GPTConfig:
    c = fx["config"]
    dim = c.get("dim", c.get("n_embd"))
    return GPTConfig.single_codebook("tiny", codes_per_group=c["vocab_size"], grid_size=4, dim=dim, n_layer=c["n_layer"],
                                     n_head=c["n_head"], num_classes=c.get("num_classes", c.get("class_num")),
                                     multiple_of=c["multiple_of"], class_adaln=adaln)


@torch.no_grad()
def cached_logits(model: GPT, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Logits (B, L, V) of the cached path fed the given codes (G = 1)."""
    model.setup_cache(codes.shape[0])
    steps = [model.sub_logits(model.prefill(labels), 0)]
    for t in range(1, codes.shape[1]):
        steps.append(model.sub_logits(model.decode_step(codes[:, t - 1], t), 0))
    model.clear_cache()
    return torch.stack(steps, 1)


llamagen = family_fixture("llamagen", "llamagen_vq", "gpt")
ibq = family_fixture("ibq", "ibq", "gpt")


def test_llamagen_c2i_file_matches_official(tmp_path, llamagen, official_weights):
    sd = official_weights(llamagen["official_keys"], llamagen["seed"])
    torch.save({"model": sd, "args": argparse.Namespace(gpt_model="GPT-B"), "steps": 7}, tmp_path / "c2i_B_256.pt")
    model = load_gpt(tmp_path / "c2i_B_256.pt", tiny(llamagen, adaln=False))
    assert torch.equal(model.head.proj.weight, sd["output.weight"])  # the head is `output`
    codes, labels = llamagen["codes"][..., None], llamagen["labels"]
    assert close(model(codes, labels)[..., 0, :], llamagen["logits"]) < RTOL
    assert close(cached_logits(model, codes, labels), llamagen["cached_logits"]) < RTOL


def ibq_file(tmp_path, fx, official_weights, edit=None):
    sd = official_weights(fx["official_keys"], fx["seed"])
    if edit:
        edit(sd)
    torch.save({"state_dict": sd, "epoch": 1, "global_step": 9}, tmp_path / "AR_256_B.ckpt")
    return tmp_path / "AR_256_B.ckpt"


def test_ibq_ar_file_matches_official(tmp_path, ibq, official_weights):
    # The fixture's GPT weights were drawn from the GPT's own keys (without `transformer.`) with the same seed.
    gpt_keys = {k[len("transformer."):]: v for k, v in ibq["official_keys"].items() if k.startswith("transformer.")}
    gpt_sd = official_weights(gpt_keys, ibq["seed"])
    tok_sd = {k: torch.zeros(s) for k, (s, _) in ibq["official_keys"].items() if k.startswith("first_stage_model.")}
    torch.save({"state_dict": {**{f"transformer.{k}": v for k, v in gpt_sd.items()}, **tok_sd}},
               tmp_path / "AR_256_B.ckpt")
    model = load_gpt(tmp_path / "AR_256_B.ckpt", tiny(ibq, adaln=True))
    assert torch.equal(model.norm_ada_lin[1].bias, gpt_sd["head_nm.ada_lin.1.bias"])
    codes, labels = ibq["codes"][..., None], ibq["labels"]
    assert close(model(codes, labels)[..., 0, :], ibq["logits"]) < RTOL
    assert close(cached_logits(model, codes, labels), ibq["cached_logits"]) < RTOL
    with pytest.raises(ValueError, match=r"norm_ada_lin\.1\.bias"):
        load_gpt(tmp_path / "AR_256_B.ckpt", tiny(ibq, adaln=False))


@pytest.mark.parametrize("edit, named", [
    (lambda sd: sd.pop("transformer.blocks.1.ada_lin.1.bias"), "layers.1.ada_lin.1.bias"),
    (lambda sd: sd.update({"transformer.shared_ada_lin.1.weight": torch.zeros(1)}), "shared_ada_lin.1.weight"),
    (lambda sd: sd.update({"cond_stage_model.table": torch.zeros(1)}), "cond_stage_model.table"),
])
def test_ibq_ar_missing_or_extra_key_names_itself(tmp_path, ibq, official_weights, edit, named):
    with pytest.raises(ValueError, match=named):
        load_gpt(ibq_file(tmp_path, ibq, official_weights, edit), tiny(ibq, adaln=True))


@pytest.mark.parametrize("drop, extra", [("layers.0.attention.wo.weight", None), (None, "tok_embeddings.bias")])
def test_llamagen_missing_or_extra_key_names_itself(tmp_path, llamagen, official_weights, drop, extra):
    sd = official_weights(llamagen["official_keys"], llamagen["seed"])
    if drop:
        del sd[drop]
    if extra:
        sd[extra] = torch.zeros(1)
    torch.save({"model": sd}, tmp_path / "c2i.pt")
    with pytest.raises(ValueError, match=drop or extra):
        load_gpt(tmp_path / "c2i.pt", tiny(llamagen, adaln=False))
    with pytest.raises(ValueError, match="official LlamaGen layout, which stores no config"):
        load_gpt(tmp_path / "c2i.pt")


def test_released_presets_build_the_published_sizes():
    with torch.device("meta"):  # parameter counts: LlamaGen GPT-B 111M, IBQ-AR-B 342M (their READMEs)
        b = GPT(GPTConfig.single_codebook("gpt_b", 16384))
        ibq_b = GPT(GPTConfig.single_codebook("ibq_ar_b", 16384))
    n_b, n_ibq = (sum(p.numel() for p in m.parameters()) for m in (b, ibq_b))
    assert 110e6 < n_b < 112e6 and 340e6 < n_ibq < 345e6, (n_b, n_ibq)
    assert b.norm_ada_lin is None and ibq_b.layers[0].ada_lin is not None and not GPTConfig().class_adaln


def test_sampler_loads_an_ibq_ar_file_with_its_own_tokenizer(tmp_path, ibq, official_weights, golden_fixture):
    """One IBQ-AR file gives both models: `gpt_official={preset: ...}` builds the GPT, the tokenizer is its
    `first_stage_model.*`; the GPT's logits are the official ones and the tokenizer decodes."""
    from sampling.sampler import ModelFiles, Sampler, SamplerConfig, load_models
    from tokenizer import TokenizerRef, VQGANConfig

    gpt_keys = {k[len("transformer."):]: v for k, v in ibq["official_keys"].items() if k.startswith("transformer.")}
    tok_keys = {k: v for k, v in ibq["official_keys"].items() if k.startswith("first_stage_model.")}
    sd = {**{f"transformer.{k}": v for k, v in official_weights(gpt_keys, ibq["seed"]).items()},
          **official_weights(tok_keys, 3)}
    torch.save({"state_dict": sd}, tmp_path / "AR_256_B.ckpt")
    tok_cfg = golden_fixture("ibq", "tokenizer")["config"]
    c = ibq["config"]
    files = ModelFiles(gpt_ckpt=str(tmp_path / "AR_256_B.ckpt"),
                       tokenizer=TokenizerRef(config=VQGANConfig(quantizer="dot", **tok_cfg),
                                              checkpoint=str(tmp_path / "AR_256_B.ckpt"), family="ibq"),
                       gpt_official={"preset": "tiny", "grid_size": 4, "dim": c["n_embd"], "n_layer": c["n_layer"],
                                     "n_head": c["n_head"], "num_classes": c["class_num"],
                                     "multiple_of": c["multiple_of"], "class_adaln": True})
    gpt, tokenizer = load_models(files)
    assert close(cached_logits(gpt, ibq["codes"][..., None], ibq["labels"]), ibq["cached_logits"]) < RTOL
    sampler = Sampler(gpt, tokenizer, SamplerConfig(cfg_scale=2.25, temperature=1.1, seed=0), files)
    images = sampler.sample(torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert images.shape == (2, 16, 16, 3)
