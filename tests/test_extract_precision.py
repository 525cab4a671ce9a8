"""bf16 extraction on the CPU: the store records its precision, a rerun at another precision is refused, and the
codes mostly agree with float32 extraction (they may differ only where two codes are nearly equally close)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState

from tokenizer import MGVQConfig, TokenizerRef
from tokenizer.extract import ExtractConfig, ExtractDataConfig, extract
from tokenizer.store import CodeStore, StoreMismatchError

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

# The tiny golden tokenizer on the e2e images (6 images x 2 views x 8x8 x G4 = 3072 codes): 99.0% of its bf16 codes
# equal the float32 ones here; a bf16 encoder that lost the layout or the code search in bf16 agrees far less.
MIN_AGREEMENT = 0.95


def config(golden, out_dir, precision: str) -> ExtractConfig:
    tiny = torch.load(golden / "tokenizer_tiny_expected.pt", weights_only=True)["config"]
    tokenizer = TokenizerRef(config=MGVQConfig.from_dict(tiny), checkpoint=str(golden / "tokenizer_tiny.pt"))
    data = ExtractDataConfig(root=str(golden / "e2e" / "images"), image_size=64, views="flip")
    return ExtractConfig(data=data, tokenizer=tokenizer, out_dir=str(out_dir), batch_size=4, num_workers=0,
                         precision=precision)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, golden) -> dict:
    out = {}
    for precision in ("fp32", "bf16"):
        AcceleratorState._reset_state(True)
        out[precision] = tmp_path_factory.mktemp(precision) / "codes"
        extract(config(golden, out[precision], precision))
    return out


def test_bf16_store_records_precision_and_agrees_with_fp32(stores, golden):
    fp32, bf16 = CodeStore(stores["fp32"]), CodeStore(stores["bf16"])
    assert fp32.meta["precision"] == "fp32" and bf16.meta["precision"] == "bf16"
    expected = torch.load(golden / "e2e" / "extract_expected.pt", weights_only=True)
    margins = expected["margins"].numpy()
    sure = margins > 1e-4  # float32 stays the golden path (test_extract.assert_golden_codes)
    assert np.array_equal(np.asarray(fp32.codes)[sure], expected["codes"].numpy()[sure])
    same = np.asarray(fp32.codes) == np.asarray(bf16.codes)
    assert MIN_AGREEMENT <= same.mean() < 1.0  # < 1: the encoder really ran in bf16
    # Where they differ, float32 found two codes nearly equally close.
    assert np.median(margins[~same]) < np.median(margins[same]) / 4


@pytest.mark.parametrize("on_disk, now", [("bf16", "fp32"), ("fp32", "bf16")])
def test_a_rerun_at_another_precision_is_refused(stores, golden, on_disk, now):
    before = (stores[on_disk] / "codes.npy").read_bytes()
    with pytest.raises(StoreMismatchError, match=f"precision: '{on_disk}' on disk, '{now}' now"):
        extract(config(golden, stores[on_disk], now))
    assert (stores[on_disk] / "codes.npy").read_bytes() == before


def test_fp16_on_cpu_is_refused(tmp_path, golden):
    with pytest.raises(ValueError, match="precision='fp16'"):
        extract(config(golden, tmp_path / "codes", "fp16"))
    assert not (tmp_path / "codes").exists()
