"""chimera.compile_cache: where the entry points keep JAX's compiled steps.

That a restarted run reads its train step from the cache, and trains exactly as before,
is checked in tests/test_train.py (the SIGKILL test).
"""

import re

import jax
import pytest

from chimera import compile_cache
from conftest import cache_settings_restored


@pytest.fixture
def jax_settings():
  """Puts back the two JAX settings that `enable` changes."""
  with cache_settings_restored():
    yield


def test_the_folder_names_the_processor_and_its_features(monkeypatch, tmp_path):
  (tmp_path / "cpuinfo").write_text("processor\t: 0\nmodel name\t: AMD EPYC 9B14\n"
                                    "flags\t\t: fpu sse4_2 avx2 avx512f\n\nprocessor\t: 1\n")
  assert compile_cache.cpu_flags(tmp_path / "cpuinfo") == "fpu sse4_2 avx2 avx512f"
  assert compile_cache.cpu_flags(tmp_path / "missing") == ""
  flags = {"avx512": "fpu avx2 avx512f", "avx2": "fpu avx2"}
  monkeypatch.setattr(compile_cache, "cpu_model", lambda: "AMD EPYC 9B14, AVX-512")
  monkeypatch.setattr(compile_cache, "cpu_flags", lambda: flags["avx512"])
  folder = compile_cache.default_dir()
  assert folder.parent == tmp_path / "cache" / "xla"
  assert re.fullmatch(r"AMD-EPYC-9B14-AVX-512-[0-9a-f]{8}", folder.name)
  # The same model name with other features (a VM that hides some) gets its own folder.
  monkeypatch.setattr(compile_cache, "cpu_flags", lambda: flags["avx2"])
  assert compile_cache.default_dir() != folder
  monkeypatch.setattr(compile_cache, "cpu_model", lambda: "Intel(R) Xeon(R) Processor, AVX2")
  assert compile_cache.default_dir().name.startswith("Intel-R-Xeon-R-Processor-AVX2-")
  monkeypatch.setattr(compile_cache, "cpu_model", lambda: None)
  assert compile_cache.default_dir().name.startswith("unknown-cpu-")


def test_enable_sets_the_folder_and_the_threshold(monkeypatch, tmp_path, jax_settings):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
  folder = compile_cache.enable()
  assert folder == compile_cache.default_dir() and folder.parent == tmp_path / "cache" / "xla"
  assert jax.config.jax_compilation_cache_dir == str(folder)
  assert jax.config.jax_persistent_cache_min_compile_time_secs == compile_cache.MIN_COMPILE_SECONDS


def test_jax_own_settings_win(monkeypatch, tmp_path, jax_settings):
  monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
  jax.config.update("jax_compilation_cache_dir", None)
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")  # set empty: the cache stays off
  assert compile_cache.enable() is None
  assert jax.config.jax_compilation_cache_dir is None
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  assert compile_cache.enable() == tmp_path / "mine"
  assert jax.config.jax_compilation_cache_dir is None  # JAX reads its variable itself
  # Another folder keeps the threshold that caches the evaluation step.
  assert jax.config.jax_persistent_cache_min_compile_time_secs == compile_cache.MIN_COMPILE_SECONDS
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "3")
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 3.0)
  compile_cache.enable()
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 3.0
