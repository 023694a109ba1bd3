"""Layers: each caches what its backward needs in ``forward`` and returns the input gradient from
``backward``, storing parameter gradients in ``Parameter.grad`` for an optimiser to apply.

Layers hold a :class:`~cnn_backend.backend.Backend` and take every array function from it; they are
initialised on the host (see :mod:`cnn_backend.init`) and moved with :meth:`Layer.to`.
"""

from __future__ import annotations

from . import functional as F
from .backend import Backend, cpu_backend, get_backend
from .init import as_integer, initial_weight, make_rng


class ShapeError(ValueError):
    """An input whose shape, dtype or values a layer cannot take."""


class NonFiniteLogitsError(ShapeError):
    """Logits holding NaN or infinity: diverged weights or bad input."""


class Parameter:
    """A trainable array and its gradient (filled by the owning layer's ``backward``)."""

    __slots__ = ("data", "grad")

    def __init__(self, data):
        self.data = data
        self.grad = None


class Layer:
    """Base class. Subclasses set ``self.params`` (name -> Parameter) and implement forward/backward."""

    def __init__(self, backend: Backend | str | None = None) -> None:
        # Parameters are created directly in the backend's dtype, so float32 and float64 models
        # are both cast from the same float64 host draw.
        self.backend: Backend = cpu_backend() if backend is None else get_backend(backend)
        self.params: dict[str, Parameter] = {}
        self.training = True
        # The first layer of a model never needs dx: skipping it saves a full col2im per step.
        self.needs_input_grad = True

    def to(self, backend: Backend) -> "Layer":
        """Move parameters to ``backend`` (cast to its dtype) and compute there from now on."""
        for param in self.params.values():
            host = self.backend.to_numpy(param.data)
            param.data = backend.to_device(host.astype(backend.dtype))
            param.grad = None
        self.backend = backend
        return self

    def config(self) -> dict:
        """Constructor arguments that rebuild this layer (parameters excluded)."""
        return {}

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


class Convolution(Layer):
    """2-D convolution (cross-correlation) with one bias per filter.

    ``algorithm``: ``"gemm"`` (im2col + matrix product), ``"signal"`` (FFT convolution through the
    backend's signal module) or ``"auto"`` (see :func:`resolve_conv_algorithm`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        *,
        algorithm: str = "auto",
        init: str = "he",
        rng=None,
        backend: Backend | str | None = None,
    ) -> None:
        super().__init__(backend)
        in_channels, out_channels, kernel_size, stride, padding = (
            _size("Convolution", name, value, low)
            for name, value, low in (
                ("in_channels", in_channels, 1),
                ("out_channels", out_channels, 1),
                ("kernel_size", kernel_size, 1),
                ("stride", stride, 1),
                ("padding", padding, 0),
            )
        )
        if algorithm not in F.CONV_ALGORITHMS + ("auto",):
            raise ValueError(f"Convolution: algorithm must be one of auto, {', '.join(F.CONV_ALGORITHMS)}, got {algorithm!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.algorithm, self.init = algorithm, init
        fan_in = in_channels * kernel_size * kernel_size
        fan_out = out_channels * kernel_size * kernel_size
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        weight = initial_weight(make_rng(rng), shape, fan_in, fan_out, init)
        self.params = {
            "weight": Parameter(self.backend.to_device(weight.astype(self.backend.dtype))),
            "bias": Parameter(self.backend.xp.zeros(out_channels, dtype=self.backend.dtype)),
        }
        self._cache = None
        # im2col buffers reused from step to step (see functional.conv2d_forward's ``workspace``).
        self._workspace: dict = {}

    def config(self) -> dict:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": self.kernel_size,
            "stride": self.stride,
            "padding": self.padding,
            "algorithm": self.algorithm,
            "init": self.init,
        }

    def __repr__(self) -> str:
        k = self.kernel_size
        return (
            f"Convolution({self.in_channels}->{self.out_channels}, {k}x{k}, "
            f"stride={self.stride}, padding={self.padding}, algorithm={self.algorithm})"
        )

    def forward(self, x):
        self._expect_rank(x, 4, "(N, C, H, W)")
        smallest = self.kernel_size - 2 * self.padding
        if x.shape[1] != self.in_channels or min(x.shape[2:]) < smallest:
            raise ShapeError(
                f"{self}: expected input of shape (N, {self.in_channels}, H, W) with H, W >= {max(smallest, 1)}, "
                f"got {tuple(x.shape)}"
            )
        weight = self.params["weight"].data
        algorithm = resolve_conv_algorithm(self.algorithm, self.backend, weight.shape, self.stride)
        y, self._cache = F.conv2d_forward(
            self.backend, x, weight, self.params["bias"].data, self.stride, self.padding, algorithm, self._workspace
        )
        return y

    def backward(self, dy):
        if self._cache is None:
            raise self._forward_first()
        dx, dweight, dbias = F.conv2d_backward(self.backend, dy, self._cache, self.needs_input_grad)
        self.params["weight"].grad = dweight
        self.params["bias"].grad = dbias
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


class Flatten(Layer):
    """``(N, C, H, W) -> (N, C * H * W)``, features in C, H, W order.

    A batch-innermost activation (see :mod:`cnn_backend.functional` on layout) is flattened for free
    as the transposed view of its ``(C * H * W, N)`` memory, which the dense layer multiplies as is;
    the gradient goes back the same way.
    """

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
    """``y = x @ W + b`` with ``W`` of shape ``(in_features, out_features)``."""

    def __init__(
        self, in_features: int, out_features: int, *, init: str = "he", rng=None, backend: Backend | str | None = None
    ) -> None:
        super().__init__(backend)
        in_features, out_features = (
            _size("FullyConnected", name, value, 1) for name, value in (("in_features", in_features), ("out_features", out_features))
        )
        self.in_features, self.out_features, self.init = in_features, out_features, init
        weight = initial_weight(make_rng(rng), (in_features, out_features), in_features, out_features, init)
        self.params = {
            "weight": Parameter(self.backend.to_device(weight.astype(self.backend.dtype))),
            "bias": Parameter(self.backend.xp.zeros(out_features, dtype=self.backend.dtype)),
        }

    def config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "init": self.init}

    def __repr__(self) -> str:
        return f"FullyConnected({self.in_features}->{self.out_features})"

    def forward(self, x):
        self._expect_rank(x, 2, "(N, features)")
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
        self.params["weight"].grad = self.backend.matmul(self._x.T, dy)
        self.params["bias"].grad = dy.sum(axis=0)
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
    seeded generator, so CPU and GPU runs drop the same units."""

    def __init__(self, rate: float = 0.5, *, rng=None, backend: Backend | str | None = None) -> None:
        super().__init__(backend)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"Dropout: rate must be in [0, 1), got {rate!r}")
        self.rate = float(rate)
        self.rng = make_rng(rng)
        self._mask = None

    def config(self) -> dict:
        return {"rate": self.rate}

    def forward(self, x):
        if not self.training or self.rate == 0.0:
            self._mask = None
            return x
        keep = self.rng.random(x.shape) >= self.rate
        # Send the mask as booleans (a quarter of float32's bytes) and scale it on the device.
        self._mask = self.backend.to_device(keep).astype(x.dtype)
        self._mask *= 1.0 / (1.0 - self.rate)
        return F.multiply(self.backend, x, self._mask)

    def backward(self, dy):
        return dy if self._mask is None else F.multiply(self.backend, dy, self._mask)


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


LAYER_TYPES = {cls.__name__: cls for cls in (Convolution, ReLU, MaxPool, Flatten, FullyConnected, Dropout)}
