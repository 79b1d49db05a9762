"""Metrics on inputs whose answers are computed by hand (see the comments), plus the edge cases that
change published figures: absent classes, predicted-but-never-true classes, undefined ROC-AUC."""
import json

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from cic_gpt2.errors import DataError
from cic_gpt2.metrics import classification_metrics, compare_markdown, metrics_markdown

# 3 classes, 6 rows.
#   class a: TP 2, FP 0, FN 1 -> P 1,   R 2/3, F1 0.8
#   class b: TP 1, FP 1, FN 1 -> P 1/2, R 1/2, F1 0.5
#   class c: TP 1, FP 1, FN 0 -> P 1/2, R 1,   F1 2/3
Y_TRUE = [0, 0, 0, 1, 1, 2]
Y_PRED = [0, 0, 1, 1, 2, 2]
NAMES = ["a", "b", "c"]


def test_hand_computed_three_class_example():
    m = classification_metrics(Y_TRUE, Y_PRED, NAMES)
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["macro_precision"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert m["macro_recall"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)  # 0.65556
    assert m["weighted_f1"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)  # 0.67778
    assert m["weighted_recall"] == pytest.approx(m["accuracy"])  # always true for weighted recall
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": pytest.approx(2 / 3), "f1": pytest.approx(0.8), "support": 3}
    assert m["per_class"]["c"]["recall"] == 1.0 and m["per_class"]["c"]["support"] == 1
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]  # rows = true
    assert m["roc_auc_ovr_macro"] is None  # no probabilities given
    assert m["macro_f1"] == pytest.approx(f1_score(Y_TRUE, Y_PRED, average="macro"))


def test_output_is_plain_json():
    probs = np.eye(3)[Y_PRED] * 0.8 + 0.2 / 3
    m = classification_metrics(np.array(Y_TRUE, dtype=np.int32), np.array(Y_PRED), NAMES, probs=probs)
    text = json.dumps(m)  # raises on numpy scalars
    assert json.loads(text) == m
    assert all(type(v) is float for k, v in m.items() if k.startswith(("macro_p", "macro_r", "macro_f", "weighted", "acc")))
    assert all(type(v) is int for row in m["confusion_matrix"] for v in row)


def test_absent_class_listed_with_zero_support_and_excluded_from_macro():
    names = NAMES + ["never_seen"]
    m = classification_metrics(Y_TRUE, Y_PRED, names)
    assert m["per_class"]["never_seen"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert list(m["per_class"]) == names
    assert len(m["confusion_matrix"]) == 4 and m["confusion_matrix"][3] == [0, 0, 0, 0]
    # A class neither true nor predicted does not drag the macro average: same figures as with 3 names.
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["macro_classes"] == 3


def test_predicted_but_never_true_class_counts_in_macro():
    # a: TP 1, FN 1 -> P 1, R 1/2, F1 2/3; b: perfect -> F1 1; c: predicted once, never true -> F1 0.
    m = classification_metrics([0, 0, 1, 1], [0, 2, 1, 1], NAMES)
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m["macro_classes"] == 3


def test_roc_auc_hand_computed_binary():
    # Positive scores 0.35, 0.8 vs negatives 0.1, 0.4: 3 of 4 pairs ordered correctly -> AUC 0.75,
    # and the same for class 0 scored by its own column; macro 0.75.
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    probs = np.stack([1 - p1, p1], axis=1)
    m = classification_metrics([0, 0, 1, 1], (p1 > 0.5).astype(int), ["benign", "attack"], probs=probs)
    assert m["roc_auc_ovr_macro"] == pytest.approx(0.75)


def test_roc_auc_matches_sklearn_when_all_classes_present():
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2] * 10)
    logits = rng.normal(size=(30, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    m = classification_metrics(y, probs.argmax(1), NAMES, probs=probs)
    assert m["roc_auc_ovr_macro"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def test_roc_auc_only_over_present_classes():
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    probs = np.stack([(1 - p1) * 0.9, p1 * 0.9, np.full(4, 0.1)], axis=1)  # class c never true
    m = classification_metrics([0, 0, 1, 1], [0, 0, 1, 1], NAMES, probs=probs)
    assert m["roc_auc_ovr_macro"] == pytest.approx(0.75)


def test_roc_auc_none_when_one_class_in_y_true():
    probs = np.full((3, 3), 1 / 3)
    m = classification_metrics([1, 1, 1], [1, 0, 1], NAMES, probs=probs)
    assert m["roc_auc_ovr_macro"] is None
    assert m["accuracy"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "y_true, y_pred, probs, match",
    [
        ([0, 1], [0, 3], None, r"y_pred\[1\]=3"),
        ([0, -1], [0, 1], None, r"y_true\[1\]=-1 .*unlabeled"),
        ([0, 1, 2], [0, 1], None, "3 rows but y_pred has 2"),
        ([0, 1], [0, 1], np.ones((2, 2)), r"probs has shape \(2, 2\), expected \(2, 3\)"),
        ([], [], None, "no rows"),
        (["a", "b"], [0, 1], None, "y_true must hold integer class ids"),
        ([0.0, 1.5], [0, 1], None, "y_true must hold integer class ids"),
    ],
)
def test_bad_input_names_the_problem(y_true, y_pred, probs, match):
    with pytest.raises(DataError, match=match):
        classification_metrics(y_true, y_pred, NAMES, probs=probs)


def test_markdown_tables():
    m = classification_metrics(Y_TRUE, Y_PRED, NAMES + ["x|y"])
    md = metrics_markdown(m, "Test split")
    assert md.startswith("### Test split\n")
    assert "| macro_f1 | 0.6556 |" in md
    assert "| roc_auc_ovr_macro | n/a |" in md
    assert "| a | 1.0000 | 0.6667 | 0.8000 | 3 |" in md
    assert "| x\\|y | 0.0000 | 0.0000 | 0.0000 | 0 |" in md  # pipe escaped, table stays well-formed

    other = classification_metrics(Y_TRUE, Y_TRUE, NAMES)
    table = compare_markdown({"gpt2-tiny": m, "RandomForest": other})
    lines = table.strip().splitlines()
    assert lines[0].startswith("| model | accuracy | macro-F1 | weighted-F1 |")
    assert lines[2].startswith("| gpt2-tiny | 0.6667 | 0.6556 | 0.6778 |")
    assert lines[3].startswith("| RandomForest | 1.0000 | 1.0000 | 1.0000 |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)
