"""A layer of your own: PReLU (He et al., 2015), a ReLU whose slope for negative inputs is learned,
one slope per channel (or per feature after a Flatten).

    cnn-backend train --model examples/prelu.toml --import examples/prelu.py

Written against ``self.backend.xp`` only, so it runs unchanged on NumPy and CuPy; checked by
``cnn_backend.gradcheck.check_layer_gradients(PReLU(), input_shape=(3, 4, 4))``; exported to ONNX
as the ``PRelu`` operator (``cnn-backend export ... --import examples/prelu.py``). See
docs/custom-layers.md.
"""

from __future__ import annotations

import numpy

from cnn_backend import register_layer
from cnn_backend.layers import Layer
from cnn_backend.parameters import Parameter


@register_layer
class PReLU(Layer):
    """``y = x`` where ``x > 0``, else ``slope[c] * x``; the slopes start at ``initial_slope``."""

    def __init__(self, initial_slope: float = 0.25, *, backend=None):
        super().__init__(backend)
        if not 0.0 <= initial_slope < 1.0:
            raise ValueError(f"PReLU: initial_slope must be in [0, 1), got {initial_slope!r}")
        self.initial_slope = float(initial_slope)
        self._x = None

    def _build(self, input_shape: tuple, rng) -> tuple:
        # One slope per channel of (C, H, W) images, per feature of (features,) vectors.
        slopes = numpy.full(input_shape[0], self.initial_slope).astype(self.backend.dtype)
        self.params = {"slope": Parameter(self.backend.to_device(slopes))}
        return input_shape

    def config(self) -> dict:
        return {"initial_slope": self.initial_slope}

    def _slopes_for(self, ndim: int):
        """The slopes shaped to broadcast against an (N, C, ...) batch, whatever its memory layout."""
        return self.params["slope"].data.reshape((1, -1) + (1,) * (ndim - 2))

    def forward(self, x):
        self._x = x
        return self.backend.xp.where(x > 0, x, x * self._slopes_for(x.ndim))

    def backward(self, dy):
        if self._x is None:
            raise self._forward_first()
        xp, x, self._x = self.backend.xp, self._x, None
        every_axis_but_channels = (0,) + tuple(range(2, dy.ndim))
        self.params["slope"].grad = (dy * xp.minimum(x, 0)).sum(axis=every_axis_but_channels)
        return xp.where(x > 0, dy, dy * self._slopes_for(dy.ndim))

    def export_onnx(self, graph, prefix: str, x: str, shape: tuple) -> tuple[str, tuple]:
        """ONNX's PRelu: the slopes shaped (C, 1, 1) to broadcast over an (N, C, H, W) input, (F,) over (N, F)."""
        slopes = self.backend.to_numpy(self.params["slope"].data).reshape((-1,) + (1,) * (len(shape) - 1))
        return graph.node("PRelu", [x, graph.constant(f"{prefix}.slope", slopes)], name=f"{prefix}.prelu"), shape
