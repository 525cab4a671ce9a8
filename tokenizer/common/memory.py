"""Keep freed CPU memory in the process, so that large activations stop costing page faults.

glibc serves every block above its mmap threshold (at most 32 MiB) from a fresh mapping and unmaps it when freed,
and gives the top of its heap back to the kernel once more than the trim threshold is free there. A convolutional
encoder at 256px allocates activations of hundreds of MiB per layer: each one was mapped, faulted in page by page
and zeroed by the kernel, then given back, on every batch. For LlamaGen VQ-16's float32 extraction on the 2-core
CPU of the README's benchmarks that was 573,000 page faults and about a fifth of the time per image. With mmap off
and trimming off, freed activations are reused by the next ones (no faults after the first batch or two); the
numbers computed do not change, only where their memory comes from. The price: the process keeps its peak heap,
plus what fragmentation adds (3.5 -> 3.8 GB there; a synthetic pattern of 320 MB tensors, 1.8 -> 3.4 GB), until it
exits. CPU extraction (tokenizer/extract.py) and CPU training (the Trainer, tokenizer/common/runs.py) ask for it:
GPT-B's bf16 training step went from 3.9 to 2.8 s on the same machine.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_kept = False


def keep_freed_cpu_memory() -> bool:
    """Ask glibc to serve every allocation from the heap and never trim it; returns whether that took effect (False
    off glibc, e.g. macOS or musl, where nothing is changed). Idempotent; affects the whole process and the
    processes it forks afterwards."""
    global _kept
    if _kept:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success. A trim threshold of -1 turns trimming off (mallopt(3)); a positive int is at most
    # 2 GiB, which VQ-16's activations for ten 256px views exceed, so the heap was still cut back on every batch.
    _kept = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1
    return _kept
