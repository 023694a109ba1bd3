"""Layers: gradients against central differences (float64), reference values, and bad-input errors."""

from __future__ import annotations

import math

import numpy
import pytest

from cnn_backend import (
    AvgPool,
    BatchNorm,
    GELU,
    GlobalAvgPool,
    LeakyReLU,
    Residual,
    Sigmoid,
    Tanh,
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
from cnn_backend.backend import cpu_backend
from cnn_backend.gradcheck import check_layer_gradients, numerical_gradient
from cnn_backend.testing import standin_backend

CPU64 = get_backend("cpu", dtype="float64")


@pytest.mark.parametrize("algorithm", ["gemm", "signal"])
@pytest.mark.parametrize(
    "in_channels, out_channels, kernel, stride, padding, size",
    [(1, 1, 3, 1, 0, 6), (2, 3, 3, 1, 1, 5), (3, 2, 2, 2, 0, 7), (2, 2, 3, 2, 1, 6), (1, 2, 1, 1, 0, 4)],
)
def test_convolution_gradients(algorithm, in_channels, out_channels, kernel, stride, padding, size):
    rng = numpy.random.default_rng(0)
    layer = Convolution(in_channels, out_channels, kernel, stride, padding, algorithm=algorithm, rng=1, backend=CPU64)
    layer.params["bias"].data[:] = rng.standard_normal(out_channels)
    check_layer_gradients(layer, x=rng.standard_normal((2, in_channels, size, size + 1)))


def test_relu_gradient_and_values():
    rng = numpy.random.default_rng(1)
    layer = ReLU(CPU64)
    # Keep inputs away from the kink at 0, where the derivative is undefined.
    x = rng.uniform(0.1, 1.0, (3, 4)) * rng.choice([-1.0, 1.0], (3, 4))
    numpy.testing.assert_array_equal(layer.forward(x), numpy.maximum(x, 0))
    check_layer_gradients(layer, x=x)


@pytest.mark.parametrize(
    "be", [cpu_backend("float64", parallel=False), CPU64, standin_backend("float64")], ids=["plain", "threads", "standin"]
)
def test_relu_in_evaluation_keeps_no_mask_and_still_has_its_gradient(be):
    rng = numpy.random.default_rng(1)
    x = rng.uniform(0.1, 1.0, (3, 4, 2, 2)) * rng.choice([-1.0, 1.0], (3, 4, 2, 2))
    dy = rng.standard_normal(x.shape)
    layer = ReLU(be)
    layer.training = False
    y = layer.forward(be.to_device(x))
    assert layer._positive is None and layer._output is y  # no mask computed: the output stands in for it
    numpy.testing.assert_array_equal(be.to_numpy(y), numpy.maximum(x, 0))
    numpy.testing.assert_array_equal(be.to_numpy(layer.backward(be.to_device(dy))), dy * (x > 0))


def tie_free(rng, shape):
    """A shuffled linspace: no two values tie, so the max-pool winner is unambiguous."""
    return rng.permutation(numpy.linspace(-1.0, 1.0, int(numpy.prod(shape)))).reshape(shape)


@pytest.mark.parametrize("pool, stride, size", [(2, None, 6), (2, None, 7), (3, 2, 7), (2, 1, 5), (3, None, 9)])
def test_maxpool_gradients(pool, stride, size):
    rng = numpy.random.default_rng(2)
    layer = MaxPool(pool, stride, backend=CPU64)
    check_layer_gradients(layer, x=tie_free(rng, (2, 3, size, size)))


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


@pytest.mark.parametrize("pool, stride", [(2, 2), (3, 2)], ids=["2x2", "overlapping"])
def test_maxpool_backward_after_an_evaluation_forward_is_the_training_one(pool, stride):
    # Evaluation records no winners; backward finds them again from the kept input.
    x = numpy.random.default_rng(2).standard_normal((2, 3, 7, 7))
    gradients = []
    for training in (True, False):
        layer = MaxPool(pool, stride, backend=CPU64)
        layer.training = training
        y = layer.forward(x)
        gradients.append(layer.backward(numpy.arange(y.size, dtype=float).reshape(y.shape)))
    numpy.testing.assert_array_equal(gradients[1], gradients[0])
    with pytest.raises(RuntimeError, match=r"backward needs a forward pass first"):
        layer.backward(numpy.ones_like(y))


def test_flatten_round_trip():
    rng = numpy.random.default_rng(4)
    layer = Flatten(CPU64)
    x = rng.standard_normal((2, 3, 2, 2))
    assert layer.forward(x).shape == (2, 12)
    check_layer_gradients(layer, x=x)


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
    check_layer_gradients(layer, x=x)


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
    check_layer_gradients(layer, x=x)


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


def test_label_smoothing_matches_a_hand_computed_value():
    # logits (0, ln 2, ln 5) give probabilities (1/8, 2/8, 5/8); with label 0 and smoothing 0.3 over
    # 3 classes the target is (0.8, 0.1, 0.1), so the loss is -(0.8 ln 1/8 + 0.1 ln 2/8 + 0.1 ln 5/8).
    logits = numpy.array([[0.0, math.log(2.0), math.log(5.0)]])
    loss_fn = SoftmaxCrossEntropy(CPU64, label_smoothing=0.3)
    expected = -(0.8 * math.log(1 / 8) + 0.1 * math.log(2 / 8) + 0.1 * math.log(5 / 8))
    assert float(loss_fn.forward(logits, numpy.array([0]))) == pytest.approx(expected, rel=1e-12)
    numpy.testing.assert_allclose(loss_fn.backward(), [[1 / 8 - 0.8, 2 / 8 - 0.1, 5 / 8 - 0.1]], rtol=1e-12)


def test_label_smoothing_agrees_with_torch():
    torch = pytest.importorskip("torch")
    rng = numpy.random.default_rng(3)
    logits = rng.standard_normal((7, 10)) * 2
    labels = rng.integers(0, 10, size=7)
    loss_fn = SoftmaxCrossEntropy(CPU64, label_smoothing=0.1)
    loss = float(loss_fn.forward(logits, labels))
    reference = torch.tensor(logits, requires_grad=True)
    torch_loss = torch.nn.functional.cross_entropy(reference, torch.tensor(labels), label_smoothing=0.1)
    torch_loss.backward()
    assert loss == pytest.approx(torch_loss.item(), rel=1e-12)
    numpy.testing.assert_allclose(loss_fn.backward(), reference.grad.numpy(), rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, "0.1", True, float("nan")])
def test_label_smoothing_outside_0_1_is_refused(value):
    with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0, 1\), got"):
        SoftmaxCrossEntropy(CPU64, label_smoothing=value)


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
    with pytest.raises(ShapeError, match=r"got \(2, 3\); the loss takes class indices: pass targets.argmax\(axis=1\) for one-hot"):
        loss_fn.forward(numpy.zeros((2, 3)), numpy.eye(3, dtype=numpy.int64)[[0, 2]])


def test_host_labels_are_sent_to_a_device_model():
    device = standin_backend("float64")
    logits = device.to_device(numpy.array([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]]))
    on_device = SoftmaxCrossEntropy(device).forward(logits, numpy.array([0, 2]))
    on_host = SoftmaxCrossEntropy(CPU64).forward(numpy.array([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]]), numpy.array([0, 2]))
    assert float(device.to_numpy(on_device)) == pytest.approx(float(on_host))


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


# == layers for users' own networks =====================================================================


def all_layouts_of(x):
    """``x`` in every memory order the layers meet: 4-D as :func:`layouts_of`, 2-D as rows or the
    transposed view of a (features, N) array (what Flatten and GlobalAvgPool hand on)."""
    if x.ndim == 4:
        return layouts_of(x)
    return {"rows": x.copy(), "transposed": numpy.ascontiguousarray(x.T).T}


NEW_LAYER_CASES = {
    # name -> (factory on a backend, input shape, input generator)
    "conv-gemm-no-bias": (lambda be: Convolution(2, 3, 3, padding=1, bias=False, algorithm="gemm", rng=1, backend=be), (2, 2, 5, 6), "normal"),
    "conv-signal-no-bias": (lambda be: Convolution(2, 3, 3, stride=2, bias=False, algorithm="signal", rng=1, backend=be), (2, 2, 7, 6), "normal"),
    "batchnorm-4d": (lambda be: BatchNorm(3, backend=be), (4, 3, 3, 2), "normal"),
    "batchnorm-2d": (lambda be: BatchNorm(5, backend=be), (6, 5), "normal"),
    "avgpool-2": (lambda be: AvgPool(2, backend=be), (2, 3, 5, 6), "normal"),
    "avgpool-3-stride2-overlapping": (lambda be: AvgPool(3, 2, backend=be), (2, 2, 7, 7), "normal"),
    "avgpool-2-stride1": (lambda be: AvgPool(2, 1, backend=be), (2, 2, 4, 5), "normal"),
    "global-avgpool": (lambda be: GlobalAvgPool(be), (3, 4, 3, 2), "normal"),
    "leaky-relu": (lambda be: LeakyReLU(0.1, backend=be), (3, 2, 3, 3), "away-from-zero"),
    "tanh": (lambda be: Tanh(be), (3, 2, 3, 3), "normal"),
    "sigmoid": (lambda be: Sigmoid(be), (3, 2, 3, 3), "normal"),
    "gelu": (lambda be: GELU(be), (3, 7), "normal"),
    "residual-identity": (
        lambda be: built(Residual([Convolution(out_channels=3, kernel_size=3, padding=1, backend=be), BatchNorm(backend=be), Tanh(be)]), (3, 5, 5)),
        (3, 3, 5, 5),
        "normal",
    ),
    "residual-projection-stride2": (
        lambda be: built(Residual([Convolution(out_channels=4, kernel_size=3, stride=2, padding=1, backend=be), GELU(be)]), (2, 5, 6)),
        (2, 2, 5, 6),
        "normal",
    ),
}


def built(layer, input_shape, seed=3):
    layer.build(input_shape, numpy.random.default_rng(seed))
    return layer


def make_input(kind, shape, rng):
    x = rng.standard_normal(shape)
    if kind == "away-from-zero":  # keep clear of the kink at 0
        x = rng.uniform(0.1, 1.0, shape) * rng.choice([-1.0, 1.0], shape)
    return x


@pytest.mark.parametrize("case", sorted(NEW_LAYER_CASES))
def test_new_layer_gradients_in_every_layout(case):
    make, shape, kind = NEW_LAYER_CASES[case]
    rng = numpy.random.default_rng(11)
    x_host = make_input(kind, shape, rng)
    layer = make(CPU64)
    for param in layer.parameters() if hasattr(layer, "parameters") else [p for _, p in layer.named_parameters()]:
        param.data[...] = param.data + 0.3 * rng.standard_normal(param.data.shape)  # not the trivial 1/0 start
    reference = None
    for layout, x in all_layouts_of(x_host).items():
        y = layer.forward(x)
        assert y.shape == layer.forward(x_host.copy()).shape
        if reference is None:
            reference = layer.forward(x_host.copy())
        numpy.testing.assert_allclose(layer.forward(x), reference, rtol=1e-12, atol=1e-12, err_msg=layout)
        check_layer_gradients(layer, x=x)


def test_new_layers_have_parameters_only_where_expected():
    assert sorted(Convolution(2, 3, 3, bias=False).params) == ["weight"]
    assert sorted(Convolution(2, 3, 3).params) == ["bias", "weight"]
    bn = BatchNorm(4)
    assert sorted(bn.params) == ["bias", "weight"] and sorted(bn.buffers) == ["running_mean", "running_var"]
    numpy.testing.assert_array_equal(bn.params["weight"].data, numpy.ones(4))
    numpy.testing.assert_array_equal(bn.buffers["running_var"], numpy.ones(4))
    for layer in (AvgPool(2), GlobalAvgPool(), LeakyReLU(), Tanh(), Sigmoid(), GELU()):
        assert layer.params == {} and layer.buffers == {}


def test_convolution_without_bias_is_the_biased_one_at_zero_bias():
    rng = numpy.random.default_rng(12)
    x = rng.standard_normal((2, 2, 6, 6))
    for algorithm in ("gemm", "signal"):
        with_bias = Convolution(2, 3, 3, padding=1, algorithm=algorithm, rng=5, backend=CPU64)
        without = Convolution(2, 3, 3, padding=1, bias=False, algorithm=algorithm, rng=5, backend=CPU64)
        numpy.testing.assert_allclose(without.forward(x), with_bias.forward(x), rtol=1e-12, atol=1e-12)


# -- BatchNorm against hand-computed statistics ----------------------------------------------------------


def test_batchnorm_training_and_running_statistics_match_a_hand_computation():
    rng = numpy.random.default_rng(13)
    layer = BatchNorm(3, backend=CPU64)
    layer.params["weight"].data[:] = [0.5, 2.0, -1.0]
    layer.params["bias"].data[:] = [0.1, -0.2, 0.3]
    running_mean, running_var = numpy.zeros(3), numpy.ones(3)
    for step in range(4):
        x = rng.standard_normal((5, 3, 2, 3)) * (step + 1) + step
        values = x.transpose(1, 0, 2, 3).reshape(3, -1)  # per channel over N, H, W: 30 values
        mean = values.sum(axis=1) / 30
        biased = ((values - mean[:, None]) ** 2).sum(axis=1) / 30
        unbiased = ((values - mean[:, None]) ** 2).sum(axis=1) / 29
        expected = (x - mean[None, :, None, None]) / numpy.sqrt(biased[None, :, None, None] + 1e-5)
        expected = expected * layer.params["weight"].data[None, :, None, None] + layer.params["bias"].data[None, :, None, None]
        numpy.testing.assert_allclose(layer.forward(x), expected, rtol=1e-12, atol=1e-12)
        running_mean = 0.9 * running_mean + 0.1 * mean
        running_var = 0.9 * running_var + 0.1 * unbiased
        numpy.testing.assert_allclose(layer.buffers["running_mean"], running_mean, rtol=1e-12)
        numpy.testing.assert_allclose(layer.buffers["running_var"], running_var, rtol=1e-12)

    layer.training = False
    x = rng.standard_normal((1, 3, 2, 2))  # a batch of one works in evaluation
    expected = (x - running_mean[None, :, None, None]) / numpy.sqrt(running_var[None, :, None, None] + 1e-5)
    expected = expected * layer.params["weight"].data[None, :, None, None] + layer.params["bias"].data[None, :, None, None]
    numpy.testing.assert_allclose(layer.forward(x), expected, rtol=1e-12, atol=1e-12)
    before = layer.buffers["running_mean"].copy()
    layer.forward(x)
    numpy.testing.assert_array_equal(layer.buffers["running_mean"], before)  # evaluation leaves them alone


def test_batchnorm_per_feature_on_dense_input_and_evaluation_gradients():
    rng = numpy.random.default_rng(14)
    layer = BatchNorm(4, momentum=0.3, eps=1e-3, backend=CPU64)
    x = rng.standard_normal((6, 4)) * 3 + 1
    mean, biased, unbiased = x.mean(axis=0), x.var(axis=0), x.var(axis=0, ddof=1)
    numpy.testing.assert_allclose(layer.forward(x), (x - mean) / numpy.sqrt(biased + 1e-3), rtol=1e-12, atol=1e-12)
    numpy.testing.assert_allclose(layer.buffers["running_mean"], 0.3 * mean, rtol=1e-12)
    numpy.testing.assert_allclose(layer.buffers["running_var"], 0.7 + 0.3 * unbiased, rtol=1e-12)
    layer.training = False
    check_layer_gradients(layer, x=rng.standard_normal((3, 4)))
    check_layer_gradients(layer, x=rng.standard_normal((1, 4)))


def test_batchnorm_in_training_refuses_one_value_per_channel():
    with pytest.raises(ShapeError, match=r"training needs more than one value per channel"):
        BatchNorm(3, backend=CPU64).forward(numpy.zeros((1, 3)))


# -- the same numbers as PyTorch ------------------------------------------------------------------------


def test_new_layers_match_pytorch():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: the cross-check against it is skipped")
    rng = numpy.random.default_rng(15)
    x = rng.standard_normal((4, 3, 6, 5))
    t = torch.tensor(x)
    pairs = [
        (AvgPool(2, backend=CPU64), torch.nn.AvgPool2d(2)),
        (AvgPool(3, 2, backend=CPU64), torch.nn.AvgPool2d(3, 2)),
        (GlobalAvgPool(CPU64), lambda v: v.mean(dim=(2, 3))),
        (LeakyReLU(0.2, backend=CPU64), torch.nn.LeakyReLU(0.2)),
        (Tanh(CPU64), torch.tanh),
        (Sigmoid(CPU64), torch.sigmoid),
        (GELU(CPU64), torch.nn.GELU(approximate="tanh")),
    ]
    for ours, theirs in pairs:
        numpy.testing.assert_allclose(ours.forward(x), theirs(t).numpy(), rtol=1e-12, atol=1e-12, err_msg=repr(ours))
    ours, theirs = BatchNorm(3, backend=CPU64), torch.nn.BatchNorm2d(3).double()
    for step in range(3):
        batch = rng.standard_normal((4, 3, 3, 3)) * (step + 1)
        numpy.testing.assert_allclose(ours.forward(batch), theirs(torch.tensor(batch)).detach().numpy(), rtol=1e-10, atol=1e-12)
    numpy.testing.assert_allclose(ours.buffers["running_mean"], theirs.running_mean.numpy(), rtol=1e-12)
    numpy.testing.assert_allclose(ours.buffers["running_var"], theirs.running_var.numpy(), rtol=1e-12)
    ours.training = False
    theirs.eval()
    one = rng.standard_normal((1, 3, 3, 3))
    numpy.testing.assert_allclose(ours.forward(one), theirs(torch.tensor(one)).detach().numpy(), rtol=1e-10, atol=1e-12)


# -- build: shapes inferred, parameters from the generator in layer order ---------------------------------


def test_build_infers_input_sizes_and_draws_like_explicit_sizes():
    conv = Convolution(out_channels=4, kernel_size=3, stride=2, padding=1, backend=CPU64)
    assert conv.params == {}
    assert conv.build((2, 9, 8), numpy.random.default_rng(7)) == (4, 5, 4)
    explicit = Convolution(2, 4, 3, stride=2, padding=1, rng=7, backend=CPU64)
    numpy.testing.assert_array_equal(conv.params["weight"].data, explicit.params["weight"].data)
    assert conv.macs() == 4 * 5 * 4 * 2 * 3 * 3
    dense = FullyConnected(out_features=3, backend=CPU64)
    assert dense.build((12,), numpy.random.default_rng(8)) == (3,) and dense.in_features == 12
    assert BatchNorm(backend=CPU64).build((5, 2, 2)) == (5, 2, 2)
    assert AvgPool(3, 2).build((2, 7, 8)) == (2, 3, 3)
    assert GlobalAvgPool().build((6, 4, 4)) == (6,)
    assert Flatten().build((2, 3, 4)) == (24,)


@pytest.mark.parametrize(
    "layer, shape, message",
    [
        (lambda: Convolution(out_channels=2, kernel_size=5), (1, 4, 9), r"kernel 5x5 is larger than its input 4x9"),
        (lambda: Convolution(3, 2, 3), (1, 8, 8), r"expected 3 input channels"),
        (lambda: FullyConnected(out_features=2), (3, 4, 4), r"expected a flat per-sample input .* put a Flatten"),
        (lambda: MaxPool(3), (2, 2, 5), r"window 3x3 is larger than its input 2x5"),
        (lambda: GlobalAvgPool(), (12,), r"expected a per-sample input of shape \(C, H, W\)"),
        (lambda: Residual([Flatten()]), (2, 3, 3), r"no 1x1 projection of the input can match"),
        (lambda: Residual([Convolution(out_channels=2, kernel_size=3)]), (2, 6, 6), r"no 1x1 projection .* shrink by a whole stride"),
    ],
)
def test_build_refuses_shapes_that_cannot_work(layer, shape, message):
    with pytest.raises(ShapeError, match=message):
        layer().build(shape, numpy.random.default_rng(0))


def test_unbuilt_layers_say_what_to_do():
    with pytest.raises(ShapeError, match=r"in_channels is not known yet: build the layer"):
        Convolution(out_channels=2, kernel_size=3).forward(numpy.zeros((1, 1, 4, 4), numpy.float32))


def test_residual_projection_is_created_only_when_shapes_differ():
    same = built(Residual([Convolution(out_channels=3, kernel_size=3, padding=1)]), (3, 6, 6))
    assert same.projection is None
    down = built(Residual([Convolution(out_channels=5, kernel_size=3, stride=2, padding=1), ReLU()]), (3, 7, 7))
    assert isinstance(down.projection, Convolution)
    assert (down.projection.kernel_size, down.projection.stride, down.projection.bias) == (1, 2, False)
    assert (down.projection.in_channels, down.projection.out_channels) == (3, 5)
    assert down.output_shape == (5, 4, 4)
    assert [name for name, _ in down.named_parameters()] == ["layers.0.weight", "layers.0.bias", "projection.weight"]
    x = numpy.random.default_rng(1).standard_normal((2, 3, 7, 7)).astype(numpy.float32)
    inner = down.layers[1].forward(down.layers[0].forward(x))
    numpy.testing.assert_allclose(down.forward(x), inner + down.projection.forward(x), rtol=1e-6)


def test_residual_propagates_training_mode_and_moves_its_children():
    block = built(Residual([Convolution(out_channels=2, kernel_size=1), BatchNorm(), Dropout(0.5, rng=0)]), (3, 4, 4))
    block.training = False
    assert all(not layer.training for _, layer in block.children())
    block.to(CPU64)
    assert block.layers[1].buffers["running_var"].dtype == numpy.float64
    assert block.projection.params["weight"].data.dtype == numpy.float64


def test_to_moves_buffers_and_casts_them():
    bn = BatchNorm(3)
    bn.forward(numpy.random.default_rng(2).standard_normal((4, 3)).astype(numpy.float32))
    mean = bn.buffers["running_mean"].copy()
    bn.to(CPU64)
    assert bn.buffers["running_mean"].dtype == numpy.float64
    numpy.testing.assert_allclose(bn.buffers["running_mean"], mean, rtol=1e-7)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: BatchNorm(3, momentum=1.5), r"BatchNorm: momentum must be in \[0, 1\]"),
        (lambda: BatchNorm(3, eps=0.0), r"BatchNorm: eps must be a finite number > 0, got 0.0"),
        (lambda: AvgPool(0), r"AvgPool: pool_size must be an integer >= 1"),
        (lambda: LeakyReLU("x"), r"LeakyReLU: negative_slope must be a finite number, got 'x'"),
        (lambda: Residual([]), r"Residual needs at least one inner layer"),
        (lambda: Convolution(1, 2, 3, bias="no"), r"Convolution: bias must be true or false"),
    ],
)
def test_bad_arguments_of_the_new_layers(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_numpy_floats_are_accepted_as_numbers_and_text_is_refused():
    batchnorm, leaky = BatchNorm(3, momentum=numpy.float32(0.1), eps=numpy.float64(1e-5)), LeakyReLU(numpy.float32(0.2))
    assert type(batchnorm.momentum) is float and batchnorm.momentum == float(numpy.float32(0.1))
    assert type(leaky.negative_slope) is float and leaky.negative_slope == float(numpy.float32(0.2))
    assert Dropout(numpy.float32(0.25)).rate == 0.25
    with pytest.raises(ValueError, match=r"^BatchNorm: momentum must be a number in \[0, 1\], got '0.1'$"):
        BatchNorm(3, momentum="0.1")
    with pytest.raises(ValueError, match=r"^LeakyReLU: negative_slope must be a finite number, got '0.2'$"):
        LeakyReLU("0.2")


def test_a_residual_block_first_in_a_model_skips_its_input_gradient():
    from cnn_backend import Sequential

    block = Residual([Convolution(out_channels=4, kernel_size=3, stride=2, padding=1, backend=CPU64), ReLU(CPU64)])
    model = Sequential([block, Flatten(CPU64), FullyConnected(out_features=3, backend=CPU64)], input_shape=(2, 6, 6), rng=0)
    assert not block.layers[0].needs_input_grad and not block.projection.needs_input_grad
    y = model.forward(numpy.random.default_rng(0).standard_normal((2, 2, 6, 6)))
    assert model.backward(numpy.ones_like(y)) is None
    assert block.projection.params["weight"].grad is not None and block.layers[0].params["weight"].grad is not None


# -- a layer called on its own: its input checked and cast as a model's is --------------------------

_LAYERS_ON_THEIR_OWN = {
    "Convolution": lambda be: Convolution(out_channels=2, kernel_size=3, backend=be),
    "BatchNorm": lambda be: BatchNorm(backend=be),
    "MaxPool": lambda be: MaxPool(2, backend=be),
    "AvgPool": lambda be: AvgPool(2, backend=be),
    "Dropout": lambda be: Dropout(0.5, backend=be),
    "ReLU": lambda be: ReLU(backend=be),
    "LeakyReLU": lambda be: LeakyReLU(backend=be),
    "Tanh": lambda be: Tanh(backend=be),
    "Flatten": lambda be: Flatten(backend=be),
}


@pytest.mark.parametrize("name", sorted(_LAYERS_ON_THEIR_OWN))
@pytest.mark.parametrize("dtype", ["int64", "uint8", "bool"])
def test_a_layer_called_on_its_own_refuses_integer_input_in_one_line(name, dtype):
    layer = _LAYERS_ON_THEIR_OWN[name](cpu_backend("float32"))
    layer.build((3, 6, 6), 0)
    x = numpy.random.default_rng(0).integers(0, 3, (2, 3, 6, 6)).astype(dtype)
    # Before: a UFuncTypeError deep inside NumPy, or integer output passed on
    with pytest.raises(ShapeError, match=rf"^{name}: the input holds {dtype} values, not floats; pass images scaled to \[0, 1\]"):
        layer(x)


@pytest.mark.parametrize("name", ["ReLU", "MaxPool", "Convolution"])
def test_a_layer_called_on_its_own_refuses_complex_input_in_one_line(name):
    layer = _LAYERS_ON_THEIR_OWN[name](cpu_backend("float32"))
    layer.build((3, 6, 6), 0)
    with pytest.raises(ValueError, match=rf"^{name}: expected real numbers, got an array of dtype complex128; pass the images as numbers$"):
        layer(numpy.ones((2, 3, 6, 6), dtype=complex))


@pytest.mark.parametrize("name", sorted(_LAYERS_ON_THEIR_OWN))
@pytest.mark.parametrize("layer_dtype, given", [("float32", "float64"), ("float64", "float32"), ("float32", "float16")])
def test_a_layer_called_on_its_own_casts_float_input_to_its_dtype(name, layer_dtype, given):
    def run(x):
        layer = _LAYERS_ON_THEIR_OWN[name](cpu_backend(layer_dtype))
        layer.build((3, 6, 6), 0)  # the same weights, and Dropout's mask, from seed 0 each time
        return layer(x)

    x = numpy.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(given)
    out = run(x)
    assert out.dtype == layer_dtype  # not the input's dtype (float64 into a float32 layer)
    numpy.testing.assert_array_equal(out, run(x.astype(layer_dtype)))


def test_a_layer_called_with_input_in_its_dtype_gets_that_very_array_and_a_list_is_taken():
    from cnn_backend.layers import Layer

    class Seen(Layer):
        def forward(self, x):
            self.seen = x
            return x

    layer = Seen(backend=cpu_backend("float32"))
    x = numpy.ones((2, 3), dtype=numpy.float32)
    assert layer(x) is x  # no copy on the path whose dtype is right
    taken = layer([[1.0, 2.0], [3.0, 4.0]])
    assert taken.dtype == numpy.float32 and taken.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    with pytest.raises(ShapeError, match=r"^Seen: the input holds int64 values, not floats"):
        layer([[1, 2], [3, 4]])
    # On a device, a host array already in the layer's dtype is sent there too.
    device = standin_backend("float32")
    on_device = Seen(backend=device)(x)
    assert isinstance(on_device, device.xp.ndarray) and device.to_numpy(on_device).tolist() == x.tolist()
