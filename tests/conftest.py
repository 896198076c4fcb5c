import contextlib
import os
from pathlib import Path

# The suite checks CPU behaviour: float32 tolerances, XLA:CPU's compiled text, fake host
# devices. On a machine with a GPU it runs on the host all the same (here and in the
# processes tests start), unless JAX_PLATFORMS is set to say otherwise.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# XLA:CPU compiles the suite's programs at LLVM's -O0: most of the suite's time is
# compiling tiny configs, and the suite checks what the programs compute, not how fast.
# The optimised HLO does not change with the level (the train steps of dense and moe_top2
# at :tiny, 2026-11-29, metadata aside), and the library dots (Eigen, YNNPACK) are the
# same code; the generated loops round differently in the last bits (20 steps of both:
# training losses within 4.1e-7 of the default level's, relative).
# Each comparison a test makes runs both sides at this level. On the 2-core VM the suite
# took 479 s at -O0 against 619 s at the default (one run each, the same morning).
# This process and every process a test starts get it; the drivers of the multi-device
# tests add their device count to it.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # noqa: E402  (after the platform is chosen)
import pytest  # noqa: E402

from chimera import config as config_lib  # noqa: E402

jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])  # if jax was imported first

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIGS = sorted((ROOT / "configs").glob("*.py"))  # every configs/*.py


@pytest.fixture(scope="session", autouse=True)
def _shared_compilation_cache(tmp_path_factory):
  """One persistent compilation cache (chimera.compile_cache) for the whole session, in
  this process and in the processes tests start (through $JAX_COMPILATION_CACHE_DIR and
  $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, which JAX reads as it starts): many tests
  compile the same tiny configs' steps. A cached executable is the one the compiler made,
  so no result changes. Each pytest-xdist worker keeps its own folder (JAX writes entries
  without a lock). A test about the cache itself deletes $JAX_COMPILATION_CACHE_DIR and
  gets a folder of its own."""
  from chimera.compile_cache import MIN_COMPILE_SECONDS
  folder = str(tmp_path_factory.mktemp("xla-cache"))
  with pytest.MonkeyPatch.context() as patch, cache_settings_restored():
    patch.setenv("JAX_COMPILATION_CACHE_DIR", folder)
    patch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(MIN_COMPILE_SECONDS))
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    yield folder


@contextlib.contextmanager
def cache_settings_restored():
  """Puts back the two JAX settings that chimera.compile_cache.enable changes."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  before = {name: getattr(jax.config, name) for name in names}
  try:
    yield
  finally:
    for name, value in before.items():
      jax.config.update(name, value)


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
  """No fixture reads or writes the user's download cache, module- and session-scoped ones
  included (they are set up before any test's own cache below)."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("CHIMERA_CACHE", str(tmp_path_factory.mktemp("session_cache")))
    yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
  """No test reads or writes the user's download cache, or another test's."""
  monkeypatch.setenv("CHIMERA_CACHE", str(tmp_path / "cache"))


def make_config(name: str, corpus: Path, preset: str | None = "tiny", **overrides):
  """A validated Config from configs/<name>.py:preset with `section__field=value` overrides."""
  spec = str(ROOT / "configs" / f"{name}.py") + (f":{preset}" if preset else "")
  overrides = {key.replace("__", "."): value for key, value in overrides.items()}
  return config_lib.load(spec, {"data.corpus": str(corpus), **overrides})


def write_corpus(path: Path, lines: int = 400, seed: int = 0) -> Path:
  """A small deterministic English-like text."""
  import random
  words = ("the king queen lord sweet love death night day heart eye hand speak come go "
           "thou thee thy art hath doth shall will").split()
  rng = random.Random(seed)
  path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12))
                            for _ in range(lines)))
  return path


@pytest.fixture
def corpus(tmp_path) -> Path:
  return write_corpus(tmp_path / "corpus.txt")


@pytest.fixture(name="make_config")
def _make_config_fixture():
  return make_config


@pytest.fixture(name="write_corpus", scope="session")
def _write_corpus_fixture():
  return write_corpus


@pytest.fixture(scope="session")
def repo_root() -> Path:
  return ROOT


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: trains in a subprocess; skip with -m 'not slow'")
