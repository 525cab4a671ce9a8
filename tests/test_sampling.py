"""sampling.generate: filters and CFG on hand-written numbers; the cached loop against the teacher-forced forward."""
import math

import pytest
import torch

from gpt import GPT, GPTConfig
from sampling.generate import (cfg_mix, cfg_scale_at, filter_logits, filter_threshold, generate, sample_from_logits,
                               seed_keys, top_k_filter, top_p_filter, unguarded, uniforms)

INF = float("inf")


def test_top_k_filter_hand_values():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5], [4.0, 2.0, 2.0, 1.0]])
    want = torch.tensor([[-INF, 3.0, 2.0, -INF], [4.0, 2.0, 2.0, -INF]])  # ties with the k-th value stay
    assert torch.equal(top_k_filter(logits, 2), want)
    assert torch.equal(top_k_filter(logits, 1), torch.tensor([[-INF, 3.0, -INF, -INF], [4.0, -INF, -INF, -INF]]))
    assert torch.equal(top_k_filter(logits, 0), logits)
    assert torch.equal(top_k_filter(logits, 9), logits)


def test_top_p_filter_hand_values():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # ranked: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()[None]
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.45) == [False, True, False, False]  # 0.5 alone already exceeds 0.45
    assert kept(0.6) == [False, True, False, True]  # 0.5 + 0.3
    assert kept(0.85) == [True, True, False, True]  # 0.5 + 0.3 + 0.15 = 0.95 reaches 0.85
    assert kept(1.0) == [True] * 4
    torch.testing.assert_close(top_p_filter(logits, 0.6)[0, [1, 3]], logits[0, [1, 3]], rtol=0, atol=0)


def test_temperature_then_filters_hand_values():
    logits = torch.tensor([[2.0, 0.0, -2.0, 4.0]])
    # T=2 -> [1, 0, -1, 2]; softmax of that: e^x / (e^2 + e + 1 + e^-1)
    z = math.e**2 + math.e + 1 + math.exp(-1)
    want = torch.tensor([[math.e / z, 1 / z, math.exp(-1) / z, math.e**2 / z]])
    torch.testing.assert_close(filter_logits(logits, temperature=2.0).softmax(-1), want)
    # top-k 2 after T=2 keeps [1, 2]: probabilities e / (e + e^2), e^2 / (e + e^2)
    got = filter_logits(logits, temperature=2.0, top_k=2).softmax(-1)
    torch.testing.assert_close(got, torch.tensor([[1 / (1 + math.e), 0, 0, math.e / (1 + math.e)]]))
    # top-p 0.6 after T=0.5 -> [4, 0, -4, 8]: the top token holds 0.982 of the mass and is alone
    assert torch.isfinite(filter_logits(logits, temperature=0.5, top_p=0.6)).tolist() == [[False, False, False, True]]
    # top-k and top-p together (one sorted top-k serves both) equal the two filters one after the other
    x = torch.randn(64, 100) * 3
    for k, p in [(10, 0.5), (50, 0.9), (3, 0.999), (99, 0.2)]:
        assert torch.equal(filter_logits(x, 1.3, k, p), top_p_filter(top_k_filter(x / 1.3, k), p))
    assert (torch.isfinite(filter_logits(x, 1.0, 50, 0.9)).sum(-1) < torch.isfinite(top_k_filter(x, 50)).sum(-1)).all()


def test_cfg_mix_hand_values():
    cond, uncond = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 2.5, 1.0])
    torch.testing.assert_close(cfg_mix(cond, uncond, 1.5), torch.tensor([1.25, 1.75, 4.0]), rtol=0, atol=0)
    torch.testing.assert_close(cfg_mix(cond, uncond, 0.0), uncond, rtol=0, atol=0)
    assert cfg_mix(cond, uncond, 1.0) is cond  # scale 1 is exactly the conditional logits


def test_cfg_scale_schedule_and_interval():
    assert [cfg_scale_at(t, 5, 3.0) for t in range(5)] == [3.0] * 5
    assert [cfg_scale_at(t, 5, 3.0, cfg_schedule="linear") for t in range(5)] == [1.0, 1.5, 2.0, 2.5, 3.0]
    # LlamaGen's interval: its decode counter i = t - 1 turns guidance off once i > cfg_interval
    assert [cfg_scale_at(t, 6, 2.0, cfg_interval=2) for t in range(6)] == [2.0, 2.0, 2.0, 2.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="cfg_schedule"):
        cfg_scale_at(0, 5, 2.0, cfg_schedule="cosine")


def test_inverse_cdf_sampling():
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log().expand(4, 4)  # cdf 0.1, 0.3, 0.6, 1.0
    u = torch.tensor([0.05, 0.25, 0.59, 0.99], dtype=torch.float64)
    assert sample_from_logits(logits, u).tolist() == [0, 1, 2, 3]
    masked = torch.tensor([[-INF, 0.0, -INF, 0.0]]).expand(3, 4)  # filtered tokens are never drawn
    assert sample_from_logits(masked, torch.tensor([0.0, 0.4999, 0.9999999], dtype=torch.float64)).tolist() == [1, 1, 3]


def test_drawing_below_a_threshold_equals_drawing_from_filtered_logits():
    """The sampler draws with filter_threshold (no -inf written); it must pick what the filtered logits pick."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 500, generator=gen) * 3
    u = torch.rand(64, generator=gen, dtype=torch.float64)
    for k, p in [(0, 1.0), (1, 1.0), (50, 1.0), (0, 0.7), (50, 0.9), (499, 0.3)]:
        threshold = filter_threshold(logits, k, p)
        want = sample_from_logits(filter_logits(logits, 1.0, k, p), u)
        assert torch.equal(sample_from_logits(logits, u, threshold), want), (k, p)
    assert filter_threshold(logits, 0, 1.0) is None and filter_threshold(logits, 500, 1.0) is None


def test_random_streams_are_uniform_and_keyed_by_seed_and_counter():
    keys = seed_keys(torch.arange(20000, dtype=torch.int64))
    u = uniforms(keys, 7)
    assert u.dtype == torch.float64 and 0 <= u.min() and u.max() < 1
    # 20000 draws: mean 0.5 +- 0.002 (sd), each decile holds 2000 +- 42
    assert abs(u.mean().item() - 0.5) < 0.01
    assert (torch.histc(u.float(), bins=10, min=0, max=1) - 2000).abs().max() < 200
    assert torch.corrcoef(torch.stack([u, uniforms(keys, 8)]))[0, 1].abs() < 0.03  # counters are decorrelated
    assert not torch.equal(seed_keys(torch.tensor([5])), seed_keys(torch.tensor([5 + 2**40])))  # high bits count
    assert torch.equal(uniforms(keys[:3], 7), u[:3])
    table = uniforms(keys[:3], torch.arange(5, 9))  # a row of counters at once: (B, 4), column j is counter 5 + j
    assert table.shape == (3, 4) and torch.equal(table[:, 2], u[:3])
    with pytest.raises(ValueError, match="non-negative"):
        seed_keys(torch.tensor([-1]))
    # sampling with them follows the distribution: 20000 draws from (0.1, 0.2, 0.3, 0.4)
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log().expand(20000, 4)
    freq = torch.bincount(sample_from_logits(logits, u), minlength=4) / 20000
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), rtol=0, atol=0.015)


def tiny_gpt(head: str, grid: int = 4, groups: int = 4, codes: int = 16, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig.preset("tiny", codebook_groups=groups, codes_per_group=codes, grid_size=grid, num_classes=10,
                              codebook_embed_dim=8, head=head, input_embedding="codebook")
    model = GPT(config, codebook=torch.randn(groups * codes, 8 // groups))
    for p in model.parameters():  # LlamaGen's init zeroes heads and position tables: make every logit differ
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def replay(model: GPT, labels, codes, seeds, *, cfg_scale=1.0, cfg_interval=-1, cfg_schedule="constant",
           temperature=1.0, top_k=0, top_p=1.0) -> torch.Tensor:
    """What the sampler must draw, recomputed from the teacher-forced forward on its own output."""
    B, L, G = codes.shape
    with torch.no_grad():
        cond = model(codes, labels)  # (B, L, G, V)
        uncond = model(codes, torch.full_like(labels, model.config.num_classes))
    keys, want = seed_keys(seeds), torch.empty_like(codes)
    per = lambda v, g: v[g] if isinstance(v, (list, tuple)) else v  # noqa: E731
    for t in range(L):
        scale = cfg_scale_at(t, L, cfg_scale, cfg_interval, cfg_schedule)
        for g in range(G):
            logits = cfg_mix(cond[:, t, g], uncond[:, t, g], scale)
            logits = filter_logits(logits, per(temperature, g), per(top_k, g), per(top_p, g))
            want[:, t, g] = sample_from_logits(logits, uniforms(keys, t * G + g))
    return want


@pytest.mark.parametrize("head", ["parallel", "ar"])
def test_greedy_equals_argmax_of_teacher_forced_logits(head):
    model = tiny_gpt(head)
    labels = torch.tensor([3, 0, 9])
    codes = generate(model, labels, top_k=1)
    assert codes.shape == (3, 16, 4) and codes.dtype == torch.int64
    with torch.no_grad():
        assert torch.equal(codes, model(codes, labels).argmax(-1))
        guided = generate(model, labels, top_k=1, cfg_scale=3.0)
        mixed = cfg_mix(model(guided, labels), model(guided, torch.full_like(labels, 10)), 3.0)
    assert torch.equal(guided, mixed.argmax(-1))
    assert not torch.equal(guided, codes)  # guidance changed something


@pytest.mark.parametrize("head", ["parallel", "ar"])
def test_sampling_replays_on_the_teacher_forced_forward(head):
    model = tiny_gpt(head)
    labels, seeds = torch.tensor([1, 4, 4, 7]), torch.tensor([11, 12, 13, 2**50], dtype=torch.int64)
    settings = [
        dict(),  # cfg_scale 1: plain conditional sampling (no null-class half at all)
        dict(cfg_scale=2.5, temperature=[1.0, 0.7, 1.3, 1.0], top_k=[0, 5, 3, 1], top_p=[1.0, 1.0, 0.8, 1.0]),
        dict(cfg_scale=4.0, cfg_interval=3, top_p=0.9),
        dict(cfg_scale=3.0, cfg_schedule="linear", temperature=0.8),
    ]
    for s in settings:
        codes = generate(model, labels, seeds=seeds, **s)
        assert torch.equal(codes, replay(model, labels, codes, seeds, **s)), s


def test_seeds_make_samples_independent_of_their_batch():
    model = tiny_gpt("ar", grid=4)
    labels = torch.tensor([2, 5, 5, 8, 0])
    seeds = torch.tensor([100, 101, 102, 103, 104], dtype=torch.int64)
    kw = dict(cfg_scale=2.0, top_k=8, temperature=1.1)
    whole = generate(model, labels, seeds=seeds, **kw)
    parts = [generate(model, labels[i:j], seeds=seeds[i:j], **kw) for i, j in [(0, 2), (2, 5)]]
    alone = [generate(model, labels[[i]], seeds=seeds[[i]], **kw) for i in (4, 1)]
    assert torch.equal(torch.cat(parts), whole)
    assert torch.equal(alone[0], whole[[4]]) and torch.equal(alone[1], whole[[1]])
    reordered = generate(model, labels.flip(0), seeds=seeds.flip(0), **kw)
    assert torch.equal(reordered, whole.flip(0))
    other = generate(model, labels, seeds=seeds + 1000, **kw)
    assert (other != whole).float().mean() > 0.5  # another seed, another sample


def test_settings_are_checked_and_log2_top_k_is_mgvq_s():
    model = tiny_gpt("parallel", grid=2)
    labels = torch.tensor([1])
    with pytest.raises(ValueError, match="top_k"):
        generate(model, labels, top_k=[1, 2])
    with pytest.raises(ValueError, match="temperature"):
        generate(model, labels, temperature=0.0)
    with pytest.raises(ValueError, match="sampled_groups"):
        generate(model, labels, sampled_groups=5)
    # MGVQ's --top-k 0 means k = 2**0 = 1: greedy
    greedy = generate(model, labels, top_k=1, seeds=torch.tensor([3]))
    assert torch.equal(generate(model, labels, top_k=0, top_k_log2=True, seeds=torch.tensor([9])), greedy)
    # sampled_groups=2: the first two groups are sampled, the last two greedy
    seeds = torch.tensor([5])
    codes = generate(model, labels, seeds=seeds, sampled_groups=2)
    assert torch.equal(codes, replay(model, labels, codes, seeds, top_k=[0, 0, 1, 1]))


def test_cfg_scale_below_one_is_refused_and_nan_logits_raise():
    model = tiny_gpt("parallel", grid=2)
    labels = torch.tensor([1, 4, 7])
    with pytest.raises(ValueError, match="cfg_scale=0.5"):
        generate(model, labels, cfg_scale=0.5)
    with torch.no_grad():
        model.cls_embedding.embedding_table.weight[4] = float("nan")  # only the sample of label 4 breaks
    for cfg_scale in (1.0, 2.0):
        with pytest.raises(FloatingPointError, match=r"rows \[1\]"):
            generate(model, labels, cfg_scale=cfg_scale, seeds=torch.tensor([1, 2, 3]))


def small_gpt(head: str, grid: int = 3) -> GPT:
    """Two groups and a one-layer AR head: the smallest model whose compiled step still holds every part."""
    torch.manual_seed(0)
    config = GPTConfig.preset("tiny", codebook_groups=2, codes_per_group=16, grid_size=grid, num_classes=10,
                              codebook_embed_dim=8, head=head, input_embedding="codebook", ar_head_layers=1)
    model = GPT(config, codebook=torch.randn(32, 4))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


# Guided positions 1..3 (cfg_interval 2, a linear ramp of the scale), conditional-only positions 4..8: two graphs.
COMPILE_SETTINGS = dict(cfg_scale=2.5, cfg_interval=2, cfg_schedule="linear", temperature=[1.3, 0.7], top_k=[5, 3],
                        top_p=[1.0, 0.8])


@pytest.mark.parametrize("head", ["parallel", "ar"])
def test_compiled_generate_draws_the_eager_codes_with_one_graph_per_phase(head):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, labels, seeds = small_gpt(head), torch.tensor([1, 4, 7]), torch.tensor([11, 12, 2**40])
    eager = generate(model, labels, seeds=seeds, **COMPILE_SETTINGS)
    compiled = generate(model, labels, seeds=seeds, compile=True, **COMPILE_SETTINGS)
    assert torch.equal(compiled, eager)
    assert counters["stats"]["unique_graphs"] == 2  # 9 positions: the class one runs eagerly, then two phases
    again = generate(model, labels, seeds=seeds + 1, compile=True, **COMPILE_SETTINGS)  # same batch and settings
    assert counters["stats"]["unique_graphs"] == 2
    assert torch.equal(again, generate(model, labels, seeds=seeds + 1, **COMPILE_SETTINGS))
    if head == "parallel":  # a last, partial batch (the AR head's caches follow the trunk's batch the same way;
        # its two more graphs cost a minute of compiling on 2 cores)
        smaller = generate(model, labels[:2], seeds=seeds[:2], compile=True, **COMPILE_SETTINGS)
        assert counters["stats"]["unique_graphs"] == 4  # its own two: the KV-cache buffers have the batch's shape
        assert torch.equal(smaller, eager[:2])  # and a sample does not depend on its batch
    torch._dynamo.reset()


def test_compiled_graph_count_does_not_grow_with_the_sequence(monkeypatch):
    """Dynamo alone (backend eager: the same capture, no code generation) over 4 and 16 positions."""
    import importlib

    from torch._dynamo.utils import counters

    gen = importlib.import_module("sampling.generate")  # the module: the package exports its function `generate`
    step = torch.compile(gen.position_step, backend="eager", fullgraph=True, dynamic=True)  # as on a CPU
    monkeypatch.setattr(gen, "_COMPILED", {"cpu": step})
    graphs = []
    for grid in (2, 4):
        torch._dynamo.reset()
        counters.clear()
        generate(small_gpt("ar", grid), torch.tensor([1, 4]), seeds=torch.tensor([1, 2]), compile=True,
                 **{**COMPILE_SETTINGS, "cfg_interval": 0})  # position 1 guided, 2.. not
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [2, 2]
    torch._dynamo.reset()


def test_unguarded_runs_the_graph_dynamo_picks_and_only_where_its_guards_pass(monkeypatch):
    def window_sum(x, n):
        return x[:n + 1].sum() * 2

    torch._dynamo.reset()
    compiled = torch.compile(window_sum, backend="eager", fullgraph=True, dynamic=True)
    x = torch.arange(10.0)
    assert compiled(x, 3) == 6 * 2
    graph = unguarded(compiled, (x, 3), {}, also={"n": 8})  # the graph serves positions 3..8 (guards: n+1 <= 10)
    assert graph is not None and graph(x, 5) == 15 * 2 and graph(x, 8) == 36 * 2
    assert unguarded(compiled, (x, 3), {}, also={"n": 20}) is None  # a later value its guards refuse
    assert unguarded(compiled, (x.double(), 3), {}) is None  # no graph compiled for float64
    assert unguarded(window_sum, (x, 3), {}) is None  # not a compiled function

    class Doubler(torch.nn.Module):
        def step(self, x):
            return x * 2

    doubler = Doubler()
    method = torch.compile(doubler.step, backend="eager", fullgraph=True, dynamic=True)
    method(x)
    assert torch.equal(unguarded(method, (x,), {})(x + 1), (x + 1) * 2)  # a bound method stays bound
    monkeypatch.delattr(torch._dynamo.eval_frame, "_debug_get_cache_entry_list")  # a torch without it
    assert unguarded(compiled, (x, 3), {}) is None
    torch._dynamo.reset()


def test_compiled_generate_checks_guards_at_the_first_position_of_each_phase(monkeypatch):
    """Later positions of a phase run its graph directly, with the eager codes (dynamo's capture, backend eager)."""
    import importlib

    gen = importlib.import_module("sampling.generate")
    torch._dynamo.reset()
    compiled = torch.compile(gen.position_step, backend="eager", fullgraph=True, dynamic=True)
    guarded = []

    def counted(*args, **kwargs):
        guarded.append(args[2])  # the position
        return compiled(*args, **kwargs)

    counted._torchdynamo_orig_callable = compiled._torchdynamo_orig_callable
    monkeypatch.setattr(gen, "_COMPILED", {"cpu": counted})
    model, labels, seeds = small_gpt("ar"), torch.tensor([1, 4, 7]), torch.tensor([11, 12, 2**40])
    codes = generate(model, labels, seeds=seeds, compile=True, **COMPILE_SETTINGS)
    assert guarded == [1, 4]  # positions 1..3 guided, 4..8 not: 6 of the 8 compiled positions ran unguarded
    assert torch.equal(codes, generate(model, labels, seeds=seeds, **COMPILE_SETTINGS))
    torch._dynamo.reset()
