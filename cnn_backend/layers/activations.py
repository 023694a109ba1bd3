"""Activations: element-wise, so they keep whatever memory layout they are given."""

from __future__ import annotations

import math

from .. import functional as F
from ..backend import Backend
from ..init import as_number
from .base import Layer


class ReLU(Layer):
    """``max(x, 0)``; its gradient passes where the input was positive."""

    _positive = None  # the mask (training), or APPLIED_BY_PREVIOUS
    _output = None  # the output, kept instead of a mask in evaluation
    #: the mask after a forward pass run by the BatchNorm before it (BatchNorm.forward_relu)
    APPLIED_BY_PREVIOUS = ("applied by the previous layer",)

    def forward(self, x):
        # In evaluation no mask is computed (a pass less); a backward pass takes it from the output.
        y, self._positive = F.relu_forward(self.backend, x, with_mask=self.training)
        self._output = None if self.training else y
        return y

    def applied_by_previous(self) -> None:
        """Record that the layer before applied this ReLU: :meth:`backward` then hands the
        gradient back unchanged, and that layer's backward pass applies the mask."""
        self._positive, self._output = self.APPLIED_BY_PREVIOUS, None

    def backward(self, dy):
        positive, output = self._positive, self._output
        if positive is None and output is None:
            raise self._forward_first()
        if positive is self.APPLIED_BY_PREVIOUS:
            self._positive = None
            return dy
        self._expect_gradient(dy, (output if positive is None else positive).shape)
        self._positive = self._output = None
        if positive is None:
            positive = F.relu_mask(self.backend, output)
        return F.multiply(self.backend, dy, positive)


class LeakyReLU(Layer):
    """``x`` where positive, ``negative_slope * x`` elsewhere (PyTorch's default slope 0.01)."""

    def __init__(self, negative_slope: float = 0.01, *, backend: Backend | str | None = None) -> None:
        super().__init__(backend)
        self.negative_slope = as_number(negative_slope, "LeakyReLU: negative_slope", "a finite number", math.isfinite)

    def config(self) -> dict:
        return {"negative_slope": self.negative_slope}

    def forward(self, x):
        # The local slope, 1 or negative_slope, serves forward and backward alike.
        slope = (x > 0).astype(x.dtype)
        slope *= 1.0 - self.negative_slope
        slope += self.negative_slope
        self._slope = slope
        return x * slope

    _slope = None

    def backward(self, dy):
        if self._slope is None:
            raise self._forward_first()
        self._expect_gradient(dy, self._slope.shape)
        dx = dy * self._slope
        self._slope = None
        return dx


class _DerivedFromOutput(Layer):
    """An activation whose derivative is a function of its output: forward keeps the output,
    backward multiplies ``dy`` by :meth:`_derivative` of it."""

    _y = None

    def backward(self, dy):
        if self._y is None:
            raise self._forward_first()
        self._expect_gradient(dy, self._y.shape)
        y, self._y = self._y, None
        return dy * self._derivative(y)

    def _derivative(self, y):
        raise NotImplementedError


class Tanh(_DerivedFromOutput):
    """``tanh(x)``; its derivative ``1 - tanh(x)^2`` comes from the output."""

    def forward(self, x):
        self._y = self.backend.xp.tanh(x)
        return self._y

    def _derivative(self, y):
        return 1.0 - y * y


class Sigmoid(_DerivedFromOutput):
    """``1 / (1 + exp(-x))``, computed as ``(1 + tanh(x / 2)) / 2`` (no overflow for large ``|x|``)."""

    def forward(self, x):
        y = self.backend.xp.tanh(x * 0.5)
        y += 1.0
        y *= 0.5
        self._y = y
        return y

    def _derivative(self, y):
        return y * (1.0 - y)


class GELU(Layer):
    """GELU, tanh approximation (PyTorch's ``approximate="tanh"``):
    ``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))``."""

    COEFFICIENT = 0.044715
    SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

    def forward(self, x):
        xp = self.backend.xp
        squared = x * x
        t = xp.tanh((x + self.COEFFICIENT * (squared * x)) * self.SQRT_2_OVER_PI)
        self._saved = (x, squared, t)
        return 0.5 * x * (1.0 + t)

    _saved = None

    def backward(self, dy):
        if self._saved is None:
            raise self._forward_first()
        x, squared, t = self._saved
        self._expect_gradient(dy, x.shape)
        self._saved = None
        inner_derivative = (1.0 + (3.0 * self.COEFFICIENT) * squared) * self.SQRT_2_OVER_PI
        return dy * (0.5 * (1.0 + t) + (0.5 * x) * (1.0 - t * t) * inner_derivative)
