"""The loss: fused softmax and cross-entropy over integer class labels."""

from __future__ import annotations

from .. import functional as F
from ..backend import Backend, cpu_backend, get_backend
from ..init import as_number
from .base import ShapeError


class NonFiniteLogitsError(ShapeError):
    """Logits holding NaN or infinity: diverged weights or bad input."""


class SoftmaxCrossEntropy:
    """Fused softmax + categorical cross-entropy: the loss of integer class labels given logits.

    ``check_inputs`` validates labels and logits (one device sync each); training loops that have
    validated labels on the host turn it off and watch the loss value instead. ``check_labels``
    (default: ``check_inputs``) checks the labels' range alone, for loops that watch the loss but
    take labels from a loader that did not validate them. With the range check off, labels must be
    in ``[0, classes)``: a label ``>= classes`` raises IndexError on the CPU but is wrapped silently by
    CuPy on CUDA (``classes`` reads class 0), and a negative label counts from the end on both
    (``-1`` reads the last class): the loss and gradient are then wrong without an error. Logits and labels may be host or device arrays, or lists (logits
    given as a list are taken in the backend's dtype). ``label_smoothing``
    in [0, 1) replaces the one-hot target by ``(1 - label_smoothing) onehot + label_smoothing / K``
    (PyTorch's definition); it discourages over-confident logits.
    """

    def __init__(
        self, backend: Backend | str | None = None, *, check_inputs: bool = True, check_labels: bool | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        self.backend = cpu_backend() if backend is None else get_backend(backend)
        self.check_inputs = check_inputs
        self.check_labels = check_inputs if check_labels is None else check_labels
        self.label_smoothing = as_number(
            label_smoothing, "SoftmaxCrossEntropy: label_smoothing", "a number in [0, 1)", lambda value: 0.0 <= value < 1.0
        )
        self._dlogits = None

    def forward(self, logits, labels):
        if not isinstance(logits, self.backend.xp.ndarray):  # a list (in the backend's dtype), or host logits for a device model
            logits = self.backend.to_device(logits, None if hasattr(logits, "dtype") else self.backend.dtype)
        if not isinstance(labels, self.backend.xp.ndarray):  # a list, or host labels for a device model
            labels = self.backend.to_device(labels)
        if logits.ndim != 2:
            raise ShapeError(f"SoftmaxCrossEntropy: expected logits of shape (N, classes), got {tuple(logits.shape)}")
        if logits.shape[0] == 0:  # the mean over no samples would divide by zero
            raise ShapeError(f"SoftmaxCrossEntropy: expected a batch of at least one sample, got logits of shape {tuple(logits.shape)}")
        if labels.shape != (logits.shape[0],):
            raise ShapeError(
                f"SoftmaxCrossEntropy: expected labels of shape ({logits.shape[0]},) to match the logits, "
                f"got {tuple(labels.shape)}" + ("; the loss takes class indices: pass targets.argmax(axis=1) for one-hot "
                                               "targets" if labels.shape == logits.shape else "")
            )
        if labels.dtype.kind not in "iu":
            raise ShapeError(f"SoftmaxCrossEntropy: labels must be integer class indices, got dtype {labels.dtype}")
        if self.check_labels:
            check_label_range(labels, logits.shape[1], self.backend)
        if self.check_inputs and not bool(self.backend.xp.isfinite(logits).all()):
            raise NonFiniteLogitsError("SoftmaxCrossEntropy: logits contain NaN or infinity (diverged training or bad input)")
        loss, self._dlogits = F.softmax_cross_entropy(self.backend, logits, labels, self.label_smoothing)
        return loss

    def backward(self):
        """Gradient of the mean loss with respect to the logits: ``(softmax - target) / N``."""
        if self._dlogits is None:
            raise RuntimeError("SoftmaxCrossEntropy: backward needs a forward pass first (call the loss on logits and labels, then backward)")
        return self._dlogits

    __call__ = forward


def check_label_range(labels, n_classes: int, backend: Backend | None = None) -> None:
    """Refuse class indices outside ``[0, n_classes)``: host labels, or device labels of ``backend``
    (one device read of both bounds; without ``backend``, a read of each)."""
    if not labels.size:
        return
    if backend is None:  # host labels, as fit and evaluate check them: the reads cost nothing there
        low, high = int(labels.min()), int(labels.max())
    else:  # both bounds stacked on the device and read back at once: one synchronisation, not two
        low, high = backend.to_numpy(backend.xp.stack([labels.min(), labels.max()])).tolist()
    if low < 0 or high >= n_classes:
        raise ShapeError(f"SoftmaxCrossEntropy: labels must be in [0, {n_classes - 1}], got values from {low} to {high}")
