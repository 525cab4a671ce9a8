"""End to end on MergeVQ codes: extract (grid and merged form) -> train a factorized GPT on the grid codes (2 gloo
ranks) -> sample -> reconstruction metrics, with a tiny random MergeVQ factorized as its stage 2 reads it ([6, 12])."""
import numpy as np
import pytest
import torch
from test_open_magvit2_e2e import train_two_ranks

from sampling.sampler import SampleRunConfig, SamplerConfig, run
from tokenizer.data import ImageViews, list_images
from tokenizer.extract import ExtractConfig, ExtractDataConfig, extract
from tokenizer.families.magvit2 import Magvit2Config, OpenMagvit2
from tokenizer.families.mergevq import MergeVQ, MergeVQConfig
from tokenizer.loading import TokenizerRef, save_tokenizer
from tokenizer.merged import unmerge
from tokenizer.recon import ReconConfig, ReconDataConfig, eval_recon
from tokenizer.store import CodeStore, StoreMismatchError

TINY = MergeVQConfig(ch=32, ch_mult=[1, 1], num_res_blocks=1, num_att_blocks=2, num_heads=2, merge_num=28,
                     dist_head=None)  # z_channels 18, factorized_bits [6, 12]: 8x8 grid codes, K = 36 merged tokens


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    torch.manual_seed(5)
    model = MergeVQ(TINY).eval()
    for p in model.parameters():  # random throughout, so that no transformer block is an identity
        p.data = torch.randn_like(p) * (0.3 if p.ndim < 2 else p[0].numel() ** -0.5)
    path = tmp_path_factory.mktemp("mergevq") / "tokenizer.pt"
    save_tokenizer(model, path)
    return TokenizerRef(checkpoint=str(path), family="mergevq")


def test_extract_train_sample_recon(tokenizer, tmp_path, golden, repo, fresh_accelerate_state):
    root = golden / "e2e" / "images"
    store_dir = tmp_path / "codes"
    meta = extract(ExtractConfig(data=ExtractDataConfig(root=str(root), image_size=16, views="flip"),
                                 tokenizer=tokenizer, out_dir=str(store_dir), batch_size=4, num_workers=0, merged=True))
    assert (meta["family"], meta["codes_per_group"], meta["grid"], meta["merged_tokens"]) == \
        ("mergevq", [64, 4096], [8, 8], 36)
    store = CodeStore(store_dir)
    assert store.merged_codes.shape == (6, 2, 36, 2) and store.token_map.shape == (6, 2, 8, 8)
    grid = torch.from_numpy(store.codes[:].astype(np.int64))
    merged = torch.from_numpy(store.merged_codes[:].astype(np.int64))
    token_map = torch.from_numpy(store.token_map[:].astype(np.int64))
    assert torch.equal(grid, unmerge(merged.flatten(0, 1), token_map.flatten(0, 1)).view(grid.shape))
    files, labels, _ = list_images(str(root))
    views = torch.stack([ImageViews(str(root), 16, "flip", 1.1, files, labels)[i][1] for i in range(len(files))])
    model = tokenizer.load()
    assert torch.equal(grid, model.encode_codes(views.flatten(0, 1)).view(grid.shape))
    assert len(grid.unique(dim=0)) == 6 and grid[..., 1].unique().numel() > 8  # not a constant code map
    # The merged store round-trips: merged codes + map decode to the pixels of the grid codes.
    pixels = model.decode_codes(grid[:, 0])
    assert torch.equal(model.decode_merged(merged[:, 0], token_map[:, 0]), pixels)

    log = train_two_ranks(repo, store_dir, tokenizer.checkpoint, tmp_path / "gpt", "factorized")
    assert [r["num_processes"] for r in log] == [2, 2] and log[-1]["loss"] < log[0]["loss"]
    config = torch.load(tmp_path / "gpt" / "export" / "model.pt", weights_only=True)["config"]
    assert (config["codes_per_group"], config["head"]) == ([64, 4096], "factorized")
    npz = run(SampleRunConfig(gpt_ckpt=str(tmp_path / "gpt" / "export" / "model.pt"), tokenizer=tokenizer,
                              sampler=SamplerConfig(cfg_scale=1.5, top_k=[16, 64]), out_dir=str(tmp_path / "samples"),
                              num_samples=4, batch_size=2))
    images = np.load(npz)["arr_0"]
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 0

    result = eval_recon(ReconConfig(data=ReconDataConfig(root=str(root), image_size=16), tokenizer=tokenizer,
                                    out=str(tmp_path / "recon.json"), num_workers=0, device="cpu"))
    assert result["codes_per_group"] == [64, 4096] and result["tokenizer_family"] == "mergevq"
    assert np.isfinite(result["psnr"]) and 0 < result["codebook_used"][1] <= 36 * 6 / 4096

    with pytest.raises(StoreMismatchError, match="merged_tokens: 36 on disk"):  # a grid-only rerun is refused
        extract(ExtractConfig(data=ExtractDataConfig(root=str(root), image_size=16, views="flip"),
                              tokenizer=tokenizer, out_dir=str(store_dir), batch_size=4, num_workers=0))


def test_merged_form_needs_a_merging_family(tmp_path, golden):
    save_tokenizer(OpenMagvit2(Magvit2Config(ch=32, ch_mult=[1, 1], num_res_blocks=1, z_channels=5,
                                             factorized_bits=[2, 3])), tmp_path / "omg.pt")
    ref = TokenizerRef(checkpoint=str(tmp_path / "omg.pt"), family="open_magvit2")
    with pytest.raises(ValueError, match="'open_magvit2' has no merged form"):
        extract(ExtractConfig(data=ExtractDataConfig(root=str(golden / "e2e" / "images"), image_size=16),
                              tokenizer=ref, out_dir=str(tmp_path / "codes"), num_workers=0, merged=True))
