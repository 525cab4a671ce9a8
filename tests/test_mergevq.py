"""The mergevq tokenizer family against the official ApexGen-X/MergeVQ code (tests/fixtures/mergevq, README)."""
from pathlib import Path

import pytest
import torch
from conftest import randomised
from test_configs import tokenizer_ref

from tokenizer.families.magvit2 import lfq_quantize
from tokenizer.families.mergevq import MergeVQ, MergeVQConfig
from tokenizer.families.mergevq.tome import merge_candidates, merge_schedule, sampled_merge_num, tokens_left
from tokenizer.loading import TokenizerRef, load_tokenizer, named_refs, save_tokenizer
from tokenizer.merged import unmerge
from tokenizer.registry import family_of

FIXTURE = Path(__file__).parent / "fixtures" / "mergevq" / "tokenizer.pt"
TINY = {"ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1, "num_att_blocks": 3, "num_heads": 2, "z_channels": 5,
        "dist_head": "layer3", "num_classes": 8, "factorized_bits": [2, 3]}


def close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIXTURE, weights_only=True)


def lightning_state_dict(fixture) -> dict:
    """The official checkpoint's state_dict: the fixture's raw and EMA weights under the official key names, the
    loss / teacher / EMA counter entries as zeros."""
    raw = randomised(fixture["raw_keys"], fixture["seeds"]["raw"])
    ema = randomised(fixture["raw_keys"], fixture["seeds"]["ema"])
    sd = {k: torch.zeros(shape, dtype=getattr(torch, dtype.split(".")[1]))
          for k, (shape, dtype) in fixture["lightning_keys"].items()}
    sd.update(raw)
    sd.update({"model_ema." + k.replace(".", ""): v for k, v in ema.items()})
    assert set(sd) == set(fixture["lightning_keys"])  # nothing but the official names
    return sd


@pytest.fixture
def checkpoint(fixture, tmp_path):
    sd = lightning_state_dict(fixture)
    path = tmp_path / "mergevq_tiny.ckpt"
    torch.save({"state_dict": sd, "epoch": 1}, path)
    return path, sd


@pytest.mark.parametrize("merge_num", [28, 0])
@pytest.mark.parametrize("weights", ["raw", "ema"])
def test_parity_with_official(fixture, checkpoint, merge_num, weights):
    model = load_tokenizer(checkpoint[0], {**TINY, "merge_num": merge_num}, family="mergevq", weights=weights)
    want, x = fixture["io"][merge_num][weights], fixture["images"]
    K = 64 - merge_num
    latent, token_map = model.encode(x)
    assert latent.shape == (2, K, 5) and token_map.shape == (2, 8, 8)
    close(latent, want["latent"])
    # The source matrix: merged token k covers grid position p.
    S = torch.nn.functional.one_hot(token_map.flatten(1), K).transpose(1, 2)
    assert torch.equal(S.to(torch.uint8), want["source"])
    codes, token_map2 = model.encode_merged(x)
    sure = want["latent"].abs().min(-1).values > 1e-4  # tokens whose every bit has a margin
    assert sure.float().mean() > 0.9
    assert torch.equal(codes[sure], want["merged_codes"][sure]) and torch.equal(token_map2, token_map)
    # Grid codes: the official un-merged quant map's bits, in this project's factorization.
    grid = model.encode_codes(x)
    grid_want = lfq_quantize(want["quant_grid"].permute(0, 2, 3, 1), TINY["factorized_bits"])
    grid_sure = unmerge(sure[..., None], token_map)[..., 0]
    assert torch.equal(grid[grid_sure], grid_want[grid_sure])
    # Decoding: the official decode of the merged tokens, from grid codes and from merged codes + map.
    official_grid = unmerge(want["merged_codes"], token_map)
    close(model.decode_codes(official_grid), want["pixels"])
    close(model.decode_merged(want["merged_codes"], token_map), want["pixels"])
    close(model.distill_logits(x), want["dist_logits"])


def test_auto_is_raw_and_project_file_round_trip(fixture, checkpoint, tmp_path):
    auto = load_tokenizer(checkpoint[0], {**TINY, "merge_num": 28}, family="mergevq")
    close(auto.decode_codes(unmerge(*auto.encode_merged(fixture["images"]))), fixture["io"][28]["raw"]["pixels"])
    save_tokenizer(auto, tmp_path / "mine.pt")
    again = load_tokenizer(tmp_path / "mine.pt", family="mergevq")
    assert again.config == auto.config and family_of(again) == "mergevq"
    assert torch.equal(again.encode_codes(fixture["images"]), auto.encode_codes(fixture["images"]))


def test_strict_loading_names_the_key(checkpoint, tmp_path):
    _, sd = checkpoint
    tiny = {**TINY, "merge_num": 28}
    missing = {k: v for k, v in sd.items() if k != "decoder.attn.blocks.1.ls2.gamma"}
    torch.save({"state_dict": missing}, tmp_path / "m.ckpt")
    with pytest.raises(RuntimeError, match=r"missing keys \(1\): decoder.attn.blocks.1.ls2.gamma"):
        load_tokenizer(tmp_path / "m.ckpt", tiny, family="mergevq", weights="raw")
    with pytest.raises(ValueError, match=r"unknown EMA entries \['decoderattnblocks1ls2gamma'\]"):
        load_tokenizer(tmp_path / "m.ckpt", tiny, family="mergevq", weights="ema")
    extra = {**sd, "encoder.conv_in.bias": torch.zeros(32)}  # the official conv_in has no bias
    torch.save({"state_dict": extra}, tmp_path / "x.ckpt")
    with pytest.raises(RuntimeError, match=r"unexpected keys \(1\): encoder.conv_in.bias"):
        load_tokenizer(tmp_path / "x.ckpt", tiny, family="mergevq", weights="raw")
    learned = {**sd, "recovery.rec_tokens": torch.zeros(1, 64, 8)}  # learn_source: True is not supported
    torch.save({"state_dict": learned}, tmp_path / "r.ckpt")
    with pytest.raises(ValueError, match=r"unexpected entries \['recovery.rec_tokens'\]"):
        load_tokenizer(tmp_path / "r.ckpt", tiny, family="mergevq")
    no_ema = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
    torch.save({"state_dict": no_ema}, tmp_path / "n.ckpt")
    with pytest.raises(ValueError, match="no model_ema"):
        load_tokenizer(tmp_path / "n.ckpt", tiny, family="mergevq", weights="ema")
    with pytest.raises(RuntimeError, match="shape mismatches"):  # a G-style 'mlp' head is not the file's
        load_tokenizer(tmp_path / "n.ckpt", {**tiny, "dist_head": "mlp"}, family="mergevq")


def test_key_names_match_the_official_modules(fixture):
    with torch.device("meta"):
        gr = MergeVQ(MergeVQConfig(**TINY))
        g = MergeVQ(MergeVQConfig(**{**TINY, "dist_head": "mlp"}))
    assert {k: (tuple(v.shape), str(v.dtype)) for k, v in gr.state_dict().items()} == fixture["raw_keys"]
    heads = {k: (tuple(v.shape), str(v.dtype)) for k, v in g.state_dict().items() if ".dist_head." in k}
    assert heads == fixture["mlp_head_keys"]


def test_merge_schedule_is_the_official_one(fixture):
    for (layers, merge_num), want in fixture["schedules"].items():
        assert merge_schedule(layers, merge_num) == want, (layers, merge_num)
    assert merge_schedule(12, 112) == [12, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 5]
    assert tokens_left(256, merge_schedule(12, 112)) == 144
    with pytest.raises(ValueError, match="layer 0 would merge 20 of 16 tokens"):
        tokens_left(16, merge_schedule(3, 40))
    with pytest.raises(ValueError, match="layer 0 would merge 20 of 16 tokens"):
        MergeVQ(MergeVQConfig(**{**TINY, "merge_num": 40})).encode(torch.zeros(1, 3, 8, 8))


def test_training_candidates_of_k_are_the_official_ones():
    """Candidates and cumulative probabilities as the official MergeVQEncoder.apply_merge / generate_prob_list give
    them (numbers printed by the official functions at 5267198)."""
    assert merge_candidates(256, 112, "gaussian-6") == (
        [121, 144, 169, 196, 225, 256], [0.11797, 0.78633, 0.90431, 0.93635, 0.96817, 1.0])
    assert merge_candidates(1024, 768, "gaussian-9") == (
        [225, 256, 289, 324, 361, 400, 441, 484, 529],
        [0.10769, 0.7178, 0.82549, 0.85474, 0.88379, 0.91284, 0.94189, 0.97095, 1.0])
    assert merge_candidates(256, 112, "gaussian") == ([121, 144, 169, 196, 225], [0.12185, 0.81218, 0.93403,
                                                                                   0.96713, 1.0])
    assert merge_candidates(256, 112, "exponential-4") == ([144, 169, 196, 225], [0.77426, 0.91093, 0.9613, 1.0])
    assert merge_candidates(256, 112, "uniform-5") == ([144, 169, 196, 225, 256], [0.2, 0.4, 0.6, 0.8, 1.0])
    assert merge_candidates(16, 7, "gaussian-3") == ([4, 9, 16], [0.13046, 0.86954, 1.0])  # mergevq-digits
    # Step s keeps the candidate at quantile (s mod 100) / 100 (bisect_left: a quantile equal to a bound stays below).
    kept = {s: 256 - sampled_merge_num(256, 112, "gaussian-6", s) for s in (0, 11, 12, 78, 79, 90, 91, 93, 94, 96,
                                                                             97, 99, 100, 112)}
    assert kept == {0: 121, 11: 121, 12: 144, 78: 144, 79: 169, 90: 169, 91: 196, 93: 196, 94: 225, 96: 225,
                    97: 256, 99: 256, 100: 121, 112: 144}
    assert sampled_merge_num(256, 112, None, 50) == 112
    with pytest.raises(ValueError, match="cand_distribution='beta-3'"):
        MergeVQConfig(**TINY, cand_distribution="beta-3")
    with pytest.raises(ValueError, match=r"candidates \[0, 1, 4\], outside \[1, 64\]"):
        merge_candidates(64, 63, "gaussian-3")


def test_presets_and_parameter_counts():
    counts = {}
    for name, cfg in MergeVQConfig.named_presets().items():
        with torch.device("meta"):
            counts[name] = round(sum(p.numel() for p in MergeVQ(cfg).parameters()) / 1e6, 2)
    assert counts == {"mergevq-gr-d32": 94.64, "mergevq-gr-d64": 152.85, "mergevq-gr-d96": 342.27,
                      "mergevq-g-d32": 91.43, "mergevq-g-d64": 147.81, "mergevq-digits": 1.25}
    gr, g = MergeVQConfig.preset("mergevq-gr-d64"), MergeVQConfig.preset("mergevq-g-d64")
    assert (gr.downsample, gr.merged_tokens((16, 16)), g.downsample, g.merged_tokens((32, 32))) == (16, 144, 8, 256)
    assert MergeVQConfig.preset("mergevq-gr-d64", merge_num=192).merged_tokens((16, 16)) == 64
    assert gr.codes_per_group == [64, 4096] and gr.codebook_groups == 2
    assert named_refs()["mergevq-gr-d64"].family == "mergevq"


def test_merged_and_grid_codes_agree():
    torch.manual_seed(1)
    model = MergeVQ(MergeVQConfig(**{**TINY, "merge_num": 28})).eval()
    for p in model.parameters():  # random, so that no block is an identity
        p.data = torch.randn_like(p) * (0.3 if p.ndim < 2 else p[0].numel() ** -0.5)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    codes, token_map = model.encode_merged(x)
    assert codes.shape == (3, 36, 2) and codes[..., 0].max() < 4 and codes[..., 1].max() < 8
    # Every merged token covers at least one position; together they cover the grid once.
    assert all(torch.equal(torch.unique(m), torch.arange(36)) for m in token_map)
    grid = model.encode_codes(x)
    assert torch.equal(grid, unmerge(codes, token_map))
    assert torch.equal(model.decode_merged(codes, token_map), model.decode_codes(grid))
    # One image's codes do not depend on the batch it is in.
    assert torch.equal(model.encode_codes(x[1:2]), grid[1:2])
    with pytest.raises(ValueError, match=r"values in \[0, 36\)"):
        model.decode_merged(codes, token_map + 1)


def test_hydra_preset_with_merge_num(repo, hydra_presets):
    ref = tokenizer_ref(repo, ["tokenizer=mergevq-gr-d64", "tokenizer.config.merge_num=192"])
    want = MergeVQConfig.preset("mergevq-gr-d64", merge_num=192)
    assert ref == TokenizerRef(config=want, checkpoint="w.pt", family="mergevq") and want.merged_tokens((16, 16)) == 64
