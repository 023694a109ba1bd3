"""Data-parallel training: K processes compute the steps of one process.

The MPI cases start ``mpiexec -n 2`` in a subprocess with a hard timeout (a hang fails the test
instead of blocking the suite) and one BLAS thread per process. They are skipped with a reason
where mpi4py or ``mpiexec`` is missing (``pip install mpi4py mpich``).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy
import pytest

from cnn_backend.data import BatchLoader
from cnn_backend.distributed import (
    DistributedSetupError,
    MPI_INSTALL_HINT,
    GradientAverager,
    SingleProcess,
    average_buffers,
    device_index,
    check_processes_agree,
    launched_by_mpi,
    launcher_rank,
    world_communicator,
)
from cnn_backend.layers import Dropout
from cnn_backend.augment import RandomCropFlip
from cnn_backend.model import plain_cnn
from cnn_backend.testing import is_device_array, standin_backend

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"
# The one beside this Python first (the mpich wheel installs it into the virtual environment).
MPIEXEC = next((str(path) for path in [Path(sys.executable).parent / "mpiexec"] if path.is_file()), None) or shutil.which("mpiexec")
HAVE_MPI4PY = importlib.util.find_spec("mpi4py") is not None
needs_mpi = pytest.mark.skipif(
    MPIEXEC is None or not HAVE_MPI4PY, reason="needs mpi4py and an MPI runtime with mpiexec (pip install mpi4py mpich)"
)
#: hard limit of one mpiexec job; on a quiet 2-core machine each takes a few seconds
JOB_TIMEOUT = 120

#: a tiny run: 80 training images in global batches of 8 (10 steps per epoch), 500 for validation
#: (two chunks of 250, one per process), float64, dropout and crop-flip augmentation; a constant rate,
#: so that a run stopped after epoch 1 and resumed follows the schedule of the uninterrupted run; the
#: plain model, whose result does not depend on how the batch is shared (BatchNorm's statistics do)
TRAIN_ARGS = [
    "train", "--model", "plain", "--data", "bundled", "--train-split", ":80", "--val-split", "9500:10000", "--batch-size", "8",
    "--dtype", "float64", "--dropout", "0.4", "--augment", "crop-flip", "--device", "cpu", "--no-plots", "--quiet",
    "--log-every", "3", "--schedule", "constant", "--lr", "1e-3",
]


def job_environment() -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PMI_", "PMIX_", "OMPI_", "MPI_LOCAL", "MV2_"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def run_job(command: list[str], cwd: Path, timeout: float = JOB_TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``command`` in its own process group; past ``timeout`` the whole group is killed and the
    test fails (a hang)."""
    process = subprocess.Popen(
        command, cwd=cwd, env=job_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"{' '.join(command)} did not finish within {timeout} s (a hang): {stderr}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cnn_backend", *args]


def on_two_ranks(*args: str) -> list[str]:
    return [MPIEXEC, "-n", "2", *cli(*args)]


def weights(path: Path) -> dict:
    with numpy.load(path) as arrays:
        return {key: arrays[key] for key in arrays.files if key.startswith("param/")}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(numpy.abs(a[key] - b[key]).max()) for key in a)


def history(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def validation_numbers(rows: list[dict]) -> list[tuple]:
    # The loss to 12 digits: weights that differ in the 15th digit (float64 summation order) move
    # it in the last bits. Evaluating the same weights gives exactly equal numbers (worker test).
    return [(row["epoch"], float(f"{row['val_loss']:.12g}"), row["val_accuracy"]) for row in rows]


# -- in one process --------------------------------------------------------------------------------


def test_a_plain_run_is_one_process_and_never_imports_mpi4py():
    code = (
        "import sys; from cnn_backend import cli, distributed; "
        "world = distributed.world_communicator(); "
        "assert world.size == 1 and world.is_root and type(world).__name__ == 'SingleProcess'; "
        "assert 'mpi4py' not in sys.modules, 'mpi4py was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], env=job_environment(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_under_an_mpi_launcher_without_mpi4py_one_line_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # makes `import mpi4py` fail
    with pytest.raises(DistributedSetupError, match=r"mpi4py is not installed: install mpi4py .*pip install mpich"):
        world_communicator({"PMI_RANK": "0", "PMI_SIZE": "2"})
    # A launcher running a single process needs nothing.
    assert isinstance(world_communicator({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1"}), SingleProcess)
    assert launched_by_mpi({"PMIX_RANK": "3"}) and not launched_by_mpi({})
    # The job's rank, before mpi4py is imported; a rank among one machine's processes is not it.
    assert launcher_rank({"PMIX_RANK": "3"}) == 3 and launcher_rank({"OMPI_COMM_WORLD_RANK": "0"}) == 0
    assert launcher_rank({"MPI_LOCALRANKID": "1"}) is None and launcher_rank({}) is None


def test_without_mpi4py_a_command_other_than_train_under_a_launcher_of_several_is_refused_by_rank_0_alone(monkeypatch, capsys):
    from cnn_backend.cli import main

    monkeypatch.setitem(sys.modules, "mpi4py", None)  # makes `import mpi4py` fail
    for rank, said in (("0", True), ("1", False)):
        monkeypatch.setenv("PMI_RANK", rank)
        monkeypatch.setenv("PMI_SIZE", "2")
        assert main(["summary", "--model", "seed"]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err == ("cnn-backend: error: summary runs in one process: start it without mpiexec (train alone "
                                "shares its work among the processes of a job)\n" if said else "")
    monkeypatch.setenv("PMI_SIZE", "1")  # a launcher of one process: the command runs, and MPI is not started
    assert main(["summary", "--model", "seed"]) == 0 and "total: 1,257 parameters" in capsys.readouterr().out


def test_each_rank_takes_gpu_local_rank_modulo_the_device_count():
    assert [device_index(rank, 4) for rank in range(6)] == [0, 1, 2, 3, 0, 1]
    with pytest.raises(ValueError):
        device_index(0, 0)


def test_single_process_collectives_do_nothing():
    world, array = SingleProcess(), numpy.arange(3.0)
    assert world.allreduce_mean(array) is array and world.allreduce_sum(array) is array and world.broadcast(array) is array
    assert array.tolist() == [0.0, 1.0, 2.0] and world.broadcast_object({"a": 1}) == {"a": 1}


class GatheredFacts(SingleProcess):
    """A communicator whose ``allgather_object`` returns the given facts of every rank."""

    def __init__(self, everyone: list) -> None:
        self.everyone, self.size = everyone, len(everyone)

    def allgather_object(self, value):
        return self.everyone


class OtherRanksReceived(SingleProcess):
    """Rank ``rank`` of a job whose other ranks received the stop signals ``others`` (rank -> signal)."""

    def __init__(self, rank: int, size: int, others: dict) -> None:
        self.rank, self.size, self.is_root, self.others = rank, size, rank == 0, others
        self.exchanges = 0

    def allreduce_sum(self, array):
        self.exchanges += 1
        for rank, signum in self.others.items():
            array[rank] += signum
        return array


def test_agreed_stops_raise_on_every_rank_the_signal_of_the_lowest_rank_that_received_one():
    from cnn_backend.runfolder import AgreedStops, Interrupted

    quiet = OtherRanksReceived(0, 3, {})
    with AgreedStops(quiet) as stops:
        stops.agree()  # no signal anywhere: training goes on
    assert quiet.exchanges == 1

    with pytest.raises(Interrupted) as raised, AgreedStops(OtherRanksReceived(0, 3, {2: signal.SIGINT, 1: signal.SIGTERM})) as stops:
        stops.agree()
    assert (raised.value.description, raised.value.exit_status) == ("terminated by SIGTERM on rank 1 of 3", 143)

    with pytest.raises(Interrupted) as raised, AgreedStops(OtherRanksReceived(1, 3, {2: signal.SIGTERM})) as stops:
        stops._hold(signal.SIGINT, None)  # this rank's own signal, named plainly
        stops.agree()
    assert (raised.value.description, raised.value.exit_status) == ("interrupted", 130)


def test_agreed_stops_take_a_second_signal_at_once_and_one_held_past_the_last_collective_on_rank_0_alone():
    from cnn_backend.runfolder import AgreedStops, Interrupted

    with pytest.raises(Interrupted), AgreedStops(OtherRanksReceived(1, 2, {})) as stops:
        stops._hold(signal.SIGTERM, None)
        stops._hold(signal.SIGINT, None)  # a process held up outside the collectives still stops
    with pytest.raises(Interrupted):
        with AgreedStops(OtherRanksReceived(0, 2, {})) as stops:
            stops._hold(signal.SIGTERM, None)
    with AgreedStops(OtherRanksReceived(1, 2, {})) as stops:
        stops._hold(signal.SIGTERM, None)  # rank 1 has nothing left to do: rank 0 ends the job


def test_checked_collectives_run_the_check_before_each_array_collective():
    from cnn_backend.distributed import CheckedCollectives

    calls = []
    checked = CheckedCollectives(SingleProcess(), lambda: calls.append("check"))
    array = numpy.ones(3)
    checked.allreduce_sum(array), checked.allreduce_mean(array), checked.broadcast(array), checked.barrier()
    assert calls == ["check"] * 4 and checked.size == 1 and checked.is_root


def test_processes_started_differently_are_refused_naming_the_first_difference():
    from cnn_backend.cli.train import _run_facts

    images, labels = numpy.zeros((40, 1, 4, 4), numpy.uint8), numpy.arange(40) % 10
    model = plain_cnn("cpu", seed=0)
    settings = {"train_split": ":30", "seed": 0}
    same = _run_facts(settings, 50, None, images, labels, slice(0, 30), slice(30, 40), model)
    check_processes_agree(GatheredFacts([same, dict(same)]), same)  # alike: nothing said
    # The same command line over other data (--data auto finding another set on another machine).
    other_labels = labels.copy()
    other_labels[3] = 9
    other = _run_facts(settings, 50, None, images, other_labels, slice(0, 30), slice(30, 40), model)
    with pytest.raises(DistributedSetupError, match=r"^the processes were not started alike: rank 2 has training labels \(digest\) '[0-9a-f]{32}' where rank 0 has '[0-9a-f]{32}'; give every process the same command line and the same data$"):
        check_processes_agree(GatheredFacts([same, same, other]), same)
    shifted = _run_facts({**settings, "seed": 1}, 50, None, images, labels, slice(0, 30), slice(30, 40), model)
    with pytest.raises(DistributedSetupError, match=r"rank 1 has --seed 1 where rank 0 has 0;"):
        check_processes_agree(GatheredFacts([same, shifted]), same)


def test_each_rank_gets_its_contiguous_share_of_the_same_global_batches():
    images = numpy.arange(20, dtype=numpy.uint8).repeat(4).reshape(20, 1, 2, 2)
    labels = numpy.arange(20) % 10
    be = standin_backend("float64")
    whole = [be.to_numpy(y) for _, y in BatchLoader(images, labels, be, 8, seed=3).epoch(2)]
    shares = [[be.to_numpy(y) for _, y in BatchLoader(images, labels, be, 8, seed=3, rank=r, size=2).epoch(2)] for r in (0, 1)]
    for batch, (first, second) in enumerate(zip(*shares)):
        assert numpy.array_equal(numpy.concatenate([first, second]), whole[batch])
    # The last batch of 4 is shared 2 + 2; its shares say where they sit.
    assert [len(y) for y in shares[0]] == [4, 4, 2]
    last = BatchLoader(images, labels, be, 8, rank=1, size=2).share(2)
    assert (last.start, last.stop, last.total) == (2, 4, 4)


def test_a_batch_size_the_processes_do_not_divide_is_refused_naming_sizes_that_work():
    images, labels = numpy.zeros((20, 1, 2, 2), numpy.uint8), numpy.zeros(20, numpy.int64)
    with pytest.raises(ValueError, match=r"^the batch size 30 cannot be shared by 4 processes: choose a multiple of 4 \(28, 32\)$"):
        BatchLoader(images, labels, standin_backend(), 30, rank=0, size=4)
    with pytest.raises(ValueError, match=r"last batch of an epoch would hold 1 sample, fewer than the 2 processes: change the batch size or the number of samples, or leave the last batch out \(drop_last=True\)$"):
        BatchLoader(images[:17], labels[:17], standin_backend(), 8, rank=0, size=2)


def test_dropout_and_augmentation_draw_for_the_global_batch_and_apply_this_share():
    be = standin_backend("float64")
    x = be.to_device(numpy.random.default_rng(0).random((6, 5)))
    whole = be.to_numpy(Dropout(0.5, rng=7, backend=be).forward(x))
    parts = []
    for start, stop in ((0, 3), (3, 6)):
        layer = Dropout(0.5, rng=7, backend=be)
        layer.batch_share = (start, 6)
        parts.append(be.to_numpy(layer.forward(x[start:stop])))
    assert numpy.array_equal(numpy.concatenate(parts), whole)

    images = be.to_device(numpy.random.default_rng(1).random((6, 1, 8, 8)))
    whole = be.to_numpy(RandomCropFlip(be, seed=2)(images, 1, 4))
    parts = []
    for start, stop in ((0, 2), (2, 6)):
        augment = RandomCropFlip(be, seed=2)
        augment.set_batch_share((start, 6))
        parts.append(be.to_numpy(augment(images[start:stop], 1, 4)))
    assert numpy.array_equal(numpy.concatenate(parts), whole)


@pytest.mark.parametrize("bit_generator", [numpy.random.PCG64, numpy.random.PCG64DXSM, numpy.random.MT19937])
@pytest.mark.parametrize("buffered_half", [False, True])
def test_a_dropout_share_draws_its_rows_only_and_leaves_the_generator_where_the_whole_batch_would(bit_generator, buffered_half):
    # PCG64 skips the other processes' rows (a K-th of the draw); a generator that cannot, or whose
    # buffered 32-bit half a skip would drop, draws the whole batch: masks and final state agree either way.
    be = standin_backend("float64")
    x = be.to_device(numpy.random.default_rng(0).random((8, 3, 2, 2)))

    def layer():
        rng = numpy.random.Generator(bit_generator(11))
        if buffered_half:
            rng.integers(0, 10, dtype=numpy.int32)  # leaves half of a 64-bit draw buffered (PCG64)
        return Dropout(0.4, rng=rng, backend=be)

    whole = layer()
    expected = be.to_numpy(whole.forward(x))
    for steps in range(2):  # the second step continues from where the first left the stream
        parts, states = [], []
        for start, stop in ((0, 2), (2, 5), (5, 8)):
            share = layer()
            share.batch_share = (start, 8)
            for _ in range(steps):
                share.forward(x[start:stop])
            parts.append(be.to_numpy(share.forward(x[start:stop])))
            states.append(next_draws(share.rng))
        if steps:
            expected = be.to_numpy(whole.forward(x))
        assert numpy.array_equal(numpy.concatenate(parts), expected)
        assert all(numpy.array_equal(state, next_draws(whole.rng)) for state in states)


def test_a_dropout_share_of_a_pcg64_generator_draws_only_its_own_rows():
    class CountingGenerator:
        def __init__(self, rng):
            self.bit_generator, self._rng, self.drawn = rng.bit_generator, rng, 0

        def random(self, shape):
            self.drawn += math.prod(shape)
            return self._rng.random(shape)

    be = standin_backend("float64")
    layer = Dropout(0.5, rng=3, backend=be)
    layer.rng = CountingGenerator(layer.rng)
    layer.batch_share = (2, 8)
    layer.forward(be.to_device(numpy.ones((2, 5))))
    assert layer.rng.drawn == 2 * 5


def next_draws(rng):
    """The next draws of ``rng``, leaving it where it is: equal draws mean equal positions (a 32-bit
    draw first, which takes a buffered half where there is one)."""
    ahead = copy.deepcopy(rng)
    return [ahead.integers(0, 2**31, dtype=numpy.int32), *ahead.integers(0, 2**62, size=3)]


class RecordingCommunicator(SingleProcess):
    """Two processes holding identical gradients: the mean leaves them as they are."""

    size = 2

    def __init__(self) -> None:
        self.reduced = []

    def allreduce_mean(self, array):
        self.reduced.append(array)
        return array


def test_gradients_are_averaged_in_one_call_over_one_contiguous_device_buffer():
    be = standin_backend("float64")
    model = plain_cnn(be, seed=0)
    rng = numpy.random.default_rng(0)
    for param in model.parameters():
        param.grad = be.to_device(rng.standard_normal(param.data.shape))
    before = [be.to_numpy(p.grad) for p in model.parameters()]
    communicator = RecordingCommunicator()
    average = GradientAverager(model, communicator)
    average()
    average(weight=0.5)
    assert len(communicator.reduced) == 2
    buffer = communicator.reduced[-1]
    assert is_device_array(buffer) and buffer.ndim == 1 and buffer.size == sum(p.data.size for p in model.parameters())
    for param, expected in zip(model.parameters(), before):
        assert numpy.array_equal(be.to_numpy(param.grad), expected * 0.5)  # views of the buffer, unpacked in order
    # One process: nothing is packed or called.
    GradientAverager(model, SingleProcess())()


class HalvingCommunicator(SingleProcess):
    """Two processes, the other one holding zeros: the mean halves every value."""

    size = 2

    def __init__(self) -> None:
        self.calls = 0

    def allreduce_mean(self, array):
        self.calls += 1
        array *= 0.5
        return array


def test_running_statistics_are_averaged_over_the_processes_in_one_call():
    be = standin_backend("float64")
    buffers = {"3.running_mean": be.to_device(numpy.arange(4.0)), "3.running_var": be.to_device(numpy.full((2, 3), 8.0))}
    model = SimpleNamespace(backend=be, named_buffers=lambda: list(buffers.items()))
    communicator = HalvingCommunicator()
    average_buffers(model, communicator)
    assert communicator.calls == 1
    assert be.to_numpy(buffers["3.running_mean"]).tolist() == [0.0, 0.5, 1.0, 1.5]
    assert be.to_numpy(buffers["3.running_var"]).tolist() == [[4.0] * 3] * 2
    average_buffers(plain_cnn(be, seed=0), communicator)  # a model without buffers: nothing to do
    assert communicator.calls == 1


def test_integer_buffers_are_left_as_they_are_and_only_float_ones_averaged():
    be = standin_backend("float64")
    buffers = {
        "1.steps": be.to_device(numpy.array(7, dtype=numpy.int64)),  # a counter: the same on every rank
        "1.seen": be.to_device(numpy.array([True, False])),
        "3.running_mean": be.to_device(numpy.arange(4.0)),
    }
    model = SimpleNamespace(backend=be, named_buffers=lambda: list(buffers.items()))
    communicator = HalvingCommunicator()
    average_buffers(model, communicator)
    assert communicator.calls == 1
    assert be.to_numpy(buffers["3.running_mean"]).tolist() == [0.0, 0.5, 1.0, 1.5]
    assert buffers["1.steps"].dtype == numpy.int64 and int(be.to_numpy(buffers["1.steps"])) == 7
    assert be.to_numpy(buffers["1.seen"]).tolist() == [True, False]
    only_integers = SimpleNamespace(backend=be, named_buffers=lambda: [("1.steps", buffers["1.steps"])])
    average_buffers(only_integers, communicator)  # nothing to average: no call
    assert communicator.calls == 1 and int(be.to_numpy(buffers["1.steps"])) == 7


# -- under mpiexec -n 2 ----------------------------------------------------------------------------


def worker(mode: str, tmp_path: Path) -> dict:
    result = run_job([MPIEXEC, "-n", "2", sys.executable, str(WORKER), mode], tmp_path)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@needs_mpi
def test_two_ranks_end_with_the_weights_and_validation_of_one_process(tmp_path):
    result = worker("equivalence", tmp_path)
    for dtype, entry in result.items():
        assert entry["ranks_differ"] == 0.0, dtype  # every rank holds the same weights
        # One all-reduce per step (20 steps), always of every parameter at once.
        assert entry["allreduce_calls"] == 20 and entry["allreduce_sizes"] == [entry["flat_size"]], dtype
        assert 0 <= entry["flat_size"] - entry["parameters"] < 64 * entry["tensors"], dtype  # alignment padding only
        assert [row[1] for row in entry["history"]] == [row[1] for row in entry["reference_history"]], dtype
        # The same weights evaluated on two ranks and in one process: exactly the same numbers.
        assert entry["sharded_validation"] == entry["single_validation"], dtype
    float64, float32 = result["float64"], result["float32"]
    assert float64["max_difference"] < 1e-9
    # The weights agree to 1e-9, not bit for bit (the two halves of each batch sum are added after
    # the all-reduce), so the validation loss agrees to rounding, not exactly (the accuracy, exactly: above).
    for row, reference_row in zip(float64["history"], float64["reference_history"], strict=True):
        assert row[0] == pytest.approx(reference_row[0], rel=1e-12)
    # float32: the runs differ only in the order of the batch sums (two halves added after the
    # all-reduce). After 20 steps 99% of the weights differ by no more than one process's own
    # float32 run differs from its float64 run (both about 2e-8), within a factor 2. Adam divides by
    # sqrt(v), which scales rounding up where gradients are near zero: there a few weights drift
    # by up to 1e-4 in either comparison, as chance has it (a maximum, unlike the 99th percentile,
    # is no stable yardstick), and stay below half of one Adam step (lr 2e-3).
    assert float32["p99_difference"] <= 2 * float32["p99_float32_rounding"]
    assert float32["max_difference"] < 1e-3
    numpy.testing.assert_allclose(
        [row[0] for row in float32["history"]], [row[0] for row in float32["reference_history"]], rtol=1e-5
    )


#: a layer of one's own counting its training batches in an int64 buffer (left alone by the averaging)
COUNTED_LAYER = """
import numpy
from cnn_backend import register_layer
from cnn_backend.layers import Layer

@register_layer
class Counted(Layer):
    def __init__(self, *, backend=None):
        super().__init__(backend)
        self.buffers["steps"] = self.backend.to_device(numpy.zeros((), dtype=numpy.int64))

    def forward(self, x):
        if self.training:
            self.buffers["steps"] += 1
        return x

    def backward(self, dy):
        return dy
"""


@needs_mpi
def test_two_ranks_train_a_model_whose_only_buffer_is_an_integer_counter(tmp_path):
    (tmp_path / "counted.py").write_text(COUNTED_LAYER)
    (tmp_path / "counted.toml").write_text(
        '[[layers]]\ntype = "Convolution"\nout_channels = 2\nkernel_size = 3\n[[layers]]\ntype = "Counted"\n'
        '[[layers]]\ntype = "GlobalAvgPool"\n[[layers]]\ntype = "FullyConnected"\nout_features = 10\n'
    )
    result = run_job(on_two_ranks(
        "train", "--model", "counted.toml", "--import", "counted.py", "--data", "bundled", "--train-split", ":80",
        "--val-split", "9500:9600", "--batch-size", "8", "--epochs", "1", "--device", "cpu", "--no-plots", "--quiet", "--out", "run",
    ), tmp_path, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    with numpy.load(tmp_path / "run" / "last.npz") as arrays:
        steps = arrays["buffer/1.steps"]
    assert steps.dtype == numpy.int64 and int(steps) == 10  # 80 images in global batches of 8: each rank counted 10


@needs_mpi
def test_device_arrays_are_staged_through_host_copies_and_nccl_is_chosen_when_available(tmp_path):
    result = worker("staged", tmp_path)
    assert result["mean"] == [5.0, 6.0, 7.0, 8.0] and result["same_array"]  # (0..3 + 10..13) / 2, in place
    assert result["broadcast"] == [1.0, 1.0, 1.0]  # rank 0's values
    assert result["line"].endswith("gradients all-reduced by MPI through host copies of the device arrays")
    assert result["fallback"] == "MpiCommunicator" and "NCCL is not available" in result["fallback_line"]
    assert result["nccl"] == "NcclCommunicator" and "NCCL on the GPUs" in result["nccl_line"]
    # Rendezvous through MPI: rank 0's id reached both; then one in-place sum of 5 float32 values
    # on the current stream, scaled by 1/2 on the device, and a broadcast of 2 float64 values.
    assert result["nccl_calls"] == [["init", 2, [1, 2, 3], 0], ["allReduce", 5, 7, 0, 99], ["bcast", 2, 8, 0, 99]]
    assert result["scaled"] == [0.5] * 5 and result["host_sum"] == [1.0, 1.0]
    assert result["shared"] == "MpiCommunicator" and "processes share a GPU" in result["shared_line"]
    assert result["mixed_line"].endswith("on host arrays (not every process has a GPU)")
    assert result["replaced"] == [1] and result["parameters_equal"] and result["equal_to_seed_0"]


@needs_mpi
@pytest.mark.gpu
def test_on_a_gpu_device_arrays_are_reduced_and_training_matches_one_cpu_process(tmp_path):
    result = worker("gpu", tmp_path)
    assert result["device"] == 0  # rank 0, local rank 0
    assert result["staged_mean"] == [5.0, 6.0, 7.0, 8.0]
    if result["nccl_available"]:  # else CuPy lacks the NCCL library (pip install nvidia-nccl-cu12)
        assert result["nccl_mean"] == [1.0] * 6
    if result["gpus"] >= 2 and result["nccl_available"]:
        assert "NCCL on the GPUs" in result["line"], result["line"]
    else:  # two processes on one GPU (NCCL cannot have them), or no NCCL: MPI through host copies
        assert "gradients all-reduced by MPI through host copies" in result["line"], result["line"]
    # float64 on the GPU against the CPU: the kernels' own summation orders, 20 Adam steps.
    assert result["max_difference"] < 1e-6, result


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The runs the CLI tests compare, made once: one process; two ranks (rank 1 in another folder);
    two ranks stopped after epoch 1, then resumed by two ranks and by one process."""
    if MPIEXEC is None or not HAVE_MPI4PY:
        pytest.skip("needs mpi4py and an MPI runtime with mpiexec (pip install mpi4py mpich)")
    base = tmp_path_factory.mktemp("data-parallel")
    rank1_dir = base / "rank1-cwd"
    rank1_dir.mkdir()
    jobs = [
        (cli(*TRAIN_ARGS, "--epochs", "2", "--out", "one"), None),
        ([MPIEXEC, "-n", "1", *cli(*TRAIN_ARGS, "--epochs", "2", "--out", "two"), ":",
          "-n", "1", "-wdir", str(rank1_dir), *cli(*TRAIN_ARGS, "--epochs", "2", "--out", "two")], None),
        (on_two_ranks(*TRAIN_ARGS, "--epochs", "1", "--out", "half"), lambda: shutil.copytree(base / "half", base / "half-copy")),
        (on_two_ranks("train", "--resume", "half/last.npz", "--epochs", "2", "--device", "cpu", "--quiet", "--no-plots"), None),
        (cli("train", "--resume", "half-copy/last.npz", "--epochs", "2", "--device", "cpu", "--quiet", "--no-plots"), None),
    ]
    for command, after in jobs:
        result = run_job(command, base)
        assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
        (base / "outputs.txt").open("a").write(result.stdout)
        if after:
            after()
    return base


def test_two_ranks_write_the_run_of_one_process(runs):
    assert max_difference(weights(runs / "two" / "last.npz"), weights(runs / "one" / "last.npz")) < 1e-9
    assert validation_numbers(history(runs / "two" / "history.jsonl")) == validation_numbers(history(runs / "one" / "history.jsonl"))


def test_the_settings_record_the_number_of_processes(runs):
    from cnn_backend.checkpoint import load_checkpoint

    assert load_checkpoint(runs / "two" / "last.npz").settings["processes"] == 2
    assert load_checkpoint(runs / "one" / "last.npz").settings["processes"] == 1


def test_only_rank_0_writes_files_and_prints(runs):
    assert sorted(path.name for path in (runs / "two").iterdir()) == ["best.npz", "history.jsonl", "last.npz"]
    assert list((runs / "rank1-cwd").iterdir()) == []  # rank 1 ran there with the same relative --out
    outputs = (runs / "outputs.txt").read_text()
    assert outputs.count("distributed: 2 processes") == 3 and outputs.count("done:") == 5  # once per job


def test_a_two_rank_checkpoint_resumes_exactly_in_two_processes_and_in_one(runs):
    uninterrupted_two, uninterrupted_one = weights(runs / "two" / "last.npz"), weights(runs / "one" / "last.npz")
    resumed_two, resumed_one = weights(runs / "half" / "last.npz"), weights(runs / "half-copy" / "last.npz")
    assert max_difference(resumed_two, uninterrupted_two) == 0.0  # the same computation, step for step
    assert max_difference(resumed_one, uninterrupted_one) < 1e-9
    assert validation_numbers(history(runs / "half" / "history.jsonl")) == validation_numbers(history(runs / "one" / "history.jsonl"))
    assert validation_numbers(history(runs / "half-copy" / "history.jsonl")) == validation_numbers(history(runs / "one" / "history.jsonl"))


#: runs the command line with rank 1's training step number STEP replaced by FAULT (a Python statement)
INJECT_ON_RANK_1 = (
    "import math, os, signal, sys\n"
    "import cnn_backend.training as training\n"
    "original, calls = training.train_step, []\n"
    "def failing_step(*args):\n"
    "    calls.append(1)\n"
    "    if os.environ.get('PMI_RANK') == '1' and len(calls) == STEP:\n"
    "        FAULT\n"
    "    return original(*args)\n"
    "training.train_step = failing_step\n"
    "from cnn_backend.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def run_with_fault(fault: str, tmp_path: Path, step: int = 3) -> tuple[subprocess.CompletedProcess, float]:
    script = INJECT_ON_RANK_1.replace("FAULT", fault).replace("STEP", str(step))
    started = time.monotonic()
    result = run_job([MPIEXEC, "-n", "2", sys.executable, "-c", script, *TRAIN_ARGS, "--epochs", "2", "--out", "run"], tmp_path, timeout=60)
    return result, time.monotonic() - started


def error_lines(stderr: str, prefix: str = "cnn-backend: error:") -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(prefix)]


@needs_mpi
def test_an_exception_on_rank_1_ends_both_processes_with_one_line(tmp_path):
    result, elapsed = run_with_fault("raise RuntimeError('injected failure at step 3')", tmp_path)
    assert result.returncode != 0
    assert error_lines(result.stderr) == ["cnn-backend: error: rank 1 of 2: RuntimeError: injected failure at step 3"], result.stderr
    assert elapsed < 45
    assert "Traceback" not in result.stderr


@needs_mpi
def test_a_signal_to_rank_1_alone_ends_the_job_with_one_line_naming_it(tmp_path):
    # SIGTERM reaches rank 1 alone in epoch 2 (its 13th step of 10 per epoch); held until the step's
    # all-reduce, where rank 0 learns of it and reports it, naming the rank.
    result, elapsed = run_with_fault("os.kill(os.getpid(), signal.SIGTERM)", tmp_path, step=13)
    last = Path("run") / "last.npz"
    assert error_lines(result.stderr, prefix="cnn-backend: ") == [
        f"cnn-backend: terminated by SIGTERM on rank 1 of 2 during epoch 2; the last good checkpoint is {last} (epoch 1); "
        f"resume with: mpiexec -n 2 cnn-backend train --resume {last}"
    ], result.stderr
    assert result.returncode == 143 and elapsed < 9
    from cnn_backend.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / last).epoch == 1
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["best.npz", "history.jsonl", "last.npz"]


@needs_mpi
def test_a_signal_to_rank_1_alone_before_training_is_named_too(tmp_path):
    script = (
        "import os, signal, sys\n"
        "import cnn_backend.cli.train as train_command\n"
        "def stop_rank_1(name):\n"
        "    if name == 'start' and os.environ.get('PMI_RANK') == '1':\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "train_command.pause_point = stop_rank_1\n"
        "from cnn_backend.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    result = run_job([MPIEXEC, "-n", "2", sys.executable, "-c", script, *TRAIN_ARGS, "--epochs", "1", "--out", "run"], tmp_path, timeout=60)
    assert error_lines(result.stderr, prefix="cnn-backend: ") == ["cnn-backend: rank 1 of 2: terminated by SIGTERM"], result.stderr
    assert result.returncode == 143


@needs_mpi
def test_a_signal_to_one_rank_before_the_first_checkpoint_stops_every_rank_and_leaves_nothing(tmp_path):
    # The signal is held until the next collective, where the ranks agree to stop: rank 0 reports it
    # and removes its new folder, as one process would, without waiting for a grace period.
    result, elapsed = run_with_fault("os.kill(os.getpid(), signal.SIGTERM)", tmp_path, step=3)
    assert error_lines(result.stderr, prefix="cnn-backend: ") == [
        "cnn-backend: terminated by SIGTERM on rank 1 of 2 during epoch 1; no epoch finished, so no checkpoint was written"
    ], result.stderr
    assert result.returncode == 143 and elapsed < 9  # rank 1 alone would speak only after ten seconds
    assert not (tmp_path / "run").exists()


@needs_mpi
def test_a_usage_error_under_mpiexec_is_said_once(tmp_path):
    result = run_job(on_two_ranks("train", "--epochs", "0"), tmp_path, timeout=60)
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        "cnn-backend: error: argument --epochs: must be a positive integer, got '0'; see cnn-backend train --help"
    ], result.stderr


@needs_mpi
@pytest.mark.parametrize("command", [["summary", "--model", "seed"], ["evaluate", "missing.npz"]])
def test_commands_other_than_train_refuse_a_job_of_several_processes_in_one_line(tmp_path, command):
    # Each process would run the whole command: print the same lines and write the same files.
    result = run_job([MPIEXEC, "-n", "2", *cli(*command)], tmp_path, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert error_lines(result.stderr) == [
        f"cnn-backend: error: {command[0]} runs in one process: start it without mpiexec (train alone shares its work "
        "among the processes of a job)"
    ], result.stderr
    alone = run_job([MPIEXEC, "-n", "1", *cli("summary", "--model", "seed")], tmp_path, timeout=60)
    assert alone.returncode == 0 and "total: 1,257 parameters" in alone.stdout


@needs_mpi
def test_a_bad_option_on_rank_1_alone_ends_the_job_in_one_line(tmp_path):
    # Rank 0's command line is fine: it waits for rank 1 in a collective, so rank 1 must end the job.
    good = cli(*TRAIN_ARGS, "--epochs", "1", "--out", "run")
    started = time.monotonic()
    result = run_job([MPIEXEC, "-n", "1", *good, ":", "-n", "1", *good, "--bogus"], tmp_path, timeout=60)
    assert result.returncode == 2 and time.monotonic() - started < 30
    assert error_lines(result.stderr) == [
        "cnn-backend: error: rank 1 of 2: unrecognized arguments: --bogus; see cnn-backend train --help"
    ], result.stderr


@needs_mpi
@pytest.mark.parametrize("option, first_value, second_value", [("--epochs", "1", "2"), ("--log-every", "3", "1")])
def test_ranks_given_different_command_lines_are_refused_in_one_line(tmp_path, option, first_value, second_value):
    # --log-every too: it decides when the ranks all-reduce the logged losses
    first = cli(*TRAIN_ARGS, "--epochs", "1", "--out", "run", option, first_value)
    second = cli(*TRAIN_ARGS, "--epochs", "1", "--out", "run", option, second_value)
    result = run_job([MPIEXEC, "-n", "1", *first, ":", "-n", "1", *second], tmp_path, timeout=60)
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        f"cnn-backend: error: rank 0 of 2: the processes were not started alike: rank 1 has {option} {second_value} where "
        f"rank 0 has {first_value}; give every process the same command line and the same data"
    ], result.stderr
    assert not (tmp_path / "run").exists()


@needs_mpi
def test_a_killed_process_ends_the_job(tmp_path):
    result, elapsed = run_with_fault("os.kill(os.getpid(), signal.SIGKILL)", tmp_path)
    assert result.returncode != 0 and elapsed < 45
    assert not (tmp_path / "run" / "last.npz").exists()  # killed in epoch 1: no epoch finished


@needs_mpi
def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_that_step(tmp_path):
    # Rank 1's third batch loss is NaN: the all-reduced losses are NaN on every rank, so all stop
    # there together, and rank 0 reports it as one process would.
    result, elapsed = run_with_fault("loss, correct = original(*args); return loss * math.nan, correct", tmp_path)
    assert result.returncode == 1 and elapsed < 45
    assert error_lines(result.stderr) == [
        "cnn-backend: error: the loss became non-finite at epoch 1, step 3: lower the learning rate (or check the "
        "input data); parameters after this step are not usable; no epoch finished, so no checkpoint was written"
    ], result.stderr


@needs_mpi
def test_a_batch_size_two_ranks_cannot_share_is_refused_in_one_line(tmp_path):
    result = run_job(on_two_ranks(*TRAIN_ARGS, "--batch-size", "9", "--epochs", "1", "--out", "run"), tmp_path, timeout=60)
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        "cnn-backend: error: rank 0 of 2: the batch size 9 cannot be shared by 2 processes: choose a multiple of 2 (8, 10)"
    ], result.stderr
    assert not (tmp_path / "run" / "last.npz").exists()


@needs_mpi
def test_ctrl_c_through_mpiexec_leaves_the_last_complete_checkpoint(tmp_path):
    command = on_two_ranks(*TRAIN_ARGS, "--train-split", ":160", "--epochs", "30", "--out", "run")
    process = subprocess.Popen(
        command, cwd=tmp_path, env=job_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while not (tmp_path / "run" / "last.npz").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert process.poll() is None, "the run ended before its first checkpoint"
        process.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends mpiexec
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130
    # Rank 0 reports, even when the signal finds it waiting in a collective for a rank already stopped.
    lines = error_lines(stderr, prefix="cnn-backend: ")
    last = Path("run") / "last.npz"
    assert len(lines) == 1 and lines[0].startswith("cnn-backend: interrupted during epoch "), stderr
    assert lines[0].endswith(f"resume with: mpiexec -n 2 cnn-backend train --resume {last}"), stderr
    from cnn_backend.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(tmp_path / "run" / "last.npz")
    assert checkpoint.epoch >= 1 and len(history(tmp_path / "run" / "history.jsonl")) == checkpoint.epoch


@needs_mpi
def test_ctrl_c_while_rank_1_waits_to_report_its_error_ends_the_job_with_that_error(tmp_path):
    # Rank 1 alone lacks its data: it waits for rank 0 (in a collective) before it reports. A Ctrl-C
    # then ends the wait, not the process: it reports and ends the job instead of hanging in MPI_Finalize.
    good = cli(*TRAIN_ARGS, "--epochs", "1", "--out", "run")
    bad = [*good, "--data", str(tmp_path / "missing")]
    process = subprocess.Popen(
        [MPIEXEC, "-n", "1", *good, ":", "-n", "1", *bad], cwd=tmp_path, env=job_environment(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        time.sleep(12)  # both started, rank 0 waiting in a collective; rank 1 in its grace wait (30 s)
        assert process.poll() is None, process.communicate()
        started = time.monotonic()
        process.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends mpiexec
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert time.monotonic() - started < 15
    assert process.returncode == 2
    assert error_lines(stderr) == [f"cnn-backend: error: rank 1 of 2: {tmp_path / 'missing'}: no such folder, and not a dataset name "
                                   "(auto, bundled, fashion-mnist, mnist, kmnist, cifar10)"], stderr


@needs_mpi
def test_a_launcher_of_another_mpi_than_mpi4pys_is_refused_in_one_line(tmp_path):
    # Open MPI's mpirun with MPICH's mpi4py: each process would be a job of its own, K runs side by side.
    env = {**job_environment(), "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}
    result = subprocess.run(cli(*TRAIN_ARGS, "--epochs", "1", "--out", "run"), cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=JOB_TIMEOUT)
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        "cnn-backend: error: the launcher started 2 processes but MPI sees 1: mpi4py uses another MPI library than this "
        f"mpiexec; launch with the mpiexec of mpi4py's MPI ({MPI_INSTALL_HINT})"
    ], result.stderr
    assert not (tmp_path / "run").exists()


@needs_mpi
def test_mpi4py_without_a_loadable_mpi_library_is_one_line_per_process(tmp_path):
    env = {**job_environment(), "MPI4PY_LIBMPI": str(tmp_path / "libmpi-missing.so")}
    result = subprocess.run([MPIEXEC, "-n", "2", "-genv", "MPI4PY_LIBMPI", env["MPI4PY_LIBMPI"], *cli(*TRAIN_ARGS, "--epochs", "1")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # one per process (mpiexec may forward the two at once, on one line)
    assert result.stderr.count("cnn-backend: error: mpi4py cannot load an MPI library (") == 2, result.stderr
    alone = run_job([MPIEXEC, "-n", "1", "-genv", "MPI4PY_LIBMPI", env["MPI4PY_LIBMPI"], *cli("summary", "--model", "seed")], tmp_path)
    assert alone.returncode == 0  # one process: MPI is never loaded


@needs_mpi
def test_a_signal_to_rank_1_while_rank_0_draws_the_plots_changes_nothing(tmp_path):
    # The other ranks wait for rank 0 to finish in a collective, their handlers in place: SIGTERM to
    # rank 1 then no longer kills the job while rank 0 writes the plots.
    script = (
        "import os, signal, sys, time\n"
        "import cnn_backend.cli.train as train_command\n"
        "def plots(name):\n"
        "    if name == 'plots':\n"
        "        time.sleep(1.0)\n"
        "        with open('rank1.pid') as f: os.kill(int(f.read()), signal.SIGTERM)\n"
        "        time.sleep(1.0)\n"
        "train_command.pause_point = plots\n"
        "if os.environ.get('PMI_RANK') == '1':\n"
        "    open('rank1.pid', 'w').write(str(os.getpid()))\n"
        "from cnn_backend.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = [arg for arg in TRAIN_ARGS if arg != "--no-plots"]
    result = run_job([MPIEXEC, "-n", "2", sys.executable, "-c", script, *args, "--epochs", "1", "--out", "run"], tmp_path, timeout=90)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "history.jsonl").exists() and any(path.suffix == ".png" for path in (tmp_path / "run").iterdir())


COLLECTIVE_MISUSES = """
import numpy, sys
from cnn_backend.distributed import {communicator}
world = {communicator}()
ints = numpy.array([1, 2, 3])
for call, expected in [
    (lambda: world.allreduce_sum([1.0, 2.0]), "TypeError: allreduce_sum works in place on an array (NumPy or the device's), got list"),
    (lambda: world.allreduce_sum(numpy.float64(1.0)), "TypeError: allreduce_sum works in place on an array (NumPy or the device's), got float64"),
    (lambda: world.allreduce_mean(ints), "TypeError: allreduce_mean takes an array of floats, got int64; cast it first"),
    (lambda: world.allreduce_sum(numpy.zeros(3, bool)), "TypeError: allreduce_sum takes an array of numbers, got bool; cast it first"),
    (lambda: world.broadcast(numpy.zeros((2, 2))[:, 0]), "ValueError: broadcast needs a contiguous array (numpy.ascontiguousarray), got one of strides (16,)"),
]:
    try:
        call()
    except (TypeError, ValueError) as exc:
        assert f"{{type(exc).__name__}}: {{exc}}" == expected, (str(exc), expected)
    else:
        raise AssertionError(f"not refused: {{expected}}")
assert ints.tolist() == [1, 2, 3]  # refused before anything was changed
world.barrier()  # every rank got here: rank 0 says so
if world.rank == 0:
    print("refused alike", world.size)
"""


def test_a_single_process_refuses_the_collectives_a_job_would_refuse(tmp_path):
    result = run_job([sys.executable, "-c", COLLECTIVE_MISUSES.format(communicator="SingleProcess")], tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["refused alike 1"]


@needs_mpi
def test_mpi_communicators_refuse_misused_collectives_in_one_line_before_changing_anything(tmp_path):
    script = COLLECTIVE_MISUSES.format(communicator="MpiCommunicator")
    result = run_job([MPIEXEC, "-n", "2", sys.executable, "-c", script], tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["refused alike 2"]


@needs_mpi
@pytest.mark.parametrize("argument", ["--version", "--help"])
def test_help_and_version_under_mpiexec_are_shown_once(tmp_path, argument):
    result = run_job(on_two_ranks(argument), tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    first_line = result.stdout.splitlines()[0]
    assert result.stdout.count(first_line) == 1, result.stdout
