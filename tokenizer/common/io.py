"""Files: atomic writes (a reader never sees half a file, a crash never leaves one), JSON, sha256, weights."""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pickle
import shutil
import struct
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tokenizer.common.errors import BadFileError, DamagedFileError, MissingFileError, UserError

VERIFY_ENV = "MGVQ_VERIFY_CHECKPOINTS"  # 0: skip the CRC check of weights files (seconds per GB, README)


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


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str, hint: str = "") -> Iterator[None]:
    """Inside it, a failure to read `path` becomes an error naming `what` and the path: MissingFileError when it
    does not exist, DamagedFileError when it is unreadable, truncated or damaged (the reader's own message kept)."""
    try:
        yield
    except UserError:
        raise
    except FileNotFoundError:
        raise MissingFileError(f"{what} {path} does not exist") from None
    except (OSError, ValueError, RuntimeError, EOFError, KeyError, zipfile.BadZipFile, pickle.UnpicklingError,
            zlib.error) as e:
        raise DamagedFileError(f"{what} {path} is unreadable or damaged ({type(e).__name__}: {str(e)[:300]})"
                           + (f": {hint}" if hint else "")) from e


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    with reading(path, "JSON file"):
        return json.loads(path.read_text())


def load_npy(path: str | os.PathLike, what: str, mmap_mode: str | None = None) -> np.ndarray:
    """`np.load` of a .npy file (memory-mapped with `mmap_mode`), failures naming `what` and the path."""
    with reading(path, what):
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)


def zip_data_offset(f, info: zipfile.ZipInfo) -> int:
    """Where member `info`'s data starts in the open zip file `f`: after its local header (30 fixed bytes, the
    file name, an extra field)."""
    f.seek(info.header_offset)
    local = f.read(30)
    if local[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"corrupt local header of member {info.filename}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _member_crc_ok(path: Path, info: zipfile.ZipInfo, chunk_bytes: int, bar: tqdm) -> bool:
    """CRC-32 of one member's bytes against the one its zip records (stored members read raw, in chunks into one
    buffer; zlib releases the GIL, so threads check members in parallel); compressed ones through zipfile."""
    crc = 0
    if info.compress_type != zipfile.ZIP_STORED:
        with zipfile.ZipFile(path) as zf, zf.open(info) as member:
            while block := member.read(chunk_bytes):  # zipfile checks the CRC at the member's end
                bar.update(len(block))
        return True
    buf = memoryview(bytearray(min(chunk_bytes, max(info.compress_size, 1))))
    with open(path, "rb", buffering=0) as f:
        f.seek(zip_data_offset(f, info))
        left = info.compress_size
        while left:
            n = f.readinto(buf[:min(left, len(buf))])
            if not n:
                raise EOFError(f"member {info.filename} ends early")
            crc = zlib.crc32(buf[:n], crc)
            left -= n
            bar.update(n)
    return crc == info.CRC


def verify_zip(path: str | os.PathLike, what: str, *, chunk_bytes: int = 1 << 23, threads: int | None = None) -> bool:
    """Check every member of a zip file (torch.save's format) against the CRC-32 its zip records: damage anywhere
    inside raises DamagedFileError naming the file and the member. False for a file that is not a zip (the legacy
    torch format carries no checksums), True when it was checked. torch.load itself never checks the CRCs.
    Members are checked on `threads` threads (default: the CPU count, at most 8)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return False
    size = os.path.getsize(path)
    hint = "the file is damaged; copy or download it again"
    with reading(path, what, hint=hint):
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
        with tqdm(total=size, unit="B", unit_scale=True, desc=f"verify {path.name}", disable=size < 2**30,
                  leave=False) as bar, ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
            ok = list(pool.map(lambda info: _member_crc_ok(path, info, chunk_bytes, bar), members))
    bad = [info.filename for info, good in zip(members, ok) if not good]
    if bad:
        raise DamagedFileError(f"{what} {path} is damaged: the bytes of {len(bad)} member(s) ({', '.join(bad[:3])}) do "
                           f"not match their CRC-32: {hint}")
    return True


def sha256_file(path: str | os.PathLike, *, chunk_bytes: int = 1 << 24, progress: bool = False) -> str:
    """Hex sha256 of a file, streamed in chunks; `progress`: a bar for files over 256 MB (GPT-XXL is 6 GB)."""
    h, size = hashlib.sha256(), os.path.getsize(path)
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {Path(path).name}",
                                      disable=not progress or size < 2**28, leave=False) as bar:
        while block := f.read(chunk_bytes):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def load_weights_file(path: str | os.PathLike, what: str, verify: bool | None = None) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU, after `verify_zip` (`verify` None: unless the environment
    sets MGVQ_VERIFY_CHECKPOINTS=0). A missing, truncated or damaged file, or one holding pickled Python objects
    beyond tensors and plain containers, raises an error naming `what` and the path."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} {path} does not exist (nothing is downloaded: pass a local file)")
    if verify if verify is not None else os.environ.get(VERIFY_ENV, "1") != "0":
        verify_zip(path, what)
    # LlamaGen's files pickle their argparse `args`: that one class is allowed, nothing runs code.
    with reading(path, what), torch.serialization.safe_globals([argparse.Namespace]):
        try:
            try:  # memory-mapped: a reader that keeps a part of a big file touches only that part
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # pre-zip torch.save format
        except pickle.UnpicklingError as e:
            if "weights only" not in str(e).lower():
                raise  # a damaged pickle: named by `reading`
            raise BadFileError(f"{path} holds Python objects beyond tensors, plain containers and argparse.Namespace "
                               f"({torch.serialization.get_unsafe_globals_in_checkpoint(path)}; a Lightning .ckpt "
                               f"may store its hyper-parameters so): re-save its state dict alone: {e}") from None
