"""The merged form of a grid of codes (MergeVQ): K codes in merge order and a token map (h, w) naming the merged
token that covers each grid position. It is the source matrix S of token merging, stored compactly:
S[k, p] = token_map[p] == k. A store keeps it beside the grid codes (tokenizer.store, meta `merged_tokens`)."""
from __future__ import annotations

import torch


def unmerge(merged: torch.Tensor, token_map: torch.Tensor) -> torch.Tensor:
    """Merged values (B, K, C) + token map (B, h, w) -> grid values (B, h, w, C): each position gets the values of
    the merged token covering it (the official `token_unmerge`)."""
    B, h, w = token_map.shape
    index = token_map.reshape(B, h * w, 1).expand(-1, -1, merged.shape[-1]).to(merged.device)
    return merged.gather(1, index).view(B, h, w, -1)


def check_token_map(token_map: torch.Tensor, merged: torch.Tensor) -> None:
    """A ValueError unless token_map is (B, h, w) of indices into merged (B, K, ...)."""
    B, K = merged.shape[:2]
    if token_map.ndim != 3 or token_map.shape[0] != B or not (0 <= token_map.min() <= token_map.max() < K):
        raise ValueError(f"token map {tuple(token_map.shape)} must be (B, h, w) with values in [0, {K}) for "
                         f"merged codes {tuple(merged.shape)}")
