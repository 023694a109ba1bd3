"""Window pooling (max, average) and global average pooling."""

from __future__ import annotations

from .. import functional as F
from ..backend import Backend
from .base import Layer, ShapeError, _size


class _WindowPool(Layer):
    """What max- and average-pooling share: ``pool_size x pool_size`` windows moved by ``stride``
    (default: ``pool_size``), no padding, floor mode."""

    def __init__(self, pool_size: int, stride: int | None = None, *, backend: Backend | str | None = None) -> None:
        super().__init__(backend)
        stride = pool_size if stride is None else stride
        name = type(self).__name__
        pool_size, stride = (_size(name, option, value, 1) for option, value in (("pool_size", pool_size), ("stride", stride)))
        self.pool_size, self.stride = pool_size, stride

    def config(self) -> dict:
        return {"pool_size": self.pool_size, "stride": self.stride}

    def _build(self, input_shape: tuple, rng) -> tuple:
        self._expect_built_rank(input_shape, 3, "(C, H, W)")
        channels, h, w = input_shape
        if min(h, w) < self.pool_size:
            raise ShapeError(f"window {self.pool_size}x{self.pool_size} is larger than its input {h}x{w}")
        return (channels, F.output_size(h, self.pool_size, self.stride, 0), F.output_size(w, self.pool_size, self.stride, 0))

    def _pooled_shape(self, input_shape) -> tuple:
        """``(N, C, OH, OW)``: the output shape for an input of ``input_shape`` (N, C, H, W)."""
        n, c, h, w = input_shape
        return (n, c, F.output_size(h, self.pool_size, self.stride, 0), F.output_size(w, self.pool_size, self.stride, 0))

    def _expect_windowed_input(self, x) -> None:
        self._expect_rank(x, 4, "(N, C, H, W)")
        if min(x.shape[2:]) < self.pool_size:
            raise ShapeError(f"{self}: expected H, W >= {self.pool_size}, got input of shape {tuple(x.shape)}")


class MaxPool(_WindowPool):
    """Max over ``pool_size x pool_size`` windows moved by ``stride`` (default: ``pool_size``)."""

    def __init__(self, pool_size: int, stride: int | None = None, *, backend: Backend | str | None = None) -> None:
        super().__init__(pool_size, stride, backend=backend)
        self._cache = None

    #: the cache after a forward pass in evaluation mode: the input, for backward to find the winners again
    EVALUATED = "evaluated"

    def forward(self, x):
        self._expect_windowed_input(x)
        # In evaluation mode no winners are recorded (about half the work); a backward pass through
        # it (a saliency map) finds them again from the input.
        y, self._cache = F.maxpool_forward(self.backend, x, self.pool_size, self.stride, for_backward=self.training)
        if not self.training:
            self._cache = (self.EVALUATED, x)
        self._output_shape = tuple(y.shape)
        return y

    #: the cache after a forward pass run by the convolution before it (Convolution.forward_maxpool2x2)
    POOLED_BY_PREVIOUS = ("pooled by the previous layer",)

    def pooled_by_previous(self) -> None:
        """Record that the layer before pooled for this one: :meth:`backward` then hands the pooled
        gradient back unchanged, and that layer's backward pass routes it through the windows."""
        self._cache = self.POOLED_BY_PREVIOUS

    def backward(self, dy):
        if self._cache is None:
            raise self._forward_first()
        if self._cache is self.POOLED_BY_PREVIOUS:  # the convolution before checks dy
            self._cache = None
            return dy
        self._expect_gradient(dy, self._output_shape)
        if self._cache[0] == self.EVALUATED:
            _, self._cache = F.maxpool_forward(self.backend, self._cache[1], self.pool_size, self.stride, for_backward=True)
        dx = F.maxpool_backward(self.backend, dy, self._cache)
        self._cache = None
        return dx


class AvgPool(_WindowPool):
    """Mean over ``pool_size x pool_size`` windows moved by ``stride`` (default: ``pool_size``), no
    padding, floor mode (PyTorch's ``AvgPool2d`` defaults)."""

    def __init__(self, pool_size: int, stride: int | None = None, *, backend: Backend | str | None = None) -> None:
        super().__init__(pool_size, stride, backend=backend)
        self._shape = None

    def _window_taps(self, x, out_h: int, out_w: int):
        """``(i, j, view)`` for every offset of the window: the tap of each output's window."""
        s = self.stride
        for i in range(self.pool_size):
            for j in range(self.pool_size):
                yield x[:, :, i : i + s * (out_h - 1) + 1 : s, j : j + s * (out_w - 1) + 1 : s]

    def forward(self, x):
        self._expect_windowed_input(x)
        n, c, h, w = x.shape
        out_h, out_w = F.output_size(h, self.pool_size, self.stride, 0), F.output_size(w, self.pool_size, self.stride, 0)
        # Batch-innermost, as max-pooling: each tap is then runs of N consecutive values.
        x = F.nchw_view(F.as_batch_innermost(self.backend, x))
        total = F.nchw_view(self.backend.xp.zeros((c, out_h, out_w, n), dtype=x.dtype))
        for tap in self._window_taps(x, out_h, out_w):
            total += tap
        total *= 1.0 / (self.pool_size * self.pool_size)
        self._shape = x.shape
        return total

    def backward(self, dy):
        if self._shape is None:
            raise self._forward_first()
        self._expect_gradient(dy, self._pooled_shape(self._shape))
        n, c, h, w = self._shape
        self._shape = None
        out_h, out_w = dy.shape[2:]
        share = F.nchw_view(F.as_batch_innermost(self.backend, dy)) * (1.0 / (self.pool_size * self.pool_size))
        dx = F.nchw_view(self.backend.xp.zeros((c, h, w, n), dtype=dy.dtype))
        # Overlapping windows add into the same inputs: slice-adds in a fixed order (deterministic).
        for target in self._window_taps(dx, out_h, out_w):
            target += share
        return dx


class GlobalAvgPool(Layer):
    """``(N, C, H, W) -> (N, C)``: the mean of each channel over all positions."""

    def _build(self, input_shape: tuple, rng) -> tuple:
        self._expect_built_rank(input_shape, 3, "(C, H, W)")
        return (input_shape[0],)

    def forward(self, x):
        self._expect_rank(x, 4, "(N, C, H, W)")
        n, c, h, w = x.shape
        self._shape = x.shape
        rows = F.as_batch_innermost(self.backend, x).reshape(c, h * w, n)
        # (C, N) memory handed on as its (N, C) transpose, as Flatten does for the dense layer.
        return rows.mean(axis=1).T

    _shape = None

    def backward(self, dy):
        if self._shape is None:
            raise self._forward_first()
        n, c, h, w = self._shape
        self._expect_gradient(dy, (n, c))
        self._shape = None
        dx = self.backend.xp.empty((c, h * w, n), dtype=dy.dtype)
        dx[...] = (dy.T * (1.0 / (h * w)))[:, None, :]
        return F.nchw_view(dx.reshape(c, h, w, n))
