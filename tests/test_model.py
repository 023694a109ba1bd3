"""Sequential: seeded construction, prediction, device moves, and .npz save/load without pickle."""

from __future__ import annotations

import zipfile

import numpy
import pytest

from cnn_backend import ModelFileError, Sequential, default_cnn, get_backend, seed_cnn
from cnn_backend.layers import Convolution, Dropout, FullyConnected, MaxPool, ReLU
from cnn_backend.serialization import write_npz_atomic


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


def test_default_model_shapes_and_dtype():
    model = default_cnn(seed=0)
    logits = model.forward(numpy.zeros((2, 1, 28, 28), dtype=numpy.float32))
    assert logits.shape == (2, 10) and logits.dtype == numpy.float32
    assert sum(p.data.size for p in model.parameters()) == 32 * 9 + 32 + 64 * 32 * 9 + 64 + 3136 * 128 + 128 + 1290


def test_forward_casts_host_input_to_the_model_dtype():
    model = seed_cnn(get_backend("cpu", "float64"))
    assert model.forward(numpy.zeros((1, 1, 28, 28), dtype=numpy.uint8)).dtype == numpy.float64


def test_predict_batches_agree_with_one_pass_and_restore_training_mode():
    model = default_cnn(seed=1, dropout=0.5)
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
    model = default_cnn(seed=5, dropout=0.25)
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
    with pytest.raises(ModelFileError, match=r"not a cnn_backend model file"):
        Sequential.load(path)


def test_pickled_content_is_refused(tmp_path):
    path = tmp_path / "pickled.npz"
    numpy.savez(path, obj=numpy.array([{"evil": 1}], dtype=object))
    with pytest.raises(ModelFileError, match=r"not a readable .npz file"):
        Sequential.load(path)


def test_mismatched_parameters_are_refused(tmp_path):
    path = seed_cnn().save(tmp_path / "m.npz")
    model = default_cnn()
    with numpy.load(path, allow_pickle=False) as data:
        state = {k[len("param/") :]: data[k] for k in data.files if k.startswith("param/")}
    with pytest.raises(ModelFileError, match=r"parameters do not match the model: missing"):
        model.load_state_dict(state)
    seed = seed_cnn()
    state["4.weight"] = numpy.zeros((10, 121))
    with pytest.raises(ModelFileError, match=r"parameter 4.weight has shape \(10, 121\) in the file, the model expects \(121, 10\)"):
        seed.load_state_dict(state)


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
    model = default_cnn(get_backend("cpu", "float64"), seed=0)
    kinds = [type(layer).__name__ for layer in model.layers[:6]]
    assert kinds == ["Convolution", "MaxPool", "ReLU", "Convolution", "MaxPool", "ReLU"]
    z = numpy.random.default_rng(1).standard_normal((2, 3, 8, 8))
    be = model.backend
    pooled_then_relu = ReLU(be).forward(MaxPool(2, backend=be).forward(z))
    numpy.testing.assert_array_equal(pooled_then_relu, MaxPool(2, backend=be).forward(ReLU(be).forward(z)))
