"""A PNG grid of class-conditional samples, optionally with each sample's coarse-to-fine strip.

    python scripts/demo_gen.py gpt_ckpt=runs/gpt_b/export/model.pt tokenizer=mgvq-f16c32-g4 \
        tokenizer.checkpoint=mgvq_f16c32_g4.pt sampler.cfg_scale=4.0 out=demo.png
    python scripts/demo_gen.py ... class_ids=[207,360] coarse_to_fine=true   # one row per sample: 1..G groups

Every key of sampling.demo.DemoConfig can be set as KEY=VALUE (see conf/demo_gen.yaml); the sampler's settings
are sampler.* (conf/sampler/default.yaml).
"""
import _hydra

from sampling.demo import DemoConfig, demo

if __name__ == "__main__":
    _hydra.main("demo_gen", DemoConfig, demo)
