"""A small layer of one's own, as a user writes it, shared by the tests of registration and --import."""

from __future__ import annotations

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
