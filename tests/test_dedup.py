"""`prepare --dedup group|drop|none` on the real bundled rows, checked against pandas (not against the hash):
no feature vector in two splits, the manifest's duplicate/conflict counts, the old split under `none`,
`drop`, the group split's stratification tolerance, `feature_hashes`, `train_hashes.npy`."""
import contextlib
import io
import json
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from conftest import run_cli

from cic_gpt2 import encode, schema, splits
from cic_gpt2.errors import DataError
from cic_gpt2.metrics import row_ids_digest
from cic_gpt2.prepared import Prepared
from cic_gpt2.templates import render

SPLITS = ("train", "val", "test")
FEATURES = list(schema.V2_FEATURES)


def prep(out: Path, *inputs, args=()) -> tuple[dict, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert run_cli("prepare", *inputs, "--output", out, *args) == 0
    return json.loads((out / "manifest.json").read_text()), stdout.getvalue()


def row_ids(out: Path, split: str) -> np.ndarray:
    return np.array(datasets.load_from_disk(str(out / split))["row_id"], dtype=np.int64)


def source(sample_v2: Path, classes: str = "34") -> pd.DataFrame:
    """The CSV as pandas reads it: float32 features (what `features` stores), the mapped label, a vector id."""
    df = pd.read_csv(sample_v2)
    out = df[FEATURES].astype(np.float32)
    out["label"] = [schema.map_label(x, classes) for x in df["Label"]]
    out["vector"] = out.groupby(FEATURES, sort=False).ngroup()
    return out


@pytest.fixture(scope="module")
def default_v2(tmp_path_factory, sample_v2):
    out = tmp_path_factory.mktemp("dedup") / "default"
    manifest, stdout = prep(out, sample_v2)
    return out, manifest, stdout


def split_of_rows(out: Path) -> pd.Series:
    return pd.concat([pd.Series(s, index=row_ids(out, s)) for s in SPLITS]).sort_index()


# ------------------------------------------------------------------------------------------------ group
def test_default_split_shares_no_feature_vector(default_v2, sample_v2):
    out, m, stdout = default_v2
    assert m["dedup"]["mode"] == "group" and m["dedup"]["hash"] == encode.FEATURE_HASH
    # 1. the stored `features` column: no vector is in two splits
    vectors = {s: set(map(tuple, datasets.load_from_disk(str(out / s))["features"])) for s in SPLITS}
    assert vectors["train"] and vectors["val"] and vectors["test"]
    assert not (vectors["train"] & vectors["val"] or vectors["train"] & vectors["test"] or vectors["val"] & vectors["test"])
    # 2. the raw CSV columns (pandas groupby): every vector's rows lie in one split, every row is written
    src = source(sample_v2)
    split = split_of_rows(out)
    assert len(split) == len(src) == 4050
    assert (src.assign(split=split.to_numpy()).groupby("vector")["split"].nunique() == 1).all()
    assert m["dedup"]["overlap"] == {"val": {"rows_in_train": 0, "fraction": 0.0},
                                     "test": {"rows_in_train": 0, "fraction": 0.0}}
    assert "overlap with train: test 0 rows" in stdout


def test_manifest_duplicate_and_conflict_counts_match_pandas(default_v2, sample_v2):
    out, m, _ = default_v2
    d = m["dedup"]
    src = source(sample_v2)
    size = src.groupby("vector")["label"].transform("size")
    n_labels = src.groupby("vector")["label"].nunique()
    assert d["rows"] == 4050 and d["distinct_vectors"] == src["vector"].nunique() == 1779
    assert d["duplicate_rows"] == int((size > 1).sum()) == 2372
    assert d["duplicate_groups"] == int((src["vector"].value_counts() > 1).sum()) == 101
    assert d["conflicting_groups"] == int((n_labels > 1).sum()) == 35
    assert d["conflicting_rows"] == int(src["vector"].isin(n_labels.index[n_labels > 1]).sum()) == 1112
    counts = pd.crosstab(src["vector"], src["label"])
    assert d["accuracy_ceiling"]["all"] == pytest.approx(counts.max(axis=1).sum() / len(src), abs=1e-6)
    split = split_of_rows(out).to_numpy()
    test = src[split == "test"]
    assert d["accuracy_ceiling"]["test"] == pytest.approx(
        pd.crosstab(test["vector"], test["label"]).max(axis=1).sum() / len(test), abs=1e-6)
    pairs = {}
    for _, labels in src.groupby("vector")["label"]:
        names = sorted(set(labels), key=schema.LABELS_34.index)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                g, r = pairs.get((a, b), (0, 0))
                pairs[(a, b)] = (g + 1, r + int(labels.isin([a, b]).sum()))
    want = sorted(pairs.items(), key=lambda kv: (-kv[1][0], -kv[1][1], schema.LABELS_34.index(kv[0][0]),
                                                 schema.LABELS_34.index(kv[0][1])))[:5]
    assert d["top_conflicting_pairs"] == [{"labels": list(k), "groups": g, "rows": r} for k, (g, r) in want]


def test_group_split_is_stratified_within_the_stated_tolerance(default_v2, sample_v2, tmp_path):
    """Per stratum (a vector's majority label, ties: lowest label id), each split's rows are within twice the
    stratum's largest group of the row split's sizes; strata with >= 3 vectors reach every split."""
    out, m, _ = default_v2
    src = source(sample_v2).assign(split=split_of_rows(out).to_numpy())
    src["label_id"] = src["label"].map(schema.LABELS_34.index)
    counts = pd.crosstab(src["vector"], src["label_id"])
    stratum = counts.idxmax(axis=1)  # idxmax: the first (lowest) label id among ties
    src["stratum"] = src["vector"].map(stratum)
    for c, rows in src.groupby("stratum"):
        sizes = rows["vector"].value_counts()
        n = len(rows)
        target = dict(zip(SPLITS, splits._split_counts(n, (0.8, 0.1, 0.1))))
        got = rows["split"].value_counts().reindex(list(SPLITS), fill_value=0)
        bound = 1 if sizes.max() == 1 else 2 * sizes.max()
        for s in SPLITS:
            assert abs(got[s] - target[s]) <= bound, (schema.LABELS_34[c], s, got.to_dict(), target)
        if len(sizes) >= 3:
            assert (got > 0).all(), (schema.LABELS_34[c], got.to_dict())
    # the manifest's measured class-share deviation is what the class counts say
    dev = max(abs(m["splits"][s]["class_counts"][name] / sum(m["splits"][t]["class_counts"][name] for t in SPLITS) - r)
              for name in m["label_names"] if sum(m["splits"][t]["class_counts"][name] for t in SPLITS)
              for s, r in zip(SPLITS, (0.8, 0.1, 0.1)))
    assert m["dedup"]["stratification"]["max_share_deviation"] == pytest.approx(dev, abs=1e-6)
    # deterministic in --seed
    a, _ = prep(tmp_path / "a", sample_v2, args=("--seed", "0"))
    b, _ = prep(tmp_path / "b", sample_v2, args=("--seed", "5"))
    assert all(row_ids_digest(row_ids(tmp_path / "a", s)) == row_ids_digest(row_ids(out, s)) for s in SPLITS)
    assert any(row_ids_digest(row_ids(tmp_path / "b", s)) != row_ids_digest(row_ids(out, s)) for s in SPLITS)


def test_group_with_max_per_class_caps_rows_first(tmp_path, sample_v2):
    m, _ = prep(tmp_path / "cap", sample_v2, args=("--classes", "8", "--max-per-class", "100"))
    none, _ = prep(tmp_path / "cap_none", sample_v2, args=("--classes", "8", "--max-per-class", "100", "--dedup", "none"))
    for name in schema.LABELS_8:
        assert sum(m["splits"][s]["class_counts"][name] for s in SPLITS) == (0 if name in ("Web", "BruteForce") else 100)
    assert m["dropped"] == none["dropped"] == {"over_max_per_class": 3450}
    kept = lambda out: np.sort(np.concatenate([row_ids(out, s) for s in SPLITS]))  # noqa: E731
    np.testing.assert_array_equal(kept(tmp_path / "cap"), kept(tmp_path / "cap_none"))  # the same rows are kept
    src = source(sample_v2, "8")
    split = split_of_rows(tmp_path / "cap")
    written = src.loc[split.index].assign(split=split.to_numpy())
    assert (written.groupby("vector")["split"].nunique() == 1).all()


def test_text_input_groups_equal_texts(tmp_path, sample_v2):
    src = pd.read_csv(sample_v2)
    texts = render("seed", src[FEATURES].to_numpy(np.float64), schema.V2_FEATURES).to_pylist()
    groups = [schema.CLASS_TO_GROUP[schema.map_label(x, "34")].lower() for x in src["Label"]]
    csv = tmp_path / "text.csv"
    pd.DataFrame({"text": texts, "label": groups}).to_csv(csv, index=False)
    m, _ = prep(tmp_path / "t", csv, args=("--classes", "8"))
    assert m["dedup"]["hash"] == encode.TEXT_HASH
    split = split_of_rows(tmp_path / "t")
    by_text = pd.DataFrame({"text": np.array(texts)[split.index], "split": split.to_numpy()})
    assert (by_text.groupby("text")["split"].nunique() == 1).all()
    assert m["dedup"]["distinct_vectors"] == len(set(texts))


# ------------------------------------------------------------------------------------------------ none, drop
# row_ids_digest of each split, computed with the code before --dedup existed (commit 68fc747)
OLD_SPLITS = {
    (): ("c1405394ec1fda832df9020e0483b0df3cc456a9624b8e606151f25ea7dd8def",
         "a1cff93a6cd4c64300c006bdc183a4ece4a05abe8f99f852a8964aa0968b27cc",
         "5c160a7b319c3d5a4b1a9218772f88bd1d0ffdc110736baa5013765903d164e1"),
    ("--classes", "8", "--max-per-class", "100"): (
        "89f659ecbfbea977ff614c3b141999316c15e769b1a1625cf3767f2538144764",
        "2aaec7c9a79efcf7b6b85599e6718a1bab2f86617d4cf676206188561960b828",
        "8dbca137fc0c5313d95c40767dbbbf79110acd2b2b40c5a038d68c9e7c1cd7cd"),
}


@pytest.mark.parametrize("args", list(OLD_SPLITS), ids=["default", "classes8-cap100"])
def test_none_reproduces_the_old_split_and_says_it_may_leak(tmp_path, sample_v2, args):
    m, stdout = prep(tmp_path / "none", sample_v2, args=(*args, "--dedup", "none"))
    assert tuple(row_ids_digest(row_ids(tmp_path / "none", s)) for s in SPLITS) == OLD_SPLITS[args]
    assert "splits may share feature vectors" in stdout
    # the measured overlap is what pandas finds
    src = source(sample_v2, "8" if args else "34")
    split = split_of_rows(tmp_path / "none")
    written = src.loc[split.index].assign(split=split.to_numpy())
    in_train = set(written.loc[written["split"] == "train", "vector"])
    for s in ("val", "test"):
        rows = written[written["split"] == s]
        assert m["dedup"]["overlap"][s]["rows_in_train"] == int(rows["vector"].isin(in_train).sum()) > 0


def test_drop_keeps_the_first_row_per_vector_and_label(tmp_path, sample_v2):
    m, stdout = prep(tmp_path / "drop", sample_v2, args=("--dedup", "drop"))
    src = source(sample_v2)
    first = ~src.duplicated(subset=FEATURES + ["label"], keep="first")
    split = split_of_rows(tmp_path / "drop")
    np.testing.assert_array_equal(split.index.to_numpy(), np.flatnonzero(first.to_numpy()))
    assert m["dropped"] == {"duplicate": int((~first).sum())} == {"duplicate": 2226}
    assert m["dedup"]["dropped_duplicates"] == 2226
    # then split as today: the row split of the kept rows
    labels = src.loc[first, "label"].map(schema.LABELS_34.index).to_numpy()
    want = splits.assign_splits(labels, len(schema.LABELS_34), (0.8, 0.1, 0.1), 0, None, set())
    np.testing.assert_array_equal(pd.Series(split.to_numpy()).map(SPLITS.index).to_numpy(), want)
    # conflicting labels can still put one vector in two splits: measured and said
    written = src.loc[split.index].assign(split=split.to_numpy())
    in_train = set(written.loc[written["split"] == "train", "vector"])
    test = written[written["split"] == "test"]
    assert m["dedup"]["overlap"]["test"]["rows_in_train"] == int(test["vector"].isin(in_train).sum())
    assert ("conflicting labels can still be in two splits" in stdout) == (m["dedup"]["overlap"]["test"]["rows_in_train"]
                                                                          + m["dedup"]["overlap"]["val"]["rows_in_train"] > 0)


# ------------------------------------------------------------------------------------------------ hashes
def test_feature_hashes(sample_v2):
    src = source(sample_v2)
    x = src[FEATURES].to_numpy(np.float32)
    h = encode.feature_hashes(x)
    assert h.dtype == np.uint64 and h.shape == (4050,)
    np.testing.assert_array_equal(h, encode.feature_hashes(x.copy()))
    np.testing.assert_array_equal(h, np.concatenate([encode.feature_hashes(x[i:i + 333]) for i in range(0, 4050, 333)]))
    np.testing.assert_array_equal(h, encode.feature_hashes(np.asfortranarray(x)))
    np.testing.assert_array_equal(h, encode.feature_hashes(x.astype(np.float64)))  # hashed as float32
    # equal vectors <=> equal hashes, on every real row (pandas' grouping is the reference)
    assert pd.Series(h).groupby(src["vector"].to_numpy()).nunique().max() == 1
    assert len(np.unique(h)) == src["vector"].nunique()
    # -0.0 and 0.0 are the same value
    zero, neg = x[:4].copy(), x[:4].copy()
    zero[:, 3], neg[:, 3] = 0.0, -0.0
    assert np.signbit(neg[:, 3]).all()
    np.testing.assert_array_equal(encode.feature_hashes(zero), encode.feature_hashes(neg))
    # one ulp, or two values swapped, changes the hash; an odd feature count works
    bumped = x[:1].copy()
    bumped[0, 0] = np.nextafter(bumped[0, 0], np.float32(np.inf))
    swapped = x[:1, [1, 0] + list(range(2, 39))]
    assert len({int(encode.feature_hashes(v)[0]) for v in (x[:1], bumped, swapped)}) == (3 if x[0, 0] != x[0, 1] else 2)
    assert encode.feature_hashes(x[:, :5]).shape == (4050,)
    assert encode.feature_hashes(np.zeros((0, 39), np.float32)).shape == (0,)


def test_encoded_chunks_carry_the_hash(default_v2, sample_v2):
    out, m, _ = default_v2
    from cic_gpt2.tokenizer import load_tokenizer

    chunks = list(encode.encode_csvs([sample_v2], m, load_tokenizer(), chunk_rows=1000))
    for c in chunks:
        np.testing.assert_array_equal(c.hashes, encode.feature_hashes(c.features))


def test_train_hashes_file(default_v2):
    out, m, _ = default_v2
    prepared = Prepared.load(out)
    hashes = prepared.train_hashes()
    train = np.array(datasets.load_from_disk(str(out / "train"))["features"], dtype=np.float32)
    np.testing.assert_array_equal(hashes, np.unique(encode.feature_hashes(train)))
    assert hashes.dtype == np.uint64 and (hashes[1:] > hashes[:-1]).all()
    for s in ("val", "test"):  # group split: no val/test row is "seen in training"
        feats = np.array(datasets.load_from_disk(str(out / s))["features"], dtype=np.float32)
        assert not np.isin(encode.feature_hashes(feats), hashes).any()


def test_train_hashes_missing_is_a_clear_error(default_v2, tmp_path):
    import shutil

    out, _, _ = default_v2
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "train_hashes.npy").unlink()
    with pytest.raises(DataError, match="older version.*prepare it again"):
        Prepared.load(old).train_hashes()


# ------------------------------------------------------------------------------------------------ units
def test_group_rows_and_group_split_rules():
    hashes = np.array([5, 5, 5, 7, 9, 9, 1], dtype=np.uint64)
    labels = np.array([2, 1, 1, 0, 3, 0, 2], dtype=np.int16)
    g = splits.group_rows(hashes, labels, want_repeats=True)
    assert g.inverse.tolist() == [1, 1, 1, 2, 3, 3, 0] and g.sizes.tolist() == [1, 3, 1, 2]
    assert g.majority.tolist() == [2, 1, 0, 0] and g.majority_count.tolist() == [1, 2, 1, 1]  # 9: tie -> label 0
    assert g.conflicts.tolist() == [[1, 1, 2], [1, 2, 1], [3, 0, 1], [3, 3, 1]]
    assert g.repeats.tolist() == [False, False, True, False, False, False, False]
    # a stratum with fewer groups than splits fills train, then val; one with >= 3 reaches every split
    hashes = np.array([1, 1, 2, 3, 4, 5, 6, 7], dtype=np.uint64)
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1], dtype=np.int16)
    code = splits.assign_group_splits(splits.group_rows(hashes, labels), 2, (0.8, 0.1, 0.1), np.random.default_rng(0))
    assert sorted(code[:2].tolist()) == [0, 1] and set(code[2:].tolist()) == {0, 1, 2}
    with pytest.raises(DataError, match="--dedup"):
        splits.split_rows(labels, hashes, ["a", "b"], (0.8, 0.1, 0.1), 0, None, "error", "maybe")
