"""Defects a user met on the command line: each is one line on stderr with what to do, or no
message at all where nothing is wrong."""

from __future__ import annotations

import re
import warnings

import numpy
import pytest
from PIL import Image

from cnn_backend import cli
from cnn_backend.datasets import load_dataset
from cnn_backend.datasets.base import DataError
from cnn_backend.model import seed_cnn

from cli_helpers import one_error_line, run_main

# Enough output units that the weights could not even be addressed (5.5 PiB), so the allocation
# fails whatever the machine's memory and overcommit policy.
HUGE_NETWORK = '[[layers]]\ntype = "Flatten"\n[[layers]]\ntype = "FullyConnected"\nout_features = 1000000000000\n'
TINY_BUNDLED = ["--device", "cpu", "--data", "bundled", "--train-split", ":64", "--val-split", "9000:9064", "--quiet", "--no-plots"]


@pytest.fixture(autouse=True)
def no_downloaded_data(tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_BACKEND_DATA", str(tmp_path / "data-root"))


def save_png(path, array):
    Image.fromarray(numpy.asarray(array, dtype=numpy.uint8)).save(path)
    return path


def make_image_folder(root, per_class=20):
    rng = numpy.random.default_rng(5)
    for label, name in enumerate(("a", "b", "c")):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            save_png(root / name / f"{index}.png", rng.integers(0, 80, (8, 8)) + 60 * label)
    return root


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """An image folder without a test split, and a one-epoch run of the seed model on it."""
    root = tmp_path_factory.mktemp("folder")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CNN_BACKEND_DATA", str(root / "data-root"))
        data = make_image_folder(root / "pictures")
        status = cli.main(["train", "--data", str(data), "--model", "seed", "--epochs", "1", "--device", "cpu",
                           "--out", str(root / "run"), "--quiet", "--no-plots"])
    assert status == 0
    return data, root / "run" / "last.npz"


# -- a network too large for memory ------------------------------------------------------------


def test_summary_of_a_network_too_large_for_memory_is_one_line(tmp_path, capsys):
    spec = tmp_path / "huge.toml"
    spec.write_text(HUGE_NETWORK)
    status, _, err = run_main(capsys, "summary", "--model", spec)
    assert status == cli.EXIT_USAGE  # the spec asks for the impossible: refused like any bad spec
    one_error_line(err, "layer 1 (FullyConnected): its parameters cannot be allocated (Unable to allocate", "make the layer smaller")


@pytest.mark.parametrize("size", [2**62, 2**63], ids=["array-too-big", "beyond-int64"])
def test_sizes_beyond_any_memory_name_the_layer_too(tmp_path, capsys, size):
    """NumPy refuses these with a ValueError of its own, not a MemoryError."""
    spec = tmp_path / "huge.toml"
    spec.write_text(HUGE_NETWORK.replace("1000000000000", str(size)))
    status, _, err = run_main(capsys, "summary", "--model", spec)
    assert status == cli.EXIT_USAGE
    one_error_line(err, "huge.toml: layer 1 (FullyConnected): its parameters cannot be allocated (", "make the layer smaller")
    status, _, err = run_main(capsys, "summary", "--model", "default", "--input-shape", "1,99999999999999999999,28")
    assert status == cli.EXIT_USAGE
    one_error_line(err, "has a size above 16,777,216; give the shape of one sample, e.g. 1,28,28")


def test_train_of_a_network_too_large_for_memory_is_one_line_and_leaves_no_folder(tmp_path, capsys, monkeypatch):
    spec = tmp_path / "huge.toml"
    spec.write_text(HUGE_NETWORK)
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(capsys, "train", "--model", spec, *TINY_BUNDLED)
    assert status == cli.EXIT_USAGE
    one_error_line(err, "layer 1 (FullyConnected): its parameters cannot be allocated (Unable to allocate", "make the layer smaller")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["huge.toml"]  # no runs/<date-time>


def test_memory_running_out_during_training_is_one_line_and_removes_the_new_folder(tmp_path, capsys, monkeypatch):
    import cnn_backend.cli.train as train_command

    def out_of_memory(*args, **options):
        raise MemoryError("Unable to allocate 12.0 GiB for an array with shape (4096, 786432) and data type float32")

    monkeypatch.setattr(train_command, "fit", out_of_memory)
    status, _, err = run_main(capsys, "train", "--model", "seed", *TINY_BUNDLED, "--out", tmp_path / "run")
    assert status == cli.EXIT_FAILED
    assert one_error_line(err) == (
        "cnn-backend: error: Unable to allocate 12.0 GiB for an array with shape (4096, 786432) and data type float32; "
        "try a smaller network, or a smaller --batch-size; no epoch finished, so no checkpoint was written"
    )
    assert not (tmp_path / "run").exists()


def test_memory_running_out_after_an_epoch_names_the_checkpoint_to_resume(tmp_path, capsys, monkeypatch):
    import cnn_backend.training as training

    original, last = training.train_step, tmp_path / "run" / "last.npz"

    def out_of_memory_in_epoch_2(*args, **options):
        if last.exists():
            raise MemoryError("Unable to allocate 12.0 GiB for an array")
        return original(*args, **options)

    monkeypatch.setattr(training, "train_step", out_of_memory_in_epoch_2)
    status, _, err = run_main(capsys, "train", "--model", "seed", *TINY_BUNDLED, "--epochs", 3, "--out", tmp_path / "run")
    assert status == cli.EXIT_FAILED
    assert one_error_line(err) == (
        f"cnn-backend: error: Unable to allocate 12.0 GiB for an array; try a smaller network, or a smaller --batch-size; "
        f"the last good checkpoint is {last} (epoch 1); resume with: cnn-backend train --resume {last}"
    )


@pytest.mark.parametrize(
    "argv, advice",
    [
        (["benchmark", "--quick", "--no-torch", "--no-memory", "--models", "seed", "--algorithms", "gemm"],
         "try a smaller network, or a smaller --train-batch-sizes and --infer-batch-sizes"),
        (["parity", "--device", "standin", "--steps", "1", "--batch-size", "2"], "try a smaller network, or a smaller --batch-size"),
    ],
)
def test_memory_running_out_names_the_commands_own_batch_option(tmp_path, capsys, monkeypatch, argv, advice):
    from cnn_backend.layers import FullyConnected

    def out_of_memory(*args, **options):
        raise MemoryError("Unable to allocate 12.0 GiB for an array")

    monkeypatch.setattr(FullyConnected, "forward", out_of_memory)
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(capsys, *argv)
    assert status == cli.EXIT_FAILED
    assert one_error_line(err) == f"cnn-backend: error: Unable to allocate 12.0 GiB for an array; {advice}"


def test_memory_running_out_in_a_command_without_batches_suggests_only_a_smaller_network():
    from cnn_backend.cli.console import failure

    status, message, _ = failure(MemoryError("Unable to allocate 12.0 GiB for an array"), "export")
    assert (status, message) == (cli.EXIT_FAILED, "Unable to allocate 12.0 GiB for an array; try a smaller network")


# -- evaluate --split test on a folder without one ---------------------------------------------


def test_evaluate_test_split_of_a_folder_without_one_names_evaluate_options(folder_run, capsys):
    data, checkpoint = folder_run
    status, _, err = run_main(capsys, "evaluate", checkpoint, "--split", "test", "--device", "cpu")
    assert status == 2
    line = one_error_line(err, f"{data}: no test split", "evaluate the checkpoint's validation images instead (--split train, the default)")
    assert "--val-fraction" not in line  # a train option: evaluate has none
    # The hint works: the default split evaluates the run's hold-out.
    status, stdout, err = run_main(capsys, "evaluate", checkpoint, "--split", "train", "--device", "cpu")
    assert status == 0, err
    assert "the checkpoint's stratified 0.2 hold-out" in stdout


def test_a_train_folder_without_a_test_folder_says_where_one_would_go(tmp_path):
    root = tmp_path / "pictures"
    make_image_folder(root / "train", per_class=2)
    with pytest.raises(DataError) as excinfo:
        load_dataset(root, "test")
    message = str(excinfo.value)
    assert message == (
        f"{root}: no test split (no test folder beside train); evaluate the checkpoint's validation images instead "
        f"(--split train, the default), or add {root / 'test'}/<class>/<images>"
    )


# -- summary of a built-in network -------------------------------------------------------------


def summary_table(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("model "))
    end = next(index for index, line in enumerate(lines) if line.startswith("total: "))
    return lines[start : end + 1]


def test_summary_of_plain_is_the_table_train_prints_with_the_recipes_dropout(tmp_path, capsys):
    status, summary, err = run_main(capsys, "summary", "--model", "plain")
    assert status == 0, err
    table = summary_table(summary)
    dropout = [line for line in table if re.match(r"\d+\s+Dropout\s", line)]
    assert len(dropout) == 1 and re.match(r"9\s+Dropout\s+rate=0\.4\s+128\s+0\s+0$", dropout[0]), table
    status, stdout, err = run_main(capsys, "train", "--model", "plain", *TINY_BUNDLED, "--epochs", 1, "--batch-size", 32,
                                   "--out", tmp_path / "run")
    assert status == 0, err
    assert summary_table(stdout) == table


def test_summary_of_a_built_in_network_for_a_flat_input_names_it(capsys):
    status, _, err = run_main(capsys, "summary", "--model", "plain", "--input-shape", "784")
    assert status == 2
    one_error_line(err, "plain: layer 0 (Convolution): expected a per-sample input of shape (C, H, W), got (784,)")


# -- predict: large images, non-finite checkpoints ---------------------------------------------


def test_an_image_over_pillows_warning_size_is_predicted_without_a_python_warning(tmp_path, capsys, monkeypatch):
    model_file = seed_cnn("cpu", seed=0).save(tmp_path / "model.npz")
    picture = save_png(tmp_path / "large.png", numpy.full((30, 30), 120))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # 900 pixels: over the warning size, under twice it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, stdout, err = run_main(capsys, "predict", model_file, picture)
    assert status == 0, err
    assert [str(warning.message) for warning in caught] == []
    assert stdout.startswith(f"{picture}: ") and "Warning" not in err

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # over twice the limit: still refused, in one line
    status, _, err = run_main(capsys, "predict", model_file, picture)
    assert status == 2
    errors = [line for line in err.splitlines() if line.startswith("cnn-backend: error: ")]  # besides the assumed-input note
    assert errors == [f"cnn-backend: error: {picture}: cannot decode (Image size (900 pixels) exceeds limit of 800 pixels, "
                      "could be decompression bomb DOS attack.)"]


def test_an_image_folder_over_pillows_warning_size_loads_without_a_python_warning(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "pictures", per_class=2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # 64 pixels an image
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_dataset(root, "train", cache=False)
    assert [str(warning.message) for warning in caught] == []
    assert data.images.shape == (6, 1, 8, 8) and not data.notes


def write_with(path, source, changes: dict):
    with numpy.load(source) as archive:
        arrays = {key: archive[key] for key in archive.files}
    for key, (index, value) in changes.items():
        arrays[key] = arrays[key].copy()
        arrays[key][index] = value
    numpy.savez(path, **arrays)
    return path


@pytest.mark.parametrize("command", ["predict", "evaluate", "export", "resume"])
def test_a_checkpoint_with_non_finite_parameters_is_refused_naming_the_first(folder_run, tmp_path, capsys, command):
    data, checkpoint = folder_run
    # NaN in the first layer's bias, infinity in the last layer's: the first in layer order is named.
    bad = write_with(tmp_path / "diverged.npz", checkpoint, {"param/0.bias": (0, numpy.nan), "param/4.bias": (1, numpy.inf)})
    picture = save_png(tmp_path / "p.png", numpy.zeros((8, 8)))
    args = {
        "predict": ["predict", bad, picture, "--device", "cpu"],
        "evaluate": ["evaluate", bad, "--device", "cpu"],
        "export": ["export", bad, tmp_path / "model.onnx"],
        "resume": ["train", "--resume", bad, "--epochs", 2, "--device", "cpu", "--quiet", "--no-plots"],
    }[command]
    status, stdout, err = run_main(capsys, *args)
    assert status == 2 and "nan%" not in stdout
    assert one_error_line(err) == (
        f"cnn-backend: error: {bad}: parameter 0.bias holds NaN or infinite values, so the model's outputs would too; "
        "use a checkpoint saved before the run diverged, or train again"
    )
    assert not (tmp_path / "model.onnx").exists()


def test_a_finite_checkpoint_still_predicts_and_resumes(folder_run, tmp_path, capsys):
    data, checkpoint = folder_run
    copy = tmp_path / "run" / "last.npz"
    copy.parent.mkdir()
    copy.write_bytes(checkpoint.read_bytes())
    picture = save_png(tmp_path / "p.png", numpy.zeros((8, 8)))
    status, stdout, err = run_main(capsys, "predict", copy, picture, "--device", "cpu")
    assert status == 0, err
    probabilities = [float(value) for value in re.findall(r" (\d+\.\d)%", stdout)]
    assert len(probabilities) == 3 and 99.8 <= sum(probabilities) <= 100.2
    status, _, err = run_main(capsys, "train", "--resume", copy, "--epochs", 2, "--device", "cpu", "--quiet", "--no-plots")
    assert status == 0, err
