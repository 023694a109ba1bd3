"""SoftmaxCrossEntropy at its edges: logits given as lists, the cost of the label check, and labels
out of range with the checks off."""

from __future__ import annotations

from pathlib import Path

import numpy
import pytest

from cnn_backend import ShapeError, SoftmaxCrossEntropy, get_backend
from cnn_backend.testing import standin_backend


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_logits_given_as_a_list_are_taken_in_the_backend_dtype(dtype):
    logits = [[0.0, 1.0, 2.0], [2.0, -1.0, 0.5]]
    loss_fn = SoftmaxCrossEntropy(get_backend("cpu", dtype))
    loss = loss_fn(logits, [0, 1])  # an AttributeError ('list' object has no attribute 'ndim') before
    expected_fn = SoftmaxCrossEntropy(get_backend("cpu", dtype))
    expected = expected_fn(numpy.array(logits, dtype=dtype), numpy.array([0, 1]))
    assert loss == expected and loss.dtype == dtype
    numpy.testing.assert_array_equal(loss_fn.backward(), expected_fn.backward())
    assert loss_fn.backward().dtype == dtype


def test_host_logits_for_a_device_loss_are_sent_to_the_device():
    device = standin_backend("float32")
    loss = SoftmaxCrossEntropy(device)(numpy.zeros((2, 4), dtype=numpy.float32), [1, 3])
    assert float(loss) == pytest.approx(numpy.log(4))


@pytest.mark.parametrize("labels, low, high", [([0, 3, 9], None, None), ([0, 10, 2], 0, 10), ([-1, 4, 2], -1, 4)])
def test_the_label_range_check_reads_both_bounds_back_at_once(labels, low, high):
    device = standin_backend("float32")
    loss_fn = SoftmaxCrossEntropy(device, check_inputs=False, check_labels=True)
    logits, y = device.to_device(numpy.zeros((3, 10), dtype=numpy.float32)), device.to_device(numpy.array(labels))
    device.usage.reset_counters()
    if low is None:
        loss_fn(logits, y)
    else:
        with pytest.raises(ShapeError, match=rf"^SoftmaxCrossEntropy: labels must be in \[0, 9\], got values from {low} to {high}$"):
            loss_fn(logits, y)
    assert device.usage.device_reads == 1  # two blocking reads (min, then max) before


def test_host_labels_are_range_checked_with_the_same_message():
    with pytest.raises(ShapeError, match=r"^SoftmaxCrossEntropy: labels must be in \[0, 2\], got values from 0 to 3$"):
        SoftmaxCrossEntropy("cpu")(numpy.zeros((2, 3), dtype=numpy.float32), numpy.array([0, 3]))
    big = numpy.array([0, 2**64 - 1], dtype=numpy.uint64)
    with pytest.raises(ShapeError, match=rf"^SoftmaxCrossEntropy: labels must be in \[0, 2\], got values from 0 to {2**64 - 1}$"):
        SoftmaxCrossEntropy("cpu")(numpy.zeros((2, 3), dtype=numpy.float32), big)


@pytest.mark.parametrize("options", [{"check_inputs": False}, {"check_labels": False}])
def test_with_the_range_check_off_an_out_of_range_label_raises_on_the_cpu_and_the_docs_say_cuda_wraps_it(options):
    logits = numpy.array([[0.0, 1.0, 2.0], [2.0, 1.0, 0.5]], dtype=numpy.float32)
    with pytest.raises(IndexError):  # NumPy's own error; CuPy would wrap label 3 to class 0 instead
        SoftmaxCrossEntropy("cpu", **options)(logits, numpy.array([0, 3]))
    # A negative label counts from the end, silently, on the CPU as on CUDA.
    loss = SoftmaxCrossEntropy("cpu", **options)
    assert float(loss(logits, numpy.array([0, -1]))) == float(loss(logits, numpy.array([0, 2])))
    docstring = " ".join(SoftmaxCrossEntropy.__doc__.split())
    assert "a label ``>= classes`` raises IndexError on the CPU but is wrapped silently by CuPy on CUDA" in docstring
    assert "a negative label counts from the end on both" in docstring
    docs = " ".join((Path(__file__).parents[1] / "docs" / "layers.md").read_text().split())
    assert "With that check off, labels must be in range: a label `>= classes` raises IndexError on the CPU but is " \
           "wrapped silently by CuPy on a CUDA GPU" in docs and "a negative label counts from the end on both" in docs
