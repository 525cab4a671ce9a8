"""The MGVQ tokenizer against the official code's outputs (golden), plus the quantizer, loading and config."""
import hashlib
import random

import pytest
import torch
import torch.nn.functional as F

from tokenizer import MGVQ, MGVQConfig, TokenizerRef, load_tokenizer, save_tokenizer
from tokenizer.common.io import sha256_file
from tokenizer.families.mgvq.layers import LiteMLA, RMSNorm2d
from tokenizer.families.mgvq.quantizer import MultiGroupQuantizer


def assert_close(got, want):
    """The golden README's tolerance: 1e-4 relative to the tensor's largest magnitude."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.fixture(scope="module")
def expected(golden):
    return torch.load(golden / "tokenizer_tiny_expected.pt", weights_only=True)


@pytest.fixture(scope="module")
def tiny(golden, expected) -> MGVQ:
    return load_tokenizer(golden / "tokenizer_tiny.pt", MGVQConfig.from_dict(expected["config"]))


@pytest.fixture
def tiny_config(expected) -> MGVQConfig:
    return MGVQConfig.from_dict(expected["config"])


# ---- golden parity with the official MGVQ code ----

def test_golden_pre_quant(tiny, expected):
    assert not tiny.training  # BatchNorm running statistics in the golden file are random: eval mode matters
    assert_close(tiny.encode(expected["images"]), expected["pre_quant"])


def test_golden_codes(tiny, expected):
    codes = tiny.encode_codes(expected["images"])
    assert codes.dtype == torch.int64 and codes.shape == expected["indices"].shape == (2, 8, 8, 4)
    clear = expected["margins"] > 1e-4
    assert clear.float().mean() > 0.95
    assert torch.equal(codes[clear], expected["indices"][clear])


def test_golden_quant(tiny, expected):
    assert_close(tiny.quantize.lookup(expected["indices"]), expected["quant"])
    z_q, codes, _, _ = tiny.quantize(tiny.encode(expected["images"]))
    assert_close(z_q, expected["quant"])


def test_golden_recon_and_decode_codes(tiny, expected):
    assert_close(tiny.decode(expected["quant"]), expected["recon"])
    assert_close(tiny.decode_codes(expected["indices"]), expected["recon"])
    assert_close(tiny.decode_codes(expected["indices"], groups_to_use=2), expected["decode_groups_2"])


# ---- quantizer ----

def random_quantizer(groups=3, codes_per_group=17, dim=4, chunk_size=None) -> MultiGroupQuantizer:
    q = MultiGroupQuantizer(groups * codes_per_group, groups, dim, chunk_size=chunk_size)
    with torch.no_grad():
        q.embedding.weight.normal_()  # raw rows of different norms: only their direction may matter
    return q


def test_nearest_is_highest_cosine():
    q = random_quantizer()
    z = torch.randn(2, 12, 5, 3)
    codes = q.nearest(z)  # (2, 5, 3, 3)
    table = q.embedding.weight.double().view(3, 17, 4)
    zg = z.double().permute(0, 2, 3, 1).reshape(2, 5, 3, 3, 4)
    cos = torch.einsum("bhwgd,gkd->bhwgk", F.normalize(zg, dim=-1), F.normalize(table, dim=-1))
    top2 = cos.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-6
    assert clear.float().mean() > 0.9
    assert torch.equal(codes[clear], cos.argmax(-1)[clear])
    assert codes.max() < 17 and codes.min() >= 0


def test_chunking_gives_identical_codes():
    q = random_quantizer(chunk_size=7)
    z = torch.randn(3, 12, 6, 5)
    chunked = q.nearest(z)
    q.chunk_size = 10**6
    assert torch.equal(chunked, q.nearest(z))


def test_lookup_rows_and_zeroed_groups():
    q = random_quantizer()
    codes = torch.randint(0, 17, (2, 3, 4, 3))
    full = q.lookup(codes)  # (2, 12, 3, 4)
    rows = F.normalize(q.embedding.weight, dim=-1).view(3, 17, 4)
    assert torch.equal(full[1, 4:8, 2, 0], rows[1, codes[1, 2, 0, 1]])  # group 1 of pixel (2, 0)
    part = q.lookup(codes, groups_to_use=1)
    assert torch.equal(part[:, :4], full[:, :4]) and not part[:, 4:].any()
    with pytest.raises(ValueError, match="outside"):
        q.lookup(torch.full((1, 1, 1, 3), 17))
    with pytest.raises(ValueError, match="groups_to_use"):
        q.lookup(codes, groups_to_use=4)


def test_decode_codes_ignores_dropped_groups(tiny):
    codes = torch.randint(0, 64, (1, 8, 8, 4))
    other = codes.clone()
    other[..., 2:] = torch.randint(0, 64, (1, 8, 8, 2))
    assert torch.equal(tiny.decode_codes(codes, groups_to_use=2), tiny.decode_codes(other, groups_to_use=2))
    assert not torch.equal(tiny.decode_codes(codes), tiny.decode_codes(other))
    assert torch.equal(tiny.decode_codes(codes, groups_to_use=0), tiny.decode(torch.zeros(1, 32, 8, 8)))


def test_training_forward_losses_and_nested_masking(tiny_config):
    model = MGVQ(tiny_config).train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, out = model(x)
    assert recon.shape == x.shape and out.codes.shape == (2, 2, 2, 4)
    zn = F.normalize(model.encode(x).view(2, 4, 8, 2, 2), dim=2)  # (B, G, d, h, w)
    zq = out.z_q.view(2, 4, 8, 2, 2)
    want = (zq - zn).square().mean(dim=(0, 2, 3, 4))
    torch.testing.assert_close(out.vq_loss, want)
    torch.testing.assert_close(out.commit_loss, 0.25 * want)
    (out.commit_loss.sum() + recon.square().mean()).backward()  # straight-through: the encoder gets gradients
    assert model.encoder.project_in.conv.conv.weight.grad.abs().sum() > 0

    model.quantize.mask_probs = (0.0, 1.0, 1.0, 1.0)  # every forward masks groups 1..3
    _, out = model(x)
    assert out.z_q[:, :8].abs().sum() > 0 and not out.z_q[:, 8:].any()
    assert out.vq_loss[0] > 0 and not out.vq_loss[1:].any()
    with pytest.raises(ValueError, match="non-decreasing"):
        model.quantize.mask_probs = (0.0, 0.5, 0.2)


def test_rms_norm2d_is_the_triton_kernel():
    """x / sqrt(mean over channels of x^2 + 1e-5) * w + b; inputs small enough that the eps matters."""
    norm = RMSNorm2d(5)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = 3e-3 * torch.randn(2, 5, 3, 4)
    xd = x.double()
    want = xd / (xd.square().mean(1, keepdim=True) + 1e-5).sqrt() * norm.weight.double()[:, None, None]
    torch.testing.assert_close(norm(x), (want + norm.bias.double()[:, None, None]).float())


def test_lite_mla_linear_and_quadratic_forms():
    """Both code paths (H*W > 32: linear, else quadratic) equal sum_j (k_j.q_i) v_j / sum_j (k_j.q_i)."""
    mla = LiteMLA(64, "trms2d").eval()
    for hw in (4, 8):  # 16 pixels: quadratic form; 64 pixels: linear form
        x = torch.randn(2, 64, hw, hw)
        qkv = mla.qkv(x).double().view(2, 2, 96, hw * hw)
        q, k, v = F.relu(qkv[:, :, :32]), F.relu(qkv[:, :, 32:64]), qkv[:, :, 64:]
        att = torch.einsum("bhdj,bhdi->bhij", k, q)  # (B, heads, query, key)
        out = torch.einsum("bhij,bhdj->bhdi", att / att.sum(-1, keepdim=True), v).reshape(2, 64, hw, hw)
        torch.testing.assert_close(mla(x), mla.proj(out.float()), rtol=1e-4, atol=1e-4)


# ---- loading ----

def golden_state_dict(golden) -> dict:
    return torch.load(golden / "tokenizer_tiny.pt", weights_only=True)["model"]


def test_loaded_model_is_frozen_eval(tiny):
    assert not tiny.training and not any(p.requires_grad for p in tiny.parameters())
    assert tiny.codebook().shape == (256, 8)


def test_layouts_state_dict_ema_and_own_file(tmp_path, golden, expected, tiny, tiny_config):
    sd = golden_state_dict(golden)
    torch.save({"state_dict": sd}, tmp_path / "official.pt")
    model = load_tokenizer(tmp_path / "official.pt", tiny_config)
    assert torch.equal(model.decode_codes(expected["indices"]), tiny.decode_codes(expected["indices"]))

    # With several entries the EMA weights win.
    ema = {k: v + 1 if k == "quant_conv.bias" else v for k, v in sd.items()}
    torch.save({"model": sd, "ema": ema}, tmp_path / "both.pt")
    model = load_tokenizer(tmp_path / "both.pt", tiny_config)
    assert torch.equal(model.quant_conv.bias, sd["quant_conv.bias"] + 1)

    # This project's own file stores the config: no config argument needed, identical outputs.
    save_tokenizer(tiny, tmp_path / "own.pt")
    model = load_tokenizer(tmp_path / "own.pt")
    assert model.config == tiny_config
    assert torch.equal(model.encode_codes(expected["images"]), tiny.encode_codes(expected["images"]))
    # A given config must equal the stored one, even where keys and shapes could not tell (an activation).
    model = TokenizerRef(config=tiny_config, checkpoint=str(tmp_path / "own.pt")).load()
    assert torch.equal(model.quant_conv.weight, tiny.quant_conv.weight)
    other = MGVQConfig.from_dict({**expected["config"], "decoder": {**expected["config"]["decoder"], "act": "silu"}})
    with pytest.raises(ValueError, match="decoder.act"):
        load_tokenizer(tmp_path / "own.pt", other)


def test_strict_loading_names_what_is_wrong(tmp_path, golden, tiny_config):
    sd = golden_state_dict(golden)
    cases = {
        "missing keys.*decoder.project_in.main.conv.bias": {k: v for k, v in sd.items()
                                                            if k != "decoder.project_in.main.conv.bias"},
        "unexpected keys.*encoder.extra.weight": {**sd, "encoder.extra.weight": torch.zeros(1)},
        r"quant_conv.weight: checkpoint \(32, 4, 1, 1\) vs model \(32, 8, 1, 1\)":
            {**sd, "quant_conv.weight": torch.zeros(32, 4, 1, 1)},
    }
    for i, (message, bad) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.pt"
        torch.save({"model": bad}, path)
        with pytest.raises(RuntimeError, match=f"(?s)bad{i}.pt.*{message}"):
            load_tokenizer(path, tiny_config)


def test_loading_errors(tmp_path, golden):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_tokenizer(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="stores no config"):
        load_tokenizer(golden / "tokenizer_tiny.pt")
    torch.save({"optimizer": {}}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="no weights found"):
        load_tokenizer(tmp_path / "empty.pt")


def test_sha256_file_streams(tmp_path):
    data = random.Random(0).randbytes(100_003)
    (tmp_path / "blob").write_bytes(data)
    assert sha256_file(tmp_path / "blob", chunk_bytes=4096) == hashlib.sha256(data).hexdigest()


# ---- configuration ----

def test_config_dicts(expected):
    d = expected["config"]
    config = MGVQConfig.from_dict(d)
    assert config.encoder.norm == ["trms2d"] * 4 and config.encoder.act == ["silu"] * 4  # official defaults
    assert config.decoder.norm == d["decoder"]["norm"] and config.downsample == 8 and config.codes_per_group == 64
    assert MGVQConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown MGVQConfig fields.*'codebook_sise'"):
        MGVQConfig.from_dict({**d, "codebook_sise": 1})
    with pytest.raises(ValueError, match="only the first stage may be empty"):
        MGVQConfig.from_dict({**d, "decoder": {**d["decoder"], "depth_list": [0, 1, 0, 1]}})
    with pytest.raises(ValueError, match="codebook_groups=3"):
        MGVQConfig.preset("mgvq-f16c32", groups=3, codebook_size=3 * 1024)



