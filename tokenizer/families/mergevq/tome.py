"""Token merging (ToMe, Bolya et al. 2023) as MergeVQ's encoder runs it: how many tokens each layer merges, and one
bipartite soft-matching step that merges them while keeping track of which grid position each token covers.

Tokens are (B, N, C) with the class token at index 0. A step splits them into the even-indexed set A and the
odd-indexed set B, scores every A token against every B token by the cosine of their (head-mean) attention keys,
and merges the r A tokens with the best match into their B partner. The class token (A's first) never merges.
The result lists the A tokens that stayed, in their order, then every B token: "merge order".
"""
from __future__ import annotations

import bisect
import math

import torch

INFLECTION = -0.5  # MergeVQ's schedule: merges per layer decrease from 1.5 r to 0.5 r
DISTRIBUTIONS = ("gaussian", "exponential", "uniform")
CYCLE = 100  # training step s picks its K at the quantile (s mod 100) / 100 of the candidate distribution


def ramp(num_layers: int, r: int, inflection: float = INFLECTION) -> list[int]:
    """ToMe's `parse_r` for a rate r and an inflection: a linear ramp from int(r * (1 - inflection)) to its mirror
    around r, truncated to ints layer by layer."""
    first = int(r * (1.0 - inflection))
    last = 2 * r - first
    step = (last - first) / (num_layers - 1)
    return [int(first + step * i) for i in range(num_layers)]


def merge_schedule(num_layers: int, merge_num: int) -> list[int]:
    """Tokens merged by each of `num_layers` layers, `merge_num` in all.

    As the official `check_parse_r` + `parse_r(total=merge_num)`: the rate whose ramp sums closest to merge_num
    (the first such rate, searching upwards and stopping once the gap grows), then the difference added to layer 0.
    """
    if num_layers < 2:
        raise ValueError(f"num_att_blocks={num_layers}: token merging needs at least 2 transformer blocks")
    if merge_num < 0:
        raise ValueError(f"merge_num={merge_num} must be >= 0")
    best, best_gap = 0, math.inf
    for r in range(merge_num):
        gap = abs(sum(ramp(num_layers, r)) - merge_num)
        if gap < best_gap:
            best, best_gap = r, gap
        elif gap > best_gap:
            break
    schedule = ramp(num_layers, best)
    schedule[0] += merge_num - sum(schedule)
    return schedule


def tokens_left(num_tokens: int, schedule: list[int]) -> int:
    """Image tokens left after the schedule, or a ValueError where a layer would merge more than it can (half of
    its tokens besides the class token), which the official code would silently cap."""
    n = num_tokens + 1  # with the class token
    for layer, r in enumerate(schedule):
        if r < 0 or r > (n - 1) // 2:
            raise ValueError(f"merge schedule {schedule}: layer {layer} would merge {r} of {n - 1} tokens "
                             f"(at most half can merge per layer); lower merge_num")
        n -= r
    return n - 1


class Merge:
    """One bipartite soft-matching step of r merges, found from the keys (B, N, D); apply it to any (B, N, C)."""

    def __init__(self, keys: torch.Tensor, r: int):
        with torch.no_grad():
            unit = keys / keys.norm(dim=-1, keepdim=True)
            scores = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)  # (B, |A|, |B|)
            scores[:, 0] = -math.inf  # the class token never merges
            best, partner = scores.max(dim=-1)
            order = best.argsort(dim=-1, descending=True, stable=True)
            self.src = order[:, :r]  # (B, r): A tokens that merge, best match first
            self.kept = order[:, r:].sort(dim=-1).values  # (B, |A| - r): A tokens that stay, in their order
            self.dst = partner.gather(1, self.src)  # (B, r): their partners in B
        self.r, self.num_tokens = r, keys.shape[1]

    def __call__(self, x: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        """(B, N, C) -> (B, N - r, C): kept A tokens, then B tokens with their merged A tokens reduced in."""
        a, b = x[:, ::2], x[:, 1::2]
        C = x.shape[-1]
        kept = a.gather(1, self.kept[..., None].expand(-1, -1, C))
        moving = a.gather(1, self.src[..., None].expand(-1, -1, C))
        b = b.scatter_reduce(1, self.dst[..., None].expand(-1, -1, C), moving, reduce=reduce)
        return torch.cat([kept, b], dim=1)

    def new_index(self) -> torch.Tensor:
        """(B, N): where each token before the step sits after it (a merged token: where its partner sits)."""
        B, N = self.src.shape[0], self.num_tokens
        n_kept = self.kept.shape[1]
        index = torch.empty(B, N, dtype=torch.long, device=self.src.device)
        rows = torch.arange(B, device=index.device)[:, None]
        index[:, 1::2] = n_kept + torch.arange(N // 2, device=index.device)
        index[rows, 2 * self.kept] = torch.arange(n_kept, device=index.device)
        index[rows, 2 * self.src] = n_kept + self.dst
        return index

    def weighted(self, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Size-weighted average of merged tokens: (x (B, N - r, C), size (B, N - r, 1)); size None means all 1."""
        if size is None:
            size = torch.ones_like(x[..., :1])
        total = self(size)
        return self(x * size) / total, total


def parse_distribution(distribution: str) -> tuple[str, int]:
    """"gaussian-6" -> ("gaussian", 6); a count left out is 5, as the official code's."""
    kind, _, count = distribution.partition("-")
    if kind.lower() not in DISTRIBUTIONS or (count and not (count.isdigit() and int(count) > 0)):
        raise ValueError(f"cand_distribution={distribution!r}: expected '<kind>-<count>' with kind one of "
                         f"{DISTRIBUTIONS}, e.g. 'gaussian-6'")
    return kind.lower(), int(count) if count else 5


def merge_candidates(num_tokens: int, merge_num: int, distribution: str) -> tuple[list[int], list[float]]:
    """The K a training step can keep, and their cumulative probabilities: MergeVQ's `cand_distribution`
    "<kind>-<n>" (n = 5 when left out) around K0 = num_tokens - merge_num.

    As the official MergeVQEncoder.apply_merge: the candidates are the squares (sqrt(K0) + i)^2 for i from -b to
    n - 1 - b (b = 1 for gaussian, else 0); their weights are exp(-(j - b)^2 / (2 * 0.5^2)) + 0.05 over the index j
    (gaussian), 2 exp(-2 j) + 0.1 (exponential) or equal (uniform), normalised, summed and rounded to 5 decimals.
    """
    kind, n = parse_distribution(distribution)
    bias = 1 if kind == "gaussian" else 0
    root = (num_tokens - merge_num) ** 0.5
    candidates = [int((root + i) ** 2) for i in range(-bias, n - bias)]
    if min(candidates) < 1 or max(candidates) > num_tokens:
        raise ValueError(f"cand_distribution={distribution!r} around K={num_tokens - merge_num} of {num_tokens} "
                         f"tokens gives K candidates {candidates}, outside [1, {num_tokens}]")
    j = torch.arange(n, dtype=torch.float64)
    weight = {"gaussian": torch.exp(-(j - bias) ** 2 / 0.5) + 0.05, "exponential": 2 * torch.exp(-2 * j) + 0.1,
              "uniform": torch.ones(n, dtype=torch.float64)}[kind]
    cumulative = (weight / weight.sum()).cumsum(0)
    return candidates, [round(float(c), 5) for c in cumulative]


def sampled_merge_num(num_tokens: int, merge_num: int, distribution: str | None, step: int) -> int:
    """Tokens to merge at training step `step` (0-based): the candidate K whose cumulative probability first reaches
    (step mod 100) / 100, as the official `sampling_r_candidate(rand=(batch_idx % 100) * 0.01)`; K is then a
    function of the step (the same on every process, and again after a resume). No distribution: merge_num."""
    if distribution is None:
        return merge_num
    candidates, cumulative = merge_candidates(num_tokens, merge_num, distribution)
    return num_tokens - candidates[bisect.bisect_left(cumulative, (step % CYCLE) / CYCLE)]
