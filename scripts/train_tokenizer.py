"""Train an MGVQ tokenizer on an ImageFolder, on one or many processes.

    accelerate launch scripts/train_tokenizer.py data.root=imagenet/train out_dir=runs/mgvq tokenizer=mgvq-f16c32-g4

Every key of tokenizer.train.TrainTokenizerConfig can be set as KEY=VALUE (see conf/train_tokenizer.yaml). The
result, <out_dir>/export/tokenizer.pt, loads with `tokenizer.load_tokenizer(path)`.
"""
import _hydra

from tokenizer.train import TrainTokenizerConfig, train

if __name__ == "__main__":
    _hydra.main("train_tokenizer", TrainTokenizerConfig, train)
