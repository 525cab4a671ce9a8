"""KV-cached autoregressive sampling of codes (G sub-tokens per position, any tokenizer family): filters,
classifier-free guidance, the loop.

No global RNG in the loop: randomness comes from a counter-based hash of (sample seed, position, group), so a
sample's codes depend only on its label, its seed and the settings: never on the other samples of its batch, the
batch size or the number of processes. What persists between calls changes no result: the compiled step per
device type (`_COMPILED`), and each model's KV caches and packs (sampling.decoding).
"""
from __future__ import annotations

import inspect
import math
import types
from collections.abc import Callable, Sequence

import torch

from sampling import decoding
from tokenizer.common import validate
from tokenizer.common.errors import ConfigError

CFG_SCHEDULES = ("constant", "linear")
_M32 = 0xFFFFFFFF


def _top_k_threshold(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest logit of each row (B, 1); unsorted topk is 3x faster than sorted."""
    return torch.topk(logits, k, dim=-1, sorted=False).values.amin(-1, keepdim=True)


def _cut(logits: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
    """Logits below each row's threshold (B, 1) become -inf; None keeps them all."""
    return logits if threshold is None else logits.masked_fill(logits < threshold, float("-inf"))


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept); the rest become -inf. k=0: no-op."""
    return _cut(logits, filter_threshold(logits, top_k=k))


def _nucleus_threshold(ranked: torch.Tensor, p: float) -> torch.Tensor:
    """Smallest logit kept by top-p, from each row's logits in descending order (B, n) -> (B, 1).

    As in HF/LlamaGen a token is dropped when the tokens ranked above it already hold more than p, so the most
    likely token always stays; the kept tokens are a prefix of the ranking because the cumulative sum is monotone.
    """
    cum = ranked.softmax(-1).cumsum(-1)  # (B, n)
    n_keep = 1 + (cum[..., :-1] <= p).sum(-1, keepdim=True)
    return ranked.gather(-1, n_keep - 1)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches p. p=1: no-op."""
    return _cut(logits, filter_threshold(logits, top_p=p))


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance on logits: uncond + scale * (cond - uncond); scale 1 returns cond exactly.

    `scale` may be a tensor broadcasting to the rows (a compiled step reads it from a table, without recompiling
    per value); rows whose scale is 1 still get cond bit for bit.
    """
    if isinstance(scale, torch.Tensor):
        return torch.where(scale == 1.0, cond, uncond + scale * (cond - uncond))
    if scale == 1.0:
        return cond
    return uncond + scale * (cond - uncond)


def cfg_scale_at(t: int, num_positions: int, cfg_scale: float, cfg_interval: float = -1,
                 cfg_schedule: str = "constant") -> float:
    """The guidance scale at image position t (0-based).

    `constant`: cfg_scale everywhere. `linear`: a ramp from 1 (no guidance) at t=0 to cfg_scale at the last
    position. `cfg_interval` > -1 turns guidance off (scale 1, the conditional logits) at positions
    t > cfg_interval + 1, exactly where LlamaGen's and MGVQ's loops do (their counter starts at position 1).
    """
    if cfg_schedule not in CFG_SCHEDULES:
        raise ConfigError(f"cfg_schedule={cfg_schedule!r}: expected one of {CFG_SCHEDULES}")
    if cfg_interval > -1 and t > cfg_interval + 1:
        return 1.0
    if cfg_schedule == "linear" and num_positions > 1:
        return 1.0 + (cfg_scale - 1.0) * t / (num_positions - 1)
    return cfg_scale


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32), in two 16-bit halves of c so no product reaches 2**49."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijection of [0, 2**32) with good avalanche (C. Wellons' `lowbias32`), on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seed_keys(seeds: torch.Tensor) -> torch.Tensor:
    """Per-sample 32-bit stream keys from int64 seeds in [0, 2**63): both halves of the seed matter."""
    if seeds.dtype != torch.int64 or (seeds < 0).any():
        raise ValueError("seeds must be a non-negative int64 tensor")
    return _hash32((seeds & _M32) ^ _hash32(seeds >> 32))


def uniforms(keys: torch.Tensor, counter: int | torch.Tensor) -> torch.Tensor:
    """Draw number `counter` of every sample's stream, float64 in [0, 1): an int in [0, 2**32) gives (B,), an int64
    tensor of counters (n,) gives (B, n)."""
    if isinstance(counter, torch.Tensor):
        c, keys = _hash32(counter & _M32), keys[:, None]  # (n,) against (B, 1)
    else:
        c = _hash32(torch.full_like(keys, counter & _M32))
    return _hash32(_hash32(c ^ keys) ^ c).double() / 2.0**32


def sample_from_logits(logits: torch.Tensor, u: torch.Tensor, threshold: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse-CDF sampling: (B, V) logits and (B,) uniforms in [0, 1) -> (B,) int64 indices.

    Token i weighs exp(logit_i - max), summed in float64 over each row alone, so a row's result never depends on
    other rows. Tokens of probability 0 (filtered to -inf) are never chosen; nor are those below `threshold`
    (B, 1), which draws exactly as if they had been filtered to -inf, without writing the filtered logits.
    """
    logits = logits.float()
    weights = (logits - logits.amax(-1, keepdim=True)).exp()  # (B, V), unnormalised: the target scales instead
    if threshold is not None:
        weights = weights * (logits >= threshold)
    cdf = weights.double().cumsum(-1)
    target = (u * cdf[:, -1]).unsqueeze(1)  # scaled by the total so rounding in the sum cannot push past it
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return idx.clamp_(max=logits.shape[-1] - 1)


def filter_threshold(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor | None:
    """The smallest logit that top-k then top-p (on the renormalised top-k distribution) keep, per row (B, 1);
    None when neither filters. Keeping logits >= it is what LlamaGen's and HF's filters, in that order, keep."""
    V = logits.shape[-1]
    if top_p >= 1.0:
        return _top_k_threshold(logits, top_k) if 0 < top_k < V else None
    # One sorted top-k serves both thresholds, instead of a top-k and then a sort of all V logits.
    ranked = torch.topk(logits, top_k, dim=-1).values if 0 < top_k < V else logits.sort(dim=-1, descending=True).values
    return _nucleus_threshold(ranked, top_p)  # >= the k-th largest: the nucleus is a prefix of the top k


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p; the filtered logits become -inf."""
    logits = logits / temperature
    return _cut(logits, filter_threshold(logits, top_k, top_p))


def nonfinite_rows(logits: torch.Tensor) -> torch.Tensor:
    """(B,) True for the rows of (B, V) holding a NaN or an infinity (min and max propagate NaN; one pass)."""
    low, high = torch.aminmax(logits, dim=-1)
    return ~(torch.isfinite(low) & torch.isfinite(high))


def per_group(value, G: int, name: str, **bounds) -> list:
    """A scalar or a sequence of G values -> list of G values, each a finite number within `bounds`
    (tokenizer.common.validate.number); ConfigError naming `name` otherwise."""
    values = validate.per_group(value, name, G, **bounds)
    return values * G if len(values) == 1 else values


def _check_settings(G: int, temperature, top_k, top_p, top_k_log2: bool) -> tuple[list, list, list]:
    temps = per_group(temperature, G, "temperature", low=0, low_open=True)  # (use top_k=1 for greedy decoding)
    ks = per_group(top_k, G, "top_k", low=0)
    if any(int(k) != k for k in ks):
        raise ConfigError(f"top_k={top_k}: expected non-negative integers")
    ps = per_group(top_p, G, "top_p", low=0, high=1, low_open=True)
    # MGVQ's sampler reads --top-k as log2(k): 12 means 4096, 0 means 1 (greedy).
    ks = [2 ** int(k) if top_k_log2 else int(k) for k in ks]
    return temps, ks, ps


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Class labels must lie in [0, num_classes): label num_classes is the null class guidance mixes in, not a
    class to sample."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ConfigError(f"labels must be integers, got {labels.dtype}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)].unique().tolist()
        raise ConfigError(f"labels {bad} are outside the model's classes 0..{num_classes - 1} (label {num_classes} "
                          f"is the null class of classifier-free guidance, not a class)")


def position_step(model, inputs: torch.Tensor, t: int | torch.Tensor, draws: torch.Tensor, scales: torch.Tensor,
                  temps: tuple, ks: tuple, ps: tuple, guided: bool, first: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the G codes of one image position: trunk step, then per group sub-token logits -> CFG -> filters -> draw.

    inputs: the labels (rows,) when `first` (the class position, prefill), else the codes (B, G) of position
    t-1. t: the image position, an int (attention reads only the cached positions; compiled on a CPU, the int is
    symbolic) or a (1,) int64 tensor (every position has the same shapes: one CUDA graph for all of them).
    draws (B, L*G) float64: every sample's uniforms, number t*G+g for sub-token g of position t.
    scales: the guidance scale per position and group, an (L, G) float32 tensor, or (eager) its rows as floats.
    temps, ks, ps: one value per group. `guided`: the model runs 2B rows, [B, 2B) the null class.
    Returns the codes (B, G) and a flag (B,) for samples that met a non-finite logit.
    """
    B, G = draws.shape[0], len(temps)
    h = model.prefill(inputs) if first else model.decode_step(torch.cat([inputs, inputs]) if guided else inputs, t)
    # Slices, not indexing: an index would specialise a compiled step on a symbolic t
    scale = scales[t:t + 1].reshape(G) if isinstance(scales, torch.Tensor) else scales[t]  # (G,) or G floats
    bad = torch.zeros(B, dtype=torch.bool, device=draws.device)
    out, sub = [], None
    for g in range(G):
        logits = model.sub_logits(h, g, sub).float()  # (B or 2B, V_g)
        if guided:
            logits = cfg_mix(logits[:B], logits[B:], scale[g])
        logits = logits / temps[g]
        bad = bad | nonfinite_rows(logits)  # what is sampled from: guidance and temperature can overflow
        threshold = filter_threshold(logits, ks[g], ps[g])
        u = draws[:, t * G + g:t * G + g + 1].reshape(B)
        out.append(sample_from_logits(logits, u, threshold))  # (B,)
        sub = torch.cat([out[-1]] * 2) if guided else out[-1]
    return torch.stack(out, dim=1), bad


_COMPILED: dict[str, object] = {}


def compile_step(fn, device_type: str):
    """torch.compile for a decoding step, fullgraph (no graph breaks).

    CUDA: static shapes (dynamic=False) and CUDA graphs (mode reduce-overhead); the caller passes the position as a
    tensor, so one graph serves every position. CPU: inductor's default with symbolic shapes (dynamic=True); the
    caller passes the position as an int, a symbol in the graph, so attention reads only the cached positions
    and one graph serves every position (and every batch size). The CPU graph's wrapper is C++ (inductor's
    `cpp_wrapper`: about 100 kernel and op calls a step leave Python; 0.3-0.7 ms of a GPT-B step, for some more
    seconds of compiling) and skips its per-call size and alignment checks of the inputs (the inputs are ours).
    """
    if device_type == "cuda":
        return torch.compile(fn, fullgraph=True, dynamic=False, mode="reduce-overhead")
    return torch.compile(fn, fullgraph=True, dynamic=True,
                         options={"cpp_wrapper": True, "size_asserts": False, "alignment_asserts": False})


def compiled_position_step(device_type: str):
    """`position_step` under `compile_step`, built once per device type. The settings, the head step and the
    guidance phase are baked in: one graph per such combination."""
    if device_type not in _COMPILED:
        _COMPILED[device_type] = compile_step(position_step, device_type)
    return _COMPILED[device_type]


def unguarded(compiled, args: tuple, kwargs: dict, also: dict | None = None) -> Callable | None:
    """The graph torch.compile runs for `compiled(*args, **kwargs)`, as a plain function of the same arguments that
    skips dynamo's guard checks; None where there is none (then keep calling `compiled`).

    Dynamo checks about 1,000 guards per call of a GPT-B step (the module tree, every weight's shape and dtype):
    0.6-0.9 ms a position on a CPU, 3-4% of the step. A loop that knows that only some arguments change between
    its calls can check them once: the graph found here is the one dynamo's own lookup picks (the first cache
    entry whose guards pass for these arguments), and it is returned only where its guards also pass with the
    arguments of `also` replaced (values the loop will pass later, such as its last position: the guards on a
    position are range checks, so passing at both ends covers every position between). None also where this
    torch does not expose its cache and guards (`torch._dynamo.eval_frame._debug_get_cache_entry_list`, an
    entry's `guard_manager.check`)."""
    fn = getattr(compiled, "_torchdynamo_orig_callable", None)
    entries = getattr(torch._dynamo.eval_frame, "_debug_get_cache_entry_list", None)
    if fn is None or entries is None:
        return None
    bound = getattr(fn, "__self__", None)  # a bound method: its code's first argument is `self`
    func = getattr(fn, "__func__", fn)
    lead = () if bound is None else (bound,)
    names = inspect.signature(func).bind(*lead, *args, **kwargs).arguments
    for entry in entries(func.__code__):
        check = getattr(getattr(entry, "guard_manager", None), "check", None)
        if check is None:
            return None
        if check(dict(names)):
            if not (also is None or check({**names, **also})):
                return None
            graph = types.FunctionType(entry.code, func.__globals__, func.__name__)
            return graph if bound is None else types.MethodType(graph, bound)
    return None


def check_cfg_scale(cfg_scale: float | Sequence[float], name: str = "cfg_scale") -> None:
    """ConfigError unless every scale is a finite number >= 1 (1 = no guidance, as in LlamaGen's and MGVQ's
    samplers, which apply guidance only above 1)."""
    validate.per_group(cfg_scale, name, low=1)


def _scale_table(G: int, L: int, cfg_scale, cfg_interval: float, cfg_schedule: str) -> tuple[torch.Tensor, int]:
    """The guidance scale per position and group (L, G) float32, and n: positions [0, n) run both CFG halves,
    from n on only the conditional rows (guidance is off there)."""
    group_scales = per_group(cfg_scale, G, "cfg_scale")
    check_cfg_scale(cfg_scale)
    validate.number(cfg_interval, "cfg_interval")
    scales = torch.tensor([[cfg_scale_at(t, L, scale, cfg_interval, cfg_schedule) for scale in group_scales]
                           for t in range(L)], dtype=torch.float32)
    if all(scale == 1.0 for scale in group_scales):
        return scales, 0
    return scales, L if cfg_interval <= -1 else min(L, max(0, math.floor(cfg_interval + 1) + 1))


@torch.no_grad()
def generate(
    model,
    labels: torch.Tensor,
    *,
    cfg_scale: float | Sequence[float] = 1.0,
    cfg_interval: float = -1,
    cfg_schedule: str = "constant",
    temperature: float | Sequence[float] = 1.0,
    top_k: int | Sequence[int] = 0,
    top_p: float | Sequence[float] = 1.0,
    seeds: torch.Tensor | None = None,
    sampled_groups: int | None = None,
    top_k_log2: bool = False,
    compile: bool = False,
) -> torch.Tensor:
    """Sample codes (B, L, G) int64 for class labels (B,) with the model's KV cache.

    For every position t and group g: sub-token logits -> CFG mix (conditional and null-class halves run as
    one batch of 2B; both continue with the sampled sub-token) -> temperature -> top-k -> top-p -> draw.
    `cfg_scale` >= 1, a scalar or one value per group: 1 is no guidance (B rows only); like the official samplers,
    guidance only strengthens the condition, so a scale below 1 is refused. Where `cfg_interval` turns guidance
    off the null-class rows stop.
    `temperature`, `top_k`, `top_p`: a scalar or one value per group; top_k 0 and top_p 1 mean no filtering,
    top_k 1 is greedy decoding. `top_k_log2`: read top_k as MGVQ's exponent (k = 2**top_k).
    `seeds` (B,) non-negative int64: each sample's own random stream (None: drawn from torch's generator).
    `sampled_groups` n: only the first n groups are sampled, later ones are decoded greedily (they still
    condition the model but are dropped by a coarse-to-fine decode with the same n).
    `compile`: run positions 1.. through `compiled_position_step` (same codes; the first call per batch size and
    settings compiles). A non-finite logit raises FloatingPointError once the batch is done (checked on the
    device per position, read once at the end, so the loop never waits for the device).
    """
    cfg = model.config
    G, L = cfg.codebook_groups, cfg.seq_len
    temps, ks, ps = _check_settings(G, temperature, top_k, top_p, top_k_log2)
    check_labels(labels, cfg.num_classes)
    if sampled_groups is not None:
        if not 1 <= sampled_groups <= G:
            raise ConfigError(f"sampled_groups={sampled_groups}: expected 1..{G}")
        ks = [k if g < sampled_groups else 1 for g, k in enumerate(ks)]
    B, device = labels.shape[0], labels.device
    if seeds is None:
        seeds = torch.randint(2**62, (B,), dtype=torch.int64)
    if seeds.shape != (B,):
        raise ValueError(f"seeds has shape {tuple(seeds.shape)}, expected ({B},)")
    draws = uniforms(seed_keys(seeds.to(device)), torch.arange(L * G, device=device))  # (B, L*G), made at once
    scales, guided_until = _scale_table(G, L, cfg_scale, cfg_interval, cfg_schedule)
    if guided_until:  # rows [0, B) conditional, [B, 2B) the null class
        labels = torch.cat([labels, torch.full_like(labels, cfg.num_classes)])
    codes, bad = _decode(model, labels, draws, scales, guided_until, (tuple(temps), tuple(ks), tuple(ps)), compile)
    if bad.any():
        raise FloatingPointError(f"non-finite (NaN or inf) logits while sampling rows {bad.nonzero().flatten().tolist()}"
                                 f" of the batch (after guidance cfg_scale={cfg_scale} and temperature={temperature}): "
                                 f"check the model's weights, the autocast precision and those settings")
    return codes


def _decode(model, labels: torch.Tensor, draws: torch.Tensor, scales: torch.Tensor, guided_until: int,
            policy: tuple, compile: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`generate`'s cached loop over the L positions: codes (B, L, G) and a flag (B,) for the samples that met a
    non-finite logit. labels: the rows' classes (2B with guidance); scales (L, G) float32; positions
    [0, guided_until) run both CFG halves; policy: per-group temperatures, top-ks and top-ps."""
    B, L, G = draws.shape[0], model.config.seq_len, len(policy[0])
    device = draws.device
    step = compiled_position_step(device.type) if compile else position_step
    scale_rows, scales = scales.tolist(), scales.to(device)  # eager steps read floats (as float32 rounds them)
    codes = torch.empty(B, L, G, dtype=torch.int64, device=device)
    bad = torch.zeros(B, dtype=torch.bool, device=device)
    pos = torch.zeros(1, dtype=torch.int64, device=device)
    # On a CPU a guidance phase's later positions run its graph without guard checks (see `unguarded`): within
    # this loop only the position and the input codes change between them.
    phase_graphs: dict[bool, Callable] = {}
    decoding.attach(model, labels.shape[0])
    try:
        for t in range(L):
            guided = t < guided_until
            # The class position runs eagerly: it is one of L and would be a graph of its own.
            if compile and t > 0:
                fn, where, table = phase_graphs.get(guided, step), t, scales
                if device.type == "cuda":
                    pos.fill_(t)
                    torch.compiler.cudagraph_mark_step_begin()  # the previous position's outputs are consumed
                    where = pos
            else:
                fn, where, table = position_step, t, scale_rows
            # A copy, not a view of `codes`: a view's offset varies with t, and a symbolic step would specialise on it
            inputs = labels if t == 0 else codes[:, t - 1].clone()
            args, kwargs = (model, inputs, where, draws, table, *policy), {"guided": guided, "first": t == 0}
            out, nonfinite = fn(*args, **kwargs)
            if compile and fn is step and device.type == "cpu" and guided not in phase_graphs:
                last = (guided_until if guided else L) - 1
                phase_graphs[guided] = unguarded(step, args, kwargs, also={"t": last}) or step
            codes[:, t] = out
            bad |= nonfinite
    finally:
        decoding.detach(model)
    return codes, bad
