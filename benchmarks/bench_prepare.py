"""Benchmark `cic-gpt2 prepare` on >= 1M rows resampled from the real bundled CICIoT2023 rows.

    python benchmarks/bench_prepare.py                 # 1,000,000 rows, all three templates + naive baseline
    python benchmarks/bench_prepare.py --rows 3000000 --templates compact --workers 2
    python benchmarks/bench_prepare.py --rows 10000000 --templates compact --dedup none,group --naive-rows 0
    python benchmarks/bench_prepare.py --grouping-rows 46700000 --rows 0   # the split step alone, full size

Builds the CSV in a temp dir by resampling (with replacement) the 4,050 real rows of the merged-schema
sample (line-level, CRLF kept), then runs `python -m cic_gpt2 prepare` once per template as a child
process and prints end-to-end rows/s, the peak RSS of the whole process tree (prepare + its workers, sampled
from /proc every 50 ms) and of its largest single process (getrusage), and tokens/row from the manifest.
`--dedup none,group` runs each template once per `--dedup` mode on the same CSV, one child process each, and
prints the ratio to the first mode. Resampling with replacement duplicates rows: the 4,050 real rows hold
1,779 distinct feature vectors, so every row of the resampled CSV repeats one of them (the full data has far
more distinct vectors: `--grouping-rows` measures the split step alone on N distinct random hashes, the
worst case for its memory). The naive baseline is the original pipeline's way: pandas per-row formatting (DataFrame.apply) of the seed
sentences, then `datasets.Dataset.map` tokenization; it runs on a subset (--naive-rows) in this process.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SAMPLE = Path(__file__).resolve().parent.parent / "cic_gpt2" / "data" / "ciciot2023_v2_39feat_robotumbel_sample.csv"


def build_csv(path: Path, rows: int, seed: int = 0) -> None:
    lines = SAMPLE.read_bytes().split(b"\r\n")
    header, data = lines[0], [line for line in lines[1:] if line]
    pick = np.random.default_rng(seed).integers(0, len(data), rows)
    with open(path, "wb") as f:
        f.write(header + b"\r\n")
        for start in range(0, rows, 200_000):
            f.write(b"\r\n".join(data[i] for i in pick[start:start + 200_000]) + b"\r\n")


def _tree_rss_bytes(root: int) -> int:
    """Sum of VmRSS over root and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/status") as f:
                kb = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = kb * 1024
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


# Runs a command as its child and writes the child tree's largest-process peak RSS (KiB) to argv[1], so that
# each measured run has its own getrusage(RUSAGE_CHILDREN) (ours is the max over every child we ever reaped).
_RUSAGE_WRAPPER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[2:]).returncode; "
                   "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
                   "sys.exit(rc)")


def run_prepare(csv: Path, out: Path, template: str, workers: int | None, dedup: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "cic_gpt2", "prepare", str(csv), "--output", str(out), "--classes", "8",
           "--template", template, "--overwrite"] + (["--workers", str(workers)] if workers else []) + (
           ["--dedup", dedup] if dedup else [])
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    rss_file = out.with_name(out.name + ".maxrss")
    cmd = [sys.executable, "-c", _RUSAGE_WRAPPER, str(rss_file)] + cmd
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss_bytes(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    elapsed = time.perf_counter() - t0
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed ({proc.returncode}):\n{stdout}")
    max_single = int(rss_file.read_text()) * 1024
    manifest = json.loads((out / "manifest.json").read_text())
    shutil.rmtree(out)  # the next run's output would need the same disk space again
    return {"template": template, "dedup": (manifest.get("dedup") or {}).get("mode", "-"),
            "rows": manifest["rows_read"], "seconds": elapsed,
            "rows_per_s": manifest["rows_read"] / elapsed, "tree_rss_gb": peak[0] / 1e9,
            "max_process_rss_gb": max_single / 1e9,
            "tokens_mean": manifest["token_stats"]["mean"], "tokens_p95": manifest["token_stats"]["p95"],
            "splits": {s: manifest["splits"][s]["rows"] for s in ("train", "val", "test")},
            "summary": [line for line in stdout.strip().splitlines()
                        if line.startswith(("prepared", "dedup", "overlap"))]}


_GROUPING_CHILD = """
import resource, sys, time
import numpy as np
from cic_gpt2 import splits
n, distinct = int(sys.argv[1]), sys.argv[2] == "distinct"
rng = np.random.default_rng(0)
labels = rng.integers(0, 8, n).astype(np.int16)
hashes = rng.integers(0, 2**64 - 1, n if distinct else 1779, dtype=np.uint64, endpoint=True)
if not distinct:
    hashes = hashes[rng.integers(0, len(hashes), n)]
base = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:"))
t0 = time.perf_counter()
code, stats = splits.split_rows(labels, hashes, [str(i) for i in range(8)], (0.8, 0.1, 0.1), 0, None, "error",
                                 sys.argv[3], "0.8,0.1,0.1")
train = splits.train_hashes(hashes, code)
report = splits.dedup_report(sys.argv[3], "x", stats, hashes, labels, code, [str(i) for i in range(8)],
                             (0.8, 0.1, 0.1), train)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(time.perf_counter() - t0, base * 1024, peak * 1024, report["distinct_vectors"])
"""


def bench_grouping(rows: int, distinct: bool, mode: str) -> dict:
    """splits.split_rows + dedup_report alone on `rows` random 64-bit hashes (all distinct, or 1,779 distinct
    values resampled like the CSV) and random labels, in a child process: seconds and peak RSS."""
    out = subprocess.run([sys.executable, "-c", _GROUPING_CHILD, str(rows), "distinct" if distinct else "resampled",
                          mode], capture_output=True, text=True, check=True).stdout.split()
    seconds, base, peak, groups = float(out[0]), int(out[1]), int(out[2]), int(out[3])
    return {"rows": rows, "mode": mode, "distinct": distinct, "groups": groups, "seconds": seconds,
            "rss_before_gb": base / 1e9, "peak_rss_gb": peak / 1e9}


def naive_baseline(csv: Path, rows: int) -> dict:
    """The per-row way: DataFrame.apply builds each text in Python, datasets.map tokenizes."""
    import datasets
    import pandas as pd

    from cic_gpt2.tokenizer import load_tokenizer

    datasets.disable_progress_bars()
    tok = load_tokenizer()
    t0 = time.perf_counter()
    df = pd.read_csv(csv, nrows=rows)

    def seed_text(row) -> str:  # the original script's numerical_to_text, abridged to the same parts
        parts = [f"Network flow with duration {row.get('flow_duration', 0):.4f} seconds"]
        if row["Header_Length"] > 0:
            parts.append(f"header length {int(row['Header_Length'])} bytes")
        p = row["Protocol Type"]
        parts.append({6: "using TCP protocol", 17: "using UDP protocol", 1: "using ICMP protocol"}.get(
            p, f"using protocol {int(p)}") if p > 0 else "")
        if row["Rate"] > 0:
            parts.append(f"overall rate {row['Rate']:.4f}")
        flags = [f"{int(row[k + '_flag_number'])} {k.upper()}" for k in ("fin", "syn", "rst", "psh", "ack", "ece", "cwr")
                 if row[k + "_flag_number"] > 0]
        if flags:
            parts.append("TCP flags: " + ", ".join(flags))
        services = [s for s in ("HTTP", "HTTPS", "DNS", "Telnet", "SMTP", "SSH", "IRC", "TCP", "UDP", "DHCP", "ARP",
                                "ICMP", "IPv", "LLC") if row[s] > 0]
        if services:
            parts.append("Services: " + ", ".join(services))
        stats = [f"{n} {row[k]:.4f}" for k, n in (("Tot sum", "total sum"), ("Tot size", "total size"),
                                                  ("Min", "minimum"), ("Max", "maximum"), ("AVG", "average"),
                                                  ("Std", "standard deviation")) if row[k] > 0]
        if stats:
            parts.append("Statistics: " + ", ".join(stats))
        adv = [f"{n} {row[k]:.4f}" for k, n in (("IAT", "inter-arrival time"), ("Number", "number"),
                                                ("Variance", "variance")) if row[k] > 0]
        if adv:
            parts.append("Advanced metrics: " + ", ".join(adv))
        text = ". ".join(p for p in parts if p)
        return text[:400] + "..." if len(text) > 400 else text

    texts = df.apply(seed_text, axis=1)
    ds = datasets.Dataset.from_dict({"text": texts.tolist(), "label": df["Label"].tolist()})
    ds = ds.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    elapsed = time.perf_counter() - t0
    return {"rows": len(ds), "seconds": elapsed, "rows_per_s": len(ds) / elapsed,
            "tokens_mean": float(np.mean([len(x) for x in ds["input_ids"]]))}


def run_csv_benchmarks(args: argparse.Namespace) -> None:
    modes = args.dedup.split(",") if args.dedup else [None]
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        csv = Path(tmp) / "resampled.csv"
        t0 = time.perf_counter()
        build_csv(csv, args.rows)
        print(f"built {csv.name}: {args.rows:,} rows resampled (with replacement, so rows repeat) from the real v2 "
              f"sample, {csv.stat().st_size / 1e6:.0f} MB, {time.perf_counter() - t0:.1f} s")
        results = []
        for template in args.templates.split(","):
            for mode in modes:
                r = run_prepare(csv, Path(tmp) / f"out_{template}", template, args.workers, mode)
                results.append(r)
                print(f"prepare --template {template:8s} --dedup {r['dedup']:5s} {r['rows']:,} rows in "
                      f"{r['seconds']:.1f} s = {r['rows_per_s']:,.0f} rows/s | peak RSS tree {r['tree_rss_gb']:.2f} "
                      f"GB, largest process {r['max_process_rss_gb']:.2f} GB | tokens/row mean "
                      f"{r['tokens_mean']:.1f} p95 {r['tokens_p95']} | splits {r['splits']}", flush=True)
                for line in r["summary"]:
                    print(f"    {line}")
            first = next(r for r in results if r["template"] == template)
            for r in results[-len(modes) + 1:] if len(modes) > 1 else ():
                print(f"--dedup {r['dedup']} vs {first['dedup']}: rows/s x{r['rows_per_s'] / first['rows_per_s']:.3f}, "
                      f"largest process RSS x{r['max_process_rss_gb'] / first['max_process_rss_gb']:.3f}, tree RSS "
                      f"x{r['tree_rss_gb'] / first['tree_rss_gb']:.3f}")
        if args.naive_rows:
            naive = naive_baseline(csv, args.naive_rows)
            print(f"naive baseline (DataFrame.apply seed text + datasets.map tokenize): {naive['rows']:,} rows in "
                  f"{naive['seconds']:.1f} s = {naive['rows_per_s']:,.0f} rows/s, tokens/row {naive['tokens_mean']:.1f}")
            by = {r["template"]: r for r in results}
            if "compact" in by and "seed" in by:
                print(f"compact/seed tokens per row: {by['compact']['tokens_mean'] / by['seed']['tokens_mean']:.1%}")
            if "compact" in by:
                print(f"compact vs naive speed: {by['compact']['rows_per_s'] / naive['rows_per_s']:.0f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--templates", default="compact,seed,kv")
    p.add_argument("--workers", type=int, default=None, help="prepare --workers (default: its default)")
    p.add_argument("--naive-rows", type=int, default=20_000, help="rows of the naive baseline (0: skip it)")
    p.add_argument("--dedup", default=None, help="comma-separated prepare --dedup modes to compare, e.g. none,group "
                   "(default: prepare's default only)")
    p.add_argument("--grouping-rows", type=int, default=0, help="also time the split step alone on N hashes")
    p.add_argument("--tmp", default=None, help="scratch directory (default: system temp)")
    args = p.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    for distinct in (False, True) if args.grouping_rows else ():
        for mode in (args.dedup or "group").split(","):
            g = bench_grouping(args.grouping_rows, distinct, mode)
            print(f"split step alone, --dedup {mode}, {g['rows']:,} rows, {g['groups']:,} distinct hashes: "
                  f"{g['seconds']:.1f} s, peak RSS {g['peak_rss_gb']:.2f} GB (hashes + labels held before: "
                  f"{g['rss_before_gb']:.2f} GB)", flush=True)
    if args.rows:
        run_csv_benchmarks(args)
    print(f"load average {os.getloadavg()[0]:.1f} at end (other processes share these CPUs)")


if __name__ == "__main__":
    main()
