"""Kernels of cnn_backend.functional: both convolution algorithms against a naive loop reference and
each other (forward and backward), gradient checks by central differences, max-pooling (ties,
overlapping and floor-mode windows), im2col/col2im, the global algorithm choice, and dtypes kept end
to end through both models.

Every test body runs on the CPU, on the CPU stand-in for the device boundary (which refuses host
arrays as CuPy does), and on CUDA when a GPU is usable.
"""

from __future__ import annotations

import numpy
import pytest

from cnn_backend import functional as F
from cnn_backend import gradcheck
from cnn_backend.backend import get_backend
from cnn_backend.layers import Convolution, SoftmaxCrossEntropy, resolve_conv_algorithm
from cnn_backend.model import plain_cnn, seed_cnn
from cnn_backend.testing import standin_backend

ALGORITHMS = F.CONV_ALGORITHMS
#: (rtol, atol) against float64 references
TOLERANCE = {"float64": (1e-10, 1e-10), "float32": (1e-4, 1e-4)}


@pytest.fixture(params=["cpu", "standin", pytest.param("cuda", marks=pytest.mark.gpu)])
def make_backend(request):
    """``dtype -> Backend`` for each device under test."""

    def make(dtype="float64"):
        return standin_backend(dtype) if request.param == "standin" else get_backend(request.param, dtype)

    return make


def to_host(be, array) -> numpy.ndarray:
    return be.to_numpy(array)


def assert_close(actual, expected, dtype) -> None:
    rtol, atol = TOLERANCE[numpy.dtype(dtype).name]
    numpy.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------------
# Naive references: explicit loops over every index, written for clarity only
# --------------------------------------------------------------------------------------------------


def naive_conv2d(x, weight, bias, stride, padding):
    x = numpy.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    n, _, h, w = x.shape
    n_filters, _, kernel_h, kernel_w = weight.shape
    out_h, out_w = (h - kernel_h) // stride + 1, (w - kernel_w) // stride + 1
    y = numpy.zeros((n, n_filters, out_h, out_w))
    for sample in range(n):
        for f in range(n_filters):
            for oy in range(out_h):
                for ox in range(out_w):
                    patch = x[sample, :, oy * stride : oy * stride + kernel_h, ox * stride : ox * stride + kernel_w]
                    y[sample, f, oy, ox] = (patch * weight[f]).sum() + bias[f]
    return y


def naive_conv2d_backward(x, weight, dy, stride, padding):
    x_padded = numpy.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    dx_padded = numpy.zeros_like(x_padded)
    dweight = numpy.zeros_like(weight)
    n, n_filters, out_h, out_w = dy.shape
    kernel_h, kernel_w = weight.shape[2:]
    for sample in range(n):
        for f in range(n_filters):
            for oy in range(out_h):
                for ox in range(out_w):
                    rows = slice(oy * stride, oy * stride + kernel_h)
                    cols = slice(ox * stride, ox * stride + kernel_w)
                    dx_padded[sample, :, rows, cols] += dy[sample, f, oy, ox] * weight[f]
                    dweight[f] += dy[sample, f, oy, ox] * x_padded[sample, :, rows, cols]
    h, w = x.shape[2:]
    dx = dx_padded[:, :, padding : padding + h, padding : padding + w]
    return dx, dweight, dy.sum(axis=(0, 2, 3))


def naive_maxpool(x, pool, stride):
    """Max and its gradient routing, the winner being the first maximum in row-major window order."""
    n, c, h, w = x.shape
    out_h, out_w = (h - pool) // stride + 1, (w - pool) // stride + 1
    y = numpy.zeros((n, c, out_h, out_w))
    winners = {}
    for sample in range(n):
        for channel in range(c):
            for oy in range(out_h):
                for ox in range(out_w):
                    window = x[sample, channel, oy * stride : oy * stride + pool, ox * stride : ox * stride + pool]
                    first = int(numpy.argmax(window))  # argmax returns the first maximum
                    y[sample, channel, oy, ox] = window.flat[first]
                    winners[sample, channel, oy, ox] = (oy * stride + first // pool, ox * stride + first % pool)
    return y, winners


def naive_maxpool_backward(x_shape, winners, dy):
    dx = numpy.zeros(x_shape)
    for (sample, channel, oy, ox), (row, col) in winners.items():
        dx[sample, channel, row, col] += dy[sample, channel, oy, ox]
    return dx


# --------------------------------------------------------------------------------------------------
# Convolution against the reference, and the algorithms against each other
# --------------------------------------------------------------------------------------------------

# (N, C, H, W, F, K): one channel and one filter; several of each; non-square input; kernel 1
CONV_SHAPES = [(2, 1, 7, 7, 1, 3), (2, 3, 8, 9, 4, 3), (3, 2, 9, 7, 3, 2), (1, 2, 6, 6, 3, 1)]


def conv_case(shape, seed=0):
    """Float64 host input, weight and bias of a convolution of ``shape`` (N, C, H, W, F, K)."""
    n, c, h, w, f, k = shape
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w))
    weight = rng.standard_normal((f, c, k, k))
    bias = rng.standard_normal(f)
    return x, weight, bias


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_conv_matches_naive_reference(make_backend, algorithm, shape, stride, padding, dtype):
    be = make_backend(dtype)
    x, weight, bias = conv_case(shape)
    y_expected = naive_conv2d(x, weight, bias, stride, padding)
    dy = numpy.random.default_rng(1).standard_normal(y_expected.shape)
    dx_expected, dweight_expected, dbias_expected = naive_conv2d_backward(x, weight, dy, stride, padding)

    def device(array):
        return be.to_device(array.astype(dtype))

    y, cache = F.conv2d_forward(be, device(x), device(weight), device(bias), stride, padding, algorithm)
    dx, dweight, dbias = F.conv2d_backward(be, device(dy), cache, need_input_grad=True)

    for actual, expected in ((y, y_expected), (dx, dx_expected), (dweight, dweight_expected), (dbias, dbias_expected)):
        assert actual.dtype == numpy.dtype(dtype)
        assert tuple(actual.shape) == expected.shape
        assert_close(to_host(be, actual), expected, dtype)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_conv_backward_without_input_grad(make_backend, algorithm):
    be = make_backend("float64")
    x, weight, bias = (be.to_device(a) for a in conv_case((2, 3, 8, 8, 4, 3)))
    y, cache = F.conv2d_forward(be, x, weight, bias, 1, 1, algorithm)
    dx, dweight, dbias = F.conv2d_backward(be, be.xp.ones_like(y), cache, need_input_grad=False)
    assert dx is None
    assert tuple(dweight.shape) == tuple(weight.shape) and tuple(dbias.shape) == tuple(bias.shape)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("stride, padding", [(1, 0), (1, 1), (2, 1), (3, 2)])
def test_algorithms_agree(make_backend, stride, padding, dtype):
    be = make_backend(dtype)
    x, weight, bias = (be.to_device(a.astype(dtype)) for a in conv_case((4, 3, 12, 11, 5, 3), seed=3))
    outputs = {}
    for algorithm in ALGORITHMS:
        y, cache = F.conv2d_forward(be, x, weight, bias, stride, padding, algorithm)
        dy = be.to_device(numpy.linspace(-1, 1, y.size).reshape(y.shape).astype(dtype))
        outputs[algorithm] = [to_host(be, a) for a in (y, *F.conv2d_backward(be, dy, cache, True))]
    for gemm, signal in zip(outputs["gemm"], outputs["signal"]):
        assert_close(gemm, signal, dtype)


def test_conv_accepts_any_memory_layout(make_backend):
    """NCHW shapes are what counts: any memory order of the input gives the same result."""
    be = make_backend("float64")
    x_host, weight, bias = conv_case((2, 3, 7, 8, 4, 3))
    weight, bias = be.to_device(weight), be.to_device(bias)
    layouts = {
        "nchw": be.to_device(x_host),
        "channel-major": be.to_device(x_host.transpose(1, 0, 2, 3).copy()).transpose(1, 0, 2, 3),
        "batch-innermost": be.to_device(x_host.transpose(1, 2, 3, 0).copy()).transpose(3, 0, 1, 2),
        "channels-last": be.to_device(x_host.transpose(0, 2, 3, 1).copy()).transpose(0, 3, 1, 2),
    }
    expected = naive_conv2d(x_host, be.to_numpy(weight), be.to_numpy(bias), 1, 1)
    for x in layouts.values():
        for algorithm in ALGORITHMS:
            y, _ = F.conv2d_forward(be, x, weight, bias, 1, 1, algorithm)
            assert_close(to_host(be, y), expected, "float64")


def test_workspace_reuse_gives_fresh_results(make_backend):
    """A workspace reused across calls (as a layer does) changes nothing: zero borders stay zero."""
    be = make_backend("float64")
    weight, bias = (be.to_device(a) for a in conv_case((2, 3, 7, 7, 4, 3))[1:])
    workspace: dict = {}
    for seed in (1, 2, 3):
        x_host = numpy.random.default_rng(seed).standard_normal((2, 3, 7, 7)) + 10.0  # no zeros near the border
        x = be.to_device(x_host)
        y, cache = F.conv2d_forward(be, x, weight, bias, 1, 2, "gemm", workspace)
        dy = be.xp.ones_like(y)
        grads = F.conv2d_backward(be, dy, cache, True)
        y_fresh, cache_fresh = F.conv2d_forward(be, x, weight, bias, 1, 2, "gemm")
        for reused, fresh in zip((y, *grads), (y_fresh, *F.conv2d_backward(be, dy, cache_fresh, True))):
            numpy.testing.assert_array_equal(to_host(be, reused), to_host(be, fresh))
    assert set(workspace) == {"cols", "input_grad_cols"}, "the gemm path keeps both column matrices in the workspace"
    kept = dict(workspace)
    y, cache = F.conv2d_forward(be, x, weight, bias, 1, 2, "gemm", workspace)
    F.conv2d_backward(be, be.xp.ones_like(y), cache, True)
    assert all(workspace[name] is kept[name] for name in kept), "reused, not allocated again"


def test_convolution_layer_reuses_buffers_safely(make_backend):
    be = make_backend("float64")
    layer = Convolution(3, 4, 3, padding=1, algorithm="gemm", rng=0, backend=be)
    fresh = Convolution(3, 4, 3, padding=1, algorithm="gemm", rng=0, backend=be)
    rng = numpy.random.default_rng(0)
    first, second = (be.to_device(rng.standard_normal((2, 3, 6, 6))) for _ in range(2))
    layer.forward(first)
    y = layer.forward(second)  # overwrites the buffers of the first call, whose cache is gone
    numpy.testing.assert_array_equal(to_host(be, y), to_host(be, fresh.forward(second)))
    dy = be.to_device(rng.standard_normal(tuple(y.shape)))
    numpy.testing.assert_array_equal(to_host(be, layer.backward(dy)), to_host(be, fresh.backward(dy)))
    for name in ("weight", "bias"):
        numpy.testing.assert_array_equal(to_host(be, layer.params[name].grad), to_host(be, fresh.params[name].grad))


# --------------------------------------------------------------------------------------------------
# Gradient checks by central differences (float64)
# --------------------------------------------------------------------------------------------------


def numerical_gradient(loss_of, value: numpy.ndarray, eps: float = 1e-6) -> numpy.ndarray:
    """Central differences of ``loss_of(value)`` with respect to every element of ``value``."""
    return gradcheck.numerical_gradient(lambda: loss_of(value), value, eps)


@pytest.mark.parametrize("stride, padding", [(1, 0), (1, 1), (2, 1), (2, 0)])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_conv_gradient_check(make_backend, algorithm, stride, padding):
    be = make_backend("float64")
    x, weight, bias = conv_case((2, 2, 5, 6, 3, 3), seed=4)
    y_shape = naive_conv2d(x, weight, bias, stride, padding).shape
    probe = numpy.random.default_rng(5).standard_normal(y_shape)  # loss = sum(y * probe)

    def loss(x_, weight_, bias_):
        y, _ = F.conv2d_forward(be, be.to_device(x_), be.to_device(weight_), be.to_device(bias_), stride, padding, algorithm)
        return float((to_host(be, y) * probe).sum())

    _, cache = F.conv2d_forward(be, be.to_device(x), be.to_device(weight), be.to_device(bias), stride, padding, algorithm)
    dx, dweight, dbias = (to_host(be, g) for g in F.conv2d_backward(be, be.to_device(probe), cache, True))
    numpy.testing.assert_allclose(dx, numerical_gradient(lambda v: loss(v, weight, bias), x.copy()), rtol=1e-6, atol=1e-7)
    numpy.testing.assert_allclose(dweight, numerical_gradient(lambda v: loss(x, v, bias), weight.copy()), rtol=1e-6, atol=1e-7)
    numpy.testing.assert_allclose(dbias, numerical_gradient(lambda v: loss(x, weight, v), bias.copy()), rtol=1e-6, atol=1e-7)


def distinct_values(shape, seed=0):
    """A shuffled linspace: no two values tie, so max-pool winners survive a small perturbation."""
    values = numpy.linspace(-1.0, 1.0, int(numpy.prod(shape)))
    return numpy.random.default_rng(seed).permutation(values).reshape(shape)


@pytest.mark.parametrize("pool, stride, size", [(2, 2, 6), (2, 2, 7), (3, 2, 7), (2, 1, 5), (3, 3, 8)])
def test_maxpool_gradient_check(make_backend, pool, stride, size):
    be = make_backend("float64")
    x = distinct_values((2, 2, size, size + 1))
    y, cache = F.maxpool_forward(be, be.to_device(x), pool, stride)
    probe = numpy.random.default_rng(1).standard_normal(tuple(y.shape))
    dx = to_host(be, F.maxpool_backward(be, be.to_device(probe), cache))

    def loss(x_):
        return float((to_host(be, F.maxpool_forward(be, be.to_device(x_), pool, stride)[0]) * probe).sum())

    numpy.testing.assert_allclose(dx, numerical_gradient(loss, x.copy(), eps=1e-7), rtol=1e-6, atol=1e-7)


def test_softmax_cross_entropy_gradient_check(make_backend):
    be = make_backend("float64")
    rng = numpy.random.default_rng(0)
    logits = rng.standard_normal((4, 5)) * 3
    labels = numpy.array([0, 4, 2, 2])

    def loss(logits_):
        return float(to_host(be, F.softmax_cross_entropy(be, be.to_device(logits_), be.to_device(labels))[0]))

    _, dlogits = F.softmax_cross_entropy(be, be.to_device(logits), be.to_device(labels))
    numpy.testing.assert_allclose(to_host(be, dlogits), numerical_gradient(loss, logits.copy()), rtol=1e-6, atol=1e-8)


def test_label_smoothed_cross_entropy_gradient_check(make_backend):
    be = make_backend("float64")
    rng = numpy.random.default_rng(1)
    logits = rng.standard_normal((6, 5)) * 3
    labels = numpy.array([0, 4, 2, 2, 1, 3])

    def loss(logits_):
        value = F.softmax_cross_entropy(be, be.to_device(logits_), be.to_device(labels), label_smoothing=0.2)[0]
        return float(to_host(be, value))

    _, dlogits = F.softmax_cross_entropy(be, be.to_device(logits), be.to_device(labels), label_smoothing=0.2)
    numpy.testing.assert_allclose(to_host(be, dlogits), numerical_gradient(loss, logits.copy()), rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------------------
# Max pooling
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    "pool, stride, h, w",
    [(2, 2, 8, 8), (2, 2, 7, 9), (3, 3, 9, 7), (3, 2, 9, 9), (2, 1, 6, 5), (3, 1, 7, 7), (2, 3, 8, 9), (1, 1, 4, 5)],
    ids=lambda v: str(v),
)
def test_maxpool_matches_reference(make_backend, pool, stride, h, w, dtype):
    be = make_backend(dtype)
    rng = numpy.random.default_rng(0)
    # Small integers: many ties, which must go to the first maximum in row-major window order.
    x = rng.integers(0, 4, size=(2, 3, h, w)).astype(dtype)
    y_expected, winners = naive_maxpool(x, pool, stride)
    dy = rng.standard_normal(y_expected.shape)
    dx_expected = naive_maxpool_backward(x.shape, winners, dy)

    x_device = be.to_device(x)
    y, cache = F.maxpool_forward(be, x_device, pool, stride)
    dx = F.maxpool_backward(be, be.to_device(dy.astype(dtype)), cache)
    assert y.dtype == dx.dtype == numpy.dtype(dtype)
    assert tuple(dx.shape) == x.shape
    numpy.testing.assert_array_equal(to_host(be, y), y_expected)
    assert_close(to_host(be, dx), dx_expected, dtype)
    numpy.testing.assert_array_equal(to_host(be, x_device), x)  # the input is left untouched


@pytest.mark.parametrize("pool, stride", [(2, 2), (3, 2), (1, 1)])
def test_maxpool_for_inference_gives_the_same_values_and_no_cache(make_backend, pool, stride):
    be = make_backend("float32")
    x = be.to_device(numpy.random.default_rng(3).standard_normal((2, 3, 7, 8)).astype("float32"))
    y_train, _ = F.maxpool_forward(be, x, pool, stride)
    y_infer, cache = F.maxpool_forward(be, x, pool, stride, for_backward=False)
    assert cache is None
    numpy.testing.assert_array_equal(to_host(be, y_infer), to_host(be, y_train))
    assert not numpy.shares_memory(to_host(be, y_infer), to_host(be, x))


def test_maxpool_ties_go_to_first_maximum(make_backend):
    be = make_backend("float64")
    x = numpy.array([[[[0.0, 5.0, 1.0, 1.0], [5.0, 0.0, 1.0, 1.0], [2.0, 2.0, 0.0, 0.0], [3.0, 3.0, 0.0, 0.0]]]])
    y, cache = F.maxpool_forward(be, be.to_device(x), 2, 2)
    dx = to_host(be, F.maxpool_backward(be, be.xp.ones_like(y), cache))
    expected = numpy.array([[[[0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]]]], dtype=float)
    numpy.testing.assert_array_equal(to_host(be, y), [[[[5, 1], [3, 0]]]])
    numpy.testing.assert_array_equal(dx, expected)


# --------------------------------------------------------------------------------------------------
# im2col / col2im
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride, padding", [(1, 0), (2, 1), (3, 2)])
def test_im2col_layout_and_col2im_adjoint(make_backend, stride, padding):
    be = make_backend("float64")
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 8))
    cols = to_host(be, F.im2col(be, be.to_device(x), 3, 2, stride, padding))
    x_padded = numpy.pad(x, ((0, 0), (0, 0), (padding,) * 2, (padding,) * 2))
    channels, kernel_h, kernel_w, out_h, out_w, n = cols.shape
    assert (channels, kernel_h, kernel_w, n) == (3, 3, 2, 2)
    for c, i, j, oy, ox, sample in numpy.ndindex(cols.shape):
        assert cols[c, i, j, oy, ox, sample] == x_padded[sample, c, oy * stride + i, ox * stride + j]
    # <im2col(x), r> == <x, col2im(r)>: col2im is the adjoint the backward pass needs.
    r = rng.standard_normal(cols.shape)
    folded = to_host(be, F.col2im(be, be.to_device(r), x.shape, stride, padding))
    assert folded.shape == x.shape
    numpy.testing.assert_allclose((cols * r).sum(), (x * folded).sum(), rtol=1e-12)


OVERLAP_CASES = [
    (length, kernel, stride, padding)
    for length in (1, 5, 8)
    for kernel in (1, 3, 4)
    for stride in (1, 2, 3)
    for padding in (0, 1, 3)
    if F.output_size(length, kernel, stride, padding) >= 1  # the kernel fits the padded input
]


@pytest.mark.parametrize("length, kernel, stride, padding", OVERLAP_CASES)
def test_kernel_offset_overlaps_match_padded_indexing(length, kernel, stride, padding):
    """For each kernel offset, the outputs whose read lands inside the input, and the inputs they read,
    found by brute force over the padded axis."""
    count = F.output_size(length, kernel, stride, padding)
    for offset in range(kernel):
        reads = {o: o * stride + offset - padding for o in range(count)}
        inside = [o for o, read in reads.items() if 0 <= read < length]
        overlap = F._overlap(length, offset, stride, padding, count)
        if not inside:
            assert overlap is None
            continue
        outputs, inputs = overlap
        assert list(range(count))[outputs] == inside
        assert list(range(length))[inputs] == [reads[o] for o in inside]


def test_col2im_is_deterministic(make_backend):
    be = make_backend("float32")
    r = be.to_device(numpy.random.default_rng(0).standard_normal((4, 3, 3, 6, 6, 5)).astype("float32"))
    first = to_host(be, F.col2im(be, r, (5, 4, 8, 8), 1, 1))
    for _ in range(3):
        numpy.testing.assert_array_equal(to_host(be, F.col2im(be, r, (5, 4, 8, 8), 1, 1)), first)


# --------------------------------------------------------------------------------------------------
# Choosing the algorithm
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def clean_default(monkeypatch):
    monkeypatch.delenv(F.CONV_ALGORITHM_ENV, raising=False)
    F.set_default_conv_algorithm(None)
    yield
    F.set_default_conv_algorithm(None)


def test_auto_rule_picks_gemm_for_the_models(clean_default):
    for weight_shape in [(1, 1, 6, 6), (32, 1, 3, 3), (64, 32, 3, 3)]:  # seed; default's two layers
        assert resolve_conv_algorithm("auto", weight_shape, 1) == "gemm"
    assert resolve_conv_algorithm("auto") == "gemm"


def test_auto_rule_picks_signal_for_large_single_channel_kernels(clean_default):
    assert resolve_conv_algorithm("auto", (1, 1, 15, 15), 1) == "signal"
    # A strided layer would throw most of the FFT's stride-1 output away.
    assert resolve_conv_algorithm("auto", (1, 1, 15, 15), 2) == "gemm"


def test_explicit_algorithm_passes_through(clean_default):
    F.set_default_conv_algorithm("signal")
    assert resolve_conv_algorithm("gemm", (1, 1, 3, 3), 1) == "gemm"


def test_global_default_overrides_auto(clean_default, monkeypatch):
    be = get_backend("cpu")
    monkeypatch.setenv(F.CONV_ALGORITHM_ENV, "signal")
    assert resolve_conv_algorithm("auto", (64, 32, 3, 3), 1) == "signal"
    F.set_default_conv_algorithm("gemm")  # the function wins over the environment
    assert resolve_conv_algorithm("auto", (64, 32, 3, 3), 1) == "gemm"
    F.set_default_conv_algorithm("auto")  # back to the environment
    assert F.get_default_conv_algorithm() == "signal"
    layer = Convolution(1, 2, 3, rng=0, backend=be)
    layer.forward(be.to_device(numpy.ones((1, 1, 5, 5), dtype="float32")))
    assert layer._cache[0] == "signal"


def test_bad_algorithm_names_are_refused(clean_default, monkeypatch):
    with pytest.raises(ValueError, match="unknown convolution algorithm"):
        F.set_default_conv_algorithm("winograd")
    monkeypatch.setenv(F.CONV_ALGORITHM_ENV, "fft")
    with pytest.raises(ValueError, match=F.CONV_ALGORITHM_ENV):
        F.get_default_conv_algorithm()
    with pytest.raises(ValueError, match="unknown convolution algorithm"):
        F.conv2d_forward(get_backend("cpu"), numpy.ones((1, 1, 3, 3)), numpy.ones((1, 1, 2, 2)), numpy.ones(1), 1, 0, "fft")


# --------------------------------------------------------------------------------------------------
# No silent float64: every activation and gradient keeps the model's dtype
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("algorithm", ["auto", "gemm", "signal"])
@pytest.mark.parametrize("build", [plain_cnn, seed_cnn], ids=["plain", "seed"])
def test_models_keep_their_dtype_end_to_end(make_backend, build, algorithm, dtype):
    be = make_backend(dtype)
    model = build(be, seed=0, algorithm=algorithm)
    rng = numpy.random.default_rng(0)
    x = be.to_device(rng.random((3, 1, 28, 28)).astype(dtype))
    labels = be.to_device(rng.integers(0, 10, size=3))
    expected = numpy.dtype(dtype)

    activation = x
    for layer in model.layers:
        activation = layer.forward(activation)
        assert activation.dtype == expected, f"{layer} produced {activation.dtype}"
    loss_fn = SoftmaxCrossEntropy(be)
    loss = loss_fn.forward(activation, labels)
    assert loss.dtype == expected
    grad = loss_fn.backward()
    assert grad.dtype == expected
    for layer in reversed(model.layers):
        grad = layer.backward(grad)
        if grad is not None:
            assert grad.dtype == expected, f"{layer} passed back {grad.dtype}"
    for name, param in model.named_parameters():
        assert param.data.dtype == expected, name
        assert param.grad is not None and param.grad.dtype == expected, f"gradient of {name}"
