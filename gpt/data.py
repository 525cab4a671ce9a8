"""Training data over a code store: one augmented view per image per epoch.

The order of images and the view drawn for each are functions of (seed, epoch) only (`epoch_plan`); the shared
`tokenizer.common.runs.GlobalBatchSampler` turns the plan into per-rank micro-batches, so the samples behind a
step do not depend on the number of processes, and the data position is just the step.
"""
from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from tokenizer.store import CodeStore


class CodeDataset(Dataset):
    """Codes (L, G) int64 in raster order and the label of one (image, view) pair, read memory-mapped.

    The store is far larger than memory at ImageNet scale (52.5 GB at 256px G4 with 20 views) and is read at
    random, one record of h*w*G*2 bytes (2 KB at 256px G4) per sample. So the memmap is advised MADV_RANDOM (no
    kernel readahead of 128 KB around every 2 KB record), and a batch is read by `__getitems__` in one pass in
    file order, after MADV_WILLNEED on each record's pages, which lets the kernel fetch them all concurrently
    instead of one page fault at a time: what keeps a cold page cache on network storage from stalling.
    """

    def __init__(self, codes_dir: str | Path, seed: int = 0, augment: bool = True):
        self.codes_dir = Path(codes_dir)
        self.seed = seed
        self.augment = augment
        store = CodeStore(self.codes_dir)
        self.meta = store.meta
        self.fingerprint = store.fingerprint
        self._open(store.codes)
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

    def _open(self, codes: np.memmap) -> None:
        """Keep the (N, A, h, w, G) uint16 memmap and advise its mapping for random access."""
        self._codes = codes
        self._map = getattr(codes, "_mmap", None)  # numpy's mmap.mmap (None for an empty file)
        self._record_bytes = codes[0, 0].nbytes if codes.size else 0
        # The mapping starts at the allocation boundary below the array's offset in the file (the .npy header).
        self._data_start = codes.offset % mmap.ALLOCATIONGRANULARITY
        if self._map is not None and hasattr(mmap, "MADV_RANDOM"):  # Linux, macOS
            self._map.madvise(mmap.MADV_RANDOM)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, view = key
        codes = torch.from_numpy(self._codes[index, view].astype(np.int64))  # (h, w, G)
        return codes.view(-1, self.groups), torch.tensor(self.labels[index])  # (L, G), ()

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The samples of `keys`, in their order, read in file order: what the DataLoader calls per batch."""
        index = np.fromiter((k[0] for k in keys), dtype=np.int64, count=len(keys))
        view = np.fromiter((k[1] for k in keys), dtype=np.int64, count=len(keys))
        record = index * self.num_views + view  # position of each record in the file
        order = np.argsort(record, kind="stable")
        self._will_need(record[order])
        block = self._codes[index[order], view[order]]  # (B, h, w, G) uint16, one monotone pass
        codes = np.empty((len(keys), *block.shape[1:]), dtype=np.int64)
        codes[order] = block
        codes = torch.from_numpy(codes).view(len(keys), -1, self.groups)  # (B, L, G)
        labels = torch.from_numpy(self.labels[index])
        return list(zip(codes.unbind(0), labels.unbind(0)))

    def _will_need(self, records: np.ndarray) -> None:
        """Start reading the pages of the sorted `records` now, all at once and asynchronously (MADV_WILLNEED)."""
        if self._map is None or not len(records) or not hasattr(mmap, "MADV_WILLNEED"):
            return
        page = mmap.PAGESIZE
        starts = self._data_start + records * self._record_bytes
        first = starts // page * page
        last = np.minimum(-(-(starts + self._record_bytes) // page) * page, len(self._map))
        gaps = np.flatnonzero(first[1:] > last[:-1]) + 1  # record i starts a new range of pages
        for a, b in zip(first[np.r_[0, gaps]], last[np.r_[gaps - 1, len(first) - 1]]):
            self._map.madvise(mmap.MADV_WILLNEED, int(a), int(b - a))

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
        return {k: v for k, v in self.__dict__.items() if k not in ("_codes", "_map")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open(CodeStore(self.codes_dir).codes)
