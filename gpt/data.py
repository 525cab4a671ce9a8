"""Training data over a code store: one augmented view per image per epoch.

The order of images and the view drawn for each are functions of (seed, epoch) only (`epoch_plan`); the shared
`tokenizer.common.runs.GlobalBatchSampler` turns the plan into per-rank micro-batches, so the samples behind a
step do not depend on the number of processes, and the data position is just the step.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from tokenizer.store import CodeStore


class CodeDataset(Dataset):
    """Codes (L, G) int64 in raster order and the label of one (image, view) pair, read memory-mapped."""

    def __init__(self, codes_dir: str | Path, seed: int = 0, augment: bool = True):
        self.codes_dir = Path(codes_dir)
        self.seed = seed
        self.augment = augment
        store = CodeStore(self.codes_dir)
        self.meta = store.meta
        self.fingerprint = store.fingerprint
        self._codes = store.codes  # (N, A, h, w, G) uint16 memmap
        self.num_images, self.num_views, h, w, self.groups = self._codes.shape
        self.grid = (h, w)
        self.labels = np.asarray(store.labels, dtype=np.int64)
        if self.labels.shape != (self.num_images,):
            raise ValueError(f"{self.codes_dir}: labels.npy has shape {self.labels.shape}, codes.npy holds {self.num_images} images")
        self.usable = np.flatnonzero(self.labels >= 0)  # label -1 marks images to leave out
        if len(self.usable) == 0:
            raise ValueError(f"{self.codes_dir}: no image has a label >= 0")

    def __len__(self) -> int:
        return len(self.usable)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, view = key
        codes = torch.from_numpy(self._codes[index, view].astype(np.int64))  # (h, w, G)
        return codes.view(-1, self.groups), torch.tensor(self.labels[index])  # (L, G), ()

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's image order (usable indices) and the view of every image, from (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.usable)
        if self.augment:
            views = rng.integers(self.num_views, size=self.num_images)
        else:
            views = np.zeros(self.num_images, dtype=np.int64)  # view 0 is the plain center crop
        return order, views

    # The memmap is not sent to DataLoader workers (pickling would copy the whole array): each reopens it.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_codes"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._codes = CodeStore(self.codes_dir).codes
