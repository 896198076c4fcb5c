"""JAX's persistent compilation cache, turned on by the command-line entry points.

The next run of the same config reads its compiled steps from disk instead of compiling
them again. At the nanogpt_cpu preset on a 2-core CPU that is the train step (2.7 s to
compile) and the state's init (1.7 s); see results/nanogpt_cpu/side_by_side.md for the
measured start-up with and without it. The numbers a run makes do not change: the cached
executable is the one the compiler made.

Where the cache lives:
- $JAX_COMPILATION_CACHE_DIR, when it is set (JAX's own setting; set it empty to turn
  the cache off);
- otherwise $CHIMERA_CACHE/xla/<host>, beside the token cache. <host> names the CPU
  model and its widest vector extension, and ends in a hash of the processor's feature
  flags, because XLA's cache key calls every CPU just "cpu": a cache shared between
  machines (a home directory on NFS) would otherwise hand code built for one instruction
  set to a processor without it.

Compilations shorter than 0.2 s are not written (JAX's default is 1 s, which would leave
out the evaluation step), unless $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says
otherwise. The cache is never pruned; delete the folder to clear it.
"""

import hashlib
import os
import re
from pathlib import Path

import jax

from chimera.data.corpora import cache_dir
from chimera.records import cpu_model, cpuinfo_fields

MIN_COMPILE_SECONDS = 0.2


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
  """The first processor's feature flags from Linux's /proc/cpuinfo; "" elsewhere."""
  return (cpuinfo_fields(cpuinfo) or {}).get("flags", "")


def default_dir() -> Path:
  """$CHIMERA_CACHE/xla/<CPU model and vector extension>-<hash of its feature flags>."""
  host = re.sub(r"[^A-Za-z0-9.]+", "-", cpu_model() or "").strip("-") or "unknown-cpu"
  flags = hashlib.sha1(cpu_flags().encode()).hexdigest()[:8]
  return cache_dir() / "xla" / f"{host}-{flags}"


def enable() -> Path | None:
  """Turns the cache on (see the module's docstring); returns its folder, None if off."""
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # JAX's own setting, read at its import
    chosen = os.environ["JAX_COMPILATION_CACHE_DIR"]
    return Path(chosen) if chosen else None
  folder = default_dir()
  jax.config.update("jax_compilation_cache_dir", str(folder))
  return folder
