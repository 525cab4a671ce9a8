"""GPT model: golden parity with the official MGVQ GPT, cached generation path, causality, dropouts, variants."""
import dataclasses

import pytest
import torch

from gpt import GPT, GPTConfig, load_gpt
from gpt.layers import DropPath, rope_2d
from gpt.packed import one_query_attention

V = 16  # codes per group in the tiny models


def tiny_config(**overrides) -> GPTConfig:
    base = dict(dim=32, n_head=4, num_classes=5, codebook_groups=4, codes_per_group=V, grid_size=4,
                codebook_embed_dim=16, class_dropout_prob=0.0, token_dropout_p=0.0, resid_dropout_p=0.0,
                ffn_dropout_p=0.0)
    return GPTConfig.preset("tiny", **{**base, **overrides})


def tiny_model(**overrides) -> GPT:
    """A tiny GPT with every weight random (the default init zeroes the parallel head and pos_emb)."""
    config = tiny_config(**overrides)
    model = GPT(config, codebook=torch.randn(config.codebook_groups * V, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def random_inputs(config: GPTConfig, batch: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(V, (batch, config.seq_len, config.codebook_groups), generator=gen)
    labels = torch.randint(config.num_classes + 1, (batch,), generator=gen)  # the null class included
    return codes, labels


def cached_logits(model: GPT, codes: torch.Tensor, labels: torch.Tensor, tensor_positions: bool = False
                  ) -> torch.Tensor:
    """Teacher-forced logits (B, L, G, V) through prefill / decode_step / sub_logits; `tensor_positions`: the
    positions as tensors (attention over the whole cache, masked, as a CUDA graph runs it) instead of ints."""
    B, L, G = codes.shape
    out = torch.empty(B, L, G, model.config.codes_per_group)
    h = model.prefill(labels)
    for t in range(L):
        if t > 0:
            h = model.decode_step(codes[:, t - 1], torch.tensor([t]) if tensor_positions else t)
        for g in range(G):
            out[:, t, g] = model.sub_logits(h, g, codes[:, t, g - 1] if g > 0 else None)
    return out


def test_golden_parity(golden):
    expected = torch.load(golden / "gpt_tiny_expected.pt", weights_only=True)
    codebook = torch.load(golden / "tokenizer_tiny.pt", weights_only=True)["model"]["quantize.embedding.weight"]
    model = load_gpt(golden / "gpt_tiny.pt", GPTConfig.from_official_mgvq(expected["config"]), codebook=codebook)
    with torch.no_grad():
        hidden = model.trunk(expected["codes"], expected["labels"])
        logits = model(expected["codes"], expected["labels"])
    for got, want in ((hidden, expected["trunk_hidden"]), (logits, expected["logits"])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    # The cached path reproduces the official logits too.
    model.setup_cache(2)
    with torch.no_grad():
        cached = cached_logits(model, expected["codes"], expected["labels"])
    torch.testing.assert_close(cached, expected["logits"], rtol=1e-4, atol=1e-4 * expected["logits"].abs().max().item())


@pytest.mark.parametrize("overrides", [
    dict(head="ar"),
    dict(head="parallel"),
    dict(head="ar", input_embedding="learned", n_kv_head=2),
    dict(head="parallel", n_kv_head=1),
], ids=["ar", "parallel", "ar-learned-gqa", "parallel-mqa"])
@pytest.mark.parametrize("tensor_positions", [False, True], ids=["int-positions", "tensor-positions"])
def test_cached_path_equals_forward(overrides, tensor_positions):
    model = tiny_model(**overrides)
    codes, labels = random_inputs(model.config, batch=3)
    with torch.no_grad():
        full = model(codes, labels)
        model.setup_cache(max_batch_size=5)  # a cache larger than the batch, used twice
        first = cached_logits(model, codes, labels, tensor_positions)
        second = cached_logits(model, codes[:2].flip(1), labels[:2], tensor_positions)
        model.clear_cache()
        full_second = model(codes[:2].flip(1), labels[:2])
    torch.testing.assert_close(first, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(second, full_second, rtol=0, atol=1e-5)
    assert all(layer.attention.kv_cache is None for layer in model.layers)
    assert not any("cache" in k for k in model.state_dict())


def test_cached_path_needs_setup():
    model = tiny_model()
    with pytest.raises(RuntimeError, match="setup_cache"):
        model.prefill(torch.tensor([0]))


@pytest.mark.parametrize("head", ["ar", "parallel"])
def test_causality(head):
    model = tiny_model(head=head)
    codes, labels = random_inputs(model.config, batch=2)
    t = 6
    changed = codes.clone()
    changed[:, t] = (changed[:, t] + 1) % V
    with torch.no_grad():
        before, after = model(codes, labels), model(changed, labels)
    torch.testing.assert_close(after[:, :t + (head == "parallel")], before[:, :t + (head == "parallel")], rtol=0, atol=0)
    assert (after[:, t + 1:] - before[:, t + 1:]).abs().amax(dim=(2, 3)).min() > 1e-3  # every later position sees it
    if head == "ar":
        for g in range(model.config.codebook_groups):
            sub = codes.clone()
            sub[:, t, g] = (sub[:, t, g] + 1) % V
            with torch.no_grad():
                out = model(sub, labels)
            torch.testing.assert_close(out[:, :t + 1, :g + 1], before[:, :t + 1, :g + 1], rtol=0, atol=0)
            if g + 1 < model.config.codebook_groups:
                assert (out[:, t, g + 1:] - before[:, t, g + 1:]).abs().max() > 1e-3


def test_label_dropout_and_eval_determinism():
    model = tiny_model(class_dropout_prob=1.0, token_dropout_p=0.5, resid_dropout_p=0.5, ffn_dropout_p=0.5,
                       drop_path_rate=0.5)
    codes, labels = random_inputs(model.config, batch=4)
    labels = labels.clamp(max=model.config.num_classes - 1)
    null = torch.full_like(labels, model.config.num_classes)
    with torch.no_grad():
        eval_a, eval_b = model(codes, labels), model(codes, labels)
        eval_null = model(codes, null)
        train_a, train_b = model.train()(codes, labels), model(codes, labels)
        for name in ("token_dropout_p", "resid_dropout_p", "ffn_dropout_p", "drop_path_rate"):
            model.config = dataclasses.replace(model.config, **{name: 0.0})
        quiet = GPT(model.config)
        quiet.load_state_dict(model.state_dict())
        train_null = quiet.train()(codes, labels)  # class dropout p=1: every label becomes the null class
    assert torch.equal(eval_a, eval_b)
    assert not torch.allclose(train_a, train_b)
    assert not torch.allclose(eval_null, eval_a)
    torch.testing.assert_close(train_null, eval_null, rtol=0, atol=1e-6)


def test_drop_path_turns_resid_and_ffn_dropout_off_as_llamagen():
    """LlamaGen's train_c2i.py: drop_path_rate > 0 sets resid and ffn dropout to 0; token dropout stays."""
    def block_rates(model):
        return {(m.__class__.__name__, round(m.p, 6)) for m in model.modules() if isinstance(m, (torch.nn.Dropout,
                                                                                                  DropPath))}

    dropouts = dict(token_dropout_p=0.1, resid_dropout_p=0.2, ffn_dropout_p=0.3, attn_dropout_p=0.05)
    plain = GPT(tiny_config(**dropouts, n_layer=3))
    assert plain.config.block_dropout == (0.2, 0.3)
    assert block_rates(plain) == {("Dropout", 0.1), ("Dropout", 0.2), ("Dropout", 0.3), ("DropPath", 0.0)}
    assert plain.layers[0].attention.attn_dropout_p == 0.05
    deep = GPT(tiny_config(**dropouts, n_layer=3, drop_path_rate=0.2))
    assert deep.config.resid_dropout_p == 0.2 and deep.config.block_dropout == (0.0, 0.0)  # the config keeps its value
    assert block_rates(deep) == {("Dropout", 0.1), ("Dropout", 0.0), ("DropPath", 0.0), ("DropPath", 0.1),
                                 ("DropPath", 0.2)}
    assert deep.layers[0].attention.attn_dropout_p == 0.05 and deep.tok_dropout.p == 0.1


def test_open_magvit2_keeps_resid_and_ffn_dropout_under_drop_path():
    """The official Open-MAGVIT2 GPT keeps both dropouts with drop_path_rate > 0, in its trunk and in its factorized
    blocks: the rule of LlamaGen's recipe is not its family's."""
    config = tiny_config(head="factorized", input_embedding="learned", codebook_embed_dim=None, n_layer=3,
                         resid_dropout_p=0.2, ffn_dropout_p=0.3, drop_path_rate=0.2)
    model = GPT(config)
    assert config.block_dropout == (0.2, 0.3)
    for block in [*model.layers, *model.head.layers]:
        assert (block.attention.resid_dropout.p, block.feed_forward.ffn_dropout.p) == (0.2, 0.3)
    assert [round(block.drop_path.p, 6) for block in model.layers] == [0.0, 0.1, 0.2]


def test_every_head_kind_has_a_class():
    from gpt.config import DROP_PATH_REPLACES_DROPOUT, HEADS
    from gpt.heads import HEADS as HEAD_CLASSES

    assert set(HEADS) == set(HEAD_CLASSES) == set(DROP_PATH_REPLACES_DROPOUT)


def test_label_dropout_rate():
    model = tiny_model(class_dropout_prob=0.25).train()
    labels = torch.zeros(20000, dtype=torch.long)
    dropped = (model.cls_embedding(labels)[:, 0] == model.cls_embedding.embedding_table.weight[-1]).all(-1)
    assert 0.23 < dropped.float().mean().item() < 0.27


def test_save_load_round_trip(tmp_path):
    model = tiny_model(head="ar", n_kv_head=2)
    path = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "config": model.config.to_dict()}, path)
    loaded = load_gpt(path)
    codes, labels = random_inputs(model.config)
    assert loaded.config == model.config and not loaded.training
    assert torch.equal(loaded.codebook, model.codebook)
    with torch.no_grad():
        assert torch.equal(loaded(codes, labels), model(codes, labels))
    # Training-only fields may differ from the file's; architecture may not; the codebook must be the stored one.
    load_gpt(path, dataclasses.replace(model.config, resid_dropout_p=0.3))
    with pytest.raises(ValueError, match="rope_base"):
        load_gpt(path, dataclasses.replace(model.config, rope_base=500.0))
    with pytest.raises(ValueError, match="different tokenizer codebook"):
        load_gpt(path, codebook=model.codebook + 1)


def test_learned_embedding_sums_group_tables():
    model = tiny_model(input_embedding="learned")
    assert not hasattr(model, "codebook") and "codebook" not in model.state_dict()
    codes, labels = random_inputs(model.config)
    table = model.tok_embeddings.weight
    want = sum(table[codes[..., g] + g * V] for g in range(model.config.codebook_groups))
    torch.testing.assert_close(model.embed_codes(codes), want)
    model(codes, labels).logsumexp(-1).sum().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0


def test_codebook_input_is_frozen_raw_rows():
    model = tiny_model()
    codes, labels = random_inputs(model.config)
    rows = torch.cat([model.codebook[codes[..., g] + g * V] for g in range(model.config.codebook_groups)], -1)
    torch.testing.assert_close(model.embed_codes(codes), model.img_projector(rows))
    assert "codebook" in model.state_dict() and "codebook" not in dict(model.named_parameters())
    with pytest.raises(ValueError, match="codebook of shape"):
        GPT(model.config, codebook=torch.zeros(3, 4))


def test_gqa_equals_attention_with_repeated_kv_heads():
    gqa = tiny_model(n_kv_head=2)
    mha = GPT(dataclasses.replace(gqa.config, n_kv_head=None)).eval()
    state = gqa.state_dict()
    hd, heads, kv = gqa.config.head_dim, gqa.config.n_head, 2
    for i in range(gqa.config.n_layer):
        key = f"layers.{i}.attention.wqkv.weight"
        q, k, v = state[key].split([heads * hd, kv * hd, kv * hd])
        repeat = lambda w: w.view(kv, hd, -1).repeat_interleave(heads // kv, dim=0).reshape(heads * hd, -1)
        state[key] = torch.cat([q, repeat(k), repeat(v)])
    mha.load_state_dict(state)
    assert gqa.layers[0].attention.wqkv.weight.shape[0] == (heads + 2 * kv) * hd
    codes, labels = random_inputs(gqa.config)
    with torch.no_grad():
        torch.testing.assert_close(gqa(codes, labels), mha(codes, labels), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [6, 2, 1], ids=["mha", "gqa", "mqa"])
def test_one_query_attention_equals_sdpa(kv_heads):
    """The compiled CPU step's attention (one query row over the cached keys) is SDPA's, GQA included."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 6, 1, 16), torch.randn(3, kv_heads, 9, 16), torch.randn(3, kv_heads, 9, 16)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=kv_heads != 6)
    torch.testing.assert_close(one_query_attention(q, k, v), want, rtol=1e-5, atol=1e-5)
    k[0, 0, 4] += 40.0  # one dominant key: the max-subtracted exponentials stay finite
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=kv_heads != 6)
    torch.testing.assert_close(one_query_attention(q, k, v), want, rtol=1e-5, atol=1e-5)


def test_rope_table():
    grid, head_dim = 3, 8
    table = rope_2d(grid, head_dim, 10000.0)  # (L, head_dim/2, 2)
    assert table.shape == (grid * grid, head_dim // 2, 2)
    assert torch.equal(table[0], torch.zeros(head_dim // 2, 2))  # the class position: q and k become zero
    freqs = 1.0 / 10000.0 ** (torch.arange(2) / 2)
    for index in range(grid * grid - 1):  # sequence index 1 + index holds code `index`, at (row, col)
        row, col = divmod(index, grid)
        angles = torch.cat([row * freqs, col * freqs])
        torch.testing.assert_close(table[1 + index], torch.stack([angles.cos(), angles.sin()], -1))


def test_default_init_starts_uniform():
    config = tiny_config(head="parallel")
    model = GPT(config, codebook=torch.randn(config.codebook_groups * V, 4)).eval()
    codes, labels = random_inputs(config)
    with torch.no_grad():
        logits = model(codes, labels)
    assert torch.equal(logits, torch.zeros_like(logits))
    assert model.cls_embedding.embedding_table.weight.shape == (config.num_classes + 1, config.dim)


def test_codes_shape_is_checked():
    model = tiny_model()
    with pytest.raises(ValueError, match="codes of shape"):
        model(torch.zeros(1, 17, 4, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="decode_step position"):
        model.decode_step(torch.zeros(1, 4, dtype=torch.long), 16)


@pytest.mark.parametrize("head", ["parallel", "ar", "factorized"])
def test_forward_with_bf16_weights_and_float32_buffers(head):
    """FSDP2's bf16 policy: parameters run in bf16 without autocast while buffers (codebook, RoPE) stay float32."""
    model = tiny_model(head=head, input_embedding="learned" if head == "factorized" else "codebook")
    codes, labels = random_inputs(model.config)
    with torch.no_grad():
        want = model(codes, labels)
        for p in model.parameters():
            p.data = p.data.bfloat16()
        got = model(codes, labels)
    assert got.dtype == torch.float32 and all(b.dtype != torch.bfloat16 for b in model.buffers())
    assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()
