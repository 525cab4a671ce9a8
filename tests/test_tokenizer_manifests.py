"""Every official full-size tokenizer builds with exactly the official keys, shapes, dtypes and parameter count
(built on the meta device: no memory, no time)."""
import pytest
import torch

from tokenizer import MGVQ, MGVQConfig

PRESETS = [f"mgvq-{f}c32-g{g}" for f in ("f8", "f16", "f32") for g in (4, 8)]


def read_manifest(path) -> tuple[int, dict[str, tuple[tuple[int, ...], str]]]:
    """First line `# params<TAB>N`, then `key<TAB>AxBxC<TAB>dtype` (an empty shape is a scalar)."""
    lines = path.read_text().splitlines()
    tag, count = lines[0].split("\t")
    assert tag == "# params"
    keys = {}
    for line in lines[1:]:
        key, shape, dtype = line.split("\t")
        keys[key] = (tuple(int(s) for s in shape.split("x")) if shape else (), dtype)
    return int(count), keys


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_matches_official_manifest(golden, preset):
    count, want = read_manifest(golden / "manifests" / f"{preset}.keys.tsv")
    name, groups = preset.rsplit("-g", 1)
    config = MGVQConfig.preset(name, int(groups))
    with torch.device("meta"):
        model = MGVQ(config)
    got = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    assert sorted(set(want) - set(got)) == []
    assert sorted(set(got) - set(want)) == []
    assert {k: v for k, v in got.items() if v != want[k]} == {}
    assert sum(p.numel() for p in model.parameters()) == count
    assert config.downsample == int(name.split("-f")[1].split("c")[0])
