"""The GPT's building blocks (gpt-fast's parts, LlamaGen's details): RMSNorm, 2D RoPE, the KV cache, attention,
SwiGLU feed-forward, the pre-norm block (optionally adaLN-modulated) and the class embedding."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and scale in the input dtype, as LlamaGen does.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability p, scale the kept ones by 1/(1-p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


def rope_2d(grid_size: int, head_dim: int, base: float) -> torch.Tensor:
    """(L, head_dim/2, 2) cos/sin table of the sequence [class, code_0 .. code_{L-2}] (LlamaGen's 2D RoPE).

    Pairs are adjacent elements; the first half of the head_dim/2 pairs rotates with the row, the second half
    with the column. The class row is cos = sin = 0, which zeroes the class token's query and key: the released
    weights were trained that way.
    """
    n = head_dim // 4  # frequencies per axis
    freqs = 1.0 / (base ** (torch.arange(0, 2 * n, 2)[:n].float() / (2 * n)))
    angles = torch.outer(torch.arange(grid_size, dtype=torch.float32), freqs)  # (grid, n)
    grid = torch.cat([angles[:, None, :].expand(-1, grid_size, -1),  # row angle
                      angles[None, :, :].expand(grid_size, -1, -1)], dim=-1)  # column angle: (grid, grid, 2n)
    table = torch.stack([grid.cos(), grid.sin()], dim=-1).flatten(0, 1)  # (grid*grid, head_dim/2, 2), raster order
    return torch.cat([torch.zeros(1, 2 * n, 2), table[:-1]])  # the last code is never an input


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, D), freqs (S, D/2, 2): rotate adjacent pairs (x0, x1) in float32."""
    xs = x.float().unflatten(-1, (-1, 2))  # (B, S, H, D/2, 2)
    cos, sin = freqs[:, None, :, 0], freqs[:, None, :, 1]  # (S, 1, D/2)
    x0, x1 = xs[..., 0], xs[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Preallocated (B, H, S_max, D) keys and values, written in place; not in the state dict.

    Two ways to address it (the `pos` of `update`):
    - an int, the position of the first of the new rows: the read is the prefix written so far, so attention
      reads only the keys it needs (eager, and any caller whose position is a Python number);
    - a position tensor (S,): the read is the whole buffer with a mask, so a cached step has the same shapes at
      every position: what lets torch.compile capture one graph (one CUDA graph on GPU) for all of them.
    """

    def __init__(self, batch: int, heads: int, seq: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        # One spare slot, never written: a prefix read never spans the whole buffer, so it is never contiguous, and
        # a step compiled with a symbolic position does not specialise (recompile) on the last one.
        seq += 1
        shape = (batch, heads, seq, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("positions", torch.arange(seq, device=device), persistent=False)

    def update(self, pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store k, v (b, H, S, D) at positions pos (an int start, or (S,) int64); return the keys and values to
        attend to, (b, H, n, D) each, and the mask (S, n), True where key position <= query position. The mask is
        None where the read is exactly causal: one query row at the end of the read, or S rows from position 0."""
        b, S = k.shape[0], k.shape[2]
        k_cache, v_cache = self.k_cache[:b], self.v_cache[:b]
        if isinstance(pos, int):
            end = pos + S
            k_cache[:, :, pos:end] = k
            v_cache[:, :, pos:end] = v
            mask = None if S == 1 or pos == 0 else self.positions[:end] <= self.positions[pos:end, None]
            return k_cache[:, :, :end], v_cache[:, :, :end], mask
        k_cache.index_copy_(2, pos, k.to(k_cache.dtype))  # unwritten positions stay zeros and are masked
        v_cache.index_copy_(2, pos, v.to(v_cache.dtype))
        return k_cache, v_cache, self.positions <= pos[:, None]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int | torch.Tensor) -> torch.Tensor:
        """Store k, v (b, H_kv, S, D) at pos (see update) and return the attention (b, H, S, D) of the queries
        q (b, H, S, D) over every cached position up to theirs."""
        return self.attention(q, *self.update(pos, k, v))

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q (b, H, S, D) over k, v (b, H_kv, n, D) as `update` returns them, with its mask."""
        # Without a mask the S rows start at key position 0, where causal = lower-triangular.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                              enable_gqa=k.shape[1] != q.shape[1])


class Attention(nn.Module):
    """Causal multi-head attention with fused qkv, optional grouped-query heads, RoPE and per-head q/k RMSNorm."""

    def __init__(self, dim: int, n_head: int, n_kv_head: int, attn_dropout_p: float = 0.0,
                 resid_dropout_p: float = 0.0, qk_norm_eps: float | None = None):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, dim // n_head
        self.wqkv = nn.Linear(dim, (n_head + 2 * n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.q_norm = self.k_norm = None
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(self.head_dim, qk_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, qk_norm_eps)
        self.attn_dropout_p = attn_dropout_p
        self.resid_dropout = nn.Dropout(resid_dropout_p)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, freqs: torch.Tensor | None = None,
                pos: int | torch.Tensor | None = None) -> torch.Tensor:
        """x (B, S, dim). With a KV cache, pos places x's S rows in the cached sequence (see KVCache.update)."""
        B, S, _ = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, kv, kv], dim=-1)
        q = q.view(B, S, self.n_head, self.head_dim)
        k = k.view(B, S, self.n_kv_head, self.head_dim)
        v = v.view(B, S, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if freqs is not None:
            q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D)
        if self.kv_cache is not None:
            y = self.kv_cache.attend(q, k, v, pos)
        else:  # training and teacher forcing: the S rows from position 0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=S > 1, enable_gqa=self.n_kv_head != self.n_head,
                                               dropout_p=self.attn_dropout_p if self.training else 0.0)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, S, -1)))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int, dropout_p: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def ada_lin(dim: int, n: int) -> nn.Sequential:
    """adaLN modulation: class embedding (B, 1, dim) -> n vectors of dim, SiLU then Linear (IBQ-AR's `ada_lin`)."""
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, n * dim))


class Block(nn.Module):
    """Pre-norm transformer block; with `adaln`, norms are modulated and residual branches gated by the class."""

    def __init__(self, dim: int, attention: Attention, feed_forward: FeedForward, norm_eps: float,
                 drop_path: float = 0.0, adaln: bool = False):
        super().__init__()
        self.attention = attention
        self.feed_forward = feed_forward
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.drop_path = DropPath(drop_path)
        self.ada_lin = ada_lin(dim, 6) if adaln else None

    def forward(self, x: torch.Tensor, freqs: torch.Tensor | None = None, pos: int | torch.Tensor | None = None,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        if self.ada_lin is None:
            h = x + self.drop_path(self.attention(self.attention_norm(x), freqs, pos))
            return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))
        # IBQ-AR's order: gates, scales, shifts, each (B, 1, dim)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond).unflatten(-1, (6, -1)).unbind(-2)
        h = x + self.drop_path(self.attention(self.attention_norm(x) * (1 + scale1) + shift1, freqs, pos) * gamma1)
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h) * (1 + scale2) + shift2) * gamma2)


class LabelEmbedding(nn.Module):
    """Class embedding with num_classes + 1 rows; in training a label becomes the null class with probability p."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = labels.masked_fill(drop, self.num_classes)
        return self.embedding_table(labels)[:, None]  # (B, 1, dim)
