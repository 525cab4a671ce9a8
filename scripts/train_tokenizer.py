"""Train an MGVQ tokenizer on an ImageFolder, on one or many processes.

    accelerate launch scripts/train_tokenizer.py data.root=imagenet/train out_dir=runs/mgvq tokenizer=mgvq-f16c32-g4

Every key of tokenizer.train.TrainTokenizerConfig can be set as KEY=VALUE (see conf/train_tokenizer.yaml). The
result, <out_dir>/export/tokenizer.pt, loads with `tokenizer.load_tokenizer(path)`.
"""
import hydra
from omegaconf import DictConfig, OmegaConf

from tokenizer.train import TrainTokenizerConfig, train


@hydra.main(version_base=None, config_path="../conf", config_name="train_tokenizer")
def main(cfg: DictConfig) -> None:
    # Merge onto the dataclass schema: unknown keys and wrong types fail here, before any work.
    cfg = OmegaConf.merge(OmegaConf.structured(TrainTokenizerConfig), cfg)
    train(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()
