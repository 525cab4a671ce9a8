"""Training data over a code store: one augmented view per image per epoch, sharded by global batch.

The order of images and the view drawn for each are functions of (seed, epoch) only, and every optimizer
step consumes one global batch, split first into `grad_accum` micro-steps and then across ranks. So the
samples behind a step do not depend on the number of processes, and the data position is just the step.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

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


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """This rank's micro-batches of (image, view) keys, endlessly, from optimizer step `start_step` on.

    Step s of epoch e = s // steps_per_epoch takes the next `global_batch_size` images of that epoch's order
    (the tail that does not fill a global batch is left out); micro-step a of it is the slice
    [a * world * micro, (a + 1) * world * micro), of which rank r takes the r-th `micro` images.
    """

    def __init__(self, dataset: CodeDataset, global_batch_size: int, grad_accum: int = 1, rank: int = 0,
                 world_size: int = 1, start_step: int = 0):
        if global_batch_size % (world_size * grad_accum):
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                             f"num_processes * grad_accum = {world_size} * {grad_accum}")
        self.steps_per_epoch = len(dataset) // global_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"global_batch_size={global_batch_size} exceeds the {len(dataset)} usable images "
                             f"of {dataset.codes_dir}")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.grad_accum = grad_accum
        self.rank = rank
        self.world_size = world_size
        self.micro_batch_size = global_batch_size // (world_size * grad_accum)
        self.start_step = start_step

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, global batch within the epoch) that optimizer step `step` (0-based) consumes."""
        return divmod(step, self.steps_per_epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step, plan_epoch = self.start_step, None
        while True:
            epoch, batch = self.position(step)
            if epoch != plan_epoch:
                order, views = self.dataset.epoch_plan(epoch)
                plan_epoch = epoch
            images = order[batch * self.global_batch_size:(batch + 1) * self.global_batch_size]
            for chunk in images.reshape(self.grad_accum, self.world_size, self.micro_batch_size):
                yield [(int(i), int(views[i])) for i in chunk[self.rank]]
            step += 1
