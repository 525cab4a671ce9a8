"""The code store: the codes (any tokenizer family) of every image and view, memory-mapped, written in place, resumable.

A complete store is a directory with
    codes.npy   uint16 (N, A, h, w, G)   view 0 = the plain center crop; uint32 when a group has > 65536 codes
    labels.npy  int64 (N,)               sorted ImageFolder class index; -1 for an image skipped as unreadable
    meta.json   the spec (how the codes were made) and `bad_files`
and, when meta.json names `merged_tokens` K (MergeVQ's merged form, tokenizer.merged), also
    merged_codes.npy  (N, A, K, G)  the codes of the merged tokens in merge order, the dtype of codes.npy
    token_map.npy     uint16 (N, A, h, w)  which merged token covers each grid position
While an extraction runs, `spec.json` and `done.npy` (one byte per image, set only after that image's codes
are flushed) sit beside codes.npy and labels.npy; meta.json is written last, atomically, and only then are
the two removed. So a directory holds a usable store exactly when it holds meta.json.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap

from tokenizer.common.errors import BadFileError, MissingFileError
from tokenizer.common.io import load_npy, read_json, write_json_atomic
from tokenizer.common.settings import SettingsMismatchError, refuse_mismatch
from tokenizer.base import group_sizes
from tokenizer.registry import FAMILIES

CODES, LABELS, META, SPEC, DONE = "codes.npy", "labels.npy", "meta.json", "spec.json", "done.npy"
MERGED_CODES, TOKEN_MAP = "merged_codes.npy", "token_map.npy"
FORMAT_VERSION = 1
CODE_DTYPES = ("uint16", "uint32")
CHECKED_ROWS = 256  # images whose codes are checked against meta.json when a store is opened
REQUIRED_META = ("tokenizer", "tokenizer_sha256", "image_size", "views", "num_views", "groups", "codes_per_group",
                 "grid", "num_images", "num_classes", "class_names", "files_fingerprint")


# An existing store in out_dir was made with other settings than the ones asked for.
StoreMismatchError = SettingsMismatchError


def code_dtype(meta: dict) -> np.dtype:
    """The codes' dtype a store's meta names: uint16, or uint32 for more than 65536 codes per group (IBQ 262144)."""
    name = meta.get("dtype", "uint16")
    if name not in CODE_DTYPES:
        raise BadFileError(f"code store dtype {name!r} is not one of {CODE_DTYPES}")
    return np.dtype(name)


def dtype_for(codes_per_group: int) -> str:
    return "uint16" if codes_per_group <= 2**16 else "uint32"


class CodeStore:
    """A complete code store, opened read-only: `.codes` (memmap), `.labels`, `.meta`, `.fingerprint`."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise MissingFileError(f"code store {self.dir} does not exist")
        if not (self.dir / META).is_file():
            if (self.dir / SPEC).is_file():
                done = load_npy(self.dir / DONE, "code store progress file", mmap_mode="r") if (self.dir / DONE).is_file() else np.zeros(0)
                raise BadFileError(f"code store {self.dir} is incomplete ({int(done.sum())} of {len(done)} images "
                                 f"extracted): rerun the same extract_codes command to finish it")
            raise MissingFileError(f"{self.dir} is not a code store: it has no {META}")
        self.meta = read_json(self.dir / META)
        missing = [k for k in REQUIRED_META if k not in self.meta]
        if missing:
            raise BadFileError(f"{self.dir / META} lacks {missing}")
        self.codes = load_npy(self.dir / CODES, "code store file", mmap_mode="r")
        self.labels = load_npy(self.dir / LABELS, "code store file")
        m = self.meta
        want = (m["num_images"], m["num_views"], *m["grid"], m["groups"])
        dtype = code_dtype(m)
        if self.codes.dtype != dtype or self.codes.shape != want:
            raise BadFileError(f"{self.dir / CODES} is {self.codes.dtype} {self.codes.shape}, meta.json says "
                               f"{dtype} {want}")
        self.merged_codes = self.token_map = None
        if m.get("merged_tokens"):
            self._open_merged()
        if self.labels.dtype != np.int64 or self.labels.shape != (m["num_images"],):
            raise BadFileError(f"{self.dir / LABELS} is {self.labels.dtype} {self.labels.shape}, "
                               f"meta.json says int64 ({m['num_images']},)")
        check_codes_fit_meta(self.dir, m, self.codes)
        h = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode())
        h.update(self.labels.tobytes())
        self.fingerprint = h.hexdigest()  # content id: what made the codes and which images they are

    def _open_merged(self) -> None:
        m = self.meta
        for name, attr, dtype, shape in merged_arrays(m):
            setattr(self, attr, load_npy(self.dir / name, "merged-form file (meta.json names merged_tokens)",
                                         mmap_mode="r"))
            got = getattr(self, attr)
            if got.dtype != dtype or got.shape != shape:
                raise BadFileError(f"{self.dir / name} is {got.dtype} {got.shape}, meta.json says {dtype} {shape}")

    def __len__(self) -> int:
        return len(self.labels)


def merged_arrays(spec: dict) -> list[tuple[str, str, np.dtype, tuple]]:
    """(file, attribute, dtype, shape) of the merged form's arrays of a spec with `merged_tokens`."""
    n, a = spec["num_images"], spec["num_views"]
    return [(MERGED_CODES, "merged_codes", code_dtype(spec), (n, a, spec["merged_tokens"], spec["groups"])),
            (TOKEN_MAP, "token_map", np.dtype("uint16"), (n, a, *spec["grid"]))]
def meta_group_sizes(directory: Path, meta: dict) -> list[int]:
    """Codes per group that meta.json states, one per group; refused (naming meta.json) where the entry does
    not fit `groups` or the tokenizer config meta.json records (for a family whose config it can rebuild)."""
    per_group, groups = meta["codes_per_group"], meta["groups"]
    sizes = list(per_group) if isinstance(per_group, list) else [per_group] * groups
    family = FAMILIES.get(meta.get("family", "mgvq"))
    try:
        arch = family and group_sizes(family.config_cls.from_dict(meta["tokenizer"]))
    except (TypeError, ValueError, KeyError):
        arch = None  # a config this version cannot rebuild: the codes are still checked below
    if len(sizes) != groups or any(not isinstance(k, int) or k < 1 for k in sizes) or (arch and arch != sizes):
        raise BadFileError(f"{directory / META}: codes_per_group={per_group} does not fit groups={groups}"
                           + (f" and the tokenizer it records ({arch} codes per group)" if arch else ""))
    return sizes


def check_codes_fit_meta(directory: Path, meta: dict, codes: np.ndarray, rows: int = CHECKED_ROWS) -> None:
    """Every code of `rows` images spread evenly over the store (all views) lies below its group's size in
    meta.json: a cheap check (rows * A * h * w * G codes) that catches a meta.json that does not describe
    these codes before a model is built on it."""
    sizes = meta_group_sizes(directory, meta)
    if not len(codes):
        return
    sample = codes[np.unique(np.linspace(0, len(codes) - 1, min(rows, len(codes))).astype(np.int64))]
    top = sample.reshape(-1, sample.shape[-1]).max(0)  # (G,)
    over = [(g, int(t), k) for g, (t, k) in enumerate(zip(top, sizes)) if t >= k]
    if over:
        raise BadFileError(f"{directory / CODES} holds codes beyond meta.json's codes_per_group {sizes}: "
                           + ", ".join(f"group {g} has code {t} (>= {k})" for g, t, k in over)
                           + f"; {directory / META} does not describe these codes")


class StoreWriter:
    """Creates or resumes a store in `directory` for `spec`; ranks write disjoint images into shared memmaps.

    Call order: `check(spec)` on every rank (refuses a mismatch before any work), `create(labels)` on the main
    process when `check` said "new", a barrier, then `open()` and `write(...)` on every rank, a barrier, and
    `finalize()` on the main process.
    """

    def __init__(self, directory: str | Path, spec: dict):
        self.dir = Path(directory)
        self.spec = spec

    def check(self) -> str:
        """'complete', 'partial' (resume) or 'new'; raises StoreMismatchError naming what differs."""
        for name, state in ((META, "complete"), (SPEC, "partial")):
            path = self.dir / name
            if path.is_file():
                have = {k: v for k, v in read_json(path).items() if k != "bad_files"}
                refuse_mismatch(have, self.spec, f"the code store in {self.dir}", "use another out_dir or delete it")
                return state
        return "new"

    def create(self, labels: np.ndarray) -> None:
        """Zero-filled codes, the labels, an all-zero done mask; spec.json last, as the mark of a valid start."""
        self.dir.mkdir(parents=True, exist_ok=True)
        s = self.spec
        shape = (s["num_images"], s["num_views"], *s["grid"], s["groups"])
        open_memmap(self.dir / CODES, mode="w+", dtype=code_dtype(s), shape=shape).flush()
        for name, _, dtype, merged_shape in merged_arrays(s) if s.get("merged_tokens") else ():
            open_memmap(self.dir / name, mode="w+", dtype=dtype, shape=merged_shape).flush()
        out = open_memmap(self.dir / LABELS, mode="w+", dtype=np.int64, shape=(s["num_images"],))
        out[:] = labels
        out.flush()
        open_memmap(self.dir / DONE, mode="w+", dtype=np.uint8, shape=(s["num_images"],)).flush()
        write_json_atomic(self.dir / SPEC, self.spec)

    def open(self) -> np.ndarray:
        """Open the memmaps for writing; returns the indices not yet done, the same on every rank."""
        self.codes = load_npy(self.dir / CODES, "code store file", mmap_mode="r+")
        self.labels = load_npy(self.dir / LABELS, "code store file", mmap_mode="r+")
        self.done = load_npy(self.dir / DONE, "code store progress file", mmap_mode="r+")
        for name, attr, _, _ in merged_arrays(self.spec) if self.spec.get("merged_tokens") else ():
            setattr(self, attr, load_npy(self.dir / name, "code store file", mmap_mode="r+"))
        return np.flatnonzero(self.done == 0)

    def write(self, indices: np.ndarray, codes: np.ndarray, bad: np.ndarray,
              merged: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Codes (B, A, h, w, G) of images `indices`; `bad` (B,) bool marks unreadable ones (label -1, codes 0).
        merged: (merged codes (B, A, K, G), token map (B, A, h, w)), which a store with merged_tokens requires."""
        if (merged is None) != (not self.spec.get("merged_tokens")):
            raise ValueError(f"{self.dir}: merged codes must be written exactly when the store keeps the merged form")
        self.codes[indices] = np.where(bad[:, None, None, None, None], 0, codes)
        self.codes.flush()
        if merged is not None:
            self.merged_codes[indices] = np.where(bad[:, None, None, None], 0, merged[0])
            self.token_map[indices] = np.where(bad[:, None, None, None], 0, merged[1])
            self.merged_codes.flush()
            self.token_map.flush()
        if bad.any():
            self.labels[indices[bad]] = -1
            self.labels.flush()
        self._mark_done(indices)

    def _mark_done(self, indices: np.ndarray) -> None:
        # Only after the codes are on disk (flushed above): a kill in between leaves the images to redo.
        self.done[indices] = 1
        self.done.flush()

    def finalize(self, files: list[str]) -> dict:
        """Write meta.json (spec + bad_files) once every image is done; drop the progress files."""
        done = load_npy(self.dir / DONE, "code store progress file", mmap_mode="r")
        if not done.all():
            raise RuntimeError(f"{self.dir}: {int((done == 0).sum())} images were not extracted")
        labels = load_npy(self.dir / LABELS, "code store file", mmap_mode="r")
        meta = dict(self.spec, bad_files=[files[i] for i in np.flatnonzero(labels < 0)])
        write_json_atomic(self.dir / META, meta)
        self.remove_progress_files()
        return meta

    def remove_progress_files(self) -> None:
        for name in (SPEC, DONE):
            (self.dir / name).unlink(missing_ok=True)

    def close(self) -> None:
        for name in ("codes", "labels", "done", "merged_codes", "token_map"):
            self.__dict__.pop(name, None)
