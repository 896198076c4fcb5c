"""Where a train step's time goes: a jax.profiler trace of a few steps, summed by op.

  python -m chimera.bench --configs=configs/dense.py:gpu --profile --repeats=1

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
import shutil
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple

import jax

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+) = .*? ([a-z][a-z0-9-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


class Op(NamedTuple):
  opcode: str  # "fusion", "dot", "custom-call", ...
  op_name: str  # the metadata's jax name stack, e.g. "jit(train_step)/jvp(Decoder)/block_0/attn/..."


def hlo_ops(hlo_text: str) -> dict[str, Op]:
  """Every instruction of an HLO module's text, by name (also with "." written "_", as GPU
  kernels spell them)."""
  ops = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      op_name = _OP_NAME.search(line)
      name, op = match.group(1), Op(match.group(2), op_name.group(1) if op_name else "")
      ops[name] = op
      ops.setdefault(name.replace(".", "_"), op)
  return ops


def model_part(op_name: str) -> str:
  """The part of the step an op belongs to, from its jax name stack."""
  segments = op_name.split("/")
  decoder = next((i for i, s in enumerate(segments) if "Decoder" in s), None)
  if decoder is None:
    return "loss" if "cross_entropy" in op_name else "optimizer, metrics"
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


UNMATCHED = "(kernels not matched to an HLO op)"


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


def op_seconds(trace: dict, ops: dict[str, Op]) -> tuple[collections.Counter, str]:
  """Seconds per HLO instruction in a perfetto trace, and where they were read: device
  processes (GPU, TPU) win over the host; on a device, the "XLA Ops" line if it has one,
  else every kernel."""
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
  for e in events:
    if e.get("ph") != "X" or (devices and e["pid"] not in devices):
      continue
    if op_lines and (e["pid"], e.get("tid")) not in op_lines:
      continue
    name = _hlo_name(e, ops)
    if name is not None:
      seconds[name] += e.get("dur", 0.0) / 1e6
    elif devices:
      seconds[UNMATCHED] += e.get("dur", 0.0) / 1e6
  source = ("device XLA Ops line" if op_lines else "device kernels") if devices else "host"
  return seconds, source


def summarize(seconds: collections.Counter, ops: dict[str, Op], steps: int,
              step_seconds: float, top: int) -> dict:
  """Per-step seconds by model part and pass, and the `top` costliest ops."""
  by_part = collections.defaultdict(lambda: collections.Counter())
  for name, s in seconds.items():
    if name == UNMATCHED:  # no op_name to place it by: its own row, not "optimizer"
      by_part[UNMATCHED]["?"] += s / steps
      continue
    op = ops[name]
    by_part[model_part(op.op_name)][step_pass(op.op_name)] += s / steps
  costliest = [{"op": name, "opcode": ops.get(name, Op("?", "")).opcode,
                "seconds": s / steps, "jax": ops.get(name, Op("?", "")).op_name}
               for name, s in seconds.most_common(top)]
  return {"step_seconds": step_seconds, "op_seconds": sum(seconds.values()) / steps,
          "by_part": {part: dict(passes) for part, passes in
                      sorted(by_part.items(), key=lambda kv: -sum(kv[1].values()))},
          "top_ops": costliest}


def format_summary(summary: dict) -> str:
  total = max(summary["op_seconds"], 1e-12)  # shares of nothing, if no op was traced
  lines = [f"step {1e3 * summary['step_seconds']:.2f} ms (median, no profiler); ops in the "
           f"trace ({summary['events']}) {1e3 * total:.2f} ms per step",
           "", "part | forward ms | backward ms | update ms | share of op time"]
  for part, passes in summary["by_part"].items():
    ms = [1e3 * passes.get(p, 0.0) for p in ("forward", "backward", "update")]
    cells = " | ".join(f"{t:.2f}" for t in ms) if "?" not in passes else "? | ? | ?"
    share = sum(passes.values()) / total
    lines.append(f"{part} | {cells} | {share:.1%}")
  lines += ["", "op | opcode | ms per step | share | jax"]
  for op in summary["top_ops"]:
    where = re.sub(r"^jit\(train_step\)/", "", op["jax"])[:110]
    lines.append(f"{op['op']} | {op['opcode']} | {1e3 * op['seconds']:.3f} | "
                 f"{op['seconds'] / total:.1%} | {where}")
  return "\n".join(lines)


def profile(run_steps: Callable[[], object], hlo_text: str, steps: int, step_seconds: float,
            top: int = 15, keep: Path | None = None) -> dict:
  """Traces `run_steps()` (which runs `steps` steps of the compiled step whose HLO is
  `hlo_text`) and summarises where the time went; `step_seconds` is the untraced median.
  With `keep` (a path prefix), the trace and the HLO are also written to
  `<keep>.trace.json.gz` and `<keep>.hlo.txt`, to read again with `hlo_ops`/`op_seconds`."""
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      run_steps()
    trace_file = next(Path(trace_dir).glob("**/perfetto_trace.json.gz"))
    if keep is not None:
      keep.parent.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(trace_file, f"{keep}.trace.json.gz")
      Path(f"{keep}.hlo.txt").write_text(hlo_text)
    with gzip.open(trace_file) as f:
      trace = json.load(f)
  ops = hlo_ops(hlo_text)
  seconds, source = op_seconds(trace, ops)
  return {**summarize(seconds, ops, steps, step_seconds, top), "events": source}
