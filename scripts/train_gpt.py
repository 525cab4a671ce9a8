"""Train a class-conditional GPT on an MGVQ code store.

    accelerate launch scripts/train_gpt.py data.codes_dir=codes/imagenet384 tokenizer.checkpoint=mgvq.pt \
        out_dir=runs/gpt_b model=gpt_b epochs=300

Every key of gpt.train.TrainConfig can be set as KEY=VALUE (see conf/train_gpt.yaml).
"""
import hydra
from omegaconf import DictConfig, OmegaConf

from gpt.train import TrainConfig, train


@hydra.main(version_base=None, config_path="../conf", config_name="train_gpt")
def main(cfg: DictConfig) -> None:
    # Merge onto the dataclass schema: unknown keys and wrong types fail here, before any work.
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
    train(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()
