"""Layers on flat features: flattening, the fully connected layer, dropout."""

from __future__ import annotations

import math

import numpy

from .. import functional as F
from ..backend import Backend
from ..init import as_number, check_init, initial_weight, make_rng
from ..parameters import Parameter
from .base import Layer, ShapeError, _optional_size, _size, missing_size_after_positional


class Flatten(Layer):
    """``(N, C, H, W) -> (N, C * H * W)``, features in C, H, W order.

    A batch-innermost activation (see :mod:`cnn_backend.functional` on layout) is flattened for free
    as the transposed view of its ``(C * H * W, N)`` memory, which the dense layer multiplies as is;
    the gradient goes back the same way.
    """

    def _build(self, input_shape: tuple, rng) -> tuple:
        return (math.prod(input_shape),)

    def forward(self, x):
        if x.ndim < 2:
            raise ShapeError(f"{self}: expected an input of shape (N, ...), got shape {tuple(x.shape)}")
        self._shape = x.shape
        n = x.shape[0]
        # Any 4-D layout other than plain NCHW goes the batch-innermost way (free if it is one, else one copy).
        self._through_batch_innermost = x.ndim == 4 and not x.flags.c_contiguous
        if self._through_batch_innermost:
            return F.as_batch_innermost(self.backend, x).reshape(-1, n).T
        return x.reshape(n, -1)

    _shape = None

    def backward(self, dy):
        if self._shape is None:
            raise self._forward_first()
        self._expect_gradient(dy, (self._shape[0], math.prod(self._shape[1:])))
        if self._through_batch_innermost:
            n, c, h, w = self._shape
            return F.nchw_view(dy.T.reshape(c, h, w, n))
        return dy.reshape(self._shape)


class FullyConnected(Layer):
    """``y = x @ W + b`` with ``W`` of shape ``(in_features, out_features)``.

    ``in_features`` may be left out (None): :meth:`build` infers it from the (flat) input shape.
    """

    inferred_sizes = ("in_features",)

    def __init__(
        self,
        in_features: int | None = None,
        out_features: int | None = None,
        *,
        init: str = "he",
        rng=None,
        backend: Backend | str | None = None,
    ) -> None:
        super().__init__(backend)
        if out_features is None and in_features is not None:  # FullyConnected(10), as Keras's Dense(10) is written
            raise missing_size_after_positional("FullyConnected", "out_features", (in_features,), ("in_features", "out_features"))
        in_features = _optional_size("FullyConnected", "in_features", in_features, 1)
        out_features = _size("FullyConnected", "out_features", out_features, 1)
        self.in_features, self.out_features, self.init = in_features, out_features, check_init(init, "FullyConnected")
        if in_features is not None:
            self._create_parameters(rng)

    def _create_parameters(self, rng) -> None:
        shape = (self.in_features, self.out_features)
        weight = initial_weight(make_rng(rng), shape, self.in_features, self.out_features, self.init)
        self.params = {
            "weight": Parameter(self.backend.to_device(weight.astype(self.backend.dtype))),
            "bias": Parameter(self.backend.xp.zeros(self.out_features, dtype=self.backend.dtype)),
        }

    def _build(self, input_shape: tuple, rng) -> tuple:
        if len(input_shape) != 1:
            raise ShapeError(f"expected a flat per-sample input (features,), got {input_shape}: put a Flatten or GlobalAvgPool before it")
        if self.in_features is None:
            self.in_features = input_shape[0]
            self._create_parameters(rng)
        elif input_shape[0] != self.in_features:
            raise ShapeError(f"expected {self.in_features} input features, got {input_shape[0]}")
        return (self.out_features,)

    def macs(self) -> int:
        return 0 if self.in_features is None else self.in_features * self.out_features

    def config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "init": self.init}

    def __repr__(self) -> str:
        return f"FullyConnected({'?' if self.in_features is None else self.in_features}->{self.out_features})"

    def forward(self, x):
        self._expect_rank(x, 2, "(N, features)")
        if self.in_features is None:
            raise self._not_built("in_features")
        if x.shape[1] != self.in_features:
            raise ShapeError(f"{self}: expected input of shape (N, {self.in_features}), got {tuple(x.shape)}")
        self._x = x
        y = self.backend.matmul(x, self.params["weight"].data)
        y += self.params["bias"].data
        return y

    _x = None

    def backward(self, dy):
        if self._x is None:
            raise self._forward_first()
        self._expect_gradient(dy, (self._x.shape[0], self.out_features))
        xp = self.backend.xp
        weight, bias = self.params["weight"], self.params["bias"]
        x, self._x = self._x, None
        # Written straight into the flat gradient buffer when the model has one.
        weight_grad = weight.grad_view if weight.grad_view is not None else xp.empty_like(weight.data)
        products = [(x.T, dy, weight_grad)]
        dx = None
        if self.needs_input_grad:
            if x.T.flags.c_contiguous and not x.flags.c_contiguous:
                # x is a transposed (features, N) array (Flatten's batch-innermost view): give dx the
                # same memory order, so the layers before need no transposing copy.
                dx_t = xp.empty((x.shape[1], x.shape[0]), dtype=dy.dtype)
                products.append((weight.data, dy.T, dx_t))
                dx = dx_t.T
            else:
                dx = xp.empty(x.shape, dtype=dy.dtype)
                products.append((dy, weight.data.T, dx))
        self.backend.matmuls(products)  # the two gradients at once
        weight.grad = weight_grad
        bias.grad = xp.sum(dy, axis=0, out=bias.grad_view)
        return dx


class Dropout(Layer):
    """Inverted dropout: in training, zero each input with probability ``rate`` and scale the rest by
    ``1 / (1 - rate)``; in evaluation, the identity. Masks are drawn on the host from the layer's
    seeded generator, so CPU and GPU runs drop the same units.

    In data-parallel training ``batch_share`` is ``(start, total)``: this process holds samples
    ``start ..`` of a global batch of ``total``: every process advances the generator past the whole
    global batch's mask and applies its own rows, as one process would (drawing only those rows when
    the generator can skip ahead: the default PCG64 can)."""

    def __init__(self, rate: float = 0.5, *, rng=None, backend: Backend | str | None = None) -> None:
        super().__init__(backend)
        self.rate = as_number(rate, "Dropout: rate", "in [0, 1)", lambda value: 0.0 <= value < 1.0)
        # Without a generator of its own, build() hands it the model's (the draws then continue
        # the parameter initialisation's stream, as in the built-in networks).
        self._own_rng = rng is not None
        self.rng = make_rng(rng)
        self.batch_share: tuple[int, int] | None = None
        self._mask = None

    def _build(self, input_shape: tuple, rng) -> tuple:
        if not self._own_rng and rng is not None:
            self.rng, self._own_rng = make_rng(rng), True
        return input_shape

    def config(self) -> dict:
        return {"rate": self.rate}

    def forward(self, x):
        if not self.training or self.rate == 0.0:
            self._mask = None
            return x
        keep = self._draw_keep(tuple(x.shape))
        # Send the mask as booleans (a quarter of float32's bytes) and scale it on the device.
        self._mask = self.backend.to_device(keep).astype(x.dtype)
        self._mask *= 1.0 / (1.0 - self.rate)
        return F.multiply(self.backend, x, self._mask)

    def _draw_keep(self, shape: tuple):
        """``rng.random(global batch) >= rate`` for this process's rows (host booleans). A generator
        that can skip ahead exactly (PCG64: one 64-bit step per float64 value) draws only those rows
        and skips the others, so each of N processes draws a N-th of the mask and the stream, and
        with it every mask, is the same as one process's."""
        start, total = self.batch_share or (0, shape[0])
        per_sample = math.prod(shape[1:])
        bit_generator = self.rng.bit_generator
        skips = (
            shape[0] < total
            and isinstance(bit_generator, (numpy.random.PCG64, numpy.random.PCG64DXSM))
            # advance() drops a buffered 32-bit half; the full draw keeps it for later draws
            and not bit_generator.state["has_uint32"]
        )
        if not skips:
            return (self.rng.random((total,) + shape[1:]) >= self.rate)[start:start + shape[0]]
        bit_generator.advance(start * per_sample)
        keep = self.rng.random(shape) >= self.rate
        bit_generator.advance((total - start - shape[0]) * per_sample)
        return keep

    def backward(self, dy):
        if self._mask is None:
            return dy
        self._expect_gradient(dy, self._mask.shape)
        return F.multiply(self.backend, dy, self._mask)
