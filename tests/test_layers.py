"""Layers: gradients against central differences (float64), reference values, and bad-input errors."""

from __future__ import annotations

import numpy
import pytest

from cnn_backend import (
    Convolution,
    Dropout,
    Flatten,
    FullyConnected,
    MaxPool,
    ReLU,
    ShapeError,
    SoftmaxCrossEntropy,
    get_backend,
)

CPU64 = get_backend("cpu", dtype="float64")


def numerical_gradient(f, array, eps=1e-6):
    """Central differences of the scalar ``f()`` with respect to every element of ``array`` (in place)."""
    grad = numpy.zeros_like(array)
    for index in numpy.ndindex(array.shape):
        saved = array[index]
        array[index] = saved + eps
        plus = f()
        array[index] = saved - eps
        minus = f()
        array[index] = saved
        grad[index] = (plus - minus) / (2 * eps)
    return grad


def check_layer_gradients(layer, x, rng, rtol=1e-6, atol=1e-8):
    """Compare a layer's analytic input and parameter gradients with central differences of
    ``sum(forward(x) * probe)`` for a random probe."""
    probe = rng.standard_normal(layer.forward(x).shape)

    def objective():
        return float((layer.forward(x) * probe).sum())

    layer.forward(x)
    dx = layer.backward(probe)
    numpy.testing.assert_allclose(dx, numerical_gradient(objective, x), rtol=rtol, atol=atol)
    for name, param in layer.params.items():
        layer.forward(x)
        layer.backward(probe)
        analytic = param.grad.copy()
        numpy.testing.assert_allclose(analytic, numerical_gradient(objective, param.data), rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("algorithm", ["gemm", "signal"])
@pytest.mark.parametrize(
    "in_channels, out_channels, kernel, stride, padding, size",
    [(1, 1, 3, 1, 0, 6), (2, 3, 3, 1, 1, 5), (3, 2, 2, 2, 0, 7), (2, 2, 3, 2, 1, 6), (1, 2, 1, 1, 0, 4)],
)
def test_convolution_gradients(algorithm, in_channels, out_channels, kernel, stride, padding, size):
    rng = numpy.random.default_rng(0)
    layer = Convolution(in_channels, out_channels, kernel, stride, padding, algorithm=algorithm, rng=1, backend=CPU64)
    layer.params["bias"].data[:] = rng.standard_normal(out_channels)
    check_layer_gradients(layer, rng.standard_normal((2, in_channels, size, size + 1)), rng)


def test_relu_gradient_and_values():
    rng = numpy.random.default_rng(1)
    layer = ReLU(CPU64)
    # Keep inputs away from the kink at 0, where the derivative is undefined.
    x = rng.uniform(0.1, 1.0, (3, 4)) * rng.choice([-1.0, 1.0], (3, 4))
    numpy.testing.assert_array_equal(layer.forward(x), numpy.maximum(x, 0))
    check_layer_gradients(layer, x, rng)


def tie_free(rng, shape):
    """A shuffled linspace: no two values tie, so the max-pool winner is unambiguous."""
    return rng.permutation(numpy.linspace(-1.0, 1.0, int(numpy.prod(shape)))).reshape(shape)


@pytest.mark.parametrize("pool, stride, size", [(2, None, 6), (2, None, 7), (3, 2, 7), (2, 1, 5), (3, None, 9)])
def test_maxpool_gradients(pool, stride, size):
    rng = numpy.random.default_rng(2)
    layer = MaxPool(pool, stride, backend=CPU64)
    check_layer_gradients(layer, tie_free(rng, (2, 3, size, size)), rng)


def test_maxpool_values_against_loops():
    rng = numpy.random.default_rng(3)
    x = tie_free(rng, (2, 2, 7, 7))
    y = MaxPool(3, 2, backend=CPU64).forward(x)
    expected = numpy.array(
        [[[[x[n, c, i * 2 : i * 2 + 3, j * 2 : j * 2 + 3].max() for j in range(3)] for i in range(3)] for c in range(2)] for n in range(2)]
    )
    numpy.testing.assert_array_equal(y, expected)


def test_maxpool_tie_sends_the_gradient_to_one_input_only():
    layer = MaxPool(2, backend=CPU64)
    x = numpy.zeros((1, 1, 2, 2))
    layer.forward(x)
    dx = layer.backward(numpy.ones((1, 1, 1, 1)))
    assert dx.sum() == 1.0 and dx[0, 0, 0, 0] == 1.0


def test_maxpool_backward_after_an_evaluation_forward_says_what_to_do():
    layer = MaxPool(2, backend=CPU64)
    layer.training = False
    y = layer.forward(numpy.ones((1, 1, 4, 4)))
    with pytest.raises(RuntimeError, match=r"backward needs a forward pass in training mode"):
        layer.backward(numpy.ones_like(y))


def test_flatten_round_trip():
    rng = numpy.random.default_rng(4)
    layer = Flatten(CPU64)
    x = rng.standard_normal((2, 3, 2, 2))
    assert layer.forward(x).shape == (2, 12)
    check_layer_gradients(layer, x, rng)


def layouts_of(x):
    """``x`` (N, C, H, W) in three memory orders, each an array with NCHW shape and values."""
    return {
        "nchw": x.copy(),
        "batch-innermost": numpy.ascontiguousarray(x.transpose(1, 2, 3, 0)).transpose(3, 0, 1, 2),
        "channels-last": numpy.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2),
    }


@pytest.mark.parametrize("layout", ["nchw", "batch-innermost", "channels-last"])
def test_flatten_gives_c_h_w_feature_order_in_any_layout(layout):
    rng = numpy.random.default_rng(6)
    x_host = rng.standard_normal((3, 2, 4, 5))
    x = layouts_of(x_host)[layout]
    layer = Flatten(CPU64)
    flat = layer.forward(x)
    numpy.testing.assert_array_equal(flat, x_host.reshape(3, -1))
    probe = rng.standard_normal(flat.shape)
    numpy.testing.assert_array_equal(layer.backward(probe), probe.reshape(x_host.shape))
    check_layer_gradients(layer, x, rng)


def test_flatten_of_a_batch_innermost_activation_is_a_view():
    x = layouts_of(numpy.arange(2 * 3 * 4 * 4, dtype=float).reshape(2, 3, 4, 4))["batch-innermost"]
    layer = Flatten(CPU64)
    flat = layer.forward(x)
    assert numpy.shares_memory(flat, x)
    # A gradient in the same transposed layout goes back without a copy either.
    dy = numpy.ascontiguousarray(numpy.ones(flat.shape).T).T
    assert numpy.shares_memory(layer.backward(dy), dy)


def test_fully_connected_input_gradient_takes_the_layout_of_its_input():
    rng = numpy.random.default_rng(7)
    layer = FullyConnected(6, 4, rng=0, backend=CPU64)
    x_rows = rng.standard_normal((5, 6))
    dy = rng.standard_normal((5, 4))
    expected = dy @ layer.params["weight"].data.T
    for x, transposed in ((x_rows, False), (numpy.ascontiguousarray(x_rows.T).T, True)):
        layer.forward(x)
        dx = layer.backward(dy)
        numpy.testing.assert_allclose(dx, expected, rtol=1e-12)
        assert dx.T.flags.c_contiguous == transposed and dx.flags.c_contiguous != transposed


def test_fully_connected_gradients_and_values():
    rng = numpy.random.default_rng(5)
    layer = FullyConnected(5, 3, rng=0, backend=CPU64)
    layer.params["bias"].data[:] = rng.standard_normal(3)
    x = rng.standard_normal((4, 5))
    numpy.testing.assert_allclose(layer.forward(x), x @ layer.params["weight"].data + layer.params["bias"].data)
    check_layer_gradients(layer, x, rng)


def test_dropout_gradient_uses_the_same_mask():
    rng = numpy.random.default_rng(6)
    layer = Dropout(0.4, rng=0, backend=CPU64)
    x = rng.standard_normal((8, 5))
    y = layer.forward(x)
    dy = rng.standard_normal(y.shape)
    kept = y != 0
    numpy.testing.assert_allclose(layer.backward(dy), numpy.where(kept, dy / 0.6, 0.0))
    numpy.testing.assert_allclose(y[kept], x[kept] / 0.6)


def test_dropout_rate_and_scaling_in_training_and_identity_in_eval():
    layer = Dropout(0.25, rng=0, backend=CPU64)
    x = numpy.ones((400, 250))
    y = layer.forward(x)
    assert abs((y == 0).mean() - 0.25) < 0.01
    assert set(numpy.unique(y)) == {0.0, 1.0 / 0.75}
    assert abs(y.mean() - 1.0) < 0.02  # inverted dropout keeps the expectation
    layer.training = False
    assert layer.forward(x) is x
    assert layer.backward(x) is x


def test_dropout_masks_follow_the_seed():
    a, b = Dropout(0.5, rng=7, backend=CPU64), Dropout(0.5, rng=7, backend=CPU64)
    x = numpy.ones((4, 6))
    numpy.testing.assert_array_equal(a.forward(x), b.forward(x))


def test_dropout_rejects_a_bad_rate():
    with pytest.raises(ValueError, match=r"Dropout: rate must be in \[0, 1\), got 1.0"):
        Dropout(1.0)


# -- loss ---------------------------------------------------------------------------------------------


def test_softmax_cross_entropy_value_and_gradient():
    rng = numpy.random.default_rng(8)
    logits = rng.standard_normal((5, 4))
    labels = numpy.array([0, 3, 1, 1, 2])
    loss_fn = SoftmaxCrossEntropy(CPU64)
    loss = float(loss_fn.forward(logits, labels))
    probs = numpy.exp(logits) / numpy.exp(logits).sum(axis=1, keepdims=True)
    assert loss == pytest.approx(-numpy.log(probs[numpy.arange(5), labels]).mean(), rel=1e-12)
    expected_grad = (probs - numpy.eye(4)[labels]) / 5
    numpy.testing.assert_allclose(loss_fn.backward(), expected_grad, rtol=1e-12)
    numeric = numerical_gradient(lambda: float(loss_fn.forward(logits, labels)), logits)
    numpy.testing.assert_allclose(expected_grad, numeric, rtol=1e-6, atol=1e-9)


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    loss_fn = SoftmaxCrossEntropy(CPU64)
    logits = numpy.array([[1000.0, 0.0, -1000.0], [0.0, 800.0, 0.0]])
    loss = float(loss_fn.forward(logits, numpy.array([0, 0])))
    assert numpy.isfinite(loss) and loss == pytest.approx(800.0 / 2)
    assert numpy.isfinite(loss_fn.backward()).all()


def test_loss_rejects_labels_out_of_range():
    with pytest.raises(ShapeError, match=r"labels must be in \[0, 2\], got values from 0 to 3"):
        SoftmaxCrossEntropy(CPU64).forward(numpy.zeros((2, 3)), numpy.array([0, 3]))


def test_loss_rejects_non_finite_logits():
    with pytest.raises(ShapeError, match=r"logits contain NaN or infinity"):
        SoftmaxCrossEntropy(CPU64).forward(numpy.array([[0.0, numpy.nan]]), numpy.array([1]))


def test_loss_rejects_mismatched_or_float_labels():
    loss_fn = SoftmaxCrossEntropy(CPU64)
    with pytest.raises(ShapeError, match=r"expected labels of shape \(2,\)"):
        loss_fn.forward(numpy.zeros((2, 3)), numpy.array([0, 1, 2]))
    with pytest.raises(ShapeError, match=r"labels must be integer class indices, got dtype float64"):
        loss_fn.forward(numpy.zeros((2, 3)), numpy.array([0.0, 1.0]))
    with pytest.raises(ShapeError, match=r"expected logits of shape \(N, classes\)"):
        loss_fn.forward(numpy.zeros(3), numpy.array([0]))


# -- bad input names the layer and the expected shape -------------------------------------------------


@pytest.mark.parametrize(
    "layer, x, message",
    [
        (Convolution(1, 4, 3), numpy.zeros((28, 28)), r"Convolution\(1->4, 3x3.*expected a 4-D input \(N, C, H, W\), got shape \(28, 28\)"),
        (Convolution(1, 4, 3), numpy.zeros((2, 3, 28, 28)), r"expected input of shape \(N, 1, H, W\) with H, W >= 3, got \(2, 3, 28, 28\)"),
        (Convolution(1, 4, 5), numpy.zeros((2, 1, 4, 9)), r"with H, W >= 5, got \(2, 1, 4, 9\)"),
        (MaxPool(2), numpy.zeros((2, 1, 1, 5)), r"MaxPool\(pool_size=2, stride=2\): expected H, W >= 2"),
        (MaxPool(2), numpy.zeros((2, 5)), r"MaxPool.*expected a 4-D input"),
        (FullyConnected(121, 10), numpy.zeros((2, 120)), r"FullyConnected\(121->10\): expected input of shape \(N, 121\), got \(2, 120\)"),
        (FullyConnected(121, 10), numpy.zeros((2, 1, 11, 11)), r"FullyConnected\(121->10\): expected a 2-D input"),
    ],
)
def test_bad_input_names_the_layer_and_expected_shape(layer, x, message):
    with pytest.raises(ShapeError, match=message):
        layer.forward(x.astype(numpy.float32))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Convolution(0, 4, 3), r"Convolution: in_channels must be an integer >= 1, got 0"),
        (lambda: Convolution(1, 4, 3, padding=-1), r"Convolution: padding must be an integer >= 0"),
        (lambda: Convolution(1, 4, 3, algorithm="winograd"), r"algorithm must be one of auto, gemm, signal"),
        (lambda: MaxPool(0), r"MaxPool: pool_size must be an integer >= 1"),
        (lambda: FullyConnected(3, 0), r"FullyConnected: out_features must be an integer >= 1"),
    ],
)
def test_bad_constructor_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_parameters_are_created_in_the_backend_dtype_from_the_same_host_draw():
    w32 = Convolution(2, 3, 3, rng=11, backend=get_backend("cpu")).params["weight"].data
    w64 = Convolution(2, 3, 3, rng=11, backend=CPU64).params["weight"].data
    assert w32.dtype == numpy.float32 and w64.dtype == numpy.float64
    numpy.testing.assert_array_equal(w32, w64.astype(numpy.float32))
