"""The prepared dataset directory written by `cic-gpt2 prepare`: the one reader of its manifest and splits.

Layout and manifest keys: docs/prepare.md."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cic_gpt2.errors import CicError, DataError

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
TRAIN_HASHES = "train_hashes.npy"
REQUIRED_COLUMNS = ("input_ids", "label", "length", "row_id")
SAME_DATA_KEYS = ("format", "template", "classes", "label_names")
"""Keys a prepared dataset must share with a model's training data to be scored by that model."""


@dataclass(frozen=True)
class FeatureSplit:
    """One prepared split's numeric CSV features as a dense matrix, rows in split order (for the baselines)."""

    features: np.ndarray  # [n, num_features] float32
    labels: np.ndarray  # [n] int64 class ids
    row_ids: np.ndarray  # [n] int64 global source-row ids


def check_tokenizer(manifest: dict, tokenizer, what: str = "the tokenizer in use") -> None:
    """Refuse ids made by another tokenizer: DataError naming both fingerprints and sources."""
    from cic_gpt2.tokenizer import tokenizer_fingerprint, tokenizer_source

    want = manifest.get("tokenizer", {})
    have = tokenizer_fingerprint(tokenizer)
    if want.get("fingerprint") != have:
        raise DataError(
            f"the dataset was tokenized with tokenizer {want.get('fingerprint')} ({want.get('source')}) but "
            f"{what} is {have} ({tokenizer_source(tokenizer)}): token ids would mean different words; prepare "
            f"the data again with `cic-gpt2 prepare ... --tokenizer <the model's dir>` or pick the matching model"
        )


@dataclass(frozen=True)
class Prepared:
    """A directory written by `cic-gpt2 prepare`: manifest, splits, features, compatibility checks."""

    path: Path
    manifest: dict

    @staticmethod
    def is_prepared(path: str | Path) -> bool:
        return (Path(path) / MANIFEST).is_file()

    @classmethod
    def load(cls, path: str | Path) -> "Prepared":
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise DataError(f"{manifest_path} not found: {path} is not a prepared dataset; "
                            f"create it with `cic-gpt2 prepare CSV... --output {path}`")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{manifest_path} is not valid JSON ({e}); prepare the dataset again") from None
        for key in ("label_names", "tokenizer"):
            if key not in manifest:
                raise DataError(f"{manifest_path} has no {key!r} key; prepare the dataset again")
        return cls(path=path, manifest=manifest)

    @property
    def label_names(self) -> list[str]:
        return list(self.manifest["label_names"])

    def class_counts(self, split: str = "train") -> list[int]:
        """Rows of each class in `split`, in `label_names` order (the manifest's `splits.<split>.class_counts`)."""
        counts = self.manifest.get("splits", {}).get(split, {}).get("class_counts")
        if not isinstance(counts, dict):
            raise DataError(f"{self.path / MANIFEST} has no splits.{split}.class_counts; prepare the dataset again")
        return [int(counts.get(name, 0)) for name in self.label_names]

    @property
    def max_length(self) -> int:
        """Tokens of the longest row (before any training-time truncation)."""
        return int(self.manifest["max_length"])

    def _split_dir(self, name: str) -> Path:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        split_dir = self.path / name
        if not split_dir.is_dir():
            raise DataError(f"{split_dir} is missing: {self.path} is not a complete prepared dataset; "
                            f"run `cic-gpt2 prepare ... --output {self.path} --overwrite`")
        return split_dir

    def split(self, name: str):
        """The split as a memory-mapped `datasets.Dataset` (rows stay on disk until read)."""
        import datasets

        split_dir = self._split_dir(name)
        ds = datasets.load_from_disk(str(split_dir))
        missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
        if missing:
            raise DataError(f"{split_dir} lacks column(s) {', '.join(missing)}; it was not written by "
                            f"`cic-gpt2 prepare` (or by an older version): prepare it again")
        return ds

    def table(self, name: str):
        """The split as one memory-mapped pyarrow Table."""
        return self.split(name).with_format("arrow")[:]

    def train_hashes(self) -> np.ndarray:
        """Sorted unique uint64 hashes (`encode.feature_hashes`, or `encode.text_hashes` for text input) of
        the train rows' feature vectors: a row whose hash is in here was seen in training."""
        path = self.path / TRAIN_HASHES
        if not path.is_file():
            raise DataError(f"{path} not found: {self.path} was prepared by an older version of cic-gpt2 (before "
                            f"train_hashes.npy); prepare it again with `cic-gpt2 prepare ... --output {self.path} "
                            f"--overwrite`")
        try:
            hashes = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"{path} is not a readable .npy file ({e}); prepare the dataset again") from None
        if hashes.dtype != np.uint64 or hashes.ndim != 1:
            raise DataError(f"{path}: expected a 1-D uint64 array, got {hashes.dtype} {hashes.shape}; "
                            f"prepare the dataset again")
        return hashes

    # ------------------------------------------------------------------------------------------ checks
    def check_tokenizer(self, tokenizer, what: str = "the tokenizer in use") -> None:
        check_tokenizer(self.manifest, tokenizer, what)

    def check_compatible(self, model_manifest: dict) -> None:
        """The data must be serialized, tokenized and labelled as the model's training data was."""
        where = self.path / MANIFEST
        for key in SAME_DATA_KEYS:
            if self.manifest.get(key) != model_manifest.get(key):
                raise DataError(f"{where}: {key} {self.manifest.get(key)!r} differs from the model's training data "
                                f"({model_manifest.get(key)!r}); prepare the data with the model's settings, or "
                                f"pass the raw CSVs as --data")
        if self.manifest.get("binning") != model_manifest.get("binning"):
            raise DataError(f"{where}: the binned template's bin edges differ from the model's training data (the "
                            f"same bin word would mean another value range); pass the raw CSVs as --data: they "
                            f"are binned with the model's own edges")
        fp_data = self.manifest["tokenizer"]["fingerprint"]
        fp_model = model_manifest["tokenizer"]["fingerprint"]
        if fp_data != fp_model:
            raise DataError(f"{self.path}: tokenizer fingerprint {fp_data} differs from the model's {fp_model}; "
                            f"prepare the data with the model's tokenizer (--tokenizer EXPORT_DIR)")

    # ------------------------------------------------------------------------------------------ baselines
    def feature_names(self) -> list[str]:
        """The numeric CSV feature names; a CicError for a dataset that has none (text format)."""
        names = list(self.manifest.get("features") or [])
        if self.manifest.get("format") == "text" or not names:
            raise CicError(
                f"{self.path} was prepared from a text,label CSV (format {self.manifest.get('format')!r}) and holds "
                "no numeric features; baselines need a CSV-derived dataset: prepare the CICIoT2023 feature CSVs "
                "(v1 or v2 schema) instead"
            )
        return names

    def feature_split(self, name: str) -> FeatureSplit:
        """`features`, `label`, `row_id` of a split (memory-mapped Arrow) as numpy, checked."""
        import pyarrow.compute as pc

        num_features = len(self.feature_names())
        split_dir = self._split_dir(name)
        table = self.table(name)
        if "features" not in table.column_names:
            raise DataError(f"{split_dir} lacks column(s) features; re-run `cic-gpt2 prepare`")
        n = table.num_rows
        column = table.column("features").combine_chunks()
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        row_ids = table.column("row_id").to_numpy().astype(np.int64)
        bad = np.flatnonzero(lengths != num_features)
        if bad.size:
            i = int(bad[0])
            raise DataError(f"{split_dir}: row_id {int(row_ids[i])} has {int(lengths[i])} features, the manifest "
                            f"lists {num_features}; re-run `cic-gpt2 prepare`")
        features = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, num_features)
        nonfinite = ~np.isfinite(features).all(axis=1)
        if nonfinite.any():
            i = int(np.flatnonzero(nonfinite)[0])
            raise DataError(f"{split_dir}: row_id {int(row_ids[i])} has a NaN or infinite feature "
                            f"({int(nonfinite.sum())} rows in all); re-run `cic-gpt2 prepare`, which drops such rows")
        labels = table.column("label").to_numpy().astype(np.int64)
        return FeatureSplit(features=features, labels=labels, row_ids=row_ids)
