"""Sample N class-conditional images to PNGs and one ADM-format .npz, on as many processes as launched.

    accelerate launch scripts/sample_c2i_ddp.py gpt_ckpt=runs/gpt_b/export/model.pt \
        tokenizer=mgvq-f16c32-g4 tokenizer.checkpoint=mgvq_f16c32_g4.pt sampler.cfg_scale=2.0 out_dir=samples/gpt_b
    torchrun --nproc_per_node 8 scripts/sample_c2i_ddp.py ...   # the same
    accelerate launch scripts/sample_c2i_ddp.py zoo=llamagen-l-384 ckpt_dir=/ckpt out_dir=samples/llamagen_l_384

Sample i has label i mod num_classes and its own random stream, so the .npz is the same for any number of
processes; rerunning the same command after a kill keeps the finished PNGs. Every key of
sampling.sampler.SampleRunConfig can be set as KEY=VALUE (see conf/sample.yaml; the sampler's settings are
sampler.*, conf/sampler/default.yaml). `zoo=<name>` (sampling.zoo) takes a released model's official files from
ckpt_dir and its published settings; KEY=VALUE still overrides any of them, and the sidecar records which.
"""
import _hydra

from sampling.sampler import SampleRunConfig
from sampling.zoo import sample_run

if __name__ == "__main__":
    _hydra.main("sample", SampleRunConfig, sample_run)
