"""Files: atomic writes (a reader never sees half a file, a crash never leaves one), JSON, sha256, weights."""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it is renamed to `path`, on error removed.

    The temporary name carries the process id, so processes writing the same file never share one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """`obj` as indented JSON with sorted keys, written atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is unreadable: {e}") from e


def sha256_file(path: str | os.PathLike, *, chunk_bytes: int = 1 << 24, progress: bool = False) -> str:
    """Hex sha256 of a file, streamed in chunks; `progress`: a bar for files over 256 MB (GPT-XXL is 6 GB)."""
    h, size = hashlib.sha256(), os.path.getsize(path)
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {Path(path).name}",
                                      disable=not progress or size < 2**28, leave=False) as bar:
        while block := f.read(chunk_bytes):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def load_weights_file(path: str | os.PathLike, what: str) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU; a missing file, or one holding pickled Python objects
    beyond tensors and plain containers, raises an error naming `what` and the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist (nothing is downloaded: pass a local file)")
    try:
        # LlamaGen's files pickle their argparse `args`: that one class is allowed, nothing runs code.
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:  # memory-mapped: a reader that keeps a part of a big file touches only that part
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # pre-zip torch.save format
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds Python objects beyond tensors, plain containers and argparse.Namespace "
                         f"({torch.serialization.get_unsafe_globals_in_checkpoint(path)}; a Lightning .ckpt may store "
                         f"its hyper-parameters so): re-save its state dict alone: {e}") from None
