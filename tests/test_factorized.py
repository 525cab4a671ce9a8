"""The factorized sub-token head against the official Open-MAGVIT2 AR model (tests/fixtures/open_magvit2)."""
from pathlib import Path

import pytest
import torch

from gpt import GPT, GPTConfig, load_gpt

FIXTURES = Path(__file__).parent / "fixtures" / "open_magvit2"
OFFICIAL_ARGS = {"vocab_size": 32, "block_size": 16, "spatial_n_layer": 2, "factorized_n_layer": 2, "n_head": 2,
                 "dim": 32, "cond_dim": 32, "token_drop": 0.0, "resid_dropout_p": 0.0, "ffn_dropout_p": 0.0,
                 "class_num": 10, "token_factorization": True, "multiple_of": 8, "factorized_bits": [2, 3],
                 "factorized_k": 2}


def close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.fixture(scope="module")
def io():
    return torch.load(FIXTURES / "ar_io.pt", weights_only=True)


@pytest.fixture(scope="module")
def model():
    return load_gpt(FIXTURES / "ar_weights.pt", GPTConfig.from_open_magvit2(OFFICIAL_ARGS))


def test_config_from_official_args():
    c = GPTConfig.from_open_magvit2(OFFICIAL_ARGS)
    assert (c.head, c.input_embedding, c.group_sizes, c.grid_size, c.ar_head_layers) == \
        ("factorized", "learned", [4, 8], 4, 2)
    # The released AR-B / L / XL (configs/Open-MAGVIT2/gpu/imagenet_conditional_llama_*.yaml): 343M, 804M, 1.5B.
    for (layers, sub_layers, heads, dim), millions in (((24, 2, 16, 1024), 343.6), ((36, 3, 20, 1280), 804.4),
                                                        ((48, 4, 24, 1536), 1486.7)):
        config = GPTConfig.from_open_magvit2({"spatial_n_layer": layers, "factorized_n_layer": sub_layers,
                                              "n_head": heads, "dim": dim, "factorized_bits": [6, 12],
                                              "block_size": 256, "vocab_size": 512})
        with torch.device("meta"):
            assert round(sum(p.numel() for p in GPT(config).parameters()) / 1e5) == round(millions * 10)
    with pytest.raises(ValueError, match="unknown Open-MAGVIT2 GPT arguments"):
        GPTConfig.from_open_magvit2({"n_layer": 2})


def test_teacher_forced_logits_match_official(io, model):
    codes = torch.stack([io["pre"], io["post"]], -1)  # (B, L, 2)
    logits = model(codes, io["labels"])
    assert logits.shape == (2, 16, 2, 8)
    close(logits[:, :, 0, :4], io["logits"][0])
    close(logits[:, :, 1], io["logits"][1])
    assert torch.isneginf(logits[:, :, 0, 4:]).all()  # group 0 has 4 codes, padded to the widest group
    # A sub-token changed at position t leaves every earlier logit unchanged.
    changed = codes.clone()
    changed[:, 9, 0] = (changed[:, 9, 0] + 1) % 4
    torch.testing.assert_close(model(changed, io["labels"])[:, :10, 0], logits[:, :10, 0])
    torch.testing.assert_close(model(changed, io["labels"])[:, :9], logits[:, :9])


def test_cached_logits_match_official(io, model):
    codes = torch.stack([io["pre"], io["post"]], -1)
    model.setup_cache(2)
    try:
        h = model.prefill(io["labels"])
        steps = [[], []]
        for t in range(16):
            if t > 0:
                h = model.decode_step(codes[:, t - 1], t)
            steps[0].append(model.sub_logits(h, 0))
            steps[1].append(model.sub_logits(h, 1, codes[:, t, 0]))
    finally:
        model.clear_cache()
    for g in range(2):
        got = torch.stack(steps[g], 1)
        close(got, io["cached_logits"][g])
        close(got, io["logits"][g])


def test_greedy_cfg_per_group_matches_official_and_teacher_forcing(io, model):
    from sampling.generate import generate

    scales = io["cfg_scale"]  # [1.5, 2.0]: one scale per sub-token
    codes = generate(model, io["labels"], cfg_scale=scales, top_k=1, seeds=torch.arange(2))
    assert torch.equal(codes, io["greedy_cfg"])  # the official sample_Open_MAGVIT2 with top_k 1
    # The same codes are the argmax of the teacher-forced, per-group guided logits.
    cond = model(codes, io["labels"])
    uncond = model(codes, torch.full_like(io["labels"], 10))
    for g, (s, n) in enumerate(zip(scales, [4, 8])):
        mixed = uncond[:, :, g, :n] + s * (cond[:, :, g, :n] - uncond[:, :, g, :n])
        assert torch.equal(mixed.argmax(-1), codes[..., g])
    assert not torch.equal(generate(model, io["labels"], cfg_scale=[1.5, 1.0], top_k=1, seeds=torch.arange(2)),
                           codes)


def test_training_step_through_padded_logits():
    from gpt.train import cross_entropy_per_group

    config = GPTConfig.from_open_magvit2({**OFFICIAL_ARGS, "token_drop": 0.1, "ffn_dropout_p": 0.1})
    model = GPT(config).train()
    codes = torch.stack([torch.randint(0, 4, (3, 16)), torch.randint(0, 8, (3, 16))], -1)
    loss, group_loss = cross_entropy_per_group(model(codes, torch.tensor([0, 1, 2])), codes)
    # zero-initialised heads: uniform over each group's own codes, not over the padded width
    torch.testing.assert_close(group_loss, torch.tensor([4.0, 8.0]).log())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["head.heads.0.weight"].abs().sum() > 0 and grads["head.heads.1.weight"].abs().sum() > 0


SIZES = [4, 16, 8]


def unequal_model(head: str) -> GPT:
    """Three groups of 4, 16 and 8 codes, every weight random."""
    config = GPTConfig.preset("tiny", dim=48, n_head=4, num_classes=5, codebook_groups=3, codes_per_group=SIZES,
                              grid_size=4, input_embedding="learned", head=head, class_dropout_prob=0.0,
                              token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def unequal_codes(batch: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    return torch.stack([torch.randint(n, (batch, 16), generator=gen) for n in SIZES], -1)


@pytest.mark.parametrize("head", ["parallel", "ar", "factorized"])
def test_per_group_vocabularies_cached_equals_forward(head):
    model = unequal_model(head)
    codes, labels = unequal_codes(), torch.tensor([0, 4, 5])
    with torch.no_grad():
        full = model(codes, labels)  # (B, L, G, 16)
        assert full.shape == (3, 16, 3, 16)
        for g, n in enumerate(SIZES):
            assert torch.isneginf(full[:, :, g, n:]).all() and torch.isfinite(full[:, :, g, :n]).all()
        model.setup_cache(3)
        h = model.prefill(labels)
        for t in range(16):
            if t > 0:
                h = model.decode_step(codes[:, t - 1], t)
            for g, n in enumerate(SIZES):
                got = model.sub_logits(h, g, codes[:, t, g - 1] if g > 0 else None)
                assert got.shape == (3, n)
                torch.testing.assert_close(got, full[:, t, g, :n], rtol=0, atol=1e-5)
        model.clear_cache()


@pytest.mark.parametrize("head", ["parallel", "ar", "factorized"])
def test_per_group_greedy_cfg_equals_teacher_forced_argmax(head):
    from sampling.generate import generate

    model = unequal_model(head)
    labels, scales = torch.tensor([1, 3]), [1.5, 3.0, 2.0]
    with torch.no_grad():
        codes = generate(model, labels, cfg_scale=scales, top_k=1, seeds=torch.arange(2))
        cond, uncond = model(codes, labels), model(codes, torch.full_like(labels, 5))
    for g, (s, n) in enumerate(zip(scales, SIZES)):
        assert codes[..., g].max() < n
        mixed = uncond[:, :, g, :n] + s * (cond[:, :, g, :n] - uncond[:, :, g, :n])
        assert torch.equal(mixed.argmax(-1), codes[..., g])


@pytest.mark.parametrize("head", ["parallel", "ar", "factorized"])
def test_per_group_model_file_round_trip(tmp_path, head):
    """Saved and loaded (built on meta, as load_gpt does): the same logits."""
    model = unequal_model(head)
    torch.save({"model": model.state_dict(), "config": model.config.to_dict()}, tmp_path / "model.pt")
    loaded = load_gpt(tmp_path / "model.pt")
    codes, labels = unequal_codes(), torch.tensor([0, 4, 5])
    with torch.no_grad():
        torch.testing.assert_close(loaded(codes, labels), model(codes, labels), rtol=0, atol=0)
