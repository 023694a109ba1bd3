"""Layers of your own: registration by name (specs, model files), options read from the constructor,
the public finite-difference check, and a registered layer through training, saving and devices."""

from __future__ import annotations

import copy
import re

import numpy
import pytest

from cnn_backend import ModelFileError, Sequential, SpecError, build_model, register_layer
from cnn_backend.backend import cpu_backend
from cnn_backend.checkpoint import load_checkpoint
from cnn_backend.gradcheck import GradientCheckError, check_layer_gradients
from cnn_backend.layers import LAYER_TYPES, BatchNorm, Convolution, Flatten, FullyConnected, Layer, Residual, SoftmaxCrossEntropy
from cnn_backend.optim import SGD
from cnn_backend.spec import layer_options
from cnn_backend.parameters import Parameter
from cnn_backend.testing import standin_backend
from cnn_backend.training import train_step

from layer_helpers import Block, ChannelScale, forget_layer_type, import_example_layers


#: registrations are process-wide: each test's are undone after it
pytestmark = pytest.mark.usefixtures("registry_restored")


class WrongScaleGradient(ChannelScale):
    def backward(self, dy):
        dx = super().backward(dy)
        self.params["scale"].grad = 2 * self.params["scale"].grad
        return dx


def spec_with(entry: dict) -> dict:
    return {"layers": [
        {"type": "Convolution", "out_channels": 3, "kernel_size": 3}, entry, {"type": "ReLU"},
        {"type": "Flatten"}, {"type": "FullyConnected", "out_features": 4},
    ]}  # fmt: skip


def images(n=6, seed=0):
    return numpy.random.default_rng(seed).random((n, 1, 8, 8)).astype(numpy.float32)


# -- registration and specs ----------------------------------------------------------------------


def test_a_registered_layer_is_built_from_a_spec_with_its_options():
    assert register_layer(ChannelScale) is ChannelScale  # usable as a decorator
    model = build_model(spec_with({"type": "ChannelScale", "initial": 0.5}), (1, 8, 8), seed=0)
    layer = model[1]
    assert isinstance(layer, ChannelScale) and layer.initial == 0.5
    numpy.testing.assert_array_equal(layer.params["scale"].data, numpy.full(3, 0.5, numpy.float32))
    assert model.forward(images()).shape == (6, 4)
    default = build_model(spec_with({"type": "ChannelScale"}), (1, 8, 8), seed=0)
    assert default[1].initial == 1.0
    assert [row.description for row in model.summary().rows][1] == "initial=0.5"


def test_options_are_checked_by_their_annotation_or_default_and_required_ones_must_be_given():
    class Shift(Layer):
        def __init__(self, amount, in_features=None, repeats=2, label: str = "s", *, backend=None, rng=None):
            super().__init__(backend)
            if not -10 <= amount <= 10:
                raise ValueError(f"Shift: amount must be in [-10, 10], got {amount!r}")
            self.amount, self.repeats, self.label = amount, repeats, label  # no config(): read from these

        def forward(self, x):
            return x

    register_layer(Shift)
    assert set(layer_options("Shift")) == {"amount", "repeats", "label"}  # no backend, rng or inferred in_* size
    cases = {
        "missing required option 'amount'": {"type": "Shift"},
        "repeats must be an integer, got 2.5": {"type": "Shift", "amount": 1, "repeats": 2.5},
        "label must be a string, got 3": {"type": "Shift", "amount": 1, "label": 3},
        "unknown option 'amout' (did you mean amount?)": {"type": "Shift", "amout": 1},
        "layer 0 (Shift): amount must be in [-10, 10], got 11": {"type": "Shift", "amount": 11},
    }
    for message, entry in cases.items():
        with pytest.raises(SpecError) as caught:
            build_model({"layers": [entry]}, (4,))
        assert message in str(caught.value)
    build_model({"layers": [{"type": "Shift", "amount": numpy.int64(3)}]}, (4,))  # a NumPy number counts


def test_an_unknown_type_points_to_registration():
    with pytest.raises(SpecError, match=r"unknown layer type 'NoSuchScale'.*cnn_backend\.register_layer, or --import MODULE"):
        build_model(spec_with({"type": "NoSuchScale"}), (1, 8, 8))
    # a class defined (its module imported) but not registered: the decorator is what is missing
    with pytest.raises(SpecError, match=r"unknown layer type 'ChannelScale': layer_helpers.ChannelScale is a layer class, but not "
                                        r"registered: decorate it with @cnn_backend.register_layer"):
        build_model(spec_with({"type": "ChannelScale"}), (1, 8, 8))


def test_registration_refuses_what_is_not_a_layer_a_built_in_name_and_a_name_taken_by_another_class():
    with pytest.raises(TypeError, match=r"takes a subclass of cnn_backend\.layers\.Layer"):
        register_layer(dict)
    with pytest.raises(TypeError, match=r"takes a subclass"):
        register_layer(ChannelScale(backend="cpu"))  # an instance, not the class

    class ReLU(Layer):
        pass

    with pytest.raises(ValueError, match=r"ReLU is a built-in layer type: give your class another name"):
        register_layer(ReLU)
    register_layer(ChannelScale)
    impostor = type("ChannelScale", (Layer,), {"__module__": "elsewhere"})
    with pytest.raises(ValueError, match=r"already registered by layer_helpers\.ChannelScale: rename one"):
        register_layer(impostor)
    assert LAYER_TYPES["ChannelScale"] is ChannelScale


def test_registering_the_same_class_again_replaces_it_as_a_reloaded_module_does():
    register_layer(ChannelScale)
    reloaded = type("ChannelScale", (ChannelScale,), {"__module__": ChannelScale.__module__, "__qualname__": "ChannelScale"})
    register_layer(reloaded)
    assert LAYER_TYPES["ChannelScale"] is reloaded
    assert isinstance(build_model(spec_with({"type": "ChannelScale"}), (1, 8, 8))[1], reloaded)


# -- training, files, devices --------------------------------------------------------------------


def test_a_registered_layer_trains_saves_and_loads(tmp_path):
    register_layer(ChannelScale)
    model = build_model(spec_with({"type": "ChannelScale", "initial": 0.5}), (1, 8, 8), seed=0)
    backend = model.backend
    optimizer = SGD(model.parameters(), lr=0.1, backend=backend)
    loss_fn = SoftmaxCrossEntropy(backend)
    x, y = images(), numpy.arange(6) % 4
    before = model[1].params["scale"].data.copy()
    for _ in range(3):
        train_step(model, loss_fn, optimizer, x, y)
    assert not numpy.array_equal(model[1].params["scale"].data, before)  # in the flat buffer, updated by the optimiser
    model.eval()
    expected = model.forward(x)
    path = model.save(tmp_path / "model.npz")
    loaded = Sequential.load(path)
    assert isinstance(loaded[1], ChannelScale) and loaded[1].initial == 0.5
    numpy.testing.assert_array_equal(loaded.eval().forward(x), expected)
    numpy.testing.assert_array_equal(load_checkpoint(path, require_training_state=False).build_model(cpu_backend()).eval().forward(x), expected)


def test_a_model_file_with_an_unregistered_type_says_how_to_load_it(tmp_path):
    register_layer(ChannelScale)
    path = build_model(spec_with({"type": "ChannelScale"}), (1, 8, 8), seed=0).save(tmp_path / "model.npz")
    forget_layer_type("ChannelScale")
    with pytest.raises(ModelFileError, match=r"model\.npz: the model config cannot be built: .*unknown layer type 'ChannelScale'.*register_layer") as caught:
        Sequential.load(path)
    assert "\n" not in str(caught.value)


def test_a_layer_written_against_the_backend_runs_alike_on_the_device_stand_in():
    register_layer(ChannelScale)
    spec = spec_with({"type": "ChannelScale", "initial": 0.5})
    on_cpu = build_model(spec, (1, 8, 8), backend=cpu_backend("float64", parallel=False), seed=3)
    standin = standin_backend("float64")
    on_device = build_model(spec, (1, 8, 8), backend=standin, seed=3)
    x = images().astype(numpy.float64)
    numpy.testing.assert_array_equal(standin.to_numpy(on_device.forward(standin.to_device(x))), on_cpu.forward(x))
    dy = numpy.ones((6, 4))
    on_cpu.backward(dy)
    on_device.backward(standin.to_device(dy))
    numpy.testing.assert_array_equal(standin.to_numpy(on_device[1].params["scale"].grad), on_cpu[1].params["scale"].grad)


# -- the gradient check --------------------------------------------------------------------------


def test_gradient_check_passes_a_correct_layer_and_reports_each_array():
    report = check_layer_gradients(ChannelScale(0.7), input_shape=(3, 4, 5))
    assert set(report.worst) == {"input", "scale"}
    assert all(value <= 1.0 for value in report.worst.values())


def test_gradient_check_names_the_wrong_parameter_gradient_and_both_values():
    with pytest.raises(GradientCheckError, match=r"the gradient of parameter 'scale' differs from its finite differences at \(\d+,\): backward gives"):
        check_layer_gradients(WrongScaleGradient(0.7), input_shape=(3, 4, 5))


def test_gradient_check_catches_a_wrong_input_gradient_a_missing_one_and_an_unset_parameter_gradient():
    class HalfInputGradient(ChannelScale):
        def backward(self, dy):
            return super().backward(dy) / 2

    class NoInputGradient(ChannelScale):
        def backward(self, dy):
            super().backward(dy)

    class NoParameterGradient(ChannelScale):
        def backward(self, dy):
            return dy * self._per_channel(dy.ndim)

    with pytest.raises(GradientCheckError, match=r"^the input gradient differs"):
        check_layer_gradients(HalfInputGradient(), input_shape=(2, 3))
    with pytest.raises(GradientCheckError, match=r"backward returned None for the input gradient"):
        check_layer_gradients(NoInputGradient(), input_shape=(2, 3))
    with pytest.raises(GradientCheckError, match=r"left the gradient of parameter 'scale' unset"):
        check_layer_gradients(NoParameterGradient(), input_shape=(2, 3))


def test_gradient_check_leaves_the_layer_as_it_was():
    model = build_model({"layers": [{"type": "FullyConnected", "out_features": 3}]}, (4,), seed=0)
    layer = model[0]
    weight = layer.params["weight"].data.copy()
    check_layer_gradients(layer, input_shape=(4,))
    assert layer.backend.dtype == numpy.float32 and layer.params["weight"].data.dtype == numpy.float32
    numpy.testing.assert_array_equal(layer.params["weight"].data, weight)
    assert layer.params["weight"]._flat is not None  # still in the model's flat buffer
    assert copy.deepcopy(layer).backend is layer.backend  # a copy computes on the same device


def test_gradient_check_takes_a_batch_in_any_layout_and_refuses_both_or_neither():
    x = numpy.random.default_rng(1).standard_normal((3, 2, 4, 4))
    batch_innermost = numpy.ascontiguousarray(x.transpose(1, 2, 3, 0)).transpose(3, 0, 1, 2)
    check_layer_gradients(ChannelScale(0.3), x=batch_innermost)
    with pytest.raises(ValueError, match=r"either input_shape .* or the batch x"):
        check_layer_gradients(ChannelScale(), (2, 4, 4), x=x)
    with pytest.raises(ValueError, match=r"either input_shape"):
        check_layer_gradients(ChannelScale())


# -- the example in examples/prelu.py --------------------------------------------------------------


@pytest.fixture()
def prelu_module():
    return import_example_layers("prelu")


def test_the_prelu_example_passes_the_gradient_check_on_images_and_vectors(prelu_module):
    for shape in ((3, 4, 4), (5,)):
        report = check_layer_gradients(prelu_module.PReLU(0.2), input_shape=shape)
        assert set(report.worst) == {"input", "slope"}


def prelu_on_the_stand_in():
    """The PReLU example's network run forward and backward on the stand-in device, and its
    forward output on the plain CPU backend: ``(stand-in backend, its output, the CPU's)``."""
    spec = {"layers": [{"type": "Convolution", "out_channels": 3, "kernel_size": 3}, {"type": "PReLU"}, {"type": "Flatten"},
                       {"type": "FullyConnected", "out_features": 4}, {"type": "PReLU", "initial_slope": 0.1}]}
    standin = standin_backend("float64")
    on_device = build_model(spec, (1, 8, 8), backend=standin, seed=1)
    on_cpu = build_model(spec, (1, 8, 8), backend=cpu_backend("float64", parallel=False), seed=1)
    x = images().astype(numpy.float64) - 0.5
    device_output = standin.to_numpy(on_device.forward(standin.to_device(x)))
    on_device.backward(standin.to_device(numpy.ones((6, 4))))
    return standin, device_output, on_cpu.forward(x)


def test_the_prelu_example_matches_the_cpu_on_the_stand_in(prelu_module):
    standin, device_output, cpu_output = prelu_on_the_stand_in()
    numpy.testing.assert_array_equal(device_output, cpu_output)
    assert "where" in standin.usage.module_names and "minimum" in standin.usage.module_names


def test_the_prelu_example_uses_only_names_cupy_has(prelu_module):
    pytest.importorskip("cupy", reason="CuPy is not installed, so the names cannot be checked against it (pip install cupy-cuda12x; no GPU needed)")
    from cnn_backend.testing import missing_cupy_names

    standin, _, _ = prelu_on_the_stand_in()
    missing = missing_cupy_names(standin.usage)
    assert not any(missing.values()), missing


# -- what a model file records of a layer of one's own ------------------------------------------------


class NoisyInit(Layer):
    """Weights drawn from the generator build hands in, whoever builds it."""

    def __init__(self, units: int, init_std: float | None = None, *, backend=None):
        super().__init__(backend)
        self.units, self.init_std = units, init_std

    def _build(self, input_shape, rng):
        std = 1.0 if self.init_std is None else self.init_std
        weight = rng.standard_normal((input_shape[0], self.units)) * std
        self.params = {"weight": Parameter(self.backend.to_device(weight.astype(self.backend.dtype)))}
        return (self.units,)

    def config(self):
        return {"units": self.units, "init_std": self.init_std}

    def forward(self, x):
        return x @ self.params["weight"].data


def test_a_layer_drawing_its_weights_builds_without_a_seed_from_python_and_alone():
    from cnn_backend.layers import Flatten

    model = Sequential([Flatten(), NoisyInit(3)], input_shape=(1, 2, 2))  # no rng given: one is made
    assert model.output_shape == (3,) and model[1].params["weight"].data.shape == (4, 3)
    assert NoisyInit(5).build((4,)) == (5,)


def test_an_optional_annotation_takes_none_or_its_type():
    register_layer(NoisyInit)
    spec = {"layers": [{"type": "Flatten"}, {"type": "NoisyInit", "units": 3, "init_std": "x"}]}
    with pytest.raises(SpecError, match=r"^layer 1 \(NoisyInit\): init_std must be a number, got 'x'$"):
        build_model(spec, (1, 2, 2))
    for init_std in (None, 0.5):
        spec["layers"][1]["init_std"] = init_std
        assert build_model(spec, (1, 2, 2), seed=0)[1].init_std == init_std


def own_layer(name: str, config, init=None):
    """A registered layer class ``name`` with option ``a`` (default 1.0) and the given ``config``."""

    def __init__(self, a: float = 1.0, *, backend=None):
        Layer.__init__(self, backend)
        self.a = a
        if init is not None:
            init(self)

    attributes = {"__init__": __init__, "forward": lambda self, x: x, "__module__": __name__}
    if config is not None:
        attributes["config"] = config
    return register_layer(type(name, (Layer,), attributes))


def flatten_then(entry: dict) -> dict:
    return {"layers": [{"type": "Flatten"}, entry, {"type": "FullyConnected", "out_features": 2}]}


def test_a_config_that_would_not_rebuild_the_layer_is_refused_when_it_is_built(tmp_path):
    own_layer("WrongKey", lambda self: {"alpha": self.a})
    with pytest.raises(SpecError, match=r"^layer 1 \(WrongKey\): unknown option 'alpha' \(WrongKey takes a\); WrongKey\.config\(\) must return its constructor's options$"):
        build_model(flatten_then({"type": "WrongKey"}), (1, 2, 2))
    own_layer("Listing", lambda self: [self.a])
    with pytest.raises(SpecError, match=r"^layer 1 \(Listing\): Listing\.config\(\) returned list: return a dict of its constructor's options$"):
        build_model(flatten_then({"type": "Listing"}), (1, 2, 2))
    own_layer("Forgets", lambda self: {})
    with pytest.raises(SpecError, match=r"^layer 1 \(Forgets\): its config\(\) gives a=1\.0 for a layer built with a=3\.0: return every constructor option"):
        build_model(flatten_then({"type": "Forgets", "a": 3.0}), (1, 2, 2))

    class Unsaveable(Layer):
        def __init__(self, table=None, *, backend=None):  # an option no annotation or default types
            super().__init__(backend)

        def config(self):
            return {"table": object()}

    register_layer(Unsaveable)
    with pytest.raises(SpecError, match=r"^layer 1 \(Unsaveable\): config\(\) gives table=<object .*>, which a model file cannot hold"):
        build_model(flatten_then({"type": "Unsaveable"}), (1, 2, 2))
    # Built in Python, the same layer is refused when its model is written, and nothing is written.
    from cnn_backend.layers import Flatten, FullyConnected

    model = Sequential([Flatten(), LAYER_TYPES["WrongKey"](), FullyConnected(out_features=2)], input_shape=(1, 2, 2))
    with pytest.raises(SpecError, match=r"^layer 1 \(WrongKey\): unknown option 'alpha'"):
        model.save(tmp_path / "model.npz")
    assert list(tmp_path.iterdir()) == []


def test_numpy_values_from_config_are_written_as_python_numbers(tmp_path):
    import json

    own_layer("NumpyConfig", lambda self: {"a": numpy.float32(self.a)})
    model = build_model(flatten_then({"type": "NumpyConfig", "a": 0.5}), (1, 2, 2), seed=0)
    assert type(model.config()["layers"][1]["a"]) is float
    json.dumps(model.config())
    assert Sequential.load(model.save(tmp_path / "model.npz"))[1].a == 0.5


def test_errors_of_ones_own_constructor_and_build_name_the_layer_in_one_line():
    def refuse(self):
        raise TypeError("needs a lookup table")

    own_layer("Grumpy", None, init=refuse)
    with pytest.raises(SpecError, match=r"^layer 1 \(Grumpy\): TypeError: needs a lookup table$"):
        build_model(flatten_then({"type": "Grumpy"}), (1, 2, 2))

    class NeedsThreeChannels(ChannelScale):
        def _build(self, input_shape, rng):
            if input_shape[0] != 3:
                raise ValueError("needs 3 channels")
            return super()._build(input_shape, rng)

    register_layer(NeedsThreeChannels)
    with pytest.raises(SpecError, match=r"^layer 0 \(NeedsThreeChannels\): needs 3 channels$"):
        build_model({"layers": [{"type": "NeedsThreeChannels"}, {"type": "Flatten"}]}, (1, 2, 2))


def test_registration_refuses_an_option_a_spec_entry_reserves_and_a_container_without_layers():
    with pytest.raises(ValueError, match=r"^Typed: an option cannot be called 'type' .*: rename it$"):
        register_layer(type("Typed", (Layer,), {"__init__": lambda self, type="a", *, backend=None: Layer.__init__(self, backend)}))
    # Most often a container that forgot children(): told what children() gives, and the rename otherwise.
    with pytest.raises(ValueError, match=r'^Listed takes `layers` but defines no children\(\): a container lists its inner layers in children\(\) as \("layers\.0", layer\) pairs.*rename an option `layers` that means something else'):
        register_layer(type("Listed", (Layer,), {"__init__": lambda self, layers=(), *, backend=None: Layer.__init__(self, backend)}))

    class Stack(Layer):
        def children(self):
            return []

    with pytest.raises(TypeError, match=r"^Stack holds other layers \(it defines children\(\)\): a spec rebuilds such a layer when its constructor takes them as `layers`"):
        register_layer(Stack)


# -- options kept on every path ------------------------------------------------------------------------


class Swish(Layer):
    """``x * sigmoid(beta * x)``; keeps its option as an attribute and defines no config()."""

    def __init__(self, beta: float = 1.0, *, backend=None):
        super().__init__(backend)
        self.beta = beta

    def forward(self, x):
        return x / (1 + self.backend.xp.exp(-self.beta * x))


def test_options_kept_as_attributes_are_recorded_inside_blocks_without_input_shape_and_after_re_registering(tmp_path):
    register_layer(Swish)
    spec = {"layers": [{"type": "Convolution", "out_channels": 2, "kernel_size": 3, "padding": 1},
                       {"type": "Residual", "layers": [{"type": "Swish", "beta": 3.0}]},
                       {"type": "Flatten"}, {"type": "FullyConnected", "out_features": 2}]}  # fmt: skip
    model = build_model(spec, (1, 4, 4), seed=0)
    inner = model[1].layers[0]
    assert repr(inner) == "Swish(beta=3.0)" and model.summary().rows[2].description == "beta=3.0"
    assert Sequential.load(model.save(tmp_path / "block.npz"))[1].layers[0].beta == 3.0
    assert copy.deepcopy(model)[1].layers[0].beta == 3.0
    from cnn_backend.layers import Flatten

    unshaped = Sequential([Flatten(), Swish(2.0)])  # no input shape: the older form of the config
    assert Sequential.from_config(unshaped.config())[1].beta == 2.0
    # A notebook cell defining and registering the class again: models built before keep their options.
    register_layer(type("Swish", (Swish,), {"__module__": Swish.__module__, "__qualname__": "Swish"}))
    assert Sequential.load(model.save(tmp_path / "again.npz"))[1].layers[0].beta == 3.0


def test_a_registered_subclass_of_a_built_in_layer_is_recorded_under_its_own_name(tmp_path):
    class WideConvolution(Convolution):
        pass

    register_layer(WideConvolution)
    spec = flatten_then({"type": "Flatten"})
    spec["layers"][0] = {"type": "WideConvolution", "out_channels": 2, "kernel_size": 3}
    model = build_model(spec, (1, 5, 5), seed=0)
    assert model.config()["layers"][0]["type"] == "WideConvolution"
    assert "in_channels" not in model.config()["layers"][0]  # inferred, never recorded
    loaded = Sequential.load(model.save(tmp_path / "model.npz"))
    assert type(loaded[0]) is WideConvolution and loaded[0].out_channels == 2
    # Recorded from the built-in config() the subclasses inherit, less the sizes inferred from the input
    # (BatchNorm's num_features too, although the constructor they inherit takes it).
    plain = {name: register_layer(type(name, (parent,), {"__module__": __name__})) for name, parent in (
        ("PlainBatchNorm", BatchNorm), ("PlainFullyConnected", FullyConnected), ("PlainResidual", Residual))}  # fmt: skip
    spec = {"layers": [
        {"type": "Convolution", "out_channels": 2, "kernel_size": 3}, {"type": "PlainBatchNorm", "momentum": 0.3, "eps": 0.01},
        {"type": "PlainResidual", "layers": [{"type": "ReLU"}]}, {"type": "Flatten"},
        {"type": "PlainFullyConnected", "out_features": 3, "init": "glorot"},
    ]}  # fmt: skip
    model = build_model(spec, (1, 5, 5), seed=0)
    recorded = model.config()["layers"]
    assert recorded[1] == {"type": "PlainBatchNorm", "momentum": 0.3, "eps": 0.01}
    assert recorded[2]["layers"] == [{"type": "ReLU"}]
    assert recorded[4] == {"type": "PlainFullyConnected", "out_features": 3, "init": "glorot"}
    loaded = Sequential.load(model.save(tmp_path / "plain.npz"))
    assert [type(layer) for layer in loaded.layers[1:]] == [plain["PlainBatchNorm"], plain["PlainResidual"], Flatten, plain["PlainFullyConnected"]]
    assert loaded.config() == model.config()
    assert "num_features" not in layer_options("PlainBatchNorm")  # nor a spec option, as for BatchNorm itself
    spec["layers"][1]["num_features"] = 2
    with pytest.raises(SpecError, match=r"^layer 1 \(PlainBatchNorm\): unknown option 'num_features' \(input sizes are inferred from the input shape; leave it out\)$"):
        build_model(spec, (1, 5, 5))


class ScaledResidual(Residual):
    """``x + gain * f(x)``: a subclass of a built-in container with an option of its own."""

    def __init__(self, layers, gain: float = 1.0, *, backend=None):
        super().__init__(layers, backend=backend)
        self.gain = float(gain)

    def config(self):
        return {**super().config(), "gain": self.gain}

    def forward(self, x):
        inner = x
        for layer in self.layers:
            inner = layer.forward(inner)
        return x + self.gain * inner


class GainConvolution(Convolution):
    """A Convolution subclass whose config() leaves out the inferred in_channels, as the docs say."""

    def __init__(self, out_channels: int, kernel_size: int, gain: float = 1.0, *, in_channels=None, backend=None):
        super().__init__(in_channels, out_channels, kernel_size, backend=backend)
        self.gain = float(gain)

    def config(self):
        return {"out_channels": self.out_channels, "kernel_size": self.kernel_size, "gain": self.gain}

    def forward(self, x):
        return super().forward(x) * self.gain


class ShiftedBatchNorm(BatchNorm):
    def __init__(self, shift: float = 0.0, momentum: float = 0.1, *, backend=None):
        super().__init__(None, momentum, backend=backend)
        self.shift = float(shift)

    def config(self):
        return {"shift": self.shift, "momentum": self.momentum}

    def forward(self, x):
        return super().forward(x) + self.shift


class WideFullyConnected(FullyConnected):
    def __init__(self, out_features: int, width: int = 1, *, in_features=None, backend=None):
        super().__init__(in_features, out_features * width, backend=backend)
        self.width = width

    def config(self):
        return {"out_features": self.out_features // self.width, "width": self.width}


def test_a_registered_subclass_of_a_built_in_layer_keeps_its_own_options_in_specs_files_and_copies(tmp_path):
    for cls in (ScaledResidual, GainConvolution, ShiftedBatchNorm, WideFullyConnected):
        register_layer(cls)
    spec = {"layers": [
        {"type": "GainConvolution", "out_channels": 3, "kernel_size": 3, "gain": 2.0},
        {"type": "ShiftedBatchNorm", "shift": 0.5, "momentum": 0.2},
        {"type": "ScaledResidual", "gain": 0.5, "layers": [{"type": "Convolution", "out_channels": 3, "kernel_size": 3, "padding": 1}]},
        {"type": "Flatten"}, {"type": "WideFullyConnected", "out_features": 2, "width": 2},
    ]}  # fmt: skip
    model = build_model(spec, (1, 6, 6), seed=0)  # spec() keeps the subclasses' own gain, shift and width
    recorded = model.config()["layers"]
    assert recorded[0] == {"type": "GainConvolution", "out_channels": 3, "kernel_size": 3, "gain": 2.0}
    assert recorded[1] == {"type": "ShiftedBatchNorm", "shift": 0.5, "momentum": 0.2}  # what config() gives, no num_features
    assert recorded[2]["gain"] == 0.5 and recorded[4] == {"type": "WideFullyConnected", "out_features": 2, "width": 2}
    loaded = Sequential.load(model.save(tmp_path / "model.npz"))
    assert (loaded[0].gain, loaded[1].shift, loaded[2].gain, loaded[4].width) == (2.0, 0.5, 0.5, 2)
    assert copy.deepcopy(model)[2].gain == 0.5
    x = images(n=2, seed=1)[:, :, :6, :6]
    numpy.testing.assert_array_equal(loaded.eval().forward(x), model.eval().forward(x))
    assert model.summary().rows[0].description == "out_channels=3, kernel_size=3, gain=2.0"  # the summary reads the subclass's own options too


class Pad(Layer):
    """Zero-pads H and W by ``pads = (rows, columns)`` on each side; keeps its option as a tuple."""

    def __init__(self, pads=(1, 1), *, backend=None):
        super().__init__(backend)
        self.pads = tuple(int(p) for p in pads)

    def _build(self, input_shape, rng):
        return (input_shape[0], input_shape[1] + 2 * self.pads[0], input_shape[2] + 2 * self.pads[1])

    def forward(self, x):
        a, b = self.pads
        return self.backend.xp.pad(x, ((0, 0), (0, 0), (a, a), (b, b)))


class Corners(Layer):
    """An option holding tuples inside a list, kept as given."""

    def __init__(self, points=((0, 0),), *, backend=None):
        super().__init__(backend)
        self.points = [tuple(point) for point in points]

    def forward(self, x):
        return x


def test_tuple_options_are_written_as_lists_and_load_back(tmp_path):
    import json

    register_layer(Pad)
    register_layer(Corners)
    built_in_python = Sequential([Pad((2, 1)), Corners([(1, 2), (3, 4)]), Flatten(), FullyConnected(out_features=2)], input_shape=(1, 2, 2))
    document = json.loads(json.dumps(built_in_python.config()))
    assert document["layers"][:2] == [{"type": "Pad", "pads": [2, 1]}, {"type": "Corners", "points": [[1, 2], [3, 4]]}]
    loaded = Sequential.load(built_in_python.save(tmp_path / "model.npz"))  # config() gives a tuple, pads=(2, 1)
    assert (loaded[0].pads, loaded[1].points) == ((2, 1), [(1, 2), (3, 4)])
    # A file's lists, a Python spec's tuples (nested ones too) and a tuple default all build and record alike.
    for pad, corners in (({"pads": [2, 1]}, {"points": [[1, 2], [3, 4]]}), ({"pads": (2, 1)}, {"points": [(1, 2), (3, 4)]}), ({}, {})):
        spec = {"layers": ({"type": "Pad", **pad}, {"type": "Corners", **corners}, {"type": "Flatten"}, {"type": "FullyConnected", "out_features": 2})}
        model = build_model(spec, (1, 2, 2), seed=0)
        assert model.config()["layers"][0]["pads"] == ([2, 1] if pad else [1, 1])
        assert Sequential.load(model.save(tmp_path / "spec.npz"))[0].pads == model[0].pads


def test_an_unregistered_container_saves_its_inner_layers_and_loads_once_registered(tmp_path):
    from cnn_backend.layers import Tanh

    model = Sequential([Convolution(out_channels=2, kernel_size=3), Block([Tanh()]), Flatten(), FullyConnected(out_features=2)], input_shape=(1, 5, 5))
    path = model.save(tmp_path / "model.npz")  # the default config() holds the Tanh object itself
    assert model.config()["layers"][1] == {"type": "Block", "layers": [{"type": "Tanh"}]}
    with pytest.raises(ModelFileError, match=r"unknown layer type 'Block'.*register_layer"):
        Sequential.load(path)
    register_layer(Block)
    x = images(n=2)[:, :, :5, :5]
    numpy.testing.assert_array_equal(Sequential.load(path).forward(x), model.forward(x))


def test_an_unregistered_layer_is_written_under_its_own_name_inside_any_container_and_loads_once_registered(tmp_path):
    from cnn_backend.layers import Tanh

    class Bundle(Block):  # a container left unregistered until its file is loaded
        pass

    register_layer(Block)
    x = images(n=2)[:, :, :5, :5]
    for container in (Block, Residual, Bundle):  # registered, built in, unregistered: one rule
        model = Sequential([Convolution(out_channels=2, kernel_size=3), container([ChannelScale(0.5), Tanh()]), Flatten(),
                            FullyConnected(out_features=2)], input_shape=(1, 5, 5))  # fmt: skip
        # Refused before inside the registered Block, blaming Block.config(): the inner entry was checked as a spec's.
        assert model.config()["layers"][1] == {"type": container.__name__, "layers": [{"type": "ChannelScale", "initial": 0.5}, {"type": "Tanh"}]}
        path = model.save(tmp_path / f"{container.__name__}.npz")
        with pytest.raises(ModelFileError, match=rf"unknown layer type '{'Bundle' if container is Bundle else 'ChannelScale'}'.*register_layer"):
            Sequential.load(path)
        register_layer(ChannelScale)
        register_layer(Bundle)
        numpy.testing.assert_array_equal(Sequential.load(path).forward(x), model.forward(x))
        forget_layer_type("ChannelScale")
        forget_layer_type("Bundle")


def test_a_value_a_model_file_cannot_hold_is_refused_in_one_line_for_an_unregistered_class_too(tmp_path):
    class Table(Layer):
        def __init__(self, table=None, *, backend=None):
            super().__init__(backend)
            self.table = numpy.arange(40.0).reshape(5, 8) if table is None else table

        def forward(self, x):
            return x

    model = Sequential([Flatten(), Table(), FullyConnected(out_features=2)], input_shape=(1, 2, 2))
    with pytest.raises(SpecError, match=r"^layer 1 \(Table\): config\(\) gives table=array\(.*, which a model file cannot hold: return numbers") as caught:
        model.save(tmp_path / "model.npz")
    assert "\n" not in str(caught.value) and list(tmp_path.iterdir()) == []
    block = Sequential([Flatten(), Block([Table()]), FullyConnected(out_features=2)], input_shape=(1, 2, 2))
    with pytest.raises(SpecError, match=r"^layer 1 \(Block\) > layer 0 \(Table\): config\(\) gives table="):
        block.save(tmp_path / "block.npz")


def test_an_option_defaulting_to_none_takes_none_whatever_its_annotation():
    class Scaled(Layer):
        def __init__(self, scale: float = None, *, backend=None):  # noqa: RUF013 (as users write it)
            super().__init__(backend)
            self.scale = scale

        def forward(self, x):
            return x if self.scale is None else x * self.scale

    register_layer(Scaled)
    assert build_model(flatten_then({"type": "Scaled"}), (1, 2, 2))[1].scale is None
    with pytest.raises(SpecError, match=r"scale must be a number, got 'x'$"):
        build_model(flatten_then({"type": "Scaled", "scale": "x"}), (1, 2, 2))


def test_a_build_that_fails_or_returns_nothing_is_named_in_one_line():
    class NoShape(ChannelScale):
        def _build(self, input_shape, rng):
            super()._build(input_shape, rng)

    class Lookup(ChannelScale):
        def _build(self, input_shape, rng):
            return {"a": 1}["x"]

    for cls, message in ((NoShape, r"NoShape\._build returned None: return the per-sample output shape"),
                         (Lookup, r"KeyError in _build: 'x'")):  # fmt: skip
        register_layer(cls)
        with pytest.raises(SpecError, match=rf"^layer 0 \({cls.__name__}\): {message}$"):
            build_model({"layers": [{"type": cls.__name__}, {"type": "Flatten"}]}, (1, 2, 2))


def test_integer_buffers_keep_their_dtype_through_files_and_moves(tmp_path):
    class Counter(ChannelScale):
        def _build(self, input_shape, rng):
            self.buffers["seen"] = self.backend.xp.zeros((), dtype=numpy.int64)
            return super()._build(input_shape, rng)

        def forward(self, x):
            if self.training:
                self.buffers["seen"] += x.shape[0]
            return super().forward(x)

    register_layer(Counter)
    model = build_model(flatten_then({"type": "Counter"}), (1, 2, 2), seed=0)
    model.forward(numpy.zeros((3, 1, 2, 2), numpy.float32))
    model[1].buffers["seen"][...] = 2**24 + 1  # beyond float32's integers
    loaded = Sequential.load(model.save(tmp_path / "model.npz"))
    assert loaded[1].buffers["seen"].dtype == numpy.int64 and int(loaded[1].buffers["seen"]) == 2**24 + 1
    moved = loaded.to(cpu_backend("float64"))
    assert moved[1].buffers["seen"].dtype == numpy.int64


# -- containers of one's own: examples/rezero.py --------------------------------------------------------


@pytest.fixture()
def rezero_module():
    return import_example_layers("rezero")


def rezero_spec(**options) -> dict:
    block = {"type": "ReZero", "layers": [{"type": "Convolution", "out_channels": 3, "kernel_size": 3, "padding": 1}, {"type": "BatchNorm"}, {"type": "ReLU"}], **options}
    return {"layers": [{"type": "Convolution", "out_channels": 3, "kernel_size": 3}, block, {"type": "Flatten"}, {"type": "FullyConnected", "out_features": 4}]}


def test_a_container_of_ones_own_is_built_from_inner_layer_tables_trains_saves_and_loads(rezero_module, tmp_path):
    model = build_model(rezero_spec(initial_alpha=0.5), (1, 8, 8), seed=0)
    block = model[1]
    assert isinstance(block, rezero_module.ReZero) and block.initial_alpha == 0.5
    assert [type(layer).__name__ for layer in block.layers] == ["Convolution", "BatchNorm", "ReLU"]
    names = [name for name, _ in model.named_parameters()]
    assert names[2:5] == ["1.alpha", "1.layers.0.weight", "1.layers.0.bias"]
    optimizer = SGD(model.parameters(), lr=0.1, backend=model.backend)
    x, y = images(), numpy.arange(6) % 4
    for _ in range(3):
        train_step(model, SoftmaxCrossEntropy(model.backend), optimizer, x, y)
    assert block.params["alpha"].data[0] != 0.5 and block.layers[1].buffers["running_mean"].any()
    expected = model.eval().forward(x)
    assert not block.layers[1].training  # eval() reached the inner BatchNorm
    loaded = Sequential.load(model.save(tmp_path / "model.npz"))
    assert loaded.config()["layers"][1] == model.config()["layers"][1] == {**rezero_spec(initial_alpha=0.5)["layers"][1], "layers": [
        layer.spec() for layer in block.layers]}
    numpy.testing.assert_array_equal(loaded.eval().forward(x), expected)
    assert [row.name for row in loaded.summary().rows][1:5] == ["1", "1.layers.0", "1.layers.1", "1.layers.2"]


def test_a_container_of_ones_own_passes_the_gradient_check_and_a_wrong_inner_backward_is_caught(rezero_module):
    from cnn_backend.layers import Convolution, ReLU

    report = check_layer_gradients(rezero_module.ReZero([Convolution(out_channels=3, kernel_size=3, padding=1), ReLU()], initial_alpha=0.5), input_shape=(3, 4, 4))
    assert set(report.worst) == {"input", "alpha", "layers.0.weight", "layers.0.bias"}
    register_layer(WrongScaleGradient)
    with pytest.raises(GradientCheckError, match=r"parameter 'layers\.0\.scale'"):
        check_layer_gradients(rezero_module.ReZero([WrongScaleGradient()], initial_alpha=0.5), input_shape=(3, 4, 4))


def test_a_container_of_ones_own_names_its_inner_layers_in_spec_errors(rezero_module):
    cases = {
        "layer 1 (ReZero): missing required option 'layers'": {"type": "ReZero"},
        "layer 1 (ReZero): layers must be a list of layer tables, got 3": {"type": "ReZero", "layers": 3},
        "layer 1 (ReZero) > layer 0 (Convolution): unknown option 'filters'": {"type": "ReZero", "layers": [{"type": "Convolution", "filters": 3}]},
        "layer 1 (ReZero): the inner layers give (5, 6, 6) for an input of (3, 6, 6)": {"type": "ReZero", "layers": [{"type": "Convolution", "out_channels": 5, "kernel_size": 1}]},
        "layer 1 (ReZero): initial_alpha must be a number, got 'a'": {"type": "ReZero", "layers": [{"type": "ReLU"}], "initial_alpha": "a"},
    }
    for message, block in cases.items():
        spec = rezero_spec()
        spec["layers"][1] = block
        with pytest.raises(SpecError) as caught:
            build_model(spec, (1, 8, 8))
        assert message in str(caught.value), str(caught.value)


def test_a_container_that_does_not_keep_its_inner_layers_in_self_layers_is_refused(rezero_module):
    class Forgetful(rezero_module.ReZero):
        def __init__(self, layers, initial_alpha: float = 0.0, *, backend=None):
            super().__init__(layers, initial_alpha, backend=backend)
            self.layers = self.layers[:1]

    class Hidden(rezero_module.ReZero):
        def __init__(self, layers, initial_alpha: float = 0.0, *, backend=None):
            super().__init__(layers, initial_alpha, backend=backend)
            self.blocks = self.layers
            del self.layers

        def children(self):
            return [(f"blocks.{index}", layer) for index, layer in enumerate(self.blocks)]

        def config(self):
            return {"layers": [], "initial_alpha": self.initial_alpha}

    for cls, message in ((Forgetful, r"self\.layers holds 1 layers for a layer built with 3"), (Hidden, r"keep the inner layers in self\.layers, a list of layers")):
        register_layer(cls)
        spec = rezero_spec()
        spec["layers"][1]["type"] = cls.__name__
        with pytest.raises(SpecError, match=rf"^layer 1 \({cls.__name__}\): {message}"):
            build_model(spec, (1, 8, 8))


def test_the_rezero_example_matches_the_cpu_on_the_stand_in_with_names_cupy_has(rezero_module):
    spec = rezero_spec(initial_alpha=0.3)
    standin = standin_backend("float64")
    on_device = build_model(spec, (1, 8, 8), backend=standin, seed=1)
    on_cpu = build_model(spec, (1, 8, 8), backend=cpu_backend("float64", parallel=False), seed=1)
    x = images().astype(numpy.float64) - 0.5
    numpy.testing.assert_allclose(standin.to_numpy(on_device.forward(standin.to_device(x))), on_cpu.forward(x), rtol=1e-12, atol=1e-12)
    on_device.backward(standin.to_device(numpy.ones((6, 4))))
    on_cpu.backward(numpy.ones((6, 4)))
    numpy.testing.assert_allclose(standin.to_numpy(on_device[1].params["alpha"].grad), on_cpu[1].params["alpha"].grad, rtol=1e-12)
    pytest.importorskip("cupy", reason="CuPy is not installed, so the names cannot be checked against it (pip install cupy-cuda12x; no GPU needed)")
    from cnn_backend.testing import missing_cupy_names

    missing = missing_cupy_names(standin.usage)
    assert not any(missing.values()), missing


def test_a_subclass_of_a_fused_layer_that_changes_its_pass_runs_its_own_code_inside_a_model():
    from cnn_backend.layers import BatchNorm, Convolution, MaxPool, ReLU

    class DoubledConvolution(Convolution):
        def forward(self, x):
            return 2 * super().forward(x)

        def backward(self, dy):
            return super().backward(2 * dy)

    class ShiftedBatchNorm(BatchNorm):
        def forward(self, x):
            return super().forward(x) + 1.0

    cases = [
        [DoubledConvolution(out_channels=4, kernel_size=3, padding=1), MaxPool(2)],  # first layer + 2x2 pool: fused on the CPU
        [Convolution(out_channels=4, kernel_size=3, padding=1), ShiftedBatchNorm(), ReLU()],  # BatchNorm + ReLU: fused
    ]
    x = images(n=4)
    for layers in cases:
        model = Sequential([*layers, Flatten(), FullyConnected(out_features=3)], input_shape=(1, 8, 8), rng=0)
        chained = x
        for layer in model.layers:
            chained = layer.forward(chained)
        numpy.testing.assert_allclose(model.forward(x), chained, rtol=1e-6)
        model.backward(numpy.ones((4, 3), numpy.float32))  # the pass the layer's own backward pairs with


def test_a_registered_residual_subclass_offers_no_projection_option():
    from cnn_backend.layers import Residual

    class GainResidual(Residual):
        def __init__(self, layers, gain: float = 1.0, projection=None, *, backend=None):
            super().__init__(layers, projection, backend=backend)
            self.gain = gain

        def config(self):
            return {**super().config(), "gain": self.gain}

    register_layer(GainResidual)
    assert set(layer_options("GainResidual")) == {"layers", "gain"}  # the projection is made by build, not written
    block = {"type": "GainResidual", "gain": 0.5, "layers": [{"type": "ReLU"}]}
    model = build_model({"layers": [{"type": "Convolution", "out_channels": 2, "kernel_size": 3, "padding": 1}, block,
                                    {"type": "Flatten"}, {"type": "FullyConnected", "out_features": 2}]}, (1, 4, 4))
    assert model.config()["layers"][1] == block
    with pytest.raises(SpecError, match=r"layer 0 \(GainResidual\): unknown option 'projection'"):
        build_model({"layers": [{**block, "projection": 3}, {"type": "Flatten"}, {"type": "FullyConnected", "out_features": 2}]}, (2, 4, 4))


class KeepsItsFactorElsewhere(Layer):
    """An option kept under another attribute name, with the default config()."""

    def __init__(self, factor: float = 2.0, *, backend=None):
        super().__init__(backend)
        self.f = factor

    def forward(self, x):
        return x * self.f

    def backward(self, dy):
        return dy * self.f


@pytest.mark.parametrize("registered", [False, True])
def test_an_option_the_default_config_cannot_read_is_refused_on_saving_whether_registered_or_not(tmp_path, registered):
    if registered:
        register_layer(KeepsItsFactorElsewhere)
    try:
        model = Sequential([Flatten(), KeepsItsFactorElsewhere(3.0), FullyConnected(out_features=2)], input_shape=(4,), rng=0)
        with pytest.raises(SpecError) as excinfo:
            model.save(tmp_path / "model.npz")
        assert str(excinfo.value) == (
            "layer 1 (KeepsItsFactorElsewhere): define config() returning its options "
            "(KeepsItsFactorElsewhere has no attribute 'factor' to read that option from)"
        )
        assert list(tmp_path.iterdir()) == []  # no file that would load with factor 2.0
    finally:
        forget_layer_type("KeepsItsFactorElsewhere")


class ClipsGradientInPlace(Layer):
    """A ReLU whose backward zeroes dy where the input was negative, in place (the wrong idiom)."""

    def forward(self, x):
        self._negative = x < 0
        return x * (x >= 0)

    def backward(self, dy):
        dy[self._negative] = 0
        return dy


def test_gradient_check_refuses_a_backward_that_changes_dy_in_place():
    # The finite differences would read the same changed probe and agree with the wrong gradient.
    with pytest.raises(GradientCheckError, match=r"^backward changed its argument dy in place; .*compute into a new array"):
        check_layer_gradients(ClipsGradientInPlace(), input_shape=(3, 4, 4))


class WithoutBackward(Layer):
    def forward(self, x):
        return x * x


class WithoutLayerInit(Layer):
    def __init__(self, scale: float = 2.0, *, backend=None) -> None:
        self.scale = scale  # super().__init__(backend) forgotten

    def forward(self, x):
        return x * self.scale


class ForgetsToReturn(Layer):
    def forward(self, x):
        x * 2.0

    def backward(self, dy):
        return dy * 2.0


class HalvesTheWidth(Layer):
    """Declares its input's shape (no _build) but returns half of it: the layer after would be blamed."""

    def forward(self, x):
        return x[..., ::2]

    def backward(self, dy):
        return dy


class GradientOfAnotherShape(Layer):
    def forward(self, x):
        return x

    def backward(self, dy):
        return dy[0]  # one sample's gradient, not the batch's


def flat_network(layer):
    return Sequential([Convolution(out_channels=2, kernel_size=3, padding=1), layer, Flatten(), FullyConnected(out_features=3)],
                      input_shape=(1, 6, 6), rng=0)


@pytest.mark.parametrize(
    "make, pattern",
    [
        (WithoutBackward, r"^WithoutBackward defines no backward\(dy\): a layer implements forward and backward$"),
        (WithoutLayerInit, r"^Sequential: layer 1 \(WithoutLayerInit\) was made without Layer.__init__: call super\(\).__init__\(backend\) in its __init__$"),
        (ForgetsToReturn, r"^layer 1 \(ForgetsToReturn\): forward returned None; return its output$"),
        (HalvesTheWidth, r"^layer 1 \(HalvesTheWidth\): forward returned shape \(4, 2, 6, 3\), but its build declared \(2, 6, 6\) per sample, \(4, 2, 6, 6\) for this batch$"),
        (GradientOfAnotherShape, r"^layer 1 \(GradientOfAnotherShape\): backward returned a gradient of shape \(2, 6, 6\), its input had shape \(4, 2, 6, 6\)$"),
    ],
    ids=lambda value: getattr(value, "__name__", value),
)
def test_a_layer_of_ones_own_that_cannot_work_is_named_in_one_line(make, pattern):
    from cnn_backend.layers import LayerDefinitionError, ShapeError

    x = numpy.random.default_rng(0).random((4, 1, 6, 6)).astype(numpy.float32)
    with pytest.raises((LayerDefinitionError, ShapeError), match=pattern) as excinfo:
        model = flat_network(make())
        logits = model(x)
        model.backward(numpy.ones_like(logits))
    assert isinstance(excinfo.value, ValueError)  # the command line says it in one line (exit 2)


def test_gradient_check_passes_correct_layers_at_modest_sizes_and_still_catches_a_gradient_ten_percent_off():
    # The objective's rounding grows with its size: the tolerance grows with it (16 channels of 12x12
    # used to be called wrong), and a backward 10% off is still found at that size.
    check_layer_gradients(Convolution(out_channels=16, kernel_size=3, padding=1), input_shape=(16, 12, 12))
    check_layer_gradients(BatchNorm(), input_shape=(16, 16, 16))

    class TenPercentOff(Convolution):
        def backward(self, dy):
            return super().backward(dy) * 1.1

    with pytest.raises(GradientCheckError, match=r"^the input gradient differs from its finite differences"):
        check_layer_gradients(TenPercentOff(out_channels=16, kernel_size=3, padding=1), input_shape=(16, 12, 12))


@pytest.mark.parametrize("declared", [(1.5, 8, 8), (0, 8, 8), (-1, 8, 8), "abc", ()])
def test_a_build_that_declares_an_impossible_shape_is_named_at_that_layer(declared):
    from cnn_backend.layers import LayerDefinitionError

    class DeclaresBadly(Layer):
        def _build(self, input_shape, rng):
            return declared

    with pytest.raises(LayerDefinitionError, match=rf"^DeclaresBadly._build returned {re.escape(repr(declared))}: return the per-sample "
                                                   r"output shape as positive integers"):
        DeclaresBadly().build((1, 8, 8))


def test_the_layer_base_class_itself_is_not_registered():
    with pytest.raises(TypeError, match=r"^register_layer takes a subclass of cnn_backend.layers.Layer, got <class 'cnn_backend.layers.base.Layer'>$"):
        register_layer(Layer)


class ForgotTheDecorator(Layer):
    """Defined at the top of a module, as a layer of one's own is, but never registered."""

    def forward(self, x):
        return x


def test_a_layer_class_defined_but_not_registered_is_named_with_the_missing_decorator():
    with pytest.raises(SpecError, match=r"^layer 0 \(ForgotTheDecorator\): unknown layer type 'ForgotTheDecorator': .*ForgotTheDecorator "
                                        r"is a layer class, but not registered: decorate it with @cnn_backend.register_layer"):
        build_model([{"type": "ForgotTheDecorator"}], input_shape=(4,), backend="cpu", seed=0)
