"""Classification throughput: `cic-gpt2 predict` against `model.generate()` of the label text, same weights,
same rows, measured back to back in one run.

Rows: the bundled real CICIoT2023 merged-schema sample (4,050 rows), prepared with the 8-class grouping and
the `compact` template (the manifest the export carries). Model: a GPT-2 preset (default `tiny`) with
**random init** (seeded): throughput does not depend on what the weights learned, and generation is run
for the full answer length whatever it emits first, unless it emits eos (as a trained model would).

For each head (`seqcls`, `causal-lm`), one export is written with `export_hf` and then:
  predict end to end   `predict_csv`: CSV read + cell checks + serialize + tokenize + model + CSV write
  predict model only   the same forward passes on pre-tokenized rows (length-sorted batches)
  generate, batched    GPT2LMHeadModel.generate, greedy, left-padded batches of the same size, prompt
                       = the causal-lm head's prompt (PROMPT_PREFIX + row + PROMPT_SUFFIX), max_new_tokens =
                       the longest answer (" <label>" + eos); decoded text mapped to a class
  generate, one row    the same, one row per call (the original script's loop)
The generate model is the same exported weights seen as a causal LM: for `causal-lm` the export itself,
for `seqcls` a GPT2LMHeadModel holding the export's transformer body (LM head tied to the embeddings).

    python benchmarks/bench_predict.py --work /tmp/bench_predict [--preset tiny --device cpu --threads 2]

Prints flows/s per path and the speed-up of predict (end to end, the conservative figure) over each
generate path; writes WORK/bench_predict.json. Target: >= 20x over generate.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SAMPLE_V2 = REPO / "cic_gpt2" / "data" / "ciciot2023_v2_39feat_robotumbel_sample.csv"
TARGET_SPEEDUP = 20.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/bench_predict", help="scratch directory (replaced)")
    p.add_argument("--preset", default="tiny", help="model preset (random init)")
    p.add_argument("--heads", default="seqcls,causal-lm", help="comma-separated heads to benchmark")
    p.add_argument("--batch-size", type=int, default=64, help="rows per forward pass / generate call")
    p.add_argument("--generate-rows", type=int, default=512, help="rows classified by batched generate")
    p.add_argument("--generate-single-rows", type=int, default=64, help="rows classified one generate() call each")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p.parse_args(argv)


def build_export(work: Path, prepared: Path, preset: str, head: str) -> Path:
    import torch

    from cic_gpt2.config import ModelConfig, RunConfig, to_dict
    from cic_gpt2.exported import export_hf
    from cic_gpt2.model import build_model
    from cic_gpt2.tokenizer import load_tokenizer

    manifest = json.loads((prepared / "manifest.json").read_text())
    tokenizer = load_tokenizer()
    cfg = dataclasses.replace(RunConfig(), model=ModelConfig(name=preset, head=head, dropout=0.0))
    torch.manual_seed(0)
    classifier = build_model(cfg.model, manifest["label_names"], tokenizer)
    return export_hf(classifier, work / f"export_{head}", tokenizer, manifest, to_dict(cfg), None)


def causal_lm_view(classifier):
    """The export's weights as a GPT2LMHeadModel (seqcls: its transformer body under a tied LM head)."""
    from transformers import GPT2LMHeadModel

    if classifier.head == "causal-lm":
        return classifier.hf_model
    config = classifier.hf_model.config
    lm = GPT2LMHeadModel(config)
    missing = lm.transformer.load_state_dict(classifier.hf_model.transformer.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    lm.tie_weights()
    return lm.to(classifier.hf_model.device).eval()


def map_answer(text: str, label_names: list[str]) -> int:
    """Class id of a generated answer: exact name, else case/punctuation-insensitive; -1 when none."""
    from cic_gpt2.schema import normalize_key

    text = text.strip()
    if text in label_names:
        return label_names.index(text)
    keys = [normalize_key(n) for n in label_names]
    return keys.index(normalize_key(text)) if normalize_key(text) in keys else -1


def generate_classify(lm, prompts: list[list[int]], label_names, tokenizer, max_new_tokens: int, batch_size: int,
                      device) -> tuple[np.ndarray, float]:
    """Greedy generate() per left-padded batch; (class ids, seconds)."""
    import torch

    eos = tokenizer.eos_token_id
    predicted = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            rows = prompts[start:start + batch_size]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), eos, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, width - len(r):] = torch.tensor(r)
                mask[i, width - len(r):] = 1
            out = lm.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                              max_new_tokens=max_new_tokens, pad_token_id=eos, eos_token_id=eos)
            for seq in out[:, width:].tolist():
                seq = seq[:seq.index(eos)] if eos in seq else seq
                predicted.append(map_answer(tokenizer.decode(seq), label_names))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return np.asarray(predicted), time.perf_counter() - t0


def bench_head(work: Path, prepared: Path, args, head: str) -> dict:
    import pyarrow as pa
    import torch

    from cic_gpt2.encode import encode_csvs
    from cic_gpt2.model import prompt_spec
    from cic_gpt2.exported import Export
    from cic_gpt2.inference import pad_id_of, score_rows
    from cic_gpt2.predict import predict_csv

    device = torch.device(args.device)
    export = build_export(work, prepared, args.preset, head)
    opened = Export.open(export)
    loaded = opened.load(device)
    classifier, tokenizer = loaded
    manifest, label_names, context = opened.manifest, opened.label_names, classifier.max_row_tokens

    # predict, end to end (warm-up on 256 rows first: first-call allocations are not throughput)
    warm = work / "warm.csv"
    warm.write_text("".join(SAMPLE_V2.read_text().splitlines(keepends=True)[:257]))
    predict_csv(export, warm, work / "warm_pred.csv", batch_size=args.batch_size, device=args.device,
                overwrite=True, progress=False, loaded=loaded)
    summary = predict_csv(export, SAMPLE_V2, work / f"pred_{head}.csv", batch_size=args.batch_size,
                          device=args.device, overwrite=True, progress=False, loaded=loaded)
    rows = summary["rows"]

    # predict, model only
    chunks = list(encode_csvs([SAMPLE_V2], manifest, tokenizer, require_label=False, unknown_labels="drop"))
    input_ids = pa.chunked_array([c.input_ids for c in chunks]).combine_chunks()
    t0 = time.perf_counter()
    scores = score_rows(classifier, input_ids, args.batch_size, device, pad_id_of(tokenizer), None, context)
    if device.type == "cuda":
        torch.cuda.synchronize()
    model_seconds = time.perf_counter() - t0

    # generate, same weights, same prompt the causal-lm head scores, on the first rows
    spec = prompt_spec(tokenizer, label_names)
    lm = causal_lm_view(classifier)
    max_new_tokens = max(len(a) for a in spec["answer_ids"])
    prompts = [spec["prefix_ids"] + ids + spec["suffix_ids"] for ids in input_ids.to_pylist()]
    n_batched = min(args.generate_rows, len(prompts))
    n_single = min(args.generate_single_rows, len(prompts))
    generate_classify(lm, prompts[:args.batch_size], label_names, tokenizer, max_new_tokens, args.batch_size, device)
    gen_batched, batched_seconds = generate_classify(lm, prompts[:n_batched], label_names, tokenizer,
                                                     max_new_tokens, args.batch_size, device)
    gen_single, single_seconds = generate_classify(lm, prompts[:n_single], label_names, tokenizer,
                                                   max_new_tokens, 1, device)
    result = {
        "head": head,
        "rows": rows,
        "predict_end_to_end_flows_per_s": rows / summary["seconds"],
        "predict_model_only_flows_per_s": len(scores) / model_seconds,
        "generate_batched_rows": n_batched,
        "generate_batched_flows_per_s": n_batched / batched_seconds,
        "generate_single_rows": n_single,
        "generate_single_flows_per_s": n_single / single_seconds,
        "generate_max_new_tokens": max_new_tokens,
        "generate_mapped_fraction": float(np.mean(np.concatenate([gen_batched, gen_single]) >= 0)),
        "mean_prompt_tokens": float(np.mean([len(p) for p in prompts])),
    }
    result["speedup_vs_generate_batched"] = (result["predict_end_to_end_flows_per_s"]
                                             / result["generate_batched_flows_per_s"])
    result["speedup_vs_generate_single"] = (result["predict_end_to_end_flows_per_s"]
                                            / result["generate_single_flows_per_s"])
    return result


def main(argv=None) -> int:
    import torch

    from cic_gpt2.cli import main as cli

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    prepared = work / "prepared"
    assert cli(["prepare", str(SAMPLE_V2), "--output", str(prepared), "--classes", "8", "--seed", "0"]) == 0
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    results = [bench_head(work, prepared, args, head.strip()) for head in args.heads.split(",") if head.strip()]

    print(f"\npreset {args.preset} (random init), batch {args.batch_size}, {device_name}, rows: bundled v2 sample")
    print("| head | predict end-to-end flows/s | predict model-only flows/s | generate batched flows/s "
          "| generate 1-row flows/s | speed-up vs batched | vs 1-row |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['head']} | {r['predict_end_to_end_flows_per_s']:,.0f} | {r['predict_model_only_flows_per_s']:,.0f} "
              f"| {r['generate_batched_flows_per_s']:,.1f} | {r['generate_single_flows_per_s']:,.1f} "
              f"| {r['speedup_vs_generate_batched']:,.1f}x | {r['speedup_vs_generate_single']:,.1f}x |")
    report = {"preset": args.preset, "init": "random (seed 0)", "device": device_name, "batch_size": args.batch_size,
              "target_speedup": TARGET_SPEEDUP, "results": results}
    (work / "bench_predict.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {work / 'bench_predict.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
