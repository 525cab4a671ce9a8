"""Throughput benchmarks; they print figures and assert nothing.

    python scripts/bench.py extract --preset mgvq-f16c32-g4 --image-size 256 --batch-size 32
    python scripts/bench.py train --preset gpt_b --batch-size 8
    python scripts/bench.py sample --preset gpt_b --batch-size 32 --cfg-scale 2.0
"""
import argparse


def bench_extract(args: argparse.Namespace) -> None:
    raise NotImplementedError("bench extract: not written yet")


def add_extract_args(p: argparse.ArgumentParser) -> None:
    pass


def bench_train(args: argparse.Namespace) -> None:
    raise NotImplementedError("bench train: not written yet")


def add_train_args(p: argparse.ArgumentParser) -> None:
    pass


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
