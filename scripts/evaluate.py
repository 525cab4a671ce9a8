"""Score a sample .npz (or image folder) against a reference with torch-fidelity: gFID, IS, precision, recall.

    python scripts/evaluate.py samples=samples/gpt_b_cfg2.0.npz \
        reference=data/VIRTUAL_imagenet256_labeled.npz inception_weights=weights/weights-inception-2015-12-05-6726825d.pth

Every key of sampling.metrics.EvalConfig can be set as KEY=VALUE (see conf/evaluate.yaml). The metrics and
every setting go to <samples>.metrics.json (or out=...). Samples of a zoo model (sample_c2i_ddp.py zoo=...) are
printed beside the model's published numbers, which the JSON also carries (`published`).
"""
import json

import _hydra

from sampling.metrics import EvalConfig, run
from sampling.zoo import comparison


def report(result: dict) -> None:
    print(json.dumps(result["metrics"], indent=2))
    if "published" in result:  # a zoo model's samples
        print(f"{result['sampling']['zoo']['name']}: measured here beside the published numbers")
        print("\n".join(comparison(result["metrics"], result["published"], result["settings"]["num_samples"])))
    print(f"wrote {result['settings']['out']}")


if __name__ == "__main__":
    _hydra.main("evaluate", EvalConfig, run, report)
