"""Baselines on the bundled real CICIoT2023 rows: the same test rows as the model, the real features,
deterministic with a seed, clear errors for datasets they cannot use."""
import csv
import json

import datasets
import numpy as np
import pandas as pd
import pytest

from cic_gpt2 import schema
from cic_gpt2.errors import CicError, DataError
from cic_gpt2.metrics import classification_metrics
from cic_gpt2.templates import render
from cic_gpt2.metrics import row_ids_digest
from cic_gpt2.trees import run_baselines

from conftest import SAMPLE_V2, run_cli


@pytest.fixture(scope="module")
def baseline_run(prepared_v2, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    assert run_cli("baseline", "--data", prepared_v2, "--output", out, "--models", "rf,hgb", "--seed", "0",
                   "--no-progress") == 0
    return out


def test_baselines_score_exactly_the_prepared_test_rows(prepared_v2, baseline_run, capsys):
    manifest = json.loads((prepared_v2 / "manifest.json").read_text())
    test_split = datasets.load_from_disk(str(prepared_v2 / "test"))
    test_row_ids = list(test_split["row_id"])
    test_labels = [manifest["label_names"][i] for i in test_split["label"]]

    report = json.loads((baseline_run / "baseline.json").read_text())
    assert report["n"] == len(test_row_ids) == manifest["splits"]["test"]["rows"]
    assert report["row_ids_sha256"] == row_ids_digest(test_row_ids)
    assert list(report["models"]) == ["RandomForest", "HistGradientBoosting"]

    with (baseline_run / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["row_id"]) for r in rows] == test_row_ids  # same rows, same order
    assert [r["label"] for r in rows] == test_labels
    for name, entry in report["models"].items():
        m = entry["metrics"]
        assert m["n"] == len(test_row_ids)
        assert list(m["per_class"]) == manifest["label_names"]
        # The JSON figures are exactly what the shared metrics give on these predictions.
        recomputed = classification_metrics(
            [manifest["label2id"][r["label"]] for r in rows], [manifest["label2id"][r[name]] for r in rows],
            manifest["label_names"],
        )
        for key in ("accuracy", "macro_f1", "weighted_f1", "confusion_matrix"):
            assert m[key] == recomputed[key]
        # Real signal from real features: far above chance (1/8) on the 8-class grouping.
        assert m["macro_f1"] > 0.5 and m["roc_auc_ovr_macro"] > 0.85
    md = (baseline_run / "baseline.md").read_text()
    assert "| RandomForest |" in md and "| HistGradientBoosting |" in md and "### RandomForest — test split" in md
    for png in ("confusion_matrix_rf.png", "per_class_f1_rf.png", "confusion_matrix_hgb.png", "per_class_f1_hgb.png"):
        assert (baseline_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_features_are_the_source_csv_values_in_manifest_order(prepared_v2):
    manifest = json.loads((prepared_v2 / "manifest.json").read_text())
    test_split = datasets.load_from_disk(str(prepared_v2 / "test")).select(range(20))
    source = pd.read_csv(SAMPLE_V2)
    for row_id, features in zip(test_split["row_id"], test_split["features"]):
        expected = source.iloc[row_id][manifest["features"]].to_numpy(dtype=np.float32)
        np.testing.assert_allclose(np.asarray(features, dtype=np.float32), expected, rtol=1e-6)


def test_deterministic_with_a_seed(prepared_v2, baseline_run):
    report = json.loads((baseline_run / "baseline.json").read_text())
    again = run_baselines(prepared_v2, ["rf", "hgb"], seed=0)
    for name, metrics in again.items():
        assert metrics["row_ids_sha256"] == report["row_ids_sha256"]
        assert metrics["confusion_matrix"] == report["models"][name]["metrics"]["confusion_matrix"]
        assert metrics["roc_auc_ovr_macro"] == report["models"][name]["metrics"]["roc_auc_ovr_macro"]


def test_text_format_dataset_is_refused(sample_v2, tmp_path, capsys):
    # The original script's `text,label` CSV (real rows serialized): prepared fine, but no numeric features.
    src = pd.read_csv(sample_v2).iloc[::20]
    texts = render("seed", src[list(schema.V2_FEATURES)].to_numpy(np.float64), schema.V2_FEATURES).to_pylist()
    groups = [schema.CLASS_TO_GROUP[schema.map_label(x, "34")] for x in src["Label"]]
    text_csv = tmp_path / "text.csv"
    pd.DataFrame({"text": texts, "label": groups}).to_csv(text_csv, index=False)
    text_dir = tmp_path / "text_prepared"
    assert run_cli("prepare", text_csv, "--output", text_dir, "--classes", "8", "--seed", "0") == 0
    capsys.readouterr()

    with pytest.raises(CicError, match="baselines need a CSV-derived dataset"):
        run_baselines(text_dir, ["rf"])
    assert run_cli("baseline", "--data", text_dir, "--output", tmp_path / "out", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "baselines need a CSV-derived dataset" in err and str(text_dir) in err
    assert not (tmp_path / "out").exists()


def test_bad_arguments_are_named(prepared_v2, tmp_path, capsys):
    assert run_cli("baseline", "--data", prepared_v2, "--models", "rf,svm", "--output", tmp_path, "--no-progress") == 2
    assert "unknown model 'svm'" in capsys.readouterr().err
    with pytest.raises(DataError, match="manifest.json not found"):
        run_baselines(tmp_path, ["rf"])


def test_default_output_is_beside_the_data_and_never_replaced_silently(prepared_v2, tmp_path, monkeypatch, capsys):
    import shutil

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # the report must not land in the current directory
    data = tmp_path / "v2_8"
    shutil.copytree(prepared_v2, data)
    args = ("baseline", "--data", data, "--models", "rf", "--seed", "3", "--no-progress")
    assert run_cli(*args) == 0
    report = data / "baseline-seed3"
    first = json.loads((report / "baseline.json").read_text())
    assert first["seed"] == 3 and list(first["models"]) == ["RandomForest"]
    capsys.readouterr()
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(report) in err and "--overwrite" in err
    assert run_cli(*args, "--overwrite") == 0
    again = json.loads((report / "baseline.json").read_text())
    assert again["models"]["RandomForest"]["metrics"] == first["models"]["RandomForest"]["metrics"]
    assert list(cwd.iterdir()) == []
