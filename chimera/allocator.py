"""glibc's malloc, set to keep freed memory for the next step instead of returning it.

XLA:CPU allocates each step's temporaries as one block, freed at the end of the step.
glibc serves a block that large with mmap (or trims it off the heap) and gives it back to
the kernel when it is freed, so every step faults its pages in again. On a 2-core VM
that cost the `nanogpt_cpu` step 52.8 against 38.6 ms (medians of 5 rounds of 40 steps,
6.2 against 0.75 s of system time; results/nanogpt_cpu/side_by_side.md). Two mallopt(3)
settings keep the memory in the process instead: no mmap for large blocks (they come
from the heap) and no trimming below 1 GiB free at the heap's top.

`CHIMERA_MALLOC=default` in the environment leaves malloc as it is.
"""

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
  """Applies the two settings to this process; True if glibc took both. A no-op (False)
  off Linux, on a C library without mallopt, or with CHIMERA_MALLOC=default."""
  if not sys.platform.startswith("linux") or os.environ.get("CHIMERA_MALLOC") == "default":
    return False
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):  # not glibc
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return bool(mallopt(M_MMAP_MAX, 0)) & bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
