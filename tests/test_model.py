"""Sequential: seeded construction, prediction, device moves, and .npz save/load without pickle."""

from __future__ import annotations

import re
import zipfile

import numpy
import pytest

from cnn_backend import ModelFileError, Sequential, default_cnn, get_backend, plain_cnn, seed_cnn
from cnn_backend.layers import BatchNorm, Convolution, Dropout, Flatten, FullyConnected, Layer, MaxPool, ReLU, ShapeError
from cnn_backend.serialization import write_npz_atomic
from layer_helpers import Block


def test_same_seed_same_weights_different_seed_different_weights():
    a, b, c = seed_cnn(seed=3), seed_cnn(seed=3), seed_cnn(seed=4)
    for (name, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        numpy.testing.assert_array_equal(pa.data, pb.data, err_msg=name)
        if name.endswith("weight"):
            assert not numpy.array_equal(pa.data, pc.data)


def test_seed_architecture_matches_the_article():
    model = seed_cnn()
    shapes = {name: p.data.shape for name, p in model.named_parameters()}
    assert shapes == {"0.weight": (1, 1, 6, 6), "0.bias": (1,), "4.weight": (121, 10), "4.bias": (10,)}
    x = numpy.random.default_rng(0).random((3, 1, 28, 28), dtype=numpy.float32)
    assert model.forward(x).shape == (3, 10)


def test_plain_model_shapes_and_dtype():
    model = plain_cnn(seed=0)
    logits = model.forward(numpy.zeros((2, 1, 28, 28), dtype=numpy.float32))
    assert logits.shape == (2, 10) and logits.dtype == numpy.float32
    assert sum(p.data.size for p in model.parameters()) == 32 * 9 + 32 + 64 * 32 * 9 + 64 + 3136 * 128 + 128 + 1290


def test_default_model_shapes_buffers_and_dropout_rate():
    model = default_cnn(seed=0)
    logits = model.forward(numpy.zeros((2, 1, 28, 28), dtype=numpy.float32))
    assert logits.shape == (2, 10) and logits.dtype == numpy.float32
    # convolutions without biases (BatchNorm follows), BatchNorm scale and shift, dense 2352->384 and 384->10
    expected = 16 * 9 + 2 * 16 + 48 * 16 * 9 + 2 * 48 + 2352 * 384 + 384 + 2 * 384 + 384 * 10 + 10
    assert sum(p.data.size for p in model.parameters()) == expected
    assert sum(buffer.size for _, buffer in model.named_buffers()) == 2 * (16 + 48 + 384)  # running means and variances
    def rates(network):
        return [layer.rate for layer in network.layers if isinstance(layer, Dropout)]

    assert rates(model) == [0.1] and rates(default_cnn(seed=0, dropout=0.3)) == [0.3]


def test_forward_casts_host_input_to_the_model_dtype():
    model = seed_cnn(get_backend("cpu", "float64"))
    assert model.forward(numpy.zeros((1, 1, 28, 28), dtype=numpy.float32)).dtype == numpy.float64


def test_predict_batches_agree_with_one_pass_and_restore_training_mode():
    model = plain_cnn(seed=1, dropout=0.5)
    x = numpy.random.default_rng(0).random((7, 1, 28, 28), dtype=numpy.float32)
    model.train()
    labels = model.predict(x, batch_size=3)
    assert model.training  # predict switches to eval mode and back
    model.eval()
    numpy.testing.assert_array_equal(labels, model.forward(x).argmax(axis=1))
    assert labels.dtype.kind == "i" and labels.shape == (7,)


def test_first_layer_skips_its_input_gradient():
    model = seed_cnn()
    model.forward(numpy.zeros((2, 1, 28, 28), dtype=numpy.float32))
    assert model.backward(numpy.ones((2, 10), dtype=numpy.float32)) is None
    assert model.layers[0].params["weight"].grad is not None


def test_save_and_load_round_trip(tmp_path):
    model = plain_cnn(seed=5, dropout=0.25)
    path = model.save(tmp_path / "model.npz", extra={"note": numpy.array("hello")})
    loaded = Sequential.load(path)
    assert loaded.config() == model.config()
    for (name, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        numpy.testing.assert_array_equal(a.data, b.data, err_msg=name)
    with numpy.load(path, allow_pickle=False) as data:  # readable without pickle
        assert str(data["note"]) == "hello"
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]  # no temporary file left behind


def test_load_into_float64(tmp_path):
    path = seed_cnn(seed=2).save(tmp_path / "m.npz")
    loaded = Sequential.load(path, get_backend("cpu", "float64"))
    assert all(p.data.dtype == numpy.float64 for p in loaded.parameters())


def test_a_device_name_keeps_the_saved_or_current_dtype(tmp_path):
    """``load(path, "cpu")`` and ``to("cpu")`` keep float64 (PyTorch's ``to(device)`` keeps the dtype too)."""
    model = seed_cnn(get_backend("cpu", "float64"), seed=2)
    path = model.save(tmp_path / "m64.npz")
    assert Sequential.load(path).backend.dtype == numpy.float64
    assert Sequential.load(path, "cpu").backend.dtype == numpy.float64
    assert Sequential.load(seed_cnn(seed=2).save(tmp_path / "m32.npz")).backend.dtype == numpy.float32
    model.to("cpu")
    assert model.backend.dtype == numpy.float64 and all(p.data.dtype == numpy.float64 for p in model.parameters())


def test_to_moves_and_casts_parameters():
    model = seed_cnn(seed=2)
    before = model.state_dict()
    model.to(get_backend("cpu", "float64"))
    assert model.backend.dtype == numpy.float64
    for name, p in model.named_parameters():
        assert p.data.dtype == numpy.float64
        numpy.testing.assert_array_equal(p.data.astype(numpy.float32), before[name])


def test_missing_file_is_refused_in_one_line(tmp_path):
    with pytest.raises(ModelFileError, match=r"no such file") as info:
        Sequential.load(tmp_path / "nope.npz")
    assert "\n" not in str(info.value)


def test_a_run_folder_given_for_a_model_file_names_its_checkpoints(tmp_path):
    with pytest.raises(ModelFileError, match=r"^\S+empty: a folder, not a model file; give a .npz model file or checkpoint$"):
        Sequential.load((tmp_path / "empty").mkdir() or tmp_path / "empty")
    seed_cnn().save(tmp_path / "best.npz")
    with pytest.raises(ModelFileError, match=rf"a folder, not a model file; give a checkpoint in it: {tmp_path / 'best.npz'}$"):
        Sequential.load(tmp_path)


def test_corrupt_file_is_refused(tmp_path):
    path = tmp_path / "corrupt.npz"
    path.write_bytes(b"\x00not a zip at all" * 10)
    with pytest.raises(ModelFileError, match=r"corrupt.npz: not an .npz archive") as info:
        Sequential.load(path)
    # NumPy's own message would suggest loading it with pickle, which this library never does.
    assert "pickle" not in str(info.value) and "\n" not in str(info.value)


def test_truncated_file_is_refused(tmp_path):
    path = seed_cnn().save(tmp_path / "m.npz")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ModelFileError, match=r"not an .npz archive|not a readable .npz file"):
        Sequential.load(path)


def test_file_without_config_is_refused(tmp_path):
    path = write_npz_atomic(tmp_path / "plain.npz", {"a": numpy.zeros(3)})
    with pytest.raises(ModelFileError, match=r"plain.npz: not a cnn_backend model or checkpoint"):
        Sequential.load(path)


def test_pickled_content_is_refused(tmp_path):
    path = tmp_path / "pickled.npz"
    numpy.savez(path, obj=numpy.array([{"evil": 1}], dtype=object))
    with pytest.raises(ModelFileError, match=r"not a readable .npz file"):
        Sequential.load(path)


def test_mismatched_parameters_are_refused(tmp_path):
    path = seed_cnn().save(tmp_path / "m.npz")
    model = plain_cnn()
    with numpy.load(path, allow_pickle=False) as data:
        state = {k[len("param/") :]: data[k] for k in data.files if k.startswith("param/")}
    with pytest.raises(ModelFileError, match=r"parameters do not match the model: missing"):
        model.load_state_dict(state)
    seed = seed_cnn()
    state["4.weight"] = numpy.zeros((10, 121))
    with pytest.raises(ModelFileError, match=r"parameter 4.weight has shape \(10, 121\) in the state given, the model expects \(121, 10\)"):
        seed.load_state_dict(state)
    before = seed.state_dict()
    state["0.weight"] = numpy.ones_like(state["0.weight"])
    with pytest.raises(ModelFileError, match=r"parameter 4.weight has shape"):
        seed.load_state_dict(state)
    numpy.testing.assert_array_equal(seed.state_dict()["0.weight"], before["0.weight"])  # nothing copied


def test_a_state_of_nested_lists_loads():
    model, source = seed_cnn(seed=1), seed_cnn(seed=2)
    model.load_state_dict({name: value.tolist() for name, value in source.state_dict().items()})
    for name, value in source.state_dict().items():
        numpy.testing.assert_array_equal(model.state_dict()[name], value)


class Tally(Layer):
    """Passes its input on and keeps an integer buffer, as a counter of one's own would."""

    def _build(self, input_shape, rng):
        self.buffers["seen"] = self.backend.xp.zeros((), dtype=numpy.int64)
        return input_shape

    def forward(self, x):
        return x

    def backward(self, dy):
        return dy


def test_a_loaded_state_is_copied_once_into_the_model_and_shares_no_array_with_the_caller():
    import tracemalloc

    def network(seed):
        return Sequential([FullyConnected(out_features=512), BatchNorm(), Tally(), FullyConnected(out_features=256)],
                          input_shape=(512,), rng=seed)  # fmt: skip

    model, source = network(0), network(1)
    source[2].buffers["seen"][...] = 7
    state, buffers = source.state_dict(), source.buffer_state_dict()
    tracemalloc.start()
    try:
        model.load_state_dict(state, buffers)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Written straight into the flat buffer: the state was cast into a second full copy before.
    assert peak < sum(value.nbytes for value in state.values()) / 4
    expected = {name: value.copy() for name, value in {**state, **buffers}.items()}
    for value in [*state.values(), *buffers.values()]:
        value += 1  # the caller's arrays change afterwards: the model keeps what it loaded
    for name, value in {**model.state_dict(), **model.buffer_state_dict()}.items():
        numpy.testing.assert_array_equal(value, expected[name], err_msg=name)  # the integer buffer was the caller's array before


def test_unknown_layer_type_in_config_is_refused():
    with pytest.raises(ModelFileError, match=r"unknown or malformed layer"):
        Sequential.from_config([{"type": "Attention", "args": {}}])


def test_layers_built_on_another_backend_are_moved():
    layers = [Convolution(1, 2, 3, rng=0), FullyConnected(2, 2, rng=0), Dropout(0.1)]
    model = Sequential(layers[:1], get_backend("cpu", "float64"))
    assert model.layers[0].params["weight"].data.dtype == numpy.float64


def test_empty_model_is_refused():
    with pytest.raises(ValueError, match=r"at least one layer"):
        Sequential([])


def test_saved_file_is_a_plain_zip_of_npy_files(tmp_path):
    path = seed_cnn().save(tmp_path / "m.npz")
    with zipfile.ZipFile(path) as archive:
        assert all(name.endswith(".npy") for name in archive.namelist())


def test_default_model_pools_before_relu_which_is_the_same_function():
    # max-pool(ReLU(z)) == ReLU(max-pool(z)): the default model uses the cheaper order.
    model = plain_cnn(get_backend("cpu", "float64"), seed=0)
    kinds = [type(layer).__name__ for layer in model.layers[:6]]
    assert kinds == ["Convolution", "MaxPool", "ReLU", "Convolution", "MaxPool", "ReLU"]
    z = numpy.random.default_rng(1).standard_normal((2, 3, 8, 8))
    be = model.backend
    pooled_then_relu = ReLU(be).forward(MaxPool(2, backend=be).forward(z))
    numpy.testing.assert_array_equal(pooled_then_relu, MaxPool(2, backend=be).forward(ReLU(be).forward(z)))


# -- built-in networks as spec files, nested names, buffers ----------------------------------------------


def _constructors_as_they_were(name, seed, dropout=0.0):
    """The built-in networks written out with explicit sizes, as their constructors were before
    they became spec files: the reference for bit-identical initial weights."""
    from cnn_backend.init import make_rng
    from cnn_backend.layers import Flatten

    rng = make_rng(seed)
    if name == "seed":
        return Sequential([Convolution(1, 1, 6, rng=rng), ReLU(), MaxPool(2), Flatten(), FullyConnected(121, 10, init="glorot", rng=rng)])
    layers = [
        Convolution(1, 32, 3, padding=1, rng=rng), MaxPool(2), ReLU(),
        Convolution(32, 64, 3, padding=1, rng=rng), MaxPool(2), ReLU(),
        Flatten(), FullyConnected(64 * 7 * 7, 128, rng=rng), ReLU(),
    ]
    if dropout:
        layers.append(Dropout(dropout, rng=rng))
    layers.append(FullyConnected(128, 10, init="glorot", rng=rng))
    return Sequential(layers)


@pytest.mark.parametrize("name, build, dropout", [("seed", seed_cnn, 0.0), ("plain", plain_cnn, 0.0), ("plain", plain_cnn, 0.3)])
@pytest.mark.parametrize("seed", [0, 7])
def test_built_in_specs_start_from_the_same_weights_and_dropout_masks_as_before(name, build, dropout, seed):
    model = build(seed=seed, dropout=dropout) if dropout else build(seed=seed)
    reference = _constructors_as_they_were(name, seed, dropout)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    for (parameter_name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        numpy.testing.assert_array_equal(p.data, q.data, err_msg=parameter_name)
    assert [repr(layer) for layer in model.layers] == [repr(layer) for layer in reference.layers]
    x = numpy.random.default_rng(1).random((4, 1, 28, 28), dtype=numpy.float32)
    numpy.testing.assert_array_equal(model.forward(x), reference.forward(x))  # same dropout draws too
    assert model.input_shape == (1, 28, 28)


def _bn_residual_model(backend="cpu"):
    from cnn_backend.spec import build_model

    spec = [
        {"type": "Convolution", "out_channels": 4, "kernel_size": 3, "padding": 1, "bias": False},
        {"type": "BatchNorm"},
        {"type": "ReLU"},
        {"type": "Residual", "layers": [
            {"type": "Convolution", "out_channels": 6, "kernel_size": 3, "stride": 2, "padding": 1},
            {"type": "BatchNorm"},
            {"type": "Dropout", "rate": 0.2},
        ]},
        {"type": "GlobalAvgPool"},
        {"type": "FullyConnected", "out_features": 10},
    ]
    return build_model(spec, (1, 8, 8), backend, seed=2)


def test_containers_have_dotted_names_and_buffers_are_not_parameters():
    model = _bn_residual_model()
    names = [name for name, _ in model.named_parameters()]
    assert names == [
        "0.weight", "1.weight", "1.bias", "3.layers.0.weight", "3.layers.0.bias",
        "3.layers.1.weight", "3.layers.1.bias", "3.projection.weight", "5.weight", "5.bias",
    ]
    assert [name for name, _ in model.named_buffers()] == [
        "1.running_mean", "1.running_var", "3.layers.1.running_mean", "3.layers.1.running_var",
    ]
    assert len(model.parameters()) == len(names)
    buffer_ids = {id(value) for _, value in model.named_buffers()}
    assert not buffer_ids & {id(p.data) for p in model.parameters()}


def test_optimizer_steps_leave_buffers_to_the_forward_pass():
    from cnn_backend.optim import SGD
    from cnn_backend.layers import SoftmaxCrossEntropy

    model = _bn_residual_model()
    optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1, backend=model.backend)
    x = numpy.random.default_rng(3).random((4, 1, 8, 8), dtype=numpy.float32)
    y = numpy.array([0, 1, 2, 3])
    model.eval()
    model.forward(x)
    before = model.buffer_state_dict()
    model.train()
    logits = model.forward(x)  # one training forward moves the running statistics once
    moved = model.buffer_state_dict()
    assert all(not numpy.array_equal(before[name], moved[name]) for name in before)
    loss_fn = SoftmaxCrossEntropy()
    loss_fn.forward(logits, y)
    model.backward(loss_fn.backward())
    optimizer.step()
    after = model.buffer_state_dict()
    for name in moved:
        numpy.testing.assert_array_equal(after[name], moved[name], err_msg=name)


def test_save_and_load_restore_buffers_and_the_architecture(tmp_path):
    model = _bn_residual_model()
    model.forward(numpy.random.default_rng(4).random((5, 1, 8, 8), dtype=numpy.float32))
    path = model.save(tmp_path / "net.npz")
    with numpy.load(path) as data:
        assert "buffer/3.layers.1.running_var" in data.files and "param/3.projection.weight" in data.files
    loaded = Sequential.load(path, get_backend("cpu", "float64"))
    assert loaded.input_shape == (1, 8, 8)
    for name, value in model.buffer_state_dict().items():
        numpy.testing.assert_allclose(loaded.buffer_state_dict()[name], value, rtol=1e-7, err_msg=name)
    x = numpy.random.default_rng(5).random((3, 1, 8, 8), dtype=numpy.float32)
    model.eval(), loaded.eval()
    numpy.testing.assert_allclose(loaded.forward(x), model.forward(x), rtol=1e-5, atol=1e-6)


def test_a_file_without_its_buffers_is_refused(tmp_path):
    model = _bn_residual_model()
    path = model.save(tmp_path / "net.npz")
    with numpy.load(path) as data:
        arrays = {key: data[key] for key in data.files if not key.startswith("buffer/")}
    write_npz_atomic(tmp_path / "no-buffers.npz", arrays)
    with pytest.raises(ModelFileError, match=r"buffers do not match the model: missing \['1.running_mean'"):
        Sequential.load(tmp_path / "no-buffers.npz")


def test_old_format_files_with_a_list_of_layers_still_load(tmp_path):
    import json

    model = seed_cnn(seed=5)
    old_config = [
        {"type": "Convolution", "args": {"in_channels": 1, "out_channels": 1, "kernel_size": 6, "stride": 1, "padding": 0, "algorithm": "auto", "init": "he"}},
        {"type": "ReLU", "args": {}},
        {"type": "MaxPool", "args": {"pool_size": 2, "stride": 2}},
        {"type": "Flatten", "args": {}},
        {"type": "FullyConnected", "args": {"in_features": 121, "out_features": 10, "init": "glorot"}},
    ]
    arrays = {f"param/{name}": value for name, value in model.state_dict().items()}
    arrays["__model_config__"] = numpy.array(json.dumps(old_config))
    write_npz_atomic(tmp_path / "old.npz", arrays)
    loaded = Sequential.load(tmp_path / "old.npz")
    x = numpy.random.default_rng(6).random((2, 1, 28, 28), dtype=numpy.float32)
    numpy.testing.assert_array_equal(loaded.forward(x), model.forward(x))


def test_eval_and_train_reach_the_layers_inside_a_custom_container():
    block = Block([FullyConnected(out_features=8), BatchNorm(), Dropout(0.5)])
    model = Sequential([Flatten(), block, FullyConnected(out_features=3)], input_shape=(1, 6, 6), rng=0)
    x = numpy.random.default_rng(0).random((5, 1, 6, 6), dtype=numpy.float32)
    model.eval()
    assert not any(layer.training for layer in block.layers)
    running_mean = block.layers[1].buffers["running_mean"].copy()
    numpy.testing.assert_array_equal(model.predict_logits(x), model.predict_logits(x))  # no dropout, no batch statistics
    numpy.testing.assert_array_equal(block.layers[1].buffers["running_mean"], running_mean)
    model.train()
    assert all(layer.training for layer in block.layers)


def test_a_deep_copy_is_independent_and_computes_the_same():
    import copy
    import pickle

    model = default_cnn(get_backend("cpu", "float64"), seed=4)
    x = numpy.random.default_rng(1).random((4, 1, 28, 28))
    clone = copy.deepcopy(model)
    assert clone.backend.dtype == numpy.float64 and clone.training
    # Same weights and the same Dropout generator: the same training-mode output.
    numpy.testing.assert_array_equal(clone.forward(x), model.forward(x))
    clone.layers[0].params["weight"].data[...] = 0.0
    assert numpy.abs(model.layers[0].params["weight"].data).sum() > 0  # the original is untouched
    model.eval()
    assert copy.deepcopy(model).training is False
    with pytest.raises(TypeError, match=r"a Sequential cannot be pickled .*model.save\(path\).*copy.deepcopy\(model\) copies it"):
        pickle.dumps(model)


def test_a_model_is_a_sequence_of_its_layers():
    model = seed_cnn()
    assert len(model) == 5 and list(model) == model.layers
    assert model[0] is model.layers[0] and isinstance(model[-1], FullyConnected)
    with pytest.raises(TypeError, match=r"a model is not sliced .*use model.layers\[a:b\]"):
        model[1:3]


# -- dtypes at the edges: the gradient, predicted input, and loaded states --------------------------


def test_backward_casts_a_float_gradient_of_another_precision_to_the_model_dtype():
    model = seed_cnn(get_backend("cpu", "float32"), seed=0)
    model.layers[0].needs_input_grad = True  # the input gradient shows the dtype the whole pass ran in
    x = numpy.random.default_rng(0).random((4, 1, 28, 28), dtype=numpy.float32)
    dy = numpy.random.default_rng(1).standard_normal((4, 10))  # float64, as a loss written in NumPy gives
    model(x)
    expected = model.backward(dy.astype(numpy.float32)).copy()
    expected_grads = [p.grad.copy() for p in model.parameters()]
    model(x)
    dx = model.backward(dy)
    assert dx.dtype == numpy.float32  # a float64 gradient is taken in the model's dtype at every layer
    numpy.testing.assert_array_equal(dx, expected)
    for param, grad in zip(model.parameters(), expected_grads):
        numpy.testing.assert_array_equal(param.grad, grad)


def test_backward_sends_a_host_gradient_to_the_models_device():
    from cnn_backend.testing import standin_backend

    device = standin_backend("float32")
    model = seed_cnn(device, seed=0)
    x = numpy.random.default_rng(0).random((4, 1, 28, 28), dtype=numpy.float32)
    dy = numpy.random.default_rng(1).standard_normal((4, 10)).astype(numpy.float32)
    model(device.to_device(x))
    model.backward(dy)  # a host array: sent to the device, as forward's input is
    on_host = [device.to_numpy(p.grad) for p in model.parameters()]
    model(device.to_device(x))
    model.backward(device.to_device(dy))
    for grad, param in zip(on_host, model.parameters()):
        numpy.testing.assert_array_equal(grad, device.to_numpy(param.grad))


@pytest.mark.parametrize("dtype", ["int64", "bool", "complex128"])
def test_backward_refuses_a_gradient_that_is_not_float_in_one_line(dtype):
    model = seed_cnn(seed=0)
    model(numpy.zeros((2, 1, 28, 28), dtype=numpy.float32))
    with pytest.raises(ValueError, match=rf"^Sequential.backward: the gradient holds {dtype} values; pass a float gradient "
                                         rf"\(it is cast to the model's float32\)$"):
        model.backward(numpy.ones((2, 10), dtype=dtype))


def test_predict_refuses_finite_input_that_overflows_the_model_dtype():
    model = seed_cnn(get_backend("cpu", "float32"), seed=0)
    x = numpy.zeros((3, 1, 28, 28))  # float64 host input
    x[1, 0, 5, 5] = 1e39  # finite in float64, infinite in float32: every logit of the sample would be NaN
    for predict in (model.predict, model.predict_logits):
        with pytest.raises(ValueError, match=r"^Sequential.predict_logits: 1 of 3 samples hold values too large for float32; "
                                             r"scale the input, or use a float64 model \(dtype='float64'\)$"):
            predict(x)
    x[1, 0, 5, 5] = float(numpy.finfo(numpy.float32).max)  # the largest float32 itself is taken
    assert numpy.isfinite(model.predict_logits(x)).all()
    wide = seed_cnn(get_backend("cpu", "float64"), seed=0)
    x[1, 0, 5, 5] = 1e39
    assert wide.predict(x).shape == (3,)  # a float64 model holds it


@pytest.mark.parametrize("bad, shown", [
    (lambda w: w + 5j, "complex128"),
    (lambda w: numpy.full(w.shape, "nan"), "<U3"),
    (lambda w: numpy.full(w.shape, "0.5"), "<U3"),
    (lambda w: w.astype(object), "object"),
    (lambda w: w > 0, "bool"),
], ids=["complex", "text-nan", "text-number", "object", "bool"])
def test_load_state_dict_refuses_arrays_that_are_not_real_numbers_and_changes_nothing(bad, shown):
    model = plain_cnn(get_backend("cpu", "float64"), seed=0)
    before = model.state_dict()
    state = plain_cnn(get_backend("cpu", "float64"), seed=1).state_dict()
    state["0.weight"] = bad(state["0.weight"])
    # complex lost its imaginary part silently; "nan" text was called too large for the float64 model
    with pytest.raises(ValueError, match=rf"^parameter 0\.weight must be an array of real numbers \(integers or floats\), "
                                         rf"got an array of dtype {shown}; load the arrays state_dict\(\) gives$"):
        model.load_state_dict(state)
    for name, value in model.state_dict().items():
        numpy.testing.assert_array_equal(value, before[name])


def test_load_state_dict_refuses_a_complex_buffer_and_takes_integer_weights():
    model = default_cnn(seed=0)
    state, buffers = model.state_dict(), model.buffer_state_dict()
    buffers["2.running_mean"] = buffers["2.running_mean"] + 1j
    with pytest.raises(ValueError, match=r"^buffer 2\.running_mean must be an array of real numbers \(integers or floats\), "
                                         r"got an array of dtype complex64;"):
        model.load_state_dict(state, buffers)
    buffers = model.buffer_state_dict()
    state["0.weight"] = numpy.ones(state["0.weight"].shape, dtype=numpy.int64)  # integers are numbers: cast
    model.load_state_dict(state, buffers)
    assert model.state_dict()["0.weight"].dtype == numpy.float32 and (model.state_dict()["0.weight"] == 1).all()


@pytest.mark.parametrize("model_dtype", ["float32", "float64"])
def test_load_state_dict_checks_on_the_host_and_sends_each_array_once_in_the_model_dtype(model_dtype):
    from cnn_backend.testing import standin_backend

    device = standin_backend(model_dtype)
    model = default_cnn(device, seed=0)
    source = default_cnn(get_backend("cpu", "float64"), seed=1)  # a float64 file's arrays
    state, buffers = source.state_dict(), source.buffer_state_dict()
    device.usage.reset_counters()
    model.load_state_dict(state, buffers)
    # Before: sent in the file's float64, cast on the device, and two reads per array for the checks.
    assert device.usage.device_reads == 0
    assert device.usage.transfers_to_device == len(state) + len(buffers)
    itemsize = numpy.dtype(model_dtype).itemsize
    assert device.usage.bytes_allocated == itemsize * sum(value.size for value in [*state.values(), *buffers.values()])
    for name, value in model.state_dict().items():
        numpy.testing.assert_array_equal(value, state[name].astype(model_dtype))
    for name, value in model.buffer_state_dict().items():
        numpy.testing.assert_array_equal(value, buffers[name].astype(model_dtype))


def test_a_refused_first_batch_records_no_input_shape_and_the_model_saves_and_loads(tmp_path):
    x = numpy.random.default_rng(0).random((2, 1, 6, 6)).astype(numpy.float32)
    model = Sequential([Convolution(1, 4, 3, rng=0), Flatten(), FullyConnected(64, 3, rng=0)])
    with pytest.raises(ShapeError, match=r"expected input of shape \(N, 1, H, W\)"):
        model(x.transpose(0, 2, 3, 1))  # NHWC by mistake
    assert model.input_shape is None
    expected = model(x)
    assert model.input_shape == (1, 6, 6)
    loaded = Sequential.load(model.save(tmp_path / "model.npz"))
    numpy.testing.assert_array_equal(loaded(x), expected)


@pytest.mark.parametrize("shape", [(1, 6.9, 6), (True, 6, 6), (0, 6, 6), (1, -6, 6), "1,6,6", (), 6])
def test_an_input_shape_that_is_not_positive_integers_is_refused_in_one_line(shape):
    with pytest.raises(ShapeError) as excinfo:
        Sequential([Convolution(out_channels=4, kernel_size=3, padding=1), Flatten(), FullyConnected(out_features=3)], input_shape=shape)
    assert str(excinfo.value) == (
        "Sequential: input_shape must be one sample's shape, positive integers without the batch axis "
        f"(such as (1, 28, 28) or (784,)), got {shape!r}"
    )
    # NumPy integers, as a shape read from an array gives them, count.
    assert Sequential([Flatten()], input_shape=numpy.array([1, 6, 6])).input_shape == (1, 6, 6)


def test_save_refuses_what_load_would_refuse_and_writes_nothing(tmp_path):
    built = Sequential([Flatten(), FullyConnected(out_features=3)], input_shape=(4,), rng=0)
    cases = [
        (lambda: Sequential([Flatten(), FullyConnected(out_features=3)]).save(tmp_path / "a.npz"),
         "Sequential.save: the model is not built (its sizes are inferred from the input): give Sequential input_shape=, or run it on a batch first"),
        (lambda: Sequential([Flatten(), ReLU()], input_shape=(4,)).save(tmp_path / "a.npz"),
         "Sequential.save: the model has no parameters, so there is nothing to save"),
        (lambda: built.save(tmp_path / "a.npz", extra={"param/1.weight": numpy.zeros((4, 3))}),
         "Sequential.save: extra entry 'param/1.weight' would replace the model's own; give it another name"),
        (lambda: built.save(tmp_path / "a.npz", extra={"note": numpy.array([None, 1], dtype=object)}),
         "Sequential.save: extra entry 'note' holds Python objects, which a model file cannot hold (it is read without "
         "unpickling); store numbers or text"),
    ]
    for save, message in cases:
        with pytest.raises(ValueError) as excinfo:
            save()
        assert str(excinfo.value) == message
    assert list(tmp_path.iterdir()) == []
    loaded = Sequential.load(built.save(tmp_path / "a.npz", extra={"note": numpy.array(["text"])}))
    numpy.testing.assert_array_equal(loaded.state_dict()["1.weight"], built.state_dict()["1.weight"])


def test_a_seed_without_an_input_shape_is_refused_rather_than_ignored():
    with pytest.raises(ValueError) as excinfo:
        Sequential([Convolution(1, 4, 3, rng=0), Flatten(), Dropout(0.5), FullyConnected(64, 4, rng=0)], rng=0)
    assert str(excinfo.value) == (
        "Sequential: rng seeds the layers as they are built for input_shape, and no input_shape was given; "
        "pass input_shape= too, or seed each layer with its own rng= (Dropout(rate, rng=...) too)"
    )
    seeded = [Sequential([Flatten(), Dropout(0.5), FullyConnected(out_features=4)], input_shape=(1, 8, 8), rng=3) for _ in range(2)]
    x = numpy.ones((2, 1, 8, 8), numpy.float32)
    numpy.testing.assert_array_equal(seeded[0](x), seeded[1](x))  # the same weights and the same dropout draws


def test_layers_made_for_another_dtype_are_refused_unless_a_backend_is_named():
    float64 = get_backend("cpu", "float64")
    with pytest.raises(ValueError) as excinfo:
        Sequential([Flatten(), FullyConnected(4, 3, rng=0, backend=float64)])
    assert str(excinfo.value) == (
        "Sequential: layer 1 (FullyConnected) is on cpu in float64, layer 0 on cpu in float32; make the layers with one "
        "backend, or pass Sequential(..., backend=...) to move them all to it"
    )
    moved = Sequential([Flatten(), FullyConnected(4, 3, rng=0, backend=float64)], backend=get_backend("cpu", "float32"))
    assert moved.layers[1].params["weight"].data.dtype == numpy.float32


def test_one_dict_holding_the_buffers_beside_the_parameters_loads_as_pytorchs_does():
    source = default_cnn("cpu", seed=1)
    source.layers[2].buffers["running_mean"][...] = 0.5  # a buffer that differs from a fresh model's
    target = default_cnn("cpu", seed=0)
    target.load_state_dict({**source.state_dict(), **source.buffer_state_dict()})
    for name, value in {**source.state_dict(), **source.buffer_state_dict()}.items():
        numpy.testing.assert_array_equal({**target.state_dict(), **target.buffer_state_dict()}[name], value, err_msg=name)


def test_a_batch_refused_for_its_shape_leaves_the_running_statistics_as_they_were():
    model = Sequential([Convolution(out_channels=2, kernel_size=3, padding=1), BatchNorm(), ReLU(), Flatten(), FullyConnected(out_features=3)],
                       input_shape=(1, 6, 6), rng=0)
    before = model.buffer_state_dict()
    with pytest.raises(ShapeError, match=r"the model was built for samples of shape \(1, 6, 6\), this batch's are \(1, 8, 8\)"):
        model(numpy.random.default_rng(0).random((4, 1, 8, 8)).astype(numpy.float32) * 100)
    for name, value in model.buffer_state_dict().items():
        numpy.testing.assert_array_equal(value, before[name], err_msg=name)
    model(numpy.ones((4, 1, 6, 6), numpy.float32))  # a batch of the right shape still moves them
    assert not numpy.array_equal(model.buffer_state_dict()["1.running_mean"], before["1.running_mean"])


def test_a_training_batch_of_one_sample_refused_deep_inside_leaves_the_running_statistics_as_they_were():
    # The convolution's BatchNorm takes statistics over 36 pixels of the one sample; the dense
    # layer's BatchNorm then refuses a single value per feature.
    model = Sequential([Convolution(out_channels=2, kernel_size=3, padding=1), BatchNorm(), ReLU(), Flatten(),
                        FullyConnected(out_features=3), BatchNorm()], input_shape=(1, 6, 6), rng=0)  # fmt: skip
    before = model.buffer_state_dict()
    with pytest.raises(ShapeError, match=r"training needs more than one value per channel"):
        model(numpy.random.default_rng(0).random((1, 1, 6, 6)).astype(numpy.float32) * 100)
    for name, value in model.buffer_state_dict().items():
        numpy.testing.assert_array_equal(value, before[name], err_msg=name)


def test_a_negative_running_variance_is_refused_on_load():
    model = default_cnn("cpu", seed=0)
    state, buffers = model.state_dict(), model.buffer_state_dict()
    name = next(name for name in buffers if name.endswith("running_var"))
    buffers[name] = -numpy.abs(buffers[name]) - 1.0  # BatchNorm would take its square root: NaN outputs
    before = model.buffer_state_dict()
    with pytest.raises(ValueError, match=rf"^buffer {re.escape(name)} holds negative variances, which no training writes \(the file is damaged\)"):
        model.load_state_dict(state, buffers)
    for key, value in model.buffer_state_dict().items():
        numpy.testing.assert_array_equal(value, before[key], err_msg=key)
