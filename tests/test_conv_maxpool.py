"""A first convolution and the 2x2 max-pool after it, run as one operation on the CPU backend, give
the values, ties and gradients of the two layers run one after the other (float64)."""

from __future__ import annotations

import numpy
import pytest

from cnn_backend import functional as F
from cnn_backend.backend import cpu_backend
from cnn_backend.layers import Convolution, MaxPool, ReLU, SoftmaxCrossEntropy
from cnn_backend.model import Sequential, plain_cnn
from cnn_backend.testing import standin_backend

PLAIN = cpu_backend("float64", parallel=False)
FUSING = cpu_backend("float64")


def separate(be, x, weight, bias, padding):
    """The two operations one after the other: ``(y, conv cache, pool cache)``."""
    conv, conv_cache = F.conv2d_forward(be, x, weight, bias, 1, padding, "gemm")
    y, pool_cache = F.maxpool_forward(be, conv, 2, 2)
    return y, conv_cache, pool_cache


@pytest.mark.parametrize("be", [PLAIN, FUSING, standin_backend("float64")], ids=["plain", "threads", "standin"])
@pytest.mark.parametrize(
    "n, c, f, size, k, padding, bias",
    [(5, 1, 4, 12, 3, 1, True), (3, 2, 3, 9, 2, 0, True), (4, 1, 2, 10, 5, 2, False), (2, 3, 5, 7, 4, 1, True)],
)
def test_values_and_gradients_match_the_two_operations(be, n, c, f, size, k, padding, bias):
    rng = numpy.random.default_rng(3)
    x = be.to_device(rng.standard_normal((n, c, size, size)))
    weight = be.to_device(rng.standard_normal((f, c, k, k)))
    b = be.to_device(rng.standard_normal(f)) if bias else None
    y, cache = F.conv2d_maxpool2x2_forward(be, x, weight, b, padding)
    expected, conv_cache, pool_cache = separate(be, x, weight, b, padding)
    numpy.testing.assert_allclose(be.to_numpy(y), be.to_numpy(expected), rtol=1e-13, atol=1e-13)

    dy = be.to_device(rng.standard_normal(y.shape))
    dweight, dbias = F.conv2d_maxpool2x2_backward(be, dy, cache)
    _, expected_dweight, expected_dbias = F.conv2d_backward(be, F.maxpool_backward(be, dy, pool_cache), conv_cache, False)
    numpy.testing.assert_allclose(be.to_numpy(dweight), be.to_numpy(expected_dweight), rtol=1e-12, atol=1e-12)
    if bias:
        numpy.testing.assert_allclose(be.to_numpy(dbias), be.to_numpy(expected_dbias), rtol=1e-12, atol=1e-12)
    else:
        assert dbias is None


def test_ties_go_where_the_two_operations_send_them():
    """A blank image makes every window a four-way tie (the bias alone), and a diagonal pair ties
    in another: the gradient must reach the same inputs, so the weight gradient is the same."""
    x = numpy.zeros((2, 1, 6, 6))
    x[:, 0, 0, 1] = x[:, 0, 1, 0] = 1.0  # a top-right / bottom-left tie under a 1x1 kernel
    weight, bias = numpy.ones((1, 1, 1, 1)), numpy.array([0.5])
    y, cache = F.conv2d_maxpool2x2_forward(FUSING, x, weight, bias, 0)
    expected, conv_cache, pool_cache = separate(PLAIN, x, weight, bias, 0)
    numpy.testing.assert_array_equal(y, expected)
    dy = numpy.arange(1.0, 1.0 + y.size).reshape(y.shape)
    dweight, dbias = F.conv2d_maxpool2x2_backward(FUSING, dy, cache)
    _, expected_dweight, expected_dbias = F.conv2d_backward(PLAIN, F.maxpool_backward(PLAIN, dy, pool_cache), conv_cache, False)
    # dweight sums dy over the winners' inputs: 1 only where the top-right value won its window.
    numpy.testing.assert_array_equal(dweight, expected_dweight)
    assert dweight.item() == dy[:, 0, 0, 0].sum()
    numpy.testing.assert_array_equal(dbias, expected_dbias)


def test_the_column_matrix_holds_one_patch_per_pooled_pixel():
    """A 3x3 kernel's four pooled outputs read one 4x4 patch: 16 rows (and the bias's), one column
    per pooled pixel, not 9 rows for each of the four quadrants' columns."""
    x = numpy.random.default_rng(4).standard_normal((3, 2, 8, 8))
    y, cache = F.conv2d_maxpool2x2_forward(FUSING, x, numpy.ones((5, 2, 3, 3)), numpy.zeros(5), 1)
    cols_2d = cache[3]
    assert y.shape == (3, 5, 4, 4) and cols_2d.shape == (2 * 4 * 4 + 1, 4 * 4 * 3)
    patches = cols_2d[:-1].reshape(2, 4, 4, 4, 4, 3)  # (C, U, V, PY, PX, N)
    padded = numpy.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    # pooled pixel (1, 2) of image 0 reads the padded input's rows 2-5 and columns 4-7
    numpy.testing.assert_array_equal(patches[:, :, :, 1, 2, 0], padded[0, :, 2:6, 4:8])


def test_an_odd_output_is_refused():
    with pytest.raises(ValueError, match="output 5x5 must have even sides"):
        F.conv2d_maxpool2x2_forward(FUSING, numpy.zeros((1, 1, 7, 7)), numpy.zeros((1, 1, 3, 3)), None, 0)


def test_inference_records_nothing():
    y, cache = F.conv2d_maxpool2x2_forward(FUSING, numpy.ones((1, 1, 4, 4)), numpy.ones((2, 1, 1, 1)), None, 0, for_backward=False)
    assert cache is None and y.shape == (1, 2, 2, 2)


def first_block(be, training=True, **conv_options):
    options = {"kernel_size": 3, "padding": 1, **conv_options}
    model = Sequential([Convolution(out_channels=16, **options), MaxPool(2), ReLU()], be, input_shape=(1, 8, 8), rng=0)
    return model.train(training)


@pytest.mark.parametrize(
    "be, options, training, fused",
    [
        (FUSING, {}, True, True),
        (FUSING, {}, False, True),
        (PLAIN, {}, True, False),  # only the threaded CPU backend fuses
        (standin_backend("float64"), {}, True, False),
        (FUSING, {"stride": 2}, True, False),
        (FUSING, {"padding": 0}, True, True),  # a 6x6 output is even too
        (FUSING, {"kernel_size": 2, "padding": 0}, True, False),  # 7x7: odd
        (FUSING, {"algorithm": "signal"}, True, False),
    ],
)
def test_when_a_model_fuses(be, options, training, fused):
    model = first_block(be, training, **options)
    conv, pool = model.layers[:2]
    assert conv.runs_with_maxpool(pool, (2, 1, 8, 8)) is fused
    model.forward(numpy.ones((2, 1, 8, 8)))
    if training:
        assert (pool._cache is MaxPool.POOLED_BY_PREVIOUS) is fused


def test_a_layer_that_passes_its_input_gradient_back_is_not_fused():
    model = first_block(FUSING)
    conv, pool = model.layers[:2]
    conv.needs_input_grad = True
    assert not conv.runs_with_maxpool(pool, (2, 1, 8, 8))
    model.eval()  # fused again: a backward pass through evaluation runs the two passes again
    assert conv.runs_with_maxpool(pool, (2, 1, 8, 8))


@pytest.mark.parametrize("input_grad", [True, False], ids=["input-gradient", "weights-only"])
def test_backward_through_evaluation_matches_the_separate_layers_and_finite_differences(input_grad):
    # A saliency map: the fused pair and a separate MaxPool (plain backend) in evaluation, where
    # neither kept the pooling's winners, against each other and against finite differences.
    rng = numpy.random.default_rng(3)
    x, dy = rng.standard_normal((2, 1, 8, 8)), rng.standard_normal((2, 16, 4, 4))
    gradients = []
    for be in (FUSING, PLAIN):
        model = first_block(be, training=False)
        model.layers[0].needs_input_grad = input_grad
        model.forward(x)
        dx = model.backward(dy)
        gradients.append((dx, model.layers[0].params["weight"].grad.copy()))
    (fused_dx, fused_dw), (plain_dx, plain_dw) = gradients
    numpy.testing.assert_allclose(fused_dw, plain_dw, rtol=1e-12, atol=1e-12)
    if not input_grad:
        assert fused_dx is None and plain_dx is None
        return
    numpy.testing.assert_allclose(fused_dx, plain_dx, rtol=1e-12, atol=1e-12)
    model = first_block(PLAIN, training=False)
    loss = lambda inputs: float((model.forward(inputs) * dy).sum())  # noqa: E731
    for index in [(0, 0, 0, 0), (0, 0, 3, 4), (1, 0, 7, 7), (1, 0, 2, 5)]:
        step = numpy.zeros_like(x)
        step[index] = 1e-6
        assert (loss(x + step) - loss(x - step)) / 2e-6 == pytest.approx(fused_dx[index], rel=1e-6, abs=1e-9)


def test_it_pays_only_with_few_input_channels():
    assert F.conv_maxpool_pays(1, 3, 3, 32)  # the default model's first layer
    assert not F.conv_maxpool_pays(32, 3, 3, 64)  # its second
    wide = Sequential([Convolution(out_channels=4, kernel_size=3, padding=1), MaxPool(2)], FUSING, input_shape=(8, 6, 6), rng=0)
    assert not wide.layers[0].runs_with_maxpool(wide.layers[1], (2, 8, 6, 6))


def test_a_fused_model_trains_as_the_plain_one():
    rng = numpy.random.default_rng(0)
    x, labels = rng.random((6, 1, 28, 28)), rng.integers(0, 10, size=6)
    results = []
    for be in (PLAIN, FUSING):
        model = plain_cnn(be, seed=0)
        loss = SoftmaxCrossEntropy(be)
        loss.forward(model.forward(x), labels)
        model.backward(loss.backward())
        assert (model.layers[1]._cache is None) and model.layers[0]._cache is None  # both consumed
        results.append(([p.grad.copy() for p in model.parameters()], model.eval().forward(x)))
    (plain_grads, plain_logits), (grads, logits) = results
    for plain, fused in zip(plain_grads, grads):
        numpy.testing.assert_allclose(fused, plain, rtol=1e-11, atol=1e-13)
    numpy.testing.assert_allclose(logits, plain_logits, rtol=1e-12, atol=1e-13)


def test_the_pool_of_a_fused_pair_hands_the_gradient_back_once():
    model = first_block(FUSING)
    model.forward(numpy.ones((2, 1, 8, 8)))
    pool = model.layers[1]
    dy = numpy.ones((2, 16, 4, 4))
    assert pool.backward(dy) is dy
    with pytest.raises(RuntimeError, match=r"MaxPool\(pool_size=2, stride=2\): backward needs a forward pass first"):
        pool.backward(dy)
