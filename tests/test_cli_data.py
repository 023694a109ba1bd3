"""The command line on data other than Fashion-MNIST: a CIFAR-format folder end to end (train,
evaluate, predict) on the CPU and on the stand-in device, image folders, older checkpoints, and
bad input refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy
import pytest
from PIL import Image

from cnn_backend import cli
from cnn_backend.backend import get_backend
from cnn_backend.checkpoint import load_checkpoint
from cnn_backend.datasets import DATASETS
from cnn_backend.datasets.cifar import write_cifar_batch
from cnn_backend.model import seed_cnn
from cnn_backend.report import read_history
from cnn_backend.testing import standin_backend

from cli_helpers import one_error_line, run_main
from file_helpers import undecodable

CIFAR_NAMES = DATASETS["cifar10"].class_names


@pytest.fixture(autouse=True)
def no_downloaded_data(tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_BACKEND_DATA", str(tmp_path / "data-root"))


def make_cifar_folder(folder, per_batch=8, test_count=10):
    """CIFAR-10 binary batches whose classes differ in colour, so even one epoch learns something."""
    rng = numpy.random.default_rng(0)
    folder.mkdir(parents=True)

    def batch(count):
        labels = rng.integers(0, 10, size=count)
        images = rng.integers(0, 60, size=(count, 3, 32, 32)).astype(numpy.uint8)
        images[numpy.arange(count), labels % 3] += (20 * labels).astype(numpy.uint8)[:, None, None]
        return images, labels

    for index in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{index}.bin", *batch(per_batch))
    write_cifar_batch(folder / "test_batch.bin", *batch(test_count))
    return folder


def save_png(path, array):
    Image.fromarray(numpy.asarray(array, dtype=numpy.uint8)).save(path)
    return path


@pytest.fixture
def standin_device(monkeypatch):
    """``--device cuda`` gets the stand-in device: every array the command line touches is a device array."""
    import cnn_backend.backend as backend_module

    def device_lookup(device="auto", dtype="float32"):
        return standin_backend(dtype)

    monkeypatch.setattr(backend_module, "get_backend", device_lookup)
    monkeypatch.setattr(cli, "get_backend", device_lookup)


@pytest.mark.parametrize("where", ["cpu", "standin"])
def test_colour_data_end_to_end_train_evaluate_predict(where, tmp_path, capsys, request):
    if where == "standin":
        request.getfixturevalue("standin_device")
    device = ["--device", "cpu" if where == "cpu" else "cuda"]
    data = make_cifar_folder(tmp_path / "cifar")
    out = tmp_path / "run"
    status, stdout, err = run_main(
        capsys, "train", "--data", data, "--model", "seed", "--epochs", 1, "--batch-size", 8, "--normalize",
        "--augment", "crop-flip", "--out", out, "--quiet", "--no-plots", *device,
    )
    assert status == 0, err
    assert "input: 3x32x32 input, 10 classes, normalised per channel" in stdout
    assert "split: training on [0:32] (32 images), validating on [32:40] (8 images)" in stdout

    inputs = load_checkpoint(out / "last.npz").input_spec()
    assert inputs.recorded and inputs.input_shape == (3, 32, 32) and inputs.class_names == CIFAR_NAMES
    assert inputs.normalization is not None and inputs.normalization.channels == 3

    status, stdout, err = run_main(capsys, "evaluate", out / "last.npz", "--split", "test", *device)
    assert status == 0, err
    assert "evaluating on test [0:10] (10 images): the whole test split" in stdout and "airplane" in stdout
    report = json.loads((out / "last-test-evaluation.json").read_text())
    assert [row["name"] for row in report["per_class"]] == list(CIFAR_NAMES)

    first = save_png(tmp_path / "first.png", numpy.random.default_rng(1).integers(0, 256, (32, 32, 3)))
    second = save_png(tmp_path / "second.png", numpy.random.default_rng(2).integers(0, 256, (50, 40)))  # grey, other size
    status, stdout, err = run_main(capsys, "predict", out / "last.npz", first, second, "--top", 2, *device)
    assert status == 0 and err == "", err
    lines = stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [str(first), str(second)]
    for line in lines:
        shown = line.split(": ", 1)[1].split(", ")
        assert len(shown) == 2 and all(entry.rsplit(" ", 1)[0] in CIFAR_NAMES for entry in shown)

    # The Python function gives the same answer as the command line.
    from cnn_backend.predict import predict_images

    (first_prediction, _) = predict_images(out / "last.npz", [first, second], top=2)
    assert lines[0] == f"{first}: " + ", ".join(f"{name} {p:.1%}" for name, p in first_prediction.top)
    (alone,) = predict_images(out / "last.npz", str(first), top=2)  # one path, not a list of one
    assert [name for name, _ in alone.top] == [name for name, _ in first_prediction.top]
    numpy.testing.assert_allclose([p for _, p in alone.top], [p for _, p in first_prediction.top], rtol=1e-5)


def test_predict_reports_each_unusable_file_and_still_predicts_the_others(tmp_path, capsys):
    model_file = seed_cnn("cpu", seed=0).save(tmp_path / "model.npz")  # a plain model file: no input description
    good = save_png(tmp_path / "good.png", numpy.full((28, 28), 200))
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    status, stdout, err = run_main(capsys, "predict", model_file, text, good, folder, tmp_path / "missing.png", "--json")
    assert status == 2
    errors = [line for line in err.strip().splitlines() if "error" in line]
    assert errors == [
        f"cnn-backend: error: {text}: not an image Pillow recognises",
        f"cnn-backend: error: {folder}: a directory, not an image file",
        f"cnn-backend: error: {tmp_path / 'missing.png'}: no such file",
    ]
    document = json.loads(stdout)
    assert document["assumed_input"] is True
    results = document["predictions"]
    assert [("error" in entry) for entry in results] == [True, False, True, True]
    assert results[1]["top"][0]["class"] in DATASETS["fashion-mnist"].class_names  # an older file: Fashion-MNIST names
    probabilities = [entry["probability"] for entry in results[1]["top"]]
    assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1


def test_older_model_files_get_fashion_mnist_names(tmp_path, capsys):
    model_file = seed_cnn("cpu", seed=0).save(tmp_path / "model.npz")
    good = save_png(tmp_path / "good.png", numpy.full((10, 12, 3), 90))  # colour, any size: converted to 28x28 grey
    status, stdout, err = run_main(capsys, "predict", model_file, good, "--top", 10)
    assert status == 0
    assert "assumed" in err and "1x28x28 input, 10 classes" in err
    names = [entry.rsplit(" ", 1)[0] for entry in stdout.split(": ", 1)[1].strip().split(", ")]
    assert sorted(names) == sorted(DATASETS["fashion-mnist"].class_names)


def make_image_folder(root, per_class=6):
    rng = numpy.random.default_rng(3)
    for label, name in enumerate(("circle", "square", "triangle")):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            size = (12, 12) if index else (15, 9)  # one odd size per class: resized to the common 12x12
            save_png(root / name / f"{index}.png", rng.integers(0, 80, (*size, 3)) + 60 * label)
    (root / "square" / "broken.png").write_bytes(b"not really a png")
    return root


def train_seed_on(capsys, root, out) -> str:
    """One epoch of the seed model on the image folder ``root`` into ``out``; returns its stdout."""
    status, stdout, err = run_main(capsys, "train", "--data", root, "--model", "seed", "--epochs", 1, "--batch-size", 4,
                                   "--device", "cpu", "--out", out, "--quiet", "--no-plots")
    assert status == 0, err
    return stdout


def test_image_folder_trains_with_a_stratified_hold_out_and_evaluates_it(tmp_path, capsys):
    root = make_image_folder(tmp_path / "shapes")
    out = tmp_path / "run"
    stdout = train_seed_on(capsys, root, out)
    assert "note: " in stdout and "square/broken.png" in stdout
    assert "validating on a stratified 0.2 hold-out of every class (3 images, seed 0)" in stdout
    settings = load_checkpoint(out / "last.npz").settings
    assert settings["val_fraction"] == 0.2 and settings["val_split"] is None
    status, stdout, err = run_main(capsys, "evaluate", out / "last.npz", "--device", "cpu")
    assert status == 0, err
    assert "hold-out (3 images): the checkpoint's stratified 0.2 hold-out (seed 0)" in stdout and "triangle" in stdout

    status, _, err = run_main(capsys, "evaluate", out / "last.npz", "--device", "cpu", "--split", "test")
    assert status == 2
    one_error_line(err, "no test split", "(--split train, the default)")


def test_evaluate_reads_the_image_cache_that_train_wrote(tmp_path, capsys):
    """train leaves channels and size out, evaluate names the recorded ones: the same pixels, one entry."""
    root = make_image_folder(tmp_path / "shapes")
    out = tmp_path / "run"
    assert "(cached)" not in train_seed_on(capsys, root, out)
    entries = sorted((tmp_path / "data-root" / "image-folders").iterdir())
    assert len(entries) == 1
    status, stdout, err = run_main(capsys, "evaluate", out / "last.npz", "--device", "cpu")
    assert status == 0, err
    assert f"data: image folder {root}: 18 images, 3 classes, 3x12x12 (cached)" in stdout
    assert sorted((tmp_path / "data-root" / "image-folders").iterdir()) == entries


def test_image_file_names_that_are_not_utf8_train_and_a_class_folder_so_named_is_refused(tmp_path, capsys):
    root = make_image_folder(tmp_path / "shapes")
    undecodable(root / "circle", b"caf\xe9.png", (root / "circle" / "1.png").read_bytes())
    undecodable(root / "square", b"bro\xffken.png", b"not really a png")
    for attempt in ("decoded", "cached"):  # capsys's stdout refuses what is not UTF-8, as a terminal's would
        stdout = train_seed_on(capsys, root, tmp_path / attempt)
        assert "image folder" in stdout and "19 images, 3 classes" in stdout, attempt
        assert "square/bro\ufffdken.png (not an image Pillow recognises)" in stdout, attempt
    assert "(cached)" in stdout

    png = save_png(tmp_path / "p.png", numpy.zeros((12, 12, 3)))
    undecodable(undecodable(root, b"caf\xe9"), b"a.png", png.read_bytes())
    status, _, err = run_main(capsys, "train", "--data", root, "--model", "seed", "--epochs", 1, "--device", "cpu",
                              "--out", tmp_path / "refused", "--quiet", "--no-plots")
    assert status == 2
    one_error_line(err, f"{root}/caf\ufffd: the class folder's name is not valid UTF-8; rename it")


def test_a_hold_out_is_not_evaluated_or_resumed_once_the_folder_changed(tmp_path, capsys):
    root = make_image_folder(tmp_path / "shapes")
    out = tmp_path / "run"
    train_seed_on(capsys, root, out)
    # One more picture: the stratified draw over the new order could move training images into the hold-out.
    (root / "circle" / "0.png").rename(root / "circle" / "extra.png")
    save_png(root / "circle" / "0.png", numpy.full((12, 12, 3), 7))
    status, _, err = run_main(capsys, "evaluate", out / "last.npz", "--device", "cpu")
    assert status == 2
    one_error_line(err, f"{root}: the images changed since {out / 'last.npz'} was trained (files added, removed, renamed or replaced), "
                        "so its hold-out would now take images it trained on; pass --range START:STOP")  # no test split to name
    status, _, err = run_main(capsys, "train", "--resume", out / "last.npz", "--epochs", 2, "--device", "cpu", "--quiet")
    assert status == 2
    one_error_line(err, "the images changed since", "resume on the same files, or start a new run")
    assert run_main(capsys, "evaluate", out / "last.npz", "--device", "cpu", "--range", "0:5")[0] == 0
    (root / "circle" / "extra.png").replace(root / "circle" / "0.png")  # the same files again
    assert run_main(capsys, "evaluate", out / "last.npz", "--device", "cpu")[0] == 0


def test_a_renamed_class_folder_is_refused_by_evaluate_and_resume_instead_of_scored_against_other_classes(tmp_path, capsys):
    root = make_image_folder(tmp_path / "shapes")
    out = tmp_path / "run"
    train_seed_on(capsys, root, out)
    (root / "circle").rename(root / "zcircle")  # sorted, the folders now give labels square 0, triangle 1, zcircle 2
    expected = ("names its classes differently from the model: class 0 is 'square' there but 'circle' for the model, "
                "so its labels would score the wrong classes; pass data with the model's classes (circle, square, triangle)")
    for command in (["evaluate", out / "last.npz", "--range", "0:5"], ["train", "--resume", out / "last.npz", "--epochs", 2]):
        status, _, err = run_main(capsys, *command, "--device", "cpu")
        assert status == 2
        one_error_line(err, f"--data {root}", expected)
    (root / "square").rename(root / "acircle")  # another name, not another order
    status, _, err = run_main(capsys, "evaluate", out / "last.npz", "--range", "0:5", "--device", "cpu")
    assert status == 2 and "class 0 is 'acircle' there but 'circle'" in err and "another order" not in err
    (root / "acircle").rename(root / "square")
    (root / "zcircle").rename(root / "circle")
    assert run_main(capsys, "evaluate", out / "last.npz", "--range", "0:5", "--device", "cpu")[0] == 0


def test_a_range_run_is_not_evaluated_or_resumed_on_its_ranges_once_the_folder_changed(tmp_path, capsys):
    root = make_image_folder(tmp_path / "shapes")
    out = tmp_path / "run"
    status, _, err = run_main(capsys, "train", "--data", root, "--model", "seed", "--epochs", 1, "--batch-size", 4, "--train-split", ":12",
                              "--val-split", "12:18", "--device", "cpu", "--out", out, "--quiet", "--no-plots")
    assert status == 0, err
    save_png(root / "circle" / "00.png", numpy.full((12, 12, 3), 7))  # sorts first: every later index moves by one
    status, _, err = run_main(capsys, "evaluate", out / "last.npz", "--device", "cpu")
    assert status == 2
    one_error_line(err, f"{root}: the images changed since {out / 'last.npz'} was trained", "so its validation range would now hold other images")
    status, _, err = run_main(capsys, "train", "--resume", out / "last.npz", "--epochs", 2, "--device", "cpu", "--quiet")
    assert status == 2
    one_error_line(err, "the images changed since", "so its ranges would now mix training and validation images")
    assert run_main(capsys, "evaluate", out / "last.npz", "--device", "cpu", "--range", "12:18")[0] == 0  # asked for: as given
    (root / "circle" / "00.png").unlink()
    assert run_main(capsys, "evaluate", out / "last.npz", "--device", "cpu")[0] == 0


def test_an_architecture_file_named_another_way_resumes_its_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.toml").write_text('[[layers]]\ntype = "Flatten"\n\n[[layers]]\ntype = "FullyConnected"\nout_features = 10\n')
    (tmp_path / "other.toml").write_text((tmp_path / "net.toml").read_text())
    common = ("--device", "cpu", "--quiet", "--no-plots")
    status, _, err = run_main(capsys, "train", "--model", "net.toml", "--epochs", 1, "--train-split", ":256", "--val-split", "9000:9128", "--out", "run", *common)
    assert status == 0, err
    for epochs, named in ((2, "./net.toml"), (3, tmp_path / "net.toml")):
        status, _, err = run_main(capsys, "train", "--resume", "run/last.npz", "--model", named, "--epochs", epochs, *common)
        assert status == 0, err
    status, _, err = run_main(capsys, "train", "--resume", "run/last.npz", "--model", "other.toml", "--epochs", 4, *common)
    assert status == 2
    one_error_line(err, "net.toml, so --model other.toml cannot resume it")


def test_class_names_are_compared_only_where_the_files_store_them(tmp_path):
    import shutil

    from cnn_backend.datasets import load_dataset
    from cnn_backend.datasets.base import DataError
    from cnn_backend.datasets.sources import BUNDLED_DIR
    from cnn_backend.inputs import InputSpec

    idx = tmp_path / "idx"  # a folder of IDX files: MNIST's, say, which store no class names
    shutil.copytree(BUNDLED_DIR, idx, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    folder_data = load_dataset(idx)
    assert folder_data.names_assumed and not load_dataset("bundled").names_assumed
    digits = InputSpec(DATASETS["mnist"].class_names, 1, (28, 28))
    digits.check(folder_data, "--data idx")  # a model trained with --data mnist, evaluated on the same files by path
    trained_on_folder = InputSpec.from_config(InputSpec.for_data(folder_data).config())  # as a checkpoint records it
    assert trained_on_folder.names_assumed
    trained_on_folder.check(load_dataset("bundled"), "--data bundled")
    with pytest.raises(DataError, match=r"names its classes differently from the model: class 0 is 'T-shirt/top' there but '0'"):
        digits.check(load_dataset("bundled"), "--data bundled")  # names both sides know still count
    assert "class_names_assumed" not in InputSpec.for_data(load_dataset("bundled")).config()  # only assumed names are marked in the file


def test_a_hold_out_run_resumes_only_on_its_own_hold_out_and_image_size(tmp_path, capsys):
    root = make_image_folder(tmp_path / "shapes")
    out = tmp_path / "run"
    train_seed_on(capsys, root, out)
    resume = ("train", "--resume", out / "last.npz", "--epochs", 2, "--device", "cpu", "--quiet", "--no-plots")
    for options, asked in [(("--seed", 5), "--seed 5"), (("--val-fraction", 0.5), "--val-fraction 0.5"),
                           (("--train-split", ":12", "--val-split", "12:"), "--train-split :12 and --val-split 12:")]:
        status, _, err = run_main(capsys, *resume, *options)
        assert status == 2
        one_error_line(err, f"last.npz validates on a 0.2 hold-out drawn with --seed 0, so {asked} cannot resume it: "
                            "the validation images would include ones it has trained on")
    # Images of another size are named as such, not as changed files.
    status, _, err = run_main(capsys, *resume, "--image-size", 16)
    assert status == 2
    one_error_line(err, "the model was trained on 3x12x12 images but --data", "has 3x16x16 ones")
    assert [row["epoch"] for row in read_history(out / "history.jsonl")] == [1]
    status, out, _ = run_main(capsys, *resume)
    assert status == 0 and "hold-out of every class (3 images, seed 0): as the checkpoint records" in out


def test_one_range_given_for_a_recipe_with_ranges_takes_the_rest_not_the_recipes_other_range(tmp_path, capsys):
    status, stdout, err = run_main(capsys, "train", "--model", "seed", "--data", "bundled", "--val-split", "0:1000", "--epochs", 1,
                                   "--device", "cpu", "--out", tmp_path / "run", "--no-plots")
    assert status == 0, err
    # The seed recipe's training range [0:5000] would hold the 1,000 validation images.
    assert "split: training on [1000:10000] (9,000 images), validating on [0:1000] (1,000 images)" in stdout
    assert "overlap" not in stdout


def test_a_run_validated_on_a_range_resumes_only_on_its_own_ranges(tmp_path, capsys):
    out = tmp_path / "run"
    status, _, err = run_main(capsys, "train", "--model", "seed", "--epochs", 1, "--train-split", ":256", "--val-split", "8000:8128",
                              "--device", "cpu", "--out", out, "--quiet", "--no-plots")
    assert status == 0, err
    resume = ("train", "--resume", out / "last.npz", "--epochs", 2, "--device", "cpu", "--quiet", "--no-plots")
    for options, asked in [(("--val-fraction", 0.1), "--val-fraction 0.1"), (("--val-split", "8000:8200"), "--val-split 8000:8200"),
                           (("--train-split", ":8100"), "--train-split :8100")]:
        status, _, err = run_main(capsys, *resume, *options)
        assert status == 2
        one_error_line(err, f"last.npz trains on :256 and validates on 8000:8128, so {asked} cannot resume it: its images would "
                            "change, and the validation ones could include images it has trained on")
    assert [row["epoch"] for row in read_history(out / "history.jsonl")] == [1]
    status, stdout, err = run_main(capsys, *resume, "--train-split", "0:256")  # the same images, written otherwise
    assert status == 0, err
    assert [row["epoch"] for row in read_history(out / "history.jsonl")] == [1, 2]
    # One range given: the other is the larger side left of the bundled 10,000, recorded with both ends.
    out = tmp_path / "rest"
    status, stdout, err = run_main(capsys, "train", "--model", "plain", "--epochs", 1, "--train-split", "9000:9064", "--device", "cpu",
                                   "--out", out, "--no-plots")
    assert status == 0, err
    assert ("split: training on [9000:9064] (64 images), validating on [0:9000] (9,000 images): --train-split as given, "
            "the other range the larger side it leaves of the 10,000 images available ([9064:10000] unused)\n") in stdout
    assert load_checkpoint(out / "last.npz").settings["val_split"] == "0:9000"
    status, _, err = run_main(capsys, "train", "--resume", out / "last.npz", "--epochs", 2, "--val-split", ":9000", "--device", "cpu", "--quiet", "--no-plots")
    assert status == 0, err


def test_image_folder_size_and_channels_options(tmp_path, capsys):
    root = make_image_folder(tmp_path / "shapes")
    out = tmp_path / "run"
    status, stdout, err = run_main(capsys, "train", "--data", root, "--model", "default", "--epochs", 1, "--channels", 1,
                                   "--image-size", "8x10", "--val-fraction", 0.4, "--device", "cpu", "--out", out, "--quiet", "--no-plots")
    assert status == 0, err
    assert "1x8x10 input, 3 classes" in stdout
    status, _, err = run_main(capsys, "train", "--resume", out / "last.npz", "--epochs", 2, "--image-size", "8x12", "--device", "cpu")
    assert status == 2
    one_error_line(err, "was trained with --image-size 8x10, so --image-size 8x12 cannot resume it (leave --image-size out")
    picture = save_png(tmp_path / "p.png", numpy.zeros((30, 30, 3)))
    status, stdout, _ = run_main(capsys, "predict", out / "last.npz", picture)
    assert status == 0 and stdout.split(": ")[1].split(" ")[0] in ("circle", "square", "triangle")


def test_images_too_small_for_the_network_suggest_image_size_only_when_it_would_help(tmp_path, capsys):
    root = tmp_path / "thumbnails"  # 6x6: the seed network's 6x6 kernel and its pooling leave nothing
    for name in ("light", "dark"):
        (root / name).mkdir(parents=True)
        for index in range(4):
            save_png(root / name / f"{index}.png", numpy.full((6, 6), 200 if name == "light" else 20))
    status, _, err = run_main(capsys, "train", "--data", root, "--model", "seed", "--epochs", 1, "--device", "cpu",
                              "--out", tmp_path / "run", "--quiet")
    assert status == 2
    one_error_line(err, "seed: layer 2 (MaxPool)", "the images are 6x6: pass --image-size 28 to resize them")
    assert not (tmp_path / "run").exists()
    # Sized by the user, or too small at any size (a 30x30 kernel): no suggestion.
    status, _, err = run_main(capsys, "train", "--data", root, "--model", "seed", "--image-size", 4, "--epochs", 1,
                              "--device", "cpu", "--out", tmp_path / "run", "--quiet")
    assert status == 2 and "--image-size 28" not in one_error_line(err, "seed: layer 0 (Convolution): kernel 6x6")
    root = make_image_folder(tmp_path / "shapes")  # 12x12
    spec = tmp_path / "wide.toml"
    spec.write_text('[[layers]]\ntype = "Convolution"\nout_channels = 4\nkernel_size = 30\n\n'
                    '[[layers]]\ntype = "Flatten"\n\n[[layers]]\ntype = "FullyConnected"\nout_features = 3\n')
    status, _, err = run_main(capsys, "train", "--data", root, "--model", spec, "--epochs", 1, "--device", "cpu",
                              "--out", tmp_path / "run", "--quiet")
    assert status == 2 and "--image-size" not in one_error_line(err, "kernel 30x30 is larger than its input 12x12")


BAD_COMMANDS = {
    "folder options on fixed-shape data": (["train", "--data", "bundled", "--channels", 3], "--channels and --image-size apply to folders of images only"),
    "two ways to choose validation": (["train", "--data", "bundled", "--val-fraction", 0.1, "--val-split", "9000:"], "--val-fraction and --train-split/--val-split"),
    "unknown data": (["train", "--data", "no-such-thing"], "no-such-thing: no such folder, and not a dataset name"),
    "a name not downloaded": (["train", "--data", "mnist"], "run `cnn-backend download mnist`"),
}


@pytest.mark.parametrize("case", list(BAD_COMMANDS))
def test_bad_data_options_are_refused_in_one_line(tmp_path, capsys, case):
    args, fragment = BAD_COMMANDS[case]
    status, _, err = run_main(capsys, *args, "--out", tmp_path / "run", "--device", "cpu", "--quiet")
    assert status == 2
    one_error_line(err, fragment)


def test_evaluating_on_data_of_another_shape_is_refused(tmp_path, capsys):
    data = make_cifar_folder(tmp_path / "cifar")
    out = tmp_path / "run"
    assert run_main(capsys, "train", "--data", data, "--model", "seed", "--epochs", 1, "--out", out, "--device", "cpu", "--quiet", "--no-plots")[0] == 0
    status, _, err = run_main(capsys, "evaluate", out / "last.npz", "--data", "bundled", "--device", "cpu")
    assert status == 2
    one_error_line(err, "the model was trained on 3x32x32 images but --data bundled (train) has 1x28x28 ones")
    status, _, err = run_main(capsys, "train", "--resume", out / "last.npz", "--epochs", 2, "--data", "bundled", "--device", "cpu", "--quiet")
    assert status == 2
    one_error_line(err, "trained on 3x32x32 images")


def test_download_takes_a_dataset_name(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "download_dataset", lambda name, directory: calls.append((name, directory)) or directory)
    status, stdout, _ = run_main(capsys, "download", "cifar10", "--data-dir", tmp_path / "c")
    assert status == 0 and calls == [("cifar10", tmp_path / "c")] and "CIFAR-10 (50,000 train, 10,000 test images) is ready in" in stdout
    status, _, err = run_main(capsys, "download", "imagenet")
    assert status == 2 and "invalid choice: 'imagenet'" in err


def test_a_checkpoint_from_before_input_descriptions_evaluates_and_predicts_as_fashion_mnist(tmp_path, capsys):
    out = tmp_path / "run"
    status, _, err = run_main(capsys, "train", "--model", "seed", "--data", "bundled", "--train-split", ":256", "--val-split",
                              "9000:9128", "--epochs", 1, "--device", "cpu", "--out", out, "--quiet", "--no-plots")
    assert status == 0, err
    # Rewrite the checkpoint as an earlier version wrote it: everything but the input description.
    with numpy.load(out / "last.npz") as archive:
        arrays = {key: archive[key] for key in archive.files if key != "__inputs__"}
    old = tmp_path / "old.npz"
    numpy.savez(old, **arrays)
    assert load_checkpoint(old).inputs is None

    status, stdout, err = run_main(capsys, "evaluate", old, "--device", "cpu")
    assert status == 0, err
    assert "assumed" in stdout and "Ankle boot" in stdout
    picture = save_png(tmp_path / "shoe.png", numpy.random.default_rng(0).integers(0, 256, (40, 40, 3)))
    status, stdout, err = run_main(capsys, "predict", old, picture, "--top", 1)
    assert status == 0 and "assumed" in err
    assert stdout.split(": ")[1].rsplit(" ", 1)[0] in DATASETS["fashion-mnist"].class_names


def test_an_architecture_file_trains_on_colour_data_and_must_match_the_class_count(tmp_path, capsys):
    resnet = Path(__file__).resolve().parent.parent / "examples" / "small-resnet.toml"
    data = make_cifar_folder(tmp_path / "cifar")
    out = tmp_path / "run"
    status, stdout, err = run_main(capsys, "train", "--data", data, "--model", resnet, "--epochs", 1, "--batch-size", 8,
                                   "--device", "cpu", "--out", out, "--quiet", "--no-plots")
    assert status == 0, err
    assert "3x32x32 input, 10 classes" in stdout
    assert load_checkpoint(out / "last.npz").input_spec().class_names == CIFAR_NAMES
    picture = save_png(tmp_path / "p.png", numpy.zeros((32, 32, 3)))
    assert run_main(capsys, "predict", out / "last.npz", picture)[0] == 0

    shapes = make_image_folder(tmp_path / "shapes")  # three classes; the file ends in ten outputs
    status, _, err = run_main(capsys, "train", "--data", shapes, "--model", resnet, "--epochs", 1, "--device", "cpu",
                              "--out", tmp_path / "other", "--quiet")
    assert status == 2
    one_error_line(err, "small-resnet.toml", "ends with 10 outputs but the data has 3 classes")


def test_built_in_networks_take_the_class_count_of_the_data(tmp_path, capsys):
    shapes = make_image_folder(tmp_path / "shapes")
    out = tmp_path / "run"
    status, _, err = run_main(capsys, "train", "--data", shapes, "--model", "default", "--epochs", 1, "--device", "cpu",
                              "--out", out, "--quiet", "--no-plots")
    assert status == 0, err
    checkpoint = load_checkpoint(out / "last.npz")
    model = checkpoint.build_model(get_backend("cpu"))
    assert model.output_shape == (3,) and tuple(model.input_shape) == (3, 12, 12)


def test_export_carries_the_recorded_class_names_and_normalisation(tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    data = make_cifar_folder(tmp_path / "cifar")
    out = tmp_path / "run"
    assert run_main(capsys, "train", "--data", data, "--model", "seed", "--epochs", 1, "--normalize", "--device", "cpu",
                    "--out", out, "--quiet", "--no-plots")[0] == 0
    status, stdout, err = run_main(capsys, "export", out / "last.npz", tmp_path / "model.onnx")
    assert status == 0, err
    assert "normalised in the graph" in stdout
    metadata = {entry.key: entry.value for entry in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert json.loads(metadata["class_names"]) == list(CIFAR_NAMES)
    # The graph normalises as training did: ONNX Runtime on [0, 1] images agrees with the model on prepared ones.
    checkpoint = load_checkpoint(out / "last.npz")
    inputs = checkpoint.input_spec()
    model = checkpoint.build_model(get_backend("cpu"))
    images = numpy.random.default_rng(5).integers(0, 256, (3, 3, 32, 32)).astype(numpy.uint8)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    (logits,) = session.run(None, {session.get_inputs()[0].name: (images / 255.0).astype(numpy.float32)})
    numpy.testing.assert_allclose(logits, model.predict_logits(inputs.prepare(images, "float32")), rtol=1e-4, atol=1e-4)


def test_a_hold_out_is_found_again_when_another_decoder_gives_other_pixels(tmp_path, capsys, monkeypatch):
    # Pillow versions resize some images one grey level apart: the hold-out is identified by the
    # files, so evaluate and --resume take the same files decoded another way.
    from cnn_backend.datasets import folder as image_folder

    root = make_image_folder(tmp_path / "shapes")
    out = tmp_path / "run"
    train_seed_on(capsys, root, out)
    monkeypatch.setenv("CNN_BACKEND_DATA", str(tmp_path / "another-cache"))  # decoded again, not read from the cache
    decode = image_folder.decode_image
    monkeypatch.setattr(image_folder, "decode_image", lambda *args: decode(*args) // 2 * 2)
    status, _, err = run_main(capsys, "evaluate", out / "last.npz", "--device", "cpu")
    assert status == 0, err
    status, _, err = run_main(capsys, "train", "--resume", out / "last.npz", "--epochs", 2, "--device", "cpu", "--quiet", "--no-plots")
    assert status == 0, err


def test_a_checkpoint_that_recorded_its_hold_out_by_pixels_still_evaluates(tmp_path, capsys):
    from cnn_backend.checkpoint import STATE_KEY
    from cnn_backend.cli.settings import data_digest
    from cnn_backend.datasets import load_dataset
    from cnn_backend.serialization import json_array

    root = make_image_folder(tmp_path / "shapes")
    out = tmp_path / "run"
    train_seed_on(capsys, root, out)
    by_pixels = data_digest(load_dataset(root), by_pixels=True)
    arrays = dict(numpy.load(out / "last.npz"))
    state = json.loads(str(arrays[STATE_KEY]))
    assert state["settings"]["holdout_of"] != by_pixels
    state["settings"]["holdout_of"] = by_pixels  # as written before image folders were identified by file names
    arrays[STATE_KEY] = json_array(state)
    numpy.savez(out / "older.npz", **arrays)
    status, _, err = run_main(capsys, "evaluate", out / "older.npz", "--device", "cpu")
    assert status == 0, err


def test_evaluating_another_folder_than_the_trained_one_says_so(tmp_path, capsys):
    root = make_image_folder(tmp_path / "shapes")
    out = tmp_path / "run"
    train_seed_on(capsys, root, out)
    other = make_image_folder(tmp_path / "other", per_class=4)
    status, _, err = run_main(capsys, "evaluate", out / "last.npz", "--device", "cpu", "--data", other)
    assert status == 2
    one_error_line(err, f"{other} is not the data {out / 'last.npz'} was trained on ({root}), so its hold-out would now take "
                        "images it trained on; pass --range START:STOP")
    assert run_main(capsys, "evaluate", out / "last.npz", "--device", "cpu", "--data", other, "--range", ":")[0] == 0


def test_a_path_that_cannot_be_looked_up_is_one_files_error_and_the_others_are_predicted(tmp_path, capsys):
    model_file = seed_cnn("cpu", seed=0).save(tmp_path / "model.npz")
    good = save_png(tmp_path / "good.png", numpy.full((28, 28), 200))
    too_long = tmp_path / ("a" * 300 + ".png")  # longer than a file name may be: the lookup itself fails
    status, stdout, err = run_main(capsys, "predict", model_file, too_long, good)
    assert status == 2
    errors = [line for line in err.strip().splitlines() if "error" in line]
    assert errors == [f"cnn-backend: error: {too_long}: cannot read (File name too long)"]
    assert stdout.startswith(f"{good}: ")


def test_file_names_that_are_not_utf8_print_with_a_replacement_character_and_valid_json(tmp_path, capsys):
    import os

    model_file = seed_cnn("cpu", seed=0).save(tmp_path / "model.npz")
    folder = os.fsencode(tmp_path)
    odd = os.fsdecode(folder + b"/bad\xffname.png")  # a Latin-1 name: a surrogate escape in Python
    save_png(Path(odd), numpy.full((28, 28), 200))
    missing = os.fsdecode(folder + b"/gone\xfe.png")
    status, stdout, err = run_main(capsys, "predict", model_file, odd, missing)
    assert status == 2
    assert stdout.startswith(f"{tmp_path}/bad\ufffdname.png: ") and "\udcff" not in stdout
    assert f"{tmp_path}/gone\ufffd.png: no such file" in err
    status, stdout, _ = run_main(capsys, "predict", model_file, odd, "--json")
    assert status == 0
    document = json.loads(stdout)
    assert document["predictions"][0]["path"] == f"{tmp_path}/bad\ufffdname.png"
    stdout.encode("utf-8")  # strict: no lone surrogate left


def test_a_model_that_takes_no_images_is_refused_by_predict_before_reading_them(tmp_path, capsys):
    from cnn_backend.spec import build_model

    vectors = build_model([{"type": "FullyConnected", "out_features": 4}], input_shape=(20,), backend="cpu", seed=0)
    model_file = vectors.save(tmp_path / "vectors.npz")
    good = save_png(tmp_path / "good.png", numpy.full((28, 28), 200))
    status, _, err = run_main(capsys, "predict", model_file, good)
    assert status == 2
    one_error_line(err, "the model takes feature vectors of 20 values, not 1- or 3-channel images: image files cannot be predicted with it")


def test_an_image_given_where_the_model_file_goes_says_the_model_comes_first(tmp_path, capsys):
    model_file = seed_cnn("cpu", seed=0).save(tmp_path / "model.npz")
    good = save_png(tmp_path / "good.png", numpy.full((28, 28), 200))
    status, _, err = run_main(capsys, "predict", good, model_file)
    assert status == 2
    one_error_line(err, f"{good}: an image, not a model file (.npz); the model file comes first on the command line")


def test_a_full_standard_output_is_named_as_such(tmp_path):
    import subprocess
    import sys

    model_file = seed_cnn("cpu", seed=0).save(tmp_path / "model.npz")
    good = save_png(tmp_path / "good.png", numpy.full((28, 28), 200))
    with open("/dev/full", "w") as full:
        finished = subprocess.run([sys.executable, "-m", "cnn_backend", "predict", str(model_file), str(good), "--device", "cpu"],
                                  stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert finished.returncode == 1
    assert finished.stderr.strip().splitlines()[-1] == "cnn-backend: error: cannot write standard output: No space left on device"
    assert "Exception ignored" not in finished.stderr


def test_an_evaluate_range_holding_training_images_gets_a_note(tmp_path, capsys):
    from cnn_backend.data import stratified_holdout

    root = make_image_folder(tmp_path / "shapes")  # 18 images, 6 of each class in order: a 0.2 hold-out of every class
    out = tmp_path / "run"
    train_seed_on(capsys, root, out)
    held_out = len(stratified_holdout(numpy.repeat([0, 1, 2], 6), 0.2, 0)[1])
    status, stdout, err = run_main(capsys, "evaluate", out / "last.npz", "--device", "cpu", "--range", ":")
    assert status == 0, err
    assert f"note: {18 - held_out} of the 18 images in --range : are ones the model trained on: its accuracy on them is optimistic" in stdout
    status, stdout, _ = run_main(capsys, "evaluate", out / "last.npz", "--device", "cpu")  # its own hold-out: no note
    assert status == 0 and "trained on" not in stdout


def test_evaluate_range_after_the_folder_shrank_gives_the_scores_without_the_note(tmp_path, capsys):
    root = make_image_folder(tmp_path / "shapes")
    out = tmp_path / "run"
    status, _, err = run_main(capsys, "train", "--data", root, "--model", "seed", "--epochs", 1, "--batch-size", 4,
                              "--train-split", ":12", "--val-split", "12:", "--device", "cpu", "--out", out, "--quiet", "--no-plots")
    assert status == 0, err
    for index in range(1, 6):  # a third of the images gone: the recorded ranges no longer fit
        (root / "triangle" / f"{index}.png").unlink()
    status, stdout, err = run_main(capsys, "evaluate", out / "last.npz", "--device", "cpu", "--range", ":")
    assert status == 0, err
    assert "trained on" not in stdout and "accuracy" in stdout
