"""tokenizer.loading: which weights `auto` picks in each family's official layout, and one read per load."""
import pytest
import torch

from tokenizer import MGVQConfig, TokenizerRef, load_tokenizer, read_codebook, save_tokenizer
from tokenizer.registry import FAMILIES

W = torch.arange(4.0)


def blobs() -> dict:
    """Each family's official layout with raw weights W and EMA weights W + 1 of one tensor `encoder.w`."""
    lightning = {"state_dict": {"encoder.w": W, "model_ema.encoderw": W + 1}}
    return {
        "mgvq": {"model": {"encoder.w": W}, "ema": {"encoder.w": W + 1}},
        "llamagen_vq": {"model": {"encoder.w": W}, "ema": {"encoder.w": W + 1}},
        "ibq": lightning,
        "open_magvit2": lightning,
    }


# What each family's official AR sampler decodes with: MGVQ's and IBQ's the EMA weights; LlamaGen's sample_c2i
# the `model` entry; Open-MAGVIT2's AR configs load the tokenizer with use_ema: False.
AUTO = {"mgvq": "ema", "llamagen_vq": "raw", "ibq": "ema", "open_magvit2": "raw"}


@pytest.mark.parametrize("family", sorted(AUTO))
def test_auto_picks_the_weights_the_official_ar_sampler_decodes_with(family):
    state_dict, which = FAMILIES[family].read_official(blobs()[family], "file.ckpt", "auto")
    want = W + 1 if AUTO[family] == "ema" else W
    assert torch.equal(state_dict["encoder.w"], want), f"{family}: auto took {which!r}"


@pytest.fixture
def counted_loads(monkeypatch):
    calls = []
    real = torch.load

    def load(f, *args, **kwargs):
        calls.append(str(f))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    return calls


def test_each_file_is_read_once_per_load(golden, tmp_path, counted_loads):
    expected = torch.load(golden / "tokenizer_tiny_expected.pt", weights_only=True)
    config = MGVQConfig.from_dict(expected["config"])
    counted_loads.clear()
    official = load_tokenizer(golden / "tokenizer_tiny.pt", config)
    assert counted_loads == [str(golden / "tokenizer_tiny.pt")]
    save_tokenizer(official, tmp_path / "own.pt")
    counted_loads.clear()
    TokenizerRef(checkpoint=str(tmp_path / "own.pt")).load()
    assert counted_loads == [str(tmp_path / "own.pt")]
    counted_loads.clear()
    rows = read_codebook(golden / "tokenizer_tiny.pt")
    assert counted_loads == [str(golden / "tokenizer_tiny.pt")]
    assert torch.equal(rows, official.codebook())


def test_a_weights_choice_outside_auto_ema_raw_is_refused(golden):
    with pytest.raises(ValueError, match="weights='best' is not one of"):
        TokenizerRef(family="ibq", weights="best")
    with pytest.raises(ValueError, match="weights='best' is not one of"):
        load_tokenizer(golden / "tokenizer_tiny.pt", family="mgvq", weights="best")
