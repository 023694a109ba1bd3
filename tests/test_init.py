"""Weight initialisation: each scheme draws from the distribution it names, from the seed alone."""

from __future__ import annotations

import math

import numpy
import pytest

from cnn_backend import get_backend
from cnn_backend.init import INITIALIZERS, initial_weight
from cnn_backend.layers import Convolution, FullyConnected
from cnn_backend.spec import SpecError, build_model

FAN_IN, FAN_OUT = 288, 576
SHAPE = (64, 32, 3, 3)  # a 32 -> 64 3x3 convolution: fan_in 288, fan_out 576


@pytest.mark.parametrize(
    "scheme, bound, std",
    [
        ("he", None, math.sqrt(2 / FAN_IN)),
        ("glorot", math.sqrt(6 / (FAN_IN + FAN_OUT)), math.sqrt(2 / (FAN_IN + FAN_OUT))),
        ("fan_in_uniform", 1 / math.sqrt(FAN_IN), 1 / math.sqrt(3 * FAN_IN)),
    ],
)
def test_each_scheme_draws_the_distribution_it_names(scheme, bound, std):
    weight = initial_weight(numpy.random.default_rng(0), SHAPE, FAN_IN, FAN_OUT, scheme)
    assert weight.shape == SHAPE
    assert abs(weight.mean()) < 0.05 * std
    assert weight.std() == pytest.approx(std, rel=0.02)  # 18,432 draws: the sample std is within 1%
    if bound is not None:
        assert numpy.abs(weight).max() <= bound
        assert numpy.abs(weight).max() > 0.99 * bound


def test_the_same_seed_draws_the_same_weights():
    for scheme in INITIALIZERS:
        first = initial_weight(numpy.random.default_rng(7), SHAPE, FAN_IN, FAN_OUT, scheme)
        numpy.testing.assert_array_equal(first, initial_weight(numpy.random.default_rng(7), SHAPE, FAN_IN, FAN_OUT, scheme))


def test_an_unknown_scheme_is_named_with_the_choices():
    with pytest.raises(ValueError, match="unknown init 'orthogonal'; choose one of he, glorot, fan_in_uniform"):
        initial_weight(numpy.random.default_rng(0), SHAPE, FAN_IN, FAN_OUT, "orthogonal")


def spec(init: str) -> dict:
    return {
        "layers": [
            {"type": "Convolution", "out_channels": 8, "kernel_size": 3, "init": init},
            {"type": "Flatten"},
            {"type": "FullyConnected", "out_features": 10, "init": init},
        ]
    }


def test_a_spec_layer_takes_the_scheme_by_name():
    model = build_model(spec("fan_in_uniform"), (1, 28, 28), get_backend("cpu", "float64"), seed=0)
    conv, _, dense = model.layers
    assert numpy.abs(conv.params["weight"].data).max() <= 1 / 3  # fan_in 9
    assert numpy.abs(dense.params["weight"].data).max() <= 1 / math.sqrt(8 * 26 * 26)
    with pytest.raises(SpecError, match="init must be one of he, glorot, fan_in_uniform, got .orthogonal."):
        build_model(spec("orthogonal"), (1, 28, 28), get_backend("cpu"), seed=0)


@pytest.mark.parametrize("make, layer", [
    (lambda init: Convolution(out_channels=4, kernel_size=3, init=init), "Convolution"),
    (lambda init: FullyConnected(out_features=3, init=init), "FullyConnected"),
])
@pytest.mark.parametrize("init", [None, "xavier"])
def test_a_layer_refuses_an_unknown_init_when_made_naming_itself(make, layer, init):
    with pytest.raises(ValueError) as excinfo:
        make(init)
    assert str(excinfo.value) == f"{layer}: init must be one of he, glorot, fan_in_uniform, got {init!r}"
