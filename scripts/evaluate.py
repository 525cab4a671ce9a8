"""Score a sample .npz (or image folder) against a reference with torch-fidelity: gFID, IS, precision, recall.

    python scripts/evaluate.py samples=samples/gpt_b_cfg2.0.npz \
        reference=data/VIRTUAL_imagenet256_labeled.npz inception_weights=weights/weights-inception-2015-12-05-6726825d.pth

Every key of sampling.metrics.EvalConfig can be set as KEY=VALUE (see conf/evaluate.yaml). The metrics and
every setting go to <samples>.metrics.json (or out=...).
"""
import json

import _hydra

from sampling.metrics import EvalConfig, run


def report(result: dict) -> None:
    print(json.dumps(result["metrics"], indent=2))
    print(f"wrote {result['settings']['out']}")


if __name__ == "__main__":
    _hydra.main("evaluate", EvalConfig, run, report)
