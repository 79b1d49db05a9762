"""Training speed and quality against the usual approach, both measured in one run on the same machine.

Same small GPT-2 architecture (random init), same real CICIoT2023 rows (the bundled merged-schema sample,
8-class grouping, one stratified split), same number of training samples, same global batch and LR:

  (a) ours: `cic-gpt2 train` -- seqcls head on the `compact` template, dynamic padding, DeepSpeed ZeRO-2
      (CPU, fp32), run as a subprocess exactly as a user would.
  (b) the original GPT2_CIC_IOT_2023 recipe (../shared/original/README-GPT2_CIC_IOT_2023.md): Hugging Face
      `Trainer` on GPT2LMHeadModel, an instruction prompt around the `seed` template text followed by the
      label, loss over the whole sequence, every example padded to max length 512, fp32 on CPU
      (its V100 fp16 has no CPU equivalent). Prediction: score each label's tokens after the prompt with the
      trained LM in one forward pass per row and take the best (never free generate()).

Prints samples/s of each training loop and end to end, the ratio, and each arm's test macro-F1; writes
the figures to WORK/bench_vs_hf_trainer.json.

    python benchmarks/bench_vs_hf_trainer.py --work /tmp/bench_hf [--model tiny --samples 640 --threads 2]

Both arms use `--threads` CPU threads (ours: OMP_NUM_THREADS for its one rank). The machine may be shared:
the two arms run back to back in the same invocation, so compare the ratio, not absolute figures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE_V2 = REPO / "cic_gpt2" / "data" / "ciciot2023_v2_39feat_robotumbel_sample.csv"
# The original script's prompt (its README: "You are a network security expert. Analyze the following
# network flow..."); the answer (label) follows "Classification:".
PROMPT = ("You are a network security expert. Analyze the following network flow and classify the traffic."
          "\n\nNetwork flow: {text}\n\nClassification:")
ORIGINAL_MAX_LENGTH = 512
ORIGINAL_MICRO_BATCH = 4  # per_device_train_batch_size of the original CONFIG


def cli(*argv: str, threads: int, log: Path) -> float:
    """Run `cic-gpt2 ARGV` in a subprocess with `threads` CPU threads; return its wall time in seconds."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.run([sys.executable, "-m", "cic_gpt2", *argv], env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"cic-gpt2 {argv[0]} failed (exit {rc}); see {log}")
    return time.perf_counter() - t0


def prepare(work: Path, template: str, classes: str, seed: int, threads: int) -> Path:
    out = work / f"prepared_{template}"
    if not (out / "manifest.json").is_file():
        cli("prepare", str(SAMPLE_V2), "--output", str(out), "--classes", classes, "--seed", str(seed),
            "--template", template, threads=threads, log=work / f"prepare_{template}.log")
    return out


# ----------------------------------------------------------------------------------------------- (a)
def run_ours(args, data: Path, n_train: int) -> dict:
    run_dir = args.work / "ours"
    steps = args.samples // args.global_batch
    wall = cli("train", "--data", str(data), "--run-dir", str(run_dir),
               f"model.name={args.model}", "model.head=seqcls", f"train.seed={args.seed}",
               f"train.max_steps={steps}", f"train.micro_batch_size={args.global_batch}", "train.grad_accum=1",
               f"train.lr={args.lr}", f"train.warmup_steps={args.warmup_steps}", "train.precision=fp32",
               "train.ds_config=zero2_cpu", f"log.log_every={max(1, steps // 10)}", "log.progress=false",
               "checkpoint.export=false",  # the HF arm saves nothing either
               *args.ours_override, threads=args.threads, log=args.work / "ours_train.log")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"wall_s": wall, "steps": steps, "samples": steps * args.global_batch, "metrics": metrics,
            "records": records}


# ----------------------------------------------------------------------------------------------- (b)
def seed_texts(prepared: Path, split: str, tokenizer) -> tuple[list[str], list[int], list[int]]:
    import datasets

    ds = datasets.load_from_disk(str(prepared / split))
    texts = tokenizer.batch_decode([list(ids) for ids in ds["input_ids"]])
    return texts, [int(x) for x in ds["label"]], [int(x) for x in ds["row_id"]]


def build_lm(model_name: str, label_names: list[str], seed: int):
    import torch
    from transformers import GPT2LMHeadModel

    from cic_gpt2.config import ModelConfig
    from cic_gpt2.model import build_hf_config

    torch.manual_seed(seed)
    hf_config = build_hf_config(ModelConfig(name=model_name), label_names)  # the same architecture as arm (a)
    hf_config.use_cache = False
    return GPT2LMHeadModel(hf_config)


def run_hf_trainer(args, prepared: Path, label_names: list[str], tokenizer) -> dict:
    import datasets
    import torch
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    texts, labels, row_ids = seed_texts(prepared, "train", tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    full = [PROMPT.format(text=t) + " " + label_names[y] + tokenizer.eos_token for t, y in zip(texts, labels)]
    enc = tokenizer(full, padding="max_length", max_length=ORIGINAL_MAX_LENGTH, truncation=True)
    train_ds = datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    t_build = time.perf_counter()
    model = build_lm(args.model, label_names, args.seed)
    steps = args.samples // args.global_batch
    targs = TrainingArguments(
        output_dir=str(args.work / "hf"), per_device_train_batch_size=ORIGINAL_MICRO_BATCH,
        gradient_accumulation_steps=args.global_batch // ORIGINAL_MICRO_BATCH, learning_rate=args.lr,
        max_steps=steps, warmup_steps=args.warmup_steps, lr_scheduler_type="cosine", weight_decay=0.01,
        fp16=False, bf16=False, use_cpu=True, save_strategy="no", eval_strategy="no", report_to=[],
        logging_steps=max(1, steps // 10), dataloader_num_workers=0, seed=args.seed, disable_tqdm=True,
    )
    # mlm=False: labels = input_ids with padding masked out -- the loss covers prompt, text and answer alike.
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds, data_collator=collator)
    result = trainer.train()
    train_wall = time.perf_counter() - t_build
    t_eval = time.perf_counter()
    y_pred, y_true = predict_by_label_scores(model, tokenizer, prepared, label_names)
    eval_wall = time.perf_counter() - t_eval
    from cic_gpt2.metrics import classification_metrics

    return {"steps": steps, "samples": steps * args.global_batch, "train_runtime_s": result.metrics["train_runtime"],
            "train_samples_per_s": steps * args.global_batch / result.metrics["train_runtime"],
            "train_loss": result.metrics.get("train_loss"), "build_and_train_s": train_wall, "eval_s": eval_wall,
            "metrics": classification_metrics(y_true, y_pred, label_names), "threads": torch.get_num_threads()}


def predict_by_label_scores(model, tokenizer, prepared: Path, label_names: list[str]):
    """For each test row: sum of log p(label tokens | prompt) for every label; one batched forward per row
    (the 8 candidate answers after the same prompt), the LM head applied only where answer tokens are scored."""
    import torch

    texts, labels, _ = seed_texts(prepared, "test", tokenizer)
    answers = [tokenizer(" " + name)["input_ids"] for name in label_names]
    model.eval()
    preds = []
    with torch.no_grad():
        for text in texts:
            prompt = tokenizer(PROMPT.format(text=text))["input_ids"][: ORIGINAL_MAX_LENGTH - max(map(len, answers))]
            seqs = [prompt + a for a in answers]
            width = max(map(len, seqs))
            ids = torch.full((len(seqs), width), tokenizer.eos_token_id)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
            hidden = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
            scores = []
            for i, a in enumerate(answers):
                positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(a))  # hidden at t predicts t+1
                logprobs = torch.log_softmax(model.lm_head(hidden[i, positions]).float(), dim=-1)
                scores.append(logprobs[torch.arange(len(a)), torch.tensor(a)].sum().item())
            preds.append(int(max(range(len(scores)), key=scores.__getitem__)))
    return preds, labels


# -----------------------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="scratch directory (prepared data, run dirs, JSON)")
    p.add_argument("--model", default="tiny", help="model preset both arms build (random init)")
    p.add_argument("--samples", type=int, default=640,
                   help="training examples each arm sees (steps = samples / global batch)")
    p.add_argument("--global-batch", type=int, default=16, help="examples per optimizer step, both arms")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--classes", default="8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for each arm")
    p.add_argument("--ours-override", nargs="*", default=[], help="extra key=value for `cic-gpt2 train`")
    args = p.parse_args()
    if args.global_batch % ORIGINAL_MICRO_BATCH:
        p.error(f"--global-batch must be a multiple of {ORIGINAL_MICRO_BATCH} (the original micro batch)")
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    import torch

    from cic_gpt2.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    compact = prepare(args.work, "compact", args.classes, args.seed, args.threads)
    seed = prepare(args.work, "seed", args.classes, args.seed, args.threads)
    manifest_c = json.loads((compact / "manifest.json").read_text())
    manifest_s = json.loads((seed / "manifest.json").read_text())
    if manifest_c["label_names"] != manifest_s["label_names"] or manifest_c["splits"] != manifest_s["splits"]:
        sys.exit("the compact and seed preparations split differently; the comparison needs the same rows")
    label_names = manifest_c["label_names"]
    load_tokenizer(None)  # fails here, before any training, where the GPT-2 BPE is missing
    n_train = manifest_c["splits"]["train"]["rows"]
    print(f"{n_train} training rows, {args.samples} training samples per arm, global batch {args.global_batch}, model {args.model}, "
          f"{args.threads} threads per arm; tokens/row compact {manifest_c['token_stats']['mean']:.1f}, "
          f"seed {manifest_s['token_stats']['mean']:.1f} (+ prompt, padded to {ORIGINAL_MAX_LENGTH})", flush=True)

    print("(a) cic-gpt2 train ...", flush=True)
    ours = run_ours(args, compact, n_train)
    print("(b) Hugging Face Trainer, original recipe ...", flush=True)
    hf = run_hf_trainer(args, seed, label_names, load_tokenizer(None))

    ours_loop = ours_loop_samples_per_s(ours["records"], args.global_batch)
    result = {
        "setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "train_rows": n_train,
        "ours": {"samples": ours["samples"], "wall_s": ours["wall_s"], "samples_per_s_end_to_end": ours["samples"] / ours["wall_s"],
                 "samples_per_s_loop": ours_loop, "test_macro_f1": ours["metrics"]["test"]["macro_f1"]},
        "hf_trainer": {"samples": hf["samples"], "train_runtime_s": hf["train_runtime_s"],
                       "samples_per_s_loop": hf["train_samples_per_s"],
                       "samples_per_s_end_to_end": hf["samples"] / hf["build_and_train_s"],
                       "test_macro_f1": hf["metrics"]["macro_f1"], "train_loss": hf["train_loss"]},
    }
    result["ratio_loop"] = result["ours"]["samples_per_s_loop"] / result["hf_trainer"]["samples_per_s_loop"]
    out = args.work / "bench_vs_hf_trainer.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'arm':<34}{'samples':>9}{'samples/s (loop)':>18}{'test macro-F1':>15}")
    print(f"{'(a) cic-gpt2 train':<34}{ours['samples']:>9}{result['ours']['samples_per_s_loop']:>18.1f}"
          f"{result['ours']['test_macro_f1']:>15.3f}")
    print(f"{'(b) HF Trainer, original recipe':<34}{hf['samples']:>9}{result['hf_trainer']['samples_per_s_loop']:>18.1f}"
          f"{result['hf_trainer']['test_macro_f1']:>15.3f}")
    print(f"speed-up (training loop): {result['ratio_loop']:.1f}x; end to end incl. start-up: "
          f"{result['ours']['samples_per_s_end_to_end'] / result['hf_trainer']['samples_per_s_end_to_end']:.1f}x")
    print(f"figures written to {out}")
    return 0


def ours_loop_samples_per_s(records: list[dict], global_batch: int) -> float:
    """Training-loop samples/s of `cic-gpt2 train`: all samples over the summed duration of its log windows
    (each window logs perf/samples_per_s over its own steps), i.e. the same quantity as HF's
    train_samples_per_second (samples / train_runtime)."""
    samples, seconds, last_step = 0, 0.0, 0
    for r in records:
        if "perf/samples_per_s" not in r:
            continue
        window = (r["step"] - last_step) * global_batch
        samples, seconds, last_step = samples + window, seconds + window / r["perf/samples_per_s"], r["step"]
    if not seconds:
        sys.exit("cic-gpt2 train logged no perf/samples_per_s; cannot compare loop speed")
    return samples / seconds


if __name__ == "__main__":
    raise SystemExit(main())
