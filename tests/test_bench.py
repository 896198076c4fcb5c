"""chimera.bench: the records `--json` writes, the tokens it times, the peak it divides by."""

import dataclasses
import gzip
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from chimera import bench, bench_profile
from chimera.data.batches import WindowSampler, make_splits
from chimera.data.corpora import load_corpus
from chimera.data.tokenizers import get_tokenizer
from chimera.errors import ChimeraError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_json_records(tmp_path, corpus):
  out = tmp_path / "bench.json"
  result = subprocess.run(
      [sys.executable, "-m", "chimera.bench",
       "--configs=configs/dense.py:tiny,configs/moe_top2.py:tiny", f"--set=data.corpus={corpus}",
       "--variants=model.dispatch=einsum,dropless", "--repeats=1", "--steps=2",
       "--prompt_len=64", "--new_tokens=256", "--decode_batches=1,2", f"--json={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  records = bench.load_records(out)
  # Dense does not read model.dispatch (config.MOE_ONLY): one row, under its own name.
  assert [(r.name, r.spec) for r in records] == [
      ("configs/dense.py:tiny", "configs/dense.py:tiny"),
      ("configs/moe_top2.py:tiny dispatch=einsum", "configs/moe_top2.py:tiny"),
      ("configs/moe_top2.py:tiny dispatch=dropless", "configs/moe_top2.py:tiny")]
  assert records[0].overrides == {"data.corpus": str(corpus)}
  assert records[2].overrides == {"data.corpus": str(corpus), "model.dispatch": "dropless"}
  for record in records:
    assert record.token_ids == f"corpus:{corpus}/byte"
    for field in ("train_step_seconds", "train_tokens_per_second", "mfu", "peak_memory_bytes",
                  "measured_peak_flops", "flops_per_token"):
      assert getattr(record, field) > 0, field
    assert 0 < record.mfu < 1
    # A CPU is not in the nominal table: MFU falls back to the measured peak, and says so.
    assert record.peak_source == "measured"
    assert record.mfu == record.mfu_vs_measured_peak
    # tiny has max_len 64: the prompt is cut to half of it and the new tokens to the rest.
    assert [(d.batch, d.prompt_len, d.new_tokens) for d in record.decode] == [(1, 32, 32),
                                                                              (2, 32, 32)]
    assert record.decode_speed(2).tokens_per_second > 0 and record.decode_speed(2).prefill_ms > 0
  # A ratio of two timings (routing alone over the whole layer): at :tiny's sizes their noise
  # can put it past 1 (1.008 in one CI run), so only its presence is checked here.
  assert records[1].dispatch_share_of_moe_layer > 0
  assert records[0].dispatch_share_of_step is None
  assert "configs/moe_top2.py:tiny dispatch=einsum" in result.stdout  # the printed table
  header = next(line for line in result.stdout.splitlines() if line.startswith("name |"))
  assert "decode b1 ms/tok | decode b2 tok/s" in header  # a column per batch measured
  comparisons = [line for line in result.stdout.splitlines() if " vs " in line]
  assert len(comparisons) == 2 and all(", decode b2 " in line for line in comparisons)
  assert bench.load_records(out) == records  # to_json and from_json round-trip


@pytest.mark.parametrize("device_kind,dtype,peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H200", "bfloat16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
    ("NVIDIA A100-SXM4-80GB", "float32", 156e12),
    ("NVIDIA L40S", "bfloat16", 362e12),
    ("NVIDIA L4", "bfloat16", 121e12),
    ("TPU v4", "float32", None),
    ("cpu", "bfloat16", None),
    # Whole names only: an RTX A1000 is not an A100.
    ("NVIDIA RTX A1000 Laptop GPU", "bfloat16", None),
    # The NVL parts are not the SXM ones: unknown, so the measured peak is used.
    ("NVIDIA H100 NVL", "bfloat16", None),
    ("NVIDIA H200 NVL", "bfloat16", None),
    ("NVIDIA GH200 480GB", "bfloat16", 989e12),
    ("TPU v5p", "bfloat16", 459e12),
    ("TPU v5 lite", "bfloat16", 197e12),
])
def test_nominal_peak_by_device_kind(device_kind, dtype, peak):
  assert bench.nominal_peak_flops(device_kind, dtype) == peak


def test_moe_split_times_a_layer_on_a_micro_batch(make_config, corpus):
  """With grad_accum, a step runs each MoE layer once per micro-batch: the split times the
  layer at the micro-batch (and counts it grad_accum times in the step's share)."""
  config = make_config("moe_top2", corpus, train__batch_size=8, train__grad_accum=4)
  assert bench.moe_split_shape(config) == (2, config.train.context, config.model.d_model)


def test_device_line_gives_each_dtype_its_peak():
  record = lambda name, dtype, peak, source: bench.BenchRecord(
      name=name, spec=name, overrides={}, kernels={}, token_ids="random",
      device="NVIDIA H100 80GB HBM3", jax_version="0.11.2", params_total=1, params_active=1,
      flops_per_token=1, train_step_seconds=1.0, train_tokens_per_second=1.0, mfu=0.1,
      peak_flops=peak, peak_source=source, measured_peak_flops=peak / 2,
      mfu_vs_measured_peak=0.2, peak_memory_bytes=None, process_peak_memory_bytes=None,
      dtype=dtype)
  bf16 = record("a", "bfloat16", 989e12, "nominal")
  assert bench.device_line([bf16, record("b", "bfloat16", 989e12, "nominal")]) == (
      "device: NVIDIA H100 80GB HBM3, jax 0.11.2; bfloat16: MFU over the nominal peak "
      "989.0 TFLOP/s, measured matmul peak 494.5 TFLOP/s")
  line = bench.device_line([bf16, record("c", "float32", 67e12, "nominal"),
                            record("d", "bfloat16", 989e12, "nominal")])
  assert "bfloat16 (a, d): MFU over the nominal peak 989.0" in line
  assert "float32 (c): MFU over the nominal peak 67.0 TFLOP/s, measured matmul peak 33.5" in line
  # The process's peak device memory is one figure for the run, said once.
  on_gpu = dataclasses.replace(bf16, process_peak_memory_bytes=3 * 2**30)
  assert bench.device_line([on_gpu]).endswith(
      "; the process's peak device memory, every config's buffers together: 3.00 GiB")
  # Records written before it had its name read as it.
  old = {**on_gpu.to_json(), "device_peak_memory_bytes": 5}
  del old["process_peak_memory_bytes"]
  assert bench.BenchRecord.from_json(old).process_peak_memory_bytes == 5


def test_token_batches_are_training_windows(make_config, corpus):
  config = make_config("dense", corpus, train__grad_accum=2)
  batches = bench.token_batches(config, count=3, random_ids=False)
  t = config.train
  assert batches.shape == (3, 2, t.batch_size // 2, t.context + 1)
  train = make_splits(load_corpus(str(corpus)), get_tokenizer("byte"),
                      val_fraction=config.data.val_fraction, mode=config.data.split).train
  sampler = WindowSampler(train, batch_size=t.batch_size, window=t.context + 1,
                          seed=config.data.seed)
  for batch in batches:
    np.testing.assert_array_equal(batch.reshape(t.batch_size, -1), sampler.next())
  random = bench.token_batches(config, count=2, random_ids=True)
  assert random.shape == (2, *batches.shape[1:])
  assert 0 <= random.min() and random.max() < config.model.vocab_size


def test_decode_lengths_fit_max_len():
  settings = bench.Settings(prompt_len=64, new_tokens=256)
  assert bench.decode_lengths(settings, max_len=512) == (64, 256)
  assert bench.decode_lengths(settings, max_len=64) == (32, 32)
  assert bench.decode_lengths(settings, max_len=300) == (64, 236)


def test_variants_of_kernels_and_ids(corpus, tmp_path):
  overrides = {"data.corpus": str(corpus)}
  cases = bench.make_cases(["configs/dense.py:tiny"], overrides,
                           ["kernels.embed_grad=onehot,sorted"], random_ids=False)
  assert [(c.name, c.kernels.embed_grad) for c in cases] == [
      ("configs/dense.py:tiny embed_grad=onehot", "onehot"),
      ("configs/dense.py:tiny embed_grad=sorted", "sorted")]
  # Two lists of variants add up; the default case they share is measured once.
  cases = bench.make_cases(["configs/dense.py:tiny"], overrides,
                           ["ids=corpus,random", "kernels.embed_grad=sorted"], False)
  assert [c.random_ids for c in cases] == [False, True]
  # A config override at the config's own value is that case too (moe_top2 is dropless).
  moe = bench.make_cases(["configs/moe_top2.py:tiny"], overrides,
                         ["model.dispatch=einsum,dropless", "ids=corpus,random"], False)
  assert [c.name.split()[-1] for c in moe] == ["dispatch=einsum", "dispatch=dropless",
                                                "ids=random"]
  # A field only an MoE reads is one row of a dense config, under its own name (its
  # values still checked); model.num_experts makes dense an MoE, so it is a variant.
  dense = bench.make_cases(["configs/dense.py:tiny"], overrides,
                           ["model.dispatch=einsum,dropless"], False)
  assert [(c.name, c.overrides) for c in dense] == [("configs/dense.py:tiny", overrides)]
  assert len(bench.make_cases(["configs/dense.py:tiny"], overrides,
                              ["model.num_experts=0,4"], False)) == 2
  # Nor are fields the timed step never reads rows of their own: the capacity of a
  # dropless MoE, the loop's logging (their "speedups" were noise); einsum reads capacity.
  # Nor its seeds or name: other numbers, the same work ("name=b vs name=a: 0.23x").
  for variant in ("model.capacity_factor=1.0,4.0", "train.log_every=1,50", "train.seed=1,2",
                  "data.seed=1,2", "name=a,b"):
    assert [c.name for c in bench.make_cases(["configs/moe_top2.py:tiny"], overrides,
                                             [variant], False)] == ["configs/moe_top2.py:tiny"]
  assert len(bench.make_cases(["configs/moe_top2.py:tiny"],
                              {**overrides, "model.dispatch": "einsum"},
                              ["model.capacity_factor=1.0,4.0"], False)) == 2
  with pytest.raises(ChimeraError, match="model.dispatch"):
    bench.make_cases(["configs/dense.py:tiny"], overrides, ["model.dispatch=bogus"], False)
  for settings, variants in (({**overrides, "mesh.expert": 2}, []),
                            (overrides, ["mesh.data=1,2"])):
    with pytest.raises(ChimeraError, match=r"^--(set|variants)=mesh\.(expert|data): the bench "
                                           r"times one device's step, whatever the mesh"):
      bench.make_cases(["configs/moe_top2.py:tiny"], settings, variants, False)
  # A config given twice timed one step against itself; a --set given twice kept the last.
  with pytest.raises(ChimeraError, match=r"^--configs: configs/dense\.py:tiny given twice"):
    bench.make_cases(["configs/dense.py:tiny", "configs/moe_top2.py:tiny",
                      "configs/dense.py:tiny"], overrides, [], False)
  with pytest.raises(ChimeraError, match=r"^--set: train\.batch_size is given twice \(16 and "
                                         r"8\); give it once$"):
    bench.parse_overrides("set", ["train.batch_size=16", "train.steps=3", "train.batch_size=8"])
  with pytest.raises(ChimeraError, match=r"^'=5': expected section\.field=value$"):
    bench.parse_overrides("set", ["=5"])  # was "config.: unknown field"
  assert bench.parse_overrides("set", ["train.batch_size=16", "train.steps=3"]) == {
      "train.batch_size": 16, "train.steps": 3}
  with pytest.raises(ChimeraError, match="kernels.embed_grad"):
    bench.make_cases(["configs/dense.py:tiny"], overrides, ["kernels.embed_grad=gather"], False)
  with pytest.raises(ChimeraError, match="ids"):
    bench.make_cases(["configs/dense.py:tiny"], overrides, ["ids=zipf"], False)
  records = bench.run(cases, repeats=1,
                      settings=bench.Settings(steps=2, decode_batches=(), profile=True,
                                              profile_dir=str(tmp_path)))
  assert [r.token_ids for r in records] == [f"corpus:{corpus}/byte", "random"]
  assert all(r.decode == () for r in records)
  profile = records[0].profile  # where the step's time goes, from a jax.profiler trace
  assert {"embedding", "attention", "mlp", "norms", "head", "loss", "optimizer, metrics"} <= set(
      profile["by_part"])
  assert 0 < profile["op_seconds"] and profile["top_ops"][0]["seconds"] > 0
  # The kept trace and HLO give the same ops again, offline.
  kept = str(sorted(tmp_path.glob("*.hlo.txt"))[0]).removesuffix(".hlo.txt")
  assert len(list(tmp_path.glob("*.trace.json.gz"))) == len(records)
  ops = bench_profile.hlo_ops(Path(f"{kept}.hlo.txt").read_text())
  with gzip.open(f"{kept}.trace.json.gz") as f:
    seconds, _ = bench_profile.op_seconds(json.load(f), ops)
  assert seconds and set(seconds) <= set(ops)
  # ... and it says how many steps it holds, so the figures per step read offline are the
  # bench's without the caller having to remember its --steps.
  mine = next(r.profile for r in records
              if kept.endswith(re.sub(r"[^A-Za-z0-9._-]+", "_", r.name)))
  assert json.loads(Path(f"{kept}.json").read_text())["steps"] == 2
  steps, step_seconds, decode = bench_profile.kept_settings(kept, None, None, None)
  assert (steps, step_seconds, decode) == (2, mine["step_seconds"], False)
  again = bench_profile.summarize_kept(kept, steps, step_seconds)
  assert again["op_seconds"] == pytest.approx(mine["op_seconds"])


@pytest.mark.parametrize("flag, message", [
    ("--repeats=0", "--repeats: must be >= 1, got 0"),
    ("--steps=0", "--steps: must be >= 1, got 0"),
    ("--new_tokens=0", "--new_tokens: must be >= 1, got 0"),
    ("--decode_batches=a", "--decode_batches: expected positive integers, got 'a'"),
    ("--configs=", "--configs: no config given"),
])
def test_bad_bench_flags_are_one_line(flag, message):
  result = subprocess.run([sys.executable, "-m", "chimera.bench", flag], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and result.stderr.strip() == f"error: {message}"


def _kept_profile(folder: Path, name: str, record: dict | None) -> str:
  """A kept profile's files (an empty trace and HLO: enough for the flag checks)."""
  prefix = folder / name
  with gzip.open(f"{prefix}.trace.json.gz", "wt") as f:
    json.dump({"traceEvents": []}, f)
  Path(f"{prefix}.hlo.txt").write_text("HloModule m\n")
  if record is not None:
    Path(f"{prefix}.json").write_text(json.dumps(record))
  return str(prefix)


@pytest.mark.parametrize("record, flags, message", [
    ({"steps": 5, "step_seconds": 0.1, "decode": False}, ["--steps=10"],
     "--steps=10: the trace at {p} holds steps=5 ({p}.json)"),
    ({"steps": 5, "step_seconds": 0.1, "decode": False}, ["--decode"],
     "--decode=True: the trace at {p} holds decode=False ({p}.json)"),
    (None, [], "--steps: required for {p}, which has no kept.json saying how many steps (or "
     "tokens) its trace holds"),
    (None, ["--steps=0"], "--steps: must be >= 1, got 0"),
    (None, ["--steps=3", "--step_ms=-1"], "--step_ms: must be >= 0, got -1.0"),
])
def test_bad_offline_profile_flags_are_one_line(tmp_path, record, flags, message):
  """chimera.bench_profile divides every op's time by the steps the trace holds: a count
  that is missing, not positive, or not the one the bench kept beside the trace would
  print wrong figures (or divide by zero), so it is refused in one line."""
  prefix = _kept_profile(tmp_path, "kept", record)
  result = subprocess.run([sys.executable, "-m", "chimera.bench_profile", prefix, *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and result.stderr.strip() == "error: " + message.format(
      p=prefix)


def test_offline_profile_flags_agree_with_what_was_kept(tmp_path):
  """Flags that repeat the kept record, or fill in for a record that is missing, are used."""
  kept = _kept_profile(tmp_path, "kept", {"steps": 5, "step_seconds": 0.25, "decode": True})
  assert bench_profile.kept_settings(kept, 5, None, True) == (5, 0.25, True)
  assert bench_profile.kept_settings(kept, None, 100.0, None) == (5, 0.1, True)
  bare = _kept_profile(tmp_path, "bare_decode_b8", None)
  assert bench_profile.kept_settings(bare, 7, None, None) == (7, 0.0, True)
  plain = _kept_profile(tmp_path, "plain", None)
  assert bench_profile.kept_settings(plain, 7, 2.0, None) == (7, 0.002, False)
  # Kept files cut short (a copy interrupted before they were written whole): one line.
  Path(f"{kept}.json").write_text('{"steps": 5, "step_')
  with pytest.raises(ChimeraError, match=r"kept\.json: not the JSON the profile kept"):
    bench_profile.kept_settings(kept, None, None, None)
  Path(f"{plain}.trace.json.gz").write_bytes(gzip.compress(b'{"traceEvents": [')[:20])
  with pytest.raises(ChimeraError, match=r"plain\.trace\.json\.gz: not a whole gzipped trace"):
    bench_profile.summarize_kept(str(plain), 7, 0.002)


def test_output_paths_the_bench_cannot_write_are_refused_before_it_measures(tmp_path):
  """--json and --profile_dir are written after every measurement: a path the bench cannot
  take is one line first. A missing folder is made, and the JSON is written whole
  (chimera.data.corpora.write_atomic)."""
  def check(json_path=None, profile_dir=None, profile=True):
    bench.check_flags(types.SimpleNamespace(
        repeats=1, steps=1, prompt_len=1, new_tokens=1, decode_batches=["1"], configs=["x"],
        json=json_path and str(json_path), profile_dir=profile_dir and str(profile_dir),
        profile=profile))
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  with pytest.raises(ChimeraError, match=r"^--json: .* is a directory$"):
    check(tmp_path)
  with pytest.raises(ChimeraError, match=rf"^--json: cannot write under {a_file}$"):
    check(a_file / "sub" / "bench.json")
  # --profile_dir the same way, and only with --profile.
  with pytest.raises(ChimeraError, match=rf"^--profile_dir: {a_file} is a file$"):
    check(profile_dir=a_file)
  with pytest.raises(ChimeraError, match=rf"^--profile_dir: cannot write under {a_file}$"):
    check(profile_dir=a_file / "traces")
  with pytest.raises(ChimeraError, match=r"^--profile_dir: keeps the traces of --profile"):
    check(profile_dir=tmp_path / "traces", profile=False)
  check(profile_dir=tmp_path / "traces")
  new = tmp_path / "new" / "folder" / "bench.json"
  check(new)
  bench.save_records(new, [])
  assert bench.load_records(new) == []


def test_a_missing_corpus_is_one_line_before_anything_compiles(corpus, monkeypatch):
  """Every case's tokens are read first: the second config's missing corpus stops the bench
  before the first one is initialised or compiled."""
  cases = (bench.make_cases(["configs/dense.py:tiny"], {"data.corpus": str(corpus)}, [], False)
           + bench.make_cases(["configs/moe_top2.py:tiny"],
                              {"data.corpus": str(corpus.parent / "gone.txt")}, [], False))

  def no_init(*args, **kwargs):
    raise AssertionError("a state was initialised before every corpus was read")
  monkeypatch.setattr(bench, "init_state", no_init)
  with pytest.raises(ChimeraError, match=r"data.corpus: no such file: .*gone\.txt"):
    bench.run(cases, repeats=1, settings=bench.Settings(steps=1, decode_batches=()))


def test_bench_decodes_a_model_with_a_router_bias(corpus):
  """The router bias of aux-loss-free balancing lives in the state's model_state, outside
  the params: the bench's decoders must be given it, as chimera.generate's are (without
  it flax finds no "router_bias" collection and decoding fails)."""
  cases = bench.make_cases(["configs/moe_top2.py:tiny"],
                           {"data.corpus": str(corpus), "model.router_bias_rate": 1e-3}, [],
                           random_ids=False)
  assert cases[0].config.model.router_bias_rate == 1e-3
  (record,) = bench.run(cases, repeats=1, settings=bench.Settings(
      steps=1, batches=1, decode_batches=(2,), moe_split=False))
  assert record.decode_speed(2).tokens_per_second > 0


def test_profile_says_where_decoding_time_goes(corpus, tmp_path):
  """--profile traces decoding too, at the largest decode batch: the model's parts,
  forward only, and the sampling loop, per generated token."""
  cases = bench.make_cases(["configs/moe_top2.py:tiny"], {"data.corpus": str(corpus)}, [],
                           False)
  record, = bench.run(cases, repeats=1, settings=bench.Settings(
      steps=1, prompt_len=8, new_tokens=8, decode_batches=(1, 2), profile=True,
      profile_dir=str(tmp_path)))
  profile = record.decode_profile
  assert {"attention", "moe", "head", "sampling, loop"} <= set(profile["by_part"])
  assert {p for passes in profile["by_part"].values() for p in passes} <= {"forward", "?"}
  assert profile["op_seconds"] > 0
  assert profile["step_seconds"] == pytest.approx(record.decode_speed(2).ms_per_token / 1e3)
  kept, = tmp_path.glob("*decode_b2.trace.json.gz")
  # Read again offline (python -m chimera.bench_profile PREFIX --decode --steps=TOKENS-1).
  again = bench_profile.summarize_kept(str(kept).removesuffix(".trace.json.gz"), steps=7,
                                       step_seconds=profile["step_seconds"], decode=True)
  assert again["by_part"] == profile["by_part"]
  bench.save_records(tmp_path / "bench.json", [record])
  assert bench.load_records(tmp_path / "bench.json")[0].decode_profile == profile
  assert "per token" in bench_profile.format_summary(profile, unit="token")


def test_a_host_trace_that_misses_time_says_so():
  """A host trace whose ops add up to well under the untraced step (XLA:CPU's Eigen dots
  are traced shorter than they run) says so above its table; two overlapping cores' ops
  adding up to more than the step, or a device trace, do not."""
  summary = {"step_seconds": 0.4, "op_seconds": 0.2, "events": "host",
             "by_part": {"mlp": {"forward": 0.1, "backward": 0.1}}, "top_ops": []}
  note, = [line for line in bench_profile.format_summary(summary).splitlines()
           if line.startswith("note:")]
  assert note.startswith("note: the ops add up to 50% of the untraced step; the trace missed")
  for changed in ({"op_seconds": 0.45}, {"events": "device XLA Ops line"},
                  {"step_seconds": 0.0}):
    assert "note:" not in bench_profile.format_summary({**summary, **changed})


def test_profile_leaves_out_ops_that_contain_others():
  """A host trace spans a while loop's event over its body's ops: only the body counts."""
  hlo = """
ENTRY %main.1 (p: f32[4]) -> f32[4] {
  %while.1 = f32[4]{0} while(%p), condition=%c, body=%b, metadata={op_name="jit(generate)/while"}
  ROOT %fusion.2 = f32[4]{0} fusion(%while.1), kind=kLoop, calls=%f2, metadata={op_name="jit(generate)/while/body/Decoder/block_0/moe/mul"}
}"""
  ops = bench_profile.hlo_ops(hlo)
  trace = {"traceEvents": [
      {"ph": "X", "pid": 1, "tid": 9, "name": "while.1", "dur": 100.0},
      {"ph": "X", "pid": 1, "tid": 9, "name": "fusion.2", "dur": 40.0},
  ]}
  seconds, source = bench_profile.op_seconds(trace, ops)
  assert source == "host" and seconds == {"fusion.2": 40e-6}
  summary = bench_profile.summarize(seconds, ops, 1, 0.0, 5, bench_profile.decode_part,
                                    bench_profile.decode_pass)
  assert summary["by_part"] == {"moe": {"forward": 40e-6}}


def test_profile_places_an_unnamed_op_with_its_reader():
  """XLA's own transposes carry no jax name: they count where their result is read (the
  first reader with a name, in the same computation), or nowhere named."""
  hlo = """
%body (p: bf16[8,512,1024]) -> bf16[8,8192] {
  %p = bf16[8,512,1024]{2,1,0} parameter(0)
  %wrapped_transpose = bf16[512,8,1024]{2,1,0} fusion(%p), kind=kLoop, calls=%t, metadata={scheduling_name="wrapped_transpose"}
  %wrapped_transpose.10 = bf16[512,8,1024]{2,1,0} fusion(%p), kind=kLoop, calls=%t, metadata={scheduling_name="wrapped_transpose.10"}
  %bitcast.9 = bf16[512,8192]{1,0} bitcast(%wrapped_transpose.10), metadata={op_name="jit(generate)/while/body/Decoder/block_0/attn/dot_general"}
  %bitcast.1 = bf16[512,8192]{1,0} bitcast(%wrapped_transpose), metadata={op_name="jit(generate)/while/body/Decoder/block_0/moe/dot_general"}
  %wrapped_transpose.2 = bf16[512,8,1024]{2,1,0} fusion(%p), kind=kLoop, calls=%t, metadata={scheduling_name="wrapped_transpose.2"}
  ROOT %fusion.2 = bf16[8,8192]{1,0} fusion(%bitcast.1), kind=kCustom, calls=%g, metadata={op_name="jit(generate)/while/body/Decoder/block_0/moe/dot_general"}
}

ENTRY %main (q: bf16[4]) -> bf16[4] {
  ROOT %add.3 = bf16[4]{0} add(%wrapped_transpose.2, %q), metadata={op_name="jit(generate)/add"}
}"""
  ops = bench_profile.hlo_ops(hlo)
  # Its reader, not the earlier reader of "%wrapped_transpose.10" (a longer name).
  assert ops["wrapped_transpose"].op_name.endswith("block_0/moe/dot_general")
  assert bench_profile.decode_part(ops["wrapped_transpose"].op_name) == "moe"
  assert ops["wrapped_transpose.10"].op_name.endswith("block_0/attn/dot_general")
  # Read only in another computation: no name.
  assert ops["wrapped_transpose.2"].op_name == ""


def test_profile_sums_device_ops_by_part_and_pass():
  hlo = """
ENTRY %main.1 (p: f32[4]) -> f32[4] {
  %fusion.3 = f32[4]{0} fusion(%p), kind=kLoop, calls=%f3, metadata={op_name="jit(train_step)/jvp(Decoder)/block_0/attn/dot_general"}
  %dot.7 = f32[4]{0} dot(%p, %p), metadata={op_name="jit(train_step)/transpose(jvp(Decoder))/embed/rv,rm->vm/dot_general"}
  ROOT %add.2 = f32[4]{0} add(%p, %p), metadata={op_name="jit(train_step)/add"}
}"""
  ops = bench_profile.hlo_ops(hlo)
  assert ops["fusion.3"].opcode == "fusion" and ops["fusion_3"] == ops["fusion.3"]
  trace = {"traceEvents": [
      {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
      {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "pid": 2, "tid": 5, "name": "thread_name", "args": {"name": "XLA Ops"}},
      {"ph": "M", "pid": 2, "tid": 6, "name": "thread_name", "args": {"name": "Stream #1"}},
      {"ph": "X", "pid": 1, "tid": 9, "name": "fusion.3", "dur": 1000.0},  # host: left out
      {"ph": "X", "pid": 2, "tid": 6, "name": "fusion_3", "dur": 1000.0},  # the op's kernel
      {"ph": "X", "pid": 2, "tid": 5, "name": "fusion.3", "dur": 30.0},
      {"ph": "X", "pid": 2, "tid": 5, "name": "fusion.3", "dur": 50.0},
      {"ph": "X", "pid": 2, "tid": 5, "name": "%dot.7 = f32[4] dot(...)", "dur": 20.0},
      {"ph": "X", "pid": 2, "tid": 5, "name": "add.2", "dur": 100.0},
  ]}
  seconds, source = bench_profile.op_seconds(trace, ops)
  assert source == "device XLA Ops line"
  assert seconds == {"fusion.3": 80e-6, "dot.7": 20e-6, "add.2": 100e-6}
  # Without an XLA Ops line every kernel counts. Library kernels (cuBLAS, cuDNN) are named
  # after their own code: each goes to the next custom-call of its library after the
  # furthest instruction seen, in the ENTRY schedule; memory copies get a row of their own,
  # and a kernel that is neither stays unmatched, under no model part.
  library_hlo = """
ENTRY %main.2 (p: bf16[4,4]) -> bf16[4,4] {
  %fusion.1 = bf16[4,4]{1,0} fusion(%p), kind=kLoop, calls=%f1, metadata={op_name="jit(train_step)/jvp(Decoder)/block_0/norm_attn/mul"}
  %custom-call.1 = (bf16[4,4]{1,0}, s8[8]{0}) custom-call(%fusion.1, %p), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(train_step)/jvp(Decoder)/block_0/attn/qkv/dot_general"}
  %custom-call.2 = (bf16[4,4]{1,0}, s8[8]{0}) custom-call(%p, %p), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(train_step)/jvp(Decoder)/block_0/attn/dot_product_attention_fwd"}
  %custom-call.3 = (bf16[4,4]{1,0}, s8[8]{0}) custom-call(%p, %p), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(train_step)/jvp(Decoder)/block_0/attn/out/dot_general"}
  %fusion.2 = bf16[4,4]{1,0} fusion(%p), kind=kLoop, calls=%f2, metadata={op_name="jit(train_step)/jvp(Decoder)/block_0/mlp/mul"}
  ROOT %custom-call.4 = (bf16[4,4]{1,0}, s8[8]{0}) custom-call(%fusion.2, %p), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(train_step)/jvp(Decoder)/block_0/mlp/wo/dot_general"}
}"""
  library_ops = bench_profile.hlo_ops(library_hlo)
  order = bench_profile.entry_order(library_hlo)
  assert order == ["fusion.1", "custom-call.1", "custom-call.2", "custom-call.3", "fusion.2",
                   "custom-call.4"]
  assert library_ops["custom-call.2"].target == "__cudnn$fmhaSoftmax"
  device = [{"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}}]
  step = [("fusion_1", 10.0), ("nvjet_sm90_tst_128x128", 100.0), ("memcpy128", 1.0),
          ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 50.0),
          ("nvjet_sm90_tss_256x128", 200.0), ("fusion_1", 3.0),  # a kernel reused by name
          ("fusion_2", 20.0), ("nvjet_sm90_tst_176x128", 400.0), ("mystery_kernel", 7.0)]
  events = [{"ph": "X", "pid": 2, "tid": 6, "ts": float(i), "name": name, "dur": dur,
             "args": {"hlo_op": "command_buffer_3"}}  # XLA's name for a CUDA graph
            for i, (name, dur) in enumerate(step + step)]  # two steps
  seconds, source = bench_profile.op_seconds({"traceEvents": device + events}, library_ops,
                                             order)
  assert source == "device kernels"
  assert seconds == pytest.approx({
      "fusion_1": 26e-6, "custom-call.1": 200e-6, "custom-call.2": 100e-6,
      "custom-call.3": 400e-6, "fusion_2": 40e-6, "custom-call.4": 800e-6,
      bench_profile.COPIES: 2e-6, bench_profile.UNMATCHED: 14e-6})
  by_part = bench_profile.summarize(seconds, library_ops, steps=2, step_seconds=1e-3,
                                    top=3)["by_part"]
  flat = {(part, p): s for part, passes in by_part.items() for p, s in passes.items()}
  assert flat == pytest.approx({
      ("attention", "forward"): 350e-6, ("mlp", "forward"): 420e-6,
      ("norms", "forward"): 13e-6, (bench_profile.COPIES, "?"): 1e-6,
      (bench_profile.UNMATCHED, "?"): 7e-6})
  seconds, source = bench_profile.op_seconds(trace, ops)
  summary = bench_profile.summarize(seconds, ops, steps=2, step_seconds=1e-4, top=2)
  assert summary["by_part"] == {"optimizer, metrics": {"update": 50e-6},
                                "attention": {"forward": 40e-6},
                                "embedding": {"backward": 10e-6}}
  assert [op["op"] for op in summary["top_ops"]] == ["add.2", "fusion.3"]
  assert "attention | 0.04 | 0.00 | 0.00 | 40.0%" in bench_profile.format_summary(
      {**summary, "events": source})


@pytest.mark.slow
def test_numerics_and_grouped_matmul_tools_run():
  """The device checks of launch/gpu_check.sh, on the CPU at the tiny preset."""
  numerics = subprocess.run(
      [sys.executable, "-m", "chimera.bench_numerics", "--config=configs/moe_top2.py:tiny"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert numerics.returncode == 0, numerics.stderr[-2000:]
  errors = [float(e) for e in re.findall(r"(\d\.\de[-+]\d\d)", numerics.stdout)]
  assert len(errors) == 11 and max(errors) < 1e-5, numerics.stdout  # float32 everywhere
  grouped = subprocess.run(
      [sys.executable, "-m", "chimera.bench_grouped", "--config=configs/moe_top2.py:tiny",
       "--block_sizes=8,64", "--repeats=2", "--devices=2"], cwd=ROOT, capture_output=True,
      text=True, timeout=600)
  assert grouped.returncode == 0, grouped.stderr[-2000:]
  assert "ragged_dot |" in grouped.stdout and "blocks, b=64 |" in grouped.stdout
  assert " R=128 " in grouped.stdout  # one of 2 devices' share: 4 / 2 sequences x 32 x k=2
  for args, message in ((["--config=configs/dense.py:tiny"], "has no experts"),
                        (["--config=configs/moe_top2.py:tiny", "--devices=3"],
                         "--devices: must divide the micro-batch of 4 sequences"),
                        (["--config=configs/moe_top2.py:tiny", "--devices=0"],
                         "--devices: must be >= 1, got 0"),
                        (["--config=configs/moe_top2.py:tiny", "--block_sizes=0"],
                         "--block_sizes: expected positive integers, got '0'")):
    bad = subprocess.run([sys.executable, "-m", "chimera.bench_grouped", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and message in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr[-2000:]


@pytest.mark.parametrize("raised, status, line", [
    (KeyboardInterrupt(), 130, "error: interrupted (Ctrl-C); what was printed is all that was "
                               "measured"),
    (MemoryError(), 2, "error: out of host memory: lower train.batch_size, train.context or "
                       "the model"),
    (ChimeraError("--steps: must be >= 1"), 2, "error: --steps: must be >= 1")])
def test_a_measuring_tool_ends_in_one_line(raised, status, line, capsys):
  """Every measuring tool's main (chimera.bench, bench_numerics, bench_grouped, scaling,
  scaling_hlo, bench_profile, data.bench_cache, evaluate, routing_stability) is wrapped so:
  Ctrl-C and running out of memory were tracebacks in some of them."""
  from chimera.errors import tool_main

  @tool_main
  def main(argv):
    raise raised
  with pytest.raises(SystemExit) as exit_:
    main([])
  assert exit_.value.code == status and capsys.readouterr().err.splitlines() == [line]
  for module in ("bench", "bench_numerics", "bench_grouped", "scaling", "scaling_hlo",
                 "bench_profile", "data/bench_cache", "evaluate", "routing_stability"):
    source = (ROOT / "chimera" / f"{module}.py").read_text()
    assert "\n@tool_main\ndef main(" in source, module



def test_a_record_s_figures_from_its_timings_by_hand(monkeypatch):
  """BenchRecord's arithmetic on made-up timings: tokens/s from the median step, MFU over
  the nominal peak where the device is known (the measured one beside it), decode tokens/s
  over the new tokens after the prefill, and the MoE dispatch share of a whole step."""
  import types
  from chimera import config as config_lib
  config = config_lib.load("configs/moe_top2.py:tiny", {"train.batch_size": 8,
                                                         "train.context": 32,
                                                         "train.grad_accum": 2})
  subject = object.__new__(bench.Subject)
  subject.case = types.SimpleNamespace(name="m", spec="s", overrides={}, config=config,
                                       kernels=bench.Kernels(), random_ids=False)
  subject.settings = types.SimpleNamespace(profile=False)
  subject.accounting = types.SimpleNamespace(flops_per_token=1000, params_total=1,
                                             params_active=1)
  subject.new_tokens, subject.prompt_len, subject.prompts = 33, 4, {2: None}
  subject.moe_layer, subject.compiled_memory = True, None
  subject.times = {"train_step_seconds": [1.0, 2.0, 3.0],  # median 2 s: 256 / 2 tok/s
                   "decode_seconds_b2": [0.32, 0.64, 0.96],  # 0.64 s over 32 new tokens
                   "prefill_seconds_b2": [0.1],
                   "moe_layer_seconds": [0.2], "moe_routing_seconds": [0.05]}
  monkeypatch.setattr(bench.jax, "devices",
                      lambda: [types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")])
  monkeypatch.setattr(bench, "device_peak_memory", lambda: None)
  record = subject.result(measured_peak=1e9)
  assert record.train_tokens_per_second == 8 * 32 / 2 == 128
  assert record.peak_source == "nominal" and record.peak_flops == 494.7e12  # float32
  assert record.mfu == pytest.approx(128 * 1000 / 494.7e12)
  assert record.mfu_vs_measured_peak == pytest.approx(128 * 1000 / 1e9)
  (decode,) = record.decode
  assert decode.ms_per_token == pytest.approx(20.0) and decode.tokens_per_second == pytest.approx(100)
  assert decode.prefill_ms == pytest.approx(100.0)
  assert record.dispatch_share_of_moe_layer == pytest.approx(0.25)
  # Routing runs in every MoE layer of both micro-batches of the 2 s step.
  assert record.dispatch_share_of_step == pytest.approx(
      config.model.num_moe_layers * 2 * 0.05 / 2.0)
  # An unknown device: the measured peak, and the record says so.
  monkeypatch.setattr(bench.jax, "devices", lambda: [types.SimpleNamespace(device_kind="cpu")])
  record = subject.result(measured_peak=1e9)
  assert record.peak_source == "measured" and record.mfu == pytest.approx(128 * 1000 / 1e9)
