"""Train a class-conditional GPT on a code store.

    accelerate launch scripts/train_gpt.py data.codes_dir=codes/imagenet384 tokenizer.checkpoint=mgvq.pt \
        out_dir=runs/gpt_b model=gpt_b epochs=300

Every key of gpt.train.TrainConfig can be set as KEY=VALUE (see conf/train_gpt.yaml).
"""
import _hydra

from gpt.train import TrainConfig, train

if __name__ == "__main__":
    _hydra.main("train_gpt", TrainConfig, train)
