"""`cic-gpt2 export CHECKPOINT [--output DIR]`: a DeepSpeed ZeRO checkpoint -> a Hugging Face model directory.

    cic-gpt2 export runs/r1/checkpoints/step-000400              # -> runs/r1/export-step-000400/
    cic-gpt2 export runs/r1 --output models/cic-gpt2-8class      # the run's latest complete checkpoint

What an export holds and how to use it without cic-gpt2: docs/model.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from cic_gpt2.errors import CicError
from cic_gpt2.exported import export_hf

HELP = "DeepSpeed checkpoint -> Hugging Face model directory"


# --------------------------------------------------------------------------------------------------
# ZeRO checkpoint -> export
# --------------------------------------------------------------------------------------------------
def load_checkpoint_classifier(tag_dir: Path):
    """(classifier with the consolidated fp32 weights, tokenizer, manifest, run_config dict, ds_config dict)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from cic_gpt2.config import RunConfig, from_dict
    from cic_gpt2.prepared import check_tokenizer
    from cic_gpt2.model import build_model
    from cic_gpt2.tokenizer import dataset_tokenizer

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
    tokenizer = dataset_tokenizer(manifest)
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
    from cic_gpt2.checkpoint import resolve_tag_dir

    tag_dir = resolve_tag_dir(args.checkpoint, "export")
    out = Path(args.output) if args.output else default_output(tag_dir)
    classifier, tokenizer, manifest, run_config, ds_config = load_checkpoint_classifier(tag_dir)
    export_hf(classifier, out, tokenizer, manifest, run_config, ds_config)
    print(f"exported {tag_dir} ({classifier.head}, {len(classifier.label_names)} labels) -> {out}")
    return 0
