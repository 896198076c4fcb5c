"""The records a run writes and other modules read back, as typed dataclasses.

- `RunSummary`: WORKDIR/summary.json, written by chimera.train at the end of a run and
  read by chimera.report and chimera.compare.
- `EvalRecord`: one evaluation, a line of WORKDIR/metrics.jsonl (event "eval"), written by
  chimera.train and read back by `eval_records`.
- `Progress`: what a checkpoint carries beside the arrays (its `meta` item).

Each is written and read here, so a field added to one is added in one place.
"""

import dataclasses
import functools
import json
import os
import subprocess
from pathlib import Path

from chimera.data.corpora import write_atomic
from chimera.errors import ChimeraError


@dataclasses.dataclass
class Progress:
  """The host-side state of a run, saved with every checkpoint."""

  tokens_seen: int = 0
  wall_seconds: float = 0.0  # training time so far, without the time between sessions
  best_val_loss: float | None = None
  final_val_loss: float | None = None
  eval_step: int | None = None  # the step final_val_loss was measured at
  # The timed training windows so far, over every session of the run (compilation,
  # evaluation and saving left out): RunSummary.train_tokens_per_second is their ratio.
  # A checkpoint older than these fields counts from its resume on.
  timed_tokens: int = 0
  timed_seconds: float = 0.0
  # The code that trained the run, one `code_version()` per change, in order: a run
  # resumed by other code lists both. "unknown" where it could not be told.
  code: list[str] = dataclasses.field(default_factory=list)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)  # a fresh dict: safe to hand to a background save

  def trained_by(self, version: str | None) -> None:
    """Notes that `version` (`code_version()`) trains from here on."""
    version = version or "unknown"
    if not self.code or self.code[-1] != version:
      self.code.append(version)

  @classmethod
  def from_json(cls, values: dict) -> "Progress":
    progress = cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)
                      if f.name in values})
    if "code" not in values:  # a checkpoint older than the record: its code is not known
      progress.code = ["not recorded"]
    return progress


@dataclasses.dataclass(frozen=True)
class EvalRecord:
  """One evaluation on the fixed validation subset."""

  step: int
  tokens_seen: int
  wall_seconds: float
  val_loss: float
  val_perplexity: float
  val_bits_per_byte: float
  dropped_fraction: list[float]  # [Y] per MoE layer, at evaluation capacity
  expert_load: list[list[float]]  # [Y, E]

  def values(self) -> dict:
    """The fields MetricWriter writes (it adds event, step and time itself)."""
    values = dataclasses.asdict(self)
    del values["step"]
    return values


def read_jsonl(path: Path, text: str | None = None) -> tuple[list[dict], bool]:
  """(records, torn) of a metrics.jsonl (`text`: its contents, if already read): `torn`
  when its last line is cut short (a crash, a full disk or a lost host mid-write), which is
  left out. A bad line before the last is damage, not a torn write: ChimeraError naming it."""
  text = Path(path).read_text() if text is None else text
  lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
  records = []
  for index, (number, line) in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if index == len(lines) - 1:
        return records, True
      raise ChimeraError(f"{path}: line {number} is not JSON (the file is damaged)") from None
  return records, False


def read_all_events(workdir: Path) -> dict[str, list[dict]]:
  """Every metrics.jsonl record, by event ("setup", "train", "eval"), each in order: one
  read of the file for a caller that needs several events. A torn last line is left out."""
  events = {}
  for record in read_jsonl(Path(workdir) / "metrics.jsonl")[0]:
    events.setdefault(record.get("event"), []).append(record)
  return events


def read_events(workdir: Path, event: str) -> list[dict]:
  """Every metrics.jsonl record of one event ("setup", "train", "eval"), in order."""
  return read_all_events(workdir).get(event, [])


def eval_records(rows: list[dict]) -> list[EvalRecord]:
  """The "eval" records of metrics.jsonl as EvalRecords."""
  names = [f.name for f in dataclasses.fields(EvalRecord)]
  return [EvalRecord(**{name: r[name] for name in names}) for r in rows]


def code_version(package: Path = Path(__file__).resolve().parent) -> str | None:
  """The git commit of the checkout `package` (this chimera package) lives in, with
  "+dirty" if its `chimera/` or `configs/` differ from that commit (untracked files there
  included, ignored ones not). None if the package is not the `chimera/` folder at the top
  of a git checkout (an installed copy), or git is missing."""
  # The checkout that holds `package`, whatever git variables the caller has set; no
  # optional locks, so that a run never blocks a `git commit` beside it.
  env = {k: v for k, v in os.environ.items()
         if k not in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE")}

  def git(*args: str) -> str:
    return subprocess.run(["git", "--no-optional-locks", "-C", str(package), *args],
                          capture_output=True, text=True, timeout=30, check=True,
                          env=env).stdout.strip()
  try:
    top = Path(git("rev-parse", "--show-toplevel")).resolve()
    if top / package.name != package.resolve() or package.name != "chimera":
      return None
    commit = git("rev-parse", "--short=12", "HEAD")
    changed = git("status", "--porcelain", "--untracked-files=normal", "--",
                  str(top / "chimera"), str(top / "configs"))
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ("+dirty" if changed else "")


@functools.cache
def loaded_code_version() -> str | None:
  """`code_version()` of this process's chimera, read once: what the first run of the
  process saw on disk, so that a commit or an edit during a long study does not relabel
  the runs that the already imported code trains after it."""
  return code_version()


def device_name() -> str:
  """The devices this process computes on: jax's device kind, with "x N" for N > 1, and
  for the CPU its model ("cpu (AMD EPYC, AVX-512)", `cpu_model`): XLA:CPU compiles for the
  host's instruction set, and capping it moves a run's losses
  (results/cpu-experiments/cpu-isa)."""
  import jax  # only when asked: importing this module starts no backend
  count = jax.device_count()
  kind = jax.devices()[0].device_kind
  model = cpu_model() if jax.devices()[0].platform == "cpu" else None
  if model:
    kind += f" ({model})"
  return kind + (f" x {count}" if count > 1 else "")


def cpuinfo_fields(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str] | None:
  """Each field of Linux's /proc/cpuinfo at its first occurrence (the first processor's);
  None where the file cannot be read."""
  try:
    lines = cpuinfo.read_text().splitlines()
  except OSError:
    return None
  fields = {}
  for line in lines:
    name, _, value = line.partition(":")
    fields.setdefault(name.strip(), value.strip())
  return fields


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
  """The host processor's model name and widest vector extension from Linux's
  /proc/cpuinfo ("AMD EPYC, AVX-512"): the same model name can come with or without
  AVX-512 on a VM. Elsewhere platform.processor(), else None."""
  import platform
  fields = cpuinfo_fields(cpuinfo)
  if fields is None:
    return platform.processor() or None
  field = lambda name: fields.get(name, "")
  flags = set(field("flags").split())
  isa = next((label for flag, label in (("avx512f", "AVX-512"), ("avx2", "AVX2"),
                                        ("avx", "AVX"), ("sse4_2", "SSE4.2"))
              if flag in flags), None)
  parts = [p for p in (field("model name"), isa) if p]
  return ", ".join(parts) or platform.processor() or None


# The plots chimera.main writes into a finished run's workdir (chimera.study_plots.run_plots);
# like summary.json, they describe the run as it ended, and go when it is trained on.
RUN_PLOTS = ("loss.png", "routing.png")


@dataclasses.dataclass(frozen=True)
class RunSummary:
  """What a run ended with (WORKDIR/summary.json)."""

  name: str
  completed: bool
  steps: int
  tokens_seen: int
  wall_seconds: float
  # Tokens per second of the timed steps: compilation, evaluation and saving left out.
  train_tokens_per_second: float | None
  final_val_loss: float | None
  best_val_loss: float | None
  val_bits_per_byte: float | None
  unigram_val_loss: float
  accounting: dict  # chimera.accounting.count(...) of the model, field by field
  config: dict  # the resolved config (chimera.config.to_dict), derived fields filled in
  # MoE only (empty for dense): means over the last logging window, per MoE layer.
  expert_load: list = dataclasses.field(default_factory=list)  # [Y, E]
  dropped_fraction: list = dataclasses.field(default_factory=list)  # [Y]
  # What trained it (`device_name`: "NVIDIA H200", "cpu (AMD EPYC, AVX-512) x 8"), when
  # it ended; None in summaries written before this field.
  device: str | None = None
  # The code that trained it (Progress.code): git commits, "+dirty" for uncommitted
  # changes, "unknown" outside a checkout; None in summaries written before this field.
  code: list[str] | None = None

  def save(self, workdir: Path) -> None:
    write_atomic(Path(workdir) / "summary.json",
                 json.dumps(dataclasses.asdict(self), indent=2).encode())

  @classmethod
  def load(cls, workdir: Path) -> "RunSummary":
    return cls(**json.loads((Path(workdir) / "summary.json").read_text()))

  @staticmethod
  def exists(workdir: Path) -> bool:
    return (Path(workdir) / "summary.json").exists()
