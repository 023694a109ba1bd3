"""Stateless array kernels, written once against a :class:`~cnn_backend.backend.Backend`.

Every function takes the backend first and calls only ``be.xp`` / ``be.signal``, so it runs on NumPy
and on CuPy alike. Shapes follow NCHW: ``x`` is ``(N, C, H, W)``, a convolution weight is
``(F, C, KH, KW)``. The only Python loops are over kernel offsets (at most ``KH * KW`` iterations),
never over samples, pixels or channels.

Two convolution algorithms compute the same cross-correlation:

* ``"gemm"``: im2col by slicing over kernel offsets, then one batched matrix product; the backward
  pass scatters back with slice-adds (deterministic, unlike atomic scatter-adds on a GPU).
* ``"signal"``: FFT convolution through ``be.signal.fftconvolve`` over the two spatial axes, with the
  batch and filter axes broadcast so one call covers the whole batch. ``correlate``/``convolve`` are
  not used because their ``'valid'`` mode rejects broadcast batch axes, and their default
  ``method='auto'`` is not implemented for N-D input on CuPy.
"""

from __future__ import annotations

from .backend import Backend

CONV_ALGORITHMS = ("gemm", "signal")


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Spatial output length of a convolution or pooling window sweep (floor mode)."""
    return (size + 2 * padding - kernel) // stride + 1


def pad_spatial(be: Backend, x, padding: int):
    """Zero-pad the last two axes of ``x`` by ``padding`` on each side."""
    if padding == 0:
        return x
    pad = ((0, 0),) * (x.ndim - 2) + ((padding, padding), (padding, padding))
    return be.xp.pad(x, pad)


def crop_padding(x, padding: int):
    """Undo :func:`pad_spatial` on the last two axes."""
    if padding == 0:
        return x
    return x[..., padding:-padding, padding:-padding]


# --------------------------------------------------------------------------------------------------
# im2col / col2im
# --------------------------------------------------------------------------------------------------


def im2col(be: Backend, x, kernel_h: int, kernel_w: int, stride: int, padding: int):
    """Unfold ``x (N, C, H, W)`` into ``cols (N, C, KH, KW, OH, OW)``.

    ``cols[n, c, i, j, oy, ox] == x_padded[n, c, oy * stride + i, ox * stride + j]``.
    """
    x = pad_spatial(be, x, padding)
    n, c, h, w = x.shape
    out_h = (h - kernel_h) // stride + 1
    out_w = (w - kernel_w) // stride + 1
    cols = be.xp.empty((n, c, kernel_h, kernel_w, out_h, out_w), dtype=x.dtype)
    for i in range(kernel_h):
        rows = slice(i, i + stride * out_h, stride)
        for j in range(kernel_w):
            cols[:, :, i, j] = x[:, :, rows, j : j + stride * out_w : stride]
    return cols


def col2im(be: Backend, cols, input_shape, stride: int, padding: int):
    """Fold ``cols (N, C, KH, KW, OH, OW)`` back to ``(N, C, H, W)``, summing overlaps.

    The adjoint of :func:`im2col`: used for the input gradient of a convolution.
    """
    n, c, kernel_h, kernel_w, out_h, out_w = cols.shape
    h, w = input_shape[2] + 2 * padding, input_shape[3] + 2 * padding
    x = be.xp.zeros((n, c, h, w), dtype=cols.dtype)
    for i in range(kernel_h):
        rows = slice(i, i + stride * out_h, stride)
        for j in range(kernel_w):
            x[:, :, rows, j : j + stride * out_w : stride] += cols[:, :, i, j]
    return crop_padding(x, padding)


# --------------------------------------------------------------------------------------------------
# Convolution (cross-correlation, as in deep-learning frameworks)
# --------------------------------------------------------------------------------------------------


def conv2d_forward(be: Backend, x, weight, bias, stride: int = 1, padding: int = 0, algorithm: str = "gemm"):
    """``y[n, f] = sum_c x[n, c] (*) weight[f, c] + bias[f]``; returns ``(y, cache)`` for backward."""
    if algorithm == "gemm":
        return _conv2d_forward_gemm(be, x, weight, bias, stride, padding)
    if algorithm == "signal":
        return _conv2d_forward_signal(be, x, weight, bias, stride, padding)
    raise ValueError(f"unknown convolution algorithm {algorithm!r}; choose one of {', '.join(CONV_ALGORITHMS)}")


def conv2d_backward(be: Backend, dy, cache, need_input_grad: bool = True):
    """Gradients ``(dx, dweight, dbias)`` of :func:`conv2d_forward`; ``dx`` is None when not needed."""
    algorithm = cache[0]
    if algorithm == "gemm":
        return _conv2d_backward_gemm(be, dy, cache, need_input_grad)
    return _conv2d_backward_signal(be, dy, cache, need_input_grad)


def _conv2d_forward_gemm(be, x, weight, bias, stride, padding):
    n_filters, channels, kernel_h, kernel_w = weight.shape
    cols = im2col(be, x, kernel_h, kernel_w, stride, padding)
    n, _, _, _, out_h, out_w = cols.shape
    patches = cols.reshape(n, channels * kernel_h * kernel_w, out_h * out_w)
    # One batched GEMM: (F, CKK) @ (N, CKK, OH*OW) -> (N, F, OH*OW), already NCHW.
    y = be.xp.matmul(weight.reshape(n_filters, -1), patches)
    y += bias.reshape(1, n_filters, 1)
    return y.reshape(n, n_filters, out_h, out_w), ("gemm", x.shape, weight, patches, cols.shape, stride, padding)


def _conv2d_backward_gemm(be, dy, cache, need_input_grad):
    xp = be.xp
    _, x_shape, weight, patches, cols_shape, stride, padding = cache
    n, n_filters = dy.shape[:2]
    dy_flat = dy.reshape(n, n_filters, -1)
    # dW = sum_n dy[n] @ patches[n].T, as one batched GEMM plus a reduction over the batch.
    dweight = xp.matmul(dy_flat, patches.transpose(0, 2, 1)).sum(axis=0).reshape(weight.shape)
    dbias = dy_flat.sum(axis=(0, 2))
    dx = None
    if need_input_grad:
        dcols = xp.matmul(weight.reshape(n_filters, -1).T, dy_flat)
        dx = col2im(be, dcols.reshape(cols_shape), x_shape, stride, padding)
    return dx, dweight, dbias


def _flip_spatial(a):
    return a[..., ::-1, ::-1]


def _conv2d_forward_signal(be, x, weight, bias, stride, padding):
    x_padded = pad_spatial(be, x, padding)
    # (N, 1, C, H, W) * (1, F, C, KH, KW) over the spatial axes -> (N, F, C, OH, OW); sum over C.
    # Correlation is convolution with the kernel flipped.
    per_channel = be.signal.fftconvolve(
        x_padded[:, None], _flip_spatial(weight)[None], mode="valid", axes=(-2, -1)
    )
    y = per_channel.sum(axis=2)
    if stride > 1:
        y = y[:, :, ::stride, ::stride]
    y = y + bias.reshape(1, -1, 1, 1)
    return y.astype(x.dtype, copy=False), ("signal", x_padded, weight, stride, padding)


def _conv2d_backward_signal(be, dy, cache, need_input_grad):
    _, x_padded, weight, stride, padding = cache
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
    dbias = dy.sum(axis=(0, 2, 3))
    dx = None
    if need_input_grad:
        # dx[n, c] = sum_f dy[n, f] * W[f, c]   (full convolution)
        dx_padded = be.signal.fftconvolve(dy_full[:, :, None], weight[None], mode="full", axes=(-2, -1)).sum(axis=1)
        dx = crop_padding(dx_padded, padding).astype(dy.dtype, copy=False)
    return dx, dweight.astype(dy.dtype, copy=False), dbias


# --------------------------------------------------------------------------------------------------
# Max pooling
# --------------------------------------------------------------------------------------------------


def _pool_windows(be, x, pool: int, stride: int):
    """Stack every pooling window of ``x`` on a last axis: ``(N, C, OH, OW, pool * pool)``."""
    n, c, h, w = x.shape
    out_h, out_w = (h - pool) // stride + 1, (w - pool) // stride + 1
    if stride == pool:
        # Non-overlapping windows are a reshape of the (cropped) input: no gather needed.
        tiles = x[:, :, : out_h * pool, : out_w * pool].reshape(n, c, out_h, pool, out_w, pool)
        return tiles.transpose(0, 1, 2, 4, 3, 5).reshape(n, c, out_h, out_w, pool * pool)
    offsets = [
        x[:, :, i : i + stride * out_h : stride, j : j + stride * out_w : stride]
        for i in range(pool)
        for j in range(pool)
    ]
    return be.xp.stack(offsets, axis=-1)


def maxpool_forward(be: Backend, x, pool: int, stride: int):
    """Max over each ``pool x pool`` window; returns ``(y, cache)``. Ties go to the first maximum."""
    windows = _pool_windows(be, x, pool, stride)
    winner = windows.argmax(axis=-1)
    y = be.xp.take_along_axis(windows, winner[..., None], axis=-1)[..., 0]
    return y, (x.shape, winner, pool, stride)


def maxpool_backward(be: Backend, dy, cache):
    """Route each output gradient to the input that won its window."""
    xp = be.xp
    x_shape, winner, pool, stride = cache
    n, c, h, w = x_shape
    out_h, out_w = winner.shape[2:]
    is_winner = winner[..., None] == xp.arange(pool * pool)
    dwindows = is_winner * dy[..., None]
    dx = xp.zeros(x_shape, dtype=dy.dtype)
    if stride == pool:
        tiles = dwindows.reshape(n, c, out_h, out_w, pool, pool).transpose(0, 1, 2, 4, 3, 5)
        dx[:, :, : out_h * pool, : out_w * pool] = tiles.reshape(n, c, out_h * pool, out_w * pool)
        return dx
    for i in range(pool):
        for j in range(pool):
            dx[:, :, i : i + stride * out_h : stride, j : j + stride * out_w : stride] += dwindows[..., i * pool + j]
    return dx


# --------------------------------------------------------------------------------------------------
# Softmax cross-entropy, fused
# --------------------------------------------------------------------------------------------------


def log_softmax(be: Backend, logits):
    """Numerically stable ``log(softmax(logits))`` along axis 1 (log-sum-exp with the max shifted out)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - be.xp.log(be.xp.exp(shifted).sum(axis=1, keepdims=True))


def softmax_cross_entropy(be: Backend, logits, labels):
    """Mean cross-entropy of integer ``labels`` under ``softmax(logits)`` and its gradient.

    Returns ``(loss, dlogits)`` with ``loss`` a 0-d device array (reading it synchronises the
    device, so callers decide when) and ``dlogits = (softmax(logits) - onehot(labels)) / N``.
    """
    xp = be.xp
    n = logits.shape[0]
    log_probs = log_softmax(be, logits)
    rows = xp.arange(n)
    loss = -log_probs[rows, labels].mean()
    dlogits = xp.exp(log_probs)
    dlogits[rows, labels] -= 1
    dlogits *= 1.0 / n
    return loss, dlogits
