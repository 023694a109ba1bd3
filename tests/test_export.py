"""ONNX export: the written graph, run in ONNX Runtime on the CPU, computes what the library computes.

Tolerance. Both sides compute in float32 from the same float32 weights but in different orders
(ONNX Runtime's MLAS kernels against im2col + BLAS here), so each logit carries a few float32
roundings (eps 1.2e-7) of its largest partial sums: for these networks (sums of up to 3,136
products, logits up to ~5) the differences measured 4e-7 to 2e-6. 1e-4 leaves a 50x margin for
other CPUs' kernels, while a mapping mistake such as features in H, W, C order moves logits by
~1 (test_the_tolerance_catches_a_wrong_feature_order).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

onnx = pytest.importorskip("onnx", reason="the onnx package is not installed (pip install 'cnn-backend[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'cnn-backend[test]')")

from cnn_backend import layers as layer_module  # noqa: E402
from cnn_backend.backend import get_backend  # noqa: E402
from cnn_backend.cli import main  # noqa: E402
from cnn_backend.data import CLASS_NAMES, load_fashion_mnist, prepare_images  # noqa: E402
from cnn_backend.export import (  # noqa: E402
    DEFAULT_OPSET,
    EXPORTERS,
    GELU_OPSET,
    MIN_OPSET,
    ExportError,
    Normalization,
    build_onnx_model,
    export_onnx,
)
from cnn_backend.layers import Layer, SoftmaxCrossEntropy  # noqa: E402
from cnn_backend.model import Sequential, plain_cnn, seed_cnn  # noqa: E402
from cnn_backend.optim import make_optimizer  # noqa: E402
from cnn_backend.spec import BUILTIN_LAYER_TYPES, build_model  # noqa: E402
from cnn_backend.training import train_step  # noqa: E402

from layer_helpers import EXAMPLES, forget_layer_type, import_example_layers  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4
BATCH_SIZES = (1, 37)


# -- helpers -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled():
    """The first 300 bundled training images as model input, and their labels."""
    images, labels = load_fashion_mnist("train", "bundled")
    return prepare_images(images[:300]), labels[:300]


def train_briefly(model: Sequential, images, labels, steps: int = 4, batch: int = 32) -> Sequential:
    """A few Adam steps, so biases (and BatchNorm statistics) are far from their initial values."""
    optimizer = make_optimizer("adam", model.parameters(), model.backend, lr=1e-2)
    loss_fn = SoftmaxCrossEntropy(model.backend)
    model.train()
    for step in range(steps):
        window = slice(step * batch, (step + 1) * batch)
        train_step(model, loss_fn, optimizer, images[window], model.backend.to_device(labels[window]))
    return model.eval()


def run_onnx(model_bytes: bytes, images) -> numpy.ndarray:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {"images": images})
    return output


def library_logits(model: Sequential, images) -> numpy.ndarray:
    return model.backend.to_numpy(model.predict_logits(images))


def assert_matches_library(model: Sequential, images, **export_options) -> float:
    """Export, run in ONNX Runtime at every batch size, compare; returns the largest difference."""
    graph = build_onnx_model(model, **export_options).SerializeToString()
    largest = 0.0
    for batch in BATCH_SIZES:
        x = images[-batch:]  # the last images: none of them seen in training
        got, expected = run_onnx(graph, x), library_logits(model, x)
        assert got.dtype == numpy.float32 and got.shape == expected.shape == (batch, 10)
        difference = float(numpy.abs(got - expected).max())
        assert difference <= TOLERANCE, f"batch {batch}: max abs difference {difference:.3g}"
        largest = max(largest, difference)
    return largest


def save_model(model: Sequential, path: Path) -> Path:
    model.save(path)
    return path


# -- the library's networks ----------------------------------------------------------------------------


def test_seed_network_matches_onnxruntime(bundled):
    images, labels = bundled
    model = train_briefly(seed_cnn(seed=3), images, labels)
    assert_matches_library(model, images)


def test_default_network_with_dropout_matches_onnxruntime(bundled):
    images, labels = bundled
    model = train_briefly(plain_cnn(seed=4, dropout=0.4), images, labels)
    assert any(type(layer).__name__ == "Dropout" for layer in model.layers)
    assert_matches_library(model, images)


@pytest.mark.parametrize("opset", [MIN_OPSET, 17, DEFAULT_OPSET])
def test_every_opset_in_range_runs(bundled, opset):
    images, labels = bundled
    model = train_briefly(seed_cnn(seed=5), images, labels, steps=2)
    proto = build_onnx_model(model, opset=opset)
    assert proto.opset_import[0].version == opset
    assert_matches_library(model, images, opset=opset)


def test_strided_padded_convolution_and_overlapping_pool(bundled):
    images, labels = bundled
    L = layer_module
    rng = numpy.random.default_rng(6)
    model = Sequential([
        L.Convolution(1, 4, 5, stride=2, padding=2, rng=rng),  # 28 -> 14
        L.ReLU(),
        L.MaxPool(3, stride=2),  # 14 -> 6, overlapping windows
        L.Convolution(4, 3, 3, stride=1, padding=1, rng=rng),
        L.Flatten(),
        L.FullyConnected(3 * 6 * 6, 10, rng=rng),
    ])
    assert_matches_library(train_briefly(model, images, labels), images)


def test_network_on_feature_vectors():
    L, rng = layer_module, numpy.random.default_rng(16)
    model = Sequential([L.FullyConnected(20, 16, rng=rng), L.ReLU(), L.FullyConnected(16, 10, rng=rng)])
    proto = build_onnx_model(model, input_shape=(20,), normalization=Normalization((0.5,) * 20, (0.25,) * 20))
    assert dims(proto.graph.input[0]) == ["batch", 20]
    assert json.loads(metadata(proto)["preprocessing"])["layout"] == "NF"
    x = rng.random((37, 20), dtype=numpy.float32)
    expected = library_logits(model, (x - 0.5) / 0.25)
    assert numpy.abs(run_onnx(proto.SerializeToString(), x) - expected).max() <= TOLERANCE


def test_float64_model_is_written_in_float32(bundled):
    images, labels = bundled
    model = train_briefly(seed_cnn(get_backend("cpu", "float64"), seed=7), images, labels, steps=2)
    proto = build_onnx_model(model)
    assert {init.data_type for init in proto.graph.initializer} == {onnx.TensorProto.FLOAT}
    got = run_onnx(proto.SerializeToString(), images[:37])
    assert numpy.abs(got - library_logits(model, images[:37])).max() <= TOLERANCE


def test_the_tolerance_catches_a_wrong_feature_order(bundled):
    """Rows of the dense weight reordered as if Flatten ran in H, W, C order: far outside 1e-4."""
    images, labels = bundled
    model = train_briefly(plain_cnn(seed=8), images, labels)
    graph = build_onnx_model(model).SerializeToString()
    dense = model.layers[7]
    weight = dense.params["weight"].data
    dense.params["weight"].data = weight.reshape(64, 7, 7, -1).transpose(1, 2, 0, 3).reshape(weight.shape).copy()
    difference = numpy.abs(run_onnx(graph, images[-37:]) - library_logits(model, images[-37:])).max()
    assert difference > 100 * TOLERANCE


def test_folded_normalisation_takes_unit_range_images(bundled):
    images, labels = bundled
    mean, std = 0.286, 0.353
    model = train_briefly(seed_cnn(seed=9), (images - mean) / std, labels, steps=2)
    proto = build_onnx_model(model, normalization=Normalization((mean,), (std,)))
    got = run_onnx(proto.SerializeToString(), images[-37:])
    expected = library_logits(model, ((images[-37:] - mean) / std).astype(numpy.float32))
    assert numpy.abs(got - expected).max() <= TOLERANCE
    preprocessing = json.loads(metadata(proto)["preprocessing"])
    assert preprocessing["normalization"] == {"mean": [mean], "std": [std], "applied_in_graph": True}
    assert preprocessing["range"] == [0.0, 1.0]


def test_a_normalised_models_prepare_gives_the_input_its_exported_graph_takes(bundled):
    from cnn_backend.data import CLASS_NAMES, load_fashion_mnist, prepare_images
    from cnn_backend.inputs import InputSpec

    images, labels = bundled
    pixels = load_fashion_mnist("train", "bundled")[0][-37:]  # uint8, as read from the files
    mean, std = 0.286, 0.353
    model = train_briefly(seed_cnn(seed=9), (images - mean) / std, labels, steps=2)
    model.input_spec = InputSpec(CLASS_NAMES, 1, (28, 28), Normalization((mean,), (std,)))
    got = run_onnx(build_onnx_model(model).SerializeToString(), prepare_images(pixels))  # the graph takes [0, 1]
    assert numpy.abs(library_logits(model, model.prepare(pixels)) - got).max() <= TOLERANCE
    assert numpy.abs(library_logits(model, prepare_images(pixels)) - got).max() > 100 * TOLERANCE  # un-normalised: other logits
    model.input_spec = None
    numpy.testing.assert_array_equal(model.prepare(pixels), prepare_images(pixels))


def test_model_on_the_device_boundary_exports_the_same_graph(device_under_test):
    """Parameters are read through the backend (never numpy.asarray on a device array)."""
    reference = build_onnx_model(seed_cnn(seed=10))
    on_device = build_onnx_model(seed_cnn(device_under_test("float32"), seed=10))
    assert on_device.graph.SerializeToString() == reference.graph.SerializeToString()


# -- every layer type ---------------------------------------------------------------------------------

def conv(out_channels: int, kernel_size: int = 3, **options) -> dict:
    return {"type": "Convolution", "out_channels": out_channels, "kernel_size": kernel_size, "padding": kernel_size // 2, **options}


#: Every layer type with a Flatten head: 1x28x28 -> ... -> 10. Convolutions with and without bias,
#: stride 2 inside a Residual (so it gets a projection), overlapping pools, BatchNorm on 4-D and 2-D.
EVERY_LAYER_SPEC = {"layers": [
    conv(8, bias=False), {"type": "BatchNorm"}, {"type": "LeakyReLU", "negative_slope": 0.1},
    {"type": "Residual", "layers": [conv(8, bias=False), {"type": "BatchNorm"}, {"type": "GELU"}, conv(8)]},
    {"type": "MaxPool", "pool_size": 2},                                                     # 8x14x14
    {"type": "Residual", "layers": [conv(12, stride=2), {"type": "Tanh"}, conv(12, bias=False)]},  # 12x7x7, projection
    {"type": "AvgPool", "pool_size": 3, "stride": 2},                                        # 12x3x3
    {"type": "Sigmoid"},
    {"type": "Flatten"},
    {"type": "FullyConnected", "out_features": 32}, {"type": "BatchNorm"}, {"type": "ReLU"},
    {"type": "Dropout", "rate": 0.3},
    {"type": "FullyConnected", "out_features": 10},
]}
#: The GlobalAvgPool head of a small ResNet, BatchNorm straight after it (2-D).
GLOBAL_POOL_SPEC = {"layers": [
    conv(8, bias=False), {"type": "BatchNorm"}, {"type": "ReLU"},
    {"type": "Residual", "layers": [conv(16, stride=2, bias=False), {"type": "BatchNorm"}, {"type": "GELU"}]},
    {"type": "GlobalAvgPool"}, {"type": "BatchNorm"},
    {"type": "FullyConnected", "out_features": 10},
]}


def spec_network(spec: dict, seed: int, backend="cpu") -> Sequential:
    return build_model(spec, (1, 28, 28), backend=backend, seed=seed)


def layer_types(layers) -> set[str]:
    types = set()
    for layer in layers:
        types.add(type(layer).__name__)
        types |= layer_types(getattr(layer, "layers", []))
        projection = getattr(layer, "projection", None)
        types |= layer_types([projection] if projection is not None else [])
    return types


def test_the_test_networks_use_every_layer_type():
    networks = [spec_network(EVERY_LAYER_SPEC, 0), spec_network(GLOBAL_POOL_SPEC, 0)]
    used = set().union(*(layer_types(model.layers) for model in networks))
    assert used == set(BUILTIN_LAYER_TYPES) <= set(EXPORTERS)
    residuals = [layer for model in networks for layer in model.layers if type(layer).__name__ == "Residual"]
    assert any(block.projection is not None for block in residuals) and any(block.projection is None for block in residuals)
    assert any("bias" not in layer.params for model in networks for _, layer in model.named_layers()
               if type(layer).__name__ == "Convolution")


@pytest.fixture(scope="module")
def trained_spec_networks(bundled):
    """Each spec network trained once (6 steps) for all the opsets it is exported at."""
    images, labels = bundled
    trained = {}

    def get(name: str) -> Sequential:
        if name not in trained:
            spec = {"flatten-head": EVERY_LAYER_SPEC, "global-pool-head": GLOBAL_POOL_SPEC}[name]
            trained[name] = train_briefly(spec_network(spec, seed=14), images, labels, steps=6)
        return trained[name]

    return get


@pytest.mark.parametrize("opset", [17, DEFAULT_OPSET], ids=["gelu-expanded", "gelu-operator"])
@pytest.mark.parametrize("network", ["flatten-head", "global-pool-head"])
def test_network_of_every_layer_type_matches_onnxruntime(bundled, trained_spec_networks, network, opset):
    images, _ = bundled
    model = trained_spec_networks(network)
    buffers = model.buffer_state_dict()
    # The running statistics have moved well away from their initial 0 and 1: the export must carry them.
    assert buffers and all(numpy.abs(value - (0.0 if name.endswith("mean") else 1.0)).max() > 1e-2 for name, value in buffers.items())
    assert_matches_library(model, images, opset=opset)
    ops = {node.op_type for node in build_onnx_model(model, opset=opset).graph.node}
    assert ("Gelu" in ops) == (opset >= GELU_OPSET)


def test_batchnorm_network_on_the_device_boundary_exports_the_same_graph(device_under_test):
    """Buffers too are read through the backend."""
    reference = spec_network(GLOBAL_POOL_SPEC, seed=15)
    on_device = spec_network(GLOBAL_POOL_SPEC, seed=15, backend=device_under_test("float32"))
    statistics = {name: numpy.linspace(0.5, 1.5, value.size, dtype=numpy.float32) for name, value in reference.buffer_state_dict().items()}
    for model in (reference, on_device):
        model.load_state_dict(reference.state_dict(), statistics)
    assert build_onnx_model(on_device).graph.SerializeToString() == build_onnx_model(reference).graph.SerializeToString()


# -- the file: metadata, dynamic batch, softmax, atomic writes ----------------------------------------


def metadata(proto) -> dict:
    return {prop.key: prop.value for prop in proto.metadata_props}


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_cli_export_writes_a_checked_graph_with_metadata(tmp_path, capsys):
    model = plain_cnn(seed=11)
    checkpoint = save_model(model, tmp_path / "model.npz")
    assert main(["export", str(checkpoint), str(tmp_path / "out" / "model.onnx")]) == 0
    assert "wrote" in capsys.readouterr().out
    proto = onnx.load(tmp_path / "out" / "model.onnx")
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == DEFAULT_OPSET
    (images,), (logits,) = proto.graph.input, proto.graph.output
    assert (images.name, logits.name) == ("images", "logits")
    assert images.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims(images) == ["batch", 1, 28, 28] and dims(logits) == ["batch", 10]
    properties = metadata(proto)
    assert json.loads(properties["class_names"]) == list(CLASS_NAMES)
    preprocessing = json.loads(properties["preprocessing"])
    assert preprocessing["layout"] == "NCHW" and preprocessing["range"] == [0.0, 1.0]
    assert preprocessing["normalization"] is None
    assert properties["output"] == "logits"
    assert json.loads(properties["architecture"]) == model.config()
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["model.onnx"]


def test_batch_dimension_is_dynamic(tmp_path):
    model = plain_cnn(seed=12)
    graph = build_onnx_model(model).SerializeToString()
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    for batch in (1, 5, 64):
        x = numpy.random.default_rng(batch).random((batch, 1, 28, 28), dtype=numpy.float32)
        assert session.run(None, {"images": x})[0].shape == (batch, 10)


def test_cli_softmax_gives_probabilities(tmp_path, bundled):
    images, labels = bundled
    model = train_briefly(plain_cnn(seed=13), images, labels)
    checkpoint = save_model(model, tmp_path / "model.npz")
    out = tmp_path / "probabilities.onnx"
    assert main(["export", str(checkpoint), str(out), "--softmax"]) == 0
    proto = onnx.load(out)
    assert [o.name for o in proto.graph.output] == ["probabilities"] and metadata(proto)["output"] == "probabilities"
    probabilities = run_onnx(out.read_bytes(), images[-37:])
    numpy.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    assert (probabilities >= 0).all()
    logits = library_logits(model, images[-37:])
    reference = numpy.exp(logits - logits.max(axis=1, keepdims=True))
    reference /= reference.sum(axis=1, keepdims=True)
    assert numpy.abs(probabilities - reference).max() <= 1e-5


# -- refusals: one line, nothing written ---------------------------------------------------------------


class Doubling(Layer):
    """A layer type the exporter does not know."""

    def forward(self, x):
        return 2 * x


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("cnn-backend: error: ")
    return lines[0]


def test_cli_refuses_a_corrupt_checkpoint(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(save_model(seed_cnn(), tmp_path / "good.npz").read_bytes()[:5000])
    assert main(["export", str(corrupt), str(tmp_path / "m.onnx")]) == 2
    assert "corrupt.npz" in one_error_line(capsys)
    assert not (tmp_path / "m.onnx").exists()


def test_cli_refuses_an_opset_too_old(tmp_path, capsys):
    checkpoint = save_model(seed_cnn(), tmp_path / "model.npz")
    assert main(["export", str(checkpoint), str(tmp_path / "m.onnx"), "--opset", str(MIN_OPSET - 1)]) == 2
    line = one_error_line(capsys)
    assert f"opset {MIN_OPSET - 1} is too old" in line and f"--opset {MIN_OPSET}" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]


def test_cli_refuses_an_opset_newer_than_onnx_knows(tmp_path, capsys):
    checkpoint = save_model(seed_cnn(), tmp_path / "model.npz")
    newest = onnx.defs.onnx_opset_version()
    assert main(["export", str(checkpoint), str(tmp_path / "m.onnx"), "--opset", str(newest + 1)]) == 2
    assert f"up to {newest}" in one_error_line(capsys)


def test_cli_reports_an_unwritable_path_and_leaves_nothing(tmp_path, capsys):
    checkpoint = save_model(seed_cnn(), tmp_path / "model.npz")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder is expected")
    assert main(["export", str(checkpoint), str(blocker / "m.onnx")]) == 1
    line = one_error_line(capsys)
    assert "cannot write" in line and "m.onnx" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz", "not-a-folder"]


def test_cli_refuses_an_unexportable_layer(tmp_path, capsys, monkeypatch):
    # A model file in the layer-list form (no input shape recorded), which loads any registered type.
    monkeypatch.setitem(layer_module.LAYER_TYPES, "Doubling", Doubling)
    L, rng = layer_module, numpy.random.default_rng(0)
    model = Sequential([L.Convolution(1, 1, 6, rng=rng), Doubling(), L.ReLU(), L.MaxPool(2), L.Flatten(), L.FullyConnected(121, 10, rng=rng)])
    checkpoint = save_model(model, tmp_path / "model.npz")
    out = tmp_path / "m.onnx"
    out.write_bytes(b"an earlier export")
    assert main(["export", str(checkpoint), str(out)]) == 2
    line = one_error_line(capsys)
    assert "layer 1 (Doubling) cannot be exported" in line
    assert out.read_bytes() == b"an earlier export"  # untouched, and no temporary file beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "model.npz"]


def test_python_api_names_the_unexportable_layer_and_writes_nothing(tmp_path):
    model = seed_cnn()
    model.layers.insert(2, Doubling())
    with pytest.raises(ExportError, match=r"^layer 2 \(Doubling\) cannot be exported to ONNX"):
        export_onnx(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_layer_of_ones_own_with_export_onnx_matches_onnxruntime(bundled, registry_restored):
    import_example_layers("prelu")  # PReLU writes ONNX's PRelu itself
    images, labels = bundled
    model = train_briefly(build_model(EXAMPLES / "prelu.toml", (1, 28, 28), seed=5), images, labels)
    slopes = [layer.params["slope"].data for layer in model.layers if type(layer).__name__ == "PReLU"]
    assert len(slopes) == 3 and not all(numpy.all(slope == 0.25) for slope in slopes)  # trained away from the start
    assert_matches_library(model, images)


def test_a_container_of_ones_own_exports_its_inner_layers_through_graph_layer(bundled, registry_restored):
    import_example_layers("rezero")  # ReZero writes its inner layers with graph.layer, then Mul and Add
    images, labels = bundled
    model = train_briefly(build_model(EXAMPLES / "rezero.toml", (1, 28, 28), seed=5), images, labels)
    alphas = [float(layer.params["alpha"].data[0]) for layer in model.layers if type(layer).__name__ == "ReZero"]
    assert len(alphas) == 2 and all(alpha != 0 for alpha in alphas)  # trained away from the identity
    graph = build_onnx_model(model)
    assert {"3.layers.0.conv", "7.layers.1.batchnorm", "3.add"} <= {node.name for node in graph.graph.node}
    assert_matches_library(model, images)


def test_cli_exports_a_layer_of_ones_own_with_its_module_and_refuses_it_without(tmp_path, capsys, registry_restored):
    import_example_layers("prelu")
    checkpoint = save_model(build_model(EXAMPLES / "prelu.toml", (1, 28, 28), seed=0), tmp_path / "model.npz")
    assert main(["export", str(checkpoint), str(tmp_path / "m.onnx"), "--import", str(EXAMPLES / "prelu.py")]) == 0
    assert [node.op_type for node in onnx.load(tmp_path / "m.onnx").graph.node].count("PRelu") == 3
    forget_layer_type("PReLU")
    assert main(["export", str(checkpoint), str(tmp_path / "again.onnx")]) == 2
    assert "unknown layer type 'PReLU'" in one_error_line(capsys) and not (tmp_path / "again.onnx").exists()


@pytest.mark.parametrize(
    "writer, message",
    [
        (lambda self, graph, prefix, x, shape: {}["missing"], r"its export_onnx failed \(KeyError: 'missing'\)"),
        (lambda self, graph, prefix, x, shape: Layer.forward(self, x), r"its export_onnx failed \(LayerDefinitionError: Doubling defines no forward\(x\)"),
        (lambda self, graph, prefix, x, shape: x, r"export_onnx must return \(output tensor name, per-sample shape\)"),
        (lambda self, graph, prefix, x, shape: (None, shape), r"export_onnx must return \(output tensor name"),
    ],
    ids=["raises", "not implemented", "one value", "no name"],
)
def test_a_failing_export_onnx_is_refused_in_one_line(tmp_path, writer, message):
    model = seed_cnn()
    model.layers.insert(2, type("Doubling", (Doubling,), {"export_onnx": writer})())
    with pytest.raises(ExportError, match=r"^layer 2 \(Doubling\)(: | cannot be exported to ONNX: )" + message):
        export_onnx(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_an_export_onnx_giving_another_shape_than_its_layer_is_refused(tmp_path):
    class Widening(Doubling):
        def export_onnx(self, graph, prefix, x, shape):
            return graph.node("Identity", [x], name=f"{prefix}.same"), (shape[0] + 1, *shape[1:])

    L = layer_module
    model = Sequential([L.Convolution(1, 1, 6, rng=0), Widening(), L.ReLU(), L.MaxPool(2), L.Flatten(), L.FullyConnected(121, 10, rng=0)],
                       input_shape=(1, 28, 28))  # fmt: skip
    with pytest.raises(ExportError, match=r"^layer 1 \(Widening\): export_onnx gives per-sample shape \(2, 23, 23\), but the layer's output is \(1, 23, 23\)$"):
        export_onnx(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_layers_constant_never_takes_the_graphs_own_names(tmp_path):
    class NamesItsConstantLogits(Doubling):
        def export_onnx(self, graph, prefix, x, shape):
            return graph.node("Mul", [x, graph.constant("logits", 2.0)], name=f"{prefix}.double"), shape

    model = seed_cnn()
    model.layers.insert(2, NamesItsConstantLogits())
    onnx.checker.check_model(build_onnx_model(model), full_check=True)


def test_constants_are_float32_unless_an_integer_or_boolean_dtype_is_asked_for():
    from cnn_backend.export import GraphBuilder

    graph = GraphBuilder(onnx, DEFAULT_OPSET)
    floats = [numpy.array([2, 3], dtype=numpy.int32), [0, -1], numpy.uint8(4), 2, 2.0, numpy.arange(3.0), numpy.float16(0.5)]
    for index, value in enumerate(floats):  # an integer-valued factor stays a float unless a dtype is given
        graph.constant(f"f{index}", value)
    graph.constant("axes", [0, -1], dtype="int64")
    graph.constant("whole", numpy.array([3.0]), dtype="int64")
    graph.constant("mask", numpy.array([1, 0]), dtype="bool")
    names = [onnx.TensorProto.DataType.Name(tensor.data_type) for tensor in graph.initializers]
    assert names == ["FLOAT"] * len(floats) + ["INT64", "INT64", "BOOL"]
    assert onnx.numpy_helper.to_array(graph.initializers[-3]).tolist() == [0, -1]
    with pytest.raises(TypeError, match=r"^graph\.constant 'text': expected numbers, got an array of dtype <U1$"):
        graph.constant("text", "a")
    with pytest.raises(ValueError, match=r"^graph\.constant 'huge': integers above 2\*\*63 - 1 do not fit ONNX's int64$"):
        graph.constant("huge", numpy.array([2**64 - 1], dtype=numpy.uint64), dtype="int64")
    with pytest.raises(ValueError, match=r"^graph\.constant 'half': int64 values must be whole numbers, got \[0\.5\]$"):
        graph.constant("half", [0.5], dtype="int64")
    with pytest.raises(ValueError, match=r"^graph\.constant 'x': dtype must be one of float32, int64, bool, got 'float64'$"):
        graph.constant("x", 1.0, dtype="float64")


class FlattenedThrough(Layer):
    """Flattens each sample, written with operators whose axes and shapes are int64 tensors."""

    def _build(self, input_shape, rng):
        return (int(numpy.prod(input_shape)),)

    def forward(self, x):
        return x.reshape(x.shape[0], -1)

    def export_onnx(self, graph, prefix, x, shape):
        # Unsqueeze and Reshape take their axes and shape as int64 inputs (opset 13 on).
        widened = graph.node("Unsqueeze", [x, graph.constant(f"{prefix}.axes", [1], dtype="int64")], name=f"{prefix}.unsqueeze")
        return graph.node("Reshape", [widened, graph.constant(f"{prefix}.shape", [0, -1], dtype="int64")], name=f"{prefix}.reshape"), self.output_shape


def test_a_layer_of_ones_own_exports_operators_taking_int64_constants():
    from cnn_backend.layers import Convolution, FullyConnected

    model = Sequential([Convolution(out_channels=2, kernel_size=3), FlattenedThrough(), FullyConnected(out_features=4)],
                       input_shape=(1, 6, 6), rng=0).eval()  # fmt: skip
    proto = build_onnx_model(model)  # passes onnx.checker's full check
    images = numpy.random.default_rng(0).random((3, 1, 6, 6), dtype=numpy.float32)
    assert numpy.abs(run_onnx(proto.SerializeToString(), images) - library_logits(model, images)).max() <= TOLERANCE


def test_input_shape_that_does_not_fit_the_dense_layer_is_refused():
    with pytest.raises(ExportError, match=r"layer 7 \(FullyConnected\) expects 3136 input features.*\(4096,\)"):
        build_onnx_model(plain_cnn(), input_shape=(1, 32, 32))


def test_a_network_without_an_input_shape_says_how_to_give_one():
    from cnn_backend.export import resolve_input_shape
    from cnn_backend.layers import Convolution, Flatten
    from cnn_backend.model import Sequential

    unbuilt = Sequential([Convolution(out_channels=2, kernel_size=3), Flatten()], "cpu")  # channels left to inference
    with pytest.raises(ExportError, match=r"^the network records no input shape, and its first layer does not give its "
                                          r"channel count .*; pass input_shape=\(C, H, W\), or run the model on a batch first$"):
        resolve_input_shape(unbuilt)
    assert resolve_input_shape(unbuilt, (3, 8, 8)) == (3, 8, 8)


def test_an_output_name_without_onnx_is_refused_so_the_checkpoint_survives_swapped_arguments(tmp_path, capsys):
    checkpoint = save_model(seed_cnn(), tmp_path / "model.npz")
    saved = checkpoint.read_bytes()
    for out in (checkpoint, tmp_path / "net.toml", tmp_path):
        assert main(["export", str(checkpoint), str(out)]) == 2
        assert "must end in .onnx" in one_error_line(capsys)
    assert checkpoint.read_bytes() == saved and sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]


def test_an_output_name_that_is_a_folder_is_a_usage_error_as_in_evaluate(tmp_path, capsys):
    checkpoint = save_model(seed_cnn(), tmp_path / "model.npz")
    (tmp_path / "out.onnx").mkdir()
    assert main(["export", str(checkpoint), str(tmp_path / "out.onnx")]) == 2
    assert one_error_line(capsys) == (
        f"cnn-backend: error: OUT.onnx '{tmp_path / 'out.onnx'}' is a folder; name a file such as '{tmp_path / 'out.onnx' / 'model.onnx'}'"
    )
    assert list((tmp_path / "out.onnx").iterdir()) == []


def test_metadata_may_not_replace_the_exporters_own_entries():
    with pytest.raises(ExportError, match=r"metadata key 'class_names', 'opset' is written by the exporter itself"):
        build_onnx_model(seed_cnn(), metadata={"opset": "7", "class_names": "oops", "author": "me"})
    assert metadata(build_onnx_model(seed_cnn(), metadata={"author": "me"}))["author"] == "me"


def test_class_names_are_always_in_the_metadata():
    spec = {"layers": [{"type": "Flatten"}, {"type": "FullyConnected", "out_features": 3}]}
    model = Sequential.from_spec(spec, (1, 4, 4))
    assert json.loads(metadata(build_onnx_model(model))["class_names"]) == ["class 0", "class 1", "class 2"]


def test_a_loaded_model_exports_with_the_input_its_file_records(tmp_path):
    from cnn_backend.inputs import InputSpec

    spec = {"layers": [{"type": "Flatten"}, {"type": "FullyConnected", "out_features": 3}]}
    model = Sequential.from_spec(spec, (1, 4, 4))
    model.input_spec = InputSpec(("ant", "bee", "cow"), 1, (4, 4), Normalization((0.25,), (0.5,)))
    loaded = Sequential.load(model.save(tmp_path / "model.npz"))
    proto = build_onnx_model(loaded)
    assert json.loads(metadata(proto)["class_names"]) == ["ant", "bee", "cow"]
    images = numpy.random.default_rng(3).random((5, 1, 4, 4), dtype=numpy.float32)
    expected = library_logits(loaded, ((images - 0.25) / 0.5).astype(numpy.float32))
    assert numpy.abs(run_onnx(proto.SerializeToString(), images) - expected).max() <= TOLERANCE
    # Arguments given win over the recorded description.
    assert json.loads(metadata(build_onnx_model(loaded, class_names=["x", "y", "z"]))["class_names"]) == ["x", "y", "z"]


def test_python_api_arguments_are_checked_as_the_command_line_checks_them(tmp_path):
    model = seed_cnn()
    checkpoint = model.save(tmp_path / "model.npz")
    with pytest.raises(ExportError, match=r"OUT.onnx names the ONNX file to write and must end in .onnx, got '.*model.npz'"):
        export_onnx(model, checkpoint)
    assert Sequential.load(checkpoint).state_dict().keys() == model.state_dict().keys()  # not replaced
    with pytest.raises(ExportError, match=r"class_names must be a sequence of strings, one per output, got 'abcdefghij'"):
        build_onnx_model(model, class_names="abcdefghij")
    with pytest.raises(ExportError, match=r"class_names must be a sequence of strings, one per output, got \[0, 1, "):
        build_onnx_model(model, class_names=list(range(10)))
    with pytest.raises(ExportError, match=r"normalization must be a cnn_backend.data.Normalization\(mean, std\), got dict"):
        build_onnx_model(model, normalization={"mean": [0.5], "std": [0.5]})
    assert metadata(build_onnx_model(model, opset=numpy.int64(17)))["opset"] == "17"


def test_wrong_number_of_class_names_is_refused():
    with pytest.raises(ExportError, match="3 class names for a network with 10 outputs"):
        build_onnx_model(seed_cnn(), class_names=["a", "b", "c"])


def test_missing_onnx_package_is_one_line(tmp_path):
    checkpoint = save_model(seed_cnn(), tmp_path / "model.npz")
    code = (
        "import sys; sys.modules['onnx'] = None\n"  # what a missing package looks like to import
        "from cnn_backend.cli import main\n"
        f"sys.exit(main(['export', {str(checkpoint)!r}, {str(tmp_path / 'm.onnx')!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                            env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == 'cnn-backend: error: ONNX export needs the onnx package, which is not installed: pip install "cnn-backend[onnx]"'
    assert not (tmp_path / "m.onnx").exists()


def test_a_network_too_large_for_one_onnx_file_is_refused_before_any_work(tmp_path, monkeypatch):
    import cnn_backend.export as export_module

    model = seed_cnn("cpu", seed=0)
    weights = 4 * sum(param.data.size for _, param in model.named_parameters())
    monkeypatch.setattr(export_module, "PROTOBUF_LIMIT", weights - 1)  # stands in for 2 GiB
    with pytest.raises(ExportError, match=r"^the network's weights take 0.0 GiB as float32, more than the 2 GiB one ONNX file can hold; "
                                          r"export a smaller network"):
        export_onnx(model, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_export_leaves_no_folder_it_made(tmp_path, monkeypatch):
    import cnn_backend.serialization as serialization

    def disk_full(temporary, *args, **options):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(serialization, "_keep_permissions", disk_full)
    with pytest.raises(OSError, match=r"cannot write .*a/b/model.onnx: No space left on device"):
        export_onnx(seed_cnn("cpu", seed=0), tmp_path / "a" / "b" / "model.onnx")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()  # a folder that was there before stays
    with pytest.raises(OSError):
        export_onnx(seed_cnn("cpu", seed=0), tmp_path / "kept" / "new" / "model.onnx")
    assert [path.name for path in tmp_path.iterdir()] == ["kept"] and list((tmp_path / "kept").iterdir()) == []


def test_a_float64_model_beyond_float32s_range_is_refused_by_export_in_one_line(tmp_path, capsys):
    model = seed_cnn(get_backend("cpu", "float64"), seed=0)
    model.layers[0].params["weight"].data[0, 0, 0, 0] = 1e300  # finite in float64, infinite in float32
    model.save(tmp_path / "wide.npz")
    status = main(["export", str(tmp_path / "wide.npz"), str(tmp_path / "wide.onnx")])
    err = capsys.readouterr().err
    assert status == 2
    assert err.strip() == (f"cnn-backend: error: {tmp_path / 'wide.npz'}: 0.weight holds values beyond float32's range, and an ONNX "
                           f"export is written in float32: this model cannot be exported")
    assert not (tmp_path / "wide.onnx").exists()
