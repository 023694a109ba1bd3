"""What a run leaves behind for people: metrics (confusion matrix, per-class precision / recall /
F1), the metrics history file, and PNG plots.

Everything here works on host NumPy arrays. Files are replaced atomically (temporary file + rename)
or, for the history, appended one flushed line at a time, so an interrupted run never leaves a
half-written file. Plots need matplotlib (the optional ``plot`` extra); they are drawn on
matplotlib's Agg canvas, never through pyplot, so no display or global state is involved.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy

from .data import CLASS_NAMES
from .serialization import FileWriteError, atomic_path

# -- metrics ----------------------------------------------------------------------------------------


def confusion_matrix(labels, predictions, num_classes: int = len(CLASS_NAMES)) -> numpy.ndarray:
    """Counts ``C[true, predicted]`` as an int64 ``(num_classes, num_classes)`` array."""
    labels = numpy.asarray(labels, dtype=numpy.int64).ravel()
    predictions = numpy.asarray(predictions, dtype=numpy.int64).ravel()
    if labels.shape != predictions.shape:
        raise ValueError(f"{labels.size} labels but {predictions.size} predictions")
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must be class indices 0-{num_classes - 1}")
    flat = numpy.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def _mean(values) -> float:
    return float(values.mean()) if values.size else 0.0


def classification_report(confusion, class_names: Sequence[str] = CLASS_NAMES) -> dict:
    """Accuracy, per-class precision / recall / F1 / support, and their macro and weighted means
    (the macro mean over the classes present in the labels or the predictions).

    ``confusion`` has true classes in rows and predictions in columns. A class never predicted has
    precision 0 and a class never present has recall 0 (rather than NaN), so means stay defined.
    """
    confusion = numpy.asarray(confusion, dtype=numpy.int64)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"a confusion matrix must be square, got shape {confusion.shape}")
    if len(class_names) != confusion.shape[0]:
        raise ValueError(f"{len(class_names)} class names for a {confusion.shape[0]}-class confusion matrix")
    correct = numpy.diag(confusion)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    precision = _safe_ratio(correct, predicted)
    recall = _safe_ratio(correct, support)
    f1 = _safe_ratio(2 * precision * recall, precision + recall)
    total = int(confusion.sum())
    per_class = [
        {
            "index": index,
            "name": name,
            "precision": float(precision[index]),
            "recall": float(recall[index]),
            "f1": float(f1[index]),
            "support": int(support[index]),
            "predicted": int(predicted[index]),
        }
        for index, name in enumerate(class_names)
    ]
    weights = support / total if total else numpy.zeros_like(precision)
    # The macro mean is over the classes present in the labels or the predictions (scikit-learn's
    # rule): a class absent from both, such as one a test folder lacks, would only pull it down.
    seen = (confusion.sum(axis=1) > 0) | (confusion.sum(axis=0) > 0)
    return {
        "samples": total,
        "accuracy": float(correct.sum() / total) if total else 0.0,
        "per_class": per_class,
        "macro_avg": {"precision": _mean(precision[seen]), "recall": _mean(recall[seen]), "f1": _mean(f1[seen])},
        "weighted_avg": {
            "precision": float(weights @ precision),
            "recall": float(weights @ recall),
            "f1": float(weights @ f1),
        },
        "class_names": list(class_names),
        "confusion_matrix": confusion.tolist(),
    }


def _safe_ratio(numerator, denominator) -> numpy.ndarray:
    numerator = numpy.asarray(numerator, dtype=numpy.float64)
    denominator = numpy.asarray(denominator, dtype=numpy.float64)
    return numpy.divide(numerator, denominator, out=numpy.zeros_like(numerator), where=denominator > 0)


def format_report(report: dict) -> str:
    """The report as a text table: per-class rows, the means, then the confusion matrix."""
    width = max(len(name) for name in report["class_names"] + ["weighted avg"])
    lines = [f"{'class':<{width}}  precision  recall     f1  support"]
    for row in report["per_class"]:
        lines.append(
            f"{row['name']:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:6.4f}  {row['support']:7d}"
        )
    for label, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        mean = report[key]
        lines.append(f"{label:<{width}}  {mean['precision']:9.4f}  {mean['recall']:6.4f}  {mean['f1']:6.4f}  {report['samples']:7d}")
    lines.append(f"accuracy {report['accuracy']:.4f} on {report['samples']:,} samples")
    lines.append("")
    lines.append("confusion matrix (rows: true class, columns: predicted class)")
    matrix = numpy.asarray(report["confusion_matrix"])
    cell = max(4, len(str(matrix.max())) + 1)
    lines.append(" " * width + "".join(f"{index:>{cell}d}" for index in range(len(matrix))))
    for index, (name, row) in enumerate(zip(report["class_names"], matrix)):
        lines.append(f"{name:<{width}}" + "".join(f"{count:>{cell}d}" for count in row) + f"   ({index})")
    return "\n".join(lines)


# -- files ------------------------------------------------------------------------------------------


def write_json(path: str | os.PathLike, document) -> Path:
    """Write ``document`` as indented JSON, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return Path(path)


class HistoryWriter:
    """The metrics history as JSON lines, one row per finished epoch.

    :meth:`start` replaces the file with the rows a run begins from (none, or those kept in the
    checkpoint it resumes) and keeps it open; :meth:`append` adds one row in a single ``write``
    system call (a process killed around it leaves the row whole or absent), flushed to disk at
    once; :meth:`close` closes the file. Write failures raise
    :class:`~cnn_backend.serialization.FileWriteError` naming the file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._descriptor: int | None = None

    def start(self, rows: Iterable[dict] = ()) -> None:
        self.close()
        with atomic_path(self.path) as temporary:
            temporary.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        try:
            self._descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            raise FileWriteError(self.path, exc) from None

    def append(self, row: dict) -> None:
        data = (json.dumps(row) + "\n").encode("utf-8")
        size = None
        try:
            if self._descriptor is None:
                self._descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            size = os.fstat(self._descriptor).st_size
            written = os.write(self._descriptor, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(self._descriptor)
        except OSError as exc:
            if size is not None:  # no half row left behind
                with contextlib.suppress(OSError):
                    os.ftruncate(self._descriptor, size)
            raise FileWriteError(self.path, exc) from None

    def close(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None


def read_history(path: str | os.PathLike) -> list[dict]:
    """The rows of a history file written by :class:`HistoryWriter`."""
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


# -- plots ------------------------------------------------------------------------------------------


def matplotlib_available() -> bool:
    """Whether the optional plotting dependency is installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure, path: str | os.PathLike) -> Path:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    return Path(path)


def plot_curves(history: Sequence[dict], path: str | os.PathLike) -> Path:
    """Loss and accuracy per epoch, training and validation, side by side."""
    from matplotlib.ticker import MaxNLocator

    figure = _new_figure(10, 4)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    epochs = [row["epoch"] for row in history]
    for axes, metric, title in ((loss_axes, "loss", "loss"), (accuracy_axes, "accuracy", "accuracy")):
        axes.plot(epochs, [row[f"train_{metric}"] for row in history], marker="o", label="training")
        validation = [(row["epoch"], row[f"val_{metric}"]) for row in history if row.get(f"val_{metric}") is not None]
        if validation:
            axes.plot(*zip(*validation), marker="o", label="validation")
        axes.set(title=title, xlabel="epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
    return _save_png(figure, path)


def plot_confusion_matrix(confusion, class_names: Sequence[str], path: str | os.PathLike, title: str = "confusion matrix") -> Path:
    """The confusion matrix as a heat map with the count in each cell."""
    confusion = numpy.asarray(confusion)
    figure = _new_figure(8, 7)
    axes = figure.subplots()
    image = axes.imshow(confusion, cmap="Blues")
    figure.colorbar(image, ax=axes, shrink=0.8)
    ticks = range(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=45, ha="right")
    axes.set_yticks(ticks, class_names)
    axes.set(title=title, xlabel="predicted class", ylabel="true class")
    threshold = confusion.max() / 2 if confusion.size else 0
    for (row, column), count in numpy.ndenumerate(confusion):
        axes.text(column, row, str(count), ha="center", va="center", fontsize=8, color="white" if count > threshold else "black")
    return _save_png(figure, path)


def plot_filters(weight, path: str | os.PathLike, title: str = "first convolution layer filters") -> Path:
    """Every 2-D kernel of a convolution weight ``(out, in, k, k)`` on one symmetric colour scale."""
    kernels = numpy.asarray(weight).reshape(-1, *numpy.shape(weight)[-2:])
    count = len(kernels)
    columns = min(count, 8)
    rows = -(-count // columns)
    figure = _new_figure(max(4.5, 1.2 * columns + 1), 1.2 * rows + 0.8)
    figure.suptitle(title)
    limit = float(numpy.abs(kernels).max()) or 1.0
    grid = numpy.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for axes, kernel in zip(grid, kernels):
        axes.imshow(kernel, cmap="RdBu_r", vmin=-limit, vmax=limit)
    for axes in grid:
        axes.set_axis_off()
    return _save_png(figure, path)
