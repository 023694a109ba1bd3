"""A BatchNorm and the ReLU after it, run as one operation (``Sequential`` fuses them on every
backend), give the values and gradients of the two layers run one after the other (float64)."""

from __future__ import annotations

import numpy
import pytest

from cnn_backend import functional as F
from cnn_backend.backend import cpu_backend
from cnn_backend.layers import BatchNorm, Flatten, FullyConnected, LeakyReLU, ReLU
from cnn_backend.model import Sequential
from cnn_backend.testing import standin_backend

BACKENDS = [cpu_backend("float64", parallel=False), cpu_backend("float64"), standin_backend("float64")]
IDS = ["plain", "threads", "standin"]


def pair(be, features):
    """A BatchNorm with non-trivial (seeded) weights and running statistics, and a ReLU."""
    rng = numpy.random.default_rng(0)
    norm = BatchNorm(features, backend=be)
    norm.params["weight"].data[...] = be.to_device(rng.uniform(0.5, 1.5, features))
    norm.params["bias"].data[...] = be.to_device(rng.standard_normal(features) * 0.3)
    norm.buffers["running_mean"][...] = be.to_device(rng.standard_normal(features) * 0.2)
    norm.buffers["running_var"][...] = be.to_device(rng.uniform(0.5, 2.0, features))
    return norm, ReLU(be)


@pytest.mark.parametrize("be", BACKENDS, ids=IDS)
@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
@pytest.mark.parametrize("shape", [(6, 3, 5, 4), (9, 7)], ids=["4-d", "2-d"])
def test_values_and_gradients_match_the_two_layers(be, training, shape):
    rng = numpy.random.default_rng(1)
    x = be.to_device(rng.standard_normal(shape))
    dy = be.to_device(rng.standard_normal(shape))
    results = []
    for fused in (True, False):
        norm, relu = pair(be, shape[1])
        norm.training = relu.training = training
        if fused:
            y = norm.forward_relu(x)
            relu.applied_by_previous()
        else:
            y = relu.forward(norm.forward(x))
        dx = norm.backward(relu.backward(dy))
        results.append([y, dx, norm.params["weight"].grad, norm.params["bias"].grad, *norm.buffers.values()])
    assert float(be.to_numpy(results[0][0]).min()) == 0.0  # some values were rectified
    for fused_value, separate_value in zip(*results):
        numpy.testing.assert_allclose(be.to_numpy(fused_value), be.to_numpy(separate_value), rtol=1e-13, atol=1e-14)


def test_the_functional_mask_is_the_relu_mask():
    be = cpu_backend("float64", parallel=False)
    rows = numpy.random.default_rng(2).standard_normal((4, 30))
    weight, bias = numpy.ones(4), numpy.array([0.0, 0.5, -0.5, 2.0])
    positive = numpy.empty_like(rows)
    y = F.batch_norm_forward(be, rows, weight, bias, 1e-5, positive)[0]
    plain = F.batch_norm_forward(be, rows, weight, bias, 1e-5)[0]
    numpy.testing.assert_array_equal(y, numpy.maximum(plain, 0.0))
    numpy.testing.assert_array_equal(positive, (plain > 0).astype(rows.dtype))


@pytest.mark.parametrize("be", BACKENDS, ids=IDS)
def test_in_evaluation_no_mask_is_kept_and_the_gradient_is_the_affine_one_where_positive(be):
    rng = numpy.random.default_rng(4)
    x, dy = rng.standard_normal((6, 3, 5, 4)), rng.standard_normal((6, 3, 5, 4))
    norm, _ = pair(be, 3)
    norm.training = False
    y = be.to_numpy(norm.forward_relu(be.to_device(x)))
    kept_output = norm._cache[-1]
    assert kept_output.shape == (3, 6 * 5 * 4) and kept_output.dtype == x.dtype  # the output's rows, no mask
    statistics = (norm.params["weight"].data, norm.params["bias"].data, norm.buffers["running_mean"], norm.buffers["running_var"])
    weight, bias, mean, var = (be.to_numpy(a)[None, :, None, None] for a in statistics)
    affine = (x - mean) / numpy.sqrt(var + norm.eps) * weight + bias
    assert 0 < (affine > 0).mean() < 1
    numpy.testing.assert_allclose(y, numpy.maximum(affine, 0), rtol=1e-13, atol=1e-14)
    dx = be.to_numpy(norm.backward(be.to_device(dy)))
    numpy.testing.assert_allclose(dx, dy * (affine > 0) * weight / numpy.sqrt(var + norm.eps), rtol=1e-13, atol=1e-14)


def model(be, activation):
    return Sequential([Flatten(), FullyConnected(out_features=8), BatchNorm(), activation, FullyConnected(out_features=3)], be, input_shape=(1, 4, 4), rng=0)


@pytest.mark.parametrize("be", BACKENDS, ids=IDS)
def test_a_model_fuses_a_batchnorm_and_its_relu_and_trains_the_same(be):
    rng = numpy.random.default_rng(3)
    x = rng.standard_normal((5, 1, 4, 4))
    fused, separate = model(be, ReLU(be)), model(be, ReLU(be))
    logits = fused.forward(be.to_device(x))
    assert fused.layers[3]._positive is ReLU.APPLIED_BY_PREVIOUS
    grad = be.to_device(rng.standard_normal((5, 3)))
    fused.backward(grad)
    # The same logits and gradients as the layers of the same network run one by one.
    layer_by_layer = be.to_device(x)
    for layer in separate.layers:
        layer_by_layer = layer.forward(layer_by_layer)
    numpy.testing.assert_allclose(be.to_numpy(logits), be.to_numpy(layer_by_layer), rtol=1e-13)
    back = grad
    for layer in reversed(separate.layers):
        back = layer.backward(back)
    for (name, a), (_, b) in zip(fused.named_parameters(), separate.named_parameters()):
        numpy.testing.assert_allclose(be.to_numpy(a.grad), be.to_numpy(b.grad), rtol=1e-12, atol=1e-14, err_msg=name)


def test_other_activations_after_a_batchnorm_run_on_their_own():
    be = cpu_backend("float64")
    net = model(be, LeakyReLU(0.1))
    net.forward(numpy.random.default_rng(4).standard_normal((5, 1, 4, 4)))
    assert net.layers[3]._slope is not None  # LeakyReLU's own forward ran


def test_the_fusion_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(Sequential, "fuses_batchnorm_relu", False)
    be = cpu_backend("float64")
    net = model(be, ReLU(be))
    net.forward(numpy.random.default_rng(5).standard_normal((5, 1, 4, 4)))
    assert isinstance(net.layers[3]._positive, numpy.ndarray)  # the ReLU layer ran itself
