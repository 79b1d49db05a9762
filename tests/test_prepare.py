"""`cic-gpt2 prepare` end to end on the real bundled rows: outputs, manifest, split, round trip, bad input."""
import json
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from conftest import run_cli

from cic_gpt2 import encode, prepare, schema, splits
from cic_gpt2.errors import CicError, DataError
from cic_gpt2.templates import render
from cic_gpt2.tokenizer import load_tokenizer, tokenizer_fingerprint

MANIFEST_KEYS = {"version", "created", "inputs", "format", "label_column", "features", "template", "classes",
                 "label_names", "label2id", "split", "splits", "token_stats", "max_length", "tokenizer", "dropped",
                 "max_per_class", "max_train_rows", "dedup", "small_classes_dropped"}


def prep(out: Path, *inputs, args=()) -> dict:
    assert run_cli("prepare", *inputs, "--output", out, *args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    check_accounting(manifest, out)
    return manifest


def check_accounting(manifest: dict, out: Path) -> None:
    """Invariant: every input row is written to exactly one split or dropped with a reason."""
    written = sum(s["rows"] for s in manifest["splits"].values())
    assert sum(i["rows"] for i in manifest["inputs"]) == written + sum(manifest["dropped"].values())
    row_ids = np.concatenate([np.array(datasets.load_from_disk(str(out / s))["row_id"], dtype=np.int64)
                              for s in prepare.SPLITS])
    assert len(row_ids) == written == len(np.unique(row_ids))


def load(out: Path, split: str) -> pd.DataFrame:
    return datasets.load_from_disk(str(out / split)).to_pandas()


def prepare_error(capsys, *argv) -> str:
    assert run_cli("prepare", *argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("cic-gpt2 prepare: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_prepared_v2_manifest(prepared_v2, sample_v2):
    m = json.loads((prepared_v2 / "manifest.json").read_text())
    assert MANIFEST_KEYS <= set(m)
    assert m["format"] == "v2" and m["label_column"] == "Label" and m["features"] == list(schema.V2_FEATURES)
    assert m["template"] == "compact" and m["classes"] == "8" and m["label_names"] == list(schema.LABELS_8)
    assert m["label2id"] == {n: i for i, n in enumerate(schema.LABELS_8)}
    assert m["inputs"][0]["rows"] == 4050 and m["inputs"][0]["size"] == sample_v2.stat().st_size
    assert m["inputs"][0]["sha256"] == "848f35112bc994765d45d65378ddf5a41924e6aecedbcd37218c77b3c8841957"
    assert m["split"] == {"ratios": [0.8, 0.1, 0.1], "seed": 0} and m["dropped"] == {}
    tok = load_tokenizer()
    assert m["tokenizer"] == {"fingerprint": tokenizer_fingerprint(tok), "vocab_size": 50257, "eos_token_id": 50256,
                              "source": m["tokenizer"]["source"]}
    lengths = np.concatenate([load(prepared_v2, s)["length"].to_numpy() for s in prepare.SPLITS])
    assert m["max_length"] == m["token_stats"]["max"] == lengths.max()
    assert m["token_stats"]["mean"] == pytest.approx(lengths.mean(), abs=1e-3)
    assert m["token_stats"]["p50"] == int(np.percentile(lengths, 50, method="inverted_cdf"))
    # 27 labels x 150 rows: all 12 DDoS classes, 4 DoS, 3 Mirai, 5 Recon, 2 Spoofing, no Web/BruteForce
    totals = {n: sum(m["splits"][s]["class_counts"][n] for s in prepare.SPLITS) for n in schema.LABELS_8}
    assert totals == {"Benign": 150, "DDoS": 1800, "DoS": 600, "Mirai": 450, "Recon": 750, "Spoofing": 300,
                      "Web": 0, "BruteForce": 0}
    check_accounting(m, prepared_v2)


def test_columns_types_and_round_trip(prepared_v2, sample_v2):
    ds = datasets.load_from_disk(str(prepared_v2 / "train"))
    assert {k: str(v) for k, v in ds.features.items()} == {
        "input_ids": "List(Value('int32'))", "label": "Value('int32')", "length": "Value('int32')",
        "row_id": "Value('int64')", "features": "List(Value('float32'))"}
    df = ds.to_pandas()
    source = pd.read_csv(sample_v2)
    values = source[list(schema.V2_FEATURES)].to_numpy(np.float64)[df["row_id"].to_numpy()]
    np.testing.assert_array_equal(np.stack(df["features"].to_numpy()), values.astype(np.float32))
    texts = render("compact", values, schema.V2_FEATURES).to_pylist()
    tok = load_tokenizer()
    for ids, text, length in zip(df["input_ids"], texts, df["length"]):
        assert tok.decode(ids) == text and len(ids) == length
    assert tok.eos_token_id not in np.concatenate(df["input_ids"].to_numpy())  # no special tokens appended
    groups = [schema.CLASS_TO_GROUP[schema.map_label(r, "34")] for r in source["Label"].to_numpy()[df["row_id"]]]
    assert [schema.LABELS_8[i] for i in df["label"]] == groups


def test_row_split_is_stratified_and_deterministic(tmp_path, sample_v2):
    """--dedup none: rows are split one by one (the group split: tests/test_dedup.py)."""
    a = prep(tmp_path / "a", sample_v2, args=("--seed", "1", "--dedup", "none"))
    prep(tmp_path / "b", sample_v2, args=("--seed", "1", "--dedup", "none"))
    c = prep(tmp_path / "c", sample_v2, args=("--seed", "2", "--dedup", "none"))
    assert a["label_names"] == list(schema.LABELS_34)
    for name, n in a["splits"]["train"]["class_counts"].items():  # 150 rows per present class
        assert (n, a["splits"]["val"]["class_counts"][name], a["splits"]["test"]["class_counts"][name]) in {
            (120, 15, 15), (0, 0, 0)}, name
    for s in prepare.SPLITS:
        ids_a, ids_b, ids_c = (load(d, s)["row_id"].tolist() for d in (tmp_path / "a", tmp_path / "b", tmp_path / "c"))
        assert ids_a == ids_b and ids_a != ids_c and ids_a == sorted(ids_a)
        assert load(tmp_path / "a", s)["input_ids"].map(list).tolist() == load(tmp_path / "b", s)["input_ids"].map(list).tolist()
    assert a["splits"] == c["splits"]  # same stratified counts, different rows


def test_v1_with_extra_column_seed_template_and_small_classes(tmp_path, sample_v1, capsys):
    m = prep(tmp_path / "v1", sample_v1, args=("--classes", "8", "--template", "seed", "--small-classes", "drop"))
    err = capsys.readouterr().err
    assert "ignoring columns not used by the v1 format: final_label" in err
    assert m["format"] == "v1" and len(m["features"]) == 46 and m["inputs"][0]["ignored_columns"] == ["final_label"]
    assert m["dropped"] == {"class_too_small": 1}  # the single Recon-HostDiscovery row
    df = load(tmp_path / "v1", "train")
    tok = load_tokenizer()
    assert all(tok.decode(ids).startswith("Network flow with duration ") for ids in df["input_ids"])
    line = prepare_error(capsys, sample_v1, "--output", tmp_path / "v1b", "--classes", "8", "--small-classes", "error")
    assert "classes too small" in line and "Recon (1 row)" in line and "--small-classes drop" in line
    assert not (tmp_path / "v1b").exists()


@pytest.mark.parametrize("classes, small", [
    ("34", {"DDoS-ACK_Fragmentation": 1, "DDoS-UDP_Fragmentation": 1, "DDoS-ICMP_Fragmentation": 1,
            "Recon-HostDiscovery": 1}),
    ("8", {"Recon": 1}),
])
def test_bundled_v1_sample_prepares_with_the_defaults_dropping_classes_too_small(tmp_path, sample_v1, capsys,
                                                                                 classes, small):
    """The first thing a new user runs: 100 rows, classes with a single row. It succeeds, says what it
    dropped on stdout, and the manifest records it."""
    m = prep(tmp_path / "v1", sample_v1, args=("--classes", classes))
    out = capsys.readouterr().out
    warning = [line for line in out.splitlines() if line.startswith("warning: dropped")]
    assert len(warning) == 1, out
    assert all(f"{name} (1 row)" in warning[0] for name in small) and "--small-classes error" in warning[0]
    assert m["small_classes_dropped"] == small and m["dropped"] == {"class_too_small": sum(small.values())}
    kept = {n for s in prepare.SPLITS for n, c in m["splits"][s]["class_counts"].items() if c}
    assert not kept & set(small)


def test_no_small_class_no_warning(tmp_path, sample_v2, capsys):
    m = prep(tmp_path / "v2", sample_v2, args=("--classes", "2"))
    assert m["small_classes_dropped"] == {} and "warning: dropped" not in capsys.readouterr().out


def test_kv_template_and_raw_classes(tmp_path, sample_v1):
    m = prep(tmp_path / "kv", sample_v1, args=("--classes", "raw", "--template", "kv", "--small-classes", "drop"))
    assert m["label_names"] == sorted(m["label_names"]) and "BenignTraffic" in m["label_names"]
    assert m["dropped"]["class_too_small"] == 4  # four labels with a single row in this sample
    text = load_tokenizer().decode(load(tmp_path / "kv", "train")["input_ids"][0])
    assert all(f"{f}:" in text for f in schema.V1_FEATURES)


def test_max_per_class_caps_before_splitting(tmp_path, sample_v2):
    m = prep(tmp_path / "cap", sample_v2, args=("--classes", "8", "--max-per-class", "100"))
    for name in schema.LABELS_8:
        total = sum(m["splits"][s]["class_counts"][name] for s in prepare.SPLITS)
        assert total == (0 if name in ("Web", "BruteForce") else 100)
    assert m["dropped"] == {"over_max_per_class": 4050 - 600} and m["max_per_class"] == 100


def test_max_train_rows_cuts_only_the_training_split(tmp_path, sample_v2):
    """A learning-curve point: fewer training rows, stratified, the very same validation and test rows."""
    full = prep(tmp_path / "full", sample_v2, args=("--classes", "8"))
    cut = prep(tmp_path / "cut", sample_v2, args=("--classes", "8", "--max-train-rows", "500"))
    n_train = full["splits"]["train"]["rows"]
    assert cut["splits"]["train"]["rows"] == pytest.approx(500, abs=len(schema.LABELS_8))
    assert cut["dropped"] == {"over_max_train_rows": n_train - cut["splits"]["train"]["rows"]}
    for name, n in full["splits"]["train"]["class_counts"].items():
        kept = cut["splits"]["train"]["class_counts"][name]
        assert (kept >= 1) == (n >= 1) and kept == pytest.approx(n * 500 / n_train, abs=1)
    for split in ("val", "test"):
        rows = [datasets.load_from_disk(str(d / split))["row_id"] for d in (tmp_path / "full", tmp_path / "cut")]
        assert rows[0] == rows[1], split
    train = [set(datasets.load_from_disk(str(d / "train"))["row_id"]) for d in (tmp_path / "full", tmp_path / "cut")]
    assert train[1] < train[0]


def test_text_format_of_the_original_script(tmp_path, sample_v2, capsys):
    src = pd.read_csv(sample_v2).iloc[::10]
    texts = render("seed", src[list(schema.V2_FEATURES)].to_numpy(np.float64), schema.V2_FEATURES).to_pylist()
    groups = [schema.CLASS_TO_GROUP[schema.map_label(x, "34")].lower() for x in src["Label"]]
    csv = tmp_path / "text.csv"
    pd.DataFrame({"text": texts, "label": groups}).to_csv(csv, index=False)
    m = prep(tmp_path / "t", csv, args=("--classes", "8"))
    # its text passes through unrendered: the template is reported as what it is, not the default "compact"
    assert m["format"] == "text" and m["features"] == [] and m["template"] == "text"
    assert "template text:" in capsys.readouterr().out
    df = load(tmp_path / "t", "val")
    assert load_tokenizer().decode(df["input_ids"][0]) == texts[df["row_id"][0]]
    assert df["features"].map(len).max() == 0
    line = prepare_error(capsys, csv, "--output", tmp_path / "t34")
    assert "unknown labels" in line and "'ddos'" in line


def test_crlf_and_lf_give_identical_output(tmp_path, sample_v2):
    assert b"\r\n" in sample_v2.read_bytes()[:2000]
    lf = tmp_path / "lf.csv"
    lf.write_bytes(sample_v2.read_bytes().replace(b"\r\n", b"\n"))
    a = prep(tmp_path / "crlf", sample_v2, args=("--classes", "raw"))
    b = prep(tmp_path / "lf", lf, args=("--classes", "raw"))
    assert "Benign_Final" in a["label_names"] and not any("\r" in n for n in a["label_names"])
    assert a["splits"] == b["splits"]
    assert load(tmp_path / "crlf", "test")["input_ids"].map(list).tolist() == \
        load(tmp_path / "lf", "test")["input_ids"].map(list).tolist()


def test_bad_cells_are_dropped_and_counted(tmp_path, sample_v2):
    lines = sample_v2.read_text().splitlines()
    header, rows = lines[0], lines[1:]
    cols = header.split(",")
    def edit(i, col, value):
        cells = rows[i].split(",")
        cells[cols.index(col)] = value
        rows[i] = ",".join(cells)
    edit(0, "Rate", "fast"); edit(1, "IAT", "0x12"); edit(2, "Std", ""); edit(3, "Rate", "NaN")
    edit(4, "Variance", "inf"); edit(5, "Max", "-inf"); edit(6, "Label", ""); edit(7, "Label", "Totally-New")
    part2 = rows[2000:]
    text = "\n".join([header] + rows[:2000] + [header] + part2) + "\n"  # a concatenated CSV: header repeated
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    m = prep(tmp_path / "out", bad, args=("--classes", "8", "--unknown-labels", "drop"))
    assert m["dropped"] == {"non_numeric": 2, "nan": 2, "inf": 2, "missing_label": 1, "unknown_label": 1,
                            "repeated_header": 1}
    assert m["inputs"][0]["rows"] == 4051


def test_every_row_accounted_with_parallel_workers(tmp_path, sample_v2, monkeypatch):
    monkeypatch.setattr(prepare, "SMALL_INPUT_BYTES", 0)  # force the process pool on the small sample
    a = prep(tmp_path / "pool", sample_v2, args=("--workers", "2", "--chunk-rows", "700"))
    b = prep(tmp_path / "one", sample_v2, args=("--workers", "1"))
    assert a["splits"] == b["splits"]
    for s in prepare.SPLITS:
        assert load(tmp_path / "pool", s)["input_ids"].map(list).tolist() == \
            load(tmp_path / "one", s)["input_ids"].map(list).tolist()


def test_multiple_inputs_directory_and_glob(tmp_path, sample_v2):
    d = tmp_path / "in"
    d.mkdir()
    lines = sample_v2.read_bytes().split(b"\r\n")
    (d / "a.csv").write_bytes(b"\r\n".join(lines[:2001]) + b"\r\n")
    (d / "b.csv").write_bytes(b"\r\n".join([lines[0]] + lines[2001:]))
    m1 = prep(tmp_path / "dir", d)
    m2 = prep(tmp_path / "glob", str(d / "*.csv"))
    assert [i["rows"] for i in m1["inputs"]] == [2000, 2050] and m1["splits"] == m2["splits"]
    ids = np.sort(np.concatenate([load(tmp_path / "dir", s)["row_id"] for s in prepare.SPLITS]))
    np.testing.assert_array_equal(ids, np.arange(4050))


def test_encode_csvs_matches_prepared_rows(prepared_v2, sample_v2, tmp_path):
    manifest = json.loads((prepared_v2 / "manifest.json").read_text())
    chunks = list(encode.encode_csvs([sample_v2], manifest, load_tokenizer(), chunk_rows=1000))
    assert sum(c.rows_read for c in chunks) == 4050 and all(len(c.dropped_row_ids) == 0 for c in chunks)
    by_row = {int(r): (ids, int(lab)) for c in chunks for r, ids, lab in
              zip(c.row_ids, c.input_ids.to_pylist(), c.labels)}
    test = load(prepared_v2, "test")
    for r, ids, lab in zip(test["row_id"], test["input_ids"], test["label"]):
        assert by_row[r] == (list(ids), lab)
    unlabeled = tmp_path / "nolabel.csv"
    pd.read_csv(sample_v2).drop(columns=["Label"]).head(50).to_csv(unlabeled, index=False)
    (chunk,) = encode.encode_csvs([unlabeled], manifest, load_tokenizer(), require_label=False, with_text=True)
    assert (chunk.labels == -1).all() and len(chunk.texts) == 50 and chunk.features.shape == (50, 39)
    with pytest.raises(DataError, match="label column 'Label' not in header"):
        list(encode.encode_csvs([unlabeled], manifest, load_tokenizer()))


def test_check_format_against_the_model_manifest(prepared_v2, sample_v1, sample_v2, tmp_path):
    v2 = json.loads((prepared_v2 / "manifest.json").read_text())
    assert encode.check_format(sample_v2, v2, require_label=True) is True
    unlabeled = tmp_path / "nolabel.csv"
    pd.read_csv(sample_v2).drop(columns=["Label"]).head(5).to_csv(unlabeled, index=False)
    assert encode.check_format(unlabeled, v2, require_label=False) is False
    with pytest.raises(DataError) as err:
        encode.check_format(sample_v1, v2, require_label=False)
    assert str(err.value).startswith(f"{sample_v1}: a v1 CSV, but the model was trained on v2 rows (39 features)")
    v1 = {"format": "v1", "features": list(schema.FEATURES_BY_FORMAT["v1"]), "label_column": "label"}
    assert encode.check_format(sample_v1, v1, require_label=True) is True
    with pytest.raises(DataError, match="a v2 CSV, but the model was trained on v1 rows") as err:
        encode.check_format(sample_v2, v1, require_label=False)
    assert str(err.value).startswith(f"{sample_v2}: ")
    with pytest.raises(DataError) as err:  # the v1 label column `label` is checked first: absent from v2
        encode.check_format(sample_v2, v1, require_label=True)
    assert str(err.value).startswith(f"{sample_v2}: ")


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_empty_and_header_only_files(tmp_path, sample_v2, capsys):
    assert "no such file" in prepare_error(capsys, tmp_path / "nope.csv", "--output", tmp_path / "o")
    (tmp_path / "empty.csv").write_text("")
    assert "empty.csv: file is empty" in prepare_error(capsys, tmp_path / "empty.csv", "--output", tmp_path / "o")
    (tmp_path / "header.csv").write_text(sample_v2.read_text().splitlines()[0] + "\n")
    assert "header only, no data rows" in prepare_error(capsys, tmp_path / "header.csv", "--output", tmp_path / "o")
    assert "no file matches" in prepare_error(capsys, str(tmp_path / "*.parquet"), "--output", tmp_path / "o")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))


def test_wrong_or_missing_columns(tmp_path, sample_v2, capsys):
    df = pd.read_csv(sample_v2)
    df.drop(columns=["IAT"]).to_csv(tmp_path / "no_iat.csv", index=False)
    line = prepare_error(capsys, tmp_path / "no_iat.csv", "--output", tmp_path / "o")
    assert "no_iat.csv" in line and "missing 1 columns: IAT" in line
    df.drop(columns=["Label"]).to_csv(tmp_path / "no_label.csv", index=False)
    assert "no label column" in prepare_error(capsys, tmp_path / "no_label.csv", "--output", tmp_path / "o")
    line = prepare_error(capsys, sample_v2, "--output", tmp_path / "o", "--label-column", "Class")
    assert "label column 'Class' not in header" in line
    pd.DataFrame({"a": [1], "b": [2]}).to_csv(tmp_path / "other.csv", index=False)
    assert "matches no known format" in prepare_error(capsys, tmp_path / "other.csv", "--output", tmp_path / "o")
    lines = sample_v2.read_text().splitlines()
    (tmp_path / "quote.csv").write_text("\n".join(lines[:3000] + ['"' + lines[3000]] + lines[3001:]) + "\n")
    line = prepare_error(capsys, tmp_path / "quote.csv", "--output", tmp_path / "o", "--chunk-rows", "1000")
    assert "quote.csv: malformed CSV" in line  # a quote never closed: the rest of the file is one cell


def test_rows_with_the_wrong_field_count_are_dropped_by_name(tmp_path, sample_v2):
    lines = sample_v2.read_text().splitlines()
    header, rows = lines[0], lines[1:]
    rows[0] = "1," + rows[0]  # an extra field in the first data row: every cell one column to the right
    rows[2999] += ",7"  # one extra field further down
    rows[1500] = rows[1500][:40]  # a line cut short
    rows[-1] = rows[-1][: len(rows[-1]) // 2]  # the file ends mid-row
    (tmp_path / "ragged.csv").write_text("\n".join([header, *rows]))  # no final newline
    m = prep(tmp_path / "out", tmp_path / "ragged.csv", args=("--chunk-rows", "1000"))
    assert m["dropped"] == {"wrong_field_count": 3, "truncated": 1} and m["inputs"][0]["rows"] == 4050


def test_mixed_formats_and_unknown_labels(tmp_path, sample_v1, sample_v2, capsys):
    line = prepare_error(capsys, sample_v2, sample_v1, "--output", tmp_path / "o")
    assert "format v1 differs from v2" in line
    df = pd.read_csv(sample_v2)
    df.loc[[5, 9], "Label"] = ["Zero-Day", "Quantum_Attack"]
    df.to_csv(tmp_path / "unk.csv", index=False)
    line = prepare_error(capsys, tmp_path / "unk.csv", "--output", tmp_path / "o")
    assert "'Zero-Day', 'Quantum_Attack'" in line and "--unknown-labels drop" in line
    m = prep(tmp_path / "dropped", tmp_path / "unk.csv", args=("--unknown-labels", "drop"))
    assert m["dropped"] == {"unknown_label": 2}


def test_existing_output_needs_overwrite(tmp_path, sample_v1, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert "already exists; pass --overwrite" in prepare_error(capsys, sample_v1, "--output", out)
    assert (out / "keep.txt").exists()
    m = prep(out, sample_v1, args=("--overwrite", "--classes", "2", "--split", "0.6,0.2,0.2"))
    assert not (out / "keep.txt").exists() and m["label_names"] == ["Benign", "Attack"]
    assert m["splits"]["train"]["rows"] == 60 and not list(tmp_path.glob(".out.*"))


def test_bad_flags(tmp_path, sample_v1, capsys):
    assert "--split" in prepare_error(capsys, sample_v1, "--output", tmp_path / "o", "--split", "0.5,0.5")
    assert "--max-per-class" in prepare_error(capsys, sample_v1, "--output", tmp_path / "o", "--max-per-class", "1")


def test_assign_splits_rules():
    labels = np.repeat(np.arange(3), [10, 3, 1000]).astype(np.int16)
    code = splits.assign_splits(labels, 3, (0.8, 0.1, 0.1), seed=0, max_per_class=None, small_classes=set())
    assert [np.bincount(code[labels == c], minlength=3).tolist() for c in range(3)] == [[8, 1, 1], [1, 1, 1],
                                                                                     [800, 100, 100]]
    capped = splits.assign_splits(labels, 3, (0.8, 0.1, 0.1), 0, max_per_class=20, small_classes={1})
    assert (capped[labels == 1] == -2).all() and (capped[labels == 2] >= 0).sum() == 20
    with pytest.raises(CicError):
        prepare.parse_split("0.8,0.3,0.1")
