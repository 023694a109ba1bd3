"""A small layer of one's own, as a user writes it, and the examples' own layers imported as --import
imports them: shared by the tests of registration, --import, specs and export."""

from __future__ import annotations

from pathlib import Path

from cnn_backend import register_layer
from cnn_backend.cli.arguments import imported_module
from cnn_backend.layers import Layer
from cnn_backend.parameters import Parameter


class ChannelScale(Layer):
    """``y = x * scale[c]``: one learned factor per channel (or feature), starting at ``initial``."""

    def __init__(self, initial: float = 1.0, *, backend=None):
        super().__init__(backend)
        self.initial = float(initial)
        self._x = None

    def _build(self, input_shape, rng):
        xp = self.backend.xp
        self.params = {"scale": Parameter(xp.full(input_shape[0], self.initial, dtype=self.backend.dtype))}
        return input_shape

    def config(self):
        return {"initial": self.initial}

    def _per_channel(self, ndim):
        return self.params["scale"].data.reshape((1, -1) + (1,) * (ndim - 2))

    def forward(self, x):
        self._x = x
        return x * self._per_channel(x.ndim)

    def backward(self, dy):
        summed_axes = (0,) + tuple(range(2, dy.ndim))
        self.params["scale"].grad = (dy * self._x).sum(axis=summed_axes)
        return dy * self._per_channel(dy.ndim)


class Block(Layer):
    """A container of one's own, written plainly: its inner layers run in order, listed in
    children(); no config(), train() or macs() of its own, so the defaults serve it."""

    def __init__(self, layers, *, backend=None):
        self.layers = list(layers)
        super().__init__(self.layers[0].backend if backend is None and self.layers else backend)

    def children(self):
        return [(f"layers.{index}", layer) for index, layer in enumerate(self.layers)]

    def _build(self, shape, rng):
        for layer in self.layers:
            shape = layer.build(shape, rng)
        return shape

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def import_example_layers(name: str):
    """``examples/<name>.py`` imported as ``--import`` imports it, and its layer classes registered
    (again, where an earlier test imported it and its registrations were undone since)."""
    module = imported_module(str(EXAMPLES / f"{name}.py"))
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, Layer) and value.__module__ == module.__name__:
            register_layer(value)
    return module


def forget_layer_type(name: str) -> None:
    """As a new process that did not import its module: the type ``name`` unregistered."""
    from cnn_backend.layers import LAYER_TYPES

    LAYER_TYPES.pop(name, None)
