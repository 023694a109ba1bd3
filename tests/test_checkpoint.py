"""Checkpoints: model + optimiser + RNG state round-trip exactly, and broken files are refused in one line."""

from __future__ import annotations

import json

import numpy
import pytest

from cnn_backend import Dropout, Flatten, FullyConnected, ModelFileError, ReLU, Sequential, get_backend, seed_cnn
from cnn_backend.checkpoint import STATE_KEY, load_checkpoint, save_checkpoint
from cnn_backend.layers import SoftmaxCrossEntropy
from cnn_backend.optim import make_optimizer
from cnn_backend.serialization import json_array
from cnn_backend.training import schedule_from_config, train_step

SETTINGS = {"model": "tiny", "seed": 0}


def tiny_model(backend, seed=0) -> Sequential:
    rng = numpy.random.default_rng(seed)
    return Sequential(
        [
            Flatten(backend),
            FullyConnected(16, 12, rng=rng, backend=backend),
            ReLU(backend),
            Dropout(0.5, rng=rng, backend=backend),
            FullyConnected(12, 3, rng=rng, backend=backend),
        ],
        backend,
    )


def batches(count: int):
    rng = numpy.random.default_rng(42)
    return [(rng.random((8, 1, 4, 4)).astype(numpy.float32), rng.integers(0, 3, 8)) for _ in range(count)]


def run_steps(model, optimizer, data) -> None:
    loss_fn = SoftmaxCrossEntropy(model.backend)
    for x, y in data:
        train_step(model, loss_fn, optimizer, model.backend.to_device(x), model.backend.to_device(y))


def save(path, model, optimizer, epoch=1, **overrides):
    arguments = dict(
        epoch=epoch, schedule=schedule_from_config({"name": "constant", "base_lr": 0.05}), settings=SETTINGS,
        loader_seed=0, best={"epoch": epoch, "val_accuracy": 0.5}, history=[{"epoch": epoch, "train_loss": 1.0}],
    )
    return save_checkpoint(path, model, optimizer, **{**arguments, **overrides})


OPTIMIZERS = [("sgd", {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}), ("adam", {"lr": 0.01, "weight_decay": 1e-3})]


@pytest.mark.parametrize("name, config", OPTIMIZERS, ids=[name for name, _ in OPTIMIZERS])
def test_resuming_from_a_checkpoint_continues_exactly(tmp_path, name, config):
    backend = get_backend("cpu")
    data = batches(6)

    straight = tiny_model(backend)
    straight_optimizer = make_optimizer(name, straight.parameters(), backend, **config)
    run_steps(straight, straight_optimizer, data)

    first_half = tiny_model(backend)
    first_optimizer = make_optimizer(name, first_half.parameters(), backend, **config)
    run_steps(first_half, first_optimizer, data[:3])
    path = save(tmp_path / "last.npz", first_half, first_optimizer, epoch=3)

    checkpoint = load_checkpoint(path)
    resumed = checkpoint.build_model(backend)
    resumed_optimizer = checkpoint.build_optimizer(resumed)
    assert resumed_optimizer.steps == 3 and type(resumed_optimizer) is type(first_optimizer)
    run_steps(resumed, resumed_optimizer, data[3:])  # Dropout masks continue from the saved generator state

    for (key, expected), actual in zip(straight.state_dict().items(), resumed.state_dict().values()):
        numpy.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7, err_msg=key)
    for key, buffers in straight_optimizer.buffers.items():
        for expected, actual in zip(buffers, resumed_optimizer.buffers[key]):
            numpy.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7)


def test_dropout_layers_sharing_a_generator_resume_exactly_and_share_it_again(tmp_path):
    # A spec's Dropout layers all draw from the model's generator: saved once, they must share one
    # again, or the masks after the resume would not interleave as in the uninterrupted run.
    from cnn_backend.spec import build_model

    backend = get_backend("cpu", "float64")
    spec = [{"type": "Flatten"}, {"type": "Dropout", "rate": 0.5}, {"type": "FullyConnected", "out_features": 8},
            {"type": "Dropout", "rate": 0.5}, {"type": "FullyConnected", "out_features": 3}]
    data = batches(6)
    straight = build_model(spec, (1, 4, 4), backend=backend, seed=4)
    assert straight.layers[1].rng is straight.layers[3].rng
    straight_optimizer = make_optimizer("sgd", straight.parameters(), backend, lr=0.1)
    run_steps(straight, straight_optimizer, data)

    first_half = build_model(spec, (1, 4, 4), backend=backend, seed=4)
    first_optimizer = make_optimizer("sgd", first_half.parameters(), backend, lr=0.1)
    run_steps(first_half, first_optimizer, data[:3])
    checkpoint = load_checkpoint(save(tmp_path / "last.npz", first_half, first_optimizer, epoch=3))
    assert checkpoint.state["rng"]["dropout"]["3"] == {"same_as": "1"}
    resumed = checkpoint.build_model(backend)
    assert resumed.layers[1].rng is resumed.layers[3].rng
    run_steps(resumed, checkpoint.build_optimizer(resumed), data[3:])
    for key, expected in straight.state_dict().items():
        numpy.testing.assert_array_equal(resumed.state_dict()[key], expected, err_msg=key)


def test_momentum_added_on_resuming_starts_from_a_zero_velocity(tmp_path):
    backend = get_backend("cpu", "float64")
    model = tiny_model(backend)
    optimizer = make_optimizer("sgd", model.parameters(), backend, lr=0.05)  # no momentum: no velocity kept
    run_steps(model, optimizer, batches(2))
    checkpoint = load_checkpoint(save(tmp_path / "last.npz", model, optimizer))
    resumed = checkpoint.build_optimizer(checkpoint.build_model(backend), momentum=0.9)
    assert resumed.steps == 2 and resumed.momentum == 0.9
    assert all(not velocity.any() for velocity in resumed.buffers["velocity"])


def test_checkpoint_keeps_the_training_state(tmp_path):
    backend = get_backend("cpu")
    model = tiny_model(backend)
    optimizer = make_optimizer("sgd", model.parameters(), backend, lr=0.05, momentum=0.9)
    run_steps(model, optimizer, batches(2))
    checkpoint = load_checkpoint(save(tmp_path / "c.npz", model, optimizer, epoch=7))
    assert checkpoint.epoch == 7
    assert checkpoint.settings == SETTINGS
    assert checkpoint.optimizer_name == "sgd"
    assert checkpoint.schedule == {"name": "constant", "base_lr": 0.05}
    assert checkpoint.best == {"epoch": 7, "val_accuracy": 0.5}
    assert checkpoint.history == [{"epoch": 7, "train_loss": 1.0}]
    assert checkpoint.state["rng"]["loader_seed"] == 0
    assert checkpoint.state["rng"]["dropout"]["3"] == model.layers[3].rng.bit_generator.state
    assert [path.name for path in tmp_path.iterdir()] == ["c.npz"]  # written atomically, no temporary left


def test_a_checkpoint_load_would_refuse_is_refused_when_saved_and_nothing_is_written(tmp_path):
    backend = get_backend("cpu")
    model = tiny_model(backend)
    optimizer = make_optimizer("sgd", model.parameters(), backend, lr=0.05, momentum=0.9)
    with pytest.raises(ValueError, match=r"^save_checkpoint: epoch \(the number of epochs finished\) must be an integer >= 1, got 0$"):
        save(tmp_path / "c.npz", model, optimizer, epoch=0)
    other = make_optimizer("sgd", tiny_model(backend).parameters(), backend, lr=0.05, momentum=0.9)
    with pytest.raises(ValueError, match=r"^save_checkpoint: the optimizer does not update this model's parameters; "):
        save(tmp_path / "c.npz", model, other, epoch=1)
    assert list(tmp_path.iterdir()) == []


def test_a_loaded_model_with_an_input_description_is_checkpointed_again(tmp_path):
    from cnn_backend.inputs import InputSpec

    backend = get_backend("cpu")
    model = tiny_model(backend)
    model.input_spec = InputSpec(("ant", "bee", "cow"), 1, (4, 4), None)
    first = load_checkpoint(save(tmp_path / "a.npz", model, make_optimizer("sgd", model.parameters(), backend, lr=0.05)))
    loaded = Sequential.load(first.path)  # a model read from a checkpoint carries its input description
    optimizer = make_optimizer("sgd", loaded.parameters(), backend, lr=0.05)
    again = load_checkpoint(save(tmp_path / "b.npz", loaded, optimizer, epoch=2, inputs=loaded.input_spec))
    assert again.input_spec().config() == first.input_spec().config()
    assert list(again.input_spec().class_names) == ["ant", "bee", "cow"]


def test_a_checkpoint_is_also_a_plain_model_file(tmp_path):
    backend = get_backend("cpu")
    model = seed_cnn(backend, seed=1)
    optimizer = make_optimizer("adam", model.parameters(), backend, lr=1e-3)
    path = save(tmp_path / "c.npz", model, optimizer)
    loaded = Sequential.load(path)
    for name, value in model.state_dict().items():
        numpy.testing.assert_array_equal(loaded.state_dict()[name], value)


def test_a_checkpoint_loaded_and_saved_again_keeps_its_input_description(tmp_path):
    from cnn_backend.data import Normalization
    from cnn_backend.inputs import InputSpec

    backend = get_backend("cpu")
    model = tiny_model(backend)
    optimizer = make_optimizer("sgd", model.parameters(), backend, lr=0.05)
    recorded = InputSpec(("ant", "bee", "cow"), 1, (4, 4), Normalization([0.25], [0.5]))
    path = save(tmp_path / "c.npz", model, optimizer, inputs=recorded)
    loaded = Sequential.load(path)
    assert loaded.input_spec == recorded
    again = load_checkpoint(loaded.save(tmp_path / "again.npz"), require_training_state=False)
    assert again.input_spec() == recorded and again.input_spec().recorded
    # A model built in code records none until given one; files without one get the assumed input.
    assert Sequential.load(tiny_model(backend).save(tmp_path / "bare.npz")).input_spec is None
    assert not load_checkpoint(tmp_path / "bare.npz", require_training_state=False).input_spec().recorded
    loaded.input_spec = recorded.config()  # the description's dict, not the description
    with pytest.raises(TypeError, match=r"model.input_spec must be a cnn_backend.inputs.InputSpec or None, not dict"):
        loaded.save(tmp_path / "wrong.npz")
    assert not (tmp_path / "wrong.npz").exists()
    colour = Sequential.from_spec([{"type": "Convolution", "out_channels": 2, "kernel_size": 3}, {"type": "Flatten"},
                                   {"type": "FullyConnected", "out_features": 3}], (1, 6, 6))
    colour.input_spec = InputSpec(("ant", "bee"), 1, (6, 6))
    with pytest.raises(ValueError, match=r"model.input_spec names 2 classes but the network has 3 outputs"):
        colour.save(tmp_path / "wrong.npz")
    colour.input_spec = InputSpec(("ant", "bee", "cow"), 3, (6, 6))
    with pytest.raises(ValueError, match=r"model.input_spec describes 3-channel images but the network takes 1 channels"):
        colour.save(tmp_path / "wrong.npz")
    colour.input_spec = InputSpec(("ant", "bee", "cow"), 1, (8, 6))
    with pytest.raises(ValueError, match=r"^model.input_spec describes 8x6 images but the network was built for 6x6: give the InputSpec image_size=\(6, 6\)$"):
        colour.save(tmp_path / "wrong.npz")
    assert not (tmp_path / "wrong.npz").exists()
    with pytest.raises(ValueError, match=r"InputSpec: class_names must be a sequence of strings, one per class, got 'abc'"):
        InputSpec("abc", 1, (4, 4))


def test_loading_a_model_file_with_non_finite_weights_is_refused_in_one_line(tmp_path):
    model = tiny_model(get_backend("cpu"))
    model.layers[1].params["weight"].data[0, 0] = numpy.nan
    path = model.save(tmp_path / "diverged.npz")
    with pytest.raises(ModelFileError, match=r"diverged.npz: parameter 1.weight holds NaN or infinite values") as info:
        Sequential.load(path)
    assert "\n" not in str(info.value)


def test_a_plain_model_file_evaluates_but_does_not_resume(tmp_path):
    model = seed_cnn("cpu", seed=1)
    path = model.save(tmp_path / "model.npz")
    checkpoint = load_checkpoint(path, require_training_state=False)
    assert not checkpoint.is_training_checkpoint and checkpoint.settings == {}
    assert checkpoint.build_model(get_backend("cpu")).config() == model.config()
    with pytest.raises(ModelFileError, match="without training state"):
        load_checkpoint(path)


def test_float64_resume_of_a_float32_checkpoint(tmp_path):
    model = seed_cnn("cpu", seed=1)
    optimizer = make_optimizer("sgd", model.parameters(), model.backend, lr=0.01, momentum=0.9)
    checkpoint = load_checkpoint(save(tmp_path / "c.npz", model, optimizer))
    resumed = checkpoint.build_model(get_backend("cpu", "float64"))
    resumed_optimizer = checkpoint.build_optimizer(resumed)
    assert resumed.parameters()[0].data.dtype == numpy.float64
    assert resumed_optimizer.buffers["velocity"][0].dtype == numpy.float64


@pytest.fixture
def good_checkpoint(tmp_path):
    backend = get_backend("cpu")
    model = tiny_model(backend)
    optimizer = make_optimizer("adam", model.parameters(), backend, lr=1e-3)
    return save(tmp_path / "good.npz", model, optimizer)


def rewrite(source, target, change):
    arrays = dict(numpy.load(source))
    change(arrays)
    numpy.savez(target, **arrays)
    return target


def edit_state(arrays, **changes):
    state = json.loads(str(arrays[STATE_KEY]))
    state.update(changes)
    arrays[STATE_KEY] = json_array(state)


BROKEN = {
    "truncated": (lambda good, bad: bad.write_bytes(good.read_bytes()[:2000]), "not an .npz archive"),
    "random bytes": (lambda good, bad: bad.write_bytes(numpy.random.default_rng(0).bytes(4000)), "not an .npz archive"),
    "empty": (lambda good, bad: bad.write_bytes(b""), "not an .npz archive"),
    "missing parameter": (lambda good, bad: rewrite(good, bad, lambda a: a.pop("param/1.weight")), r"missing \['1.weight'\]"),
    "missing optimiser buffer": (lambda good, bad: rewrite(good, bad, lambda a: a.pop("optim/second_moment/0")), "second_moment/0"),
    "missing training state": (lambda good, bad: rewrite(good, bad, lambda a: a.pop(STATE_KEY)), "without training state"),
    "incomplete training state": (lambda good, bad: rewrite(good, bad, lambda a: a.__setitem__(STATE_KEY, json_array({"format": 1}))),
                                  "missing epoch"),
    "bad json": (lambda good, bad: rewrite(good, bad, lambda a: a.__setitem__(STATE_KEY, numpy.array("{not json"))), "not valid JSON"),
    "unknown optimiser": (lambda good, bad: rewrite(good, bad, lambda a: edit_state(a, optimizer={"name": "lbfgs", "config": {}, "steps": 0})),
                          "unknown optimizer 'lbfgs'"),
    "newer format": (lambda good, bad: rewrite(good, bad, lambda a: edit_state(a, format=99)), "format 99 is not one"),
    "wrong types": (lambda good, bad: rewrite(good, bad, lambda a: edit_state(a, epoch="3", history={})), r"malformed training state \(epoch, history\)"),
    "optimizer not a dict": (lambda good, bad: rewrite(good, bad, lambda a: edit_state(a, optimizer="adam")), "unknown optimizer 'adam'"),
    "dropout state of another model": (lambda good, bad: rewrite(good, bad, lambda a: edit_state(
        a, rng={"loader_seed": 0, "dropout": {"1": {"bit_generator": "PCG64"}}})), "Dropout"),
    "wrong parameter shape": (lambda good, bad: rewrite(good, bad, lambda a: a.__setitem__("param/1.weight", a["param/1.weight"][:3])),
                              "1.weight has shape"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoints_are_refused_with_one_line(good_checkpoint, tmp_path, case):
    make_bad, message = BROKEN[case]
    bad = tmp_path / "bad.npz"
    make_bad(good_checkpoint, bad)
    with pytest.raises(ModelFileError, match=message) as caught:
        checkpoint = load_checkpoint(bad)
        model = checkpoint.build_model(get_backend("cpu"))
        checkpoint.build_optimizer(model)
    assert "\n" not in str(caught.value) and str(bad) in str(caught.value)


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        load_checkpoint(tmp_path / "absent.npz")
