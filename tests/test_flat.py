"""The flat parameter buffer: parameters and gradients as views of one array each, and optimisers
updating it whole, with exactly the results of the per-parameter updates."""

from __future__ import annotations

import numpy
import pytest

from cnn_backend import SGD, Adam, Sequential, get_backend
from cnn_backend.layers import FullyConnected, ReLU, SoftmaxCrossEntropy
from cnn_backend.model import plain_cnn, seed_cnn
from cnn_backend.parameters import ALIGNMENT_BYTES, FlatParameters, Parameter, flat_layout, shared_flat_buffer
from cnn_backend.testing import DeviceArray, standin_backend
from cnn_backend.training import train_step

CPU64 = get_backend("cpu", "float64")


def host(array):
    """The NumPy memory behind a CPU or stand-in array (no copy), to check views."""
    return array._host if isinstance(array, DeviceArray) else array


def batch(n=8, seed=0):
    rng = numpy.random.default_rng(seed)
    return rng.random((n, 1, 28, 28)), rng.integers(0, 10, size=n)


def own_parameters(model: Sequential) -> list[Parameter]:
    """The model's parameters as they are (``model.parameters()`` would put them back in a flat buffer)."""
    return [param for _, param in model.named_parameters()]


def unflattened(model: Sequential) -> Sequential:
    """The same model with every parameter given its own storage again (the per-parameter path)."""
    for param in own_parameters(model):
        param.detach_from_flat()
    assert shared_flat_buffer(own_parameters(model)) is None
    return model


@pytest.mark.parametrize("backend", [get_backend("cpu"), standin_backend("float64")], ids=["cpu", "standin"])
@pytest.mark.parametrize("build", [seed_cnn, plain_cnn])
def test_parameters_and_gradients_are_views_of_the_flat_arrays_in_order(backend, build):
    model = build(backend, seed=0)
    x, y = batch()
    train_step(model, SoftmaxCrossEntropy(backend), SGD(model.parameters(), lr=0.1, backend=backend), x, backend.to_device(y))
    flat_data, flat_grad = host(model.flat_data), host(model.flat_grad)
    assert flat_data.ndim == flat_grad.ndim == 1 and flat_data.flags.c_contiguous and flat_grad.flags.c_contiguous
    assert flat_data.dtype == backend.dtype
    offsets = model.flat_parameters.offsets
    assert offsets == sorted(offsets)
    for param, offset in zip(model.parameters(), offsets):
        size = param.data.size
        assert offset * flat_data.itemsize % ALIGNMENT_BYTES == 0
        for array, flat in ((param.data, flat_data), (param.grad, flat_grad)):
            assert numpy.shares_memory(host(array), flat)
            numpy.testing.assert_array_equal(host(array).ravel(), flat[offset : offset + size])
    # The padding between parameters is zero in both arrays (and so stays zero under every update).
    covered = numpy.zeros(flat_data.size, dtype=bool)
    for param, offset in zip(model.parameters(), offsets):
        covered[offset : offset + param.data.size] = True
    assert not flat_data[~covered].any() and not flat_grad[~covered].any()


def test_layout_aligns_each_parameter():
    assert flat_layout([(3,), (2, 2), (1,)], 4) == ([0, 64, 128], 129)
    assert flat_layout([(32,), (1,)], 8) == ([0, 32], 33)


def test_parameters_puts_detached_parameters_back_in_a_buffer():
    # So an optimiser built from model.parameters() always gets the flat path.
    model = unflattened(seed_cnn("cpu", seed=0))
    params = model.parameters()
    assert shared_flat_buffer(params) is model.flat_parameters
    assert SGD(params, lr=0.1, backend=model.backend)._flat is model.flat_parameters


def test_flatten_is_idempotent_and_the_arrays_stay_the_same():
    model = seed_cnn("cpu", seed=0)
    data, grad = model.flat_data, model.flat_grad
    model.flatten_parameters()
    assert model.flat_data is data and model.flat_grad is grad


def test_gradients_are_written_in_place_and_match_the_unflattened_model():
    flat_model, plain_model = plain_cnn(CPU64, seed=1), unflattened(plain_cnn(CPU64, seed=1))
    x, y = batch()
    grads = []
    for model in (flat_model, plain_model):
        loss = SoftmaxCrossEntropy(CPU64)
        loss.forward(model.forward(x), y)
        model.backward(loss.backward())
        grads.append([p.grad for p in own_parameters(model)])
    for flat_grad, plain_grad in zip(*grads):
        assert numpy.shares_memory(flat_grad, flat_model.flat_grad)
        numpy.testing.assert_array_equal(flat_grad, plain_grad)


def test_assigning_data_or_grad_copies_into_the_views():
    model = seed_cnn("cpu", seed=0)
    weight = model.layers[0].params["weight"]
    view = weight.data
    weight.data = numpy.full(view.shape, 2.0, dtype=numpy.float32)
    assert weight.data is view and (model.flat_data[: view.size] == 2.0).all()
    weight.data -= 1.0  # in place, then assigned back: no copy
    assert weight.data is view and (model.flat_data[: view.size] == 1.0).all()
    assert weight.grad is None
    weight.grad = numpy.ones(view.shape, dtype=numpy.float32)
    assert numpy.shares_memory(weight.grad, model.flat_grad) and (model.flat_grad[: view.size] == 1.0).all()
    with pytest.raises(ValueError, match=r"parameter data of shape \(3,\) does not fit the parameter's shape \(1, 1, 6, 6\)"):
        weight.data = numpy.zeros(3, dtype=numpy.float32)
    # Of another dtype the parameter would leave the buffer (it is moving): its shape still holds.
    with pytest.raises(ValueError, match=r"parameter data of shape \(5, 5\) does not fit the parameter's shape \(1, 1, 6, 6\)"):
        weight.data = numpy.zeros((5, 5))
    assert weight.flat is not None and weight.data is view
    with pytest.raises(ValueError, match=r"parameter gradient of shape \(2, 2\) does not fit"):
        weight.grad = numpy.zeros((2, 2))
    weight.grad = None
    assert weight.grad is None


def test_load_state_dict_and_to_keep_the_buffer_current():
    source, model = plain_cnn("cpu", seed=5), plain_cnn("cpu", seed=0)
    data = model.flat_data
    model.load_state_dict(source.state_dict())
    assert model.flat_data is data
    numpy.testing.assert_array_equal(model.flat_data, source.flat_data)

    standin = standin_backend("float64")
    model.to(standin)
    assert isinstance(model.flat_data, DeviceArray) and model.flat_data.dtype == numpy.float64
    for (name, param), (_, original) in zip(model.named_parameters(), source.named_parameters()):
        assert numpy.shares_memory(host(param.data), host(model.flat_data)), name
        numpy.testing.assert_array_equal(param.data.get(), original.data)
    assert model.flat_data is not data


def test_data_of_another_dtype_or_device_moves_the_parameter_out_of_the_buffer():
    model = seed_cnn("cpu", seed=0)
    optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9, backend=model.backend)
    old = model.flat_parameters
    weight = model.layers[0].params["weight"]
    weight.data = numpy.ones(weight.data.shape)  # float64 into a float32 model
    assert not old.valid and weight.flat is None and weight.data.dtype == numpy.float64
    assert optimizer._current_flat() is None
    # Reading the flat arrays rebuilds the buffer (in the model's dtype, values kept); the
    # optimiser follows it, since its layout is unchanged.
    assert model.flat_data.dtype == numpy.float32 and weight.flat is model.flat_parameters
    assert (weight.data == 1.0).all() and numpy.shares_memory(weight.data, model.flat_data)
    assert optimizer._current_flat() is model.flat_parameters


def test_a_moved_layer_leaves_the_buffer_and_the_model_rebuilds_it():
    model = seed_cnn("cpu", seed=0)
    old = model.flat_parameters
    model.layers[0].to(get_backend("cpu", "float64"))
    assert not old.valid
    model.backend = get_backend("cpu", "float64")
    for layer in model.layers:
        layer.to(model.backend)
    model.flatten_parameters()
    assert model.flat_parameters is not old and model.flat_data.dtype == numpy.float64


def test_shared_parameters_are_refused():
    param = Parameter(numpy.zeros(3))
    with pytest.raises(ValueError, match="a parameter appears twice"):
        FlatParameters([param, param], CPU64)


# -- optimisers over the flat buffer --------------------------------------------------------------

OPTIMISERS = {
    "sgd": lambda ps, be: SGD(ps, lr=0.05, backend=be),
    "momentum+decay": lambda ps, be: SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3, backend=be),
    "nesterov": lambda ps, be: SGD(ps, lr=0.05, momentum=0.9, nesterov=True, backend=be),
    "nesterov+decay": lambda ps, be: SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, backend=be),
    "adam": lambda ps, be: Adam(ps, lr=1e-3, backend=be),
    "adamw": lambda ps, be: Adam(ps, lr=1e-3, weight_decay=0.05, backend=be),
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(OPTIMISERS))
def test_flat_updates_equal_per_parameter_updates(name, dtype):
    # Every operation is element-wise, so updating the flat arrays must give the per-parameter
    # results bit for bit, in either dtype.
    be = get_backend("cpu", dtype)
    runs = []
    for model in (plain_cnn(be, seed=2), unflattened(plain_cnn(be, seed=2))):
        optimizer = OPTIMISERS[name](own_parameters(model), be)
        for step in range(3):
            x, y = batch(seed=step)
            train_step(model, SoftmaxCrossEntropy(be), optimizer, x, y)
        runs.append((model, optimizer))
    (flat_model, flat_opt), (plain_model, plain_opt) = runs
    assert flat_opt._flat is not None and plain_opt._flat is None
    for flat_param, plain_param in zip(own_parameters(flat_model), own_parameters(plain_model)):
        numpy.testing.assert_array_equal(flat_param.data, plain_param.data)
    assert flat_opt.state_dict().keys() == plain_opt.state_dict().keys()
    for key, value in flat_opt.state_dict().items():
        numpy.testing.assert_array_equal(value, plain_opt.state_dict()[key], err_msg=key)


@pytest.mark.parametrize("name", ["momentum+decay", "adamw"])
def test_flat_update_matches_a_hand_computed_step(name):
    # Two parameters, one flat buffer, float64: the updates of the formulas in the docstrings.
    layer = FullyConnected(2, 1, rng=0, backend=CPU64)
    model = Sequential([layer], CPU64)
    w0, b0 = layer.params["weight"].data.copy(), numpy.array([0.25])
    layer.params["bias"].data = b0
    optimizer = OPTIMISERS[name](model.parameters(), CPU64)
    g_w, g_b = numpy.array([[0.5], [-1.5]]), numpy.array([2.0])
    layer.params["weight"].grad, layer.params["bias"].grad = g_w, g_b
    optimizer.step()
    for w, g, param in ((w0, g_w, layer.params["weight"]), (b0, g_b, layer.params["bias"])):
        if name == "adamw":
            m, v = 0.1 * g, 0.001 * g * g
            expected = w - 1e-3 * 0.05 * w - 1e-3 * (m / 0.1) / (numpy.sqrt(v / 0.001) + 1e-8)
        else:
            expected = w - 0.05 * (g + 1e-3 * w)
        numpy.testing.assert_allclose(param.data, expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("name", ["momentum+decay", "adam"])
def test_a_parameter_without_gradient_is_skipped_as_before(name):
    # A None gradient leaves the parameter and its state untouched (no decay, no moment update);
    # the others move exactly as on the per-parameter path.
    be = CPU64
    runs = []
    for model in (plain_cnn(be, seed=3), unflattened(plain_cnn(be, seed=3))):
        optimizer = OPTIMISERS[name](own_parameters(model), be)
        x, y = batch()
        loss = SoftmaxCrossEntropy(be)
        loss.forward(model.forward(x), y)
        model.backward(loss.backward())
        frozen = model.layers[0].params["weight"]
        before = frozen.data.copy()
        frozen.grad = None
        optimizer.step()
        numpy.testing.assert_array_equal(frozen.data, before)
        assert all(not bufs[0].any() for bufs in optimizer.buffers.values())
        runs.append(model)
    for flat_param, plain_param in zip(*(own_parameters(model) for model in runs)):
        numpy.testing.assert_array_equal(flat_param.data, plain_param.data)


def test_optimiser_state_is_one_flat_array_per_buffer_with_per_parameter_views():
    model = plain_cnn("cpu", seed=0)
    optimizer = Adam(model.parameters(), backend=model.backend)
    for name, bufs in optimizer.buffers.items():
        flat = optimizer._flat_buffers[name]
        assert flat.shape == model.flat_data.shape
        assert [b.shape for b in bufs] == [p.data.shape for p in model.parameters()]
        assert all(numpy.shares_memory(b, flat) for b in bufs)
    state = optimizer.state_dict()
    restored = Adam(model.parameters(), backend=model.backend)
    restored.load_state_dict(state)
    assert all(numpy.shares_memory(b, restored._flat_buffers[n]) for n, bs in restored.buffers.items() for b in bs)


def test_an_optimiser_over_some_parameters_takes_the_per_parameter_path():
    model = Sequential([FullyConnected(4, 3, rng=0), ReLU(), FullyConnected(3, 2, rng=1)])
    head = model.layers[2].params
    optimizer = SGD(list(head.values()), lr=0.1, momentum=0.5, backend=model.backend)
    assert optimizer._flat is None
    first = model.layers[0].params["weight"].data.copy()
    x = numpy.ones((2, 4), dtype=numpy.float32)
    loss = SoftmaxCrossEntropy()
    loss.forward(model.forward(x), numpy.array([0, 1]))
    model.backward(loss.backward())
    before = head["weight"].data.copy()
    optimizer.step()
    numpy.testing.assert_array_equal(model.layers[0].params["weight"].data, first)
    numpy.testing.assert_allclose(head["weight"].data, before - 0.1 * head["weight"].grad, rtol=1e-6)


def test_nested_parameters_of_containers_and_normalisation_are_in_the_buffer():
    # A residual block (inner layers, a 1x1 projection), BatchNorm's gamma and beta, a convolution
    # without bias: every parameter is a view of the flat arrays, and training matches the
    # per-parameter path bit for bit.
    from cnn_backend.layers import BatchNorm, Convolution, Flatten, Residual

    def build():
        layers = [
            Convolution(out_channels=4, kernel_size=3, padding=1, bias=False),
            BatchNorm(),
            Residual([Convolution(out_channels=6, kernel_size=3, padding=1), ReLU()]),
            Flatten(),
            FullyConnected(out_features=10),
        ]
        return Sequential(layers, CPU64, input_shape=(1, 6, 6), rng=0)

    flat_model, plain_model = build(), unflattened(build())
    names = [name for name, _ in flat_model.named_parameters()]
    assert "0.bias" not in names and "1.weight" in names and any(".layers.0.weight" in n for n in names)
    assert any("projection" in n for n in names)
    optimizers = [Adam(own_parameters(m), lr=1e-2, weight_decay=0.01, backend=CPU64) for m in (flat_model, plain_model)]
    assert optimizers[0]._flat is flat_model.flat_parameters and optimizers[1]._flat is None
    rng = numpy.random.default_rng(0)
    for step in range(2):
        x, y = rng.random((5, 1, 6, 6)), rng.integers(0, 10, size=5)
        for model, optimizer in zip((flat_model, plain_model), optimizers):
            train_step(model, SoftmaxCrossEntropy(CPU64), optimizer, x, y)
    for (name, flat_param), plain_param in zip(flat_model.named_parameters(), own_parameters(plain_model)):
        assert numpy.shares_memory(flat_param.data, flat_model.flat_data), name
        assert numpy.shares_memory(flat_param.grad, flat_model.flat_grad), name
        numpy.testing.assert_array_equal(flat_param.data, plain_param.data, err_msg=name)
