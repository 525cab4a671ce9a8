"""Score a sample .npz (or image folder) against a reference with torch-fidelity: gFID, IS, precision, recall.

    python scripts/evaluate.py samples=samples/gpt_b_cfg2.0.npz \
        reference=data/VIRTUAL_imagenet256_labeled.npz inception_weights=weights/weights-inception-2015-12-05-6726825d.pth

Every key of sampling.metrics.EvalConfig can be set as KEY=VALUE (see conf/evaluate.yaml). The metrics and
every setting go to <samples>.metrics.json (or out=...).
"""
import json

import hydra
from omegaconf import DictConfig, OmegaConf

from sampling.metrics import EvalConfig, run


@hydra.main(version_base=None, config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    # Merge onto the dataclass schema: unknown keys and wrong types fail here, before any work.
    cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), cfg)
    result = run(OmegaConf.to_object(cfg))
    print(json.dumps(result["metrics"], indent=2))
    print(f"wrote {result['settings']['out']}")


if __name__ == "__main__":
    main()
