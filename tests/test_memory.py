"""keep_freed_cpu_memory: after it, memory that CPU tensors gave back serves the next ones without page faults."""
from __future__ import annotations

import subprocess
import sys

import pytest

# A child process (the setting is process-wide and cannot be undone) runs a network's pattern of allocations: each
# layer makes new 320 MB activations and frees its input's. Prints whether the call took effect, then the minor
# page faults of each of eight passes.
CHILD = """
import resource, sys, torch
from tokenizer.common.memory import keep_freed_cpu_memory
print(keep_freed_cpu_memory() if sys.argv[1] == "keep" else None)
def layer(x):
    y = x * 2
    z = y + 1
    del y
    return z.neg_()
x = torch.ones(5 << 24)
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = layer(layer(x))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del out
assert float(layer(layer(x))[0]) == 5.0
"""
PAGES = (5 << 24) * 4 // 4096  # of one activation, at 4 KiB per page


def passes(mode: str) -> tuple[str, list[int]]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True).stdout.split()
    return out[0], [int(n) for n in out[1:]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the setting is glibc's (Linux)")
def test_freed_activations_are_reused_without_page_faults():
    kept, faults = passes("keep")
    assert kept == "True"
    assert faults[0] > PAGES  # the first pass grows the heap
    _, default = passes("default")
    assert min(default[-4:]) > 2 * PAGES  # glibc's default: each activation mapped afresh, faulted in and zeroed
    # Kept: the heap settles (how many passes that takes depends on what else the process allocated first), then
    # whole passes run without a fault
    assert min(faults[-4:]) < PAGES // 100
    assert sum(faults[-4:]) < sum(default[-4:]) // 2
