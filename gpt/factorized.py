"""Open-MAGVIT2's factorized sub-token head: per position, a small causal transformer over
[h_t, emb(sub_0), ..., emb(sub_{G-2})] whose output at index g predicts sub-token g.

As in the official `gpt.py`: the blocks are LlamaGen blocks of the trunk's width, heads and feed-forward; their RoPE
rows are the first G rows of the trunk's table (row 0 zeros, as for the class token); one RMSNorm is shared by
all indices (the trunk has none of its own); group g has its own output layer of 2**bits_g codes; the sub-token
embeddings are the trunk's input embedding rows of their group (the caller embeds them).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from gpt.config import GPTConfig
from gpt.packed import Linear
from gpt.model import Attention, Block, FeedForward, KVCache, RMSNorm, pad_groups, rope_2d


class FactorizedHead(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.sizes = c.group_sizes
        drop_paths = torch.linspace(0, c.drop_path_rate, c.ar_head_layers, device="cpu").tolist()
        self.layers = nn.ModuleList(
            Block(c.dim, Attention(c.dim, c.n_head, c.kv_heads, c.attn_dropout_p, c.resid_dropout_p),
                  FeedForward(c.dim, c.ffn_hidden, c.ffn_dropout_p), c.norm_eps, p)
            for p in drop_paths)
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.heads = nn.ModuleList(Linear(c.dim, n, bias=False) for n in self.sizes)
        self.rope_args = (c.grid_size, c.head_dim, c.rope_base)
        self.init_buffers()

    def init_buffers(self) -> None:
        device = self.norm.weight.device
        freqs = rope_2d(*self.rope_args)[:len(self.sizes)]  # (G, head_dim/2, 2)
        self.register_buffer("freqs_cis", freqs.to(device), persistent=False)

    def logits(self, x: torch.Tensor, g: int) -> torch.Tensor:
        return self.heads[g](self.norm(x))

    def forward(self, h: torch.Tensor, subs: torch.Tensor) -> torch.Tensor:
        """Trunk hidden states h (B, L, D) and embedded sub-tokens 0..G-2 (B, L, G-1, D) -> logits (B, L, G, V)
        with V the largest group's size; a smaller group's missing codes are -inf."""
        B, L, D = h.shape
        x = torch.cat([h[:, :, None], subs], dim=2).reshape(B * L, len(self.sizes), D)  # (B*L, G, D)
        for layer in self.layers:
            x = layer(x, self.freqs_cis)
        x = x.view(B, L, len(self.sizes), D)
        return pad_groups([self.logits(x[:, :, g], g) for g in range(len(self.sizes))])

    def setup_cache(self, batch: int, dtype: torch.dtype) -> None:
        for layer in self.layers:
            attn = layer.attention
            attn.kv_cache = KVCache(batch, attn.n_kv_head, len(self.sizes), attn.head_dim, dtype,
                                    self.norm.weight.device)

    def sub_logits(self, h: torch.Tensor, g: int, prev_emb: torch.Tensor | None) -> torch.Tensor:
        """float32 logits (B, V_g) of sub-token g: index 0 is the trunk's h (B, D); index g > 0 the embedded
        sub-token g-1 (B, D); earlier indices are cached."""
        x = (h if g == 0 else prev_emb)[:, None]  # (B, 1, D)
        for layer in self.layers:
            x = layer(x, self.freqs_cis[g:g + 1], g)
        return self.logits(x[:, -1], g).float()
