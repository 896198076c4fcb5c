"""Where a train step's time goes: a jax.profiler trace of a few steps, summed by op.

  python -m chimera.bench --configs=configs/dense.py:gpu --profile --repeats=1
  python -m chimera.bench --configs=configs/dense.py --profile --profile_dir=/tmp/prof
  python -m chimera.bench_profile /tmp/prof/configs_dense.py
      # again, offline, from the trace, HLO and step count kept by `--profile_dir`
  python -m chimera.bench_profile results/gpu/h100/profile/configs_dense.py_gpu --steps=10
      # a trace kept without its step count (before 2026-11-29): --steps says it

Each XLA op in the trace (a thunk on CPU; on GPU the "XLA Ops" line, or the kernels,
which XLA names after their fusion) is matched to its instruction in the compiled step's
HLO. The instruction's metadata names the jax operation and the flax module that made it,
so the time is summed by model part (embedding, attention, MLP or MoE, norms, head, loss,
optimiser) and by pass (forward, backward, update), and the costliest ops are listed.
"""

import collections
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple

import jax
from absl import app, flags

from chimera.data.corpora import write_atomic
from chimera.errors import ChimeraError, parse_flags_and_args, tool_main

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+) = .*? ([a-z][a-z0-9-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')


class Op(NamedTuple):
  opcode: str  # "fusion", "dot", "custom-call", ...
  op_name: str  # the metadata's jax name stack, e.g. "jit(train_step)/jvp(Decoder)/block_0/attn/..."
  target: str = ""  # a custom-call's custom_call_target, e.g. "__cublas$lt$matmul"


def hlo_ops(hlo_text: str) -> dict[str, Op]:
  """Every instruction of an HLO module's text, by name (also with "." written "_", as GPU
  kernels spell them).

  An instruction with no jax name of its own (XLA adds some, such as a transpose of a
  weight into the layout a dot wants) takes the name of the first instruction after it
  that reads it and has one, so that its time counts where it is spent.
  """
  ops, lines = {}, hlo_text.splitlines()
  for i, line in enumerate(lines):
    match = _INSTRUCTION.match(line)
    if match:
      op_name, target = _OP_NAME.search(line), _TARGET.search(line)
      name = match.group(1)
      op = Op(match.group(2), op_name.group(1) if op_name else _reader_name(lines, i, name),
              target.group(1) if target else "")
      ops[name] = op
      ops.setdefault(name.replace(".", "_"), op)
  return ops


def _reader_name(lines: list[str], index: int, name: str) -> str:
  """The jax name of the first instruction after lines[index], in the same computation,
  that reads `name`; "" if none has one."""
  read = re.compile(rf"[(,]\s*%?{re.escape(name)}[,)]")
  for line in lines[index + 1:]:
    if line.startswith("}"):
      return ""  # the end of the computation
    if read.search(line.split("=", 1)[-1]):
      op_name = _OP_NAME.search(line)
      if op_name:
        return op_name.group(1)
  return ""


def model_part(op_name: str, outside: str = "optimizer, metrics") -> str:
  """The part of the step an op belongs to, from its jax name stack; `outside` names the
  ops outside the model and its loss (the optimizer in a train step, the sampling and the
  loop in decoding)."""
  segments = op_name.split("/")
  decoder = next((i for i, s in enumerate(segments) if "Decoder" in s), None)
  if decoder is None:
    return "loss" if "cross_entropy" in op_name else outside
  inner = [s for s in segments[decoder + 1:] if not s.startswith("block_")]
  module = inner[0] if len(inner) > 1 else ""  # the last segment is the op itself
  if module == "embed.attend":
    return "head"
  if module.startswith("norm"):
    return "norms"
  return {"embed": "embedding", "attn": "attention", "mlp": "mlp", "moe": "moe"}.get(
      module, "decoder, other")


def step_pass(op_name: str) -> str:
  if "transpose(" in op_name:
    return "backward"
  return "forward" if "jvp(" in op_name else "update"


def decode_part(op_name: str) -> str:
  return model_part(op_name, outside="sampling, loop")


def decode_pass(op_name: str) -> str:
  """Decoding runs the model forward only."""
  return "forward"


UNMATCHED = "(kernels not matched to an HLO op)"
# Ops that run other computations (a decode loop, a sampler's loop): on the host line their
# event spans their body's ops.
CONTAINERS = ("while", "conditional", "call")
COPIES = "(memory copies and sets)"
# Library kernels are named after their own code, not the instruction that called them:
# family -> (words in a kernel's name, words in the calling custom-call's target).
_LIBRARIES = {"cudnn": (("cudnn", "sdpa", "fmha"), ("cudnn",)),
              "cublas": (("nvjet", "gemm", "xmma", "cutlass", "cublas"), ("cublas",)),
              "cub": (("cub::", "radixsort", "devicesort"), ("cub_",))}


def entry_order(hlo_text: str) -> list[str]:
  """The instructions of a compiled module's ENTRY computation, in its schedule order (the
  order XLA prints a scheduled module in, and the order one stream runs them in)."""
  order, inside = [], False
  for line in hlo_text.splitlines():
    if line.startswith("ENTRY "):
      inside = True
    elif inside and line.startswith("}"):
      break
    elif inside and (match := _INSTRUCTION.match(line)):
      order.append(match.group(1))
  return order


def _library(kernel: str) -> tuple[str | None, bool]:
  """(library family of a kernel's name or None, whether it is the call's main kernel).
  cuDNN's attention backward runs helper kernels around its flash kernel: those do not
  start a new call."""
  lowered = kernel.lower()
  for family, (words, _) in _LIBRARIES.items():
    if any(w in lowered for w in words):
      return family, family != "cudnn" or "sdpa" in lowered or "flash" in lowered
  return None, False


class _LibraryAligner:
  """Attributes library kernels (cuBLAS GEMMs, cuDNN attention, CUB sorts) to the
  custom-calls that launched them. On one stream kernels run in the ENTRY schedule's
  order, and fusion kernels are named after an instruction: so a library kernel belongs
  to the next custom-call of its library after the furthest instruction seen."""

  def __init__(self, ops: dict[str, Op], order: list[str]):
    self.position = {}
    for i, name in enumerate(order):
      self.position[name] = self.position[name.replace(".", "_")] = i
    self.calls = {family: [(i, n) for i, n in enumerate(order) if ops[n].opcode == "custom-call"
                           and any(w in ops[n].target.lower() for w in targets)]
                  for family, (_, targets) in _LIBRARIES.items()}
    self.cursor = -1

  def seen(self, name: str) -> None:
    # Only forward: XLA reuses one compiled kernel for identical fusions, under the name of
    # the first, so a kernel's name can point back in the schedule. A new step shows as a
    # library call with none of its kind left after the cursor (`call`).
    self.cursor = max(self.cursor, self.position.get(name, -1))

  def call(self, kernel: str) -> str | None:
    family, starts_call = _library(kernel)
    calls = self.calls.get(family) or []
    if not calls:
      return None
    after = [c for c in calls if c[0] > self.cursor]
    if not starts_call:  # a helper: the call it runs for is next, or the one just run
      return (after or calls[-1:])[0][1]
    position, name = after[0] if after else calls[0]  # none left: the next step began
    self.cursor = position
    return name


def _hlo_name(event: dict, ops: dict[str, Op]) -> str | None:
  """The HLO instruction a trace event ran: its name (an XLA Ops line, a fusion's kernel),
  else the `hlo_op` its args carry (library kernels such as cuBLAS GEMMs and cuDNN
  attention, which are named after their own code). None if neither is an instruction."""
  args = event.get("args") or {}
  for candidate in (event.get("name", ""), args.get("hlo_op", ""), args.get("long_name", "")):
    name = str(candidate).lstrip("%").split(" ")[0]
    if name in ops:
      return name
  return None


def op_seconds(trace: dict, ops: dict[str, Op],
               order: list[str] | None = None) -> tuple[collections.Counter, str]:
  """Seconds per HLO instruction in a perfetto trace, and where they were read: device
  processes (GPU, TPU) win over the host; on a device, the "XLA Ops" line if it has one,
  else every kernel. With the ENTRY schedule (`entry_order`), library kernels are
  attributed to their custom-calls (`_LibraryAligner`); memory copies and sets, and
  kernels still unmatched, get rows of their own."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  processes, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      processes[e["pid"]] = e["args"]["name"]
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e["tid"])] = e["args"]["name"]
  devices = {pid for pid, name in processes.items() if "/device:" in name}
  op_lines = {key for key, name in threads.items() if key[0] in devices and name == "XLA Ops"}
  seconds = collections.Counter()
  aligner = _LibraryAligner(ops, order or [])
  for e in sorted((e for e in events if e.get("ph") == "X"), key=lambda e: e.get("ts", 0.0)):
    if devices and e["pid"] not in devices:
      continue
    if op_lines and (e["pid"], e.get("tid")) not in op_lines:
      continue
    name = _hlo_name(e, ops)
    if name is not None and ops[name].opcode in CONTAINERS:
      continue  # its time is its body's ops', counted on their own
    if name is not None:
      aligner.seen(name)
    elif devices:
      kernel = e.get("name", "")
      name = aligner.call(kernel) or (
          COPIES if re.match(r"(memcpy|memset)", kernel, re.I) else UNMATCHED)
    else:
      continue
    seconds[name] += e.get("dur", 0.0) / 1e6
  source = ("device XLA Ops line" if op_lines else "device kernels") if devices else "host"
  return seconds, source


def summarize(seconds: collections.Counter, ops: dict[str, Op], steps: int,
              step_seconds: float, top: int, part_of: Callable[[str], str] = model_part,
              pass_of: Callable[[str], str] = step_pass) -> dict:
  """Per-step seconds by model part and pass (`part_of`, `pass_of` of each op's jax name
  stack), and the `top` costliest ops."""
  by_part = collections.defaultdict(lambda: collections.Counter())
  for name, s in seconds.items():
    if name in (UNMATCHED, COPIES):  # no op_name to place it by: a row of its own
      by_part[name]["?"] += s / steps
      continue
    op = ops[name]
    by_part[part_of(op.op_name)][pass_of(op.op_name)] += s / steps
  costliest = [{"op": name, "opcode": ops.get(name, Op("?", "")).opcode,
                "seconds": s / steps, "jax": ops.get(name, Op("?", "")).op_name}
               for name, s in seconds.most_common(top)]
  return {"step_seconds": step_seconds, "op_seconds": sum(seconds.values()) / steps,
          "by_part": {part: dict(passes) for part, passes in
                      sorted(by_part.items(), key=lambda kv: -sum(kv[1].values()))},
          "top_ops": costliest}


# On a host trace (XLA:CPU) two cores' ops overlap, so their sum can pass the step; a sum
# under this share of the untraced step means time the trace did not see.
UNTRACED_NOTE = 0.75


def format_summary(summary: dict, unit: str = "step") -> str:
  """The summary as text; `unit` is what one of its steps is (a train step, a decoded
  token)."""
  total = max(summary["op_seconds"], 1e-12)  # shares of nothing, if no op was traced
  untraced = (f"{unit} {1e3 * summary['step_seconds']:.2f} ms (median, no profiler)"
              if summary["step_seconds"] else f"{unit} time without the profiler not given")
  lines = [f"{untraced}; ops in the trace ({summary['events']}) {1e3 * total:.2f} ms per {unit}"]
  if summary["events"] == "host" and summary["op_seconds"] < UNTRACED_NOTE * (
      summary["step_seconds"] or 0.0):
    lines.append(f"note: the ops add up to {summary['op_seconds'] / summary['step_seconds']:.0%} "
                 f"of the untraced {unit}; the trace missed the rest, so the parts it traced "
                 f"short are understated below (on XLA:CPU, the dots Eigen runs, "
                 f"kernels.cpu_dots='eigen', are traced shorter than they run: "
                 f"docs/performance.md)")
  lines += ["", "part | forward ms | backward ms | update ms | share of op time"]
  for part, passes in summary["by_part"].items():
    ms = [1e3 * passes.get(p, 0.0) for p in ("forward", "backward", "update")]
    cells = " | ".join(f"{t:.2f}" for t in ms) if "?" not in passes else "? | ? | ?"
    share = sum(passes.values()) / total
    lines.append(f"{part} | {cells} | {share:.1%}")
  lines += ["", f"op | opcode | ms per {unit} | share | jax"]
  for op in summary["top_ops"]:
    where = re.sub(r"^jit\((train_step|generate)\)/", "", op["jax"])[:110]
    lines.append(f"{op['op']} | {op['opcode']} | {1e3 * op['seconds']:.3f} | "
                 f"{op['seconds'] / total:.1%} | {where}")
  return "\n".join(lines)


def profile(run_steps: Callable[[], object], hlo_text: str, steps: int, step_seconds: float,
            top: int = 15, keep: Path | None = None, part_of: Callable[[str], str] = model_part,
            pass_of: Callable[[str], str] = step_pass) -> dict:
  """Traces `run_steps()` (which runs `steps` steps of the compiled step whose HLO is
  `hlo_text`) and summarises where the time went; `step_seconds` is the untraced median.
  With `keep` (a path prefix), the trace and the HLO are also written to
  `<keep>.trace.json.gz` and `<keep>.hlo.txt`, and what they hold (`steps`, the untraced
  `step_seconds`, whether it is a decoding trace) to `<keep>.json`, to read again with
  `summarize_kept` or `python -m chimera.bench_profile <keep>`.
  `part_of` and `pass_of` place each op (`summarize`): a train step's by default,
  `decode_part` and `decode_pass` for decoding."""
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      run_steps()
    trace_file = next(Path(trace_dir).glob("**/perfetto_trace.json.gz"))
    if keep is not None:  # each file whole or not at all (a Ctrl-C between them included)
      write_atomic(Path(f"{keep}.trace.json.gz"), Path(trace_file).read_bytes())
      write_atomic(Path(f"{keep}.hlo.txt"), hlo_text.encode())
      write_atomic(Path(f"{keep}.json"), json.dumps({
          "steps": steps, "step_seconds": step_seconds, "decode": part_of is decode_part}).encode())
    return summarize_trace(trace_file, hlo_text, steps, step_seconds, top, part_of, pass_of)


def summarize_trace(trace_file: str | Path, hlo_text: str, steps: int, step_seconds: float,
                    top: int = 15, part_of: Callable[[str], str] = model_part,
                    pass_of: Callable[[str], str] = step_pass) -> dict:
  """The summary of a perfetto trace (.json.gz) of `steps` steps of the compiled step
  whose HLO is `hlo_text`."""
  try:
    with gzip.open(trace_file) as f:
      trace = json.load(f)
  except (OSError, EOFError, ValueError) as error:  # cut short, or not a trace
    raise ChimeraError(f"{trace_file}: not a whole gzipped trace ({type(error).__name__}: "
                       f"{error})") from None
  ops = hlo_ops(hlo_text)
  seconds, source = op_seconds(trace, ops, entry_order(hlo_text))
  return {**summarize(seconds, ops, steps, step_seconds, top, part_of, pass_of),
          "events": source}


def summarize_kept(prefix: str, steps: int, step_seconds: float, top: int = 15,
                   decode: bool = False) -> dict:
  """`profile`'s summary from the files `profile(keep=prefix)` wrote (the HLO may be
  gzipped, as `<prefix>.hlo.txt.gz`); `decode`: a decoding trace, `steps` its tokens."""
  hlo = Path(f"{prefix}.hlo.txt")
  hlo_text = hlo.read_text() if hlo.exists() else gzip.decompress(
      Path(f"{hlo}.gz").read_bytes()).decode()
  places = (decode_part, decode_pass) if decode else (model_part, step_pass)
  return summarize_trace(f"{prefix}.trace.json.gz", hlo_text, steps, step_seconds, top,
                         *places)


def kept_settings(prefix: str, steps: int | None, step_ms: float | None,
                  decode: bool | None) -> tuple[int, float, bool]:
  """The steps, untraced step seconds and kind of the trace kept at `prefix`: from
  `<prefix>.json` where `profile(keep=...)` wrote it, else from the flags (--steps is then
  required: a wrong count scales every figure). A flag that contradicts the kept record is
  refused, in one line."""
  record = Path(f"{prefix}.json")
  try:
    kept = json.loads(record.read_text()) if record.is_file() else {}
  except ValueError as error:
    raise ChimeraError(f"{record}: not the JSON the profile kept ({error})") from None
  if steps is not None and steps < 1:
    raise ChimeraError(f"--steps: must be >= 1, got {steps}")
  if step_ms is not None and step_ms < 0:
    raise ChimeraError(f"--step_ms: must be >= 0, got {step_ms}")
  for flag, given, saved in (("steps", steps, kept.get("steps")),
                             ("decode", decode, kept.get("decode"))):
    if given is not None and saved is not None and given != saved:
      raise ChimeraError(f"--{flag}={given}: the trace at {prefix} holds "
                         f"{flag}={saved} ({record})")
  steps = steps if steps is not None else kept.get("steps")
  if steps is None:
    raise ChimeraError(f"--steps: required for {prefix}, which has no {record.name} saying "
                       f"how many steps (or tokens) its trace holds")
  # chimera.bench keeps a decoding trace as '<case>_decode_bN'.
  decode = (decode if decode is not None else kept.get("decode")) or (
      re.search(r"_decode_b\d+$", prefix) is not None)
  seconds = step_ms / 1e3 if step_ms is not None else kept.get("step_seconds", 0.0)
  return steps, seconds, decode


@tool_main
def main(argv):
  if len(argv) != 2:
    raise SystemExit("usage: python -m chimera.bench_profile PREFIX [--steps=N] [--step_ms=MS]"
                     " [--decode]")
  f, prefix = flags.FLAGS, argv[1]
  wanted = [f"{prefix}.trace.json.gz", f"{prefix}.hlo.txt or {prefix}.hlo.txt.gz"]
  if not (Path(f"{prefix}.trace.json.gz").is_file()
          and (Path(f"{prefix}.hlo.txt").is_file() or Path(f"{prefix}.hlo.txt.gz").is_file())):
    print(f"error: PREFIX: no kept profile at {prefix} (chimera.bench --profile_dir writes "
          f"{' and '.join(wanted)})", file=sys.stderr)
    sys.exit(2)
  try:
    steps, step_seconds, decode = kept_settings(prefix, f.steps, f.step_ms, f.decode)
  except ChimeraError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  summary = summarize_kept(prefix, steps, step_seconds, decode=decode)
  print(format_summary(summary, unit="token" if decode else "step"))


if __name__ == "__main__":
  flags.DEFINE_integer("steps", None, "Train steps the trace holds (chimera.bench's --steps); "
                       "with --decode, the single-token forwards traced: one less than its "
                       "--new_tokens (256), cut to max_len minus the prompt where the model is "
                       "shorter (chimera.bench.decode_lengths). Default: PREFIX.json's, which "
                       "chimera.bench --profile_dir writes; required without it.")
  flags.DEFINE_float("step_ms", None, "The untraced step (or token) time to print beside it "
                     "(default: PREFIX.json's, else none).")
  flags.DEFINE_bool("decode", None, "The trace is of decoding: parts as for decoding, "
                    "figures per token (default: PREFIX.json's; implied by a prefix ending in "
                    "'_decode_bN').")
  app.run(main, flags_parser=parse_flags_and_args)
