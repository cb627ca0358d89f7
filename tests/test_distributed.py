"""kdscale.distributed's memory setting for ZeRO-3 on CPUs: a large block is mapped on its
own (and so unmapped when freed) even after glibc has seen large blocks freed, when by
default it would then take it from its heaps, which it rarely gives back. Checked in fresh
processes: the setting is process-wide and cannot be undone."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Frees one 8 MiB tensor (by default glibc then raises its mmap threshold to 8 MiB), makes
# another, and prints how many blocks glibc mapped on their own for it (mallinfo2.hblks).
SNIPPET = """
import ctypes, sys, torch
from kdscale.distributed import return_large_blocks_when_freed
if sys.argv[1] == "set" and not return_large_blocks_when_freed():
    sys.exit(3)
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
first = torch.ones(2 << 20)
del first
before = libc.mallinfo2().hblks
block = torch.ones(2 << 20)
print(libc.mallinfo2().hblks - before)
"""


def blocks_mapped_alone(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", SNIPPET, mode], capture_output=True,
                          text=True, timeout=120)
    if done.returncode == 3:
        pytest.skip("not glibc, or a CUDA machine: the setting does not apply")
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


def test_a_large_block_is_mapped_alone_after_large_blocks_were_freed():
    assert blocks_mapped_alone("default") == 0  # glibc's default: from its heap
    assert blocks_mapped_alone("set") == 1
