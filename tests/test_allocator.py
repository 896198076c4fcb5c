"""chimera.allocator: large blocks come from the heap and stay there after free."""

import os
import subprocess
import sys

import pytest

# In a fresh interpreter: allocate and free a 64 MiB block (numpy's buffer comes from
# malloc), then print glibc's bytes in mmapped blocks while it lived, and the heap's total
# after it was freed (mallinfo2).
PROBE = """
import ctypes, sys
import numpy as np
from chimera import allocator
class Info(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in
              "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
took = allocator.keep_freed_memory() if sys.argv[1] == "tuned" else None
block = np.ones(64 << 20, np.uint8)
mapped = libc.mallinfo2().hblkhd
del block
print(took, mapped, libc.mallinfo2().arena)
"""


def _probe(mode: str, **env: str) -> tuple[str, int, int]:
  result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                          env={**os.environ, **env}, check=True)
  took, mapped, arena = result.stdout.split()
  return took, int(mapped), int(arena)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_large_blocks_stay_in_the_heap_after_free():
  _, mapped, arena = _probe("plain")
  assert mapped >= 64 << 20 and arena < 64 << 20  # glibc's default: mmap, unmapped on free
  took, mapped, arena = _probe("tuned")
  assert took == "True"
  assert mapped < 64 << 20 and arena >= 64 << 20  # from the heap, and kept after free
  # CHIMERA_MALLOC=default: the call does nothing, and the block is mmapped as before.
  took, mapped, arena = _probe("tuned", CHIMERA_MALLOC="default")
  assert took == "False"
  assert mapped >= 64 << 20 and arena < 64 << 20
