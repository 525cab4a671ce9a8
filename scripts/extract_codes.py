"""Encode an ImageFolder into a memory-mapped code store with a frozen tokenizer of any family.

    accelerate launch scripts/extract_codes.py data.root=imagenet/train data.image_size=256 data.views=tencrop \
        tokenizer=mgvq-f16c32-g4 tokenizer.checkpoint=mgvq_f16c32_g4.pt out_dir=codes/imagenet256

Rerunning the same command resumes; other settings into the same out_dir are refused. Every key of
tokenizer.extract.ExtractConfig can be set as KEY=VALUE (see conf/extract_codes.yaml).
"""
import _hydra

from tokenizer.extract import ExtractConfig, extract

if __name__ == "__main__":
    _hydra.main("extract_codes", ExtractConfig, extract)
