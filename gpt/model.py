"""LlamaGen-style class-conditional GPT over G groups of codes, with a sub-token head picked by name (gpt.heads).

The sequence is [class token, code_0, ..., code_{L-2}]; the hidden state at index t predicts the G sub-tokens of
image position t. Training runs `forward` (teacher forcing); generation runs the cached path: `setup_cache`,
`prefill`, then per position `decode_step` and G calls of `sub_logits`. Sampling policy lives in `sampling`, and
so do the speed tricks of decoding (sampling.decoding), attached from outside.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from gpt.config import GPTConfig
from gpt.heads import HEADS
from gpt.layers import Attention, Block, FeedForward, KVCache, LabelEmbedding, RMSNorm, ada_lin, rope_2d


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
                nn.Linear(c.codebook_embed_dim, c.dim // 2, bias=False), nn.GELU(),
                nn.Linear(c.dim // 2, c.dim, bias=False), nn.LayerNorm(c.dim))
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
        head = HEADS[c.head]
        self.norm = RMSNorm(c.dim, c.norm_eps) if head.trunk_norm else nn.Identity()
        self.norm_ada_lin = ada_lin(c.dim, 2) if c.class_adaln else None  # scale, shift of the final norm
        self.cond: torch.Tensor | None = None  # the class embedding (B, 1, dim) of a cached generation (adaLN)
        self.head = head(c)  # built last: module order (and so a seeded init) as before heads had their own file
        self.init_buffers()
        self.init_weights()

    def init_buffers(self) -> None:
        """(Re)build the non-persistent buffers (RoPE table, group offsets), e.g. in a model built on meta."""
        c = self.config
        device = self.cls_embedding.embedding_table.weight.device
        self.register_buffer("freqs_cis", rope_2d(c.grid_size, c.head_dim, c.rope_base).to(device), persistent=False)
        offsets = torch.tensor([0, *c.group_sizes[:-1]], device=device).cumsum(0)
        self.register_buffer("code_offsets", offsets, persistent=False)
        self.head.init_buffers()

    def init_weights(self) -> None:
        """LlamaGen's init: N(0, initializer_range) linears and embeddings, then the head's own (gpt.heads)."""
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
        self.head.init_weights()

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, S, G) -> input vectors (B, S, dim)."""
        idx = codes + self.code_offsets
        if self.config.input_embedding == "codebook":
            # Raw rows concatenated over groups, in the projector's dtype: FSDP2's bf16 policy runs the weights in
            # bf16 without autocast, and the codebook is a float32 buffer (buffers are not cast).
            rows = self.codebook[idx].flatten(-2)
            return self.img_projector(rows.to(self.img_projector[0].weight.dtype))
        return self.tok_embeddings(idx).sum(-2)

    def embed_subs(self, codes: torch.Tensor, first: int) -> torch.Tensor:
        """Sub-tokens (..., n) of groups first .. first+n-1 -> their rows of the learned input table (..., n, dim)."""
        return self.tok_embeddings(codes + self.code_offsets[first:first + codes.shape[-1]])

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
        return self.head(self.trunk(codes, labels), codes, self.embed_subs).float()

    # Cached generation: the caller owns the loop and the sampling policy.

    def setup_cache(self, max_batch_size: int, dtype: torch.dtype | None = None,
                    cache: type[KVCache] = KVCache) -> None:
        """Attach KV caches of kind `cache` to the trunk and the head (dtype: the weights' by default)."""
        c, weight = self.config, self.cls_embedding.embedding_table.weight
        dtype = dtype or weight.dtype
        for layer in self.layers:
            layer.attention.kv_cache = cache(max_batch_size, c.kv_heads, c.seq_len, c.head_dim, dtype, weight.device)
        self.head.setup_cache(max_batch_size, dtype, cache)

    def clear_cache(self) -> None:
        """Detach the KV caches: the model is a plain training/forward model again."""
        for attention in (m for m in self.modules() if isinstance(m, Attention)):
            attention.kv_cache = None
        self.cond = None

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
        """float32 logits (B, V_g) of sub-token g at the current position. Heads with sub-token inputs need, for
        g > 0, the sub-token g-1 the caller sampled (B,); the parallel head ignores it."""
        return self.head.sub_logits(h, g, prev_sub, self.embed_subs)
