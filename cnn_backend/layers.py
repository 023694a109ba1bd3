"""Layers: each caches what its backward needs in ``forward`` and returns the input gradient from
``backward``, storing parameter gradients in ``Parameter.grad`` for an optimiser to apply.

Layers hold a :class:`~cnn_backend.backend.Backend` and take every array function from it; they are
initialised on the host (see :mod:`cnn_backend.init`) and moved with :meth:`Layer.to`.
"""

from __future__ import annotations

import math

from . import functional as F
from .backend import Backend, cpu_backend, get_backend
from .init import as_integer, initial_weight, make_rng
from .parameters import Parameter


class ShapeError(ValueError):
    """An input whose shape, dtype or values a layer cannot take."""


class NonFiniteLogitsError(ShapeError):
    """Logits holding NaN or infinity: diverged weights or bad input."""


class Layer:
    """Base class. Subclasses set ``self.params`` (name -> Parameter, trained) and, where they keep
    state that is not trained, ``self.buffers`` (name -> device array, e.g. BatchNorm's running
    statistics), and implement forward/backward.

    :meth:`build` tells a layer its per-sample input shape, lets it create the parameters whose sizes
    it infers from that shape (drawn from the host generator handed in, in layer order), and returns
    its per-sample output shape. A layer given every size at construction builds at once.
    """

    def __init__(self, backend: Backend | str | None = None) -> None:
        # Parameters are created directly in the backend's dtype, so float32 and float64 models
        # are both cast from the same float64 host draw.
        self.backend: Backend = cpu_backend() if backend is None else get_backend(backend)
        self.params: dict[str, Parameter] = {}
        self.buffers: dict = {}
        self.training = True
        # The first layer of a model never needs dx: skipping it saves a full col2im per step.
        self.needs_input_grad = True
        # Per-sample shapes seen by the last build (None until built with a shape).
        self.input_shape: tuple | None = None
        self.output_shape: tuple | None = None

    # -- shapes ---------------------------------------------------------------------------------

    def build(self, input_shape, rng=None) -> tuple:
        """Check ``input_shape`` (per sample, no batch axis), create missing parameters from the
        host generator ``rng``, and return the per-sample output shape."""
        input_shape = tuple(int(size) for size in input_shape)
        output_shape = tuple(self._build(input_shape, rng))
        self.input_shape, self.output_shape = input_shape, output_shape
        return output_shape

    def _build(self, input_shape: tuple, rng) -> tuple:
        """Subclasses: the output shape for ``input_shape`` (element-wise layers keep it)."""
        return input_shape

    def macs(self) -> int:
        """Multiply-accumulates per sample at the last built shapes (see :mod:`cnn_backend.summary`
        for what is counted; 0 for layers without weights)."""
        return 0

    def _expect_built_rank(self, input_shape: tuple, rank: int, layout: str) -> None:
        if len(input_shape) != rank:
            raise ShapeError(f"expected a per-sample input of shape {layout}, got {input_shape}")

    # -- state ----------------------------------------------------------------------------------

    def children(self) -> list[tuple[str, "Layer"]]:
        """Sub-layers of a container, as ``(name, layer)`` in order (none for plain layers)."""
        return []

    def named_parameters(self, prefix: str = "") -> list[tuple[str, Parameter]]:
        """Own parameters, then those of the children, with dotted names."""
        named = [(prefix + name, param) for name, param in self.params.items()]
        for child_name, child in self.children():
            named += child.named_parameters(f"{prefix}{child_name}.")
        return named

    def named_buffers(self, prefix: str = "") -> list[tuple[str, object]]:
        """Own buffers, then those of the children, with dotted names."""
        named = [(prefix + name, value) for name, value in self.buffers.items()]
        for child_name, child in self.children():
            named += child.named_buffers(f"{prefix}{child_name}.")
        return named

    def set_buffer(self, name: str, value) -> None:
        """Replace the buffer at dotted ``name`` (own or a child's) with the device array ``value``."""
        head, _, rest = name.partition(".")
        if not rest:
            self.buffers[name] = value
            return
        for child_name, child in self.children():
            if name.startswith(child_name + "."):
                child.set_buffer(name[len(child_name) + 1 :], value)
                return
        raise KeyError(name)

    def to(self, backend: Backend) -> "Layer":
        """Move parameters and buffers to ``backend`` (cast to its dtype) and compute there from now on.

        Parameters leave the model's flat buffer; :meth:`Sequential.to` builds a new one.
        """
        for param in self.params.values():
            param.detach_from_flat()
            host = self.backend.to_numpy(param.data)
            param.data = backend.to_device(host.astype(backend.dtype))
            param.grad = None
        for name, value in self.buffers.items():
            self.buffers[name] = backend.to_device(self.backend.to_numpy(value).astype(backend.dtype))
        for _, child in self.children():
            child.to(backend)
        self.backend = backend
        return self

    def config(self) -> dict:
        """Constructor arguments that rebuild this layer (parameters excluded)."""
        return {}

    def spec(self) -> dict:
        """This layer as an architecture-file entry: its type and the options a user writes
        (sizes that are inferred from the input shape are left out)."""
        return {"type": type(self).__name__, **self.config()}

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def __call__(self, x):
        return self.forward(x)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    def _forward_first(self) -> RuntimeError:
        return RuntimeError(f"{self}: backward needs a forward pass first (call forward, then backward once)")

    def _expect_rank(self, x, rank: int, layout: str) -> None:
        if x.ndim != rank:
            raise ShapeError(f"{self}: expected a {rank}-D input {layout}, got shape {tuple(x.shape)}")

    def _not_built(self, what: str) -> ShapeError:
        return ShapeError(f"{self}: {what} is not known yet: build the layer with its input shape first (or give {what})")


class Convolution(Layer):
    """2-D convolution (cross-correlation) with one bias per filter (none with ``bias=False``).

    ``in_channels`` may be left out (None): :meth:`build` infers it from the input shape and only
    then creates the weights. ``algorithm``: ``"gemm"`` (im2col + matrix product), ``"signal"`` (FFT
    convolution through the backend's signal module) or ``"auto"`` (see :func:`resolve_conv_algorithm`).
    """

    def __init__(
        self,
        in_channels: int | None = None,
        out_channels: int | None = None,
        kernel_size: int | None = None,
        stride: int = 1,
        padding: int = 0,
        *,
        bias: bool = True,
        algorithm: str = "auto",
        init: str = "he",
        rng=None,
        backend: Backend | str | None = None,
    ) -> None:
        super().__init__(backend)
        in_channels = _optional_size("Convolution", "in_channels", in_channels, 1)
        out_channels, kernel_size, stride, padding = (
            _size("Convolution", name, value, low)
            for name, value, low in (("out_channels", out_channels, 1), ("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0))
        )
        if not isinstance(bias, bool):
            raise ValueError(f"Convolution: bias must be true or false, got {bias!r}")
        if algorithm not in F.CONV_ALGORITHMS + ("auto",):
            raise ValueError(f"Convolution: algorithm must be one of auto, {', '.join(F.CONV_ALGORITHMS)}, got {algorithm!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.bias, self.algorithm, self.init = bias, algorithm, init
        self._cache = None
        # im2col buffers reused from step to step (see functional.conv2d_forward's ``workspace``).
        self._workspace: dict = {}
        if in_channels is not None:
            self._create_parameters(rng)

    def _create_parameters(self, rng) -> None:
        k = self.kernel_size
        fan_in, fan_out = self.in_channels * k * k, self.out_channels * k * k
        shape = (self.out_channels, self.in_channels, k, k)
        weight = initial_weight(make_rng(rng), shape, fan_in, fan_out, self.init)
        self.params = {"weight": Parameter(self.backend.to_device(weight.astype(self.backend.dtype)))}
        if self.bias:
            self.params["bias"] = Parameter(self.backend.xp.zeros(self.out_channels, dtype=self.backend.dtype))

    def _build(self, input_shape: tuple, rng) -> tuple:
        self._expect_built_rank(input_shape, 3, "(C, H, W)")
        channels, h, w = input_shape
        if self.in_channels is None:
            self.in_channels = channels
            self._create_parameters(rng)
        elif channels != self.in_channels:
            raise ShapeError(f"expected {self.in_channels} input channels, got input of shape {input_shape}")
        if min(h, w) + 2 * self.padding < self.kernel_size:
            raise ShapeError(
                f"kernel {self.kernel_size}x{self.kernel_size} is larger than its input {h}x{w}"
                + (f" padded by {self.padding}" if self.padding else "")
            )
        k, s, p = self.kernel_size, self.stride, self.padding
        return (self.out_channels, F.output_size(h, k, s, p), F.output_size(w, k, s, p))

    def macs(self) -> int:
        if self.output_shape is None:
            return 0
        out_c, out_h, out_w = self.output_shape
        return out_c * out_h * out_w * self.in_channels * self.kernel_size * self.kernel_size

    def config(self) -> dict:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": self.kernel_size,
            "stride": self.stride,
            "padding": self.padding,
            "bias": self.bias,
            "algorithm": self.algorithm,
            "init": self.init,
        }

    def spec(self) -> dict:
        entry = {"type": "Convolution", **self.config()}
        del entry["in_channels"]
        return entry

    def __repr__(self) -> str:
        k = self.kernel_size
        channels = "?" if self.in_channels is None else self.in_channels
        return (
            f"Convolution({channels}->{self.out_channels}, {k}x{k}, "
            f"stride={self.stride}, padding={self.padding}{'' if self.bias else ', bias=False'}, algorithm={self.algorithm})"
        )

    def forward(self, x):
        self._expect_rank(x, 4, "(N, C, H, W)")
        if self.in_channels is None:
            raise self._not_built("in_channels")
        smallest = self.kernel_size - 2 * self.padding
        if x.shape[1] != self.in_channels or min(x.shape[2:]) < smallest:
            raise ShapeError(
                f"{self}: expected input of shape (N, {self.in_channels}, H, W) with H, W >= {max(smallest, 1)}, "
                f"got {tuple(x.shape)}"
            )
        weight = self.params["weight"].data
        bias = self.params["bias"].data if self.bias else None
        algorithm = resolve_conv_algorithm(self.algorithm, self.backend, weight.shape, self.stride)
        y, self._cache = F.conv2d_forward(self.backend, x, weight, bias, self.stride, self.padding, algorithm, self._workspace)
        return y

    def backward(self, dy):
        if self._cache is None:
            raise self._forward_first()
        weight, bias = self.params["weight"], self.params.get("bias")
        dx, weight.grad, dbias = F.conv2d_backward(
            self.backend, dy, self._cache, self.needs_input_grad,
            grad_out=(weight.grad_view, None if bias is None else bias.grad_view),
        )
        if self.bias:
            bias.grad = dbias
        self._cache = None
        return dx


def resolve_conv_algorithm(algorithm: str, backend: Backend, weight_shape=None, stride: int = 1) -> str:
    """The algorithm ``"auto"`` stands for; explicit choices (``"gemm"``, ``"signal"``) pass through.

    ``"auto"`` first consults the global default (:func:`cnn_backend.functional.set_default_conv_algorithm`,
    else the environment variable ``CNN_BACKEND_CONV_ALGORITHM``), then this rule, the same on every
    device:

    * ``"signal"`` for a stride-1 convolution with a large kernel (``KH * KW >= 100``) and at most
      4 channel pairs (``C * F <= 4``);
    * ``"gemm"`` otherwise, and when no weight shape ``(F, C, KH, KW)`` is given.

    Why: gemm's work grows with the kernel area (im2col copies every input ``KH * KW`` times and
    col2im adds it back as often) but its arithmetic is one BLAS product, the fastest primitive on
    either device. FFT convolution costs about the same for any kernel size, but transforms and
    stores every (sample, filter, channel) triple separately (time and memory grow with ``C * F``)
    and computes the full stride-1 output even for strided layers. Measured on a 2-core CPU
    (float32, batch 64, 28x28, forward + backward): gemm is ~6x faster on the seed model's 1->1 6x6
    first layer and 7-40x faster on the default model's layers; signal is 1.4-4x faster from 10x10
    kernels on layers with 1-4 channel pairs that pass a gradient back, and level to 1.4x slower
    when they do not; with 8 or more pairs gemm is as fast or faster. A GPU cannot be measured here:
    the rule is kept there because the same costs apply (cuBLAS against cuFFT over ``N * F * C``
    stacks), and a large kernel also costs gemm one kernel launch per offset.
    """
    if algorithm != "auto":
        return algorithm
    chosen = F.get_default_conv_algorithm()
    if chosen != "auto":
        return chosen
    if weight_shape is None:
        return "gemm"
    n_filters, channels, kernel_h, kernel_w = weight_shape
    if stride == 1 and kernel_h * kernel_w >= 100 and channels * n_filters <= 4:
        return "signal"
    return "gemm"


class ReLU(Layer):
    """``max(x, 0)``; its gradient passes where the input was positive."""

    _positive = None

    def forward(self, x):
        y, self._positive = F.relu_forward(self.backend, x)
        return y

    def backward(self, dy):
        if self._positive is None:
            raise self._forward_first()
        dx = F.multiply(self.backend, dy, self._positive)
        self._positive = None
        return dx


class MaxPool(Layer):
    """Max over ``pool_size x pool_size`` windows moved by ``stride`` (default: ``pool_size``)."""

    def __init__(self, pool_size: int, stride: int | None = None, *, backend: Backend | str | None = None) -> None:
        super().__init__(backend)
        stride = pool_size if stride is None else stride
        pool_size, stride = (_size("MaxPool", name, value, 1) for name, value in (("pool_size", pool_size), ("stride", stride)))
        self.pool_size, self.stride = pool_size, stride
        self._cache = None

    def config(self) -> dict:
        return {"pool_size": self.pool_size, "stride": self.stride}

    def _build(self, input_shape: tuple, rng) -> tuple:
        return _pool_output_shape(self, input_shape)

    def forward(self, x):
        self._expect_rank(x, 4, "(N, C, H, W)")
        if min(x.shape[2:]) < self.pool_size:
            raise ShapeError(f"{self}: expected H, W >= {self.pool_size}, got input of shape {tuple(x.shape)}")
        # In evaluation mode nothing is recorded for a backward pass (about half the work).
        y, self._cache = F.maxpool_forward(self.backend, x, self.pool_size, self.stride, for_backward=self.training)
        return y

    def backward(self, dy):
        if self._cache is None:
            raise RuntimeError(f"{self}: backward needs a forward pass in training mode first (call model.train())")
        dx = F.maxpool_backward(self.backend, dy, self._cache)
        self._cache = None
        return dx


def _pool_output_shape(layer, input_shape: tuple) -> tuple:
    """Per-sample output shape of a ``pool_size``/``stride`` window sweep (floor mode)."""
    layer._expect_built_rank(input_shape, 3, "(C, H, W)")
    channels, h, w = input_shape
    if min(h, w) < layer.pool_size:
        raise ShapeError(f"window {layer.pool_size}x{layer.pool_size} is larger than its input {h}x{w}")
    return (channels, F.output_size(h, layer.pool_size, layer.stride, 0), F.output_size(w, layer.pool_size, layer.stride, 0))


class Flatten(Layer):
    """``(N, C, H, W) -> (N, C * H * W)``, features in C, H, W order.

    A batch-innermost activation (see :mod:`cnn_backend.functional` on layout) is flattened for free
    as the transposed view of its ``(C * H * W, N)`` memory, which the dense layer multiplies as is;
    the gradient goes back the same way.
    """

    def _build(self, input_shape: tuple, rng) -> tuple:
        size = 1
        for extent in input_shape:
            size *= extent
        return (size,)

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
        if self._through_batch_innermost:
            n, c, h, w = self._shape
            return F.nchw_view(dy.T.reshape(c, h, w, n))
        return dy.reshape(self._shape)


class FullyConnected(Layer):
    """``y = x @ W + b`` with ``W`` of shape ``(in_features, out_features)``.

    ``in_features`` may be left out (None): :meth:`build` infers it from the (flat) input shape.
    """

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
        in_features = _optional_size("FullyConnected", "in_features", in_features, 1)
        out_features = _size("FullyConnected", "out_features", out_features, 1)
        self.in_features, self.out_features, self.init = in_features, out_features, init
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

    def spec(self) -> dict:
        return {"type": "FullyConnected", "out_features": self.out_features, "init": self.init}

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
        xp = self.backend.xp
        weight, bias = self.params["weight"], self.params["bias"]
        # Written straight into the flat gradient buffer when the model has one (out=None allocates).
        weight.grad = self.backend.matmul(self._x.T, dy, out=weight.grad_view)
        bias.grad = xp.sum(dy, axis=0, out=bias.grad_view)
        x, self._x = self._x, None
        if not self.needs_input_grad:
            return None
        weight = self.params["weight"].data
        if x.T.flags.c_contiguous and not x.flags.c_contiguous:
            # x is a transposed (features, N) array (Flatten's batch-innermost view): give dx the
            # same memory order, so the layers before need no transposing copy.
            return self.backend.matmul(weight, dy.T).T
        return self.backend.matmul(dy, weight.T)


class Dropout(Layer):
    """Inverted dropout: in training, zero each input with probability ``rate`` and scale the rest by
    ``1 / (1 - rate)``; in evaluation, the identity. Masks are drawn on the host from the layer's
    seeded generator, so CPU and GPU runs drop the same units.

    In data-parallel training ``batch_share`` is ``(start, total)``: this process holds samples
    ``start ..`` of a global batch of ``total``, so the mask is drawn for the whole global batch (every
    process advances the generator alike) and this process applies its rows, as one process would."""

    def __init__(self, rate: float = 0.5, *, rng=None, backend: Backend | str | None = None) -> None:
        super().__init__(backend)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"Dropout: rate must be in [0, 1), got {rate!r}")
        self.rate = float(rate)
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
        start, total = self.batch_share or (0, x.shape[0])
        keep = (self.rng.random((total,) + tuple(x.shape[1:])) >= self.rate)[start:start + x.shape[0]]
        # Send the mask as booleans (a quarter of float32's bytes) and scale it on the device.
        self._mask = self.backend.to_device(keep).astype(x.dtype)
        self._mask *= 1.0 / (1.0 - self.rate)
        return F.multiply(self.backend, x, self._mask)

    def backward(self, dy):
        return dy if self._mask is None else F.multiply(self.backend, dy, self._mask)


# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------


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

    def __init__(
        self, num_features: int | None = None, momentum: float = 0.1, eps: float = 1e-5, *, backend: Backend | str | None = None
    ) -> None:
        super().__init__(backend)
        num_features = _optional_size("BatchNorm", "num_features", num_features, 1)
        for name, value in (("momentum", momentum), ("eps", eps)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"BatchNorm: {name} must be a number, got {value!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"BatchNorm: momentum must be in [0, 1], got {momentum!r}")
        if not eps > 0.0:
            raise ValueError(f"BatchNorm: eps must be > 0, got {eps!r}")
        self.num_features, self.momentum, self.eps = num_features, float(momentum), float(eps)
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

    def spec(self) -> dict:
        return {"type": "BatchNorm", "momentum": self.momentum, "eps": self.eps}

    def macs(self) -> int:
        return 0 if self.output_shape is None else _element_count(self.output_shape)

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
            if count < 2:
                raise ShapeError(f"{self}: training needs more than one value per channel, got input of shape {tuple(x.shape)}")
            mean = rows.mean(axis=1)
            centred = rows - mean[:, None]
            var = (centred * centred).mean(axis=1)
            inv_std = 1.0 / xp.sqrt(var + self.eps)
            normalised = centred * inv_std[:, None]
            momentum = self.momentum
            running_mean, running_var = self.buffers["running_mean"], self.buffers["running_var"]
            running_mean *= 1.0 - momentum
            running_mean += momentum * mean
            running_var *= 1.0 - momentum
            running_var += (momentum * count / (count - 1)) * var
            y_rows = normalised * weight[:, None] + bias[:, None]
            self._cache = ("batch", x.shape, normalised, inv_std)
        else:
            inv_std = 1.0 / xp.sqrt(self.buffers["running_var"] + self.eps)
            scale = weight * inv_std
            shift = bias - self.buffers["running_mean"] * scale
            y_rows = rows * scale[:, None] + shift[:, None]
            self._cache = ("running", x.shape, rows, inv_std)
        return self._from_rows(y_rows, x.shape)

    def backward(self, dy):
        if self._cache is None:
            raise self._forward_first()
        mode, shape, saved, factor = self._cache
        self._cache = None
        dy_rows = self._as_rows(dy)
        weight = self.params["weight"].data
        if mode == "running":
            # Affine in x with the running statistics fixed: dx = dy * weight / sqrt(running_var + eps).
            rows, inv_std = saved, factor
            normalised = (rows - self.buffers["running_mean"][:, None]) * inv_std[:, None]
            self.params["weight"].grad = (dy_rows * normalised).sum(axis=1)
            self.params["bias"].grad = dy_rows.sum(axis=1)
            return self._from_rows(dy_rows * (weight * inv_std)[:, None], shape) if self.needs_input_grad else None
        normalised, inv_std = saved, factor
        dbias = dy_rows.sum(axis=1)
        dweight = (dy_rows * normalised).sum(axis=1)
        self.params["weight"].grad, self.params["bias"].grad = dweight, dbias
        if not self.needs_input_grad:
            return None
        count = dy_rows.shape[1]
        # d x = inv_std * (g - mean(g) - normalised * mean(g * normalised)) with g = weight * dy
        # (the means of g and g * normalised are weight * dbias / count and weight * dweight / count).
        dx_rows = dy_rows - (dbias * (1.0 / count))[:, None]
        dx_rows -= normalised * (dweight * (1.0 / count))[:, None]
        dx_rows *= (weight * inv_std)[:, None]
        return self._from_rows(dx_rows, shape)


def _element_count(shape) -> int:
    count = 1
    for extent in shape:
        count *= extent
    return count


# --------------------------------------------------------------------------------------------------
# Average pooling
# --------------------------------------------------------------------------------------------------


class AvgPool(Layer):
    """Mean over ``pool_size x pool_size`` windows moved by ``stride`` (default: ``pool_size``), no
    padding, floor mode (PyTorch's ``AvgPool2d`` defaults)."""

    def __init__(self, pool_size: int, stride: int | None = None, *, backend: Backend | str | None = None) -> None:
        super().__init__(backend)
        stride = pool_size if stride is None else stride
        pool_size, stride = (_size("AvgPool", name, value, 1) for name, value in (("pool_size", pool_size), ("stride", stride)))
        self.pool_size, self.stride = pool_size, stride
        self._shape = None

    def config(self) -> dict:
        return {"pool_size": self.pool_size, "stride": self.stride}

    def _build(self, input_shape: tuple, rng) -> tuple:
        return _pool_output_shape(self, input_shape)

    def _window_taps(self, x, out_h: int, out_w: int):
        """``(i, j, view)`` for every offset of the window: the tap of each output's window."""
        s = self.stride
        for i in range(self.pool_size):
            for j in range(self.pool_size):
                yield x[:, :, i : i + s * (out_h - 1) + 1 : s, j : j + s * (out_w - 1) + 1 : s]

    def forward(self, x):
        self._expect_rank(x, 4, "(N, C, H, W)")
        if min(x.shape[2:]) < self.pool_size:
            raise ShapeError(f"{self}: expected H, W >= {self.pool_size}, got input of shape {tuple(x.shape)}")
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
        self._shape = None
        dx = self.backend.xp.empty((c, h * w, n), dtype=dy.dtype)
        dx[...] = (dy.T * (1.0 / (h * w)))[:, None, :]
        return F.nchw_view(dx.reshape(c, h, w, n))


# --------------------------------------------------------------------------------------------------
# Activations: element-wise, so they keep whatever memory layout they are given
# --------------------------------------------------------------------------------------------------


class LeakyReLU(Layer):
    """``x`` where positive, ``negative_slope * x`` elsewhere (PyTorch's default slope 0.01)."""

    def __init__(self, negative_slope: float = 0.01, *, backend: Backend | str | None = None) -> None:
        super().__init__(backend)
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
            raise ValueError(f"LeakyReLU: negative_slope must be a number, got {negative_slope!r}")
        self.negative_slope = float(negative_slope)

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
        dx = dy * self._slope
        self._slope = None
        return dx


class Tanh(Layer):
    """``tanh(x)``; its derivative ``1 - tanh(x)^2`` comes from the output."""

    def forward(self, x):
        self._y = self.backend.xp.tanh(x)
        return self._y

    _y = None

    def backward(self, dy):
        if self._y is None:
            raise self._forward_first()
        y, self._y = self._y, None
        return dy * (1.0 - y * y)


class Sigmoid(Layer):
    """``1 / (1 + exp(-x))``, computed as ``(1 + tanh(x / 2)) / 2`` (no overflow for large ``|x|``)."""

    def forward(self, x):
        y = self.backend.xp.tanh(x * 0.5)
        y += 1.0
        y *= 0.5
        self._y = y
        return y

    _y = None

    def backward(self, dy):
        if self._y is None:
            raise self._forward_first()
        y, self._y = self._y, None
        return dy * (y * (1.0 - y))


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
        self._saved = None
        inner_derivative = (1.0 + (3.0 * self.COEFFICIENT) * squared) * self.SQRT_2_OVER_PI
        return dy * (0.5 * (1.0 + t) + (0.5 * x) * (1.0 - t * t) * inner_derivative)


# --------------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------------


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

    def spec(self) -> dict:
        return {"type": "Residual", "layers": [layer.spec() for layer in self.layers]}

    def __repr__(self) -> str:
        inner = ", ".join(repr(layer) for layer in self.layers)
        return f"Residual([{inner}]" + (f", projection={self.projection!r})" if self.projection is not None else ")")

    def _build(self, input_shape: tuple, rng) -> tuple:
        shape = input_shape
        for index, layer in enumerate(self.layers):
            try:
                shape = layer.build(shape, rng)
            except ShapeError as exc:
                raise ShapeError(f"inner layer {index} ({type(layer).__name__}): {exc}") from None
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

    def macs(self) -> int:
        return sum(layer.macs() for _, layer in self.children())

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


class SoftmaxCrossEntropy:
    """Fused softmax + categorical cross-entropy: the loss of integer class labels given logits.

    ``check_inputs`` validates labels and logits (one device sync each); training loops that have
    validated labels on the host turn it off and watch the loss value instead.
    """

    def __init__(self, backend: Backend | str | None = None, *, check_inputs: bool = True) -> None:
        self.backend = cpu_backend() if backend is None else get_backend(backend)
        self.check_inputs = check_inputs
        self._dlogits = None

    def forward(self, logits, labels):
        if not hasattr(labels, "shape"):  # a list or tuple of class indices
            labels = self.backend.to_device(labels)
        if logits.ndim != 2:
            raise ShapeError(f"SoftmaxCrossEntropy: expected logits of shape (N, classes), got {tuple(logits.shape)}")
        if labels.shape != (logits.shape[0],):
            raise ShapeError(
                f"SoftmaxCrossEntropy: expected labels of shape ({logits.shape[0]},) to match the logits, "
                f"got {tuple(labels.shape)}"
            )
        if labels.dtype.kind not in "iu":
            raise ShapeError(f"SoftmaxCrossEntropy: labels must be integer class indices, got dtype {labels.dtype}")
        if self.check_inputs:
            self._check_values(logits, labels)
        loss, self._dlogits = F.softmax_cross_entropy(self.backend, logits, labels)
        return loss

    def _check_values(self, logits, labels) -> None:
        xp = self.backend.xp
        n_classes = logits.shape[1]
        if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
            raise ShapeError(
                f"SoftmaxCrossEntropy: labels must be in [0, {n_classes - 1}], "
                f"got values from {int(labels.min())} to {int(labels.max())}"
            )
        if not bool(xp.isfinite(logits).all()):
            raise NonFiniteLogitsError("SoftmaxCrossEntropy: logits contain NaN or infinity (diverged training or bad input)")

    def backward(self):
        """Gradient of the mean loss with respect to the logits: ``(softmax - onehot) / N``."""
        return self._dlogits

    __call__ = forward


def _size(layer: str, name: str, value, low: int) -> int:
    """A size argument as a Python int; NumPy integers count as integers."""
    try:
        return as_integer(value, name, low)
    except ValueError as exc:
        raise ValueError(f"{layer}: {exc}") from None


def _optional_size(layer: str, name: str, value, low: int) -> int | None:
    """As :func:`_size`, with None (a size that build infers) passed through."""
    return None if value is None else _size(layer, name, value, low)


LAYER_TYPES = {
    cls.__name__: cls
    for cls in (
        Convolution, ReLU, MaxPool, Flatten, FullyConnected, Dropout,
        BatchNorm, AvgPool, GlobalAvgPool, LeakyReLU, Tanh, Sigmoid, GELU, Residual,
    )
}
