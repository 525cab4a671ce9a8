"""Throughput benchmarks; they print figures and assert nothing.

    python scripts/bench.py extract --preset mgvq-f16c32-g4 --image-size 256 --batch-size 32
    python scripts/bench.py train --preset gpt_b --batch-size 8
    python scripts/bench.py sample --preset gpt_b --batch-size 32 --cfg-scale 2.0
"""
import argparse


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
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]

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


def bench_train(args: argparse.Namespace) -> None:
    """Optimizer steps of a GPT preset on random codes: forward, cross-entropy, backward, clip, fused AdamW."""
    import time

    import torch

    from gpt import GPT, GPTConfig
    from gpt.train import cross_entropy_per_group, make_optimizer

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = GPTConfig.preset(args.preset, codebook_groups=args.groups, codebook_size=args.codes_per_group,
                              grid_size=args.grid, num_classes=1000, codebook_embed_dim=32, head=args.head)
    codebook = torch.randn(args.groups * args.codes_per_group, 32 // args.groups)
    model = GPT(config, codebook=codebook).to(device).train()
    optimizer = make_optimizer(model, 1e-4, 0.05, (0.9, 0.95), fused=device.type == "cuda")
    step_fn = torch.compile(model) if args.compile else model
    L = args.grid * args.grid
    codes = torch.randint(args.codes_per_group, (args.batch_size, L, args.groups), device=device)
    labels = torch.randint(1000, (args.batch_size,), device=device)
    dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
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
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    params = sum(p.numel() for p in model.parameters())
    print(f"train {args.preset} ({params / 1e6:.1f}M params, head {args.head}) batch {args.batch_size} x {L} tokens "
          f"x G{args.groups}, {args.precision}, compile={args.compile}, {device}: {seconds * 1e3:.1f} ms/step, "
          f"{args.batch_size * L / seconds:,.0f} tokens/s")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="gpt_b", help="gpt_b, gpt_l, gpt_xl, gpt_xxl, gpt_3b, tiny")
    p.add_argument("--batch-size", type=int, default=8, help="per device")
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], default="bf16")
    p.add_argument("--grid", type=int, default=16, help="code grid side (16 for 256px, 24 for 384px at f16)")
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--codes-per-group", type=int, default=8192, help="MGVQ-G4: 32768 codes = 4 x 8192")
    p.add_argument("--head", choices=["parallel", "ar"], default="ar")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)


def bench_sample(args: argparse.Namespace) -> None:
    raise NotImplementedError("bench sample: not written yet")


def add_sample_args(p: argparse.ArgumentParser) -> None:
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    for name, add_args, fn in [
        ("extract", add_extract_args, bench_extract),
        ("train", add_train_args, bench_train),
        ("sample", add_sample_args, bench_sample),
    ]:
        p = sub.add_parser(name)
        p.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
        add_args(p)
        p.set_defaults(fn=fn)
    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
