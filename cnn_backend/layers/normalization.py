"""Batch normalisation."""

from __future__ import annotations

import math

from .. import functional as F
from ..backend import Backend
from ..init import as_number
from ..parameters import Parameter
from .base import Layer, ShapeError, _optional_size


class BatchNorm(Layer):
    """Batch normalisation with PyTorch's conventions (``BatchNorm2d``/``BatchNorm1d``).

    Statistics per channel over (N, H, W) for a 4-D input, per feature over N for a 2-D one. In
    training the batch is normalised with its biased variance, and the running statistics move by
    ``running = (1 - momentum) * running + momentum * batch`` with the *unbiased* batch variance;
    in evaluation the running statistics are used (so a batch of one works).
    ``y = weight * (x - mean) / sqrt(var + eps) + bias``; ``weight`` starts at 1, ``bias`` at 0,
    ``running_mean`` at 0 and ``running_var`` at 1. The running statistics are buffers: saved and
    moved with the model, never trained.
    """

    inferred_sizes = ("num_features",)

    def __init__(
        self, num_features: int | None = None, momentum: float = 0.1, eps: float = 1e-5, *, backend: Backend | str | None = None
    ) -> None:
        super().__init__(backend)
        num_features = _optional_size("BatchNorm", "num_features", num_features, 1)
        momentum = as_number(momentum, "BatchNorm: momentum", "in [0, 1]", lambda value: 0.0 <= value <= 1.0)
        eps = as_number(eps, "BatchNorm: eps", "a finite number > 0", lambda value: 0.0 < value < math.inf)
        self.num_features, self.momentum, self.eps = num_features, momentum, eps
        self._cache = None
        if num_features is not None:
            self._create_parameters()

    def _create_parameters(self) -> None:
        xp, dtype, size = self.backend.xp, self.backend.dtype, self.num_features
        self.params = {"weight": Parameter(xp.ones(size, dtype=dtype)), "bias": Parameter(xp.zeros(size, dtype=dtype))}
        self.buffers = {"running_mean": xp.zeros(size, dtype=dtype), "running_var": xp.ones(size, dtype=dtype)}

    def _build(self, input_shape: tuple, rng) -> tuple:
        if len(input_shape) not in (1, 3):
            raise ShapeError(f"expected a per-sample input of shape (C, H, W) or (features,), got {input_shape}")
        if self.num_features is None:
            self.num_features = input_shape[0]
            self._create_parameters()
        elif input_shape[0] != self.num_features:
            raise ShapeError(f"expected {self.num_features} channels or features, got input of shape {input_shape}")
        return input_shape

    def config(self) -> dict:
        return {"num_features": self.num_features, "momentum": self.momentum, "eps": self.eps}

    def macs(self) -> int:
        return 0 if self.output_shape is None else math.prod(self.output_shape)

    def _as_rows(self, x):
        """``x`` as a ``(features, samples)`` 2-D array: one row per channel (4-D: over N, H, W in
        the batch-innermost layout, free after a convolution) or per feature (2-D: a transposed view)."""
        if x.ndim == 4:
            return F.as_batch_innermost(self.backend, x).reshape(x.shape[1], -1)
        return x.T

    def _from_rows(self, rows, shape):
        if len(shape) == 4:
            n, c, h, w = shape
            return F.nchw_view(rows.reshape(c, h, w, n))
        return rows.T

    def forward(self, x):
        return self._forward(x, relu=False)

    def forward_relu(self, x):
        """This layer's forward pass followed by ReLU, as one operation (``Sequential`` runs a
        BatchNorm and the ReLU after it so): each chunk is rectified while in cache, and
        :meth:`backward` then takes the gradient after the ReLU."""
        return self._forward(x, relu=True)

    def _forward(self, x, relu: bool):
        if x.ndim not in (2, 4):
            raise ShapeError(f"{self}: expected a 4-D input (N, C, H, W) or a 2-D input (N, features), got shape {tuple(x.shape)}")
        if self.num_features is None:
            raise self._not_built("num_features")
        if x.shape[1] != self.num_features:
            raise ShapeError(f"{self}: expected {self.num_features} channels or features, got input of shape {tuple(x.shape)}")
        xp = self.backend.xp
        rows = self._as_rows(x)
        count = rows.shape[1]
        weight, bias = self.params["weight"].data, self.params["bias"].data
        if self.training:
            positive = xp.empty_like(rows) if relu else None
            if count < 2:
                raise ShapeError(f"{self}: training needs more than one value per channel, got input of shape {tuple(x.shape)}")
            y_rows, normalised, mean, var, inv_std = F.batch_norm_forward(self.backend, rows, weight, bias, self.eps, positive)
            momentum = self.momentum
            running_mean, running_var = self.buffers["running_mean"], self.buffers["running_var"]
            running_mean *= 1.0 - momentum
            running_mean += momentum * mean
            running_var *= 1.0 - momentum
            running_var += (momentum * count / (count - 1)) * var
            self._cache = ("batch", x.shape, normalised, inv_std, positive)
        else:
            inv_std = 1.0 / xp.sqrt(self.buffers["running_var"] + self.eps)
            scale = weight * inv_std
            shift = bias - self.buffers["running_mean"] * scale
            y_rows = F.scale_and_shift_rows(self.backend, rows, scale, shift, relu)
            # No ReLU mask in evaluation (a pass less): a backward pass takes it from the output.
            self._cache = ("running", x.shape, rows, inv_std, y_rows if relu else None)
        return self._from_rows(y_rows, x.shape)

    def backward(self, dy):
        if self._cache is None:
            raise self._forward_first()
        # relu: a fused ReLU's mask (batch statistics) or its output (running statistics), or None
        mode, shape, saved, factor, relu = self._cache
        self._expect_gradient(dy, shape)
        self._cache = None
        dy_rows = self._as_rows(dy)
        weight = self.params["weight"].data
        if mode == "running":
            if relu is not None:
                dy_rows = dy_rows * F.relu_mask(self.backend, relu)
            # Affine in x with the running statistics fixed: dx = dy * weight / sqrt(running_var + eps).
            rows, inv_std = saved, factor
            normalised = (rows - self.buffers["running_mean"][:, None]) * inv_std[:, None]
            self.params["weight"].grad = (dy_rows * normalised).sum(axis=1)
            self.params["bias"].grad = dy_rows.sum(axis=1)
            return self._from_rows(dy_rows * (weight * inv_std)[:, None], shape) if self.needs_input_grad else None
        normalised, inv_std = saved, factor
        dx_rows, dweight, dbias = F.batch_norm_backward(self.backend, dy_rows, normalised, weight, inv_std, relu)
        self.params["weight"].grad, self.params["bias"].grad = dweight, dbias
        if not self.needs_input_grad:
            return None
        return self._from_rows(dx_rows, shape)
