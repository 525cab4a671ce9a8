"""The GPT's sub-token heads: from the trunk's hidden state at a position to the logits of its G sub-tokens.

Every head implements `Head` (weights init, KV cache setup, teacher-forced forward, one sub-token's logits in a
cached step); the GPT picks one by name from `HEADS`.

- ParallelHead: G independent linear maps (LlamaGen-style, MGVQ's `parallel`).
- ARHead: MGVQ's small causal transformer over the position's sub-tokens.
- FactorizedHead: Open-MAGVIT2's factorized sub-token head: per position, a small causal transformer over
  [h_t, emb(sub_0), ..., emb(sub_{G-2})] whose output at index g predicts sub-token g. As in the official `gpt.py`:
  the blocks are LlamaGen blocks of the trunk's width, heads and feed-forward; their RoPE rows are the first G
  rows of the trunk's table (row 0 zeros, as for the class token); one RMSNorm is shared by all indices (the trunk
  has none of its own); group g has its own output layer of 2**bits_g codes; the sub-token embeddings are the
  trunk's input embedding rows of their group (the caller embeds them).
"""
from __future__ import annotations

import itertools
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.config import GPTConfig
from gpt.layers import Attention, Block, FeedForward, KVCache, RMSNorm, rope_2d

# (sub-token codes (..., n), index of the first one's group) -> the trunk's input embeddings (..., n, dim)
EmbedSubs = Callable[[torch.Tensor, int], torch.Tensor]


def pad_groups(logits: list[torch.Tensor]) -> torch.Tensor:
    """G tensors (..., V_g) -> (..., G, max V_g), a smaller group's missing codes -inf (softmax 0, never drawn)."""
    V = max(x.shape[-1] for x in logits)
    return torch.stack([F.pad(x, (0, V - x.shape[-1]), value=float("-inf")) for x in logits], dim=-2)


class Head(nn.Module):
    """The surface every head implements. `trunk_norm`: whether the trunk applies its final RMSNorm before it;
    `cache_len`: the positions of the head's own KV caches per image position (0: it has no attention)."""

    trunk_norm = True
    cache_len = 0

    def init_weights(self) -> None:
        """The head's part of the GPT's init, after every Linear and Embedding got N(0, initializer_range)."""
        raise NotImplementedError

    def init_buffers(self) -> None:
        """(Re)build non-persistent buffers, e.g. in a model built on meta."""

    def setup_cache(self, batch: int, dtype: torch.dtype, cache: type[KVCache] = KVCache) -> None:
        """Attach a KV cache of `cache_len` positions to each of the head's attention layers."""
        for attn in (m for m in self.modules() if isinstance(m, Attention)):
            attn.kv_cache = cache(batch, attn.n_kv_head, self.cache_len, attn.head_dim, dtype,
                                  attn.wqkv.weight.device)

    def forward(self, h: torch.Tensor, codes: torch.Tensor, embed: EmbedSubs) -> torch.Tensor:
        """Teacher forcing: trunk hidden states h (B, L, dim) and the codes (B, L, G) -> logits (B, L, G, V)."""
        raise NotImplementedError

    def sub_logits(self, h: torch.Tensor, g: int, prev_sub: torch.Tensor | None, embed: EmbedSubs) -> torch.Tensor:
        """Cached step: logits (B, V_g) of sub-token g given the trunk's h (B, dim) and, for g > 0, the sampled
        sub-token g-1 (B,); earlier sub-tokens of this position are in the head's caches."""
        raise NotImplementedError


class ParallelHead(Head):
    """G independent linear heads (one matmul) on the trunk's hidden state; group g has sizes[g] codes."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.sizes = c.group_sizes
        self.bounds = list(itertools.accumulate(self.sizes, initial=0))  # group g: rows bounds[g]:bounds[g+1]
        self.proj = nn.Linear(c.dim, sum(self.sizes), bias=False)

    def init_weights(self) -> None:
        nn.init.zeros_(self.proj.weight)  # uniform logits at the start

    def forward(self, h: torch.Tensor, codes: torch.Tensor, embed: EmbedSubs) -> torch.Tensor:
        out = self.proj(h)
        if len(set(self.sizes)) == 1:
            return out.unflatten(-1, (len(self.sizes), self.sizes[0]))  # (B, L, G, V)
        return pad_groups(list(out.split(self.sizes, dim=-1)))

    def rows(self, g: int) -> torch.Tensor:
        return self.proj.weight[self.bounds[g]:self.bounds[g + 1]]

    def sub_logits(self, h: torch.Tensor, g: int, prev_sub: torch.Tensor | None, embed: EmbedSubs) -> torch.Tensor:
        return F.linear(h, self.rows(g)).float()  # (B, V_g)


class ARHead(Head):
    """MGVQ's AR head: a small causal transformer over [h_t, sos, emb(sub_0), ..., emb(sub_{G-2})].

    Its output at index g+1 predicts sub-token g of position t. It has G attention heads with per-head q/k
    RMSNorm, SwiGLU of hidden 4*dim, no RoPE but a learned position table of G+1 rows. Groups of different
    sizes share the input table and the output layer, as wide as the largest group; a group's logits stop at
    its own size (-inf beyond in the teacher-forced output).
    """

    def __init__(self, c: GPTConfig):
        super().__init__()
        dim, self.sizes = c.dim, c.group_sizes
        self.groups, self.codes = len(self.sizes), max(self.sizes)
        self.cache_len = self.groups + 1
        self.tok_emb = nn.Embedding(self.codes, dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, self.groups + 1, dim))
        self.sos = nn.Parameter(torch.zeros(1, 1, dim))
        self.layers = nn.ModuleList(
            Block(dim, Attention(dim, self.groups, self.groups, qk_norm_eps=c.norm_eps), FeedForward(dim, 4 * dim),
                  c.norm_eps)
            for _ in range(c.ar_head_layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, self.codes, bias=False)

    def init_weights(self) -> None:
        nn.init.zeros_(self.pos_emb)
        nn.init.normal_(self.sos, std=0.02)

    def forward(self, h: torch.Tensor, codes: torch.Tensor, embed: EmbedSubs) -> torch.Tensor:
        B, L, D = h.shape
        subs = self.tok_emb(codes[..., :-1]).reshape(B * L, self.groups - 1, D)
        x = torch.cat([h.reshape(B * L, 1, D), self.sos.expand(B * L, 1, D).to(h.dtype), subs], dim=1)
        x = x + self.pos_emb  # (B*L, G+1, D)
        for layer in self.layers:
            x = layer(x)
        logits = self.head(self.ln_f(x[:, 1:]))  # (B*L, G, V): index 0 (h_t itself) predicts nothing
        if len(set(self.sizes)) > 1:
            beyond = torch.arange(self.codes, device=h.device) >= torch.tensor(self.sizes, device=h.device)[:, None]
            logits = logits.masked_fill(beyond, float("-inf"))  # (G, V) mask: codes past each group's size
        return logits.view(B, L, self.groups, self.codes)

    def sub_logits(self, h: torch.Tensor, g: int, prev_sub: torch.Tensor | None, embed: EmbedSubs) -> torch.Tensor:
        if g == 0:  # start this position's sequence: [h, sos] at indices 0, 1
            x = torch.stack([h, self.sos[0, 0].expand_as(h)], dim=1) + self.pos_emb[:, :2]  # (B, 2, D)
        else:  # the caller's sampled sub-token g-1 enters at index g+1; indices < g+1 are cached
            x = (self.tok_emb(prev_sub) + self.pos_emb[0, g + 1])[:, None]  # (B, 1, D)
        for layer in self.layers:
            x = layer(x, None, 0 if g == 0 else g + 1)
        return self.head(self.ln_f(x[:, -1]))[:, :self.sizes[g]].float()  # (B, V_g)


class FactorizedHead(Head):
    trunk_norm = False  # the head normalises its own outputs; the trunk then has no final norm (as Open-MAGVIT2)

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.sizes = c.group_sizes
        self.cache_len = len(self.sizes)
        drop_paths = torch.linspace(0, c.drop_path_rate, c.ar_head_layers, device="cpu").tolist()
        resid_p, ffn_p = c.block_dropout
        self.layers = nn.ModuleList(
            Block(c.dim, Attention(c.dim, c.n_head, c.kv_heads, c.attn_dropout_p, resid_p),
                  FeedForward(c.dim, c.ffn_hidden, ffn_p), c.norm_eps, p)
            for p in drop_paths)
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.heads = nn.ModuleList(nn.Linear(c.dim, n, bias=False) for n in self.sizes)
        self.rope_args = (c.grid_size, c.head_dim, c.rope_base)
        self.init_buffers()

    def init_weights(self) -> None:
        for head in self.heads:
            nn.init.zeros_(head.weight)

    def init_buffers(self) -> None:
        device = self.norm.weight.device
        freqs = rope_2d(*self.rope_args)[:len(self.sizes)]  # (G, head_dim/2, 2)
        self.register_buffer("freqs_cis", freqs.to(device), persistent=False)

    def logits(self, x: torch.Tensor, g: int) -> torch.Tensor:
        return self.heads[g](self.norm(x))

    def forward(self, h: torch.Tensor, codes: torch.Tensor, embed: EmbedSubs) -> torch.Tensor:
        """Trunk hidden states h (B, L, D) and the codes (B, L, G), whose sub-tokens 0..G-2 enter embedded by the
        trunk's table -> logits (B, L, G, V) with V the largest group's size; a smaller group's missing codes -inf."""
        B, L, D = h.shape
        subs = embed(codes[..., :-1], 0)  # (B, L, G-1, D)
        x = torch.cat([h[:, :, None], subs], dim=2).reshape(B * L, len(self.sizes), D)  # (B*L, G, D)
        for layer in self.layers:
            x = layer(x, self.freqs_cis)
        x = x.view(B, L, len(self.sizes), D)
        return pad_groups([self.logits(x[:, :, g], g) for g in range(len(self.sizes))])

    def sub_logits(self, h: torch.Tensor, g: int, prev_sub: torch.Tensor | None, embed: EmbedSubs) -> torch.Tensor:
        """Index 0 is the trunk's h (B, D); index g > 0 the embedded sub-token g-1; earlier indices are cached."""
        x = (h[:, None] if g == 0 else embed(prev_sub[:, None], g - 1))  # (B, 1, D)
        for layer in self.layers:
            x = layer(x, self.freqs_cis[g:g + 1], g)
        return self.logits(x[:, -1], g).float()


HEADS: dict[str, type[Head]] = {"parallel": ParallelHead, "ar": ARHead, "factorized": FactorizedHead}
