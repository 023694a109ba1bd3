"""Checks run inside an ``mpiexec -n 2`` job by tests/test_distributed.py; rank 0 prints one JSON line.

``python tests/distributed_worker.py equivalence``: 20 data-parallel steps of the default model with
dropout and crop-flip augmentation, in float64 and float32, against the same run in one process.
``staged``: the MPI communicator on stand-in device arrays (host copies), and the choice of
communicator for a CUDA backend with and without NCCL (a recording double for ``cupy.cuda.nccl``).
``gpu``: the MPI communicator on real CuPy arrays, a one-rank NCCL communicator on the real GPU.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy

from cnn_backend.augment import RandomCropFlip
from cnn_backend.backend import cuda_nccl, get_backend
from cnn_backend.data import BatchLoader, load_fashion_mnist, prepare_images
from cnn_backend.distributed import (
    MpiCommunicator,
    NcclCommunicator,
    SingleProcess,
    bind_device,
    broadcast_parameters,
    communicator_for_backend,
    flat_parameters,
    world_communicator,
)
from cnn_backend.model import plain_cnn
from cnn_backend.optim import make_optimizer
from cnn_backend.training import evaluate, fit, schedule_for_run, schedule_from_config

TRAIN, VALIDATION, BATCH, EPOCHS = slice(0, 80), slice(9500, 10000), 8, 2  # 10 steps per epoch


class CountingCommunicator:
    """Forwards to ``inner``, counting the gradient all-reduces and their sizes."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.rank, self.size, self.local_rank, self.is_root = inner.rank, inner.size, inner.local_rank, inner.is_root
        self.mean_calls: list[int] = []

    def allreduce_mean(self, array):
        self.mean_calls.append(int(array.size))
        return self.inner.allreduce_mean(array)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def train(backend, communicator, images, labels):
    model = plain_cnn(backend, seed=0, dropout=0.4)
    optimizer = make_optimizer("adam", model.parameters(), backend, lr=2e-3, weight_decay=1e-4)
    loader = BatchLoader(images[TRAIN], labels[TRAIN], backend, BATCH, seed=0, rank=communicator.rank, size=communicator.size)
    schedule = schedule_from_config(schedule_for_run("cosine", 2e-3, EPOCHS, len(loader)))
    validation = (prepare_images(images[VALIDATION], backend.dtype), labels[VALIDATION])
    history = fit(
        model, optimizer, loader, EPOCHS, validation=validation, schedule=schedule,
        augment=RandomCropFlip(backend, seed=0), log_every=3, communicator=communicator,
    )
    return model, [(row.val_loss, row.val_accuracy, row.train_loss, row.train_accuracy) for row in history]


def equivalence(world) -> dict:
    images, labels = load_fashion_mnist("train", "bundled")
    result, float64_reference = {}, None
    for dtype in ("float64", "float32"):
        backend = get_backend("cpu", dtype)
        counting = CountingCommunicator(world)
        model, history = train(backend, counting, images, labels)
        weights = model.state_dict()
        validation = (prepare_images(images[VALIDATION], backend.dtype), labels[VALIDATION])
        sharded = evaluate(model, *validation, 100, communicator=world)
        # Every rank ends with the same weights (compared through rank 0's copy).
        flat = numpy.concatenate([weights[name].ravel() for name in sorted(weights)])
        root_flat = world.broadcast(flat.copy())
        entry = {"ranks_differ": float(numpy.abs(flat - root_flat).max()), "allreduce_calls": len(counting.mean_calls),
                 "allreduce_sizes": sorted(set(counting.mean_calls))}
        if world.is_root:
            single = evaluate(model, *validation, 100)
            entry["sharded_validation"], entry["single_validation"] = sharded, single
            reference_model, reference_history = train(backend, SingleProcess(), images, labels)
            reference = reference_model.state_dict()
            differences = numpy.concatenate([numpy.abs(weights[k] - reference[k]).ravel() for k in reference])
            entry["max_difference"] = float(differences.max())
            entry["p99_difference"] = float(numpy.percentile(differences, 99))
            entry["history"], entry["reference_history"] = history, reference_history
            entry["parameters"] = int(sum(value.size for value in reference.values()))
            # The flat gradient buffer: every parameter plus the alignment padding between them.
            entry["flat_size"], entry["tensors"] = int(model.flat_grad.size), len(reference)
            if float64_reference is None:
                float64_reference = reference
            else:  # float32: how far one process's own rounding takes it from the float64 run
                rounding = numpy.concatenate([numpy.abs(reference[k] - float64_reference[k]).ravel() for k in reference])
                entry["float32_rounding"], entry["p99_float32_rounding"] = float(rounding.max()), float(numpy.percentile(rounding, 99))
        result[dtype] = entry
        world.barrier()
    return result


class RecordingNccl:
    """Stands in for ``cupy.cuda.nccl``: hands out an id on rank 0 and records what is called."""

    available = True
    NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 7, 8, 0

    def __init__(self) -> None:
        self.calls = []

    def get_unique_id(self):
        return (1, 2, 3)

    def NcclCommunicator(self, size, unique_id, rank):  # noqa: N802 (CuPy's name)
        self.calls.append(("init", size, tuple(unique_id), rank))
        calls = self.calls
        return SimpleNamespace(
            allReduce=lambda *args: calls.append(("allReduce",) + args[2:]),
            bcast=lambda *args: calls.append(("bcast",) + args[1:]),
        )


class FakeDeviceArray:
    """A contiguous array with a device pointer, as NCCL needs from a CuPy array."""

    def __init__(self, host) -> None:
        self.host = host
        self.flags, self.dtype, self.size, self.ndim = host.flags, host.dtype, host.size, host.ndim
        self.data = SimpleNamespace(ptr=12345)

    def __imul__(self, factor):
        self.host *= factor
        return self


def staged(world) -> dict:
    from cnn_backend.testing import is_device_array, standin_backend

    standin = standin_backend("float64")
    communicator, line = communicator_for_backend(world, standin)
    values = standin.to_device(numpy.arange(4.0) + 10.0 * world.rank)
    same = communicator.allreduce_mean(values)
    shared = communicator.broadcast(standin.to_device(numpy.full(3, float(world.rank) + 1.0)))
    result = {
        "line": line,
        "mean": standin.to_numpy(values).tolist(),
        "same_array": same is values and is_device_array(values),
        "broadcast": standin.to_numpy(shared).tolist(),
    }
    # Rank 1 starts from other parameters: it is given rank 0's, and rank 0 learns which rank differed.
    model = plain_cnn(standin, seed=world.rank)
    replaced = broadcast_parameters(model, communicator)
    flat = standin.to_numpy(flat_parameters(model))
    result["replaced"], result["parameters_equal"] = replaced, bool((world.broadcast(flat.copy()) == flat).all())
    result["equal_to_seed_0"] = bool((flat == standin.to_numpy(flat_parameters(plain_cnn(standin, seed=0)))).all())

    # A CUDA backend (a double: only the names the choice reads) with and without NCCL.
    runtime = SimpleNamespace(getDeviceCount=lambda: 2)
    cuda = SimpleNamespace(
        name="cuda", synchronize=lambda: None,
        xp=SimpleNamespace(cuda=SimpleNamespace(get_current_stream=lambda: SimpleNamespace(ptr=99), runtime=runtime)),
    )
    fallback, fallback_line = communicator_for_backend(world, cuda, nccl=SimpleNamespace(available=False))
    recording = RecordingNccl()
    nccl, nccl_line = communicator_for_backend(world, cuda, nccl=recording)
    array = FakeDeviceArray(numpy.ones(5, dtype=numpy.float32))
    nccl.allreduce_mean(array)
    nccl.broadcast(FakeDeviceArray(numpy.ones(2)), root=0)
    host = numpy.full(2, float(world.rank))
    nccl.allreduce_sum(host)  # host arrays go to MPI
    # Rank 0 on the CPU, rank 1 on a GPU (--device auto on unlike machines): MPI for both, no hang.
    mixed, mixed_line = communicator_for_backend(world, get_backend("cpu") if world.is_root else cuda, nccl=RecordingNccl())
    result["mixed_line"] = mixed_line
    runtime.getDeviceCount = lambda: 1  # both processes on one GPU: NCCL cannot have them
    shared, shared_line = communicator_for_backend(world, cuda, nccl=RecordingNccl())
    result.update(
        shared=type(shared).__name__, shared_line=shared_line,
        fallback=type(fallback).__name__, fallback_line=fallback_line, nccl=type(nccl).__name__, nccl_line=nccl_line,
        nccl_calls=[list(call) for call in recording.calls], scaled=array.host.tolist(), host_sum=host.tolist(),
    )
    return result


def gpu(world) -> dict:
    backend = get_backend("cuda", "float64")
    result = {"device": bind_device(backend, world.local_rank), "gpus": int(backend.xp.cuda.runtime.getDeviceCount())}
    staged_communicator = world.staging(backend)
    values = backend.to_device(numpy.arange(4.0) + 10.0 * world.rank)
    staged_communicator.allreduce_mean(values)
    result["staged_mean"] = backend.to_numpy(values).tolist()
    result["nccl_available"] = bool(cuda_nccl().available)
    if result["nccl_available"]:
        single = MpiCommunicator(world.comm.Split(world.rank, 0), backend)  # a one-rank NCCL group per process
        nccl = NcclCommunicator(single, backend)
        ones = backend.xp.ones(6, dtype=backend.xp.float32)
        nccl.allreduce_mean(ones)
        nccl.broadcast(ones)
        backend.synchronize()
        result["nccl_mean"] = backend.to_numpy(ones).tolist()
    # Training on the GPU through the communicator chosen for it, against one CPU process.
    communicator, result["line"] = communicator_for_backend(world, backend)
    images, labels = load_fashion_mnist("train", "bundled")
    model, _ = train(backend, communicator, images, labels)
    if world.is_root:
        reference, _ = train(get_backend("cpu", "float64"), SingleProcess(), images, labels)
        weights, expected = model.state_dict(), reference.state_dict()
        result["max_difference"] = max(float(numpy.abs(weights[k] - expected[k]).max()) for k in expected)
    return result


def main() -> None:
    world = world_communicator()
    assert isinstance(world, MpiCommunicator) and world.size == 2, "run me under mpiexec -n 2"
    result = {"equivalence": equivalence, "staged": staged, "gpu": gpu}[sys.argv[1]](world)
    if world.is_root:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
