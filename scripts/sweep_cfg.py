"""Sweep classifier-free guidance (and optionally top-k): sample K images per setting, score each, plot.

    python scripts/sweep_cfg.py gpt_ckpt=runs/gpt_b/export/model.pt tokenizer=mgvq-f16c32-g4 \
        tokenizer.checkpoint=mgvq_f16c32_g4.pt out_dir=runs/sweep_gpt_b cfg_scales=[1.5,1.75,2.0,2.25] \
        top_ks=[0,4096] num_samples=10000 evaluate.reference=data/VIRTUAL_imagenet256_labeled.npz
    accelerate launch scripts/sweep_cfg.py ...   # samples on every process, scores on the main one

Every key of sampling.sweep.SweepConfig can be set as KEY=VALUE (see conf/sweep_cfg.yaml); the sampler's
settings are sampler.* (conf/sampler/default.yaml). The outputs are described in sampling/sweep.py.
"""
import _hydra

from sampling.sweep import SweepConfig, report, run

if __name__ == "__main__":
    _hydra.main("sweep_cfg", SweepConfig, run, report)
