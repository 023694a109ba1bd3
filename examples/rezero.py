"""A container layer of your own: the ReZero residual block (Bachlechner et al., 2020),
``y = x + alpha * f(x)``, where ``f`` is the inner layers and ``alpha`` a learned scalar that starts
at zero, so each block starts as the identity and the network as a shallow one.

    cnn-backend train --model examples/rezero.toml --import examples/rezero.py

A container takes its inner layers as the constructor argument ``layers``, keeps them in
``self.layers`` and lists them in ``children()``; a spec writes them as inner layer tables, as for
``Residual``. Written against ``self.backend.xp`` only; checked by
``cnn_backend.gradcheck.check_layer_gradients``; exported to ONNX through ``graph.layer`` for the
inner layers. See docs/custom-layers.md.
"""

from __future__ import annotations

import numpy

from cnn_backend import register_layer
from cnn_backend.layers import Layer
from cnn_backend.parameters import Parameter


@register_layer
class ReZero(Layer):
    """``x + alpha * f(x)`` for inner layers ``f`` that keep the input's shape."""

    def __init__(self, layers, initial_alpha: float = 0.0, *, backend=None):
        self.layers = list(layers)
        if not self.layers or not all(isinstance(layer, Layer) for layer in self.layers):
            raise ValueError("ReZero: layers must be a non-empty list of layers")
        super().__init__(self.layers[0].backend if backend is None else backend)
        self.initial_alpha = float(initial_alpha)
        for layer in self.layers:
            if layer.backend is not self.backend:
                layer.to(self.backend)
        self._inner_output = None

    def children(self) -> list[tuple[str, Layer]]:
        return [(f"layers.{index}", layer) for index, layer in enumerate(self.layers)]

    def config(self) -> dict:
        return {"layers": [layer.spec() for layer in self.layers], "initial_alpha": self.initial_alpha}

    def _build(self, input_shape: tuple, rng) -> tuple:
        shape = input_shape
        for layer in self.layers:  # the inner layers draw their parameters first, in order
            shape = layer.build(shape, rng)
        if shape != input_shape:
            raise ValueError(f"the inner layers give {shape} for an input of {input_shape}: ReZero needs them to keep the shape")
        alpha = numpy.full(1, self.initial_alpha).astype(self.backend.dtype)
        self.params = {"alpha": Parameter(self.backend.to_device(alpha))}
        return input_shape

    def forward(self, x):
        inner = x
        for layer in self.layers:
            inner = layer.forward(inner)
        self._inner_output = inner
        return x + self.params["alpha"].data * inner

    def backward(self, dy):
        if self._inner_output is None:
            raise self._forward_first()
        inner, self._inner_output = self._inner_output, None
        self.params["alpha"].grad = (dy * inner).sum().reshape(1)
        grad = dy * self.params["alpha"].data
        for layer in reversed(self.layers):
            grad = layer.backward(grad)
        return dy + grad

    def export_onnx(self, graph, prefix: str, x: str, shape: tuple) -> tuple[str, tuple]:
        """The inner layers' nodes (``graph.layer``), then ``x + alpha * f(x)`` as Mul and Add."""
        inner, inner_shape = x, shape
        for index, layer in enumerate(self.layers):
            inner, inner_shape = graph.layer(layer, f"{prefix}.layers.{index}", inner, inner_shape)
        alpha = graph.constant(f"{prefix}.alpha", self.backend.to_numpy(self.params["alpha"].data))
        scaled = graph.node("Mul", [inner, alpha], name=f"{prefix}.scale")
        return graph.node("Add", [x, scaled], name=f"{prefix}.add"), shape
