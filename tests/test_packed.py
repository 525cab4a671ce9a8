"""Packed linear weights for CPU decoding (gpt.packed), attached from outside the model: same results as F.linear,
used only where they should be, and gone after a generation."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gpt import GPT, GPTConfig
import gpt.packed
from gpt.layers import FeedForward
from gpt.packed import PackedFeedForward, PackedLinear, Packs
from sampling import generate

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="packs need oneDNN")


class OpLog(TorchDispatchMode):
    """Records the name of every aten/mkldnn op that runs."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def packed_linear(bias: bool = True) -> PackedLinear:
    torch.manual_seed(0)
    layer = PackedLinear(torch.nn.Linear(40, 48, bias=bias))
    layer.refresh()
    assert layer.packed is not None
    return layer


@pytest.mark.parametrize("shape", [(1, 40), (3, 40), (8, 40), (16, 40), (33, 40), (2, 5, 40)])
def test_packed_linear_equals_f_linear_for_any_row_count(shape):
    layer = packed_linear()
    x = torch.randn(shape)
    with torch.no_grad(), OpLog() as log:
        got = layer(x)
    assert "mkldnn._linear_pointwise" in log.names  # the packed GEMM ran, not a fallback
    want = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


def test_packed_linear_reads_strided_rows():
    layer = packed_linear(bias=False)
    x = torch.randn(6, 3, 40)[:, -1]  # every third row: not contiguous
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)


def test_packs_are_skipped_under_autograd_and_autocast():
    layer = packed_linear()
    x = torch.randn(8, 40)
    with OpLog() as log:
        y = layer(x)  # grad enabled: the pack has no backward
    y.sum().backward()
    assert layer.weight.grad is not None and "mkldnn._linear_pointwise" not in log.names
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), OpLog() as log:
        assert layer(x).dtype == torch.bfloat16
    assert "mkldnn._linear_pointwise" not in log.names  # a float32 pack never serves bfloat16 autocast


def test_a_pack_follows_its_weight():
    layer = packed_linear(bias=False)
    kept = layer.packed
    layer.refresh()
    assert layer.packed is kept  # unchanged weight: the kept pack, not a new one
    with torch.no_grad():
        layer.weight.mul_(-2.0)  # as an optimizer step would
    layer.refresh()
    assert layer.packed is not kept
    x = torch.randn(4, 40)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)


def test_feed_forward_runs_w1_and_w3_as_one_packed_gemm():
    torch.manual_seed(0)
    plain = FeedForward(40, 64).eval()
    x = torch.randn(2, 3, 40)
    with torch.no_grad():
        want = plain(x)  # unpacked: w1, w3 and w2 through F.linear
        ff = PackedFeedForward(plain)
        ff.refresh()
        assert ff.packed.shape == (128, 40)  # w1 and w3 stacked
        assert ff.w1 is plain.w1 and ff.w2.weight is plain.w2.weight  # the same parameters
        with OpLog() as log:
            got = ff(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert log.names.count("mkldnn._linear_pointwise") == 2  # [w1; w3] and w2, nothing through F.linear
        assert "aten.mm" not in log.names and "aten.addmm" not in log.names
        kept = ff.packed
        ff.w3.weight.mul_(0.5)  # either weight changing makes a new pack
        ff.refresh()
        assert ff.packed is not kept
        unpacked = F.linear(F.silu(F.linear(x, ff.w1.weight)) * F.linear(x, ff.w3.weight), ff.w2.weight)
        torch.testing.assert_close(ff(x), unpacked, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_compiled_graphs_run_the_packed_gemm(bf16):
    """Under torch.compile a pack runs as the op gpt::packed_linear (inductor takes no opaque oneDNN tensor in its
    own lowering), with the eager result."""
    if bf16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no bfloat16 oneDNN on this CPU")
    layer = packed_linear()
    x = torch.randn(8, 40)
    targets = []

    def recording_backend(gm, inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        layer.refresh()
        assert layer.packed.dtype == (torch.bfloat16 if bf16 else torch.float32)
        eager = layer(x)
        traced = torch.compile(layer, backend=recording_backend, fullgraph=True)(x)
        inductor = torch.compile(layer, fullgraph=True, dynamic=True)(x)
    assert "gpt.packed_linear" in targets
    torch.testing.assert_close(traced, eager, rtol=0, atol=0)
    torch.testing.assert_close(inductor, eager, rtol=0, atol=0)


def tiny_gpt(head: str) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig.preset("tiny", codebook_groups=2, codes_per_group=16, grid_size=2, num_classes=10,
                              codebook_embed_dim=8, head=head, input_embedding="codebook")
    return GPT(config, codebook=torch.randn(32, 4)).eval()


def test_generate_runs_on_packs_and_leaves_none_behind():
    model = tiny_gpt("parallel")
    before = {name: type(m) for name, m in model.named_modules()}
    with OpLog() as log:
        generate(model, torch.tensor([1, 2]), cfg_scale=2.0, seeds=torch.tensor([0, 1]))
    assert log.names.count("mkldnn._linear_pointwise") > 0
    assert "aten.mm" not in log.names and "aten.addmm" not in log.names  # every GEMM of the step is packed
    assert {name: type(m) for name, m in model.named_modules()} == before  # the plain model again
    assert all(m.kv_cache is None for m in model.modules() if hasattr(m, "kv_cache"))
    twin = copy.deepcopy(model)  # the kept packs live outside the model: a copy (an EMA, say) has none
    assert torch.equal(generate(twin, torch.tensor([1, 2]), cfg_scale=2.0, seeds=torch.tensor([0, 1])),
                       generate(model, torch.tensor([1, 2]), cfg_scale=2.0, seeds=torch.tensor([0, 1])))
    pickle.loads(pickle.dumps(model))


def test_a_torch_without_the_private_packing_ops_samples_through_f_linear(monkeypatch):
    """The packs use private torch ops (torch.ops.mkldnn._*). With one of them gone, nothing is packed, every GEMM
    runs through F.linear, and the codes equal the packed run's (the tiny model's logits agree to rounding)."""
    model = tiny_gpt("parallel")
    packed = generate(model, torch.tensor([1, 2]), cfg_scale=2.0, seeds=torch.tensor([0, 1]))
    monkeypatch.setattr(gpt.packed, "_ONEDNN_OPS", gpt.packed._ONEDNN_OPS + ("_an_op_a_later_torch_removed",))
    gpt.packed.packing_available.cache_clear()
    try:
        assert not gpt.packed.packing_available()
        with OpLog() as log:
            plain = generate(model, torch.tensor([1, 2]), cfg_scale=2.0, seeds=torch.tensor([0, 1]))
    finally:
        monkeypatch.undo()
        gpt.packed.packing_available.cache_clear()
    assert "mkldnn._linear_pointwise" not in log.names and {"aten.mm", "aten.addmm"} & set(log.names)
    assert torch.equal(plain, packed)
    assert gpt.packed.packing_available()


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no bfloat16 oneDNN on this CPU")
def test_bf16_autocast_runs_on_a_bf16_pack():
    torch.manual_seed(0)
    layer = PackedLinear(torch.nn.Linear(40, 48))
    x = torch.randn(8, 40)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        layer.refresh()  # made under bfloat16 autocast: the oneDNN bfloat16 kind
        assert layer.packed.dtype == torch.bfloat16
        with OpLog() as log:
            got = layer(x)
        want = F.linear(x, layer.weight, layer.bias)  # autocast's own: bfloat16 weights cast at the call
    assert "mkldnn._linear_pointwise" in log.names and got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2e-2 * want.abs().max().item())
    with torch.no_grad(), OpLog() as log:
        plain = layer(x)  # float32 now: the bfloat16 pack must not serve it
    assert "mkldnn._linear_pointwise" not in log.names
    torch.testing.assert_close(plain, F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
    layer.refresh()  # outside autocast: a float32 pack replaces it
    assert layer.packed.dtype == torch.float32


def test_bench_sample_compares_the_step_with_its_packed_gemms():
    """scripts/bench.py sample on a tiny model: it runs, and its step reference goes through the packed GEMMs."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
    out = subprocess.run([sys.executable, str(bench), "sample", "--preset", "tiny", "--groups", "2",
                          "--codes-per-group", "16", "--grid", "2", "--batch-size", "2", "--tokenizer-preset", "",
                          "--steps", "1", "--step-repeats", "2", "--threads", "1", "--device", "cpu"],
                         capture_output=True, text=True, check=True).stdout
    assert re.search(r"eager, 2x2 codes x G2: [\d.]+ s/batch", out)
    assert "weight GEMMs (packed, fp32 oneDNN)" in out and re.search(r"eager step [\d.]+ ms: ratio [\d.]+", out)


def test_packs_swap_twins_sharing_the_parameters_in_and_out_and_hold_no_model():
    import gc
    import weakref

    model = tiny_gpt("ar")
    types = {name: type(m) for name, m in model.named_modules()}
    params = dict(model.named_parameters())
    packs = Packs(model)
    packs.attach()
    plain = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert plain and all(name.endswith((".w1", ".w3")) for name in plain)  # run through their FeedForward's pack
    assert {n: p for n, p in model.named_parameters()}.keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameters, the same names
    packs.detach()
    assert {name: type(m) for name, m in model.named_modules()} == types
    generate(model, torch.tensor([1, 2]), seeds=torch.tensor([0, 1]))  # keeps its packs and caches for the next
    gone = weakref.ref(model)
    del model, packs
    gc.collect()
    assert gone() is None  # what generate keeps does not keep the model alive
