"""`cic-gpt2 export CHECKPOINT [--output DIR]`: a DeepSpeed ZeRO checkpoint -> a Hugging Face model directory.

    cic-gpt2 export runs/r1/checkpoints/step-000400              # -> runs/r1/export-step-000400/
    cic-gpt2 export runs/r1 --output models/cic-gpt2-8class      # the run's latest complete checkpoint

The fp32 master weights are consolidated from the ZeRO partitions of every rank
(`deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`, CPU only, any saved world size),
loaded into the model rebuilt from the checkpoint's run_config.yaml + data_manifest.json, and written with
`save_pretrained` (safetensors; GPT-2's tied embedding/LM-head weights handled by transformers).

An export directory holds: config.json (+ id2label/label2id, pad_token_id), model.safetensors, the tokenizer
files (pad token = eos), cic_gpt2.json (head, label names, the causal-lm prompt as text and ids),
data_manifest.json, run_config.yaml, ds_config.json. It is written to a temporary directory and renamed
when complete. seqcls exports load with `AutoModelForSequenceClassification.from_pretrained` and work in
`pipeline("text-classification")` on rows serialized with the manifest's template; causal-lm exports are a
`GPT2LMHeadModel` plus the prompt (docs/model.md shows both uses). `load_export(DIR)` gives back the
classifier, the tokenizer and the manifest.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import yaml

from cic_gpt2 import __version__
from cic_gpt2.errors import CicError
from cic_gpt2.files import replace_dir, write_text

HELP = "DeepSpeed checkpoint -> Hugging Face model directory"
META_FILE = "cic_gpt2.json"
EXPORT_FORMAT = 1


def export_hf(classifier, out_dir: str | Path, tokenizer, manifest: dict, run_config: Optional[dict] = None,
              ds_config: Optional[dict] = None) -> Path:
    """Write `classifier` as a Hugging Face model directory at `out_dir` (replaced atomically). The weights
    are saved in fp32 (a copy when the live model is fp16/bf16: the engine's module is not touched)."""
    import torch

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf_model = classifier.hf_model
        if any(p.dtype != torch.float32 for p in hf_model.parameters()):
            hf_model = copy.deepcopy(hf_model).to("cpu", torch.float32)
        hf_model.save_pretrained(tmp)
        export_tokenizer = copy.deepcopy(tokenizer)
        if export_tokenizer.pad_token is None:
            export_tokenizer.pad_token = export_tokenizer.eos_token  # GPT-2 pads with eos (as in training)
        export_tokenizer.padding_side = "right"
        export_tokenizer.save_pretrained(tmp)
        meta = {
            "format": EXPORT_FORMAT,
            "cic_gpt2_version": __version__,
            "head": classifier.head,
            "label_names": list(classifier.label_names),
            "template": manifest.get("template"),
            "classes": manifest.get("classes"),
            "data_format": manifest.get("format"),
            "tokenizer_fingerprint": manifest.get("tokenizer", {}).get("fingerprint"),
            "prompt": classifier.prompt,
        }
        write_text(tmp / META_FILE, json.dumps(meta, indent=2) + "\n")
        write_text(tmp / "data_manifest.json", json.dumps(manifest, indent=2) + "\n")
        if run_config is not None:
            write_text(tmp / "run_config.yaml", yaml.safe_dump(run_config, sort_keys=False))
        if ds_config is not None:
            write_text(tmp / "ds_config.json", json.dumps(ds_config, indent=2) + "\n")
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_export(path: str | Path):
    """(classifier in eval mode, tokenizer, manifest) from an export directory."""
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    from cic_gpt2.model import TrafficClassifier
    from cic_gpt2.tokenizer import load_tokenizer

    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise CicError(f"{path} is not a cic-gpt2 export (no {META_FILE}); make one with `cic-gpt2 export CHECKPOINT`")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    cls = GPT2ForSequenceClassification if meta["head"] == "seqcls" else GPT2LMHeadModel
    hf_model = cls.from_pretrained(str(path), local_files_only=True)
    hf_model.config._attn_implementation = "sdpa"  # causal-lm scoring passes a 4-D mask
    classifier = TrafficClassifier(hf_model, meta["head"], meta["label_names"], meta.get("prompt")).eval()
    tokenizer = load_tokenizer(str(path))
    manifest_path = path / "data_manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    return classifier, tokenizer, manifest


# --------------------------------------------------------------------------------------------------
# ZeRO checkpoint -> export
# --------------------------------------------------------------------------------------------------
def resolve_checkpoint(path: str | Path) -> Path:
    """A complete `step-NNNNNN` tag dir from a tag dir, a checkpoints dir or a run dir."""
    from cic_gpt2 import checkpoint

    path = Path(path)
    if not path.is_dir():
        raise CicError(f"checkpoint {path}: no such directory")
    if (path / "run_config.yaml").is_file() or checkpoint.is_complete(path):
        if not checkpoint.is_complete(path):
            raise CicError(f"checkpoint {path} is incomplete (no {checkpoint.COMPLETE_MARKER} marker: the save was "
                           f"interrupted); export an older step-* directory")
        return path
    for candidate in (path, path / "checkpoints"):
        latest = checkpoint.latest_complete(candidate)
        if latest is not None:
            return latest
    raise CicError(f"{path} holds no complete checkpoint (expected step-NNNNNN/ with a "
                   f"{checkpoint.COMPLETE_MARKER} marker, or RUN_DIR/checkpoints/)")


def load_checkpoint_classifier(tag_dir: Path):
    """(classifier with the consolidated fp32 weights, tokenizer, manifest, run_config dict, ds_config dict)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from cic_gpt2.config import RunConfig, from_dict
    from cic_gpt2.prepared import check_tokenizer
    from cic_gpt2.model import build_model
    from cic_gpt2.tokenizer import load_tokenizer

    needed = ("run_config.yaml", "data_manifest.json")
    missing = [name for name in needed if not (tag_dir / name).is_file()]
    if missing:
        raise CicError(f"checkpoint {tag_dir} lacks {', '.join(missing)} (written by `cic-gpt2 train` beside the "
                       f"weights); it was not saved by cic-gpt2 train")
    run_config = yaml.safe_load((tag_dir / "run_config.yaml").read_text(encoding="utf-8"))
    manifest = json.loads((tag_dir / "data_manifest.json").read_text(encoding="utf-8"))
    ds_path = tag_dir / "ds_config.json"
    ds_config = json.loads(ds_path.read_text(encoding="utf-8")) if ds_path.is_file() else None
    cfg = from_dict(RunConfig, run_config)
    tokenizer = load_tokenizer(manifest.get("tokenizer", {}).get("source"))
    check_tokenizer(manifest, tokenizer)
    classifier = build_model(cfg.model, manifest["label_names"], tokenizer, load_weights=False)
    state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    result = classifier.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CicError(f"checkpoint {tag_dir} does not match model {cfg.model.name} ({cfg.model.head}): missing "
                       f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    return classifier.eval(), tokenizer, manifest, run_config, ds_config


def default_output(tag_dir: Path) -> Path:
    """RUN_DIR/export-step-NNNNNN for RUN_DIR/checkpoints/step-NNNNNN (outside the tag: pruning keeps it)."""
    if tag_dir.parent.name == "checkpoints":
        return tag_dir.parent.parent / f"export-{tag_dir.name}"
    return tag_dir.with_name(f"{tag_dir.name}-export")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a step-NNNNNN checkpoint dir, a checkpoints dir or a run dir (latest complete)")
    parser.add_argument("--output", "-o", help="export directory (default: RUN_DIR/export-step-NNNNNN)")


def main(args: argparse.Namespace) -> int:
    tag_dir = resolve_checkpoint(args.checkpoint)
    out = Path(args.output) if args.output else default_output(tag_dir)
    classifier, tokenizer, manifest, run_config, ds_config = load_checkpoint_classifier(tag_dir)
    export_hf(classifier, out, tokenizer, manifest, run_config, ds_config)
    print(f"exported {tag_dir} ({classifier.head}, {len(classifier.label_names)} labels) -> {out}")
    return 0
