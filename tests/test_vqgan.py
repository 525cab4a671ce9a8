"""LlamaGen VQ and IBQ tokenizers (tokenizer.families.vqgan.model) against golden outputs of the official code (tests/fixtures)."""
import pytest
import torch

from conftest import family_fixture
from tokenizer.base import swish
from tokenizer.extract import encoder_layout
from tokenizer.families.vqgan.model import PRESETS, VQGAN, VQGANConfig, chunked_argmax
from tokenizer.families.vqgan.official import _ibq_ema, llamagen_to_vqgan

RTOL = 1e-4


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest error relative to the reference's scale."""
    return ((a - b).abs().max() / b.abs().max()).item()


def codes_agree(codes, want, margin, min_margin=1e-4):
    """Codes equal wherever the official top-2 margin exceeds min_margin; returns how many pixels were checked."""
    sure = margin > min_margin
    assert torch.equal(codes[..., 0][sure], want[sure])
    return int(sure.sum())


def build(fixture: dict, quantizer: str, sd: dict) -> VQGAN:
    # LlamaGen's attention sits at the last level (its fixture config does not say so: the official code hard-wires it)
    config = {"attn_levels": [len(fixture["config"]["ch_mult"]) - 1], **fixture["config"]}
    model = VQGAN(VQGANConfig(quantizer=quantizer, **config)).eval()
    model.load_state_dict(sd, strict=True)
    return model


llamagen = family_fixture("llamagen", "llamagen_vq", "tokenizer")
ibq = family_fixture("ibq", "ibq", "tokenizer")


def test_llamagen_vq_matches_official(llamagen, official_weights):
    sd = llamagen_to_vqgan(official_weights(llamagen["official_keys"], llamagen["seed"]))
    model = build(llamagen, "cosine", sd)
    x = llamagen["images"]
    assert close(model.encode(x), llamagen["latent"]) < RTOL
    codes = model.encode_codes(x)
    assert codes.shape == (2, 4, 4, 1) and codes.dtype == torch.int64
    assert codes_agree(codes, llamagen["codes"], llamagen["margin"]) == 32  # every pixel is decided
    assert close(model.decode_codes(llamagen["codes"][..., None]), llamagen["pixels"]) < RTOL


@pytest.mark.parametrize("which", ["ema", "raw"])
def test_ibq_matches_official(ibq, official_weights, which):
    full = official_weights(ibq["official_keys"], ibq["seed"])
    sd = _ibq_ema(full, "fixture") if which == "ema" else {k: v for k, v in full.items() if "model_ema" not in k}
    model = build(ibq, "dot", sd)
    want = ibq[which]
    assert close(model.encode(ibq["images"]), want["latent"]) < RTOL
    assert codes_agree(model.encode_codes(ibq["images"]), want["codes"], want["margin"]) >= 30
    assert close(model.decode_codes(want["codes"][..., None]), want["pixels"]) < RTOL


def test_ibq_picks_the_largest_dot_product_not_the_nearest_code():
    # Code 1 is nearer to z in Euclidean distance, code 0 has the larger dot product: IBQ takes code 0.
    table = torch.tensor([[3.0, 0.0], [1.0, 0.0]])
    z = torch.tensor([[1.0, 0.0]])
    assert chunked_argmax(z, table).item() == 0
    q = VQGAN(VQGANConfig(codebook_size=2, codebook_dim=2, quantizer="dot", ch=32, ch_mult=[1], attn_levels=[],
                          z_channels=32)).quantize
    q.embedding.weight.data.copy_(table)
    assert q.nearest(z.view(1, 2, 1, 1)).item() == 0
    q.kind = "cosine"  # LlamaGen: both rows have cosine 1 with z; the normalised table decodes unit rows
    assert torch.allclose(q.lookup(torch.tensor([[[[0], [1]]]])), torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))


def test_chunked_argmax_equals_one_matmul():
    g = torch.Generator().manual_seed(0)
    z, table = torch.randn(37, 16, generator=g), torch.randn(1000, 16, generator=g)
    want = (z @ table.t()).argmax(-1)
    for max_elems in (1, 1000, 5000, 10**9):  # one row, one row per chunk, 5 rows, everything
        assert torch.equal(chunked_argmax(z, table, max_elems), want)


def test_presets_are_the_released_architectures():
    vq16 = VQGANConfig.preset("llamagen-vq16")
    assert (vq16.downsample, vq16.codebook_size, vq16.codebook_dim, vq16.quantizer) == (16, 16384, 8, "cosine")
    for n in (1024, 8192, 16384, 262144):
        c = VQGANConfig.preset(f"ibq-{n}")
        assert (c.downsample, c.codes_per_group, c.latent_channels, c.num_res_blocks, c.attn_levels) == \
               (16, n, 256, 4, [4])
    assert set(PRESETS) >= {"llamagen-vq16", "ibq-262144"}
    with torch.device("meta"):  # parameter counts of the official modules built with the released configs
        n_vq16 = sum(p.numel() for p in VQGAN(vq16).parameters())
        n_ibq = sum(p.numel() for p in VQGAN(VQGANConfig.preset("ibq-16384")).parameters())
    assert (n_vq16, n_ibq) == (71_883_403, 110_982_019)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="quantizer='l2'"):
        VQGANConfig(codebook_size=4, codebook_dim=2, quantizer="l2")
    with pytest.raises(ValueError, match="attn_levels"):
        VQGANConfig(codebook_size=4, codebook_dim=2, quantizer="dot", attn_levels=[7])
    with pytest.raises(ValueError, match="unknown VQGANConfig fields"):
        VQGANConfig.from_dict({"codebook_size": 4, "codebook_dim": 2, "quantizer": "dot", "depth": 3})


def test_z_channels_need_not_be_a_multiple_of_32():
    """Only the normalised widths (ch x ch_mult) meet GroupNorm(32); z (IBQ and taming accept 16) does not."""
    config = VQGANConfig(codebook_size=16, codebook_dim=4, quantizer="dot", ch=32, ch_mult=[1, 2], attn_levels=[],
                         num_res_blocks=1, z_channels=16)
    model = VQGAN(config).eval()
    codes = model.encode_codes(torch.rand(1, 3, 8, 8) * 2 - 1)
    assert codes.shape == (1, 4, 4, 1) and model.decode_codes(codes).shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="multiples of 32"):
        VQGANConfig(codebook_size=16, codebook_dim=4, quantizer="dot", ch=48, ch_mult=[1, 2])


def test_swish_is_the_official_product_with_and_without_autograd():
    """x * sigmoid(x) exactly, as LlamaGen, IBQ and Open-MAGVIT2 compute it: F.silu rounds differently, which flipped
    a VQ-16 code against LlamaGen's own extraction (README, benchmarks)."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 4
    want = x * torch.sigmoid(x)
    with torch.no_grad():
        assert torch.equal(swish(x), want)  # the in-place branch
    leaf = x.clone().requires_grad_()
    out = swish(leaf)
    assert torch.equal(out.detach(), want)
    out.sum().backward()
    s = torch.sigmoid(x)
    assert torch.allclose(leaf.grad, s * (1 + x * (1 - s)), rtol=1e-5, atol=1e-6)


def test_fp32_cpu_extraction_keeps_the_official_layout():
    """fp32 codes are promised identical to the official loop's: only bf16 CPU runs go channels_last."""
    cpu = torch.device("cpu")
    assert encoder_layout(cpu, "llamagen_vq", None) == torch.contiguous_format
    assert encoder_layout(cpu, "llamagen_vq", torch.bfloat16) == torch.channels_last
    assert encoder_layout(cpu, "mgvq", torch.bfloat16) == torch.contiguous_format
    assert encoder_layout(torch.device("cuda"), "ibq", torch.bfloat16) == torch.contiguous_format
