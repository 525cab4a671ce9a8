"""Score the digits quickstart: a sample grid, conditional accuracy, tokenizer PSNR and codebook usage -> a table
and summary.json (which names the tokenizer family).

    python scripts/quickstart_eval.py --digits runs/quickstart/digits --samples runs/quickstart/samples/samples.npz \
        --recon runs/quickstart/recon.json --out runs/quickstart --start <unix time the run began>

Conditional accuracy: an RBF SVM trained on the real training digits (each image box-averaged back to the
digits' native 8x8) classifies every sample; the score is the fraction classified as the class it was drawn
for (chance 0.10). The same classifier's accuracy on the held-out real digits is reported beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from tokenizer.data import list_images

NATIVE = 8  # sklearn's digits are 8x8


def features(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, 64) grey levels in [0, 1] at the native 8x8 (box average)."""
    grey = [Image.fromarray(im).convert("L").resize((NATIVE, NATIVE), Image.BOX) for im in images]
    return np.stack([np.asarray(g, dtype=np.float32).ravel() / 255 for g in grey])


def load_folder(root: Path) -> tuple[np.ndarray, np.ndarray]:
    files, labels, classes = list_images(root)
    images = np.stack([np.asarray(Image.open(root / f).convert("RGB")) for f in tqdm(files, desc=f"read {root.name}",
                                                                                    unit="img", leave=False)])
    return images, np.array([int(classes[y]) for y in labels])


def grid(images: np.ndarray, labels: np.ndarray, per_class: int = 10, zoom: int = 4, pad: int = 2) -> Image.Image:
    """One row per class (0..9 top to bottom): its first `per_class` samples, zoomed for viewing."""
    classes = np.unique(labels)
    h, w = images.shape[1:3]
    cell_h, cell_w = h * zoom + pad, w * zoom + pad
    canvas = np.full((len(classes) * cell_h + pad, per_class * cell_w + pad, 3), 64, dtype=np.uint8)
    for r, c in enumerate(classes):
        for j, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
            big = images[i].repeat(zoom, axis=0).repeat(zoom, axis=1)
            canvas[pad + r * cell_h: pad + r * cell_h + h * zoom, pad + j * cell_w: pad + j * cell_w + w * zoom] = big
    return Image.fromarray(canvas)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--digits", required=True, help="make_digits.py output (train/ and val/ ImageFolders)")
    p.add_argument("--samples", required=True, help="samples.npz of sample_c2i_ddp.py (arr_0, labels)")
    p.add_argument("--recon", required=True, help="eval_recon.py JSON of the tokenizer on the held-out digits")
    p.add_argument("--recon-merged", default=None, help="MergeVQ: eval_recon.py JSON at a merged K")
    p.add_argument("--out", required=True, help="directory for grid.png and summary.json")
    p.add_argument("--start", type=float, default=None, help="unix time the pipeline began (for `seconds`)")
    args = p.parse_args()
    from sklearn.svm import SVC

    digits, out = Path(args.digits), Path(args.out)
    for path in (digits / "train", digits / "val", Path(args.samples), Path(args.recon)):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run the earlier quickstart stages first")
    train_x, train_y = load_folder(digits / "train")
    val_x, val_y = load_folder(digits / "val")
    with np.load(args.samples) as f:
        samples, sample_y = f["arr_0"], f["labels"]

    clf = SVC(gamma="scale").fit(features(train_x), train_y)
    real_acc = float((clf.predict(features(val_x)) == val_y).mean())
    pred = clf.predict(features(samples))
    cond_acc = float((pred == sample_y).mean())
    per_class = {str(c): float((pred[sample_y == c] == c).mean()) for c in np.unique(sample_y)}
    recon = json.loads(Path(args.recon).read_text())

    out.mkdir(parents=True, exist_ok=True)
    grid(samples, sample_y).save(out / "grid.png")
    summary = {
        "tokenizer_family": recon.get("tokenizer_family", "mgvq"),
        "conditional_accuracy": cond_acc,
        "classifier_accuracy_real": real_acc,
        "tokenizer_psnr": recon["psnr"],
        "codebook_usage": recon.get("codebook_used"),  # per group (sub-token): share of its codes used, held-out
        "codes_per_group": recon.get("codes_per_group"),
        "seconds": time.time() - args.start if args.start else None,
        "num_samples": int(len(samples)),
        "per_class_accuracy": per_class,
        "tokenizer_ssim": recon.get("ssim"),
        "grid": str(out / "grid.png"),
    }
    if args.recon_merged:  # MergeVQ: PSNR with all tokens (tokenizer_psnr) and with K merged tokens
        merged = json.loads(Path(args.recon_merged).read_text())
        summary.update(tokens=recon.get("merged_tokens"), merged_tokens=merged["merged_tokens"],
                       tokenizer_psnr_merged=merged["psnr"])
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "summary.json")

    rows = [("conditional accuracy (samples, chance 0.10)", f"{cond_acc:.3f}"),
            ("classifier accuracy (held-out real digits)", f"{real_acc:.3f}"),
            (f"tokenizer PSNR (held-out, {recon['num_images']} images)", f"{recon['psnr']:.2f} dB"),
            *([(f"tokenizer PSNR at K = {summary['merged_tokens']} merged tokens of {summary['tokens']}",
                 f"{summary['tokenizer_psnr_merged']:.2f} dB")] if args.recon_merged else []),
            (f"{summary['tokenizer_family']} codebook usage per group (held-out)",
             " ".join(f"{u:.3f}" for u in summary["codebook_usage"] or [])),
            ("samples", f"{len(samples)}"),
            ("wall time", f"{summary['seconds']:.0f} s" if summary["seconds"] else "-")]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
    print(f"\n  grid: {out / 'grid.png'} (one row per class, 0 at the top)\n  summary: {out / 'summary.json'}")


if __name__ == "__main__":
    main()
