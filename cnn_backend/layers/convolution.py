"""2-D convolution and the choice of its algorithm (im2col + matrix product, or FFT)."""

from __future__ import annotations

from .. import functional as F
from ..backend import Backend
from ..init import check_init, initial_weight, make_rng
from ..parameters import Parameter
from .base import Layer, ShapeError, _optional_size, _size, missing_size_after_positional


class Convolution(Layer):
    """2-D convolution (cross-correlation) with one bias per filter (none with ``bias=False``).

    ``in_channels`` may be left out (None): :meth:`build` infers it from the input shape and only
    then creates the weights. ``algorithm``: ``"gemm"`` (im2col + matrix product), ``"signal"`` (FFT
    convolution through the backend's signal module) or ``"auto"`` (see :func:`resolve_conv_algorithm`).
    """

    inferred_sizes = ("in_channels",)

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
        if kernel_size is None and None not in (in_channels, out_channels):  # Convolution(8, 3), as Keras's Conv2D(8, 3)
            raise missing_size_after_positional(
                "Convolution", "kernel_size", (in_channels, out_channels), ("in_channels", "out_channels", "kernel_size")
            )
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
        self.bias, self.algorithm, self.init = bias, algorithm, check_init(init, "Convolution")
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
        algorithm = resolve_conv_algorithm(self.algorithm, weight.shape, self.stride)
        if algorithm == "gemm" and self.runs_banded(x.shape):
            y, self._cache = F.conv2d_forward_banded(self.backend, x, weight, bias, self.stride, self.padding, self._workspace)
        else:
            y, self._cache = F.conv2d_forward(self.backend, x, weight, bias, self.stride, self.padding, algorithm, self._workspace)
        self._output_shape = tuple(y.shape)
        return y

    def runs_banded(self, input_shape) -> bool:
        """Whether a gemm :meth:`forward` on input of ``input_shape`` (N, C, H, W) computes the
        convolution in its banded form (:func:`F.conv2d_forward_banded`): in evaluation only (a
        training step wants the im2col matrix again for the weight gradient), on a backend that
        asks for it (the CPU's), where it does less work (:func:`F.banded_convolution_pays`)."""
        weight_shape = (self.out_channels, self.in_channels, self.kernel_size, self.kernel_size)
        return not self.training and self.backend.bands_thin_convolutions and F.banded_convolution_pays(weight_shape, input_shape[2])

    def runs_with_maxpool(self, pool, input_shape) -> bool:
        """Whether this layer and the 2x2 max-pool ``pool`` after it should run as one operation,
        :meth:`forward_maxpool2x2`, for input of ``input_shape`` (N, C, H, W).

        Only on a backend that asks for it (the CPU's, where it saves NumPy's short strided
        runs), for a stride-1 gemm convolution with an even output, when no input gradient is
        wanted (a first layer; in evaluation any layer, as backward through it is rare: it then
        runs the passes again, see :meth:`_unpool_evaluated`), and where it pays
        (:func:`F.conv_maxpool_pays`).
        """
        if not (self.backend.fuses_conv_maxpool and pool.pool_size == pool.stride == 2 and self.stride == 1):
            return False
        if self.in_channels is None or len(input_shape) != 4 or input_shape[1] != self.in_channels:
            return False
        if self.training != pool.training or (self.training and self.needs_input_grad):
            return False
        weight_shape = (self.out_channels, self.in_channels, self.kernel_size, self.kernel_size)
        if resolve_conv_algorithm(self.algorithm, weight_shape, self.stride) != "gemm":
            return False
        out_h, out_w = (F.output_size(size, self.kernel_size, 1, self.padding) for size in input_shape[2:])
        return out_h % 2 == 0 and out_w % 2 == 0 and min(out_h, out_w) >= 2 and F.conv_maxpool_pays(*weight_shape[1:], self.out_channels)

    def forward_maxpool2x2(self, x):
        """This layer's forward pass followed by 2x2 max-pooling (stride 2), as one operation
        (see :meth:`runs_with_maxpool`); :meth:`backward` then takes the pooled gradient."""
        self._expect_rank(x, 4, "(N, C, H, W)")
        weight = self.params["weight"].data
        bias = self.params["bias"].data if self.bias else None
        y, self._cache = F.conv2d_maxpool2x2_forward(
            self.backend, x, weight, bias, self.padding, self._workspace, for_backward=self.training
        )
        if not self.training:  # a backward pass through evaluation finds the pooling's winners again
            self._cache = ("evaluated-maxpool2x2", x)
        self._output_shape = tuple(y.shape)
        return y

    def _unpool_evaluated(self, dy, x):
        """For a backward pass after :meth:`forward_maxpool2x2` in evaluation (a saliency map): the
        passes again, with what backward needs. Without an input gradient, as one operation (``dy``
        stays the pooled gradient); with one, as the two layers, ``dy`` sent through the pooling."""
        weight = self.params["weight"].data
        bias = self.params["bias"].data if self.bias else None
        if not self.needs_input_grad:
            return dy, F.conv2d_maxpool2x2_forward(self.backend, x, weight, bias, self.padding, self._workspace)[1]
        y, cache = F.conv2d_forward(self.backend, x, weight, bias, 1, self.padding, "gemm", self._workspace)
        _, pool_cache = F.maxpool_forward(self.backend, y, 2, 2, for_backward=True)
        return F.maxpool_backward(self.backend, dy, pool_cache), cache

    def backward(self, dy):
        if self._cache is None:
            raise self._forward_first()
        self._expect_gradient(dy, self._output_shape)
        weight, bias = self.params["weight"], self.params.get("bias")
        grad_out = (weight.grad_view, None if bias is None else bias.grad_view)
        if self._cache[0] == "evaluated-maxpool2x2":
            dy, self._cache = self._unpool_evaluated(dy, self._cache[1])
        if self._cache[0] == "gemm-maxpool2x2":  # dy is the pooled gradient; no input gradient
            dx = None
            weight.grad, dbias = F.conv2d_maxpool2x2_backward(self.backend, dy, self._cache, grad_out)
        else:
            dx, weight.grad, dbias = F.conv2d_backward(self.backend, dy, self._cache, self.needs_input_grad, grad_out=grad_out)
        if self.bias:
            bias.grad = dbias
        self._cache = None
        return dx


def resolve_conv_algorithm(algorithm: str, weight_shape=None, stride: int = 1) -> str:
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
