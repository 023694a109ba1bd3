"""The banded convolution (evaluation of thin layers on the CPU backend, no im2col) gives the gemm
path's values, and a gradient through it the gemm path's gradients (float64)."""

from __future__ import annotations

import numpy
import pytest

from cnn_backend import functional as F
from cnn_backend.backend import cpu_backend
from cnn_backend.layers import Convolution
from cnn_backend.model import Sequential, plain_cnn, seed_cnn
from cnn_backend.testing import standin_backend

PLAIN = cpu_backend("float64", parallel=False)
THREADS = cpu_backend("float64")

GEOMETRIES = [
    # n, c, f, h, w, kernel, stride, padding, bias
    (5, 1, 1, 28, 28, 6, 1, 0, True),  # the seed model's layer
    (4, 3, 2, 11, 9, 3, 2, 1, False),  # stride 2, padding, a non-square input
    (3, 2, 3, 7, 8, 4, 3, 2, True),  # stride 3, kernel columns that read only padding on some outputs
    (2, 1, 1, 5, 5, 5, 1, 4, True),  # padding as wide as the kernel: rows wholly outside the input
]


@pytest.mark.parametrize("be", [PLAIN, THREADS, standin_backend("float64")], ids=["plain", "threads", "standin"])
@pytest.mark.parametrize("n, c, f, h, w, k, stride, padding, bias", GEOMETRIES)
def test_values_and_gradients_match_the_gemm_path(be, n, c, f, h, w, k, stride, padding, bias):
    rng = numpy.random.default_rng(7)
    x = be.to_device(rng.standard_normal((n, c, h, w)))
    weight = be.to_device(rng.standard_normal((f, c, k, k)))
    b = be.to_device(rng.standard_normal(f)) if bias else None
    y, cache = F.conv2d_forward_banded(be, x, weight, b, stride, padding, workspace={})
    expected, gemm_cache = F.conv2d_forward(be, x, weight, b, stride, padding, "gemm")
    assert y.shape == expected.shape
    numpy.testing.assert_allclose(be.to_numpy(y), be.to_numpy(expected), rtol=1e-12, atol=1e-12)

    dy = be.to_device(rng.standard_normal(y.shape))
    got = F.conv2d_backward(be, dy, cache)
    want = F.conv2d_backward(be, dy, gemm_cache)
    for name, got_part, want_part in zip(("dx", "dweight", "dbias"), got, want):
        if want_part is None:
            assert got_part is None, name
        else:
            numpy.testing.assert_allclose(be.to_numpy(got_part), be.to_numpy(want_part), rtol=1e-12, atol=1e-12, err_msg=name)


def test_the_band_holds_each_weight_where_its_row_lands():
    weight = numpy.arange(1.0, 1.0 + 2 * 2 * 3).reshape(1, 2, 2, 3)  # F=1, C=2, KH=2, KW=3
    band = F._band(PLAIN, weight, input_h=4, out_h=2, stride=2, padding=1)
    assert band.shape == (3, 1, 2, 2, 4)
    # Output row 0 reads input rows -1 (padding: left out) and 0; output row 1 reads rows 1 and 2.
    for j in range(3):
        for c in range(2):
            numpy.testing.assert_array_equal(band[j, 0, 0, c], [weight[0, c, 1, j], 0, 0, 0])
            numpy.testing.assert_array_equal(band[j, 0, 1, c], [0, weight[0, c, 0, j], weight[0, c, 1, j], 0])


def test_a_reused_workspace_gives_the_same_values():
    rng = numpy.random.default_rng(1)
    weight, bias = rng.standard_normal((1, 1, 6, 6)), rng.standard_normal(1)
    workspace: dict = {}
    first, second = (rng.standard_normal((3, 1, 28, 28)) for _ in range(2))
    F.conv2d_forward_banded(THREADS, first, weight, bias, workspace=workspace)
    y, _ = F.conv2d_forward_banded(THREADS, second, weight, bias, workspace=workspace)
    expected, _ = F.conv2d_forward(PLAIN, second, weight, bias)
    numpy.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    assert set(workspace) == {"banded"}


def test_it_pays_for_the_seed_layer_and_for_no_layer_of_the_default_model():
    assert F.banded_convolution_pays((1, 1, 6, 6), 28)
    assert not F.banded_convolution_pays((32, 1, 3, 3), 28)
    assert not F.banded_convolution_pays((64, 32, 3, 3), 14)
    assert not F.banded_convolution_pays((4, 1, 3, 3), 28)  # four filters already cost more than im2col


def banded_layers(model, x) -> list[bool]:
    """For each convolution of ``model``, whether its forward pass on ``x`` took the banded path."""
    model.forward(x)
    return [layer._cache is not None and layer._cache[0] == "banded" for layer in model.layers if isinstance(layer, Convolution)]


@pytest.mark.parametrize(
    "be, training, banded",
    [(THREADS, False, True), (THREADS, True, False), (PLAIN, False, False), (standin_backend("float64"), False, False)],
    ids=["cpu-eval", "cpu-training", "plain-eval", "standin-eval"],
)
def test_when_the_seed_model_bands(be, training, banded):
    model = seed_cnn(be, seed=0).train(training)
    assert banded_layers(model, be.to_device(numpy.zeros((2, 1, 28, 28)))) == [banded]


def test_the_default_model_never_bands():
    model = plain_cnn(THREADS, seed=0).eval()
    assert banded_layers(model, numpy.zeros((2, 1, 28, 28))) == [False, False]


def test_an_evaluation_pass_gives_the_training_pass_logits():
    x = numpy.random.default_rng(2).standard_normal((6, 1, 28, 28))
    model = seed_cnn(THREADS, seed=3)
    training_logits = model.train().forward(x)
    assert banded_layers(model.eval(), x) == [True]
    numpy.testing.assert_allclose(model.forward(x), training_logits, rtol=1e-12, atol=1e-12)


def test_a_thin_layer_of_a_user_network_bands_in_evaluation():
    model = Sequential([Convolution(out_channels=1, kernel_size=7, padding=3)], THREADS, input_shape=(2, 20, 20), rng=0).eval()
    x = numpy.random.default_rng(4).standard_normal((3, 2, 20, 20))
    assert banded_layers(model, x) == [True]
    weight, bias = model.layers[0].params["weight"].data, model.layers[0].params["bias"].data
    numpy.testing.assert_allclose(model.forward(x), F.conv2d_forward(PLAIN, x, weight, bias, 1, 3)[0], rtol=1e-12, atol=1e-12)
