"""An exported model directory: the one writer and reader of its files (docs/model.md lists them).

`export_hf` writes one (atomically: temp dir + rename); `Export.open(DIR)` reads its manifest, run config,
max length and display name cheaply, and `Export.load(device)` builds the classifier and tokenizer."""
from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from cic_gpt2 import __version__
from cic_gpt2.errors import CicError
from cic_gpt2.files import replace_dir, temp_path, write_text

META_FILE = "cic_gpt2.json"
MANIFEST_FILE = "data_manifest.json"
RUN_CONFIG_FILE = "run_config.yaml"
MEMBERSHIP_FILE = "train_membership.npz"
EXPORT_FORMAT = 1
RUN_EXPORT_DIR = "export"  # where `cic-gpt2 train` exports, inside its run directory


def export_hf(classifier, out_dir: str | Path, tokenizer, manifest: dict, run_config: Optional[dict] = None,
              ds_config: Optional[dict] = None, membership=None) -> Path:
    """Write `classifier` as a Hugging Face model directory at `out_dir` (replaced atomically). The weights
    are saved in fp32 (a copy when the live model is fp16/bf16: the engine's module is not touched)."""
    import torch

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out_dir)
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
        write_text(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
        if run_config is not None:
            write_text(tmp / RUN_CONFIG_FILE, yaml.safe_dump(run_config, sort_keys=False))
        if ds_config is not None:
            write_text(tmp / "ds_config.json", json.dumps(ds_config, indent=2) + "\n")
        if membership is not None:  # the training split's feature vectors (membership.Membership)
            membership.save(tmp / MEMBERSHIP_FILE)
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


@dataclass(frozen=True)
class Export:
    """A directory written by `export_hf` (train's RUN_DIR/export, or `cic-gpt2 export`)."""

    path: Path
    meta: dict
    manifest: dict
    run_config: dict = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> "Export":
        """Read the small files (before any weights, so inputs can be checked first). `path` is an export
        directory, or a training run directory, whose `export/` is then used."""
        path = Path(path)
        if not (path / META_FILE).is_file() and (path / RUN_EXPORT_DIR / META_FILE).is_file():
            path = path / RUN_EXPORT_DIR
        if not (path / META_FILE).is_file():
            if (path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file():
                raise CicError(f"{path}: not an exported model but a training run without an export (no "
                               f"{path / RUN_EXPORT_DIR / META_FILE}); make it with "
                               f"`cic-gpt2 export {path} --output {path / RUN_EXPORT_DIR}`")
            raise CicError(f"{path}: not an exported model (no {META_FILE}); pass a run directory, its export/ "
                           f"directory, or make one with `cic-gpt2 export CHECKPOINT`")
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise CicError(f"{path}: not a complete export (no {MANIFEST_FILE}); export the checkpoint again")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        run_path = path / RUN_CONFIG_FILE
        run_config = (yaml.safe_load(run_path.read_text(encoding="utf-8")) or {}) if run_path.is_file() else {}
        return cls(path=path, meta=meta, manifest=manifest, run_config=run_config)

    def report_dir(self, name: str) -> Path:
        """Default directory of a report about this model: RUN_DIR/NAME for a run's export/, else a sibling
        EXPORT_DIR-NAME (never inside the export, which `cic-gpt2 export` replaces whole)."""
        path = self.path.resolve()
        return path.parent / name if path.name == RUN_EXPORT_DIR else path.with_name(f"{path.name}-{name}")

    @property
    def label_names(self) -> list[str]:
        return list(self.manifest["label_names"])

    @property
    def head(self) -> str:
        return self.meta["head"]

    @property
    def max_length(self) -> Optional[int]:
        """data.max_length the model was trained with (rows are truncated to it, as in training)."""
        return (self.run_config.get("data") or {}).get("max_length")

    @property
    def display_name(self) -> str:
        """e.g. "GPT-2 tiny (seqcls)": for report titles and comparison tables."""
        model = self.run_config.get("model") or {}
        name = Path(str(model.get("name") or self.path.resolve().name)).name
        return f"GPT-2 {name} ({model['head']})" if model.get("head") else f"GPT-2 {name}"

    def membership(self):
        """The training split's feature-vector set (`membership.Membership`), None for an export without one."""
        from cic_gpt2.membership import Membership

        path = self.path / MEMBERSHIP_FILE
        return Membership.load(path) if path.is_file() else None

    def load(self, device="cpu"):
        """(classifier in eval mode on `device`, tokenizer)."""
        from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        from cic_gpt2.model import TrafficClassifier
        from cic_gpt2.tokenizer import load_tokenizer

        cls = GPT2ForSequenceClassification if self.head == "seqcls" else GPT2LMHeadModel
        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a "Loading weights" bar per run is noise next to our own
        try:
            hf_model = cls.from_pretrained(str(self.path), local_files_only=True)
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()
        hf_model.config._attn_implementation = "sdpa"  # causal-lm scoring passes a 4-D mask
        classifier = TrafficClassifier(hf_model, self.head, self.meta["label_names"], self.meta.get("prompt"))
        return classifier.to(device).eval(), load_tokenizer(str(self.path))
