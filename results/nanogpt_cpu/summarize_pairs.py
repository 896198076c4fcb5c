import json, re, statistics, sys
from pathlib import Path
S = Path("/tmp/sbs")
rows = []
for n in map(int, sys.argv[1:]):
    post = lambda k: float(re.search(r"wall=([\d.]+)", (S / f"{k}_{n}.post").read_text()).group(1))
    its = [float(m) for m in re.findall(r"iter \d+: loss [\d.]+, time ([\d.]+)ms", (S / f"nanogpt_{n}.out").read_text())]
    nval = re.findall(r"step 2000: train loss [\d.]+, val loss ([\d.]+)", (S / f"nanogpt_{n}.out").read_text())
    summ = json.loads(Path(f"/tmp/ours_{n}/summary.json").read_text())
    err = (S / f"ours_{n}.err").read_text()
    comp = re.search(r"compiled[^0-9]*([\d.]+) s", err).group(1)
    sys_t = re.search(r"System time \(seconds\): ([\d.]+)", err).group(1)
    w_n, w_o = post("nanogpt"), post("ours")
    rows.append((n, w_n, statistics.median(its), nval, w_o, summ["train_tokens_per_second"], summ["final_val_loss"], comp, sys_t, w_o / w_n))
    print(f"| {n} | {w_n:.1f} s | {statistics.median(its):.1f} ms | {nval[0] if nval else '?'} | {w_o:.1f} s | {summ['train_tokens_per_second']:,.0f} | {summ['final_val_loss']:.4f} | {comp} s | {sys_t} s | **{w_o/w_n:.2f}x** |")
