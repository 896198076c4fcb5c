"""`python -m chimera.bench --json` on tiny configs: the record fields other tools read."""

import json
import subprocess
import sys

from conftest import ROOT

FIELDS = ("config", "train_step_seconds", "train_tokens_per_second", "mfu",
          "decode_tokens_per_second", "decode_ms_per_token", "peak_memory_bytes")


def test_bench_json_records(tmp_path):
  out = tmp_path / "bench.json"
  result = subprocess.run(
      [sys.executable, "-m", "chimera.bench",
       "--configs=configs/dense.py:tiny,configs/moe_top2.py:tiny",
       "--variants=model.dispatch=einsum,dropless", "--repeats=1", "--steps=2",
       "--prompt_len=4", "--new_tokens=4", "--decode_batches=1,2", f"--json={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  records = json.loads(out.read_text())
  assert [r["config"] for r in records] == [
      "configs/dense.py:tiny dispatch=einsum", "configs/dense.py:tiny dispatch=dropless",
      "configs/moe_top2.py:tiny dispatch=einsum", "configs/moe_top2.py:tiny dispatch=dropless"]
  for record in records:
    for field in FIELDS:
      assert record[field] is not None and (field == "config" or record[field] > 0), field
    assert 0 < record["mfu"] < 1
    assert record["decode_ms_per_token"] == record["decode_ms_per_token_b1"]
  moe = records[2]
  assert 0 < moe["dispatch_share_of_moe_layer"] < 1
  assert "configs/moe_top2.py:tiny dispatch=einsum" in result.stdout  # the printed table
