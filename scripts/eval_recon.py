"""Reconstruction PSNR, SSIM and per-group codebook usage of an MGVQ tokenizer over an ImageFolder.

    python scripts/eval_recon.py data.root=imagenet/val data.image_size=256 tokenizer=mgvq-f16c32-g4 \
        tokenizer.checkpoint=mgvq_f16c32_g4.pt out=runs/recon.json

Every key of tokenizer.recon.ReconConfig can be set as KEY=VALUE (see conf/eval_recon.yaml).
"""
import json

import _hydra

from tokenizer.recon import ReconConfig, eval_recon


def report(result: dict) -> None:
    print(json.dumps({k: result[k] for k in ("num_images", "psnr", "ssim", "codebook_used", "codebook_perplexity")}))


if __name__ == "__main__":
    _hydra.main("eval_recon", ReconConfig, eval_recon, report)
