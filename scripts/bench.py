"""Throughput benchmarks; they print figures and assert nothing.

    python scripts/bench.py extract --preset mgvq-f16c32-g4 --image-size 256 --batch-size 32
    python scripts/bench.py train --preset gpt_b --batch-size 8
    python scripts/bench.py sample --preset gpt_b --batch-size 32 --cfg-scale 2.0 [--compile] [--precision bf16]
    python scripts/bench.py data --images 50000 --views 20 --batch-size 32 --workers 4
    python scripts/bench.py store --out /tmp/codes --images 4096   (a synthetic store, for gpu_check.sh)
"""
import argparse

from tokenizer.common.precision import autocast_dtype


def bench_extract(args: argparse.Namespace) -> None:
    """Tokenizer encode throughput (images -> codes, the work of extract_codes per view) on random images."""
    import time

    import torch

    from tokenizer import MGVQ, MGVQConfig, load_tokenizer

    device = torch.device(args.device)
    torch.manual_seed(0)
    name, _, groups = args.preset.rpartition("-g")  # mgvq-f16c32-g4 -> ("mgvq-f16c32", "4")
    config = MGVQConfig.preset(name, int(groups))
    model = load_tokenizer(args.checkpoint, config) if args.checkpoint else MGVQ(config).eval().requires_grad_(False)
    model = model.to(device)
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1
    dtype = autocast_dtype(args.precision)

    @torch.no_grad()
    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            model.encode_codes(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    print(f"extract {args.preset} {args.image_size}px batch {args.batch_size}, {args.precision}, {device}: "
          f"{seconds * 1e3:.1f} ms/batch, {args.batch_size / seconds:,.1f} images/s (per view)")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def add_extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="mgvq-f16c32-g4", help="mgvq-{f8,f16,f32}c32-g{4,8}")
    p.add_argument("--checkpoint", default=None, help="tokenizer weights (random weights when omitted)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)


# Dense peak TFLOP/s by GPU name (bf16 / fp16 tensor cores; fp32 uses TF32 figures), first match wins.
PEAK_TFLOPS = [("H100 PCIe", 756, 378), ("H100", 989, 495), ("H200", 989, 495), ("GH200", 989, 495),
               ("B200", 2250, 1100), ("A100", 312, 156), ("L40S", 362, 183), ("L4", 121, 60), ("A10", 125, 62)]


def peak_tflops(device, precision: str) -> float | None:
    """The device's dense peak for `precision`, or PEAK_TFLOPS from the environment; None when unknown (CPU)."""
    import os

    import torch

    if os.environ.get("PEAK_TFLOPS"):
        return float(os.environ["PEAK_TFLOPS"])
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, half, tf32 in PEAK_TFLOPS:
        if key in name:
            return half if precision in ("bf16", "fp16") else tf32
    return None


def bench_train(args: argparse.Namespace) -> None:
    """Optimizer steps of a GPT preset on random codes: forward, cross-entropy, backward, clip, fused AdamW."""
    import contextlib
    import time

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from gpt import GPT, GPTConfig
    from gpt.train import TrainConfig, cross_entropy_per_group
    from tokenizer.common.runs import make_optimizer

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = GPTConfig.preset(args.preset, codebook_groups=args.groups, codes_per_group=args.codes_per_group,
                              grid_size=args.grid, num_classes=1000, codebook_embed_dim=32, head=args.head)
    codebook = torch.randn(args.groups * args.codes_per_group, 32 // args.groups)
    model = GPT(config, codebook=codebook).to(device).train()
    optimizer = make_optimizer(model, TrainConfig(data=None, model=config, tokenizer=None, out_dir=""),
                               fused=device.type in ("cuda", "cpu"))  # LlamaGen's recipe: the TrainConfig defaults
    step_fn = torch.compile(model) if args.compile else model
    L = args.grid * args.grid
    codes = torch.randint(args.codes_per_group, (args.batch_size, L, args.groups), device=device)
    labels = torch.randint(1000, (args.batch_size,), device=device)
    dtype = autocast_dtype(args.precision)

    from torch.nn.attention import SDPBackend, sdpa_kernel
    kernels = (lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)) if args.attention == "flash" else contextlib.nullcontext

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None), kernels():
            loss, _ = cross_entropy_per_group(step_fn(codes, labels), codes)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    with FlopCounterMode(display=False) as counter:  # matmuls and attention of one step, forward and backward
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    params = sum(p.numel() for p in model.parameters())
    flops = counter.get_total_flops()
    peak = peak_tflops(device, args.precision)
    mfu = f"MFU {flops / seconds / (peak * 1e12):.1%} of {peak:g} TFLOP/s" if peak else "MFU n/a (unknown peak)"
    print(f"train {args.preset} ({params / 1e6:.1f}M params, head {args.head}) batch {args.batch_size} x {L} tokens "
          f"x G{args.groups}, {args.precision}, compile={args.compile}, attention {args.attention}, {device}: "
          f"{seconds * 1e3:.1f} ms/step, {args.batch_size * L / seconds:,.0f} tokens/s, "
          f"{flops / seconds / 1e12:.1f} TFLOP/s, {mfu}")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="gpt_b", help="gpt_b, gpt_l, gpt_xl, gpt_xxl, gpt_3b, tiny")
    p.add_argument("--batch-size", type=int, default=8, help="per device")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    p.add_argument("--grid", type=int, default=16, help="code grid side (16 for 256px, 24 for 384px at f16)")
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--codes-per-group", type=int, default=8192, help="MGVQ-G4: 32768 codes = 4 x 8192")
    p.add_argument("--head", choices=["parallel", "ar"], default="ar")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--attention", choices=["auto", "flash"], default="auto", help="flash: only the flash SDPA kernel "
                   "(fails where it cannot run)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)


def _timed(fn, device) -> float:
    """Seconds for one call of fn, the device synchronised around it."""
    import time

    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_sample(args: argparse.Namespace) -> None:
    """Cached generation throughput, eager and compiled, with and without decoding; then one decode step."""
    import torch

    from gpt import GPT, GPTConfig
    from sampling import generate

    device = torch.device(args.device)
    torch.manual_seed(0)
    G, K, B = args.groups, args.codes_per_group, args.batch_size
    config = GPTConfig.preset(args.preset, codebook_groups=G, codes_per_group=K, grid_size=args.grid,
                              num_classes=1000, codebook_embed_dim=32, head=args.head)
    model = GPT(config, codebook=torch.randn(G * K, 32 // G)).to(device).eval()
    dtype = autocast_dtype(args.precision)
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)  # noqa: E731
    labels, seeds = torch.randint(1000, (B,), device=device), torch.arange(B)
    name = f"{args.preset} head {args.head} batch {B} cfg {args.cfg_scale} {args.precision} {device}"
    codes = {}

    def gen(compiled: bool) -> None:
        with autocast():
            codes[compiled] = generate(model, labels, cfg_scale=args.cfg_scale, top_k=args.top_k, seeds=seeds,
                                       compile=compiled)

    modes = [False, True] if args.compile else [False]
    seconds = {}
    if args.steps:
        for compiled in modes:  # warm-up: the compiled one compiles its graphs here, reported on its own
            warm = _timed(lambda: gen(compiled), device)
            print(f"sample {name} {'compiled' if compiled else 'eager'}: warm-up {warm:.2f} s"
                  + (" (compiling its graphs)" if compiled else ""))
        runs = {compiled: [] for compiled in modes}
        for _ in range(args.steps):  # interleaved, so a shared machine's load falls on both alike
            for compiled in modes:
                runs[compiled].append(_timed(lambda: gen(compiled), device))
        for compiled, times in runs.items():
            seconds[compiled] = sum(times) / len(times)
            print(f"sample {name} {'compiled' if compiled else 'eager'}, {args.grid}x{args.grid} codes x G{G}: "
                  f"{seconds[compiled]:.2f} s/batch (best {min(times):.2f}), "
                  f"{B * config.seq_len / seconds[compiled]:,.1f} positions/s, {B / seconds[compiled]:.3f} images/s "
                  f"(codes only)")
        if args.tokenizer_preset:
            bench_decode(args, codes[False].view(B, args.grid, args.grid, G), min(seconds.values()), device)
    if args.step_repeats:
        with torch.no_grad(), autocast():
            bench_step(model, args, device, dtype)


def bench_decode(args: argparse.Namespace, grid_codes, sample_seconds: float, device) -> None:
    from tokenizer import MGVQ, MGVQConfig

    tok_name, _, groups = args.tokenizer_preset.rpartition("-g")
    tokenizer = MGVQ(MGVQConfig.preset(tok_name, int(groups))).to(device).eval()
    tokenizer.decode_codes(grid_codes)  # warm-up
    decode = _timed(lambda: tokenizer.decode_codes(grid_codes), device)
    B = grid_codes.shape[0]
    print(f"  + decode {tok_name} ({args.grid * tokenizer.config.downsample}px): {decode:.2f} s/batch, "
          f"{B / (sample_seconds + decode):.3f} images/s with decoding")


def _step_matmuls(model, rows: int, t: int, device, dtype) -> tuple[dict, list]:
    """The matmuls of a trunk step at position t alone, on preallocated inputs: {"matmuls": layer by layer, as the
    step runs them, the GEMMs of its weights (through the same packs where the step uses them) and its
    attention's two matmuls over the t+1 cached positions; "gemms", "unpacked gemms" (through F.linear) and
    "attention": each kind apart}, and the GEMMs as (input, weights, pack)."""
    import torch

    from gpt.layers import FeedForward
    from gpt.packed import packed_linear

    config = model.config
    H, hd = config.n_head, config.head_dim

    def gemm_of(m) -> tuple:
        """A GEMM of the step: an input, its module's weights and pack (a feed-forward's w1 and w3 share one)."""
        weights = [m.w1.weight, m.w3.weight] if isinstance(m, FeedForward) else [m.weight]
        return torch.randn(rows, weights[0].shape[1], device=device, dtype=dtype), weights, getattr(m, "packed", None)

    projector = [gemm_of(model.img_projector[0]), gemm_of(model.img_projector[2])]
    def step_gemms(module) -> list:
        """A module's weight GEMMs in the order it runs them (a feed-forward's w1 and w3 are one)."""
        out = []
        for child in module.children():
            if isinstance(child, FeedForward):
                out += [gemm_of(child), gemm_of(child.w2)]
            elif isinstance(child, torch.nn.Linear):
                out.append(gemm_of(child))
            else:
                out += step_gemms(child)
        return out

    layers = [step_gemms(layer) for layer in model.layers]
    caches = [(torch.randn(rows, H, config.seq_len, hd, device=device, dtype=dtype),
               torch.randn(rows, H, config.seq_len, hd, device=device, dtype=dtype)) for _ in range(config.n_layer)]
    q = torch.randn(rows, H, 1, hd, device=device, dtype=dtype)
    scores = torch.empty(rows, H, 1, t + 1, device=device, dtype=dtype)
    attended = torch.empty(rows, H, 1, hd, device=device, dtype=dtype)

    def gemms(work: list, packed: bool = True) -> None:
        for x, weights, pack in work:
            if packed and pack is not None:
                packed_linear(x, pack, None)
            else:
                for weight in weights:
                    torch.nn.functional.linear(x, weight)

    def attention(k_cache, v_cache) -> None:
        torch.matmul(q, k_cache[:, :, :t + 1].transpose(-1, -2), out=scores)
        torch.matmul(scores, v_cache[:, :, :t + 1], out=attended)

    def matmuls() -> None:
        gemms(projector)
        for work, cache in zip(layers, caches):
            gemms(work[:1])  # qkv, then attention over the cache, then the rest
            attention(*cache)
            gemms(work[1:])

    all_gemms = projector + [g for work in layers for g in work]
    return {"matmuls": matmuls, "gemms": lambda: gemms(all_gemms), "unpacked gemms": lambda: gemms(all_gemms, False),
            "attention": lambda: [attention(*cache) for cache in caches]}, all_gemms


def bench_step(model, args: argparse.Namespace, device, dtype) -> None:
    """One trunk step at the middle of the sequence against its own matmuls alone (`_step_matmuls`). Interleaved,
    each timed right after an untimed call of its own (as a step follows a step), the fastest of each: on a
    shared machine the minimum is what the code itself costs."""
    import torch

    from sampling import decoding
    from sampling.generate import compile_step, unguarded

    config = model.config
    t = config.seq_len // 2
    rows = args.batch_size * (2 if args.cfg_scale != 1.0 else 1)  # the GPT runs both CFG halves
    mm_dtype = dtype or torch.float32
    decoding.attach(model, rows)  # as generate() does: KV caches and, on a CPU, the packs
    reference, all_gemms = _step_matmuls(model, rows, t, device, mm_dtype)
    prev = torch.randint(config.codes_per_group, (rows, config.codebook_groups), device=device)
    cuda = device.type == "cuda"
    position = torch.tensor([t], device=device) if cuda else t  # CUDA graphs need a tensor position
    fns = {"eager step": lambda: model.decode_step(prev, t), **reference}
    if args.compile:
        compiled = compile_step(model.decode_step, device.type)  # as generate(compile=True) compiles its step
        fns["compiled step"] = lambda: compiled(prev, position)
    model.prefill(torch.randint(1000, (rows,), device=device))
    for fn in fns.values():
        fn()  # warm-up (and compile)
    graph = unguarded(compiled, (prev, position), {}) if args.compile and not cuda else None
    if graph is not None:  # as generate() runs a guidance phase's later positions on a CPU
        fns["compiled step, guards checked"] = fns["compiled step"]
        fns["compiled step"] = lambda: graph(prev, position)
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(args.step_repeats):
        for key, fn in fns.items():
            fn()  # each timed right after a call of its own: the caches hold what it read, not what the last one did
            best[key] = min(best[key], _timed(fn, device))
    packed = next((pack for _, _, pack in all_gemms if pack is not None), None)
    packed = '' if packed is None else f" (packed, {'bf16' if packed.dtype == torch.bfloat16 else 'fp32'} oneDNN)"
    decoding.detach(model)
    weight_bytes = sum(w.numel() for _, weights, _ in all_gemms for w in weights) * torch.finfo(mm_dtype).bits // 8
    ms = {key: f"{seconds * 1e3:.2f} ms" for key, seconds in best.items()}
    print(f"{args.preset} {args.precision} {device}: trunk step at t={t}, {rows} rows: its matmuls alone "
          f"{ms['matmuls']}, layer by layer (apart: weight GEMMs{packed} {ms['gemms']}, "
          f"{weight_bytes / best['gemms'] / 1e9:.1f} GB/s of weights; attention over t+1 {ms['attention']}); "
          f"the same GEMMs through F.linear {ms['unpacked gemms']}")
    for key in ("eager step", "compiled step", "compiled step, guards checked"):
        if key in best:
            print(f"  {key} {ms[key]}: ratio {best[key] / best['matmuls']:.2f}")


def add_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="gpt_b", help="gpt_b, gpt_l, gpt_xl, gpt_xxl, gpt_3b, tiny")
    p.add_argument("--head", choices=["parallel", "ar"], default="ar")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (x2 rows with CFG)")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="1.0: no CFG (half the rows)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="autocast dtype")
    p.add_argument("--grid", type=int, default=16, help="code grid side (16 for 256px, 24 for 384px at f16)")
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--codes-per-group", type=int, default=8192, help="MGVQ-G4: 32768 codes = 4 x 8192")
    p.add_argument("--tokenizer-preset", default="mgvq-f16c32-g4", help="decoder to time ('' skips decoding)")
    p.add_argument("--steps", type=int, default=1, help="timed generations after one warm-up (0: decode step only)")
    p.add_argument("--step-repeats", type=int, default=20, help="timed decode steps (0: none)")
    p.add_argument("--compile", action="store_true", help="also time generate(compile=True), interleaved with eager")


def write_synthetic_store(root, images: int, views: int, grid: int, groups: int, chunk: int = 2000):
    """A code store of random codes with the layout extraction writes (StoreWriter), `images` x `views` records."""
    import numpy as np
    from tqdm import tqdm

    from tokenizer.store import StoreWriter

    spec = {"tokenizer": {"synthetic": True}, "tokenizer_sha256": "0" * 64, "image_size": grid * 16,
            "views": "synthetic", "num_views": views, "groups": groups, "codes_per_group": 8192,
            "grid": [grid, grid], "num_images": images, "num_classes": 1000,
            "class_names": [str(i) for i in range(1000)], "files_fingerprint": f"synthetic-{images}"}
    writer = StoreWriter(root, spec)
    rng = np.random.default_rng(0)
    writer.create(rng.integers(1000, size=images))
    writer.open()
    for start in tqdm(range(0, images, chunk), desc="writing synthetic store", unit="chunk"):
        idx = np.arange(start, min(start + chunk, images))
        codes = rng.integers(8192, size=(len(idx), views, grid, grid, groups), dtype=np.uint16)
        writer.write(idx, codes, np.zeros(len(idx), bool))
    writer.finalize([f"{i}.JPEG" for i in range(images)])
    writer.close()
    return root


def drop_page_cache(path) -> None:
    """Evict `path` (and only it: the machine may be shared) from the page cache: sync, then POSIX_FADV_DONTNEED."""
    import os

    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bench_data(args: argparse.Namespace) -> None:
    """Batches/s of the training loader over a synthetic store of realistic size, cold and warm page cache.

    `per-item` is the old path (one memmap read per sample, default kernel readahead); `batched` is
    CodeDataset.__getitems__ (MADV_RANDOM, MADV_WILLNEED on the batch's pages, one sorted pass). Cold: the
    store's pages are evicted first; warm: the same batches again, now cached.
    """
    import mmap
    import shutil
    import tempfile
    import time
    from pathlib import Path

    from torch.utils.data import DataLoader

    from gpt.data import CodeDataset
    from tokenizer.common.runs import GlobalBatchSampler

    class PerItem(CodeDataset):
        __getitems__ = None  # the DataLoader then calls __getitem__ per sample

        def _open(self, codes) -> None:
            super()._open(codes)
            if self._map is not None:
                self._map.madvise(mmap.MADV_NORMAL)

    tmp = Path(tempfile.mkdtemp(prefix="bench_data_", dir=args.dir))
    try:
        root = write_synthetic_store(tmp / "codes", args.images, args.views, args.grid, args.groups)
        size = (root / "codes.npy").stat().st_size
        print(f"store {args.images} images x {args.views} views x {args.grid}x{args.grid} x G{args.groups}: "
              f"{size / 2**30:.2f} GiB; per-rank batch {args.batch_size} (rank 0 of {args.ranks}), "
              f"{args.workers} workers, prefetch {args.prefetch}")
        for cls, name in ((PerItem, "per-item"), (CodeDataset, "batched")):
            dataset = cls(root, seed=0)
            sampler = GlobalBatchSampler(dataset.epoch_plan, len(dataset), args.batch_size * args.ranks, rank=0,
                                         world_size=args.ranks)
            for cache in ("cold", "warm"):
                if cache == "cold":
                    drop_page_cache(root / "codes.npy")
                loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers,
                                    prefetch_factor=args.prefetch if args.workers else None)
                batches = iter(loader)
                start = time.perf_counter()
                for _ in range(args.batches):
                    next(batches)
                seconds = time.perf_counter() - start
                del batches
                print(f"  {name:8s} {cache}: {args.batches / seconds:8.1f} batches/s, "
                      f"{args.batches * args.batch_size / seconds:10,.0f} samples/s")
    finally:
        shutil.rmtree(tmp)


def bench_store(args: argparse.Namespace) -> None:
    """Write a synthetic code store (random codes) to --out, e.g. for a training run that checks a machine."""
    root = write_synthetic_store(args.out, args.images, args.views, args.grid, args.groups)
    print(f"synthetic code store: {root}")


def add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--groups", type=int, default=4)


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=50000, help="50000 x 20 views at 16x16 x G4 is 2 GB")
    p.add_argument("--views", type=int, default=20, help="ten-crop + flip")
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32, help="per rank (global 256 on 8 GPUs)")
    p.add_argument("--ranks", type=int, default=8, help="the global batch is batch-size x ranks; rank 0 is read")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--prefetch", type=int, default=4, help="batches each worker reads ahead")
    p.add_argument("--batches", type=int, default=300, help="timed batches per measurement")
    p.add_argument("--dir", default=None, help="where the temporary store goes (default: the system temp dir)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    for name, add_args, fn in [
        ("extract", add_extract_args, bench_extract),
        ("train", add_train_args, bench_train),
        ("sample", add_sample_args, bench_sample),
        ("data", add_data_args, bench_data),
        ("store", add_store_args, bench_store),
    ]:
        p = sub.add_parser(name)
        p.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
        p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
        add_args(p)
        p.set_defaults(fn=fn)
    args = parser.parse_args()
    if args.threads:
        __import__("torch").set_num_threads(args.threads)
    args.fn(args)


if __name__ == "__main__":
    main()
