"""Containers of one's own (a layer listing its inner layers in children(), docs/custom-layers.md):
the mode, the build check, the messages and the summary reach the layers inside, to any depth,
without the container writing more than children(), _build, forward and backward."""

from __future__ import annotations

import numpy
import pytest

from cnn_backend import Sequential, SpecError, build_model, register_layer
from cnn_backend.gradcheck import check_layer_gradients
from cnn_backend.layers import (
    BatchNorm,
    Convolution,
    Dropout,
    FullyConnected,
    GlobalAvgPool,
    Layer,
    ReLU,
    Residual,
    ShapeError,
    Tanh,
)
from cnn_backend.summary import summarize

from layer_helpers import Block

#: registrations are process-wide: each test's are undone after it
pytestmark = pytest.mark.usefixtures("registry_restored")

NOT_BUILT = r"not built: a container's _build must build its inner layers \(shape = layer\.build\(shape, rng\)\)$"
KERNEL_TOO_LARGE = r"kernel 31x31 is larger than its input 8x8$"


class Lazy(Block):
    def _build(self, shape, rng):
        return shape  # forgets to build the inner layers


class Headed(Block):
    """The inner layers, then a layer of its own listed under another name than ``layers.N``."""

    def __init__(self, layers, *, backend=None):
        super().__init__(layers, backend=backend)
        self.head = Convolution(out_channels=2, kernel_size=31)

    def children(self):
        return super().children() + [("head", self.head)]

    def _build(self, shape, rng):
        return self.head.build(super()._build(shape, rng), rng)


class Hiding(Block):
    """Builds a layer it does not list in children(): messages can name the path only down to itself."""

    def _build(self, shape, rng):
        return Convolution(out_channels=2, kernel_size=31).build(super()._build(shape, rng), rng)


class Picky(Layer):
    def _build(self, shape, rng):
        raise ValueError("takes 3 channels only")


class Broken(Layer):
    def _build(self, shape, rng):
        return {"a": 1}["x"]


def tail() -> list:
    return [GlobalAvgPool(), FullyConnected(out_features=3)]


def every_layer(layer: Layer):
    yield layer
    for _, child in layer.children():
        yield from every_layer(child)


# -- mode -------------------------------------------------------------------------------------------


def test_train_and_eval_reach_every_layer_inside_a_container_of_ones_own_to_any_depth():
    inner = Block([Dropout(0.5), BatchNorm()])
    outer = Block([Tanh(), Residual([inner, Convolution(out_channels=2, kernel_size=1)]), Dropout(0.5)])
    layers = list(every_layer(outer))
    assert len(layers) == 8
    assert outer.eval() is outer
    assert [layer.training for layer in layers] == [False] * 8
    assert outer.train() is outer and [layer.training for layer in layers] == [True] * 8
    assert [layer.training for layer in every_layer(outer.train(False))] == [False] * 8
    # Standalone, in evaluation mode, the block repeats its output (its inner Dropout no longer drops).
    outer.build((2, 4, 4), rng=0)
    x = numpy.random.default_rng(0).standard_normal((3, 2, 4, 4))
    numpy.testing.assert_array_equal(outer.forward(x), outer.forward(x))


def test_setting_the_flag_itself_keeps_working_as_before_for_plain_layers_and_residual():
    dropout = Dropout(0.5)
    dropout.training = False
    assert not dropout.training
    residual = Residual([Dropout(0.5), BatchNorm()])
    residual.training = False
    assert [layer.training for layer in every_layer(residual)] == [False] * 3
    block = Block([Dropout(0.5)])
    block.training = False  # the container's own flag only: what eval() is for
    assert not block.training and block.layers[0].training


def test_a_mode_that_is_not_a_bool_is_refused_in_one_line():
    for target, where in ((Block([ReLU()]), "Block.train"), (Sequential([ReLU()]), "Sequential.train")):
        with pytest.raises(TypeError, match=rf"^{where}\(mode\): mode must be True \(training\) or False \(evaluation\), got 'False'$"):
            target.train("False")
    assert not Block([ReLU()]).train(numpy.bool_(False)).training


def test_sequential_train_goes_through_each_layers_train_so_a_container_may_keep_a_layer_frozen():
    class FrozenNorm(Block):
        """Keeps its BatchNorm's running statistics fixed: the norm stays in evaluation mode."""

        def train(self, mode=True):
            super().train(mode)
            self.layers[-1].training = False
            return self

    block = FrozenNorm([Convolution(out_channels=2, kernel_size=3, padding=1), BatchNorm()])
    model = Sequential([block, *tail()], input_shape=(1, 6, 6), rng=0)
    model.train()
    assert block.training and block.layers[0].training and not block.layers[1].training
    model.eval()
    assert not any(layer.training for layer in every_layer(block))


# -- build ------------------------------------------------------------------------------------------


def test_a_container_whose_build_forgets_its_inner_layers_is_refused_naming_the_layer_left_unbuilt():
    with pytest.raises(ShapeError, match=rf"^layer 1 \(Lazy\) > layer 0 \(Convolution\): {NOT_BUILT}"):
        Sequential([Convolution(out_channels=2, kernel_size=3), Lazy([Convolution(out_channels=2, kernel_size=3, padding=1)]), *tail()],
                   input_shape=(1, 8, 8))  # fmt: skip
    with pytest.raises(ShapeError, match=rf"^layer 0 \(Block\) > layer 1 \(Lazy\) > layer 0 \(ReLU\): {NOT_BUILT}"):
        Sequential([Block([Tanh(), Lazy([ReLU()])]), *tail()], input_shape=(1, 8, 8))
    register_layer(Lazy)
    with pytest.raises(SpecError, match=rf"^layer 0 \(Lazy\) > layer 0 \(Convolution\): {NOT_BUILT}"):
        build_model({"layers": [{"type": "Lazy", "layers": [{"type": "Convolution", "out_channels": 2, "kernel_size": 3}]},
                                {"type": "GlobalAvgPool"}, {"type": "FullyConnected", "out_features": 3}]}, (1, 8, 8))  # fmt: skip
    with pytest.raises(ShapeError, match=rf"^Lazy > layer 0 \(Convolution\): {NOT_BUILT}"):
        check_layer_gradients(Lazy([Convolution(out_channels=2, kernel_size=3, padding=1)]), input_shape=(1, 4, 4))


def test_the_summary_of_a_model_holding_a_container_built_alone_refuses_an_unbuilt_inner_layer():
    lazy = Lazy([ReLU()])
    lazy.build((1, 4, 4))  # the container has its shapes, the layer inside none
    model = Sequential([lazy])
    model.forward(numpy.zeros((2, 1, 4, 4), numpy.float32))  # records the input shape
    with pytest.raises(ShapeError, match=rf"^layer 0 \(Lazy\) > layer 0 \(ReLU\): {NOT_BUILT}"):
        summarize(model)


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (lambda: Block([ReLU(), Convolution(out_channels=2, kernel_size=31)]), rf"layer 0 \(Block\) > layer 1 \(Convolution\): {KERNEL_TOO_LARGE}"),
        (lambda: Block([Block([Convolution(out_channels=2, kernel_size=31)])]),
         rf"layer 0 \(Block\) > layer 0 \(Block\) > layer 0 \(Convolution\): {KERNEL_TOO_LARGE}"),
        (lambda: Headed([ReLU()]), rf"layer 0 \(Headed\) > head \(Convolution\): {KERNEL_TOO_LARGE}"),
        (lambda: Hiding([ReLU()]), rf"layer 0 \(Hiding\): {KERNEL_TOO_LARGE}"),
        (lambda: Block([Picky()]), r"layer 0 \(Block\) > layer 0 \(Picky\): takes 3 channels only$"),
        (lambda: Block([Broken()]), r"layer 0 \(Block\) > layer 0 \(Broken\): KeyError in _build: 'x'$"),
        (lambda: Residual([Block([Convolution(out_channels=2, kernel_size=31)])]),
         rf"layer 0 \(Residual\) > layer 0 \(Block\) > layer 0 \(Convolution\): {KERNEL_TOO_LARGE}"),
        (lambda: Block([Residual([ReLU(), Convolution(out_channels=2, kernel_size=31)])]),
         rf"layer 0 \(Block\) > layer 0 \(Residual\) > layer 1 \(Convolution\): {KERNEL_TOO_LARGE}"),
    ],
    ids=["inner", "two deep", "named child", "unlisted layer", "ValueError of ones own", "KeyError", "in Residual", "holding Residual"],
)
def test_a_build_failing_inside_a_container_names_the_path_down_to_the_failing_layer(block, message):
    with pytest.raises(ShapeError, match="^" + message):
        Sequential([block(), *tail()], input_shape=(2, 8, 8))


def test_spec_errors_name_the_path_through_containers_and_residual_blocks_alike():
    register_layer(Block)
    conv31 = {"type": "Convolution", "out_channels": 2, "kernel_size": 31}
    end = [{"type": "GlobalAvgPool"}, {"type": "FullyConnected", "out_features": 3}]
    for block, path in (
        ({"type": "Block", "layers": [{"type": "ReLU"}, conv31]}, r"layer 0 \(Block\) > layer 1 \(Convolution\)"),
        ({"type": "Residual", "layers": [{"type": "Block", "layers": [conv31]}]}, r"layer 0 \(Residual\) > layer 0 \(Block\) > layer 0 \(Convolution\)"),
        ({"type": "Block", "layers": [{"type": "Residual", "layers": [conv31]}]}, r"layer 0 \(Block\) > layer 0 \(Residual\) > layer 0 \(Convolution\)"),
    ):
        with pytest.raises(SpecError, match=rf"^{path}: {KERNEL_TOO_LARGE}"):
            build_model({"layers": [block, *end]}, (2, 8, 8))


def test_a_failure_inside_a_residual_block_reads_the_same_from_every_entry_point():
    # Residual wrapped it as "layer 1 (Residual): inner layer 1 (Convolution): ..." before, which only
    # build_model rewrote to this path; Sequential and the gradient check kept the other wording.
    path = r"layer 1 \(Residual\) > layer 1 \(Convolution\)"
    end = [GlobalAvgPool(), FullyConnected(out_features=3)]
    with pytest.raises(ShapeError, match=rf"^{path}: {KERNEL_TOO_LARGE}"):
        Sequential([Tanh(), Residual([ReLU(), Convolution(out_channels=2, kernel_size=31)]), *end], input_shape=(2, 8, 8))
    conv31 = {"type": "Convolution", "out_channels": 2, "kernel_size": 31}
    with pytest.raises(SpecError, match=rf"^{path}: {KERNEL_TOO_LARGE}"):
        build_model([{"type": "Tanh"}, {"type": "Residual", "layers": [{"type": "ReLU"}, conv31]}, {"type": "GlobalAvgPool"},
                     {"type": "FullyConnected", "out_features": 3}], (2, 8, 8))  # fmt: skip
    with pytest.raises(ShapeError, match=r"^Residual cannot take a per-sample input of shape \(2, 8, 8\): layer 1 \(Convolution\): kernel 31x31"):
        check_layer_gradients(Residual([ReLU(), Convolution(out_channels=2, kernel_size=31)]), input_shape=(2, 8, 8))


def test_the_gradient_check_names_the_inner_layer_that_refuses_the_shape():
    with pytest.raises(ShapeError, match=r"^Block cannot take a per-sample input of shape \(2, 8, 8\): layer 1 \(Convolution\): kernel 31x31"):
        check_layer_gradients(Block([ReLU(), Convolution(out_channels=2, kernel_size=31)]), input_shape=(2, 8, 8))


# -- summary ----------------------------------------------------------------------------------------


def test_a_container_without_macs_of_its_own_counts_those_of_its_inner_layers():
    model = Sequential([Convolution(out_channels=2, kernel_size=3, padding=1),
                        Block([Convolution(out_channels=2, kernel_size=3, padding=1), BatchNorm(), Block([ReLU(), Convolution(out_channels=2, kernel_size=1)])]),
                        *tail()], input_shape=(1, 6, 6))  # fmt: skip
    summary = summarize(model)
    rows = {row.name: row.macs for row in summary.rows}
    conv3, conv1, norm = 2 * 6 * 6 * 2 * 9, 2 * 6 * 6 * 2, 2 * 6 * 6
    assert rows["1.layers.2"] == conv1 and rows["1"] == conv3 + norm + conv1
    assert summary.total_macs == rows["0"] + rows["1"] + 2 * 3 == 1 * 6 * 6 * 2 * 9 + conv3 + norm + conv1 + 6
    assert Block([ReLU()]).macs() == 0 and ReLU().macs() == 0


def test_buffer_bytes_count_each_buffer_at_its_own_size():
    class Counted(Block):
        def __init__(self, layers, *, backend=None):
            super().__init__(layers, backend=backend)
            self.buffers["steps"] = numpy.zeros((), dtype=numpy.int64)

    model = Sequential([Counted([Convolution(out_channels=3, kernel_size=3), BatchNorm()]), *tail()], input_shape=(1, 6, 6))
    summary = summarize(model)
    assert summary.total_buffers == 1 + 3 + 3
    assert summary.buffer_bytes == 8 + 6 * 4  # the int64 counter, then two float32 statistics of 3 channels
