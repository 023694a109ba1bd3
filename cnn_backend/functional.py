"""Stateless array kernels, written once against a :class:`~cnn_backend.backend.Backend`.

Every function takes the backend first and calls only ``be.xp`` / ``be.signal``, so it runs on NumPy
and on CuPy alike. Shapes follow NCHW: ``x`` is ``(N, C, H, W)``, a convolution weight is
``(F, C, KH, KW)``. The only Python loops are over kernel offsets (at most ``KH * KW`` iterations),
never over samples, pixels or channels.

Two convolution algorithms compute the same cross-correlation:

* ``"gemm"``: im2col by slicing over kernel offsets into a ``(C * KH * KW, OH * OW * N)`` matrix,
  then one contiguous 2-D matrix product for the whole batch; the backward pass folds back with
  slice-adds (deterministic, unlike atomic scatter-adds on a GPU). Each offset copies (or adds back)
  only the part of its window that overlaps the input: what falls in the zero padding is left zero,
  so no padded copy of the input or of its gradient is made.
* ``"signal"``: FFT convolution through ``be.signal.fftconvolve`` over the two spatial axes, with the
  batch and filter axes broadcast so one call covers the whole batch. ``correlate``/``convolve`` are
  not used because their ``'valid'`` mode rejects broadcast batch axes, and their default
  ``method='auto'`` is not implemented for N-D input on CuPy.

Memory layout. Arrays always have NCHW *shapes*, but the gemm convolution stores its output
batch-innermost, ``(F, OH, OW, N)`` in memory (the layout of cuda-convnet), and returns it as a
transposed view. That is the layout its matrix product produces, and every other kernel runs fastest
on it: im2col and col2im copy and add whole ``(OW, N)`` rows per kernel offset, max-pooling's taps are
runs of ``N`` consecutive values, and element-wise layers see one contiguous block. NumPy's cost per
element-wise call grows with the number of contiguous runs, and in NCHW order a 2x2 pooling tap or a
3x3 kernel offset breaks an activation into runs of a handful of pixels (CuPy's kernels take any
strides, so the device path needs nothing else). Element-wise layers keep the layout they are
given, max-pooling returns batch-innermost arrays both ways, and Flatten hands the dense layer a
transposed ``(features, N)`` view instead of copying. Any layout is accepted everywhere; only speed
depends on it.

Threads. The copies, pooling passes and element-wise work go through ``be.map_chunks`` and the
products through ``be.matmul`` (a layer's two gradient products through ``be.matmuls``): one plain
call on every device, and on the CPU one chunk per core (along channels, or along the batch axis
when there are fewer channels than cores).

Fused. On the CPU a first convolution and the 2x2 max-pool after it may run as one operation,
:func:`conv2d_maxpool2x2_forward`, whose product hands each quadrant of the pooling windows over as
one contiguous block (``Sequential`` chooses it; see ``Convolution.runs_with_maxpool``).

Banded. In evaluation, the CPU backend computes a convolution with few filters without im2col:
:func:`conv2d_forward_banded` multiplies the input once by a banded weight matrix and sums the
partial results with one slice-add per kernel column (``Convolution.runs_banded`` chooses it).

Buffers. A caller may pass a ``workspace`` dict to :func:`conv2d_forward` (a layer keeps one); the
im2col matrix is then allocated once and reused from step to step.

``"auto"`` is resolved by :func:`cnn_backend.layers.resolve_conv_algorithm`; it consults the global
default first: :func:`set_default_conv_algorithm`, else the environment variable
``CNN_BACKEND_CONV_ALGORITHM`` (``gemm``, ``signal`` or ``auto``).
"""

from __future__ import annotations

import functools
import os

from .backend import Backend

CONV_ALGORITHMS = ("gemm", "signal")
CONV_ALGORITHM_ENV = "CNN_BACKEND_CONV_ALGORITHM"

_default_conv_algorithm: str | None = None


def set_default_conv_algorithm(name: str | None) -> None:
    """Make every ``algorithm="auto"`` convolution use ``name`` (``"gemm"`` or ``"signal"``).

    ``"auto"`` or None restores the built-in rule (and the environment variable, if set). Layers
    given an explicit algorithm are not affected.
    """
    global _default_conv_algorithm
    if name is not None and name not in CONV_ALGORITHMS + ("auto",):
        raise ValueError(f"unknown convolution algorithm {name!r}; choose one of auto, {', '.join(CONV_ALGORITHMS)}")
    _default_conv_algorithm = None if name == "auto" else name


def get_default_conv_algorithm() -> str:
    """The global choice ``"auto"`` consults first: the one set by :func:`set_default_conv_algorithm`,
    else ``$CNN_BACKEND_CONV_ALGORITHM``, else ``"auto"`` (use the built-in rule)."""
    if _default_conv_algorithm is not None:
        return _default_conv_algorithm
    from_env = os.environ.get(CONV_ALGORITHM_ENV, "").strip().lower()
    if not from_env:
        return "auto"
    if from_env not in CONV_ALGORITHMS + ("auto",):
        raise ValueError(
            f"{CONV_ALGORITHM_ENV}={from_env!r} is not a convolution algorithm; "
            f"choose one of auto, {', '.join(CONV_ALGORITHMS)}"
        )
    return from_env


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Spatial output length of a convolution or pooling window sweep (floor mode)."""
    return (size + 2 * padding - kernel) // stride + 1


def pad_spatial(be: Backend, x, padding: int):
    """Zero-pad the last two axes of ``x`` by ``padding`` on each side."""
    if padding == 0:
        return x
    *lead, h, w = x.shape
    padded = be.xp.zeros((*lead, h + 2 * padding, w + 2 * padding), dtype=x.dtype)
    padded[..., padding : padding + h, padding : padding + w] = x
    return padded


def crop_padding(x, padding: int):
    """Undo :func:`pad_spatial` on the last two axes."""
    if padding == 0:
        return x
    return x[..., padding:-padding, padding:-padding]


def _overlap(length: int, kernel_offset: int, stride: int, padding: int, count: int):
    """Where kernel offset ``kernel_offset`` lands inside the unpadded input along one axis.

    Output ``o`` reads input ``o * stride + kernel_offset - padding``; returns the slice of outputs
    for which that is inside ``[0, length)`` and the slice of inputs they read, or None when every
    read falls in the padding. What lies outside is zero padding, which im2col leaves zero and
    col2im drops, so neither ever builds a padded copy of the input.
    """
    first = max(0, -(-(padding - kernel_offset) // stride))  # ceiling division
    stop = min(count, (length - 1 + padding - kernel_offset) // stride + 1)
    if stop <= first:
        return None
    start = first * stride + kernel_offset - padding
    return slice(first, stop), slice(start, start + (stop - first - 1) * stride + 1, stride)


@functools.lru_cache(maxsize=256)
def _kernel_offsets(input_hw: tuple, kernel_hw: tuple, stride: int, padding: int, output_hw: tuple) -> tuple:
    """``(i, j, output_slices, input_slices)`` for every kernel offset that reads some real input.

    Cached: a layer asks for the same geometry at every step.
    """
    offsets = []
    for i in range(kernel_hw[0]):
        rows = _overlap(input_hw[0], i, stride, padding, output_hw[0])
        for j in range(kernel_hw[1]):
            cols = _overlap(input_hw[1], j, stride, padding, output_hw[1])
            if rows is not None and cols is not None:
                offsets.append((i, j, (rows[0], cols[0]), (rows[1], cols[1])))
    return tuple(offsets)


def _scratch(be: Backend, workspace: dict | None, name: str, shape: tuple, dtype, zeros: bool = False):
    """A scratch array kept in the caller's ``workspace`` and reused while shape, dtype and device hold.

    Reuse matters on the CPU: a fresh multi-megabyte array per call comes from a fresh ``mmap`` whose
    pages the operating system faults in and zeroes again every step (thousands of page faults per
    training step of the plain model). Without a workspace the array is simply allocated.
    """
    xp = be.xp
    allocate = xp.zeros if zeros else xp.empty
    if workspace is None:
        return allocate(shape, dtype=dtype)
    buffer = workspace.get(name)
    if buffer is None or buffer.shape != shape or buffer.dtype != dtype or not isinstance(buffer, xp.ndarray):
        buffer = workspace[name] = allocate(shape, dtype=dtype)
    return buffer


# --------------------------------------------------------------------------------------------------
# im2col / col2im
# --------------------------------------------------------------------------------------------------


def _parallel_axis(channels: int) -> int:
    """The axis of a batch-innermost ``(C, ...)`` array to cut into chunks: C, or N when C is too short."""
    return 0 if channels >= 4 else -1


def multiply(be: Backend, a, b):
    """``a * b`` for arrays of one shape, in ``a``'s memory layout."""
    out = be.xp.empty_like(a)
    be.map_chunks(lambda a_part, b_part, out_part: be.xp.multiply(a_part, b_part, out=out_part), a, b, out, axis=outer_axis(a))
    return out


def outer_axis(x) -> int:
    """The axis along which ``x`` has its largest stride: cutting it gives chunks of long runs."""
    strides = [abs(stride) if size > 1 else 0 for stride, size in zip(x.strides, x.shape)]
    return strides.index(max(strides))


def relu_forward(be: Backend, x, with_mask: bool = True):
    """``(max(x, 0), x > 0)``, both in ``x``'s memory layout, the mask as 1s and 0s of ``x``'s
    dtype (the backward product by a float mask runs at twice the speed of one by booleans).
    ``with_mask=False`` skips the mask (None in its place): :func:`relu_mask` of the output gives
    it later, should a gradient be wanted after all."""
    y = be.xp.empty_like(x)
    positive = be.xp.empty_like(x) if with_mask else None
    be.map_chunks(lambda x_part, y_part, *mask: _relu_into(be, x_part, y_part, *mask), x, y, *_optional(positive), axis=outer_axis(x))
    return y, positive


def _relu_into(be: Backend, x, y, positive=None) -> None:
    """``y = max(x, 0)``, and ``positive = (x > 0)`` as 1s and 0s when given; ``y`` may be ``x``."""
    be.rectify(x, y)
    if positive is not None:
        # y > 0 exactly where x > 0; compared with a zero of y's type (the int 0 takes a casting loop)
        be.xp.greater(y, y.dtype.type(0), out=positive)


def relu_mask(be: Backend, y):
    """The mask :func:`relu_forward` returns, from its output ``y`` (``y > 0`` where ``x > 0``)."""
    return (y > 0).astype(y.dtype)


def as_batch_innermost(be: Backend, x):
    """``x (N, C, H, W)`` as a contiguous ``(C, H, W, N)`` array: free when ``x`` is a view of one."""
    return be.xp.ascontiguousarray(x.transpose(1, 2, 3, 0))


def nchw_view(x_chwn):
    """The ``(N, C, H, W)`` view of a batch-innermost ``(C, H, W, N)`` array."""
    return x_chwn.transpose(3, 0, 1, 2)


def im2col(be: Backend, x, kernel_h: int, kernel_w: int, stride: int, padding: int):
    """Unfold ``x (N, C, H, W)`` into ``cols (C, KH, KW, OH, OW, N)``.

    ``cols[c, i, j, oy, ox, n] == x_padded[n, c, oy * stride + i, ox * stride + j]``. ``cols`` is
    contiguous, so ``cols.reshape(C * KH * KW, OH * OW * N)`` is free and one matrix product with the
    ``(F, C * KH * KW)`` weights convolves the whole batch.
    """
    n, channels, h, w = x.shape
    out_h, out_w = output_size(h, kernel_h, stride, padding), output_size(w, kernel_w, stride, padding)
    cols = be.xp.zeros((channels, kernel_h, kernel_w, out_h, out_w, n), dtype=x.dtype)
    _unfold_into(be, x, cols, stride, padding)
    return cols


def _unfold_into(be: Backend, x, cols, stride: int, padding: int):
    """Fill ``cols (C, KH, KW, OH, OW, N)`` from ``x (N, C, H, W)`` as :func:`im2col` does.

    Writes only the entries that read real input: ``cols`` must come zeroed, and a reused buffer of
    the same shape stays zero wherever it reads padding.
    """
    channels, kernel_h, kernel_w, out_h, out_w, n = cols.shape
    x_chwn = as_batch_innermost(be, x)  # free after a gemm convolution; else one copy, not one per offset
    offsets = _kernel_offsets(tuple(x.shape[2:]), (kernel_h, kernel_w), stride, padding, (out_h, out_w))

    def unfold(start: int, stop: int):
        # Shared out by kernel offset: each writes its own rows of cols, each copy a few long runs
        # whatever the channel count (cutting the batch axis instead would cut every run short).
        for i, j, (out_rows, out_cols), (in_rows, in_cols) in offsets[start:stop]:
            cols[:, i, j, out_rows, out_cols] = x_chwn[:, in_rows, in_cols]

    be.map_range(unfold, len(offsets), cols.size)


def _covers(part: slice, length: int) -> bool:
    """Whether the slice ``part`` of :func:`_overlap` takes every one of ``length`` positions."""
    return part.start == 0 and part.step == 1 and part.stop >= length


def col2im(be: Backend, cols, input_shape, stride: int, padding: int):
    """Fold ``cols (C, KH, KW, OH, OW, N)`` back to an ``(N, C, H, W)`` array, summing overlaps.

    The adjoint of :func:`im2col`: used for the input gradient of a convolution. The result is a
    view of a batch-innermost buffer, the layout the convolutions produce.
    """
    channels, kernel_h, kernel_w, out_h, out_w, n = cols.shape
    h, w = input_shape[2:]
    offsets = _kernel_offsets((h, w), (kernel_h, kernel_w), stride, padding, (out_h, out_w))
    # An offset that reads every input pixel (the centre of a "same" convolution) is copied first,
    # in place of zeroing the result and adding it: one pass less over the input gradient.
    first = next((offset for offset in offsets if _covers(offset[3][0], h) and _covers(offset[3][1], w)), None)
    others = [offset for offset in offsets if offset is not first]
    x_chwn = (be.xp.zeros if first is None else be.xp.empty)((channels, h, w, n), dtype=cols.dtype)

    def fold(cols_part, x_part):
        # A copy, then slice-adds in a fixed order: deterministic on every device (no atomics).
        if first is not None:
            i, j, (out_rows, out_cols), _ = first
            x_part[...] = cols_part[:, i, j, out_rows, out_cols]
        for i, j, (out_rows, out_cols), (in_rows, in_cols) in others:
            target = x_part[:, in_rows, in_cols]
            target += cols_part[:, i, j, out_rows, out_cols]  # in place through the view, no write-back

    be.map_chunks(fold, cols, x_chwn, axis=_parallel_axis(channels))
    return nchw_view(x_chwn)


# --------------------------------------------------------------------------------------------------
# Convolution (cross-correlation, as in deep-learning frameworks)
# --------------------------------------------------------------------------------------------------


def conv2d_forward(
    be: Backend, x, weight, bias, stride: int = 1, padding: int = 0, algorithm: str = "gemm", workspace: dict | None = None
):
    """``y[n, f] = sum_c x[n, c] (*) weight[f, c] + bias[f]``; returns ``(y, cache)`` for backward.

    ``bias`` may be None (no bias term; the backward pass then returns ``dbias=None``).

    ``workspace``: an optional dict owned by the caller (one per layer) in which the gemm path keeps
    its im2col buffers from call to call. The cache then refers into it, so it stays valid only until
    the next call with the same workspace, which is how a layer uses it.
    """
    if algorithm == "gemm":
        return _conv2d_forward_gemm(be, x, weight, bias, stride, padding, workspace)
    if algorithm == "signal":
        return _conv2d_forward_signal(be, x, weight, bias, stride, padding)
    raise ValueError(f"unknown convolution algorithm {algorithm!r}; choose one of {', '.join(CONV_ALGORITHMS)}")


def conv2d_backward(be: Backend, dy, cache, need_input_grad: bool = True, grad_out=(None, None)):
    """Gradients ``(dx, dweight, dbias)`` of :func:`conv2d_forward`; ``dx`` is None when not needed,
    ``dbias`` when the forward pass had no bias.

    ``grad_out``: optional ``(dweight, dbias)`` arrays to write the parameter gradients into (views
    of a flat gradient buffer); the gemm path fills them and returns them, saving a copy each.
    """
    algorithm = cache[0]
    if algorithm == "gemm":
        return _conv2d_backward_gemm(be, dy, cache, need_input_grad, grad_out)
    if algorithm == "banded":
        return _conv2d_backward_banded(be, dy, cache, need_input_grad, grad_out)
    return _conv2d_backward_signal(be, dy, cache, need_input_grad)


def _product_operands(be: Backend, workspace, name: str, weight, bias, pixels: int, dtype):
    """The im2col matrix ``(C*KH*KW [+ 1], pixels)``, still to be filled, and the weights
    ``(F, C*KH*KW [+ 1])`` that multiply it.

    With a bias, the matrix's extra last row of ones carries it, so the product adds it and the
    backward product sums dy into dbias, saving a pass over y and one over dy. The matrix is created
    zeroed and kept in ``workspace``: the entries that read padding are never written and stay zero
    on reuse.
    """
    n_filters = weight.shape[0]
    patch_size = weight[0].size
    cols_2d = _column_matrix(be, workspace, name, patch_size, bias is not None, pixels, dtype)
    if bias is None:
        return cols_2d, weight.reshape(n_filters, patch_size)
    return cols_2d, be.xp.concatenate([weight.reshape(n_filters, patch_size), bias.reshape(n_filters, 1)], axis=1)


def _column_matrix(be: Backend, workspace, name: str, patch_size: int, has_bias: bool, pixels: int, dtype):
    """The ``(patch_size [+ 1], pixels)`` column matrix of :func:`_product_operands`, kept in
    ``workspace`` under ``name``: zeroed when created, its last row ones with a bias."""
    cols_2d = _scratch(be, workspace, name, (patch_size + int(has_bias), pixels), dtype, zeros=True)
    if has_bias:
        cols_2d[-1] = 1
    return cols_2d


def _conv2d_forward_gemm(be, x, weight, bias, stride, padding, workspace):
    n_filters, channels, kernel_h, kernel_w = weight.shape
    n, _, h, w = x.shape
    out_h, out_w = output_size(h, kernel_h, stride, padding), output_size(w, kernel_w, stride, padding)
    patch_size = channels * kernel_h * kernel_w
    cols_2d, weight_and_bias = _product_operands(be, workspace, "cols", weight, bias, out_h * out_w * n, x.dtype)
    _unfold_into(be, x, cols_2d[:patch_size].reshape(channels, kernel_h, kernel_w, out_h, out_w, n), stride, padding)
    # (F, C*KH*KW + 1) @ (C*KH*KW + 1, OH*OW*N): one contiguous 2-D product, which BLAS runs at full speed.
    y = be.matmul(weight_and_bias, cols_2d)
    return nchw_view(y.reshape(n_filters, out_h, out_w, n)), ("gemm", x.shape, weight, cols_2d, stride, padding, workspace)


def _conv2d_backward_gemm(be, dy, cache, need_input_grad, grad_out=(None, None)):
    _, x_shape, weight, cols_2d, stride, padding, workspace = cache
    n_filters, channels, kernel_h, kernel_w = weight.shape
    n, _, out_h, out_w = dy.shape
    # dy as (F, OH*OW*N): free when dy is batch-innermost, as the layers between convolutions keep it.
    dy_2d = as_batch_innermost(be, dy).reshape(n_filters, out_h * out_w * n)
    if not need_input_grad:
        return (None, *_weight_and_bias_grads(be, dy_2d, cols_2d, weight, grad_out))
    # Kept in the workspace like the im2col matrix: at batch 256 it is over glibc's 32 MiB mmap
    # threshold, and a fresh mapping per step cost 380 page faults (docs/performance.md).
    dcols = _scratch(be, workspace, "input_grad_cols", (channels * kernel_h * kernel_w, dy_2d.shape[1]), dy_2d.dtype)
    input_grad_product = (weight.reshape(n_filters, -1).T, dy_2d, dcols)
    dweight, dbias = _weight_and_bias_grads(be, dy_2d, cols_2d, weight, grad_out, alongside=input_grad_product)
    dx = col2im(be, dcols.reshape(channels, kernel_h, kernel_w, out_h, out_w, n), x_shape, stride, padding)
    return dx, dweight, dbias


# --------------------------------------------------------------------------------------------------
# Banded convolution: inference of thin layers without im2col (CPU)
# --------------------------------------------------------------------------------------------------
#
# im2col copies every input value KH * KW times before one product multiplies the copies. For a
# layer with few filters the copies are most of the work: the seed model's 1-filter 6x6 layer spent
# 1.4 of 2.4 ms per batch of 256 in im2col. The banded form copies nothing. Kernel column ``j``
# and all kernel rows become one banded matrix over the input's rows, ``band[j, f, oy, c, r] =
# weight[f, c, r - oy * stride + padding, j]`` (zero off the band), so ONE product with the
# batch-innermost input as a ``(C * H, W * N)`` matrix gives every kernel column's partial sums
# ``Z[j, f, oy, w, n]``; ``KW`` shifted slice-adds then sum them along the columns. The product does
# ``H / KH`` times the necessary arithmetic (the zeros of the band), so it pays only where im2col's
# copies cost more than that: see :func:`banded_convolution_pays`.

#: floating-point operations a 2-core machine does in the time it copies one value (measured: im2col
#: copies about 0.3 ns a value, products run near 100 GFLOP/s)
FLOPS_PER_COPIED_VALUE = 30


def banded_convolution_pays(weight_shape: tuple, input_h: int) -> bool:
    """Whether :func:`conv2d_forward_banded` does less work than im2col + one product.

    Per output pixel, in floating-point operations: im2col copies ``C * KH * KW`` values and
    multiplies them by ``F`` filters; the banded form multiplies ``KW * F * C * H`` band entries
    and writes and reads back ``KW * F`` partial sums. True for the seed model's 1-filter 6x6 layer
    (about 700 against 1,150), false for every layer of the plain model (3x3 kernels, 32-64
    filters: four to thirteen times more).
    """
    n_filters, channels, kernel_h, kernel_w = weight_shape
    im2col_cost = channels * kernel_h * kernel_w * (FLOPS_PER_COPIED_VALUE + 2 * n_filters)
    banded_cost = kernel_w * n_filters * (2 * channels * input_h + 2 * FLOPS_PER_COPIED_VALUE)
    return banded_cost < im2col_cost


def _band(be: Backend, weight, input_h: int, out_h: int, stride: int, padding: int):
    """``band (KW, F, OH, C, H)``: ``band[j, f, oy, c, r] = weight[f, c, r - oy * stride + padding, j]``
    where that kernel row exists, else zero. Rows that fall in the padding are left out (zero input)."""
    xp = be.xp
    n_filters, channels, kernel_h, kernel_w = weight.shape
    out_rows, kernel_rows = (grid.ravel() for grid in xp.meshgrid(xp.arange(out_h), xp.arange(kernel_h), indexing="ij"))
    input_rows = out_rows * stride + kernel_rows - padding
    inside = (input_rows >= 0) & (input_rows < input_h)
    band = xp.zeros((kernel_w, n_filters, out_h, channels, input_h), dtype=weight.dtype)
    # Advanced indices on axes 2 and 4 put their (band entry) axis first: (entries, KW, F, C).
    band[:, :, out_rows[inside], :, input_rows[inside]] = weight[:, :, kernel_rows[inside], :].transpose(2, 3, 0, 1)
    return band


def conv2d_forward_banded(be: Backend, x, weight, bias, stride: int = 1, padding: int = 0, workspace: dict | None = None):
    """:func:`conv2d_forward`'s result for a thin layer, computed without im2col (see above).

    Returns ``(y, cache)``; ``y`` is batch-innermost like the gemm path's. The cache keeps the
    input, and :func:`conv2d_backward` on it computes the gemm path's gradients (im2col then), so a
    gradient taken through an evaluation-mode pass stays right.
    """
    n_filters, channels, kernel_h, kernel_w = weight.shape
    n, _, h, w = x.shape
    out_h, out_w = output_size(h, kernel_h, stride, padding), output_size(w, kernel_w, stride, padding)
    x_2d = as_batch_innermost(be, x).reshape(channels * h, w * n)
    partial = _scratch(be, workspace, "banded", (kernel_w * n_filters * out_h, w * n), x.dtype)
    be.matmul(_band(be, weight, h, out_h, stride, padding).reshape(-1, channels * h), x_2d, out=partial)
    partial = partial.reshape(kernel_w, n_filters, out_h, w, n)
    y = be.xp.empty((n_filters, out_h, out_w, n), dtype=x.dtype)
    if bias is None:
        y[...] = 0
    else:
        y[...] = bias.reshape(n_filters, 1, 1, 1)
    for j in range(kernel_w):
        columns = _overlap(w, j, stride, padding, out_w)
        if columns is not None:
            out_columns, in_columns = columns
            y[:, :, out_columns] += partial[j, :, :, in_columns]
    return nchw_view(y), ("banded", x, weight, bias, stride, padding)


def _conv2d_backward_banded(be, dy, cache, need_input_grad, grad_out=(None, None)):
    _, x, weight, bias, stride, padding = cache
    _, gemm_cache = _conv2d_forward_gemm(be, x, weight, bias, stride, padding, None)
    return _conv2d_backward_gemm(be, dy, gemm_cache, need_input_grad, grad_out)


# --------------------------------------------------------------------------------------------------
# Convolution followed by 2x2 max-pooling, as one operation (CPU)
# --------------------------------------------------------------------------------------------------
#
# A 2x2 pooling pass over a batch-innermost activation reads each window's four values as four
# strided quadrant views made of runs of N consecutive values; NumPy's per-run cost then dominates
# (the plain model's first pooling took 2.8 ms of an 18 ms training step at batch 64). When the
# convolution's product has one row per filter and quadrant ``(a, b)`` and one column per pooled
# pixel, it hands over each quadrant as one contiguous block, and every pooling pass is a few long
# runs. Its columns are the ``(KH + 1) x (KW + 1)`` input patch each pooled pixel's window reads,
# its rows each filter shifted to the quadrant's place in that patch. The price is im2col's copies,
# which then read the input with stride 2 (runs of N), and the multiplications by the rows' zeros,
# so it pays where the convolution has few input channels and passes no gradient back (a network's
# first layer): see :func:`conv_maxpool_pays`.


def conv_maxpool_pays(in_channels: int, kernel_h: int, kernel_w: int, out_channels: int) -> bool:
    """Whether a convolution and a 2x2 max-pool run faster as :func:`conv2d_maxpool2x2_forward`.

    Counting NumPy's strided runs: quadrant-ordered im2col adds about ``4 * C * KH * KW`` runs per
    pooled pixel; pooling saves ``3 * F`` (inference) to ``10 * F`` (training) of them. (The patch
    matrix copies fewer runs than that; the rule keeps the layers whose product is memory-bound,
    where the patch form's extra multiplications by zero cost nothing.)
    """
    return 4 * in_channels * kernel_h * kernel_w <= 3 * out_channels


def _quadrant_weights(be: Backend, weight, bias):
    """The ``(F * 4, C * (KH + 1) * (KW + 1) [+ 1])`` matrix whose row ``(f, a, b)`` holds filter
    ``f`` at offset ``(a, b)`` of a ``(KH + 1) x (KW + 1)`` patch, zero elsewhere (and the bias
    last): times a pooled pixel's patch it gives filter ``f``'s output at quadrant ``(a, b)``."""
    xp = be.xp
    n_filters, channels, kernel_h, kernel_w = weight.shape
    bias_columns = 0 if bias is None else 1
    expanded = xp.zeros((n_filters, 2, 2, channels * (kernel_h + 1) * (kernel_w + 1) + bias_columns), dtype=weight.dtype)
    patches = expanded[..., : expanded.shape[-1] - bias_columns].reshape(n_filters, 2, 2, channels, kernel_h + 1, kernel_w + 1)
    for a in (0, 1):
        for b in (0, 1):
            patches[:, a, b, :, a : a + kernel_h, b : b + kernel_w] = weight
    if bias is not None:
        expanded[..., -1] = bias[:, None, None]
    return expanded.reshape(n_filters * 4, -1)


def conv2d_maxpool2x2_forward(be: Backend, x, weight, bias, padding: int = 0, workspace: dict | None = None, for_backward: bool = True):
    """``maxpool_forward(conv2d_forward(x, ...), 2, 2)`` for a stride-1 convolution whose output
    has even height and width; returns ``(y, cache)`` for :func:`conv2d_maxpool2x2_backward`
    (``cache`` None with ``for_backward=False``). Same values, ties and gradients as the two
    operations one after the other; the input gradient is not available.

    The four outputs a window pools all read one ``(KH + 1) x (KW + 1)`` patch of the input, so
    the im2col matrix holds one patch per pooled pixel (16 copied offsets for a 3x3 kernel, not
    4 x 9) and the weights one shifted copy per quadrant (:func:`_quadrant_weights`). The product
    then multiplies some zeros, which costs nothing where it is memory-bound, as it is for the
    few-channel layers that take this path (:func:`conv_maxpool_pays`).
    """
    xp = be.xp
    n_filters, channels, kernel_h, kernel_w = weight.shape
    n, _, h, w = x.shape
    out_h, out_w = output_size(h, kernel_h, 1, padding), output_size(w, kernel_w, 1, padding)
    if out_h % 2 or out_w % 2:
        raise ValueError(f"conv2d_maxpool2x2_forward: the convolution's output {out_h}x{out_w} must have even sides")
    pooled_h, pooled_w = out_h // 2, out_w // 2
    pixels = pooled_h * pooled_w * n
    patch_hw = (kernel_h + 1, kernel_w + 1)
    patch_size = channels * patch_hw[0] * patch_hw[1]
    cols_2d = _column_matrix(be, workspace, "patch_cols", patch_size, bias is not None, pixels, x.dtype)
    cols = cols_2d[:patch_size].reshape(channels, *patch_hw, pooled_h, pooled_w, n)
    x_chwn = as_batch_innermost(be, x)
    # Patch offset (u, v) of pooled pixel (Y, X) reads input (2Y + u - padding, 2X + v - padding):
    # the offsets of a stride-2 kernel the size of the patch.
    offsets = _kernel_offsets((h, w), patch_hw, 2, padding, (pooled_h, pooled_w))

    def unfold(start: int, stop: int):
        for u, v, (out_rows, out_cols), (in_rows, in_cols) in offsets[start:stop]:
            cols[:, u, v, out_rows, out_cols] = x_chwn[:, in_rows, in_cols]

    be.map_range(unfold, len(offsets), cols.size)
    # (F * 4, pixels): quadrant q of filter f is the contiguous block conv[f, q].
    conv = be.matmul(_quadrant_weights(be, weight, bias), cols_2d).reshape(n_filters, 4, pixels)
    y = xp.empty((n_filters, pixels), dtype=x.dtype)
    masks = [xp.empty((n_filters, pixels), dtype=bool) for _ in range(3)] if for_backward else []

    def pool(conv_part, y_part, *won):
        _tournament(xp, [conv_part[:, q] for q in range(4)], y_part, won)

    be.map_chunks(pool, conv, y, *masks, axis=0)
    y = nchw_view(y.reshape(n_filters, pooled_h, pooled_w, n))
    if not for_backward:
        return y, None
    return y, ("gemm-maxpool2x2", weight, bias is not None, cols_2d, masks)


def conv2d_maxpool2x2_backward(be: Backend, dy, cache, grad_out=(None, None)):
    """``(dweight, dbias)`` of :func:`conv2d_maxpool2x2_forward` from the pooled gradient ``dy``
    (``dbias`` None without a bias); ``grad_out`` as in :func:`conv2d_backward`."""
    xp = be.xp
    _, weight, has_bias, cols_2d, (top_won, top_left_won, bottom_left_won) = cache
    n_filters, channels, kernel_h, kernel_w = weight.shape
    dy_2d = as_batch_innermost(be, dy).reshape(n_filters, -1)
    d_conv = xp.empty((n_filters, 4, dy_2d.shape[1]), dtype=dy.dtype)

    def unpool(dy_part, top_won_part, top_left_won_part, bottom_left_won_part, d_conv_part):
        quadrants = [d_conv_part[:, q] for q in range(4)]
        _untournament(xp, dy_part, (top_won_part, top_left_won_part, bottom_left_won_part), quadrants)

    be.map_chunks(unpool, dy_2d, top_won, top_left_won, bottom_left_won, d_conv, axis=0)
    # The gradient of the quadrant weights, (F * 4, patch [+ 1]); each filter's is the sum of its
    # four shifted copies.
    d_expanded = _weight_grad_product(be, d_conv.reshape(n_filters * 4, -1), cols_2d).reshape(n_filters, 2, 2, -1)
    d_patches = d_expanded[..., : channels * (kernel_h + 1) * (kernel_w + 1)].reshape(n_filters, 2, 2, channels, kernel_h + 1, kernel_w + 1)
    dweight, dbias = grad_out
    if dweight is None:
        dweight = xp.empty(weight.shape, dtype=weight.dtype)
    dweight[...] = d_patches[:, 0, 0, :, :kernel_h, :kernel_w]
    for a, b in ((0, 1), (1, 0), (1, 1)):
        dweight += d_patches[:, a, b, :, a : a + kernel_h, b : b + kernel_w]
    if not has_bias:
        return dweight, None
    if dbias is None:
        dbias = xp.empty(n_filters, dtype=weight.dtype)
    xp.sum(d_expanded[..., -1].reshape(n_filters, 4), axis=1, out=dbias)
    return dweight, dbias


def _weight_grad_product(be: Backend, dy_2d, cols_2d, alongside=None):
    """``dy_2d @ cols_2d.T``, ``(rows of dy, rows of cols)``; ``alongside``: an ``(a, b, out)``
    product to run at the same time (:meth:`Backend.matmuls`), the input gradient's."""
    xp = be.xp
    # A product whose long pixel axis is the reduction. OpenBLAS shares out the rows of a product
    # between its threads, so the larger of the two small dimensions goes first: (cols @ dy.T).T
    # for the 32->64 layer, 1.4x faster; dy @ cols.T for the 1->32 layer, 2x faster.
    if cols_2d.shape[0] >= dy_2d.shape[0]:
        product = xp.empty((cols_2d.shape[0], dy_2d.shape[0]), dtype=dy_2d.dtype)
        products, result = [(cols_2d, dy_2d.T, product)], product.T
    else:
        result = xp.empty((dy_2d.shape[0], cols_2d.shape[0]), dtype=dy_2d.dtype)
        products = [(dy_2d, cols_2d.T, result)]
    be.matmuls(products + ([] if alongside is None else [alongside]))
    return result


def _weight_and_bias_grads(be: Backend, dy_2d, cols_2d, weight, grad_out, alongside=None):
    """``(dweight, dbias)`` from ``dy (F, pixels)`` and the im2col matrix (with its row of ones
    when there is a bias), written into ``grad_out``'s arrays when given. ``alongside``: an
    ``(a, b, out)`` product to run at the same time (:meth:`Backend.matmuls`), the input gradient's."""
    xp = be.xp
    n_filters = weight.shape[0]
    d_weight_and_bias = _weight_grad_product(be, dy_2d, cols_2d, alongside)
    has_bias = cols_2d.shape[0] > weight[0].size
    weight_rows = d_weight_and_bias[:, :-1] if has_bias else d_weight_and_bias
    dweight, dbias = grad_out
    if dweight is None:
        dweight = xp.ascontiguousarray(weight_rows).reshape(weight.shape)
    else:
        dweight.reshape(n_filters, -1)[...] = weight_rows
    if not has_bias:
        dbias = None
    elif dbias is None:
        dbias = xp.ascontiguousarray(d_weight_and_bias[:, -1])
    else:
        dbias[...] = d_weight_and_bias[:, -1]
    return dweight, dbias


def _flip_spatial(a):
    return a[..., ::-1, ::-1]


def _conv2d_forward_signal(be, x, weight, bias, stride, padding):
    x_padded = pad_spatial(be, x, padding)
    # (N, 1, C, H, W) * (1, F, C, KH, KW) over the spatial axes -> (N, F, C, OH, OW); sum over C.
    # Correlation is convolution with the kernel flipped.
    per_channel = be.signal.fftconvolve(x_padded[:, None], _flip_spatial(weight)[None], mode="valid", axes=(-2, -1))
    y = per_channel.sum(axis=2)
    if stride > 1:
        y = y[:, :, ::stride, ::stride]
    if bias is not None:
        y = y + bias.reshape(1, -1, 1, 1)
    return y.astype(x.dtype, copy=False), ("signal", x_padded, weight, stride, padding, bias is not None)


def _conv2d_backward_signal(be, dy, cache, need_input_grad):
    _, x_padded, weight, stride, padding, has_bias = cache
    kernel_h, kernel_w = weight.shape[2:]
    # A strided forward is the stride-1 result subsampled: spread dy back onto that full grid.
    full_h = x_padded.shape[2] - kernel_h + 1
    full_w = x_padded.shape[3] - kernel_w + 1
    if stride > 1:
        dy_full = be.xp.zeros(dy.shape[:2] + (full_h, full_w), dtype=dy.dtype)
        dy_full[:, :, ::stride, ::stride] = dy
    else:
        dy_full = dy
    # dW[f, c] = sum_n x[n, c] (*) dy[n, f]   (valid correlation)
    dweight = be.signal.fftconvolve(
        x_padded[:, None], _flip_spatial(dy_full)[:, :, None], mode="valid", axes=(-2, -1)
    ).sum(axis=0)
    dbias = dy.sum(axis=(0, 2, 3)) if has_bias else None
    dx = None
    if need_input_grad:
        # dx[n, c] = sum_f dy[n, f] * W[f, c]   (full convolution)
        dx_padded = be.signal.fftconvolve(dy_full[:, :, None], weight[None], mode="full", axes=(-2, -1)).sum(axis=1)
        dx = crop_padding(dx_padded, padding).astype(dy.dtype, copy=False)
    return dx, dweight.astype(dy.dtype, copy=False), dbias


# --------------------------------------------------------------------------------------------------
# Max pooling
# --------------------------------------------------------------------------------------------------


def maxpool_forward(be: Backend, x, pool: int, stride: int, for_backward: bool = True):
    """Max over each ``pool x pool`` window (floor mode); returns ``(y, cache)``.

    ``for_backward=False`` (inference) skips recording the winners and returns ``(y, None)``.

    Ties go to the first maximum in row-major window order (between rows the topmost, within a row
    the leftmost), as in PyTorch. Two ways, both without gathering a window array:

    * 2x2 windows with stride 2 (the common case): a tournament, see :func:`_maxpool_2x2_forward`.
    * Any other window: separable. The max over a window is the max over its rows of each row's
      max, so one sweep along W (``pool`` strided views) gives ``(N, C, H, OW)`` row maxima and one
      sweep along H reduces them to ``(N, C, OH, OW)``. Which row won is worked out by the backward
      pass, so inference does not pay for it.
    """
    # Each tap is then a run of N consecutive values (see the module notes on layout): free when x
    # came from a gemm convolution, one copy otherwise that every pass below repays.
    x = nchw_view(as_batch_innermost(be, x))
    if pool == stride == 2:
        return _maxpool_2x2_forward(be, x, for_backward)
    h, w = x.shape[2:]
    out_h, out_w = (h - pool) // stride + 1, (w - pool) // stride + 1
    row_max = _max_over_taps(be, x, pool, stride, out_w, axis=-1)
    y = _max_over_taps(be, row_max, pool, stride, out_h, axis=-2)
    if pool == 1:
        y = y.copy()  # a 1x1 window leaves y a view of x: never hand out an alias of the input
    if not for_backward:
        return y, None
    # Found now, while x is at hand, so the cache need not keep the (largest) input alive.
    col_winner = _first_tap_holding(be, x, row_max, pool, stride, out_w, axis=-1)
    return y, ("separable", x.shape, col_winner, row_max, y, pool, stride)


def maxpool_backward(be: Backend, dy, cache):
    """Route each output gradient to the input that won its window (the first maximum, as above)."""
    # Element-wise passes over arrays of different memory layouts are several times slower on NumPy:
    # bring dy to the batch-innermost layout of the activations first (no copy when it already is).
    dy = nchw_view(as_batch_innermost(be, dy))
    if cache[0] == "2x2":
        return _maxpool_2x2_backward(be, dy, cache)
    _, x_shape, col_winner, row_max, y, pool, stride = cache
    h, w = x_shape[2:]
    out_h = y.shape[2]
    # Back through the H sweep to the row maxima, then through the W sweep to the inputs.
    row_winner = _first_tap_holding(be, row_max, y, pool, stride, out_h, axis=-2)
    d_row_max = _route_to_winner(be, dy, row_winner, pool, stride, h, axis=-2)
    return _route_to_winner(be, d_row_max, col_winner, pool, stride, w, axis=-1)


def _quadrant(x, row: int, col: int, out_h: int, out_w: int):
    """Element ``(row, col)`` of every 2x2 window of ``x (N, C, H, W)`` (stride 2, floor mode)."""
    return x[:, :, row : 2 * out_h : 2, col : 2 * out_w : 2]


def _maxpool_2x2_forward(be: Backend, x, for_backward: bool = True):
    """2x2 max-pooling with stride 2 as a tournament: each row's two values, then the two row winners.

    Three boolean masks record who won each match, with ties to the top row and the left column,
    which is exactly the row-major first maximum. It costs six passes over quarter-size arrays,
    against about ten for the separable sweeps.
    """
    xp = be.xp
    n, channels = x.shape[:2]
    out_h, out_w = x.shape[2] // 2, x.shape[3] // 2
    # Outputs batch-innermost like x; the work is cut along channels (axis 1 of these NCHW views).
    y = nchw_view(xp.empty((channels, out_h, out_w, n), dtype=x.dtype))
    outputs = [y]
    if for_backward:
        outputs += [nchw_view(xp.empty((channels, out_h, out_w, n), dtype=bool)) for _ in range(3)]

    def pool(x_part, y_part, *won):
        quadrants = [_quadrant(x_part, row, col, out_h, out_w) for row in (0, 1) for col in (0, 1)]
        _tournament(xp, quadrants, y_part, won)

    be.map_chunks(pool, x, *outputs, axis=1)
    if not for_backward:
        return y, None
    return y, ("2x2", x.shape, *outputs[1:])


def _maxpool_2x2_backward(be: Backend, dy, cache):
    """Adjoint of :func:`_maxpool_2x2_forward`: send ``dy`` down the winning side of each match."""
    xp = be.xp
    _, (n, channels, h, w), top_won, top_left_won, bottom_left_won = cache
    out_h, out_w = dy.shape[2:]
    # Every input is written when the windows tile the input; an odd last row or column gets zero.
    allocate = xp.empty if h % 2 == 0 and w % 2 == 0 else xp.zeros
    dx = nchw_view(allocate((channels, h, w, n), dtype=dy.dtype))

    def unpool(dy_part, top_won_part, top_left_won_part, bottom_left_won_part, dx_part):
        quadrants = [_quadrant(dx_part, row, col, out_h, out_w) for row in (0, 1) for col in (0, 1)]
        _untournament(xp, dy_part, (top_won_part, top_left_won_part, bottom_left_won_part), quadrants)

    be.map_chunks(unpool, dy, top_won, top_left_won, bottom_left_won, dx, axis=1)
    return dx


def _tournament(xp, quadrants, y, won) -> None:
    """Max of the four ``quadrants`` (top left, top right, bottom left, bottom right) into ``y``;
    with ``won``, the three match results ``(top won, top left won, bottom left won)`` too."""
    top_left, top_right, bottom_left, bottom_right = quadrants
    top = xp.maximum(top_left, top_right)
    bottom = xp.maximum(bottom_left, bottom_right)
    xp.maximum(top, bottom, out=y)
    if won:
        # "left won" is tested against the fresh row maximum rather than the right value: the
        # same answer, but it reads one quarter of x less, and while that quarter is in cache.
        top_won, top_left_won, bottom_left_won = won
        xp.greater_equal(top, bottom, out=top_won)
        xp.equal(top_left, top, out=top_left_won)
        xp.equal(bottom_left, bottom, out=bottom_left_won)


def _untournament(xp, dy, won, quadrants) -> None:
    """Adjoint of :func:`_tournament`: ``dy`` down the winning side of each match, into ``quadrants``."""
    top_won, top_left_won, bottom_left_won = won
    d_top = dy * top_won
    d_bottom = dy - d_top  # exact for finite gradients: dy or 0, whichever d_top is not
    for (left, right), d_row, left_won in ((quadrants[:2], d_top, top_left_won), (quadrants[2:], d_bottom, bottom_left_won)):
        xp.multiply(d_row, left_won, out=left)
        xp.subtract(d_row, left, out=right)


def _taps(x, tap: int, stride: int, count: int, axis: int):
    """Element ``tap`` of each of ``count`` windows ``stride`` apart along ``axis`` (-1 or -2)."""
    taps = slice(tap, tap + stride * count, stride)
    return x[..., taps] if axis == -1 else x[..., taps, :]


def _max_over_taps(be: Backend, x, pool: int, stride: int, count: int, axis: int):
    """The max over the ``pool`` taps of each of ``count`` windows along ``axis``."""
    best = _taps(x, 0, stride, count, axis)
    for tap in range(1, pool):
        best = be.xp.maximum(best, _taps(x, tap, stride, count, axis))
    return best


def _first_tap_holding(be: Backend, x, best, pool: int, stride: int, count: int, axis: int):
    """For each window along ``axis``, the index of its first tap equal to ``best`` (its max).

    That index is the number of leading taps that miss the max, which sends ties to the first.
    """
    misses = _taps(x, 0, stride, count, axis) != best
    winner = misses.astype("int8" if pool <= 127 else "int32")
    for tap in range(1, pool - 1):
        misses &= _taps(x, tap, stride, count, axis) != best
        winner += misses
    return winner


def _route_to_winner(be: Backend, grad, winner, pool: int, stride: int, length: int, axis: int):
    """Adjoint of :func:`_max_over_taps`: spread ``grad`` back to the winning taps, ``length`` long on ``axis``."""
    xp = be.xp
    n, c = grad.shape[:2]
    count = grad.shape[axis]
    full_shape = (grad.shape[2], length) if axis == -1 else (length, grad.shape[3])
    overlapping = stride < pool
    # Every element is written exactly once when the windows tile the axis; otherwise start from zero.
    tiles = stride == pool and length == pool * count
    allocate = xp.empty if tiles else xp.zeros
    # Batch-innermost, like the convolutions' activations (see the module notes on layout), so the
    # ReLU and convolution backward passes that follow read it without a transposing copy.
    out = nchw_view(allocate((c,) + full_shape + (n,), dtype=grad.dtype))
    for tap in range(pool):
        target = _taps(out, tap, stride, count, axis)
        if overlapping:
            target += grad * (winner == tap)  # windows share inputs: sum in tap order (deterministic)
        else:
            xp.multiply(grad, winner == tap, out=target)
    return out


# --------------------------------------------------------------------------------------------------
# Batch normalisation over rows
# --------------------------------------------------------------------------------------------------
#
# BatchNorm hands these ``(features, samples)`` rows: one per channel of a batch-innermost
# activation (free after a convolution), or a transposed view of a dense layer's output. Rows are
# independent, so each pass is one ``map_chunks`` over them, and every large temporary is written
# into an output array that is overwritten later (the squares into ``y``, the products into
# ``dx``): two fresh arrays per pass instead of five, which also spares the page faults of fresh
# multi-megabyte allocations. The row sums and the sums of products are the backend's
# ``row_sums``/``row_dots``: on the CPU, BLAS products that read each row once at memory speed and
# need no temporary.


def batch_norm_forward(be: Backend, rows, weight, bias, eps: float, positive=None):
    """Normalise each row of ``rows`` by its own mean and biased variance, then scale by ``weight``
    and shift by ``bias`` (one value per row).

    Returns ``(y, normalised, mean, var, inv_std)``: ``y`` and ``normalised`` in ``rows``' memory
    layout, the statistics one value per row (``inv_std = 1 / sqrt(var + eps)``).

    ``positive``: an array of ``rows``' shape and layout to fuse a ReLU after the normalisation:
    ``y`` is then ``max(.., 0)`` and ``positive`` receives the ReLU's mask (see
    :func:`relu_forward`), computed on each chunk while it is in cache.
    """
    xp = be.xp
    y, normalised = xp.empty_like(rows), xp.empty_like(rows)
    mean, var, inv_std = (xp.empty(rows.shape[0], dtype=rows.dtype) for _ in range(3))

    def normalise(rows_part, y_part, normalised_part, mean_part, var_part, inv_std_part, weight_part, bias_part, *mask):
        be.row_sums(rows_part, mean_part, mean=True)
        xp.subtract(rows_part, mean_part[:, None], out=normalised_part)
        be.row_dots(normalised_part, normalised_part, var_part, y_part, mean=True)  # y: scratch until the last two passes
        xp.divide(1.0, xp.sqrt(var_part + eps), out=inv_std_part)
        normalised_part *= inv_std_part[:, None]
        xp.multiply(normalised_part, weight_part[:, None], out=y_part)
        y_part += bias_part[:, None]
        if mask:
            _relu_into(be, y_part, y_part, *mask)

    be.map_chunks(normalise, rows, y, normalised, mean, var, inv_std, weight, bias, *_optional(positive), axis=0)
    return y, normalised, mean, var, inv_std


def _optional(array) -> list:
    return [] if array is None else [array]


def scale_and_shift_rows(be: Backend, rows, scale, shift, relu: bool = False):
    """``rows * scale + shift`` with one value of each per row (BatchNorm in evaluation), in
    ``rows``' memory layout; ``relu`` rectifies it on each chunk while in cache (no mask: see
    :func:`relu_forward`'s ``with_mask``)."""
    xp = be.xp
    y = xp.empty_like(rows)

    def affine(rows_part, y_part, scale_part, shift_part):
        xp.multiply(rows_part, scale_part[:, None], out=y_part)
        y_part += shift_part[:, None]
        if relu:
            be.rectify(y_part, y_part)

    be.map_chunks(affine, rows, y, scale, shift, axis=0)
    return y


def batch_norm_backward(be: Backend, dy_rows, normalised, weight, inv_std, positive=None):
    """Gradients ``(dx, dweight, dbias)`` of :func:`batch_norm_forward` (batch statistics), by rows.

    ``dx = weight * inv_std * (dy - mean(dy) - normalised * mean(dy * normalised))``, the means taken
    along each row; ``dbias`` and ``dweight`` are the row sums of ``dy`` and ``dy * normalised``.
    ``positive``: the mask of a ReLU fused after the normalisation; ``dy`` is the gradient after
    that ReLU, first multiplied by the mask.
    """
    xp = be.xp
    count = dy_rows.shape[1]
    dx = xp.empty_like(dy_rows)
    dweight, dbias = (xp.empty(dy_rows.shape[0], dtype=dy_rows.dtype) for _ in range(2))
    relu = [] if positive is None else [positive, xp.empty_like(dy_rows)]

    def backpropagate(dy_part, normalised_part, dx_part, dweight_part, dbias_part, weight_part, inv_std_part, *relu_part):
        if relu_part:
            positive_part, dy_masked = relu_part
            xp.multiply(dy_part, positive_part, out=dy_masked)
            dy_part = dy_masked
        be.row_sums(dy_part, dbias_part)
        be.row_dots(dy_part, normalised_part, dweight_part, dx_part)  # dx: scratch until the passes below
        xp.multiply(normalised_part, (dweight_part * (-1.0 / count))[:, None], out=dx_part)
        dx_part += dy_part
        dx_part -= (dbias_part * (1.0 / count))[:, None]
        dx_part *= (weight_part * inv_std_part)[:, None]

    be.map_chunks(backpropagate, dy_rows, normalised, dx, dweight, dbias, weight, inv_std, *relu, axis=0)
    return dx, dweight, dbias


# --------------------------------------------------------------------------------------------------
# Softmax cross-entropy, fused
# --------------------------------------------------------------------------------------------------


def log_softmax(be: Backend, logits):
    """Numerically stable ``log(softmax(logits))`` along axis 1 (log-sum-exp with the max shifted out)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - be.xp.log(be.xp.exp(shifted).sum(axis=1, keepdims=True))


def cross_entropy_per_sample(be: Backend, logits, labels):
    """``-log softmax(logits)[n, labels[n]]`` for each sample: the loss alone, without its gradient."""
    return -log_softmax(be, logits)[be.xp.arange(logits.shape[0]), labels]


def softmax_cross_entropy(be: Backend, logits, labels, label_smoothing: float = 0.0):
    """Mean cross-entropy of integer ``labels`` under ``softmax(logits)`` and its gradient.

    Returns ``(loss, dlogits)`` with ``loss`` a 0-d device array (reading it synchronises the
    device, so callers decide when) and ``dlogits = (softmax(logits) - target) / N``.

    ``label_smoothing`` ``e`` (as in PyTorch's ``CrossEntropyLoss``) mixes the one-hot target with
    the uniform distribution over the ``K`` classes: ``target = (1 - e) onehot + e / K``, so the loss
    is ``(1 - e) * CE + e * mean_k(-log p_k)``; 0 gives the plain cross-entropy.
    """
    xp = be.xp
    n, n_classes = logits.shape
    log_probs = log_softmax(be, logits)
    rows = xp.arange(n)
    smoothing = float(label_smoothing)
    picked = log_probs[rows, labels]
    if smoothing:
        loss = -((1.0 - smoothing) * picked + smoothing * log_probs.mean(axis=1)).mean()
    else:
        loss = -picked.mean()
    dlogits = xp.exp(log_probs)
    dlogits[rows, labels] -= 1.0 - smoothing
    if smoothing:
        dlogits -= smoothing / n_classes
    dlogits *= 1.0 / n
    return loss, dlogits
