"""Predict the class of image files with a trained model: each file converted to the model's
channel count and size and normalised as in training (see :class:`cnn_backend.inputs.InputSpec`).

A file that is missing, unreadable, a directory, or not an image is reported in its own
:class:`Prediction` (``error``); the other files are still predicted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy

from . import functional as F
from .backend import cpu_backend, get_backend
from .datasets.base import DataError, printable
from .datasets.folder import decode_image
from .inputs import InputSpec
from .model import EVALUATION_BATCH_SIZE

#: classes shown per image, here and by ``cnn-backend predict --top``
DEFAULT_TOP = 3


@dataclass
class Prediction:
    """The top classes of one file (``(name, probability)``, most likely first), or its ``error``."""

    path: Path
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict:
        # printable: a lone surrogate of a name that is not UTF-8 would make invalid JSON
        if self.error is not None:
            return {"path": printable(self.path), "error": printable(self.error)}
        return {"path": printable(self.path), "top": [{"class": name, "probability": probability} for name, probability in self.top]}


def read_image_file(path: str | os.PathLike, inputs: InputSpec) -> numpy.ndarray:
    """One image file as uint8 ``(C, H, W)`` in the model's channel count and size; DataError
    (one line, naming the file) when it cannot be used."""
    path = Path(path)
    try:
        is_folder, exists = path.is_dir(), path.exists()
    except OSError as exc:  # a folder on the way that may not be entered, a name too long
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if is_folder:
        raise DataError(f"{path}: a directory, not an image file")
    if not exists:
        raise DataError(f"{path}: no such file")
    try:
        return decode_image(path, inputs.channels, inputs.image_size)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    except OSError as exc:  # permission denied and the like
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def refuse_models_of_no_images(model) -> None:
    """ValueError, before any file is read, for a model whose samples are not 1- or 3-channel images
    (feature vectors, 2 or 4 channels): image files cannot be made into its input."""
    shape = getattr(model, "input_shape", None)
    if shape is not None and (len(shape) != 3 or shape[0] not in (1, 3)):
        kind = f"feature vectors of {shape[0]} values" if len(shape) == 1 else f"samples of shape {tuple(shape)}"
        raise ValueError(f"the model takes {kind}, not 1- or 3-channel images: image files cannot be predicted with it")


def softmax(logits: numpy.ndarray) -> numpy.ndarray:
    """Class probabilities of host ``logits`` ``(N, classes)``, from the loss's stable log-softmax."""
    return numpy.exp(F.log_softmax(cpu_backend(parallel=False), logits))


def predict_files(
    model, inputs: InputSpec, paths: Sequence[str | os.PathLike], top: int = DEFAULT_TOP, batch_size: int = EVALUATION_BATCH_SIZE,
) -> list[Prediction]:
    """A :class:`Prediction` per path, in order, with the ``top`` most likely classes
    (``batch_size`` images per forward pass)."""
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    refuse_models_of_no_images(model)
    predictions = [Prediction(Path(path)) for path in paths]
    decoded, rows = [], []
    for index, prediction in enumerate(predictions):
        try:
            decoded.append(read_image_file(prediction.path, inputs))
            rows.append(index)
        except DataError as exc:
            prediction.error = str(exc)
    if decoded:
        x = inputs.prepare(numpy.stack(decoded), model.backend.dtype)
        logits = model.backend.to_numpy(model.predict_logits(x, batch_size)).astype(numpy.float64)
        if logits.shape[1] != inputs.num_classes:
            raise DataError(f"the model has {logits.shape[1]} outputs but {inputs.num_classes} class names are recorded")
        probabilities = softmax(logits)
        count = min(top, inputs.num_classes)
        for row, index in enumerate(rows):
            best = numpy.argsort(-probabilities[row], kind="stable")[:count]
            predictions[index].top = [(inputs.class_names[k], float(probabilities[row, k])) for k in best]
    return predictions


def predict_images(
    checkpoint: str | os.PathLike, paths: str | os.PathLike | Sequence[str | os.PathLike], *, top: int = DEFAULT_TOP,
    device: str = "auto", batch_size: int = EVALUATION_BATCH_SIZE,
) -> list[Prediction]:
    """Load ``checkpoint`` (or a model file) onto ``device`` and predict ``paths`` (one path or a
    sequence of them; a list of one prediction per image): the Python counterpart of ``cnn-backend predict``,
    with its defaults. ``device="auto"`` runs on a usable CUDA GPU, else on the CPU: it imports CuPy
    where it is installed (about a second without a GPU); give ``"cpu"`` to keep CuPy out."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    from .checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint, require_training_state=False)
    backend = get_backend(device, loaded.dtype)
    model = loaded.build_model(backend)
    return predict_files(model, loaded.input_spec(), paths, top=top, batch_size=batch_size)
