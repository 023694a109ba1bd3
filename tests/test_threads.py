"""The CPU backend's chunked operations agree with the plain single-call path (float64)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy
import pytest

from cnn_backend import functional as F
from cnn_backend import threads
from cnn_backend.backend import Backend, CpuBackend, cpu_backend
from cnn_backend.layers import SoftmaxCrossEntropy
from cnn_backend.model import plain_cnn, seed_cnn
from cnn_backend.optim import SGD
from cnn_backend.spec import build_model
from cnn_backend.training import train_step

PLAIN = cpu_backend("float64", parallel=False)
PARALLEL = cpu_backend("float64")


@pytest.fixture(params=[2, 3], ids=["2-threads", "3-threads"])
def split_everything(request, monkeypatch):
    """Chunk every operation, however small, over 2 or 3 threads (3 gives unequal chunks)."""
    monkeypatch.setattr(threads, "MIN_SPLIT_ELEMENTS", 0)
    monkeypatch.setattr(threads, "MIN_SPLIT_COPY_ELEMENTS", 0)
    monkeypatch.setattr(threads, "MIN_SPLIT_FLOPS", 0)
    monkeypatch.setattr(threads, "MIN_PRODUCT_CHUNK", 1)
    threads.set_thread_count(request.param)
    yield request.param
    threads.set_thread_count(None)


def batch_innermost(rng, n, c, h, w):
    """An ``(N, C, H, W)`` view of a contiguous ``(C, H, W, N)`` array, as the layers hand on."""
    return F.nchw_view(numpy.ascontiguousarray(rng.standard_normal((c, h, w, n))))


def test_the_backends_are_what_they_say():
    assert type(PARALLEL) is CpuBackend and type(PLAIN) is Backend
    assert type(PARALLEL.with_dtype("float32")) is CpuBackend


def test_map_chunks_cuts_the_axis_into_chunks(split_everything):
    a = numpy.arange(5.0 * 29).reshape(5, 29)
    out = numpy.zeros_like(a)
    seen = []

    def kernel(a_part, out_part):
        seen.append(a_part.shape)
        out_part[...] = 2 * a_part

    PARALLEL.map_chunks(kernel, a, out, axis=1)
    numpy.testing.assert_array_equal(out, 2 * a)
    parts = split_everything * threads.CHUNKS_PER_THREAD
    assert sorted(seen) == sorted((5, len(chunk)) for chunk in numpy.array_split(range(29), parts))
    seen.clear()
    PLAIN.map_chunks(kernel, a, out, axis=1)
    assert seen == [(5, 29)]


def test_small_operations_run_as_one_call():
    a = numpy.ones((4, 4))
    seen = []
    PARALLEL.map_chunks(lambda part: seen.append(part.shape), a)
    assert seen == [(4, 4)]


def test_an_error_in_a_chunk_reaches_the_caller(split_everything):
    def kernel(part):
        if part[0, 0] != 0:
            raise ValueError("bad chunk")

    with pytest.raises(ValueError, match="bad chunk"):
        PARALLEL.map_chunks(kernel, numpy.arange(24.0).reshape(12, 2))
    # The pool is still usable afterwards.
    out = numpy.zeros((12, 2))
    PARALLEL.map_chunks(lambda part: part.fill(1), out)
    assert out.sum() == 24


def test_the_callers_floating_point_error_state_holds_in_every_chunk(split_everything):
    # Every chunk overflows; NumPy's error state is per thread, and the workers must take the caller's.
    big = numpy.full((12, 4), 1e300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with numpy.errstate(over="ignore"):
            PARALLEL.map_chunks(lambda part: numpy.multiply(part, 1e300, out=part), big.copy())
            threads.matmul(big, big.T)
    with numpy.errstate(over="raise"), pytest.raises(FloatingPointError, match="overflow"):
        threads.matmul(big, big.T)


def test_a_chunk_that_chunks_again_runs_in_place(split_everything):
    a = numpy.arange(24.0).reshape(6, 4)
    out = numpy.zeros_like(a)

    def inner(a_part, out_part):
        out_part[...] = a_part + 1

    PARALLEL.map_chunks(lambda a_part, out_part: PARALLEL.map_chunks(inner, a_part, out_part), a, out)
    numpy.testing.assert_array_equal(out, a + 1)


@pytest.mark.parametrize(
    "m, k, n, transpose_a, transpose_b",
    [(7, 5, 11, False, False), (11, 5, 7, True, False), (6, 9, 13, False, True), (13, 3, 4, True, True), (1, 4, 1, False, False)],
)
def test_matmul_matches_numpy_for_any_memory_order(split_everything, m, k, n, transpose_a, transpose_b):
    rng = numpy.random.default_rng(0)
    a = rng.standard_normal((k, m)).T if transpose_a else rng.standard_normal((m, k))
    b = rng.standard_normal((n, k)).T if transpose_b else rng.standard_normal((k, n))
    numpy.testing.assert_allclose(PARALLEL.matmul(a, b), a @ b, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_matmuls_match_numpy_for_any_memory_order(split_everything, count):
    rng = numpy.random.default_rng(1)
    shapes = [(7, 5, 11), (300, 4, 2), (3, 8, 9)][:count]
    products, expected = [], []
    for index, (m, k, n) in enumerate(shapes):
        a = rng.standard_normal((k, m)).T if index % 2 else rng.standard_normal((m, k))
        b = rng.standard_normal((n, k)).T if index == 1 else rng.standard_normal((k, n))
        out = numpy.empty((n, m)).T if index == 2 else numpy.empty((m, n))
        products.append((a, b, out))
        expected.append(a @ b)
    for be in (PLAIN, PARALLEL):
        for _, _, out in products:
            out.fill(numpy.nan)
        be.matmuls(products)
        for (_, _, out), reference in zip(products, expected):
            numpy.testing.assert_allclose(out, reference, rtol=1e-13, atol=1e-13)


def test_two_products_on_two_threads_run_whole_and_at_once(split_everything, monkeypatch):
    """Each product is one BLAS call, handed to whichever thread is free (one wake-up, no halves);
    with three threads too (three threads // two products: one block each)."""
    calls = []
    numpy_matmul = numpy.matmul

    def recording_matmul(a, b, out=None):
        calls.append((a.shape, b.shape))
        return numpy_matmul(a, b, out=out)

    monkeypatch.setattr(threads.numpy, "matmul", recording_matmul)
    rng = numpy.random.default_rng(2)
    a, b = rng.standard_normal((40, 30)), rng.standard_normal((30, 50))
    first, second = numpy.empty((40, 50)), numpy.empty((50, 40))
    threads.matmuls([(a, b, first), (b.T, a.T, second)])
    numpy.testing.assert_allclose(first, numpy_matmul(a, b), rtol=1e-13)
    numpy.testing.assert_allclose(second, first.T, rtol=1e-13)
    assert sorted(calls) == [((40, 30), (30, 50)), ((50, 30), (30, 40))]


@pytest.mark.parametrize(
    "length, threads_, parts",
    [(100, 2, 1), (127, 2, 1), (128, 2, 2), (216, 2, 2), (288, 2, 2), (511, 2, 2), (512, 2, 4), (12_544, 2, 4),
     (216, 3, 3), (191, 3, 1), (216, 1, 1)],
)
def test_a_product_is_cut_into_chunks_each_thread_can_use(length, threads_, parts):
    """Several chunks of at least MIN_PRODUCT_CHUNK per thread, else one of at least MIN_PRODUCT_SHARE
    per thread (the narrow network's 216-row weight gradient: two, not one), else one; a multiple of
    the thread count (511 rows: two chunks, not three on two threads)."""
    threads.set_thread_count(threads_)
    try:
        assert threads.product_parts(length) == parts
    finally:
        threads.set_thread_count(None)


def test_a_short_product_shared_one_chunk_per_thread_is_right():
    rng = numpy.random.default_rng(0)
    a, b = rng.standard_normal((216, 3000)), rng.standard_normal((48, 3000)).T
    threads.set_thread_count(2)
    try:
        numpy.testing.assert_allclose(PARALLEL.matmul(a, b), a @ b, rtol=1e-12, atol=1e-12)
    finally:
        threads.set_thread_count(None)


def test_matmul_gives_blas_its_thread_count_back():
    controllers = threads._blas()
    if not controllers:
        pytest.skip("threadpoolctl is not installed")
    before = [c.get_num_threads() for c in controllers]
    rng = numpy.random.default_rng(0)
    PARALLEL.matmul(rng.standard_normal((300, 200)), rng.standard_normal((200, 300)))
    assert [c.get_num_threads() for c in controllers] == before


@pytest.fixture
def blas_at_two_threads():
    """NumPy's BLAS set to two threads for the test (its threadpoolctl controllers), then restored."""
    controllers = threads._blas()
    if not controllers:
        pytest.skip("threadpoolctl is not installed")
    saved = [c.get_num_threads() for c in controllers]
    for controller in controllers:
        controller.set_num_threads(2)
    yield controllers
    for controller, count in zip(controllers, saved):
        controller.set_num_threads(count)


def test_overlapping_one_thread_holds_restore_blas_when_the_last_one_ends(blas_at_two_threads):
    """BLAS's thread count is one setting for the process: a worker's hold that ends while another
    thread still multiplies must not put the count back under it."""
    controllers = blas_at_two_threads
    first, second = threads._OneBlasThread(), threads._OneBlasThread()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert [c.get_num_threads() for c in controllers] == [1] * len(controllers)
    second.__exit__(None, None, None)
    assert [c.get_num_threads() for c in controllers] == [2] * len(controllers)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", ["rows", "2-d transposed"])
def test_row_reductions_match_numpy(dtype, layout):
    rng = numpy.random.default_rng(9)
    a, b = (rng.standard_normal((5, 300)) for _ in range(2))
    if layout == "2-d transposed":
        a, b = (numpy.ascontiguousarray(v.T).T for v in (a, b))
    a32, b32 = a.astype(dtype), b.astype(dtype)
    tolerance = {"float32": 1e-5, "float64": 1e-13}[dtype]
    for mean, expected_sums, expected_dots in ((False, a.sum(axis=1), (a * b).sum(axis=1)), (True, a.mean(axis=1), (a * b).mean(axis=1))):
        sums, dots = numpy.empty(5, dtype=dtype), numpy.empty(5, dtype=dtype)
        PARALLEL.row_sums(a32, sums, mean=mean)
        PARALLEL.row_dots(a32, b32, dots, None, mean=mean)
        numpy.testing.assert_allclose(sums, expected_sums, rtol=tolerance, atol=tolerance * 30)
        numpy.testing.assert_allclose(dots, expected_dots, rtol=tolerance, atol=tolerance * 30)


def test_a_product_first_does_not_fix_the_thread_count_at_one(blas_at_two_threads):
    """The count is read from BLAS: a product, which holds BLAS at one thread while it runs, must
    not read it inside that hold (every later operation would then run on one core)."""
    try:
        threads.set_thread_count(None)
        rng = numpy.random.default_rng(0)
        PARALLEL.matmul(rng.standard_normal((600, 600)), rng.standard_normal((600, 600)))
        assert threads.thread_count() == 2
    finally:
        threads.set_thread_count(None)


def test_map_range_shares_out_consecutive_parts(split_everything):
    seen = []
    PARALLEL.map_range(lambda start, stop: seen.append((start, stop)), 9, size=10**9)
    parts = split_everything * threads.CHUNKS_PER_THREAD
    expected, start = [], 0
    for chunk in numpy.array_split(range(9), parts):
        expected.append((start, start + len(chunk)))
        start += len(chunk)
    assert sorted(seen) == expected
    seen.clear()
    PLAIN.map_range(lambda start, stop: seen.append((start, stop)), 9, size=10**9)
    assert seen == [(0, 9)]


def test_a_copy_is_shared_out_only_from_its_own_threshold():
    threads.set_thread_count(2)
    try:
        for size, parts in ((threads.MIN_SPLIT_COPY_ELEMENTS - 1, 1), (threads.MIN_SPLIT_COPY_ELEMENTS, 4)):
            seen = []
            PARALLEL.map_range(lambda start, stop: seen.append((start, stop)), 9, size=size)
            assert len(seen) == parts, size
    finally:
        threads.set_thread_count(None)
    assert threads.MIN_SPLIT_COPY_ELEMENTS > threads.MIN_SPLIT_ELEMENTS  # copies repay a wake-up later


@pytest.mark.parametrize("channels", [1, 5])
@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 0), (1, 0)])
def test_gemm_convolution_matches_the_plain_path(split_everything, channels, stride, padding):
    rng = numpy.random.default_rng(1)
    x = batch_innermost(rng, 6, channels, 9, 8)
    weight, bias = rng.standard_normal((4, channels, 3, 3)), rng.standard_normal(4)
    results = []
    for be in (PLAIN, PARALLEL):
        y, cache = F.conv2d_forward(be, x, weight, bias, stride, padding, "gemm", workspace={})
        dy = numpy.random.default_rng(2).standard_normal(y.shape)
        results.append((y, *F.conv2d_backward(be, dy, cache)))
    for plain, parallel in zip(*results):
        numpy.testing.assert_allclose(parallel, plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(6, 5, 8, 8), (3, 4, 7, 9)])
@pytest.mark.parametrize("layout", ["nchw", "batch-innermost"])
def test_max_pooling_matches_the_plain_path(split_everything, shape, layout):
    rng = numpy.random.default_rng(3)
    x = rng.permutation(numpy.linspace(-1, 1, numpy.prod(shape))).reshape(shape)  # no ties
    x[0, 0, :2, :2] = 0.5  # one window of ties
    if layout == "batch-innermost":
        x = F.nchw_view(numpy.ascontiguousarray(x.transpose(1, 2, 3, 0)))
    results = []
    for be in (PLAIN, PARALLEL):
        y, cache = F.maxpool_forward(be, x, 2, 2)
        inference, _ = F.maxpool_forward(be, x, 2, 2, for_backward=False)
        dy = numpy.random.default_rng(4).standard_normal(y.shape)
        results.append((y, inference, F.maxpool_backward(be, dy, cache)))
    for plain, parallel in zip(*results):
        numpy.testing.assert_array_equal(parallel, plain)


@pytest.mark.parametrize("layout", ["nchw", "batch-innermost", "2-d", "2-d transposed"])
def test_relu_and_multiply_match_the_plain_path(split_everything, layout):
    rng = numpy.random.default_rng(5)
    if layout == "nchw":
        x = rng.standard_normal((5, 3, 4, 6))
    elif layout == "batch-innermost":
        x = batch_innermost(rng, 5, 3, 4, 6)
    elif layout == "2-d":
        x = rng.standard_normal((9, 7))
    else:
        x = rng.standard_normal((7, 9)).T
    dy = rng.standard_normal(x.shape)
    for be in (PLAIN, PARALLEL):
        y, positive = F.relu_forward(be, x)
        numpy.testing.assert_array_equal(y, numpy.maximum(x, 0))
        numpy.testing.assert_array_equal(positive, x > 0)
        numpy.testing.assert_array_equal(F.multiply(be, dy, positive), dy * positive)
        assert y.strides == x.strides  # the layout is kept


@pytest.mark.parametrize("layout", ["nchw", "batch-innermost", "2-d transposed", "a chunk", "strided"])
def test_zeros_like_keeps_the_layout_and_shares_one_read_only_buffer(layout):
    rng = numpy.random.default_rng(6)
    x = {
        "nchw": rng.standard_normal((5, 3, 4, 6)),
        "batch-innermost": batch_innermost(rng, 5, 3, 4, 6),
        "2-d transposed": rng.standard_normal((7, 9)).T,
        "a chunk": batch_innermost(rng, 5, 3, 4, 6)[:, 1:],  # part of the outermost axis in memory
        "strided": rng.standard_normal((5, 3, 4, 6))[..., ::2],  # dense in no axis order
    }[layout]
    zeros = threads.zeros_like(x)
    assert zeros.shape == x.shape and zeros.dtype == x.dtype and not zeros.any()
    if layout == "strided":
        assert zeros.flags.writeable  # a fresh array
        return
    assert zeros.strides == x.strides and not zeros.flags.writeable
    assert numpy.shares_memory(zeros, threads.zeros_like(numpy.empty((2, 2))))  # one buffer per dtype


def test_rectify_matches_maximum_on_every_backend():
    x = numpy.random.default_rng(7).standard_normal((4, 6)).T
    for be in (PLAIN, PARALLEL):
        out = numpy.empty_like(x)
        be.rectify(x, out)
        numpy.testing.assert_array_equal(out, numpy.maximum(x, 0))
        be.rectify(x, x)  # in place
        numpy.testing.assert_array_equal(x, out)


@pytest.mark.parametrize("layout", ["rows", "2-d transposed"])
def test_batch_norm_matches_the_plain_path(split_everything, layout):
    rng = numpy.random.default_rng(8)
    # Rows as BatchNorm hands them on: one per channel of a batch-innermost activation, or the
    # transposed view of a dense layer's (N, features) output.
    def in_layout(values):
        return values if layout == "rows" else numpy.ascontiguousarray(values.T).T

    rows, dy = in_layout(rng.standard_normal((7, 40))), in_layout(rng.standard_normal((7, 40)))
    weight, bias, scale, shift = rng.standard_normal((4, 7))
    results = []
    for be in (PLAIN, PARALLEL):
        forward = F.batch_norm_forward(be, rows, weight, bias, 1e-5)
        backward = F.batch_norm_backward(be, dy, forward[1], weight, forward[4])
        results.append((*forward, *backward, F.scale_and_shift_rows(be, rows, scale, shift), F.scale_and_shift_rows(be, rows, scale, shift, relu=True)))
        assert forward[0].strides == forward[1].strides == backward[0].strides == rows.strides  # the layout is kept
    for plain, parallel in zip(*results):
        # A chunk of a strided (transposed) array may be reduced in another order: the last bit may differ.
        numpy.testing.assert_allclose(parallel, plain, rtol=1e-14, atol=1e-15)
    y, normalised, mean, var, inv_std, dx, dweight, dbias, affine, rectified = results[0]
    numpy.testing.assert_array_equal(rectified, numpy.maximum(affine, 0))
    numpy.testing.assert_allclose(mean, rows.mean(axis=1), rtol=1e-12)
    numpy.testing.assert_allclose(var, rows.var(axis=1), rtol=1e-12)
    numpy.testing.assert_allclose(y, weight[:, None] * (rows - mean[:, None]) / numpy.sqrt(var[:, None] + 1e-5) + bias[:, None], rtol=1e-12)
    numpy.testing.assert_allclose(dbias, dy.sum(axis=1), rtol=1e-12)
    numpy.testing.assert_allclose(dweight, (dy * normalised).sum(axis=1), rtol=1e-12)
    numpy.testing.assert_allclose(affine, rows * scale[:, None] + shift[:, None], rtol=1e-12)


def default_bn(backend, seed, algorithm):
    """examples/default-bn.toml: BatchNorm on 4-D and 2-D activations, dropout."""
    return build_model(Path(__file__).resolve().parent.parent / "examples" / "default-bn.toml", (1, 28, 28), backend, seed, algorithm=algorithm)


@pytest.mark.parametrize("build", [seed_cnn, plain_cnn, default_bn], ids=["seed", "plain", "default-bn"])
def test_a_training_step_matches_the_plain_path(split_everything, build):
    rng = numpy.random.default_rng(6)
    x, y = rng.random((6, 1, 28, 28)), rng.integers(0, 10, size=6)
    results = []
    for be in (PLAIN, PARALLEL):
        model = build(be, seed=0, algorithm="gemm", **({"dropout": 0.3} if build is plain_cnn else {}))
        optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9, backend=be)
        losses = [float(train_step(model, SoftmaxCrossEntropy(be), optimizer, x, y)[0]) for _ in range(2)]
        model.eval()  # then an evaluation forward pass (BatchNorm's running statistics)
        results.append((losses, [p.data for p in model.parameters()], model.forward(x)))
    (plain_losses, plain_params, plain_logits), (losses, params, logits) = results
    numpy.testing.assert_allclose(losses, plain_losses, rtol=1e-12)
    for plain, parallel in zip(plain_params, params):
        numpy.testing.assert_allclose(parallel, plain, rtol=1e-10, atol=1e-12)
    numpy.testing.assert_allclose(logits, plain_logits, rtol=1e-10, atol=1e-12)


def test_a_bad_thread_count_in_the_environment_is_named(monkeypatch):
    monkeypatch.setenv(threads.THREADS_ENV, "two")
    threads.set_thread_count(None)
    try:
        with pytest.raises(ValueError, match="CNN_BACKEND_NUM_THREADS='two' is not a thread count"):
            threads.thread_count()
    finally:
        monkeypatch.delenv(threads.THREADS_ENV)
        threads.set_thread_count(None)


def test_the_environment_sets_the_thread_count(monkeypatch):
    monkeypatch.setenv(threads.THREADS_ENV, "3")
    threads.set_thread_count(None)
    try:
        assert threads.thread_count() == 3
    finally:
        monkeypatch.delenv(threads.THREADS_ENV)
        threads.set_thread_count(None)
