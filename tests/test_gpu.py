"""CUDA-only paths: flash SDPA under bf16, fused AdamW, compiled sampling with CUDA graphs, bf16 extraction.

Skipped without a CUDA device; `bash scripts/gpu_check.sh` runs them (with the throughput report) on a GPU machine.
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpt import GPT, GPTConfig
from gpt.train import cross_entropy_per_group
from sampling.generate import generate
from tokenizer import MGVQConfig, load_tokenizer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def adamw(model: GPT, fused: bool) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05, fused=fused)


def small_gpt(**overrides) -> GPT:
    """GPT-B's head size (64) and norms on a small trunk, every weight random, on the GPU."""
    config = GPTConfig.preset("tiny", dim=256, n_layer=2, n_head=4, num_classes=10, codebook_groups=4,
                              codes_per_group=512, grid_size=8, codebook_embed_dim=None, input_embedding="learned",
                              class_dropout_prob=0.0, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0,
                              **overrides)
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model.to(CUDA)


def test_bf16_flash_attention_training_step_matches_fp32():
    """bf16 autocast with only the flash kernel allowed (raises if flash cannot run), then a fused AdamW step."""
    model = small_gpt()
    codes = torch.randint(512, (8, 64, 4), device=CUDA)
    labels = torch.randint(10, (8,), device=CUDA)
    with torch.no_grad():
        fp32 = model(codes, labels)
    optimizer = adamw(model, fused=True)
    with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        logits = model(codes, labels)
        loss, per_group = cross_entropy_per_group(logits, codes)
    assert logits.dtype == loss.dtype == per_group.dtype == torch.float32
    scale = fp32.abs().max().item()
    assert (logits - fp32).abs().max().item() < 0.05 * scale  # bf16 rounding of a 2-layer trunk
    loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    moved = [(p - b).abs().max().item() for p, b in zip(model.parameters(), before)]
    assert all(torch.isfinite(p).all() for p in model.parameters()) and max(moved) > 1e-4


def test_fused_adamw_equals_foreach_adamw():
    steps = []
    for fused in (True, False):
        model = small_gpt()
        optimizer = adamw(model, fused=fused)
        torch.manual_seed(1)
        for _ in range(3):
            codes = torch.randint(512, (4, 64, 4), device=CUDA)
            loss, _ = cross_entropy_per_group(model.eval()(codes, torch.zeros(4, dtype=torch.long, device=CUDA)), codes)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        steps.append([p.detach().clone() for p in model.parameters()])
    assert max((a - b).abs().max().item() for a, b in zip(*steps)) < 1e-5


def test_compiled_sampling_with_cuda_graphs_equals_eager():
    """generate(compile=True), what the Sampler uses on CUDA (graphs captured once, then replayed), gives the
    eager codes."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = small_gpt().eval()
    labels, seeds = torch.arange(6, device=CUDA) % 10, torch.arange(6)
    kwargs = dict(cfg_scale=2.0, top_k=16, temperature=1.0, seeds=seeds)
    eager = generate(model, labels, **kwargs)
    first = generate(model, labels, compile=True, **kwargs)
    again = generate(model, labels, compile=True, **kwargs)  # replays the captured graphs
    assert torch.equal(first, again)
    assert (first == eager).float().mean().item() > 0.99  # kernels differ in the last bits; a flipped draw is rare


def test_bf16_extraction_codes_agree_with_fp32(golden):
    """Extraction's bf16 autocast: codes change only where two code rows are nearly equidistant."""
    config = MGVQConfig.from_dict(torch.load(golden / "tokenizer_tiny_expected.pt", weights_only=True)["config"])
    tokenizer = load_tokenizer(golden / "tokenizer_tiny.pt", config).to(CUDA)
    torch.manual_seed(0)
    images = torch.rand(16, 3, 64, 64, device=CUDA) * 2 - 1
    fp32 = tokenizer.encode_codes(images)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = tokenizer.encode_codes(images)
    assert bf16.shape == fp32.shape and (bf16 == fp32).float().mean().item() > 0.9


def test_bf16_sampling_logits_are_float32():
    model = small_gpt().eval()
    model.setup_cache(2)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        h = model.prefill(torch.tensor([1, 2], device=CUDA))
        logits = model.sub_logits(h, 0)
    assert logits.dtype == torch.float32
    model.clear_cache()


def test_training_steps_never_wait_for_the_gpu(tmp_path, golden, monkeypatch, fresh_accelerate_state):
    """CUDA's sync detector set to error inside every optimizer step of train(): no step reads the device (bf16,
    fused AdamW, grad accumulation); the reads happen at log lines and checkpoints, outside the steps."""
    import gpt.train as T
    from test_train import train_config, write_store

    store = write_store(tmp_path / "codes", golden)
    step = T.GPTStep.__call__

    def guarded(self):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(self)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(T.GPTStep, "__call__", guarded)
    export = T.train(train_config(store, tmp_path / "run", golden, precision="bf16", max_steps=6, log_every=3))
    assert export.is_file()
