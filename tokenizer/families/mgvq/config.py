"""MGVQ's configuration: the architecture dataclass and its presets.

Field names follow the official MGVQ `MGVQConfig` (encoder/decoder `width_list`, `depth_list`, `block_type`,
`norm`, `act`), so the `config` dict of an official-style run maps onto it directly. The presets here are the
only copy: the hydra `tokenizer` group is registered from `named_presets()` (scripts/_hydra.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tokenizer.common.errors import ConfigError
from tokenizer.common.settings import known_fields, preset_fields

BLOCK_TYPES = ("ResBlock", "EViT_GLU")
NORMS = ("bn2d", "trms2d")
ACTS = ("relu", "silu")

# Codebook sizes of the released checkpoints (total over groups): G4 has 8192 codes per group, G8 has 2048.
RELEASED_CODEBOOK_SIZE = {4: 32768, 8: 16384}


@dataclass
class BackboneConfig:
    """One DC-AE encoder or decoder: per-stage widths, depths, block types, norms and activations.

    Stage 0 is the full-resolution stage; each later stage halves the resolution. Only stage 0 may be empty
    (depth 0), in which case the project-in (encoder) / project-out (decoder) layer does that factor 2 itself.
    `block_type`, `norm` and `act` may be given as one string for all stages; they are stored per stage.
    """

    width_list: list[int]
    depth_list: list[int]
    block_type: list[str]
    norm: list[str] = field(default_factory=lambda: ["trms2d"])
    act: list[str] = field(default_factory=lambda: ["silu"])

    def __post_init__(self):
        n = len(self.width_list)
        if n < 2 or len(self.depth_list) != n:
            raise ConfigError(f"width_list {self.width_list} and depth_list {self.depth_list} must have the same "
                             f"length >= 2 (one entry per stage)")
        if any(d <= 0 for d in self.depth_list[1:]):
            raise ConfigError(f"depth_list {self.depth_list}: only the first stage may be empty")
        for name, allowed in (("block_type", BLOCK_TYPES), ("norm", NORMS), ("act", ACTS)):
            value = getattr(self, name)
            value = [value] * n if isinstance(value, str) else list(value)
            if len(value) == 1:
                value = value * n
            if len(value) != n or any(v not in allowed for v in value):
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected {n} entries (one per stage) from {allowed}")
            setattr(self, name, value)
        self.width_list, self.depth_list = list(self.width_list), list(self.depth_list)

    @property
    def num_stages(self) -> int:
        return len(self.width_list)


def _stages(widths, enc_depths, dec_depths) -> dict:
    n = len(widths)
    block_type = ["ResBlock"] * 3 + ["EViT_GLU"] * (n - 3)
    return {
        "encoder": {"width_list": widths, "depth_list": enc_depths, "block_type": block_type,
                    "norm": "trms2d", "act": "silu"},
        "decoder": {"width_list": widths, "depth_list": dec_depths, "block_type": block_type,
                    "norm": ["bn2d"] * 3 + ["trms2d"] * (n - 3), "act": ["relu"] * 3 + ["silu"] * (n - 3)},
    }


PRESETS = {
    "mgvq-f8c32": _stages([128, 256, 512, 512], [0, 4, 8, 2], [0, 5, 10, 2]),
    "mgvq-f16c32": _stages([128, 256, 512, 512, 1024], [0, 4, 8, 2, 2], [0, 5, 10, 2, 2]),
    "mgvq-f32c32": _stages([128, 256, 512, 512, 1024, 1024], [0, 4, 8, 2, 2, 2], [0, 5, 10, 2, 2, 2]),
    # The quickstart's: 16x16 digits -> 4x4 codes; three ResBlock stages, 4 groups x 32 codes.
    "digits": {
        "encoder": {"width_list": [32, 64, 128], "depth_list": [0, 2, 2], "block_type": "ResBlock"},
        "decoder": {"width_list": [32, 64, 128], "depth_list": [0, 2, 2], "block_type": "ResBlock", "norm": "bn2d",
                    "act": "relu"},
    },
}


@dataclass
class MGVQConfig:
    """Architecture of an MGVQ tokenizer. `codebook_size` counts codes over all groups."""

    latent_channels: int
    codebook_size: int
    codebook_groups: int
    encoder: BackboneConfig
    decoder: BackboneConfig

    def __post_init__(self):
        if isinstance(self.encoder, dict):
            self.encoder = BackboneConfig(**self.encoder)
        if isinstance(self.decoder, dict):
            self.decoder = BackboneConfig(**self.decoder)
        G = self.codebook_groups
        if G < 1 or self.latent_channels % G or self.codebook_size % G:
            raise ConfigError(f"codebook_groups={G} must divide latent_channels={self.latent_channels} and "
                             f"codebook_size={self.codebook_size}")
        if self.encoder.num_stages != self.decoder.num_stages:
            raise ConfigError(f"encoder has {self.encoder.num_stages} stages, decoder {self.decoder.num_stages}: "
                             f"they must match so that decoding undoes the encoder's downsampling")

    @property
    def downsample(self) -> int:
        """Spatial compression factor: image side / code grid side."""
        return 2 ** (self.encoder.num_stages - 1)

    @property
    def codes_per_group(self) -> int:
        return self.codebook_size // self.codebook_groups

    @classmethod
    def preset(cls, name: str, groups: int = 4, codebook_size: int | None = None, **fields):
        """An official architecture, e.g. `MGVQConfig.preset("mgvq-f16c32", 4)`.

        `codebook_size` defaults to the released checkpoint's (32768 for G4, 16384 for G8).
        """
        arch = preset_fields(PRESETS, name, "tokenizer")
        if codebook_size is None:
            if groups not in RELEASED_CODEBOOK_SIZE:
                raise ConfigError(f"no released MGVQ tokenizer has {groups} groups: pass codebook_size explicitly")
            codebook_size = RELEASED_CODEBOOK_SIZE[groups]
        return cls.from_dict({"latent_channels": 32, "codebook_size": codebook_size, "codebook_groups": groups,
                              **arch, **fields})

    @classmethod
    def named_presets(cls) -> dict[str, MGVQConfig]:
        """Every preset under its hydra name: the released `mgvq-f{8,16,32}c32-g{4,8}` and the quickstart's `digits`."""
        named = {f"{name}-g{g}": cls.preset(name, g) for name in PRESETS if name != "digits" for g in (4, 8)}
        named["digits"] = cls.preset("digits", 4, codebook_size=128)
        return named

    @classmethod
    def from_dict(cls, d: dict):
        """Build from a plain dict of the fields (nested dicts for encoder/decoder); unknown keys are an error.

        As in the official config, a missing `norm`/`act` means trms2d/silu in every stage, and a single
        string applies to all stages.
        """
        d = dict(known_fields(cls, d))
        for part in ("encoder", "decoder"):
            if isinstance(d.get(part), dict):
                d[part] = BackboneConfig(**known_fields(BackboneConfig, d[part], part))
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
