"""Class imbalance: no correction vs class weights (`balanced`, `sqrt`) vs the balanced sampler, on real rows.

    python benchmarks/bench_imbalance.py                         # 5 seeds x 4 variants, the cpu_tiny recipe (~20 min)
    python benchmarks/bench_imbalance.py --seeds 0 --variants none,sqrt --template compact --config ""

Builds a CSV whose classes follow the published per-class row counts of the full CICIoT2023 CSV release
(`PUBLISHED_ROWS`, 46,686,579 rows; source in docs/training.md, "Imbalance") by resampling, WITH
REPLACEMENT, the 4,050 real rows of the bundled merged-schema sample: rows are duplicated (a majority class
repeats each of its few distinct rows hundreds of times). Of the 34 classes the sample has 27; the Web group
and DictionaryBruteForce are absent, so the 8-class data has 6 groups, DDoS : Recon ~ 84 : 1 in train. Every
class keeps at least --min-rows rows.

Duplicates must not leak from train into val/test: the distinct rows (by their compact-template text, which
merges only rows equal to its printed precision) are divided between the splits first, per class, and each
CSV slot is filled from the pool of the split that `prepare --dedup none`'s own seeded split
(`splits.assign_splits`) will put it in (the resample duplicates rows on purpose, so `--dedup group` would
regroup them; the split of the distinct rows above is what keeps val/test free of training rows). After
`prepare --classes 8` the script checks, from the CSV lines themselves, that the splits came out as planned
and that no val/test CSV row (its raw feature values) occurs in train. Then, per seed, it trains the recipe
once per variant (same seed, same steps; `--config cpu_tiny`: the binned template, validation every
`train.eval_every` steps choosing the model) with `torchrun ... -m cic_gpt2 train`, and prints test macro-F1,
macro recall, accuracy, the recall of the three smallest groups and the selected step's validation macro-F1,
per seed and as mean +- std (sample std) over the seeds. Finished runs are kept in --out-dir and reused when
the script is rerun with the same arguments (a rerun after an interruption trains only what is missing).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench_seeds import mean_std  # benchmarks/ is on sys.path when this script runs
from cic_gpt2.demo import RECIPE  # noqa: E402 (bench_seeds put the repo on sys.path)

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "cic_gpt2" / "data" / "ciciot2023_v2_39feat_robotumbel_sample.csv"
SPLIT = (0.8, 0.1, 0.1)

# Rows per class in the full CICIoT2023 CSV release (Neto et al., Sensors 2023; 46,686,579 rows in all),
# under cic_gpt2.schema's class names (the release's `BenignTraffic` is `Benign`).
PUBLISHED_ROWS = {
    "Benign": 1_098_195,
    "DDoS-ACK_Fragmentation": 285_104, "DDoS-HTTP_Flood": 28_790, "DDoS-ICMP_Flood": 7_200_504,
    "DDoS-ICMP_Fragmentation": 452_489, "DDoS-PSHACK_Flood": 4_094_755, "DDoS-RSTFINFlood": 4_045_285,
    "DDoS-SlowLoris": 23_426, "DDoS-SYN_Flood": 4_059_190, "DDoS-SynonymousIP_Flood": 3_598_138,
    "DDoS-TCP_Flood": 4_497_667, "DDoS-UDP_Flood": 5_412_287, "DDoS-UDP_Fragmentation": 286_925,
    "DoS-HTTP_Flood": 71_864, "DoS-SYN_Flood": 2_028_834, "DoS-TCP_Flood": 2_671_445, "DoS-UDP_Flood": 3_318_595,
    "Mirai-greeth_flood": 991_866, "Mirai-greip_flood": 751_682, "Mirai-udpplain": 890_576,
    "Recon-HostDiscovery": 134_378, "Recon-OSScan": 98_259, "Recon-PingSweep": 2_262, "Recon-PortScan": 82_284,
    "VulnerabilityScan": 37_382,
    "DNS_Spoofing": 178_911, "MITM-ArpSpoofing": 307_593,
    "Backdoor_Malware": 3_218, "BrowserHijacking": 5_859, "CommandInjection": 5_409, "SqlInjection": 5_245,
    "Uploading_Attack": 1_252, "XSS": 3_846,
    "DictionaryBruteForce": 13_064,
}

# The recipe's own settings stay; the benchmark turns off what it does not read (plots aside: cheap).
TRAIN_OVERRIDES = ["log.progress=false", "log.tensorboard=false", "checkpoint.export=false"]
# --config "": the first-round demo settings on the compact template, no validation before the end.
DEMO_OVERRIDES = ["model.name=tiny", "train.micro_batch_size=16", "train.lr=3e-3", "train.warmup_steps=30",
                  "train.schedule=cosine", "train.eval_every=0", "log.log_every=50", "checkpoint.every_steps=0"]
VARIANTS = {
    "none": ["train.class_weights=none"],
    "weights": ["train.class_weights=balanced"],
    "sqrt": ["train.class_weights=sqrt"],
    "sampler": ["data.sampler=balanced"],
}


def build_csv(path: Path, rows: int, min_rows: int, seed: int) -> dict:
    """Write the imbalanced CSV; return {class: rows} and the planned split of every data row."""
    import pandas as pd

    from cic_gpt2 import schema, templates
    from cic_gpt2.splits import assign_splits

    lines = SAMPLE.read_bytes().split(b"\r\n")
    header, data = lines[0], [line for line in lines[1:] if line]
    df = pd.read_csv(SAMPLE)
    assert len(df) == len(data), "one CSV line per data row"
    raw = np.array([schema.map_label(v, "34") for v in df["Label"]])
    features = list(schema.FEATURES_BY_FORMAT["v2"])
    texts = np.array(templates.render("compact", df[features].to_numpy(np.float64), features).to_pylist())
    rng = np.random.default_rng(seed)

    # Distinct texts -> one split each, stratified by class (a text shared by two classes goes with the first).
    split_of_text: dict[str, int] = {}
    present = sorted(set(raw), key=list(PUBLISHED_ROWS).index)
    for cls in present:
        own = [t for t in dict.fromkeys(texts[raw == cls]) if t not in split_of_text]
        own = [own[i] for i in rng.permutation(len(own))]
        n_val, n_test = max(1, round(len(own) * SPLIT[1])), max(1, round(len(own) * SPLIT[2]))
        for k, t in enumerate(own):
            split_of_text[t] = 1 if k < n_val else 2 if k < n_val + n_test else 0
    text_split = np.array([split_of_text[t] for t in texts])
    pools = {(c, s): np.flatnonzero((raw == c) & (text_split == s)) for c in present for s in range(3)}
    empty = [k for k, v in pools.items() if len(v) == 0]
    if empty:
        raise SystemExit(f"no distinct rows left for (class, split) {empty}: lower --min-rows or change --seed")

    total = sum(PUBLISHED_ROWS[c] for c in present)
    target = {c: max(min_rows, round(rows * PUBLISHED_ROWS[c] / total)) for c in present}
    slot_class = np.repeat(present, [target[c] for c in present])[rng.permutation(sum(target.values()))]
    groups = list(schema.label_names("8"))
    slot_group = np.array([groups.index(schema.map_label(c, "8")) for c in slot_class])
    planned = assign_splits(slot_group, len(groups), SPLIT, seed, None, set())  # what prepare --seed will do
    source = np.array([rng.choice(pools[c, s]) for c, s in zip(slot_class, planned)])
    with open(path, "wb") as f:
        f.write(header + b"\r\n" + b"\r\n".join(data[i] for i in source) + b"\r\n")
    vectors = [row.tobytes() for row in df[features].to_numpy(np.float64)]  # the raw feature values, not a text
    return {"rows": target, "planned": planned, "source": source, "vectors": vectors,
            "distinct": {c: int(len(set(texts[raw == c]))) for c in present}}


def check_prepared(prepared_dir: Path, built: dict) -> dict:
    """The splits are the planned ones and no val/test row's raw feature vector occurs in train (checked on
    the CSV rows the script wrote, not on what prepare made of them); returns rows per group per split and
    how many val/test rows share their model input with a train row (the binned template maps nearby
    distinct vectors to the same words: no leak, but a model cannot tell such rows apart)."""
    from cic_gpt2.prepared import Prepared

    prepared = Prepared.load(prepared_dir)
    vectors, inputs, same_input = {}, {}, {}
    for code, split in enumerate(("train", "val", "test")):
        table = prepared.table(split)
        row_ids = table.column("row_id").to_numpy()
        if not np.array_equal(np.sort(row_ids), np.flatnonzero(built["planned"] == code)):
            raise SystemExit(f"prepare split {split} differs from the planned one: has prepare's split changed?")
        vectors[split] = {built["vectors"][built["source"][i]] for i in row_ids}
        inputs[split] = [tuple(r) for r in table.column("input_ids").to_pylist()]
    train_inputs = set(inputs["train"])
    for split in ("val", "test"):
        shared = vectors[split] & vectors["train"]
        if shared:
            raise SystemExit(f"{len(shared)} distinct {split} feature vectors also occur in train")
        same_input[split] = sum(i in train_inputs for i in inputs[split])
    return {"counts": {s: prepared.manifest["splits"][s]["class_counts"] for s in ("train", "val", "test")},
            "same_input": same_input, "test_rows": len(inputs["test"])}


def train(prepared_dir: Path, run_dir: Path, nproc: int, config: str, epochs: float, seed: int,
          extra: list[str]) -> float:
    """Train one variant (reused when run_dir holds the metrics.json of this exact command on this exact
    prepared data); its seconds."""
    from cic_gpt2.prepared import Prepared
    from cic_gpt2.resume_guard import data_fingerprint
    from cic_gpt2.files import free_port, write_text

    config_args = ["--config", config] if config else []
    overrides = [*TRAIN_OVERRIDES, *([] if config else DEMO_OVERRIDES), f"train.epochs={epochs}",
                 f"train.seed={seed}", *extra]
    key = json.dumps({"nproc": nproc, "config": config, "overrides": overrides,
                      "data": data_fingerprint(Prepared.load(prepared_dir).manifest)})
    done = run_dir / "bench_done.json"
    if done.is_file() and (run_dir / "metrics.json").is_file():
        record = json.loads(done.read_text())
        if record["key"] == key:
            return record["seconds"]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
                 "127.0.0.1", "--master_port", str(free_port())] if nproc > 1 else [sys.executable])
    cmd = [*launcher, "-m", "cic_gpt2", "train", "--data", str(prepared_dir), "--run-dir", str(run_dir),
           "--resume", "none", *config_args, *overrides]
    shutil.rmtree(run_dir, ignore_errors=True)  # an earlier, unfinished or different run
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"train failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    seconds = time.perf_counter() - start
    write_text(done, json.dumps({"key": key, "seconds": seconds}) + "\n")
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20_000, help="rows of the imbalanced CSV (before the floor)")
    p.add_argument("--min-rows", type=int, default=20, help="at least this many rows per class")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--nproc", type=int, default=2, help="training processes (1: no launcher)")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds of the resample, the split and training")
    p.add_argument("--template", default="binned", help="prepare --template (binned: the cpu_tiny recipe's)")
    p.add_argument("--config", default=RECIPE, help='train --config ("": the first-round demo settings)')
    p.add_argument("--variants", default="none,weights,sqrt,sampler", help=f"comma-separated of {', '.join(VARIANTS)}")
    p.add_argument("--out-dir", default="bench_imbalance_out")
    args = p.parse_args()
    variants, seeds = args.variants.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")

    out = Path(args.out_dir)
    results: dict[str, list[dict]] = {name: [] for name in variants}
    minority = None
    for seed in seeds:
        seed_dir = out / f"seed-{seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        csv = seed_dir / "imbalanced.csv"
        built = build_csv(csv, args.rows, args.min_rows, seed)
        prepared_dir = seed_dir / "prepared"
        subprocess.run([sys.executable, "-m", "cic_gpt2", "prepare", str(csv), "--output", str(prepared_dir),
                        "--classes", "8", "--seed", str(seed), "--overwrite", "--dedup", "none",
                        "--template", args.template], check=True, capture_output=True)
        checked = check_prepared(prepared_dir, built)
        counts = checked["counts"]
        present = [g for g, n in counts["train"].items() if n]
        minority = minority or sorted(present, key=lambda g: counts["train"][g])[:3]
        print(f"seed {seed}: {sum(built['rows'].values()):,} rows resampled with replacement from "
              f"{sum(built['distinct'].values()):,} distinct real rows; no val/test feature vector occurs in train; "
              f"{checked['same_input']['test']} of {checked['test_rows']} test rows share their {args.template} "
              f"input with a train row")
        print("  rows per group (train/val/test): " + ", ".join(
            f"{g} {counts['train'][g]}/{counts['val'][g]}/{counts['test'][g]}" for g in present), flush=True)
        for name in variants:
            run_dir = seed_dir / f"run-{name}"
            elapsed = train(prepared_dir, run_dir, args.nproc, args.config, args.epochs, seed, VARIANTS[name])
            summary = json.loads((run_dir / "metrics.json").read_text())
            results[name].append({"seed": seed, "test": summary["test"], "val": summary["val"],
                                  "step": summary["selected_step"], "steps": summary["step"], "seconds": elapsed})
            print(f"  {name}: test macro-F1 {summary['test']['macro_f1']:.3f} (step {summary['selected_step']} "
                  f"of {summary['step']}, {elapsed:.0f} s)", flush=True)

    recipe = f"--config {args.config}" if args.config else "the first-round demo settings"
    print(f"\ntest split, {recipe}, prepare --template {args.template}, {args.epochs:g} epochs, {args.nproc} "
          f"process(es), seeds {args.seeds}: mean ± std over the seeds (per seed in {out}/results.json)")
    head = (["variant", "test macro-F1 per seed", "test macro-F1", "macro recall"]
            + [f"recall {g}" for g in minority] + ["accuracy", "val macro-F1 (selected)", "train s"])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name in variants:
        runs = results[name]
        test = [r["test"] for r in runs]
        cells = [" ".join(VARIANTS[name]) or "none", " / ".join(f"{t['macro_f1']:.3f}" for t in test),
                 mean_std([t["macro_f1"] for t in test], 3), mean_std([t["macro_recall"] for t in test], 3)]
        cells += [mean_std([t["per_class"][g]["recall"] for t in test], 3) for g in minority]
        cells += [mean_std([t["accuracy"] for t in test], 3), mean_std([r["val"]["macro_f1"] for r in runs], 3),
                  f"{np.mean([r['seconds'] for r in runs]):.0f}"]
        print("| " + " | ".join(cells) + " |")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
