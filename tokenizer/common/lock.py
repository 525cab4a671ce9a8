"""One run per out_dir: an exclusive `fcntl.flock` on `<out_dir>/.run.lock`, taken by every command that writes
an out_dir (training, extraction, sampling, sweeps) once its settings are known to be valid.

The lock file holds its holder (host, pid, command, start time) while the lock is held, and is removed when the
run ends (a finished out_dir holds only its outputs). The kernel drops a flock when its process dies (even by kill -9), so a lock file whose flock is free
but which still names a holder was left by a run that died: the next run takes it over and says so. A second
run while the first lives is refused naming the first. Under accelerate only the main process locks; the others
learn the outcome by a broadcast, so all ranks go on or stop together.

A process keeps the locks it took until `release` or its exit (an exception included: they are released at exit,
so only a killed run leaves a lock file behind); taking a lock it already holds is a no-op (a library call rerun in
the same process, e.g. after an exception, needs no release first).
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from accelerate.utils import broadcast_object_list

from tokenizer.common.errors import OutDirBusyError

LOCK_NAME = ".run.lock"
_HELD: dict[Path, int] = {}  # lock file -> the open descriptor holding its flock, in this process


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}: "
            f"{holder.get('command', '?')}")


def _read_holder(fd: int) -> dict | None:
    """The holder recorded in the lock file, None when it is empty (released cleanly, or not written yet)."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode(errors="replace").strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"command": text[:200]}


def acquire(out_dir: str | os.PathLike) -> str | None:
    """Take the lock of `out_dir` (created if need be) for this process. Returns a note when a dead run's lock was
    taken over, else None; raises OutDirBusyError naming the holder when another live run holds it."""
    path = Path(out_dir).resolve() / LOCK_NAME
    if path in _HELD:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = _describe(holder) if holder else "a process that has not recorded itself yet"
            raise OutDirBusyError(f"{Path(out_dir)} is in use by another run ({who}). Wait for it to end, or "
                                  f"choose another out_dir (lock file {path})") from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder released and removed the file after we opened it: lock the current one
    stale = _read_holder(fd)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(_holder()) + "\n").encode())
    os.fsync(fd)
    _HELD[path] = fd
    if stale is None:
        return None
    return (f"{Path(out_dir)}: took over the lock of a run that ended without releasing it ({_describe(stale)}); "
            f"its process no longer holds the lock")


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def release(out_dir: str | os.PathLike) -> None:
    """Remove and unlock `out_dir`'s lock, if this process holds it (removed while locked: a run that opened the
    old file before finds it gone after its flock, and locks a new one)."""
    path = Path(out_dir).resolve() / LOCK_NAME
    fd = _HELD.pop(path, None)
    if fd is None:
        return
    path.unlink(missing_ok=True)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _release_all() -> None:
    for path in list(_HELD):
        release(path.parent)


atexit.register(_release_all)  # an exception ends a run without a leftover lock file; only a kill leaves one


def lock_out_dir(out_dir: str | os.PathLike, state=None) -> None:
    """`acquire` on the main process of `state` (an accelerate PartialState / Accelerator; None: one process),
    its outcome broadcast to every rank: all raise the same OutDirBusyError, or all go on. The take-over note
    is printed once."""
    main = state is None or state.is_main_process
    outcome = None
    if main:
        try:
            outcome = ("note", acquire(out_dir))
        except OutDirBusyError as e:
            outcome = ("busy", str(e))
    if state is not None and state.num_processes > 1:
        outcome = broadcast_object_list([outcome], from_process=0)[0]
    kind, message = outcome
    if kind == "busy":
        raise OutDirBusyError(message)
    if message and main:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def unlock_out_dir(out_dir: str | os.PathLike, state=None) -> None:
    """`release` on the main process, after every rank is done with the out_dir."""
    if state is not None and state.num_processes > 1:
        state.wait_for_everyone()
    if state is None or state.is_main_process:
        release(out_dir)


@contextlib.contextmanager
def out_dir_lock(out_dir: str | os.PathLike, state=None) -> Iterator[None]:
    """`lock_out_dir` for the body; released after it, by `unlock_out_dir` when it ends well, at once (no waiting
    for the other ranks, which may be anywhere) when it raises."""
    lock_out_dir(out_dir, state)
    try:
        yield
    except BaseException:
        release(out_dir)
        raise
    unlock_out_dir(out_dir, state)
