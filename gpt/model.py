"""LlamaGen-style class-conditional GPT over MGVQ group codes, with a parallel or an autoregressive sub-token head.

The sequence is [class token, code_0, ..., code_{L-2}]; the hidden state at index t predicts the G sub-tokens of
image position t. Training runs `forward` (teacher forcing); generation runs the cached path: `setup_cache`,
`prefill`, then per position `decode_step` and G calls of `sub_logits`. Sampling policy lives in `sampling`.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.config import GPTConfig
from gpt.packed import Linear, WeightPack, linear, packed_linear, serves


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


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of one query row per head over every given key: q (B, H, 1, D), k and v (B, H_kv, n, D), H a
    multiple of H_kv -> (B, H, 1, D). Two batched matmuls and a softmax, which inductor fuses into one loop over
    the cached keys: in a step compiled for a CPU that beats SDPA's flash kernel (GPT-B, 8 rows, 129 keys: 12
    layers in 6.8 against 7.7 ms), while eager calls are fewer through SDPA. The query heads sharing a key head
    go in as rows of one matmul. The softmax's sum divides the output, not the weights (as flash attention
    does): written as softmax-then-matmul, inductor's pattern matcher would turn it back into the flash kernel."""
    B, H, _, D = q.shape
    q = q.reshape(B, k.shape[1], H // k.shape[1], D)
    scores = q @ k.transpose(-1, -2) * D ** -0.5  # (B, H_kv, H/H_kv, n)
    weights = (scores - scores.amax(dim=-1, keepdim=True)).exp()
    out = (weights.type_as(v) @ v) / weights.sum(dim=-1, keepdim=True).type_as(v)
    return out.reshape(B, H, 1, D)


class Attention(nn.Module):
    """Causal multi-head attention with fused qkv, optional grouped-query heads, RoPE and per-head q/k RMSNorm."""

    def __init__(self, dim: int, n_head: int, n_kv_head: int, attn_dropout_p: float = 0.0,
                 resid_dropout_p: float = 0.0, qk_norm_eps: float | None = None):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, dim // n_head
        self.wqkv = Linear(dim, (n_head + 2 * n_kv_head) * self.head_dim, bias=False)
        self.wo = Linear(dim, dim, bias=False)
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
        mask = None
        if self.kv_cache is not None:
            k, v, mask = self.kv_cache.update(pos, k, v)  # (B, H_kv, n, D) x 2, (S, n) or None
            if S == 1 and mask is None and x.device.type == "cpu" and torch.compiler.is_compiling():
                return self.wo(one_query_attention(q, k, v).transpose(1, 2).reshape(B, S, -1))
        # Without a mask the S rows start at key position 0 (always in training), where causal = lower-triangular.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and S > 1,
                                           dropout_p=self.attn_dropout_p if self.training else 0.0,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, S, -1)))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). While decoding on a CPU, w1 and w3 run as one GEMM through a pack of both."""

    def __init__(self, dim: int, hidden: int, dropout_p: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(dropout_p)
        self._pack, self.packed = WeightPack(), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if serves(self.packed, x):
            gate, up = packed_linear(x, self.packed, None).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.ffn_dropout(self.w2(F.silu(gate) * up))

    def attach_pack(self, on: bool, keep: bool = True) -> None:
        """The pack of w1 and w3 stacked (see gpt.packed.Linear.attach_pack)."""
        self.packed = self._pack.get(self.w1.weight, self.w3.weight) if on else None
        if not on and not keep:
            self._pack.clear()


def ada_lin(dim: int, n: int) -> nn.Sequential:
    """adaLN modulation: class embedding (B, 1, dim) -> n vectors of dim, SiLU then Linear (IBQ-AR's `ada_lin`)."""
    return nn.Sequential(nn.SiLU(), Linear(dim, n * dim))


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


def pad_groups(logits: list[torch.Tensor]) -> torch.Tensor:
    """G tensors (..., V_g) -> (..., G, max V_g), a smaller group's missing codes -inf (softmax 0, never drawn)."""
    V = max(x.shape[-1] for x in logits)
    return torch.stack([F.pad(x, (0, V - x.shape[-1]), value=float("-inf")) for x in logits], dim=-2)


class ParallelHead(nn.Module):
    """G independent linear heads (one matmul) on the trunk's hidden state; group g has sizes[g] codes."""

    def __init__(self, dim: int, sizes: list[int]):
        super().__init__()
        self.sizes = list(sizes)
        self.bounds = list(itertools.accumulate(self.sizes, initial=0))  # group g: rows bounds[g]:bounds[g+1]
        self.proj = nn.Linear(dim, sum(self.sizes), bias=False)
        self._packs, self.packed = [WeightPack() for _ in self.sizes], None  # per group, for CPU decoding

    def forward(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        out = self.proj(h)
        if len(set(self.sizes)) == 1:
            return out.unflatten(-1, (len(self.sizes), self.sizes[0]))  # (B, L, G, V)
        return pad_groups(list(out.split(self.sizes, dim=-1)))

    def setup_cache(self, batch: int, dtype: torch.dtype) -> None:
        pass

    def attach_pack(self, on: bool, keep: bool = True) -> None:
        """Packed copies of each group's rows of proj (see gpt.packed.Linear.attach_pack)."""
        self.packed = [pack.get(self._rows(g)) for g, pack in enumerate(self._packs)] if on else None
        if not on and not keep:
            for pack in self._packs:
                pack.clear()

    def _rows(self, g: int) -> torch.Tensor:
        return self.proj.weight[self.bounds[g]:self.bounds[g + 1]]

    def sub_logits(self, h: torch.Tensor, g: int, prev_sub: torch.Tensor | None) -> torch.Tensor:
        packed = None if self.packed is None else self.packed[g]
        return linear(h, self._rows(g), None, packed).float()  # (B, V_g)


class ARHead(nn.Module):
    """MGVQ's AR head: a small causal transformer over [h_t, sos, emb(sub_0), ..., emb(sub_{G-2})].

    Its output at index g+1 predicts sub-token g of position t. It has G attention heads with per-head q/k
    RMSNorm, SwiGLU of hidden 4*dim, no RoPE but a learned position table of G+1 rows. Groups of different
    sizes share the input table and the output layer, as wide as the largest group; a group's logits stop at
    its own size (-inf beyond in the teacher-forced output).
    """

    def __init__(self, dim: int, sizes: list[int], n_layer: int, norm_eps: float):
        super().__init__()
        self.sizes = list(sizes)
        self.groups, self.codes = len(self.sizes), max(self.sizes)
        groups, codes = self.groups, self.codes
        self.tok_emb = nn.Embedding(codes, dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, groups + 1, dim))
        self.sos = nn.Parameter(torch.zeros(1, 1, dim))
        self.layers = nn.ModuleList(
            Block(dim, Attention(dim, groups, groups, qk_norm_eps=norm_eps), FeedForward(dim, 4 * dim), norm_eps)
            for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(dim)
        self.head = Linear(dim, codes, bias=False)

    def forward(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
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

    def setup_cache(self, batch: int, dtype: torch.dtype) -> None:
        for layer in self.layers:
            attn = layer.attention
            attn.kv_cache = KVCache(batch, attn.n_head, self.groups + 1, attn.head_dim, dtype, self.sos.device)

    def sub_logits(self, h: torch.Tensor, g: int, prev_sub: torch.Tensor | None) -> torch.Tensor:
        if g == 0:  # start this position's sequence: [h, sos] at indices 0, 1
            x = torch.stack([h, self.sos[0, 0].expand_as(h)], dim=1) + self.pos_emb[:, :2]  # (B, 2, D)
        else:  # the caller's sampled sub-token g-1 enters at index g+1; indices < g+1 are cached
            x = (self.tok_emb(prev_sub) + self.pos_emb[0, g + 1])[:, None]  # (B, 1, D)
        for layer in self.layers:
            x = layer(x, None, 0 if g == 0 else g + 1)
        return self.head(self.ln_f(x[:, -1]))[:, :self.sizes[g]].float()  # (B, V_g)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, codebook: torch.Tensor | None = None):
        super().__init__()
        config.validate()
        self.config = c = config
        G, K = c.codebook_groups, c.group_sizes[0]
        self.cls_embedding = LabelEmbedding(c.num_classes, c.dim, c.class_dropout_prob)
        if c.input_embedding == "codebook":
            # The frozen tokenizer codebook, saved with the model so a model file is self-contained.
            shape = (G * K, c.codebook_embed_dim // G)
            if codebook is None:
                codebook = torch.zeros(shape)  # filled by load_state_dict
            elif tuple(codebook.shape) != shape:
                raise ValueError(f"codebook of shape {tuple(codebook.shape)} does not fit the config: expected "
                                 f"{shape} (groups*codes per group, codebook_embed_dim/groups)")
            self.register_buffer("codebook", codebook.detach().clone().float())
            self.img_projector = nn.Sequential(
                Linear(c.codebook_embed_dim, c.dim // 2, bias=False), nn.GELU(),
                Linear(c.dim // 2, c.dim, bias=False), nn.LayerNorm(c.dim))
        else:
            # One table per group, summed: the same as G nn.Embedding(K, dim) and as a linear map of the G one-hot
            # codes concatenated, without a projection to learn or run.
            # Groups of different sizes (factorized head): the tables of all groups stacked, offsets by cumsum.
            self.tok_embeddings = nn.Embedding(sum(c.group_sizes), c.dim)
        self.tok_dropout = nn.Dropout(c.token_dropout_p)
        drop_paths = torch.linspace(0, c.drop_path_rate, c.n_layer, device="cpu").tolist()
        resid_p, ffn_p = c.block_dropout
        self.layers = nn.ModuleList(
            Block(c.dim, Attention(c.dim, c.n_head, c.kv_heads, c.attn_dropout_p, resid_p),
                  FeedForward(c.dim, c.ffn_hidden, ffn_p), c.norm_eps, p, c.class_adaln)
            for p in drop_paths)
        # The factorized head normalises its own outputs; the trunk then has no final norm (as Open-MAGVIT2).
        self.norm = nn.Identity() if c.head == "factorized" else RMSNorm(c.dim, c.norm_eps)
        self.norm_ada_lin = ada_lin(c.dim, 2) if c.class_adaln else None  # scale, shift of the final norm
        self.cond: torch.Tensor | None = None  # the class embedding (B, 1, dim) of a cached generation (adaLN)
        if c.head == "factorized":
            from gpt.factorized import FactorizedHead  # it builds on this module's blocks

            self.head = FactorizedHead(c)
        elif c.head == "ar":
            self.head = ARHead(c.dim, c.group_sizes, c.ar_head_layers, c.norm_eps)
        else:
            self.head = ParallelHead(c.dim, c.group_sizes)
        self._kept_caches = None  # ((batch, dtype, device), KV caches) of the last generation, see setup_cache
        self.init_buffers()
        self.init_weights()

    def init_buffers(self) -> None:
        """(Re)build the non-persistent buffers (RoPE table, group offsets), e.g. in a model built on meta."""
        c = self.config
        device = self.cls_embedding.embedding_table.weight.device
        self.register_buffer("freqs_cis", rope_2d(c.grid_size, c.head_dim, c.rope_base).to(device), persistent=False)
        offsets = torch.tensor([0, *c.group_sizes[:-1]], device=device).cumsum(0)
        self.register_buffer("code_offsets", offsets, persistent=False)
        if hasattr(self.head, "init_buffers"):
            self.head.init_buffers()

    def init_weights(self) -> None:
        """LlamaGen's init: N(0, initializer_range) linears and embeddings, zero parallel heads (uniform start)."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
        if self.config.class_adaln:  # IBQ-AR's: zero biases, gates x 1e-3 (its `alng`), modulations x 0.5
            dim = self.config.dim
            for m in self.modules():
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
            with torch.no_grad():
                for layer in self.layers:
                    layer.ada_lin[1].weight[:2 * dim].mul_(1e-3)
                    layer.ada_lin[1].weight[2 * dim:].mul_(0.5)
                self.norm_ada_lin[1].weight.mul_(0.5)
        if isinstance(self.head, ParallelHead):
            nn.init.zeros_(self.head.proj.weight)
        elif self.config.head == "factorized":
            for head in self.head.heads:
                nn.init.zeros_(head.weight)
        else:
            nn.init.zeros_(self.head.pos_emb)
            nn.init.normal_(self.head.sos, std=0.02)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, S, G) -> input vectors (B, S, dim)."""
        idx = codes + self.code_offsets
        if self.config.input_embedding == "codebook":
            # Raw rows concatenated over groups, in the projector's dtype: FSDP2's bf16 policy runs the weights in
            # bf16 without autocast, and the codebook is a float32 buffer (buffers are not cast).
            rows = self.codebook[idx].flatten(-2)
            return self.img_projector(rows.to(self.img_projector[0].weight.dtype))
        return self.tok_embeddings(idx).sum(-2)

    def final_norm(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """RMSNorm before the head, modulated by the class embedding cond (B, 1, dim) with class_adaln."""
        x = self.norm(x)
        if self.norm_ada_lin is None:
            return x
        scale, shift = self.norm_ada_lin(cond).unflatten(-1, (2, -1)).unbind(-2)  # (B, 1, dim) each
        return x * (1 + scale) + shift

    def trunk(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, L, dim), final-normed (not for the factorized head); index t predicts position t."""
        B, L, G = codes.shape
        if G != self.config.codebook_groups or not 1 <= L <= self.config.seq_len:
            raise ValueError(f"codes of shape {tuple(codes.shape)}: expected (B, L <= {self.config.seq_len}, "
                             f"{self.config.codebook_groups})")
        cls = self.cls_embedding(labels)  # (B, 1, dim): the first input, and the adaLN condition
        x = torch.cat([cls, self.embed_codes(codes[:, :-1])], dim=1)  # (B, L, dim)
        x = self.tok_dropout(x)
        freqs = self.freqs_cis[:L]
        for layer in self.layers:
            x = layer(x, freqs, None, cls)
        return self.final_norm(x, cls)

    def forward(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, L, G, V) in float32 of codes (B, L, G) int64 given labels (B,)."""
        h = self.trunk(codes, labels)
        if self.config.head == "factorized":  # its inputs are the trunk's embeddings of sub-tokens 0..G-2
            offsets = self.code_offsets[:-1]
            return self.head(h, self.tok_embeddings(codes[..., :-1] + offsets)).float()
        return self.head(h, codes).float()

    # Cached generation: the caller owns the loop and the sampling policy.

    def setup_cache(self, max_batch_size: int, dtype: torch.dtype | None = None) -> None:
        """Attach KV caches (trunk and head) and, on a CPU, packed weights (gpt.packed). The buffers of the last
        `clear_cache` are reused when batch, dtype and device match, so a compiled step sees the same addresses
        batch after batch (CUDA graphs re-record on new ones); `clear_cache(keep=False)` frees them."""
        c, weight = self.config, self.cls_embedding.embedding_table.weight
        dtype, device = dtype or weight.dtype, weight.device
        self._attach_packs(True)
        attentions = [m for m in self.modules() if isinstance(m, Attention)]
        if self._kept_caches is not None and self._kept_caches[0] == (max_batch_size, dtype, device):
            for attention, cache in zip(attentions, self._kept_caches[1]):
                attention.kv_cache = cache
            return
        self._kept_caches = None
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch_size, c.kv_heads, c.seq_len, c.head_dim, dtype, device)
        self.head.setup_cache(max_batch_size, dtype)

    def clear_cache(self, keep: bool = True) -> None:
        """Detach the KV caches (the model is a plain training/forward model again); `keep`: hold the buffers for
        the next setup_cache of the same batch, dtype and device."""
        cache = self.layers[0].attention.kv_cache
        attentions = [m for m in self.modules() if isinstance(m, Attention)]
        if keep and cache is not None:
            key = (cache.k_cache.shape[0], cache.k_cache.dtype, cache.k_cache.device)
            self._kept_caches = (key, [attention.kv_cache for attention in attentions])
        else:
            self._kept_caches = None
        for attention in attentions:
            attention.kv_cache = None
        self._attach_packs(False, keep)
        self.cond = None

    def _attach_packs(self, on: bool, keep: bool = True) -> None:
        for m in self.modules():
            if hasattr(m, "attach_pack"):
                m.attach_pack(on, keep)

    def prefill(self, labels: torch.Tensor) -> torch.Tensor:
        """Run the class position; return the hidden (B, dim) that predicts image position 0."""
        self._check_cache()
        self.cond = self.cls_embedding(labels)  # (B, 1, dim), kept for the adaLN of later steps
        return self._step(self.cond, 0)

    def decode_step(self, prev_codes: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """Feed the codes (B, G) of image position t-1; return the hidden (B, dim) that predicts position t.

        t: an int (attention reads the t+1 cached positions), or a (1,) int64 tensor on the model's device, which
        a compiled caller passes so that every position runs the same graph (attention reads the whole cache,
        masked; the tensor is not range-checked: that would cost a device sync).
        """
        if not isinstance(t, torch.Tensor) and not 1 <= t < self.config.seq_len:
            raise ValueError(f"decode_step position t={t} is outside [1, {self.config.seq_len})")
        self._check_cache()
        return self._step(self.embed_codes(prev_codes[:, None]), t)

    def _check_cache(self) -> None:
        if self.layers[0].attention.kv_cache is None:
            raise RuntimeError("setup_cache(max_batch_size) must be called before prefill or decode_step")

    def _step(self, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """x (B, 1, dim) at cache position t (an int, or a (1,) tensor) -> final-normed hidden (B, dim)."""
        freqs = self.freqs_cis[t:t + 1] if isinstance(t, int) else self.freqs_cis[t]  # (1, head_dim/2, 2)
        cond = None if self.cond is None else self.cond[:x.shape[0]]
        for layer in self.layers:
            x = layer(x, freqs, t, cond)
        return self.final_norm(x[:, -1:], cond)[:, 0]  # (B, dim)

    def sub_logits(self, h: torch.Tensor, g: int, prev_sub: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits (B, V) of sub-token g at the current position. The ar head needs, for g > 0, the
        sub-token g-1 the caller sampled (B,); the parallel head ignores it."""
        if self.config.head == "factorized":
            prev = None if g == 0 else self.tok_embeddings(prev_sub + self.code_offsets[g - 1])
            return self.head.sub_logits(h, g, prev)
        return self.head.sub_logits(h, g, prev_sub)
