"""`cic-gpt2 predict` on real CICIoT2023 rows with a tiny GPT-2 export (random init, built once per session).

- output row-aligned with the input, including corrupted rows (text in a numeric cell, NaN, empty cell, inf,
  truncated lines, an unknown label), which carry their reason in `status` and are summarized on stderr;
- predictions equal the evaluate path's, whatever the batch size and chunking; unlabeled input works;
- the output file appears only when complete.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import SAMPLE_V2, run_cli
from test_evaluate import build_tiny_export, split_row_ids, write_source_rows

N_ROWS = 300
# data row -> (how it is corrupted, the status predict must report)
CORRUPTED = {
    3: ("text in a numeric cell", "non_numeric"),
    10: ("NaN", "nan"),
    11: ("empty cell", "nan"),
    70: ("inf", "inf"),
    150: ("line cut to 40 characters", "wrong_field_count"),
    200: ("line cut to 12 fields", "wrong_field_count"),  # the cut removed the trailing features and the label
    220: ("three extra fields", "wrong_field_count"),
    230: ("a field too many in front", "wrong_field_count"),  # every cell one column to the right
    N_ROWS - 1: ("last line cut mid-value, no final newline", "truncated"),
}
# rows whose label alone is broken: predict needs no label, so they are predicted (true_label left empty)
LABEL_ONLY = {130: "unknown label", 160: "empty label"}


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, prepared_v2):
    return build_tiny_export(tmp_path_factory.getbasetemp(), prepared_v2)


@pytest.fixture(scope="module")
def clean_and_corrupted(tmp_path_factory):
    """The first N_ROWS real rows of the v2 sample, as written, and a copy with CORRUPTED applied."""
    d = tmp_path_factory.mktemp("predict_inputs")
    with open(SAMPLE_V2, encoding="utf-8", newline="") as f:
        lines = f.read().splitlines()[:N_ROWS + 1]
    header, rows = lines[0], lines[1:]
    (d / "clean.csv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    bad = list(rows)
    cells = lambda i: bad[i].split(",")  # noqa: E731
    c = cells(3); c[3] = "fast"; bad[3] = ",".join(c)
    c = cells(10); c[5] = "NaN"; bad[10] = ",".join(c)
    c = cells(11); c[30] = ""; bad[11] = ",".join(c)
    c = cells(70); c[3] = "inf"; bad[70] = ",".join(c)
    c = cells(130); c[-1] = "NotARealAttack"; bad[130] = ",".join(c)
    bad[150] = bad[150][:40]
    c = cells(160); c[-1] = ""; bad[160] = ",".join(c)
    bad[200] = ",".join(cells(200)[:12])
    bad[220] += ",1,2,3"
    bad[230] = "1," + bad[230]
    bad[N_ROWS - 1] = bad[N_ROWS - 1][: len(bad[N_ROWS - 1]) // 2]
    (d / "corrupted.csv").write_text("\n".join([header, *bad]), encoding="utf-8")  # no final newline
    return d / "clean.csv", d / "corrupted.csv"


def _predict(export, inp, out, *extra) -> int:
    return run_cli("predict", "--model", export, "--input", inp, "--output", out, "--no-progress", *extra)


def test_output_is_row_aligned_and_bad_rows_are_reported(tiny_export, clean_and_corrupted, tmp_path, capfd):
    from cic_gpt2 import schema

    clean, corrupted = clean_and_corrupted
    assert _predict(tiny_export, clean, tmp_path / "clean.csv", "--top-k", "3") == 0
    capfd.readouterr()
    # 64-row chunks: the bad rows fall into different chunks, the output must still line up.
    assert _predict(tiny_export, corrupted, tmp_path / "bad.csv", "--top-k", "3", "--chunk-rows", "64") == 0
    err = capfd.readouterr().err
    got = pd.read_csv(tmp_path / "bad.csv", keep_default_na=False, na_values=[""])
    ref = pd.read_csv(tmp_path / "clean.csv", keep_default_na=False, na_values=[""])

    assert list(got["row_id"]) == list(range(N_ROWS)) == list(ref["row_id"])
    expected_status = {i: CORRUPTED[i][1] if i in CORRUPTED else "ok" for i in range(N_ROWS)}
    assert dict(zip(got["row_id"], got["status"])) == expected_status
    bad = got["row_id"].isin(list(CORRUPTED))
    assert got.loc[bad, ["predicted_label", "probability", "label_2", "prob_3"]].isna().all().all()
    assert f"{len(CORRUPTED)} row(s) without a prediction" in err
    assert "non_numeric 1" in err and "nan 2" in err and "inf 1" in err and "wrong_field_count 4" in err
    assert "truncated 1" in err and "missing_label" not in err and "unknown_label" not in err

    # Every good row carries the same prediction as in the clean file (no shift, no mix-up).
    ok = ~bad
    assert (ref["status"] == "ok").all()
    assert (got.loc[ok, "predicted_label"] == ref.loc[ok, "predicted_label"]).all()
    np.testing.assert_allclose(got.loc[ok, "probability"], ref.loc[ok, "probability"], rtol=1e-4)
    raw = pd.read_csv(clean, dtype=str)
    assert (ref["true_label"] == [schema.map_label(x, "8") for x in raw["Label"]]).all()
    label_only = got["row_id"].isin(list(LABEL_ONLY))
    assert (got.loc[ok & ~label_only, "true_label"] == ref.loc[ok & ~label_only, "true_label"]).all()
    assert got.loc[label_only, "true_label"].isna().all() and ref.loc[label_only, "true_label"].notna().all()
    assert (ref["probability"] >= ref["prob_2"]).all() and (ref["prob_2"] >= ref["prob_3"]).all()
    assert (ref["predicted_label"] != ref["label_2"]).all()


def test_predictions_equal_the_evaluate_path(tiny_export, prepared_v2, tmp_path):
    # evaluate on the prepared test split; predict on those very source rows as a CSV, other batching.
    assert run_cli("evaluate", "--model", tiny_export, "--data", prepared_v2, "--output", tmp_path / "eval",
                   "--no-progress") == 0
    ids = split_row_ids(prepared_v2)
    csv = write_source_rows(ids, tmp_path / "test_rows.csv")
    assert _predict(tiny_export, csv, tmp_path / "p.csv", "--all-probs", "--batch-size", "7", "--chunk-rows", "100") == 0
    evaluated = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    predicted = pd.read_csv(tmp_path / "p.csv")
    assert len(predicted) == len(evaluated) == len(ids)
    assert (predicted["status"] == "ok").all()
    assert (predicted["predicted_label"] == evaluated["predicted_label"]).all()
    assert (predicted["true_label"] == evaluated["label"]).all()
    np.testing.assert_allclose(predicted["probability"], evaluated["probability"], rtol=1e-4)
    prob_cols = [c for c in predicted if c.startswith("prob:")]
    probs = predicted[prob_cols].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert (np.asarray(prob_cols)[probs.argmax(axis=1)] == "prob:" + predicted["predicted_label"]).all()


def test_unlabeled_input(tiny_export, clean_and_corrupted, tmp_path):
    clean, _ = clean_and_corrupted
    unlabeled = tmp_path / "unlabeled.csv"
    pd.read_csv(clean, dtype=str).drop(columns=["Label"]).to_csv(unlabeled, index=False)
    assert _predict(tiny_export, unlabeled, tmp_path / "u.csv") == 0
    assert _predict(tiny_export, clean, tmp_path / "l.csv") == 0
    u, labelled = pd.read_csv(tmp_path / "u.csv"), pd.read_csv(tmp_path / "l.csv")
    assert list(u.columns) == ["row_id", "status", "predicted_label", "probability"]
    assert "true_label" in labelled.columns
    assert (u["predicted_label"] == labelled["predicted_label"]).all() and (u["status"] == "ok").all()


def test_output_appears_only_when_complete(tiny_export, clean_and_corrupted, tmp_path, capsys):
    clean, _ = clean_and_corrupted
    lines = clean.read_text().splitlines()
    lines[250] = '"' + lines[250]  # a quote never closed: a malformed CSV, found after earlier chunks were written
    broken = tmp_path / "broken.csv"
    broken.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out" / "p.csv"
    assert _predict(tiny_export, broken, out, "--chunk-rows", "64") == 2
    assert "malformed CSV" in capsys.readouterr().err
    assert not out.exists() and list(out.parent.iterdir()) == []
    out.write_text("keep me\n")
    assert _predict(tiny_export, clean, out) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "keep me\n"
    assert _predict(tiny_export, clean, out, "--overwrite") == 0
    assert len(pd.read_csv(out)) == N_ROWS


@pytest.mark.gpu
def test_cuda_predictions_equal_cpu(tiny_export, clean_and_corrupted, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    clean, _ = clean_and_corrupted
    assert _predict(tiny_export, clean, tmp_path / "cpu.csv", "--device", "cpu") == 0
    assert _predict(tiny_export, clean, tmp_path / "gpu.csv", "--device", "cuda") == 0
    cpu, gpu = pd.read_csv(tmp_path / "cpu.csv"), pd.read_csv(tmp_path / "gpu.csv")
    assert (cpu["predicted_label"] == gpu["predicted_label"]).all()
    np.testing.assert_allclose(cpu["probability"], gpu["probability"], rtol=1e-3)


def test_input_of_another_csv_format_is_refused_by_name(tiny_export, sample_v1, tmp_path, capsys):
    assert _predict(tiny_export, sample_v1, tmp_path / "p.csv") == 2
    err = capsys.readouterr().err.strip()
    assert "a v1 CSV, but the model was trained on v2 rows" in err and len(err.splitlines()) == 1
    assert run_cli("evaluate", "--model", tiny_export, "--data", sample_v1, "--output", tmp_path / "e") == 2
    assert "a v1 CSV" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "e").exists()


def test_rows_seen_in_training_are_counted(tiny_export, prepared_v2, tmp_path, capsys):
    """The export carries the training split's feature vectors: test-split rows (leak-free split) are new,
    training rows are not, and evaluate reports the same count."""
    from cic_gpt2.predict import predict_csv

    test_rows, train_rows = split_row_ids(prepared_v2, "test"), split_row_ids(prepared_v2, "train")[:200]
    test_csv = write_source_rows(test_rows, tmp_path / "test.csv")
    train_csv = write_source_rows(train_rows, tmp_path / "train.csv")
    assert predict_csv(tiny_export, test_csv, tmp_path / "p1.csv", progress=False)["seen_in_training"] == 0
    assert predict_csv(tiny_export, train_csv, tmp_path / "p2.csv", progress=False)["seen_in_training"] == 200
    assert run_cli("evaluate", "--model", tiny_export, "--data", train_csv, "--output", tmp_path / "e",
                   "--no-progress") == 0
    assert "200 of 200 evaluated rows have a feature vector that was in the model's training split" in \
        capsys.readouterr().err
    seen = json.loads((tmp_path / "e" / "metrics.json").read_text())["seen_in_training"]
    assert seen["rows"] == 200 and seen["of"] == 200


def test_a_run_directory_is_read_through_its_export(tiny_export, clean_and_corrupted, tmp_path, capsys):
    from test_evaluate import fake_run_dir

    clean, _ = clean_and_corrupted
    run = fake_run_dir(tiny_export, tmp_path)
    assert _predict(run, clean, tmp_path / "from_run.csv") == 0
    assert _predict(tiny_export, clean, tmp_path / "from_export.csv") == 0
    assert (tmp_path / "from_run.csv").read_text() == (tmp_path / "from_export.csv").read_text()
    capsys.readouterr()
    shutil.rmtree(run / "export")
    assert _predict(run, clean, tmp_path / "p.csv") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a training run without an export" in err
    assert f"`cic-gpt2 export {run} --output {run / 'export'}`" in err and not (tmp_path / "p.csv").exists()
