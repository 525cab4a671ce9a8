"""Export scikit-learn's bundled handwritten digits as an ImageFolder with a held-out split (no download).

    python scripts/make_digits.py --out data/digits --size 16

Writes <out>/train/<digit>/<index>.png and <out>/val/<digit>/<index>.png: the 1,797 8x8 digits (17 grey
levels), upscaled bicubically to size x size, as RGB PNGs. The split is stratified and fixed by --seed, so
every run writes the same files; `index` is the digit's position in `load_digits()`.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image


def digit_images(size: int) -> tuple[np.ndarray, np.ndarray]:
    """All digits as uint8 (N, size, size) grey images (ink bright on black, as in the source) and labels (N,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.round(digits.images * (255 / 16)).astype(np.uint8)  # values 0..16 -> 0..255
    big = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in small])
    return big, digits.target.astype(np.int64)


def split(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean (N,) mask of the held-out images: the same fraction of every class, chosen by `seed`."""
    rng = np.random.default_rng(seed)
    held_out = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        held_out[idx[: round(len(idx) * val_fraction)]] = True
    return held_out


def export(out: str | Path, size: int = 16, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write the ImageFolder (skipped when a complete one with the same settings exists); returns its manifest."""
    out = Path(out)
    manifest = {"size": size, "val_fraction": val_fraction, "seed": seed}
    done = out / "manifest.json"
    if done.is_file() and {k: v for k, v in json.loads(done.read_text()).items() if k in manifest} == manifest:
        return json.loads(done.read_text())
    images, labels = digit_images(size)
    held_out = split(labels, val_fraction, seed)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = out / ("val" if held_out[i] else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).convert("RGB").save(folder / f"{i:04d}.png")
    manifest.update(train=int((~held_out).sum()), val=int(held_out.sum()), classes=[str(c) for c in range(10)])
    tmp = done.with_name(done.name + ".tmp")  # written last: its presence means the export is complete
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, done)
    return manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/digits")
    p.add_argument("--size", type=int, default=16, help="image side in pixels (the digits are 8x8)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    m = export(args.out, args.size, args.val_fraction, args.seed)
    print(f"digits: {m['train']} train / {m['val']} held-out images of {m['size']}x{m['size']} in {args.out}")


if __name__ == "__main__":
    main()
