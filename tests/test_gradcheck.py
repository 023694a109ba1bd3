"""``check_layer_gradients``: a forward pass that is not repeatable and bad arguments are refused in
one line, before any finite difference is taken; layers that are repeatable still pass."""

from __future__ import annotations

import warnings

import numpy
import pytest

from cnn_backend.gradcheck import GradientCheckError, _compare, check_layer_gradients
from cnn_backend.layers import BatchNorm, Dropout, FullyConnected, Layer, ShapeError
from cnn_backend.parameters import Parameter

from layer_helpers import Block

NOT_REPEATABLE = (
    r"^forward gives different outputs for the same input \(it draws random numbers or updates state\): "
    r"check the layer in evaluation mode, layer\.eval\(\)$"
)


class CountingScale(Layer):
    """``y = x * calls``: a buffer updated by every training forward pass changes the output."""

    def __init__(self):
        super().__init__()
        self.buffers = {"calls": 0}

    def forward(self, x):
        if self.training:
            self.buffers["calls"] += 1
        return x * self.buffers["calls"]

    def backward(self, dy):
        return dy * self.buffers["calls"]


def test_dropout_in_training_is_refused_as_not_repeatable_and_passes_in_evaluation():
    with pytest.raises(GradientCheckError, match=NOT_REPEATABLE):
        check_layer_gradients(Dropout(0.5), (5,))
    dropout = Dropout(0.5)
    dropout.training = False
    assert check_layer_gradients(dropout, (5,)).worst["input"] <= 1.0


def test_a_layer_whose_state_changes_its_output_is_refused_in_training_only():
    with pytest.raises(GradientCheckError, match=NOT_REPEATABLE):
        check_layer_gradients(CountingScale(), (4,))
    layer = CountingScale()
    layer.buffers["calls"] = 3
    layer.training = False
    assert check_layer_gradients(layer, (4,)).worst["input"] <= 1.0


def test_a_container_holding_dropout_passes_after_eval_and_is_refused_naming_the_layers_left_training():
    block = Block([FullyConnected(out_features=3), Dropout(0.5)])
    block.training = False  # the container's own flag alone: its Dropout still drops
    with pytest.raises(GradientCheckError, match=(
        r"^forward gives different outputs for the same input \(it draws random numbers or updates state\): check the layer in "
        r"evaluation mode, layer\.eval\(\), which sets the layers inside too \(in training mode: Block > layer 0 \(FullyConnected\), "
        r"Block > layer 1 \(Dropout\)\)$"
    )):
        check_layer_gradients(block, (4,))
    assert set(check_layer_gradients(block.eval(), (4,)).worst) == {"input", "layers.0.weight", "layers.0.bias"}
    # The copy checked has the mode of each layer as the user left it: one inner layer put back in training.
    block.layers[1].train()
    with pytest.raises(GradientCheckError, match=r"\(in training mode: Block > layer 1 \(Dropout\)\)$"):
        check_layer_gradients(block, (4,))
    assert block.layers[1].training and not block.training  # the layer itself left as it was


def test_a_layer_that_is_not_repeatable_in_evaluation_mode_is_told_so():
    class Noisy(Layer):
        def forward(self, x):
            return x + numpy.random.default_rng().standard_normal(x.shape)

    with pytest.raises(GradientCheckError, match=(
        r"\(it draws random numbers or updates state\) in evaluation mode too: make its forward give the same output for the same "
        r"input when not training$"
    )):
        check_layer_gradients(Noisy().eval(), (3,))


def test_batchnorm_in_training_updates_its_statistics_but_repeats_its_output_so_it_passes():
    layer = BatchNorm()
    assert layer.training
    report = check_layer_gradients(layer, input_shape=(3, 4, 4))
    assert set(report.worst) == {"input", "weight", "bias"}
    assert all(value <= 1.0 for value in report.worst.values())


def test_an_int_input_shape_is_the_shape_of_a_vector():
    as_int = check_layer_gradients(FullyConnected(out_features=3), input_shape=4)
    as_tuple = check_layer_gradients(FullyConnected(out_features=3), input_shape=(4,))
    assert as_int == as_tuple  # same seed, same draws: the same check


class PerFeatureScale(Layer):
    """``y = x * scale``, one factor per feature: a weight whose size is the per-sample shape's."""

    def _build(self, input_shape, rng):
        self.params = {"scale": Parameter(numpy.linspace(0.5, 1.5, input_shape[0]))}
        return input_shape

    def forward(self, x):
        self._x = x
        return x * self.params["scale"].data

    def backward(self, dy):
        self.params["scale"].grad = (dy * self._x).sum(axis=0)
        return dy * self.params["scale"].data


def test_a_layer_built_for_another_shape_than_x_is_checked_on_a_copy_built_for_x():
    layer = PerFeatureScale()
    layer.build((3,))
    report = check_layer_gradients(layer, x=numpy.random.default_rng(1).standard_normal((2, 5)))
    assert set(report.worst) == {"input", "scale"} and all(value <= 1.0 for value in report.worst.values())
    assert layer.input_shape == (3,) and layer.params["scale"].data.shape == (3,)  # the layer itself is left as it was


@pytest.mark.parametrize("given", [{"x": numpy.ones((2, 5))}, {"input_shape": (5,)}], ids=["x", "input-shape"])
def test_a_layer_that_cannot_take_the_checked_shape_says_so_in_one_line_naming_it(given):
    layer = FullyConnected(out_features=3)
    layer.build((4,))
    message = (
        r"^FullyConnected cannot take a per-sample input of shape \(5,\) \(it was built for \(4,\)\): "
        r"expected 4 input features, got 5; check it with an input of a shape it takes$"
    )
    with pytest.raises(ShapeError, match=message):
        check_layer_gradients(layer, **given)


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        ({"input_shape": (0, 3)}, ValueError, r"^input_shape must be the shape of one sample, positive integers such as \(3, 5, 5\) or 5, got \(0, 3\)$"),
        ({"input_shape": "ab"}, ValueError, r"^input_shape must be the shape of one sample, .*, got 'ab'$"),
        ({"input_shape": (), "batch_size": 2}, ValueError, r"^input_shape must be the shape of one sample"),
        ({"input_shape": 4, "batch_size": 0}, ValueError, r"^batch_size must be an integer >= 1, got 0$"),
        ({"input_shape": 4, "batch_size": 1.5}, TypeError, r"^batch_size must be an integer >= 1, got 1\.5$"),
        ({"input_shape": 4, "eps": 0}, ValueError, r"^eps must be a finite number > 0, got 0$"),
        ({"input_shape": 4, "eps": -1e-6}, ValueError, r"^eps must be a finite number > 0, got -1e-06$"),
        ({"input_shape": 4, "eps": float("inf")}, ValueError, r"^eps must be a finite number > 0, got inf$"),
        ({"input_shape": 4, "eps": float("nan")}, ValueError, r"^eps must be a finite number > 0, got nan$"),
        ({"input_shape": 4, "rtol": -1e-6}, ValueError, r"^rtol must be a finite number >= 0, got -1e-06$"),
        ({"input_shape": 4, "atol": -1.0}, ValueError, r"^atol must be a finite number >= 0, got -1\.0$"),
        ({"input_shape": 4, "atol": "small"}, TypeError, r"^atol must be a finite number >= 0, got 'small'$"),
        ({"input_shape": 4, "rtol": 0, "atol": 0}, ValueError, r"^rtol and atol are both 0, .*; give rtol > 0 or atol > 0$"),
        ({"x": numpy.array([[1.0, numpy.nan, 0.0, 2.0]])}, ValueError, r"^x holds NaN or infinite values; give finite numbers$"),
        ({"x": numpy.array([[1.0, 0.0, -numpy.inf, 2.0]])}, ValueError, r"^x holds NaN or infinite values"),
        ({"x": numpy.ones(4)}, ValueError, r"^x must be a batch of at least one sample, .*, got shape \(4,\)$"),
        ({"x": numpy.ones((0, 4))}, ValueError, r"^x must be a batch of at least one sample, .*, got shape \(0, 4\)$"),
    ],    ids=["zero-size", "text-shape", "empty-shape", "no-batch", "fractional-batch", "zero-eps", "negative-eps", "infinite-eps",
         "nan-eps", "negative-rtol", "negative-atol", "text-atol", "zero-tolerance", "nan-x", "infinite-x", "unbatched-x", "empty-x"],
)
def test_bad_arguments_are_refused_in_one_line_naming_the_argument(arguments, error, message):
    layer = FullyConnected(out_features=3)
    with pytest.raises(error, match=message) as caught:
        check_layer_gradients(layer, **arguments)
    assert "\n" not in str(caught.value)


def test_no_warning_escapes_a_check_with_an_infinite_gradient_and_a_zero_tolerance_part():
    class InfiniteInputGradient(Layer):
        def forward(self, x):
            return x * 2.0

        def backward(self, dy):
            return dy * numpy.inf

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(GradientCheckError, match=r"^the input gradient differs from its finite differences at \(0, 0\): backward gives -?inf"):
            check_layer_gradients(InfiniteInputGradient(), input_shape=(3,), rtol=0.0, atol=1e-8)
        report = check_layer_gradients(FullyConnected(out_features=3), input_shape=(4,), rtol=0.0, atol=1e-6)
    assert all(value <= 1.0 for value in report.worst.values())


@pytest.mark.parametrize(
    "analytic, numerical, rtol, atol",
    [([0.0, 1.0], [0.0, 1.0], 0.0, 0.0), ([numpy.inf, 1.0], [numpy.inf, 1.0], 1e-6, 1e-8), ([numpy.nan, 1.0], [0.5, 1.0], 1e-6, 1e-8)],
    ids=["zero-tolerance", "both-infinite", "nan"],
)
def test_a_comparison_that_cannot_pass_fails_without_a_warning(analytic, numerical, rtol, atol):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(GradientCheckError, match=r"^the input gradient differs from its finite differences at \(0,\): backward gives"):
            _compare("the input gradient", numpy.array(analytic), numpy.array(numerical), rtol, atol)
