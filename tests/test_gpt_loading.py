"""GPT configs and model files: presets, the official MGVQ layout (manifests, strict loading)."""
import dataclasses

import pytest
import torch

from gpt import GPT, GPTConfig, load_gpt
from gpt.config import PRESETS
from gpt.loading import from_official_mgvq_state_dict, to_official_mgvq_state_dict

OFFICIAL_SIZES = {"B": "gpt_b", "L": "gpt_l", "XL": "gpt_xl", "XXL": "gpt_xxl"}
DESIGN_PARAMS_G4 = {"B": 138.9e6, "L": 398.2e6, "XL": 866.3e6, "XXL": 1547.9e6}  # DESIGN.md 4.2


def read_manifest(path):
    lines = path.read_text().splitlines()
    count = int(lines[0].split("\t")[1])
    shapes = {}
    for line in lines[1:]:
        key, shape, dtype = line.split("\t")
        shapes[key] = tuple(int(s) for s in shape.split("x"))
        assert dtype == "float32"
    return count, shapes


def manifest_config(size: str, groups: int) -> GPTConfig:
    official = {**PRESETS[OFFICIAL_SIZES[size]], "vocab_size": {4: 32768, 8: 16384}[groups], "block_size": 256,
                "num_classes": 1000, "codebook_groups": groups, "codebook_embed_dim": 32}
    return GPTConfig.from_official_mgvq(official)


@pytest.mark.parametrize("size", list(OFFICIAL_SIZES))
@pytest.mark.parametrize("groups", [4, 8])
def test_official_manifest_on_meta(golden, size, groups):
    count, shapes = read_manifest(golden / "manifests" / f"GPT-{size}-g{groups}.keys.tsv")
    config = manifest_config(size, groups)
    with torch.device("meta"):
        model = GPT(config)
    official = to_official_mgvq_state_dict(model.state_dict(), config)
    assert {k: tuple(v.shape) for k, v in official.items()} == shapes
    assert sum(v.numel() for v in official.values()) == count
    if groups == 4:
        assert round(count / 1e5) == round(DESIGN_PARAMS_G4[size] / 1e5)
    # The other way: official tensors (meta, manifest shapes) load strictly into the model.
    state = from_official_mgvq_state_dict({k: torch.empty(s, device="meta") for k, s in shapes.items()}, config)
    state["codebook"] = torch.empty(config.codebook_groups * config.codes_per_group, 32 // groups, device="meta")
    model.load_state_dict(state, strict=True, assign=True)
    # What the model holds beyond the trunk: the codebook buffer, no adaLN, G+1 position rows.
    assert model.head.pos_emb.shape == (1, groups + 1, config.dim)
    assert not any("adaLN" in k for k in model.state_dict())


def official_file(golden, tmp_path, edit=None, wrapper="model"):
    state = dict(torch.load(golden / "gpt_tiny.pt", weights_only=True)["model"])
    if edit:
        edit(state)
    path = tmp_path / "official.pt"
    torch.save({wrapper: state}, path)
    return path


@pytest.fixture(scope="module")
def tiny_official(golden):
    expected = torch.load(golden / "gpt_tiny_expected.pt", weights_only=True)
    codebook = torch.load(golden / "tokenizer_tiny.pt", weights_only=True)["model"]["quantize.embedding.weight"]
    return GPTConfig.from_official_mgvq(expected["config"]), codebook, expected


def test_official_layout_errors(golden, tmp_path, tiny_official):
    config, codebook, _ = tiny_official
    path = golden / "gpt_tiny.pt"
    with pytest.raises(ValueError, match="stores no config"):
        load_gpt(path, codebook=codebook)
    with pytest.raises(ValueError, match="carries no tokenizer codebook"):
        load_gpt(path, config)
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_gpt(tmp_path / "nothing.pt", config, codebook)
    missing = official_file(golden, tmp_path, lambda s: s.pop("layers.1.feed_forward.w2.weight"))
    with pytest.raises(ValueError, match=r"layers\.1\.feed_forward\.w2\.weight"):
        load_gpt(missing, config, codebook)
    extra = official_file(golden, tmp_path, lambda s: s.update({"tok_embeddings.weight": torch.zeros(3, 64)}))
    with pytest.raises(ValueError, match=r"tok_embeddings\.weight"):
        load_gpt(extra, config, codebook)
    no_query = official_file(golden, tmp_path, lambda s: s.pop("ar_head.causal_space_blocks.0.attention.query.weight"))
    with pytest.raises(ValueError, match=r"causal_space_blocks\.0\.attention\.query\.weight"):
        load_gpt(no_query, config, codebook)
    with pytest.raises(ValueError, match="do not fit the GPT config"):  # a config that does not fit the weights
        load_gpt(path, dataclasses.replace(config, codes_per_group=32), codebook[:128])
    with pytest.raises(ValueError, match="official GPT checkpoint"):
        torch.save({"optimizer": {}}, tmp_path / "other.pt")
        load_gpt(tmp_path / "other.pt", config, codebook)


@pytest.mark.parametrize("wrapper", ["ema", "state_dict"])
def test_official_wrappers_and_export_round_trip(golden, tmp_path, tiny_official, wrapper):
    config, codebook, expected = tiny_official
    model = load_gpt(official_file(golden, tmp_path, wrapper=wrapper), config, codebook)
    with torch.no_grad():
        logits = model(expected["codes"], expected["labels"])
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-4, atol=1e-4 * expected["logits"].abs().max().item())
    # Exporting back to the official layout gives the official tensors (pos_emb: the G+1 rows in use, zeros after).
    original = torch.load(golden / "gpt_tiny.pt", weights_only=True)["model"]
    exported = to_official_mgvq_state_dict(model.state_dict(), config)
    assert set(exported) == set(original)
    for key, value in exported.items():
        if "adaLN" in key:
            assert value.shape == original[key].shape and not value.any()
        elif key == "ar_head.pos_emb":
            assert torch.equal(value[:, :5], original[key][:, :5]) and not value[:, 5:].any()
        else:
            assert torch.equal(value, original[key]), key


def test_presets_and_official_mapping(golden):
    for name, size in PRESETS.items():
        config = GPTConfig.preset(name)
        assert (config.n_layer, config.dim, config.n_head) == (size["n_layer"], size["dim"], size["n_head"])
    # SwiGLU hidden sizes: int(8 * dim / 3) rounded up to 256 (LlamaGen).
    assert [GPTConfig.preset(n).ffn_hidden for n in ("gpt_b", "gpt_l", "gpt_xl", "gpt_xxl", "gpt_3b")] == \
        [2048, 2816, 3584, 4096, 8704]
    assert GPTConfig.preset("gpt_b", ffn_dim_multiplier=1.5).ffn_hidden == 3072
    with pytest.raises(ValueError, match="unknown GPT preset"):
        GPTConfig.preset("gpt_s")
    official = torch.load(golden / "gpt_tiny_expected.pt", weights_only=True)["config"]
    config = GPTConfig.from_official_mgvq(official)
    assert (config.codebook_groups, config.codes_per_group, config.grid_size, config.num_classes) == (4, 64, 8, 10)
    assert (config.head, config.input_embedding, config.dim, config.n_layer, config.n_head) == ("ar", "codebook", 64, 2, 4)
    assert config.token_dropout_p == 0.0 and config.class_dropout_prob == 0.1  # given, and the official default
    with pytest.raises(ValueError, match="unknown official ModelArgs fields"):
        GPTConfig.from_official_mgvq({**official, "n_layers": 2})
    with pytest.raises(ValueError, match="must be a square"):
        GPTConfig.from_official_mgvq({**official, "block_size": 60})
    with pytest.raises(ValueError, match="cls_token_num=2"):
        GPTConfig.from_official_mgvq({**official, "cls_token_num": 2})
    assert GPTConfig.from_dict(config.to_dict()) == config
    # A config saved by an earlier version: codes_per_group was codebook_size, cls_token_num (always 1) a field.
    old = {("codebook_size" if k == "codes_per_group" else k): v for k, v in config.to_dict().items()}
    assert GPTConfig.from_dict({**old, "cls_token_num": 1}) == config
    with pytest.raises(ValueError, match="unknown GPTConfig fields"):
        GPTConfig.from_dict({**config.to_dict(), "heads": "ar"})


@pytest.mark.parametrize("bad, match", [
    (dict(grid_size=None), "unset"),
    (dict(n_head=3), "n_head"),
    (dict(n_kv_head=3), "n_kv_head"),
    (dict(head="mlp"), "head="),
    (dict(codebook_embed_dim=30), "codebook_embed_dim"),
])
def test_invalid_configs_are_refused(bad, match):
    config = GPTConfig.preset("tiny", **{**dict(num_classes=10, codebook_groups=4, codes_per_group=16, grid_size=4), **bad})
    with pytest.raises(ValueError, match=match):
        GPT(config)



