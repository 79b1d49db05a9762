"""Plots are real, complete PNG files whose size follows the class count."""
import matplotlib.image as mpimg
import numpy as np
import pytest

from cic_gpt2.errors import DataError
from cic_gpt2.metrics import classification_metrics
from cic_gpt2.metrics import normalize_rows
from cic_gpt2.plots import plot_confusion_matrix, plot_loss_curve, plot_per_class_f1

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01  # something was drawn, not a blank canvas
    return image


def no_temp_files(directory):
    return [p.name for p in directory.iterdir() if ".tmp" in p.name] == []


def test_normalize_rows_keeps_empty_rows_zero():
    out = normalize_rows([[2, 2], [0, 0]])
    np.testing.assert_allclose(out, [[0.5, 0.5], [0.0, 0.0]])


@pytest.mark.parametrize("normalize", [True, False])
def test_confusion_matrix_png_scales_with_class_count(tmp_path, normalize):
    small = plot_confusion_matrix([[3, 1, 0], [0, 2, 1], [0, 0, 4]], ["a", "b", "c"], tmp_path / "cm3.png",
                                  normalize=normalize)
    names = [f"DDoS-class-{i}" for i in range(34)]
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 5, size=(34, 34)) + np.diag(rng.integers(20, 60, size=34))
    cm[5] = 0  # a class with no true rows must not produce NaNs
    big = plot_confusion_matrix(cm, names, tmp_path / "sub" / "cm34.png", normalize=normalize, title="34 classes")
    img_small, img_big = read_png(small), read_png(big)
    assert img_big.shape[0] > 1.5 * img_small.shape[0]  # readable: the figure grows with the classes
    assert no_temp_files(tmp_path) and no_temp_files(tmp_path / "sub")


def test_confusion_matrix_shape_mismatch_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"shape \(2, 2\) but there are 3 label names"):
        plot_confusion_matrix([[1, 0], [0, 1]], ["a", "b", "c"], tmp_path / "cm.png")
    assert not (tmp_path / "cm.png").exists()


def test_loss_curve_from_metrics_jsonl_records(tmp_path):
    records = [{"step": s, "train/loss": 3.0 / (1 + s), "train/lr": 1e-3} for s in range(1, 41)]
    records += [{"step": 20, "val/loss": 0.3, "val/macro_f1": 0.4}, {"step": 40, "val/loss": 0.2, "val/macro_f1": 0.6}]
    records.append({"event": "done"})  # no step: skipped, not an error
    one_panel = read_png(plot_loss_curve(records[:40], tmp_path / "loss_train_only.png"))
    two_panel = read_png(plot_loss_curve(records, tmp_path / "loss_curve.png"))
    assert two_panel.shape[1] > 1.5 * one_panel.shape[1]  # the validation-quality panel is there
    assert no_temp_files(tmp_path)


@pytest.mark.parametrize("train_steps", [[40], [10, 20, 30, 40], []])
def test_a_single_validation_point_sits_on_the_runs_step_axis(tmp_path, train_steps):
    """One validation at the last step (step 40) used to get an axis of 38.0-42.0 of its own."""
    import matplotlib.pyplot as plt

    from cic_gpt2.plots import loss_curve_figure

    records = [{"step": s, "train/loss": 2.0 - s / 100, "train/lr": 1e-3} for s in train_steps]
    records += [{"step": 40, "val/loss": 1.7, "val/macro_f1": 0.3, "val/accuracy": 0.5}, {"event": "done"}]
    fig = loss_curve_figure(records)
    try:
        for ax in fig.axes:  # both panels: loss and validation quality
            left, right = ax.get_xlim()
            assert left <= 0.0 and 40.0 < right <= 41.0, (left, right)
            assert all(left < x < right for line in ax.get_lines() for x in line.get_xdata())
        assert len(fig.axes) == 2
    finally:
        plt.close(fig)
    assert read_png(plot_loss_curve(records, tmp_path / "loss_curve.png")) is not None


def test_loss_curve_without_loss_records_still_says_so(tmp_path):
    image = read_png(plot_loss_curve([{"step": 1, "train/lr": 0.1}], tmp_path / "loss.png"))
    assert image is not None and (tmp_path / "loss.png").stat().st_size > 0


def test_per_class_f1_bar_chart(tmp_path):
    names = [f"class-{i}" for i in range(27)]
    y_true = np.arange(27).repeat(3)
    y_pred = y_true.copy()
    y_pred[::4] = 0
    m = classification_metrics(y_true, y_pred, names + ["absent"])
    image = read_png(plot_per_class_f1(m, tmp_path / "per_class_f1.png"))
    small = read_png(plot_per_class_f1(classification_metrics([0, 1], [0, 1], ["a", "b"]), tmp_path / "f1_2.png"))
    assert image.shape[0] > 2 * small.shape[0]
    assert no_temp_files(tmp_path)
