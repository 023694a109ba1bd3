"""The residual block: ``x + f(x)``, with a 1x1 projection shortcut where shapes differ."""

from __future__ import annotations

from .. import functional as F
from ..backend import Backend
from ..init import make_rng
from .base import Layer, ShapeError
from .convolution import Convolution


class Residual(Layer):
    """``x + f(x)`` for an inner sequence of layers ``f`` (a residual block).

    When ``f`` changes the shape (channels, or the spatial size by a stride), the shortcut is a 1x1
    convolution without bias, ``projection``, that :meth:`build` creates with the stride that maps
    the input's size onto ``f``'s output (as in ResNet's projection shortcuts); otherwise it is the
    identity. Building draws the inner layers' parameters first, then the projection's.
    """

    def __init__(self, layers, projection: "Convolution | None" = None, *, backend: Backend | str | None = None) -> None:
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("Residual needs at least one inner layer")
        if not all(isinstance(layer, Layer) for layer in self.layers):
            raise ValueError("Residual: the inner layers must be Layer objects")
        self.projection = projection
        super().__init__(self.layers[0].backend if backend is None else backend)
        for _, child in self.children():
            if child.backend is not self.backend:
                child.to(self.backend)

    @property
    def training(self) -> bool:
        return self._training

    @training.setter
    def training(self, mode: bool) -> None:
        self._training = mode
        for _, child in self.children():
            child.training = mode

    @property
    def needs_input_grad(self) -> bool:
        return self._needs_input_grad

    @needs_input_grad.setter
    def needs_input_grad(self, needed: bool) -> None:
        # The block's input is also its first inner layer's and the projection's: they skip dx with it.
        self._needs_input_grad = needed
        self.layers[0].needs_input_grad = needed
        if self.projection is not None:
            self.projection.needs_input_grad = needed

    def children(self) -> list[tuple[str, Layer]]:
        named = [(f"layers.{index}", layer) for index, layer in enumerate(self.layers)]
        return named + ([("projection", self.projection)] if self.projection is not None else [])

    def config(self) -> dict:
        return {"layers": [layer.spec() for layer in self.layers]}

    def __repr__(self) -> str:
        inner = ", ".join(repr(layer) for layer in self.layers)
        return f"Residual([{inner}]" + (f", projection={self.projection!r})" if self.projection is not None else ")")

    def _build(self, input_shape: tuple, rng) -> tuple:
        # An inner layer's error goes out as it is: Layer.build marks it, and whoever reports it names
        # the path down to that layer ("layer 4 (Residual) > layer 1 (Convolution): ...").
        shape = input_shape
        for layer in self.layers:
            shape = layer.build(shape, rng)
        if shape == input_shape and self.projection is None:
            return shape
        if len(shape) != 3 or len(input_shape) != 3:
            raise ShapeError(f"inner layers map {input_shape} to {shape}, which no 1x1 projection of the input can match")
        stride = _projection_stride(input_shape[1:], shape[1:])
        if stride is None:
            raise ShapeError(
                f"inner layers map {input_shape} to {shape}, which no 1x1 projection of the input can match "
                f"(the spatial size must shrink by a whole stride)"
            )
        if self.projection is None:
            self.projection = Convolution(
                input_shape[0], shape[0], 1, stride=stride, bias=False, rng=make_rng(rng), backend=self.backend
            )
            self.projection.training = self.training
            self.projection.needs_input_grad = self.needs_input_grad
        projected = self.projection.build(input_shape, rng)
        if projected != shape:
            raise ShapeError(f"the projection maps {input_shape} to {projected}, the inner layers to {shape}")
        return shape

    def forward(self, x):
        out = x
        for layer in self.layers:
            out = layer.forward(out)
        shortcut = x if self.projection is None else self.projection.forward(x)
        if out.shape != shortcut.shape:
            raise ShapeError(
                f"{self}: the inner layers give shape {tuple(out.shape)} but the shortcut {tuple(shortcut.shape)}; "
                f"build the block with its input shape to create a projection"
            )
        return out + shortcut

    def backward(self, dy):
        grad = dy
        for layer in reversed(self.layers):
            grad = layer.backward(grad)
        shortcut_grad = dy if self.projection is None else self.projection.backward(dy)
        if not self.needs_input_grad:
            return None
        return grad + shortcut_grad


def _projection_stride(input_hw: tuple, output_hw: tuple) -> int | None:
    """The smallest stride with which a 1x1 convolution maps ``input_hw`` onto ``output_hw``."""
    for stride in range(1, max(input_hw) + 1):
        if all(F.output_size(size, 1, stride, 0) == out for size, out in zip(input_hw, output_hw)):
            return stride
    return None
