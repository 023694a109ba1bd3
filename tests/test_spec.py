"""Architecture specs: parsing, validation in one line naming the layer, shape inference, building,
the summary table, and the example files (each trained a few steps so they cannot rot)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from cnn_backend import Sequential, SpecError, build_model, default_cnn, get_backend, plain_cnn, seed_cnn
from cnn_backend.cli import main
from cnn_backend.layers import BatchNorm, Convolution, Residual, SoftmaxCrossEntropy
from cnn_backend.optim import Adam
from cnn_backend.spec import builtin_spec_path, normalize_spec, parse_spec_text, read_spec_file
from cnn_backend.summary import format_summary, summarize
from cnn_backend.training import train_step

from layer_helpers import import_example_layers

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
FASHION = (1, 28, 28)


def conv(out_channels, kernel_size, **options):
    return {"type": "Convolution", "out_channels": out_channels, "kernel_size": kernel_size, **options}


def dense(out_features, **options):
    return {"type": "FullyConnected", "out_features": out_features, **options}


# -- building and shape inference ---------------------------------------------------------------------


def test_toml_json_and_dict_give_the_same_model():
    toml_text = """
[[layers]]
type = "Convolution"
out_channels = 4
kernel_size = 3

[[layers]]
type = "Flatten"

[[layers]]
type = "FullyConnected"
out_features = 10
"""
    layers = [conv(4, 3), {"type": "Flatten"}, dense(10)]
    models = [
        build_model(parse_spec_text(toml_text), FASHION, seed=3),
        build_model(parse_spec_text(json.dumps({"layers": layers}), "json"), FASHION, seed=3),
        build_model({"layers": layers}, FASHION, seed=3),
        build_model(layers, FASHION, seed=3),
        Sequential.from_spec(layers, FASHION, seed=3),
    ]
    for model in models[1:]:
        for (name, p), (_, q) in zip(model.named_parameters(), models[0].named_parameters()):
            numpy.testing.assert_array_equal(p.data, q.data, err_msg=name)
    assert models[0].layers[2].in_features == 4 * 26 * 26
    assert models[0].output_shape == (10,)


def same_parameters(model, reference):
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        numpy.testing.assert_array_equal(p.data, q.data, err_msg=name)


@pytest.mark.parametrize("name", ["net.json", "NET.JSON", "net.toml", "Net.Toml"])
def test_a_spec_file_with_a_bom_or_an_upper_case_extension_is_read(tmp_path, capsys, name):
    """Windows editors write a UTF-8 BOM, and some tools upper-case extensions."""
    layers = [conv(4, 3), {"type": "Flatten"}, dense(10)]
    if name.lower().endswith(".json"):
        text = json.dumps({"layers": layers})
    else:
        text = '[[layers]]\ntype = "Convolution"\nout_channels = 4\nkernel_size = 3\n[[layers]]\ntype = "Flatten"\n' \
               '[[layers]]\ntype = "FullyConnected"\nout_features = 10\n'
    path = tmp_path / name
    path.write_text(text, encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_spec_file(path) == {"layers": layers}
    same_parameters(build_model(path, FASHION, seed=3), build_model(layers, FASHION, seed=3))
    status, out, err = run_main(capsys, "summary", "--model", path)
    assert status == 0 and "total: " in out, err


def test_other_extensions_are_still_refused(tmp_path):
    path = tmp_path / "net.yaml"
    path.write_text("layers: []")
    with pytest.raises(SpecError, match=r"net.yaml: an architecture file must end in .toml or .json$"):
        read_spec_file(path)


def test_numpy_scalars_in_a_python_spec_are_taken_as_numbers():
    """A spec built from arrays holds NumPy scalars; the normalised spec holds plain, JSON-ready numbers."""
    layers = [conv(numpy.int64(4), numpy.int32(3), stride=numpy.uint8(1)), {"type": "Dropout", "rate": numpy.float32(0.25)},
              {"type": "Flatten"}, dense(numpy.int16(10))]
    normalized = normalize_spec(layers)
    assert type(normalized["layers"][0]["out_channels"]) is int and type(normalized["layers"][1]["rate"]) is float
    json.dumps(normalized)
    plain = [conv(4, 3, stride=1), {"type": "Dropout", "rate": 0.25}, {"type": "Flatten"}, dense(10)]
    same_parameters(build_model(layers, FASHION, seed=3), build_model(plain, FASHION, seed=3))


def test_tuples_in_a_python_spec_are_taken_as_lists():
    """A spec built in Python may hold tuples where a file holds lists: the layer list and a block's."""
    layers = (conv(4, 3), {"type": "Residual", "layers": (conv(4, 3, padding=1), {"type": "ReLU"})}, {"type": "Flatten"}, dense(10))
    normalized = normalize_spec(layers)
    assert isinstance(normalized["layers"], list) and isinstance(normalized["layers"][1]["layers"], list)
    listed = [conv(4, 3), {"type": "Residual", "layers": [conv(4, 3, padding=1), {"type": "ReLU"}]}, {"type": "Flatten"}, dense(10)]
    assert normalized == normalize_spec(listed)
    same_parameters(build_model({"layers": layers}, FASHION, seed=1), build_model(listed, FASHION, seed=1))
    same_parameters(build_model(layers, FASHION, seed=1), build_model(listed, FASHION, seed=1))


def test_built_in_spec_entries_are_unchanged_and_a_subclass_s_follow_its_config_and_name():
    from cnn_backend.layers import FullyConnected, ReLU

    assert Convolution(2, 4, 3).spec() == conv(4, 3, stride=1, padding=0, bias=True, algorithm="auto", init="he")
    assert FullyConnected(3, 5).spec() == dense(5, init="he")
    assert BatchNorm(3).spec() == {"type": "BatchNorm", "momentum": 0.1, "eps": 1e-5}
    assert Residual([ReLU()]).spec() == {"type": "Residual", "layers": [{"type": "ReLU"}]}

    class Gained(Convolution):
        def __init__(self, out_channels, kernel_size, gain=1.0, *, in_channels=None, backend=None):
            super().__init__(in_channels, out_channels, kernel_size, backend=backend)
            self.gain = gain

        def config(self):  # without in_channels, an inferred size
            return {"out_channels": self.out_channels, "kernel_size": self.kernel_size, "gain": self.gain}

    assert Gained(4, 3, gain=2.0).spec() == {"type": "Gained", "out_channels": 4, "kernel_size": 3, "gain": 2.0}


@pytest.mark.parametrize("value", [numpy.float64(4.0), numpy.True_, True, 4.5])
def test_bools_and_non_integral_numbers_are_still_not_integers(value):
    with pytest.raises(SpecError, match=rf"^layer 0 \(Convolution\): out_channels must be an integer, got {re.escape(repr(value))}$"):
        normalize_spec([conv(value, 3)])


def test_sizes_are_inferred_through_every_layer_type():
    spec = [
        conv(8, 3, padding=1, bias=False), {"type": "BatchNorm"}, {"type": "LeakyReLU", "negative_slope": 0.2},
        {"type": "AvgPool", "pool_size": 2},
        {"type": "Residual", "layers": [conv(8, 3, padding=1), {"type": "GELU"}]},
        {"type": "Residual", "layers": [conv(16, 3, stride=2, padding=1), {"type": "Tanh"}]},
        {"type": "MaxPool", "pool_size": 3, "stride": 2}, {"type": "Sigmoid"}, {"type": "GlobalAvgPool"},
        dense(12), {"type": "BatchNorm"}, {"type": "ReLU"}, {"type": "Dropout", "rate": 0.1}, dense(10),
    ]
    model = build_model(spec, (3, 32, 32), seed=0)
    shapes = [layer.output_shape for layer in model.layers]
    assert shapes == [
        (8, 32, 32), (8, 32, 32), (8, 32, 32), (8, 16, 16), (8, 16, 16), (16, 8, 8), (16, 3, 3), (16, 3, 3),
        (16,), (12,), (12,), (12,), (12,), (10,),
    ]
    assert model.layers[4].projection is None and model.layers[5].projection.stride == 2
    assert isinstance(model.layers[10], BatchNorm) and model.layers[10].num_features == 12
    x = numpy.random.default_rng(0).random((2, 3, 32, 32), dtype=numpy.float32)
    assert model.forward(x).shape == (2, 10)


def test_the_config_a_model_stores_rebuilds_it():
    model = build_model(EXAMPLES / "small-resnet.toml", FASHION, seed=4)
    config = model.config()
    assert config["input_shape"] == [1, 28, 28] and config["name"] == "small-resnet"
    rebuilt = Sequential.from_config(json.loads(json.dumps(config)))
    assert [n for n, _ in rebuilt.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert [n for n, _ in rebuilt.named_buffers()] == [n for n, _ in model.named_buffers()]
    assert rebuilt.config() == config


def test_conv_algorithm_override_reaches_nested_convolutions():
    model = build_model(EXAMPLES / "small-resnet.toml", FASHION, algorithm="signal")
    algorithms = {layer.algorithm for _, layer in model.named_layers() if isinstance(layer, Convolution)}
    assert algorithms == {"signal", "auto"}  # the projections are created by build, with "auto"
    assert seed_cnn(algorithm="gemm").layers[0].algorithm == "gemm"


def test_built_in_networks_are_the_packaged_spec_files_and_the_examples_match_them():
    for name, build in (("seed", seed_cnn), ("default", default_cnn), ("plain", plain_cnn)):
        packaged = read_spec_file(builtin_spec_path(name))
        assert normalize_spec(read_spec_file(EXAMPLES / f"{name}.toml")) == normalize_spec(packaged)
        from_example, built_in = build_model(EXAMPLES / f"{name}.toml", FASHION, seed=5), build(seed=5)
        assert from_example.config() == built_in.config()
        for (parameter, p), (_, q) in zip(from_example.named_parameters(), built_in.named_parameters()):
            numpy.testing.assert_array_equal(p.data, q.data, err_msg=parameter)


# -- malformed specs: one line naming the layer and the problem ------------------------------------------

MALFORMED = {
    # name -> (file name, file text, fragments of the one error line)
    "toml-syntax": ("net.toml", '[[layers]]\ntype = "ReLU"\nout_channels = = 3\n', ["TOML syntax error", "line 3"]),
    "json-syntax": ("net.json", '{"layers": [{"type": "ReLU",}]}', ["JSON syntax error at line 1"]),
    "no-layers": ("net.toml", 'name = "empty"\n', ["the spec has no layers"]),
    "empty-layer-list": ("net.json", '{"layers": []}', ["the layer list is empty"]),
    "unknown-type": ("net.json", json.dumps([{"type": "Conv2d", "out_channels": 3}]), ["layer 0 (Conv2d): unknown layer type 'Conv2d'", "known types: Convolution"]),
    "missing-type": ("net.json", json.dumps([{"out_channels": 3}]), ["layer 0 (?): missing the layer type"]),
    "unknown-option": ("net.json", json.dumps([{"type": "Convolution", "out_channels": 3, "kernal_size": 3}]), ["layer 0 (Convolution): unknown option 'kernal_size'", "did you mean kernel_size?"]),
    "in-channels-written": ("net.json", json.dumps([conv(3, 3, in_channels=1)]), ["layer 0 (Convolution): unknown option 'in_channels'", "inferred from the input shape"]),
    "missing-required-option": ("net.json", json.dumps([{"type": "Flatten"}, {"type": "FullyConnected"}]), ["layer 1 (FullyConnected): missing required option 'out_features'"]),
    "wrong-value-type": ("net.json", json.dumps([conv(3, "3")]), ["layer 0 (Convolution): kernel_size must be an integer, got '3'"]),
    "bool-for-int": ("net.json", json.dumps([conv(3, True)]), ["layer 0 (Convolution): kernel_size must be an integer, got True"]),
    "value-out-of-range": ("net.json", json.dumps([conv(0, 3)]), ["layer 0 (Convolution): out_channels must be an integer >= 1, got 0"]),
    "bad-choice": ("net.json", json.dumps([conv(3, 3, algorithm="fast")]), ["layer 0 (Convolution): algorithm must be one of auto, gemm, signal"]),
    "kernel-larger-than-input": (
        "net.json",
        json.dumps([conv(4, 3), {"type": "MaxPool", "pool_size": 2}, {"type": "MaxPool", "pool_size": 2}, conv(8, 7), {"type": "Flatten"}, dense(10)]),
        ["layer 3 (Convolution): kernel 7x7 is larger than its input 6x6"],
    ),
    "residual-unfixable": (
        "net.json",
        json.dumps([{"type": "Residual", "layers": [conv(4, 3)]}, {"type": "GlobalAvgPool"}, dense(10)]),
        ["layer 0 (Residual): inner layers map (1, 28, 28) to (4, 26, 26), which no 1x1 projection"],
    ),
    "inner-layer-error": (
        "net.json",
        json.dumps([{"type": "Residual", "layers": [conv(4, 3, padding=1), conv(4, 31)]}, {"type": "GlobalAvgPool"}, dense(10)]),
        ["layer 0 (Residual) > layer 1 (Convolution): kernel 31x31 is larger than its input 28x28"],
    ),
    "residual-empty": ("net.json", json.dumps([{"type": "Residual", "layers": []}]), ["layer 0 (Residual): the layer list is empty"]),
    "wrong-number-of-classes": ("net.json", json.dumps([{"type": "Flatten"}, dense(5)]), ["layer 1 (FullyConnected): the network ends with 5 outputs but the data has 10 classes"]),
    "no-class-vector": ("net.json", json.dumps([conv(10, 3)]), ["layer 0 (Convolution): the network ends with shape (10, 26, 26)", "add Flatten"]),
    "dense-on-an-image": ("net.json", json.dumps([conv(4, 3), dense(10)]), ["layer 1 (FullyConnected): expected a flat per-sample input", "Flatten"]),
    "unknown-top-level-key": ("net.json", json.dumps({"layers": [{"type": "Flatten"}, dense(10)], "optimizer": "sgd"}), ["unknown top-level key 'optimizer'"]),
    "json-string-document": ("net.json", '"seed"', ["a spec is a table with a 'layers' list, got str"]),
    "json-null-document": ("net.json", "null", ["a spec is a table with a 'layers' list, got NoneType"]),
    "json-repeated-key": ("net.json", '[{"type": "Flatten"}, {"type": "FullyConnected", "out_features": 10, "out_features": 5}]',
                          ["JSON: the key 'out_features' appears twice in one table"]),
    "nan-slope": ("net.toml", '[[layers]]\ntype = "Flatten"\n[[layers]]\ntype = "LeakyReLU"\nnegative_slope = nan\n'
                  '[[layers]]\ntype = "FullyConnected"\nout_features = 10\n', ["layer 1 (LeakyReLU): negative_slope must be a finite number, got nan"]),
    "infinite-eps": ("net.json", json.dumps([{"type": "Flatten"}, {"type": "BatchNorm", "eps": 1e400}, dense(10)]),
                     ["layer 1 (BatchNorm): eps must be a finite number > 0, got inf"]),
    "layer-too-large-to-allocate": ("net.json", json.dumps([{"type": "Flatten"}, dense(10**11)]),
                                    ["layer 1 (FullyConnected): its parameters cannot be allocated", "make the layer smaller"]),
}


def run_main(capsys, *args) -> tuple[int, str, str]:
    status = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_spec_is_refused_before_training_in_one_line(tmp_path, capsys, case):
    name, text, fragments = MALFORMED[case]
    path = tmp_path / name
    path.write_text(text)
    out = tmp_path / "out"
    status, stdout, err = run_main(capsys, "train", "--model", path, "--data", "bundled", "--device", "cpu", "--out", out, "--quiet")
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"cnn-backend: error: {path}: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists()  # nothing written
    assert "epoch" not in stdout


def test_a_missing_spec_file_and_dropout_on_a_spec_are_refused(tmp_path, capsys):
    status, _, err = run_main(capsys, "train", "--model", tmp_path / "nope.toml", "--data", "bundled", "--device", "cpu")
    assert status == 2 and f"{tmp_path / 'nope.toml'}: no such architecture file" in err
    status, _, err = run_main(capsys, "train", "--model", EXAMPLES / "lenet.toml", "--dropout", "0.3", "--device", "cpu")
    assert status == 2 and "--dropout applies to the default and plain models only" in err and "write a Dropout layer" in err
    status, _, err = run_main(capsys, "train", "--model", "resnet")
    assert status == 2 and "choose seed, default, plain, or an architecture file" in err


def test_a_malformed_spec_through_the_real_command_line_has_no_traceback(tmp_path):
    path = tmp_path / "net.toml"
    path.write_text('[[layers]]\ntype = "Convolution"\nout_channels = 4\n')
    result = subprocess.run(
        [sys.executable, "-m", "cnn_backend", "train", "--model", str(path), "--device", "cpu", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"cnn-backend: error: {path}: layer 0 (Convolution): missing required option 'kernel_size'"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["unknown-option", "kernel-larger-than-input", "residual-unfixable", "wrong-number-of-classes"])
def test_the_python_api_raises_the_same_errors(case):
    _, text, fragments = MALFORMED[case]
    with pytest.raises(SpecError) as caught:
        build_model(json.loads(text), FASHION, num_classes=10)
    for fragment in fragments:
        assert fragment in str(caught.value)
    with pytest.raises(SpecError):
        Sequential.from_spec(json.loads(text), FASHION, num_classes=10)


def test_a_bad_input_shape_is_refused():
    with pytest.raises(SpecError, match=r"the input shape must be \(channels, height, width\)"):
        build_model([{"type": "Flatten"}, dense(10)], (28, 28))


# -- summary --------------------------------------------------------------------------------------------


def test_summary_of_the_default_network():
    summary = summarize(plain_cnn())
    assert [(row.name, row.type, row.output_shape, row.params, row.macs) for row in summary.rows] == [
        ("0", "Convolution", (32, 28, 28), 320, 32 * 28 * 28 * 9),
        ("1", "MaxPool", (32, 14, 14), 0, 0),
        ("2", "ReLU", (32, 14, 14), 0, 0),
        ("3", "Convolution", (64, 14, 14), 18496, 64 * 14 * 14 * 32 * 9),
        ("4", "MaxPool", (64, 7, 7), 0, 0),
        ("5", "ReLU", (64, 7, 7), 0, 0),
        ("6", "Flatten", (3136,), 0, 0),
        ("7", "FullyConnected", (128,), 401536, 3136 * 128),
        ("8", "ReLU", (128,), 0, 0),
        ("9", "FullyConnected", (10,), 1290, 1280),
    ]
    assert summary.total_params == 421642 and summary.parameter_bytes == 4 * 421642
    assert summary.total_macs == 4241152 and summary.total_buffers == 0
    text = format_summary(summary)
    assert "total: 421,642 parameters (1.61 MiB as float32)" in text and "4,241,152 MACs per sample" in text
    assert plain_cnn().summary() == summary


def test_summary_of_a_residual_network_counts_nested_layers_once():
    model = build_model(EXAMPLES / "small-resnet.toml", FASHION)
    summary = model.summary()
    top = [row for row in summary.rows if row.depth == 0]
    assert sum(row.params for row in top) == summary.total_params == sum(p.data.size for p in model.parameters())
    assert sum(row.macs for row in top) == summary.total_macs
    projection = next(row for row in summary.rows if row.name == "5.projection")
    assert (projection.output_shape, projection.params, projection.macs) == ((32, 14, 14), 16 * 32, 32 * 14 * 14 * 16)
    assert summary.total_buffers == 2 * (16 + 16 + 16 + 32 + 32)
    assert json.loads(json.dumps(summary.as_dict()))["rows"][0]["output_shape"] == [16, 28, 28]


def test_summary_shows_the_layers_of_a_block_inside_a_block_a_level_deeper():
    conv = {"type": "Convolution", "out_channels": 4, "kernel_size": 3, "padding": 1}
    inner = {"type": "Residual", "layers": [conv, {"type": "ReLU"}]}
    model = build_model({"layers": [conv, {"type": "Residual", "layers": [inner, conv]}, {"type": "Flatten"},
                                    {"type": "FullyConnected", "out_features": 3}]}, (1, 6, 6))
    rows = {row.name: row for row in model.summary().rows}
    assert [(name, row.depth) for name, row in rows.items()][1:6] == [
        ("1", 0), ("1.layers.0", 1), ("1.layers.0.layers.0", 2), ("1.layers.0.layers.1", 2), ("1.layers.1", 1)]
    assert rows["1.layers.0"].params == rows["1.layers.0.layers.0"].params == 4 * 9 * 4 + 4
    assert "    1.layers.0.layers.0  Convolution" in format_summary(model.summary())


def test_summary_command_prints_the_table(capsys):
    status, out, _ = run_main(capsys, "summary", "--model", EXAMPLES / "lenet.toml", "--input-shape", "3,32,32")
    assert status == 0
    assert "model lenet: input 3x32x32 per sample, float32" in out and "16x6x6" in out
    status, out, _ = run_main(capsys, "summary")
    assert status == 0 and "total: 915,354 parameters" in out  # the default network
    status, _, err = run_main(capsys, "summary", "--input-shape", "28,28")
    assert status == 2 and "expected C,H,W" in err


def test_a_spec_file_without_a_name_is_called_after_the_file(tmp_path, capsys):
    spec = tmp_path / "my-net.toml"
    spec.write_text('[[layers]]\ntype = "Flatten"\n\n[[layers]]\ntype = "FullyConnected"\nout_features = 10\n')
    status, out, _ = run_main(capsys, "summary", "--model", spec)
    assert status == 0 and out.startswith("model my-net: input 1x28x28 per sample")
    assert Sequential.from_spec(spec, (1, 28, 28)).spec_options["name"] == "my-net"
    assert "name" not in Sequential.from_spec({"layers": [{"type": "Flatten"}]}, (1, 2, 2)).spec_options  # no file, no name


# -- examples: each trains ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch():
    from cnn_backend.data import load_fashion_mnist, prepare_images

    images, labels = load_fashion_mnist("train", "bundled")
    return prepare_images(images[:48]), labels[:48]


@pytest.mark.parametrize("example", sorted(path.name for path in EXAMPLES.glob("*.toml")))
def test_every_example_builds_and_its_loss_decreases(example, batch, registry_restored):
    if (EXAMPLES / example).with_suffix(".py").exists():  # an example with layer types of its own
        import_example_layers(Path(example).stem)
    model = build_model(EXAMPLES / example, FASHION, seed=0, num_classes=10)
    optimizer = Adam(model.parameters(), lr=2e-3, backend=model.backend)
    loss_fn = SoftmaxCrossEntropy(model.backend)
    x, y = batch
    losses = [float(train_step(model, loss_fn, optimizer, x, y)[0]) for _ in range(6)]
    assert losses[-1] < losses[0], losses


def test_the_examples_include_a_batchnorm_residual_network():
    model = build_model(EXAMPLES / "small-resnet.toml", FASHION)
    kinds = {type(layer).__name__ for _, layer in model.named_layers()}
    assert {"BatchNorm", "Residual", "GlobalAvgPool"} <= kinds
    assert any(isinstance(layer, Residual) and layer.projection is not None and layer.projection.stride == 2 for layer in model.layers)
    assert any(isinstance(layer, Convolution) and not layer.bias for _, layer in model.named_layers())


def test_built_in_networks_adapt_to_the_input_shape_and_the_class_count():
    from cnn_backend.cli import build_model as build_for_run
    from cnn_backend.inputs import InputSpec

    settings = {"model": "default", "seed": 0, "dropout": 0.0}
    colour = build_for_run(settings, get_backend("cpu"), "auto", InputSpec(tuple("abcdefghij"), 3, (32, 32)))
    assert colour.layers[0].in_channels == 3 and colour.layers[9].in_features == 48 * 8 * 8
    plain = build_for_run({**settings, "model": "plain"}, get_backend("cpu"), "auto", InputSpec(tuple("abcdefghij"), 3, (32, 32)))
    assert plain.layers[0].in_channels == 3 and plain.layers[7].in_features == 64 * 8 * 8
    many = build_for_run({**settings, "model": "seed"}, get_backend("cpu"), "auto", InputSpec(tuple(map(str, range(100))), 1, (28, 28)))
    assert many.output_shape == (100,)


def test_the_builtin_option_table_has_the_constructors_names_and_defaults():
    from cnn_backend.layers import LAYER_TYPES
    from cnn_backend.layers.base import constructor_options
    from cnn_backend.spec import BUILTIN_OPTIONS, REQUIRED

    assert set(BUILTIN_OPTIONS) <= set(LAYER_TYPES)
    for kind, options in BUILTIN_OPTIONS.items():
        parameters = constructor_options(LAYER_TYPES[kind])
        # Residual's projection is made by build and kept out of specs (docs/layers.md).
        assert set(options) == set(parameters) - ({"projection"} if kind == "Residual" else set()), kind
        for name, (_, default, _) in options.items():
            given = parameters[name].default
            if default is REQUIRED:  # no default, or None where an inferred size comes before it (Convolution(8, 3))
                assert given is parameters[name].empty or given is None, (kind, name, given)
            else:
                assert given == default and type(given) is type(default), (kind, name, given, default)


@pytest.mark.parametrize(
    "entry, hint",
    [
        ({"type": "Dense", "units": 10}, "unknown layer type 'Dense'; did you mean FullyConnected?"),
        ({"type": "Linear", "out_features": 10}, "unknown layer type 'Linear'; did you mean FullyConnected?"),
        ({"type": "Conv2d", "out_channels": 4, "kernel_size": 3}, "unknown layer type 'Conv2d'; did you mean Convolution?"),
        ({"type": "relu"}, "unknown layer type 'relu'; did you mean ReLU?"),
        ({"type": "FullyConnected", "units": 10}, "unknown option 'units' (did you mean out_features?)"),
        ({"type": "Convolution", "filters": 4, "kernel_size": 3}, "unknown option 'filters' (did you mean out_channels?)"),
        ({"type": "Convolution", "out_channels": 4, "kernel_size": 3, "kernel_initializer": "he"}, "unknown option 'kernel_initializer' (did you mean init?)"),
    ],
)
def test_keras_and_pytorch_names_are_answered_with_ours(entry, hint):
    with pytest.raises(SpecError, match=re.escape(hint)):
        build_model([entry], input_shape=(1, 8, 8), backend="cpu", seed=0)


@pytest.mark.parametrize("key, text", [("name", "net\nwork"), ("name", "net\x1b[2Jwork"), ("description", "a\x1b[31m red one")])
def test_a_spec_name_or_description_that_would_not_print_as_text_is_refused(key, text):
    layers = [{"type": "Flatten"}, {"type": "FullyConnected", "out_features": 10}]
    with pytest.raises(SpecError, match=rf"^the spec's {key} must be (one line of )?printable text, got "):
        build_model({"layers": layers, key: text}, input_shape=(1, 8, 8), backend="cpu", seed=0)
    build_model({"layers": layers, "description": "two lines\nof description"}, input_shape=(1, 8, 8), backend="cpu", seed=0)


def test_containers_nested_beyond_any_real_network_are_refused_in_one_line(tmp_path):
    def nested(depth):
        return {"type": "ReLU"} if depth == 0 else {"type": "Residual", "layers": [nested(depth - 1)]}

    network = lambda depth: {"layers": [nested(depth), {"type": "GlobalAvgPool"}, {"type": "FullyConnected", "out_features": 10}]}
    build_model(network(20), input_shape=(1, 8, 8), backend="cpu", seed=0)
    with pytest.raises(SpecError, match=r"containers nested more than 100 deep; flatten the network$"):
        build_model(network(300), input_shape=(1, 8, 8), backend="cpu", seed=0)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(SpecError, match=r"JSON nested too deep to read; a network nests containers 100 deep at most$"):
        read_spec_file(deep)
