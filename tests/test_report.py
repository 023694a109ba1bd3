"""Metrics against hand-computed values, the history file, and the PNG plots."""

from __future__ import annotations

import json

import numpy
import pytest

from cnn_backend.report import (
    HistoryWriter,
    classification_report,
    confusion_matrix,
    format_report,
    matplotlib_available,
    plot_confusion_matrix,
    plot_curves,
    plot_filters,
    read_history,
    write_json,
)

# Rows: true class, columns: predicted. Class 2 never occurs but is predicted once.
CONFUSION = numpy.array([[5, 2, 0], [1, 3, 1], [0, 0, 0]])
NAMES = ("a", "b", "c")


def test_confusion_matrix_counts_true_rows_predicted_columns():
    labels = [0, 0, 0, 1, 1, 2]
    predictions = [0, 1, 0, 1, 2, 0]
    expected = [[2, 1, 0], [0, 1, 1], [1, 0, 0]]
    numpy.testing.assert_array_equal(confusion_matrix(labels, predictions, 3), expected)


def test_confusion_matrix_rejects_out_of_range_classes():
    with pytest.raises(ValueError, match="class indices 0-2"):
        confusion_matrix([0, 3], [0, 1], 3)


def test_precision_recall_f1_match_hand_computation():
    report = classification_report(CONFUSION, NAMES)
    rows = {row["name"]: row for row in report["per_class"]}
    # precision = diagonal / column sum; recall = diagonal / row sum.
    assert rows["a"]["precision"] == pytest.approx(5 / 6)
    assert rows["a"]["recall"] == pytest.approx(5 / 7)
    assert rows["a"]["f1"] == pytest.approx(10 / 13)  # 2PR/(P+R) = (50/42)/(65/42)
    assert rows["b"]["precision"] == pytest.approx(3 / 5)
    assert rows["b"]["recall"] == pytest.approx(3 / 5)
    assert rows["b"]["f1"] == pytest.approx(3 / 5)
    # Predicted once, never true: precision 0; no support: recall 0 instead of NaN.
    assert (rows["c"]["precision"], rows["c"]["recall"], rows["c"]["f1"]) == (0.0, 0.0, 0.0)
    assert [row["support"] for row in report["per_class"]] == [7, 5, 0]
    assert [row["predicted"] for row in report["per_class"]] == [6, 5, 1]
    assert report["accuracy"] == pytest.approx(8 / 12)
    assert report["samples"] == 12
    assert report["macro_avg"]["precision"] == pytest.approx((5 / 6 + 3 / 5) / 3)
    assert report["weighted_avg"]["recall"] == pytest.approx((7 * 5 / 7 + 5 * 3 / 5) / 12)
    assert report["confusion_matrix"] == CONFUSION.tolist()


def test_the_macro_mean_leaves_out_a_class_neither_present_nor_predicted():
    # A test folder without class c: c's zeros would pull the macro mean down (scikit-learn leaves it out).
    confusion = numpy.array([[3, 1, 0], [2, 2, 0], [0, 0, 0]])
    report = classification_report(confusion, NAMES)
    assert report["macro_avg"]["recall"] == pytest.approx((3 / 4 + 2 / 4) / 2)
    assert report["macro_avg"]["precision"] == pytest.approx((3 / 5 + 2 / 3) / 2)
    assert classification_report(numpy.zeros((3, 3), dtype=int), NAMES)["macro_avg"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_report_is_json_ready_and_formats_as_a_table():
    report = classification_report(CONFUSION, NAMES)
    assert json.loads(json.dumps(report)) == report
    table = format_report(report)
    assert "precision" in table and "accuracy 0.6667 on 12 samples" in table
    assert all(name in table for name in NAMES)


def test_report_rejects_mismatched_class_names():
    with pytest.raises(ValueError, match="2 class names for a 3-class"):
        classification_report(CONFUSION, ("a", "b"))


def test_history_writer_starts_appends_and_reads_back(tmp_path):
    path = tmp_path / "history.jsonl"
    writer = HistoryWriter(path)
    writer.start([{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.5}])
    writer.append({"epoch": 3, "loss": 0.25})
    assert [row["epoch"] for row in read_history(path)] == [1, 2, 3]
    writer.start([{"epoch": 1, "loss": 1.0}])  # a resumed run starts again from its checkpoint's rows
    assert read_history(path) == [{"epoch": 1, "loss": 1.0}]


def test_write_json_leaves_no_temporary_file(tmp_path):
    write_json(tmp_path / "report.json", {"accuracy": 0.5})
    assert json.loads((tmp_path / "report.json").read_text()) == {"accuracy": 0.5}
    assert [path.name for path in tmp_path.iterdir()] == ["report.json"]


@pytest.mark.skipif(not matplotlib_available(), reason="matplotlib (the plot extra) is not installed")
def test_plots_are_png_files(tmp_path):
    history = [
        {"epoch": 1, "train_loss": 2.0, "train_accuracy": 0.3, "val_loss": 1.8, "val_accuracy": 0.4},
        {"epoch": 2, "train_loss": 1.0, "train_accuracy": 0.6, "val_loss": 1.1, "val_accuracy": 0.6},
    ]
    paths = [
        plot_curves(history, tmp_path / "curves.png"),
        plot_confusion_matrix(CONFUSION, NAMES, tmp_path / "confusion.png"),
        plot_filters(numpy.random.default_rng(0).standard_normal((4, 2, 3, 3)), tmp_path / "filters.png"),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["confusion.png", "curves.png", "filters.png"]
