"""`cic-gpt2 evaluate` on the bundled real CICIoT2023 rows with a tiny GPT-2 export (random init: these tests
check that the numbers are computed on the right rows the same way, not that the model is good).

- a prepared test split and a raw CSV holding exactly those source rows give identical metrics;
- the report (JSON, Markdown, predictions, PNGs) is consistent with the predictions it lists;
- `--compare` scores RandomForest / HistGradientBoosting on exactly the model's test rows (row ids);
- 1 and 2 processes (torchrun, gloo) give identical numbers.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cic_gpt2.files import free_port
from conftest import SAMPLE_V2, run_cli, run_proc

RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def build_tiny_export(root: Path, prepared_dir: Path) -> Path:
    """A freshly built tiny GPT-2 classifier (seeded random init, no training) exported with B1's export_hf.
    Built once per session under `root` (test_predict.py reuses it)."""
    out = root / "tiny_export"
    if (out / "data_manifest.json").is_file():
        return out
    import torch

    from cic_gpt2.config import ModelConfig, RunConfig, to_dict
    from cic_gpt2.exported import export_hf
    from cic_gpt2.model import build_model
    from cic_gpt2.tokenizer import load_tokenizer

    manifest = json.loads((prepared_dir / "manifest.json").read_text())
    tokenizer = load_tokenizer()
    cfg = dataclasses.replace(RunConfig(), model=ModelConfig(name="tiny", dropout=0.0))
    torch.manual_seed(0)
    classifier = build_model(cfg.model, manifest["label_names"], tokenizer)
    from cic_gpt2.membership import Membership
    from cic_gpt2.prepared import Prepared

    export_hf(classifier, out, tokenizer, manifest, to_dict(cfg), None,
              Membership.build(Prepared.load(prepared_dir).train_hashes()))  # as train's export does
    return out


def write_source_rows(row_ids, path: Path) -> Path:
    """The bundled sample's data rows `row_ids` (0-based, in that order) as a CSV, cells copied as text."""
    raw = pd.read_csv(SAMPLE_V2, dtype=str, keep_default_na=False)
    raw.iloc[np.asarray(row_ids)].to_csv(path, index=False, lineterminator="\n")
    return path


def split_row_ids(prepared_dir: Path, split: str = "test") -> np.ndarray:
    import datasets

    return np.asarray(datasets.load_from_disk(str(prepared_dir / split))["row_id"], dtype=np.int64)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, prepared_v2) -> Path:
    return build_tiny_export(tmp_path_factory.getbasetemp(), prepared_v2)


@pytest.fixture(scope="session")
def evaluated(tmp_path_factory, tiny_export, prepared_v2) -> Path:
    """evaluate --compare on the prepared test split (one run shared by the report and compare tests)."""
    out = tmp_path_factory.mktemp("eval") / "prepared"
    assert run_cli("evaluate", "--model", tiny_export, "--data", prepared_v2, "--output", out, "--compare",
                   "--micro-batch-size", "32", "--no-progress") == 0
    return out


def _metrics(report_dir: Path) -> dict:
    return json.loads((report_dir / "metrics.json").read_text())["metrics"]


def test_prepared_split_and_raw_csv_give_identical_metrics(evaluated, tiny_export, prepared_v2, tmp_path):
    ids = split_row_ids(prepared_v2)
    assert len(ids) == json.loads((prepared_v2 / "manifest.json").read_text())["splits"]["test"]["rows"] > 100
    csv = write_source_rows(ids, tmp_path / "test_rows.csv")
    out = tmp_path / "csv"
    assert run_cli("evaluate", "--model", tiny_export, "--data", csv, "--output", out,
                   "--micro-batch-size", "32", "--no-progress") == 0

    from_prepared, from_csv = _metrics(evaluated), _metrics(out)
    assert from_prepared["split"] == "test" and from_csv["split"] == "csv"
    differing = [k for k in from_prepared if k not in ("split", "row_ids_sha256") and from_prepared[k] != from_csv[k]]
    assert differing == []
    assert from_csv["n"] == len(ids)
    # Row by row: the CSV's row i is the prepared test split's row i (source row ids[i]).
    p = pd.read_csv(evaluated / "predictions.csv")
    c = pd.read_csv(out / "predictions.csv")
    assert np.array_equal(p["row_id"], ids) and np.array_equal(c["row_id"], np.arange(len(ids)))
    assert (p["label"] == c["label"]).all() and (p["predicted_label"] == c["predicted_label"]).all()
    np.testing.assert_array_equal(p["probability"], c["probability"])


def test_report_files_agree_with_the_predictions(evaluated, prepared_v2):
    from cic_gpt2.metrics import classification_metrics

    report = json.loads((evaluated / "metrics.json").read_text())
    metrics = report["metrics"]
    label_names = metrics["label_names"]
    preds = pd.read_csv(evaluated / "predictions.csv")
    recomputed = classification_metrics(preds["label"].map(label_names.index), preds["predicted_label"].map(
        label_names.index), label_names)
    for key in ("accuracy", "macro_f1", "weighted_f1", "confusion_matrix", "per_class"):
        assert metrics[key] == recomputed[key], key
    cm = np.asarray(metrics["confusion_matrix"])
    assert cm.sum() == metrics["n"] == len(preds)
    normalized = np.asarray(metrics["confusion_matrix_normalized"])
    support = cm.sum(axis=1)
    np.testing.assert_allclose(normalized.sum(axis=1)[support > 0], 1.0, atol=1e-5)
    assert (normalized.sum(axis=1)[support == 0] == 0).all()
    assert metrics["roc_auc_ovr_macro"] is not None and 0.0 <= metrics["roc_auc_ovr_macro"] <= 1.0
    assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
    assert ((preds["probability"] > 0) & (preds["probability"] <= 1)).all()
    assert report["world_size"] == 1 and report["split"] == "test"
    md = (evaluated / "metrics.md").read_text()
    assert f"{metrics['accuracy']:.4f}" in md and all(name in md for name in label_names)
    for png in ("confusion_matrix.png", "confusion_matrix_normalized.png", "per_class_f1.png"):
        data = (evaluated / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5_000, png
    assert not list(evaluated.glob(".*tmp*")), "temporary files left behind"


def test_compare_scores_baselines_on_exactly_the_models_test_rows(evaluated, prepared_v2):
    from cic_gpt2.prepared import Prepared
    from cic_gpt2.metrics import row_ids_digest
    from cic_gpt2.trees import fit_baselines

    compare = json.loads((evaluated / "compare.json").read_text())["results"]
    model_name, *baselines = list(compare)
    assert model_name.startswith("GPT-2 tiny") and baselines == ["RandomForest", "HistGradientBoosting"]
    model_rows = pd.read_csv(evaluated / "predictions.csv")["row_id"].to_numpy()
    baseline_rows = Prepared.load(prepared_v2).feature_split("test").row_ids
    assert np.array_equal(model_rows, baseline_rows)
    digest = row_ids_digest(model_rows)
    assert all(compare[name]["row_ids_sha256"] == digest for name in compare)
    assert all(compare[name]["n"] == len(model_rows) for name in compare)
    # The compared figures are the baselines' own (fit again here: same seed, same numbers).
    _, results = fit_baselines(prepared_v2, ["rf"], seed=0)
    assert np.array_equal(results["RandomForest"].row_ids, model_rows)
    assert compare["RandomForest"]["macro_f1"] == results["RandomForest"].metrics["macro_f1"]
    assert compare["RandomForest"]["macro_f1"] > 0.5  # a real classifier on real rows, not a placeholder
    table = (evaluated / "compare.md").read_text()
    assert all(f"| {name} |" in table for name in compare)


def test_bad_requests_are_one_line_errors(tiny_export, prepared_v2, tmp_path, capsys):
    csv = write_source_rows(range(20), tmp_path / "rows.csv")
    assert run_cli("evaluate", "--model", tiny_export, "--data", csv, "--compare", "--output", tmp_path / "o") == 2
    assert "--compare" in capsys.readouterr().err
    assert run_cli("evaluate", "--model", tiny_export, "--data", prepared_v2, "--compare", "--split", "val",
                   "--output", tmp_path / "o") == 2
    assert "--split val" in capsys.readouterr().err
    # A dataset serialized with another template than the model's training data is refused by name.
    other = tmp_path / "other_template"
    shutil.copytree(prepared_v2, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "template": "kv"}))
    assert run_cli("evaluate", "--model", tiny_export, "--data", other, "--output", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "template" in err and "'kv'" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert run_cli("evaluate", "--model", tmp_path, "--data", prepared_v2, "--output", tmp_path / "o") == 2
    assert "not an exported model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()



@pytest.mark.slow
def test_one_and_two_processes_give_identical_numbers(evaluated, tiny_export, prepared_v2, tmp_path):
    out = tmp_path / "two"
    # 392 test rows (prepare --dedup group) = 13 micro-batches of 32 over 2 ranks: uneven slices, so the gather pads and drops filler rows.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "cic_gpt2", "evaluate", "--model", str(tiny_export),
           "--data", str(prepared_v2), "--output", str(out), "--micro-batch-size", "32", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    proc = run_proc(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
    one, two = _metrics(evaluated), _metrics(out)
    assert one == two
    p1, p2 = pd.read_csv(evaluated / "predictions.csv"), pd.read_csv(out / "predictions.csv")
    pd.testing.assert_frame_equal(p1, p2)


def fake_run_dir(tiny_export: Path, root: Path, with_export: bool = True) -> Path:
    """A training run directory as `cic-gpt2 train` leaves it (checkpoints/, metrics.jsonl), with the tiny
    model as its export/ (or without one)."""
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n')
    if with_export:
        shutil.copytree(tiny_export, run / "export")
    return run


def test_default_report_dir_is_named_after_model_and_data_and_never_replaced_silently(
        tiny_export, prepared_v2, tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # the reports must not land in the current directory
    run = fake_run_dir(tiny_export, tmp_path)
    args = ("evaluate", "--model", run, "--data", prepared_v2, "--no-progress")  # a run dir: its export/
    assert run_cli(*args) == 0
    report = run / f"evaluate-{prepared_v2.name}-test"
    first = (report / "metrics.json").read_text()
    assert json.loads(first)["model"] == str((run / "export").resolve())
    capsys.readouterr()
    (report / "compare.md").write_text("left from an earlier --compare run\n")
    # A second evaluation into the same default dir: refused, one line naming the dir and the fix.
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(report) in err and "--overwrite" in err and "Traceback" not in err
    assert (report / "metrics.json").read_text() == first
    assert run_cli(*args, "--overwrite") == 0
    assert json.loads((report / "metrics.json").read_text())["metrics"] == json.loads(first)["metrics"]
    assert not (report / "compare.md").exists()
    # An export that is not a run's export/: the report is its sibling EXPORT-evaluate-<csv name>.
    export = tmp_path / "models" / "tiny-8class"
    shutil.copytree(tiny_export, export)
    csv = write_source_rows(range(20), tmp_path / "new_flows.csv")
    assert run_cli("evaluate", "--model", export, "--data", csv, "--no-progress") == 0
    assert (tmp_path / "models" / "tiny-8class-evaluate-new_flows" / "metrics.json").is_file()
    assert sorted(p.name for p in export.parent.iterdir()) == ["tiny-8class", "tiny-8class-evaluate-new_flows"]
    assert list(cwd.iterdir()) == []


def test_a_run_dir_without_an_export_says_how_to_make_one(tiny_export, prepared_v2, tmp_path, capsys):
    run = fake_run_dir(tiny_export, tmp_path, with_export=False)
    assert run_cli("evaluate", "--model", run, "--data", prepared_v2, "--no-progress") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cic-gpt2 export {run} --output {run / 'export'}" in err
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "metrics.jsonl"]
