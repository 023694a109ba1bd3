"""The CPU backend's threads: large array operations cut into one chunk per core.

NumPy runs each element-wise operation or copy on one core, releasing the GIL while it does.
:func:`map_chunks` cuts one such operation along an outer axis into as many chunks as there are
threads and runs them at once: the calling thread and a small pool of worker threads take chunks
(a few per thread) until none are left, so a thread that another process keeps off its core
delays no one. Workers wait on a lock, not in a busy loop, so an idle pool costs no CPU.

:func:`matmul` runs NumPy's BLAS with one thread per chunk of the product on the same threads,
instead of BLAS's own pool; :func:`matmuls` runs independent products at once, one per thread.
OpenBLAS's worker threads spin for a while after each product (about 0.1 s by default) before
they sleep: on a machine with as many cores as threads, a spinning worker
takes the core that the next element-wise chunk, or the main thread's next copy, needs, and the
process runs several times slower until the spinning stops. With every product run on one BLAS
thread from threads that block when idle, nothing spins. BLAS's own thread count is restored after
each product, so the rest of the process sees the setting it had (it is controlled through
threadpoolctl; without threadpoolctl, products run as plain ``a @ b``).

The thread count is ``$CNN_BACKEND_NUM_THREADS`` when set, else the thread count NumPy's BLAS has
when the first chunked operation runs (``OPENBLAS_NUM_THREADS``, threadpoolctl limits and the
usable cores all reach it there), else the usable cores. :func:`set_thread_count` changes it.
"""

from __future__ import annotations

import contextvars
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy

THREADS_ENV = "CNN_BACKEND_NUM_THREADS"
#: below this many elements (in the largest operand) an operation runs as one call: waking the
#: pool and handing out chunks costs tens of microseconds per operation. Measured on a quiet 2-core
#: machine (benchmark, samples/s): at 2^17 the seed model trained 3x slower than unsplit; at 2^22
#: the plain model lost a fifth. 2^20 against 2^21 in one process (``compare_in_process.py --what
#: split``): a BatchNorm network (examples/default-bn.toml) trained 10% faster at batch 64 and 128
#: (its first BatchNorm and pooling hold 1.6M values at batch 64); the plain and seed models
#: moved within 4% either way.
MIN_SPLIT_ELEMENTS = 1 << 20
#: the same for copies shared out by :func:`map_range` (im2col): two threads copy only about 1.3x
#: as fast as one on a 2-core VM (the copy is memory-bound), so a copy must be larger to repay
#: waking a thread. Measured in one process (samples/s, medians): split from 2^21 values, the seed
#: model trained at batch 128 about a third slower than with nothing split (its im2col holds 2.5M
#: values); the plain model's second-layer im2col at batch 64 (3.6M) still gains from a split.
MIN_SPLIT_COPY_ELEMENTS = 3_000_000
#: products below this many floating-point operations run as one call on one BLAS thread: the
#: seed model's 5 MFLOP matrix-vector products at batch 128 (memory-bound) lost more to the
#: wake-up than they gained at 4 MFLOP; every product of the plain model is above 30 MFLOP
MIN_SPLIT_FLOPS = 8_000_000
#: chunks per thread: more balance on a busy machine, more calls on a quiet one
CHUNKS_PER_THREAD = 2
#: rows or columns of a product per chunk at least, so that each stays an efficient BLAS call
MIN_PRODUCT_CHUNK = 128
#: the same when each thread takes one chunk: a product whose longer side is too short for chunks of
#: ``MIN_PRODUCT_CHUNK`` is still shared out if every thread gets this many. The narrow network's
#: weight gradient (216 x 12,544 by 12,544 x 48, examples/narrow-bn-after-pool.toml) ran on one
#: thread as a single 216-row chunk; two chunks of 108 rows halve its time (see docs/performance.md).
MIN_PRODUCT_SHARE = 64

_lock = threading.Lock()
_thread_count: int | None = None
_pool: ThreadPoolExecutor | None = None
_local = threading.local()  # .in_worker: set in pool threads, so nested calls run in place
_blas_controllers: list | None = None


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def count_from_environment() -> int | None:
    """``$CNN_BACKEND_NUM_THREADS`` as a count (None when unset); ValueError, one line, when it is not one."""
    text = os.environ.get(THREADS_ENV, "").strip()
    if not text:
        return None
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"{THREADS_ENV}={text!r} is not a thread count; set it to an integer >= 1 or unset it")
    return count


def thread_count() -> int:
    """How many threads (the caller's included) chunked operations use."""
    global _thread_count
    if _thread_count is None:
        count = count_from_environment()
        if count is None:
            blas = [c.get_num_threads() for c in _blas()]
            count = blas[0] if blas else _usable_cores()
        _thread_count = max(1, int(count))
    return _thread_count


def set_thread_count(count: int | None) -> None:
    """Use ``count`` threads from now on (None: choose again as at start-up)."""
    global _thread_count, _pool
    if count is not None and (not isinstance(count, int) or count < 1):
        raise ValueError(f"thread count must be an integer >= 1, got {count!r}")
    with _lock:
        old, _pool = _pool, None
        _thread_count = count
    if old is not None:
        old.shutdown(wait=True)


def _mark_worker() -> None:
    _local.in_worker = True


def _workers() -> ThreadPoolExecutor:
    global _pool
    pool = _pool
    if pool is None:
        with _lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(
                    max_workers=thread_count() - 1, thread_name_prefix="cnn-backend", initializer=_mark_worker
                )
            pool = _pool
    return pool


def _blas() -> list:
    """threadpoolctl controllers of the BLAS libraries loaded now ([] without threadpoolctl)."""
    global _blas_controllers
    if _blas_controllers is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _blas_controllers = []
        else:
            _blas_controllers = list(ThreadpoolController().select(user_api="blas").lib_controllers)
    return _blas_controllers


def _bounds(length: int, parts: int) -> list[tuple[int, int]]:
    step, extra = divmod(length, parts)
    bounds, start = [], 0
    for index in range(parts):
        stop = start + step + (index < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def _chunk(array, axis: int, start: int, stop: int):
    axis %= array.ndim
    return array[(slice(None),) * axis + (slice(start, stop),)]


def _run_split(kernel, arrays, axes, length: int, parts: int | None = None) -> None:
    # A few chunks per thread, handed out as threads ask for them: when another process holds a
    # core, the threads that do run take the chunks left over instead of waiting for it.
    if parts is None:
        parts = min(thread_count() * CHUNKS_PER_THREAD, length)

    def chunk_task(start: int, stop: int):
        return lambda: kernel(*[_chunk(array, axis, start, stop) for array, axis in zip(arrays, axes)])

    _run_tasks([chunk_task(start, stop) for start, stop in _bounds(length, parts)])


def _run_tasks(tasks: list) -> None:
    """Run every callable of ``tasks`` once, on the calling thread and up to ``len(tasks) - 1``
    workers, each thread taking the next task as it finishes one."""
    remaining = iter(tasks)
    handing_out = threading.Lock()

    def drain() -> None:
        while True:
            with handing_out:
                task = next(remaining, None)
            if task is None:
                return
            task()

    pool = _workers()
    # Each worker runs in a copy of the caller's context, so the caller's ``numpy.errstate`` (a
    # context variable) holds in every chunk: a warning silenced or raised by the caller stays so.
    futures = [pool.submit(contextvars.copy_context().run, drain) for _ in range(min(thread_count(), len(tasks)) - 1)]
    try:
        drain()
    finally:
        # Wait for every task before returning (or raising): they write into the caller's arrays.
        for future in futures:
            future.exception()
    for future in futures:
        future.result()


def product_parts(length: int) -> int:
    """How many chunks a product's longer side (``length`` rows or columns) is cut into: up to
    ``CHUNKS_PER_THREAD`` per thread of at least ``MIN_PRODUCT_CHUNK`` each, else one per thread of
    at least ``MIN_PRODUCT_SHARE``, else one. Always a multiple of the thread count (three chunks on
    two threads would leave one thread twice the work of the other)."""
    threads = thread_count()
    per_thread = min(CHUNKS_PER_THREAD, length // (threads * MIN_PRODUCT_CHUNK))
    if per_thread >= 1:
        return per_thread * threads
    return threads if length // threads >= MIN_PRODUCT_SHARE else 1


def _splittable(length: int, size: int, minimum: int | None = None) -> bool:
    minimum = MIN_SPLIT_ELEMENTS if minimum is None else minimum
    return length > 1 and size >= minimum and thread_count() > 1 and not getattr(_local, "in_worker", False)


def map_chunks(kernel, arrays, axis: int = 0) -> None:
    """``kernel(*arrays)``, run as ``kernel(*chunks)`` over one chunk of ``axis`` per thread.

    ``kernel`` writes its results into some of ``arrays`` in place and must give the same result
    on any equal slicing of ``axis`` of all of them (every array has that axis, of one length).
    Small operations run as one call.
    """
    length = arrays[0].shape[axis]
    if not _splittable(length, max(array.size for array in arrays)):
        kernel(*arrays)
        return
    _run_split(kernel, arrays, [axis] * len(arrays), length)


def map_range(kernel, length: int, size: int) -> None:
    """``kernel(0, length)``, run as ``kernel(start, stop)`` over one part of ``range(length)`` per
    thread when the work (``size`` elements) is large enough.

    For work whose parts write disjoint outputs but are not slices of one axis of every array
    (im2col's kernel offsets: each writes its own rows of the column matrix from the whole input).
    """
    if not _splittable(length, size, MIN_SPLIT_COPY_ELEMENTS):
        kernel(0, length)
        return
    _run_split(lambda part: kernel(int(part[0]), int(part[-1]) + 1), [numpy.arange(length)], [0], length)


class _OneBlasThread:
    """Hold NumPy's BLAS at one thread for a ``with`` block, then restore its thread counts.

    BLAS's thread count is one setting for the whole process, and pool workers enter these blocks
    too: the first thread in sets it to one and the last one out restores it, so no thread's
    product runs while another has already put the count back.
    """

    _holders = 0
    _saved: list = []
    _guard = threading.Lock()

    def __enter__(self):
        thread_count()  # settled first: read inside this block, BLAS's count would be our own 1
        cls = type(self)
        with cls._guard:
            if cls._holders == 0:
                cls._saved = [(c, c.get_num_threads()) for c in _blas()]
                for controller, count in cls._saved:
                    if count != 1:
                        controller.set_num_threads(1)
            cls._holders += 1
        return self

    def __exit__(self, *exc_info) -> None:
        cls = type(self)
        with cls._guard:
            cls._holders -= 1
            if cls._holders == 0:
                for controller, count in cls._saved:
                    if count != 1:
                        controller.set_num_threads(count)


@functools.lru_cache(maxsize=32)
def _filled(length: int, value: float, dtype) -> numpy.ndarray:
    vector = numpy.full(length, value, dtype=dtype)
    vector.flags.writeable = False
    return vector


def row_sums(rows, out, weight: float = 1.0) -> None:
    """``weight * rows.sum(axis=1)`` into ``out`` for a 2-D float array, as one matrix-vector
    product with a vector of ``weight`` (``1 / rows.shape[1]`` gives the means).

    BLAS's vectorised product reads each row at memory speed; NumPy's pairwise summation along a
    row ran about 3x slower (16 against 48 us for a 16 x 12,544 float32 array on a 2-core AMD
    EPYC). On one BLAS thread: the callers' chunks are the parallelism.
    """
    with _OneBlasThread():
        numpy.matmul(rows, _filled(rows.shape[1], weight, rows.dtype), out=out)


def row_dots(a, b, out) -> None:
    """``(a * b).sum(axis=1)`` into ``out`` for 2-D float arrays of one shape: one BLAS dot product
    per row, without the ``a * b`` temporary (and twice as fast as ``einsum``)."""
    with _OneBlasThread():
        numpy.matmul(a[:, None, :], b[:, :, None], out=out[:, None, None])


_zero_buffers: dict = {}
_zeros_guard = threading.Lock()


def zeros_like(x) -> numpy.ndarray:
    """A read-only array of zeros with ``x``'s shape and memory order: a view of one zeroed buffer
    kept per dtype and grown as needed (a fresh array for ``x`` not dense in any axis order).

    The other operand of a ReLU's maximum: NumPy's ``maximum`` against the scalar 0 is not
    vectorised on AVX2 CPUs (148 against 41 us for 200,704 float32 values against an array), and
    an array of the same layout keeps both operands' inner loop contiguous.
    """
    order = sorted(range(x.ndim), key=lambda axis: -x.strides[axis])
    dense_strides, step = [0] * x.ndim, x.itemsize
    for axis in reversed(order):
        dense_strides[axis] = step
        step *= x.shape[axis]
    if x.size == 0 or list(x.strides) != [s if x.shape[a] > 1 else x.strides[a] for a, s in enumerate(dense_strides)]:
        return numpy.zeros_like(x)
    with _zeros_guard:
        buffer = _zero_buffers.get(x.dtype)
        if buffer is None or buffer.size < x.size:
            buffer = _zero_buffers[x.dtype] = numpy.zeros(x.size, dtype=x.dtype)
            buffer.flags.writeable = False
    return buffer[: x.size].reshape([x.shape[axis] for axis in order]).transpose(numpy.argsort(order))


def product_split(m: int, k: int, n: int) -> int:
    """Into how many blocks :func:`matmul` cuts the longer side of an ``(m, k) @ (k, n)`` product
    (1: one call): none below ``MIN_SPLIT_FLOPS``, else :func:`product_parts` of that side."""
    length = max(m, n)
    if 2 * m * n * k < MIN_SPLIT_FLOPS or not _splittable(length, MIN_SPLIT_ELEMENTS):
        return 1
    return product_parts(length)


def matmul(a, b, out=None):
    """``a @ b`` for 2-D arrays (into ``out`` when given): row or column blocks of the result, one
    per thread, each on one BLAS thread."""
    if not _blas():
        return numpy.matmul(a, b, out=out)
    m, k = a.shape
    n = b.shape[1]
    if out is None:
        out = numpy.empty((m, n), dtype=numpy.result_type(a.dtype, b.dtype))
    with _OneBlasThread():
        parts = product_split(m, k, n)
        if parts == 1:
            numpy.matmul(a, b, out=out)
        else:
            _run_tasks(_product_blocks(a, b, out, parts))
    return out


def _product_blocks(a, b, out, parts: int) -> list:
    """``out = a @ b`` as ``parts`` tasks, each the product of one block of the result's longer
    side: both halves then keep BLAS's blocking efficient."""
    if b.shape[1] >= a.shape[0]:
        return [_product_task(a, b[:, start:stop], out[:, start:stop]) for start, stop in _bounds(b.shape[1], parts)]
    return [_product_task(a[start:stop], b, out[start:stop]) for start, stop in _bounds(a.shape[0], parts)]


def _product_task(a, b, out):
    return lambda: numpy.matmul(a, b, out=out)


def products_at_once(products: list) -> bool:
    """Whether :func:`matmuls` runs these ``(a, b, out)`` products at once (else one by one)."""
    flops = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b, _ in products)
    return bool(_blas()) and flops >= MIN_SPLIT_FLOPS and _splittable(len(products), MIN_SPLIT_ELEMENTS)


def matmuls(products) -> None:
    """``out = a @ b`` for every ``(a, b, out)`` of ``products``, independent products of 2-D
    arrays, at once: each is one task (or, with more threads than products, blocks of it, as
    :func:`matmul` cuts one), the threads take the tasks, each task on one BLAS thread.

    A layer's weight and input gradients so cost one wake-up of the threads instead of two, and
    each product stays one BLAS call instead of two halves. Products of fewer floating-point
    operations in all than ``MIN_SPLIT_FLOPS`` run one after the other.
    """
    products = list(products)
    if not products_at_once(products):
        for a, b, out in products:
            matmul(a, b, out)
        return
    blocks_each = max(1, thread_count() // len(products))
    with _OneBlasThread():
        _run_tasks([task for a, b, out in products for task in _product_blocks(a, b, out, blocks_each)])
