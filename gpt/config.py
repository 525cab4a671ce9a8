"""GPT configuration: the dataclass schema, LlamaGen's size presets, and the official MGVQ `ModelArgs` mapping."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from tokenizer.base import group_sizes
from tokenizer.common.errors import ConfigError
from tokenizer.common.settings import known_fields, preset_fields

HEADS = ("parallel", "ar", "factorized")
INPUT_EMBEDDINGS = ("codebook", "learned")

_IBQ = {"class_adaln": True, "input_embedding": "learned"}
# LlamaGen's and IBQ-AR's class-conditional sizes (layers x width x heads), a tiny one for tests, and the
# quickstart's. The only copy: the hydra `model` group is registered from `GPTConfig.named_presets()`.
PRESETS = {
    "gpt_b": {"n_layer": 12, "dim": 768, "n_head": 12},
    "gpt_l": {"n_layer": 24, "dim": 1024, "n_head": 16},
    "gpt_xl": {"n_layer": 36, "dim": 1280, "n_head": 20},
    "gpt_xxl": {"n_layer": 48, "dim": 1536, "n_head": 24},
    "gpt_3b": {"n_layer": 24, "dim": 3200, "n_head": 32},
    "tiny": {"n_layer": 2, "dim": 64, "n_head": 4},
    # 16x16 digits (4x4 codes of 4 groups): MGVQ's AR head, no dropout (1,438 images, every class drawn faithfully)
    "digits": {"n_layer": 4, "dim": 128, "n_head": 4, "multiple_of": 64, "head": "ar", "token_dropout_p": 0.0,
               "resid_dropout_p": 0.0, "ffn_dropout_p": 0.0},
    # IBQ-AR (SEED-Voken configs/IBQ/gpu/imagenet_conditional_llama_*.yaml): adaLN class conditioning, learned input
    "ibq_ar_b": {"n_layer": 16, "dim": 1024, "n_head": 16, **_IBQ},
    "ibq_ar_l": {"n_layer": 20, "dim": 1280, "n_head": 20, **_IBQ},
    "ibq_ar_xl": {"n_layer": 24, "dim": 1536, "n_head": 24, **_IBQ},
    "ibq_ar_xxl": {"n_layer": 30, "dim": 1920, "n_head": 30, **_IBQ},
}
# The fields a code store and its tokenizer decide: None in a preset for training, filled from the store.
FROM_STORE = ("num_classes", "codebook_groups", "codes_per_group", "grid_size", "codebook_embed_dim")

# Defaults of the official `ModelArgs` (MGVQ gpt_emb_simple.py) for the fields an official config may omit.
OFFICIAL_DEFAULTS = {
    "dim": 4096, "n_layer": 32, "n_head": 32, "n_kv_head": None, "multiple_of": 256, "ffn_dim_multiplier": None,
    "rope_base": 10000.0, "norm_eps": 1e-5, "initializer_range": 0.02, "token_dropout_p": 0.1,
    "attn_dropout_p": 0.0, "resid_dropout_p": 0.1, "ffn_dropout_p": 0.1, "drop_path_rate": 0.0,
    "num_classes": 1000, "class_dropout_prob": 0.1, "vocab_size": 16384, "cls_token_num": 1, "block_size": 256,
    "codebook_groups": 4, "codebook_embed_dim": 32,
}
# Official fields with no meaning here: text conditioning and the official sampler's cache sizes.
OFFICIAL_IGNORED = {"caption_dim", "model_type", "max_batch_size", "max_seq_len"}

# Defaults of the official Open-MAGVIT2 `GPT(...)` arguments (SEED-Voken modules/transformer/gpt.py), and those
# with no meaning here (the official sampler's cache sizes, a text-conditioning width, an unused vocab_size).
OPEN_MAGVIT2_DEFAULTS = {
    "block_size": 256, "spatial_n_layer": 12, "n_head": 8, "dim": 256, "factorized_n_layer": 2, "resid_dropout_p": 0.0,
    "attn_dropout_p": 0.0, "ffn_dropout_p": 0.1, "drop_path_rate": 0.0, "token_factorization": True,
    "class_num": 1000, "token_drop": 0.1, "cls_token_num": 1, "rope_base": 10000, "norm_eps": 1e-5,
    "ffn_dim_multiplier": None, "initalizer_range": 0.02, "multiple_of": 256, "n_kv_head": None, "factorized_k": 2,
    "factorized_bits": [9, 9],
}
OPEN_MAGVIT2_IGNORED = {"vocab_size", "cond_dim", "embd_pdrop", "n_unmasked", "max_batch_size", "max_seq_len"}

# Fields that shape training only; every other field must agree between a model file and the config it is loaded with.
TRAINING_ONLY = {"initializer_range", "class_dropout_prob", "token_dropout_p", "attn_dropout_p", "resid_dropout_p",
                 "ffn_dropout_p", "drop_path_rate"}
# The training recipe of each head's family: whether stochastic depth replaces the residual and FFN dropout
# (LlamaGen's train_c2i.py zeroes both whenever drop_path_rate > 0; Open-MAGVIT2 keeps both, in its trunk as in
# its factorized blocks).
DROP_PATH_REPLACES_DROPOUT = {"parallel": True, "ar": True, "factorized": False}
# Saved configs of earlier versions: renamed fields, and removed ones with the one value they could hold.
RENAMED = {"codebook_size": "codes_per_group"}
REMOVED = {"cls_token_num": 1}


@dataclass
class GPTConfig:
    """A LlamaGen-style class-conditional GPT over G groups of codes.

    `codebook_groups`, `codes_per_group`, `grid_size` (square code grid side), `num_classes` and
    `codebook_embed_dim` (tokenizer latent channels, G rows of latent/G concatenated) may be None in a config
    file, meaning "taken from the code store"; a model is built only once they are set.
    """

    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # grouped-query attention when < n_head
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    initializer_range: float = 0.02
    num_classes: int | None = 1000
    class_dropout_prob: float = 0.1  # label -> null class (index num_classes) for classifier-free guidance
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0  # > 0 turns resid and ffn dropout off in LlamaGen's recipe (see block_dropout)
    codebook_groups: int | None = 4
    # Codes per group: one int for every group, or a list of one per group ([64, 4096]); typed Any because
    # OmegaConf's structured configs refuse a union of int and list.
    codes_per_group: Any = 8192
    grid_size: int | None = 16
    codebook_embed_dim: int | None = 32
    # parallel: G linear heads | ar: MGVQ's small transformer over the G sub-tokens | factorized: Open-MAGVIT2's
    head: str = "parallel"
    input_embedding: str = "codebook"  # codebook: frozen tokenizer rows + img_projector | learned: nn.Embedding
    ar_head_layers: int = 2  # layers of the ar or factorized head
    # IBQ-AR's VAR-style class conditioning: every block and the final norm also get a per-sample scale, shift
    # (and, in blocks, residual gates) from SiLU -> Linear of the class embedding. Off: LlamaGen's trunk.
    class_adaln: bool = False

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        return cls(**{**preset_fields(PRESETS, name, "GPT"), **overrides})

    @classmethod
    def named_presets(cls) -> dict[str, GPTConfig]:
        """Every preset with the store-derived fields unset (None), as the hydra `model` group offers them."""
        return {name: cls.preset(name, **dict.fromkeys(FROM_STORE)) for name in PRESETS}

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """From this project's saved config dict, of this version or an earlier one (RENAMED, REMOVED)."""
        d = {RENAMED.get(k, k): v for k, v in _drop_removed(d, "saved GPT config").items()}
        return cls(**known_fields(cls, d))

    @classmethod
    def from_official_mgvq(cls, d: dict) -> GPTConfig:
        """Map official MGVQ `ModelArgs` fields (vocab_size counted over all groups, block_size = grid**2)."""
        unknown = sorted(set(d) - set(OFFICIAL_DEFAULTS) - OFFICIAL_IGNORED)
        if unknown:
            raise ValueError(f"unknown official ModelArgs fields {unknown}")
        if d.get("model_type", "c2i") != "c2i":
            raise ValueError(f"model_type={d['model_type']!r}: only class-conditional (c2i) models are supported")
        args = _drop_removed({**OFFICIAL_DEFAULTS, **{k: v for k, v in d.items() if k not in OFFICIAL_IGNORED}},
                             "official ModelArgs")
        groups, vocab, block = args.pop("codebook_groups"), args.pop("vocab_size"), args.pop("block_size")
        grid = math.isqrt(block)
        if vocab % groups or grid * grid != block:
            raise ValueError(f"vocab_size={vocab} must divide into codebook_groups={groups} and block_size={block} "
                             f"must be a square")
        return cls(**args, codebook_groups=groups, codes_per_group=vocab // groups, grid_size=grid,
                   head="ar", input_embedding="codebook")

    @classmethod
    def single_codebook(cls, preset: str, codes_per_group: int, grid_size: int = 16, **overrides) -> GPTConfig:
        """A released LlamaGen c2i (gpt_b ... gpt_3b) or IBQ-AR (ibq_ar_b ... ibq_ar_xxl) GPT over one codebook:
        G = 1, a parallel (linear) head and a learned input embedding, 1000 classes."""
        return cls.preset(preset, **{"codebook_groups": 1, "codes_per_group": codes_per_group, "grid_size": grid_size,
                                   "num_classes": 1000, "head": "parallel", "input_embedding": "learned",
                                   "codebook_embed_dim": None, **overrides})

    @classmethod
    def from_open_magvit2(cls, d: dict) -> GPTConfig:
        """Map the official Open-MAGVIT2 `GPT` arguments (`transformer_config.params` of its AR yaml)."""
        unknown = sorted(set(d) - set(OPEN_MAGVIT2_DEFAULTS) - OPEN_MAGVIT2_IGNORED)
        if unknown:
            raise ValueError(f"unknown Open-MAGVIT2 GPT arguments {unknown}")
        a = _drop_removed({**OPEN_MAGVIT2_DEFAULTS, **{k: v for k, v in d.items() if k not in OPEN_MAGVIT2_IGNORED}},
                          "Open-MAGVIT2 GPT arguments")
        bits, grid = list(a["factorized_bits"]), math.isqrt(a["block_size"])
        if not a["token_factorization"] or a["factorized_k"] != len(bits) or grid * grid != a["block_size"]:
            raise ValueError(f"token_factorization={a['token_factorization']}, factorized_k={a['factorized_k']}, "
                             f"factorized_bits={bits}, block_size={a['block_size']}: expected a factorized model "
                             f"with one bit width per sub-token and a square code grid")
        return cls(dim=a["dim"], n_layer=a["spatial_n_layer"], n_head=a["n_head"], n_kv_head=a["n_kv_head"],
                   multiple_of=a["multiple_of"], ffn_dim_multiplier=a["ffn_dim_multiplier"], norm_eps=a["norm_eps"],
                   rope_base=float(a["rope_base"]), initializer_range=a["initalizer_range"],
                   num_classes=a["class_num"], class_dropout_prob=0.1,
                   token_dropout_p=a["token_drop"], attn_dropout_p=a["attn_dropout_p"],
                   resid_dropout_p=a["resid_dropout_p"], ffn_dropout_p=a["ffn_dropout_p"],
                   drop_path_rate=a["drop_path_rate"], codebook_groups=len(bits), codes_per_group=[2**b for b in bits],
                   grid_size=grid, codebook_embed_dim=None, head="factorized", input_embedding="learned",
                   ar_head_layers=a["factorized_n_layer"])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def group_sizes(self) -> list[int]:
        """Codes per group, one entry per group."""
        return group_sizes(self)

    @property
    def block_dropout(self) -> tuple[float, float]:
        """(resid, ffn) dropout the blocks (trunk and head) apply: with drop_path_rate > 0 and the recipe of
        LlamaGen's families (DROP_PATH_REPLACES_DROPOUT), none: stochastic depth replaces them. Token, attention and
        class dropout are unaffected. The config keeps the values it was given; this is the one place the rule is
        applied."""
        if self.drop_path_rate > 0 and DROP_PATH_REPLACES_DROPOUT[self.head]:
            return 0.0, 0.0
        return self.resid_dropout_p, self.ffn_dropout_p

    @property
    def seq_len(self) -> int:
        return self.grid_size**2

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU hidden size: int(2 * 4 * dim / 3), times ffn_dim_multiplier, rounded up to multiple_of."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return -(-hidden // self.multiple_of) * self.multiple_of

    def validate(self) -> None:
        """Raise a ValueError naming the field at fault; called when a model is built."""
        unset = [f for f in ("num_classes", "codebook_groups", "codes_per_group", "grid_size") if getattr(self, f) is None]
        if self.input_embedding == "codebook" and self.codebook_embed_dim is None:
            unset.append("codebook_embed_dim")
        if unset:
            raise ConfigError(f"GPTConfig fields {unset} are unset (None): set them or take them from the code store")
        problems = []
        if self.head not in HEADS:
            problems.append(f"head={self.head!r} is not one of {HEADS}")
        if self.input_embedding not in INPUT_EMBEDDINGS:
            problems.append(f"input_embedding={self.input_embedding!r} is not one of {INPUT_EMBEDDINGS}")
        if self.dim % self.n_head or self.head_dim % 4:
            problems.append(f"dim={self.dim} must split into n_head={self.n_head} heads of a size divisible by 4 "
                            f"(2D RoPE rotates pairs, half by row and half by column)")
        if self.n_head % self.kv_heads:
            problems.append(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.input_embedding == "codebook" and self.codebook_embed_dim % self.codebook_groups:
            problems.append(f"codebook_embed_dim={self.codebook_embed_dim} must split into "
                            f"codebook_groups={self.codebook_groups} equal rows")
        sizes = self.group_sizes
        if len(sizes) != self.codebook_groups or min(sizes) < 1:
            problems.append(f"codes_per_group={self.codes_per_group} must be positive, one int or one per group "
                            f"(codebook_groups={self.codebook_groups})")
        elif len(set(sizes)) > 1 and self.input_embedding != "learned":
            problems.append(f"codes_per_group={self.codes_per_group}: groups of different sizes need "
                            f"input_embedding=learned (codebook input stacks G equal tables)")
        if self.head == "factorized" and self.input_embedding != "learned":
            problems.append("head=factorized embeds sub-tokens with the trunk's table: it needs input_embedding=learned")
        if self.head == "ar" and self.dim % self.codebook_groups:
            problems.append(f"head=ar runs codebook_groups={self.codebook_groups} attention heads over dim={self.dim}")
        if self.dim % 2:
            problems.append(f"dim={self.dim} must be even (img_projector's hidden width is dim/2)")
        if problems:
            raise ConfigError("invalid GPTConfig: " + "; ".join(problems))


def _drop_removed(d: dict, what: str) -> dict:
    """`d` without the REMOVED fields, each of which may only hold its one value."""
    for name, value in REMOVED.items():
        if name in d and d[name] != value:
            raise ConfigError(f"{what}: {name}={d[name]!r}, but only {value!r} is supported "
                              f"(a class-conditional model has one class token)")
    return {k: v for k, v in d.items() if k not in REMOVED}
