"""Layers: each caches what its backward needs in ``forward`` and returns the input gradient from
``backward``, storing parameter gradients in ``Parameter.grad`` for an optimiser to apply.

Layers hold a :class:`~cnn_backend.backend.Backend` and take every array function from it; they are
initialised on the host (see :mod:`cnn_backend.init`) and moved with :meth:`Layer.to`.

One module per kind: :mod:`.base` (``Layer``, ``ShapeError``), :mod:`.convolution`, :mod:`.dense`,
:mod:`.normalization`, :mod:`.pooling`, :mod:`.activations`, :mod:`.residual` and :mod:`.loss`.
"""

from __future__ import annotations

from ..parameters import Parameter
from .activations import GELU, LeakyReLU, ReLU, Sigmoid, Tanh
from .base import Layer, LayerDefinitionError, ShapeError
from .convolution import Convolution, resolve_conv_algorithm
from .dense import Dropout, Flatten, FullyConnected
from .loss import NonFiniteLogitsError, SoftmaxCrossEntropy
from .normalization import BatchNorm
from .pooling import AvgPool, GlobalAvgPool, MaxPool
from .residual import Residual

#: layer type name (as written in architecture files) -> class
LAYER_TYPES = {
    cls.__name__: cls
    for cls in (
        Convolution, ReLU, MaxPool, Flatten, FullyConnected, Dropout,
        BatchNorm, AvgPool, GlobalAvgPool, LeakyReLU, Tanh, Sigmoid, GELU, Residual,
    )
}

__all__ = [
    "LAYER_TYPES",
    "AvgPool",
    "BatchNorm",
    "Convolution",
    "Dropout",
    "Flatten",
    "FullyConnected",
    "GELU",
    "GlobalAvgPool",
    "Layer",
    "LayerDefinitionError",
    "LeakyReLU",
    "MaxPool",
    "NonFiniteLogitsError",
    "Parameter",
    "ReLU",
    "Residual",
    "ShapeError",
    "Sigmoid",
    "SoftmaxCrossEntropy",
    "Tanh",
    "resolve_conv_algorithm",
]
