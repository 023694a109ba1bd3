"""Export a trained network to ONNX, the format ONNX Runtime, TensorRT and onnxruntime-web read.

::

    cnn-backend export runs/best.npz model.onnx [--opset N] [--softmax]

The graph is built with the ``onnx`` package's helper API, one small function per layer type, in
evaluation form (Dropout is the identity, BatchNorm uses its running statistics). It has one input,
``images``: float32 ``(batch, C, H, W)`` in the range this library feeds its models (pixel / 255, so
[0, 1]), with a dynamic batch dimension; any per-channel normalisation recorded with the network is
part of the graph. Its output is ``logits`` ``(batch, classes)``, or ``probabilities`` with
``--softmax``. Class names and the input preparation are recorded in the model's metadata. The
graph passes ``onnx.checker`` (with shape inference) before it is written, atomically.

``onnx`` is an optional dependency (``pip install "cnn-backend[onnx]"``), imported only when a
graph is built.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy

from .data import CLASS_NAMES, IMAGE_SIZE, Normalization
from .inputs import generic_class_names
from .serialization import FileWriteError, write_atomically

#: Written when ``--opset`` is left out: the first opset with a Gelu operator, read by ONNX Runtime
#: 1.18 and later and by TensorRT 10.
DEFAULT_OPSET = 21
#: Oldest opset written: every operator used here has had its current definition since 13
#: (Softmax over one axis, Gemm with an optional bias, Flatten, the pools and BatchNormalization).
MIN_OPSET = 13
#: Gelu became an operator in opset 20; older opsets get the same formula as elementary operators.
GELU_OPSET = 20

INPUT_NAME, LOGITS_NAME, PROBABILITIES_NAME = "images", "logits", "probabilities"
BATCH_DIM = "batch"
INSTALL_HINT = 'pip install "cnn-backend[onnx]"'
#: Input height and width of networks whose files do not record an input shape (Fashion-MNIST's).
DEFAULT_IMAGE_SIZE = IMAGE_SIZE
#: the metadata entries the exporter writes (a user's ``metadata`` may not replace them)
RESERVED_METADATA = frozenset({"preprocessing", "output", "opset", "architecture", "cnn_backend_version", "class_names"})


class ExportError(ValueError):
    """A network, option or environment the exporter cannot serve (one line, saying what to do)."""


# == public API =====================================================================================


def export_onnx(
    model,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    softmax: bool = False,
    input_shape: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    normalization: Normalization | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` (a :class:`~cnn_backend.model.Sequential`) to ``path`` as an ONNX file.

    ``input_shape`` is the per-sample ``(C, H, W)`` (default: the model's ``input_shape``, else
    ``(channels of the first convolution, 28, 28)``). ``class_names`` and ``metadata`` (extra
    string entries) go into the metadata; ``normalization`` is folded into the graph as ``Sub`` and
    ``Div`` nodes so the graph still takes [0, 1] images. Either, when not given, comes from the
    model's ``input_spec`` (what ``Sequential.load`` read from a checkpoint) when it has one.
    Nothing is written unless the whole graph is built and checked; the file is replaced atomically.
    """
    check_onnx_path(path)
    proto = build_onnx_model(
        model, opset=opset, softmax=softmax, input_shape=input_shape, class_names=class_names,
        normalization=normalization, metadata=metadata,
    )
    data = proto.SerializeToString()
    # FileWriteError (an OSError: "cannot write PATH: reason") when the file cannot be written.
    return write_atomically(path, lambda stream: stream.write(data))


def build_onnx_model(
    model,
    *,
    opset: int = DEFAULT_OPSET,
    softmax: bool = False,
    input_shape: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    normalization: Normalization | None = None,
    metadata: dict[str, str] | None = None,
):
    """The checked ``onnx.ModelProto`` that :func:`export_onnx` writes."""
    onnx = import_onnx()
    check_opset(opset, onnx)
    opset = int(opset)  # a NumPy integer too, once check_opset has taken it
    _refuse_over_protobuf_limit(model)
    class_names = _check_preparation(class_names, normalization)
    recorded = getattr(model, "input_spec", None)
    if recorded is not None:
        class_names = recorded.class_names if class_names is None else class_names
        normalization = recorded.normalization if normalization is None else normalization
    input_shape = resolve_input_shape(model, input_shape)
    graph = GraphBuilder(onnx, opset)
    shape = input_shape

    x = INPUT_NAME
    if normalization is not None:
        x = _normalize_input(graph, x, shape, normalization)
    for index, layer in enumerate(model.layers):
        x, shape = export_layer(graph, layer, LayerPath(str(index), type(layer).__name__), x, shape)
    if len(shape) != 1:
        raise ExportError(f"the network ends in a {len(shape) + 1}-D output {('batch',) + tuple(shape)}; "
                          "ONNX export expects (batch, classes) logits")
    n_classes = shape[0]
    if class_names is not None and len(class_names) != n_classes:
        raise ExportError(f"{len(class_names)} class names for a network with {n_classes} outputs")
    if class_names is None:  # generic names, so that a reader can always take them from the metadata
        class_names = generic_class_names(n_classes)
    reserved = sorted(RESERVED_METADATA.intersection(map(str, metadata or {})))
    if reserved:
        raise ExportError(f"metadata key {', '.join(map(repr, reserved))} is written by the exporter itself; "
                          "give your entry another name (class names: class_names=...)")
    output = PROBABILITIES_NAME if softmax else LOGITS_NAME
    if softmax:
        graph.node("Softmax", [x], name="output.softmax", outputs=[PROBABILITIES_NAME], axis=1)
    else:
        graph.rename_output(x, LOGITS_NAME)

    helper = onnx.helper
    elem = onnx.TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(INPUT_NAME, elem, [BATCH_DIM, *input_shape])]
    outputs = [helper.make_tensor_value_info(output, elem, [BATCH_DIM, n_classes])]
    onnx_graph = helper.make_graph(graph.nodes, "cnn_backend", inputs, outputs, graph.initializers)
    opset_ids = [helper.make_opsetid("", opset)]
    proto = helper.make_model(
        onnx_graph, opset_imports=opset_ids, ir_version=helper.find_min_ir_version_for(opset_ids),
        producer_name="cnn_backend", producer_version=_library_version(),
        doc_string="A cnn_backend network; see the metadata for the expected input and the class names.",
    )
    properties = describe(model, input_shape, output, class_names, normalization, opset)
    properties.update({str(key): str(value) for key, value in (metadata or {}).items()})
    helper.set_model_props(proto, properties)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError: a graph this exporter got wrong
        raise ExportError(f"the exported graph fails onnx.checker: {_one_line(exc)}") from None
    return proto


#: the most bytes one protobuf message, and so one ONNX file holding its weights, can take
PROTOBUF_LIMIT = 2**31 - 1


def _refuse_over_protobuf_limit(model) -> None:
    """ExportError, before any work, for a network whose float32 weights alone exceed what one ONNX
    file can hold (protobuf would fail to serialise it, deep inside, after building the graph)."""
    arrays = [param.data for _, param in model.named_parameters()] + [value for _, value in model.named_buffers()]
    weight_bytes = 4 * sum(int(array.size) for array in arrays)
    if weight_bytes > PROTOBUF_LIMIT:
        raise ExportError(
            f"the network's weights take {weight_bytes / 2**30:.1f} GiB as float32, more than the 2 GiB one ONNX file "
            f"can hold; export a smaller network (fewer units in its widest dense layer)"
        )


def import_onnx():
    """The ``onnx`` module, or ExportError saying how to install it."""
    try:
        import onnx
        import onnx.checker
        import onnx.helper
        import onnx.numpy_helper
    except ImportError:
        raise ExportError(f"ONNX export needs the onnx package, which is not installed: {INSTALL_HINT}") from None
    return onnx


def check_onnx_path(path: str | os.PathLike) -> None:
    """The file to write must end in ``.onnx``: a swapped argument order then never replaces a checkpoint."""
    if Path(path).suffix.lower() != ".onnx":
        raise ExportError(f"OUT.onnx names the ONNX file to write and must end in .onnx, got {str(path)!r}")
    try:
        is_folder = Path(path).is_dir()
    except OSError as exc:  # a folder on the way that may not be entered, a name too long
        raise FileWriteError(Path(path), exc) from None
    if is_folder:  # a usage error, as evaluate's --json naming a folder is
        raise ExportError(f"OUT.onnx {str(path)!r} is a folder; name a file such as {str(Path(path) / 'model.onnx')!r}")


def _check_preparation(class_names, normalization) -> list[str] | None:
    """``class_names`` as a list of strings (one per output); ``normalization`` of the right type."""
    if normalization is not None and not isinstance(normalization, Normalization):
        raise ExportError(f"normalization must be a cnn_backend.data.Normalization(mean, std), got {type(normalization).__name__}")
    if class_names is None:
        return None
    if isinstance(class_names, str) or not all(isinstance(name, str) for name in class_names):
        raise ExportError(f"class_names must be a sequence of strings, one per output, got {class_names!r:.60}")
    return list(class_names)


def check_opset(opset: int, onnx=None) -> None:
    """Refuse an opset outside ``MIN_OPSET`` .. the newest the installed ``onnx`` knows, in one line."""
    onnx = onnx or import_onnx()
    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, numbers.Integral) or isinstance(opset, bool):
        raise ExportError(f"opset must be an integer, got {opset!r}")
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: the exporter writes opsets {MIN_OPSET} to {newest}; "
                          f"pass --opset {MIN_OPSET} or newer")
    if opset > newest:
        raise ExportError(f"opset {opset} is newer than the installed onnx {onnx.__version__} knows (up to {newest}); "
                          f"pass --opset {newest} or older, or upgrade onnx")


def resolve_input_shape(model, input_shape: Sequence[int] | None = None) -> tuple[int, ...]:
    """Per-sample input shape, ``(C, H, W)`` or ``(features,)``: the one given, the model's, or the first
    convolution's channels at 28x28 (networks saved before models recorded their input shape)."""
    shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    if shape is None:
        first = model.layers[0]
        channels = getattr(first, "in_channels", None)
        if channels is None:
            raise ExportError(
                "the network records no input shape, and its first layer does not give its channel count (not a "
                "convolution, or one not built yet); pass input_shape=(C, H, W), or run the model on a batch first"
            )
        shape = (channels, *DEFAULT_IMAGE_SIZE)
    shape = tuple(int(n) for n in shape)
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise ExportError(f"input shape must be (C, H, W) or (features,) with positive sizes, got {shape}")
    return shape


def describe(model, input_shape, output: str, class_names, normalization: Normalization | None, opset: int) -> dict[str, str]:
    """The metadata entries (``metadata_props``) of an exported graph: all strings, JSON where structured."""
    preprocessing = {
        "input": INPUT_NAME,
        "layout": "NCHW" if len(input_shape) == 3 else "NF",
        "dtype": "float32",
        "shape": [BATCH_DIM, *input_shape],
        "pixel_scale": "8-bit pixel values divided by 255",
        "range": [0.0, 1.0],
        "normalization": None
        if normalization is None
        else {"mean": list(normalization.mean), "std": list(normalization.std), "applied_in_graph": True},
    }
    properties = {
        "preprocessing": json.dumps(preprocessing),
        "output": output,
        "opset": str(opset),
        "architecture": json.dumps(model.config()),
        "cnn_backend_version": _library_version(),
    }
    properties["class_names"] = json.dumps(list(class_names))
    return properties


# == graph building =================================================================================


@dataclass(frozen=True)
class LayerPath:
    """Where a layer sits (``"3"``, ``"3.layers.0"``) and its type: names tensors and error messages."""

    prefix: str
    type_name: str

    def __str__(self) -> str:
        return f"layer {self.prefix} ({self.type_name})"

    def child(self, name: str, layer) -> "LayerPath":
        return LayerPath(f"{self.prefix}.{name}", type(layer).__name__)


#: graph.constant's dtypes: ONNX's float tensors, and the integer and boolean inputs some operators take
CONSTANT_DTYPES = {"float32": numpy.float32, "int64": numpy.int64, "bool": numpy.bool_}


class GraphBuilder:
    """Collects nodes and initialisers; hands out unique tensor names."""

    def __init__(self, onnx, opset: int) -> None:
        self.onnx, self.helper, self.opset = onnx, onnx.helper, opset
        self.nodes: list = []
        self.initializers: list = []
        self._names: set[str] = {INPUT_NAME, LOGITS_NAME, PROBABILITIES_NAME}  # the graph's own inputs and outputs

    def unique(self, name: str) -> str:
        candidate, n = name, 1
        while candidate in self._names:
            n += 1
            candidate = f"{name}_{n}"
        self._names.add(candidate)
        return candidate

    def constant(self, name: str, value, dtype: str = "float32") -> str:
        """An initialiser holding ``value`` (host array or number) as ``dtype``; returns its name.

        float32, the graph's type, unless asked: ``dtype="int64"`` for what ONNX takes as integers
        (axes, shapes, indices: Unsqueeze, Reshape, Slice, Gather), ``"bool"`` for Where's and And's
        conditions. Explicit, so that an integer-valued factor stays a float. The layer's
        export_onnx reports the errors raised here (its place in the network, in one line)."""
        if dtype not in CONSTANT_DTYPES:
            raise ValueError(f"graph.constant {name!r}: dtype must be one of {', '.join(CONSTANT_DTYPES)}, got {dtype!r}")
        array = numpy.asarray(value)
        if array.dtype.kind not in "biuf":  # a string or a complex number would fail deep inside onnx, or lose its imaginary part
            raise TypeError(f"graph.constant {name!r}: expected numbers, got an array of dtype {array.dtype}")
        if dtype == "int64" and array.dtype.kind == "f" and not numpy.array_equal(array, numpy.round(array)):
            raise ValueError(f"graph.constant {name!r}: int64 values must be whole numbers, got {array.ravel()[:4].tolist()}")
        if dtype == "int64" and array.dtype.kind == "u" and array.size and int(array.max()) > numpy.iinfo(numpy.int64).max:
            raise ValueError(f"graph.constant {name!r}: integers above 2**63 - 1 do not fit ONNX's int64")
        name = self.unique(name)
        array = numpy.ascontiguousarray(array.astype(CONSTANT_DTYPES[dtype], copy=False))
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], *, name: str, outputs: list[str] | None = None, **attributes) -> str:
        """Append one node; returns its (first) output's name (``<name>`` made unique unless given)."""
        outputs = outputs or [self.unique(name)]
        self.nodes.append(self.helper.make_node(op, inputs, outputs, name=name, **attributes))
        return outputs[0]

    def layer(self, layer, prefix: str, x: str, shape) -> tuple[str, Shape]:
        """Emit the nodes of ``layer`` (a container's inner layer, placed at ``prefix``) reading
        tensor ``x`` of per-sample ``shape``; returns its output's name and per-sample shape."""
        return export_layer(self, layer, LayerPath(prefix, type(layer).__name__), x, tuple(int(size) for size in shape))

    def rename_output(self, old: str, new: str) -> None:
        """Give the graph's final tensor its public name."""
        for node in self.nodes:
            node.output[:] = [new if out == old else out for out in node.output]
            node.input[:] = [new if inp == old else inp for inp in node.input]


def host_array(layer, array) -> numpy.ndarray:
    """A parameter or buffer of ``layer`` as a float32 host array (read through the layer's backend)."""
    return numpy.asarray(layer.backend.to_numpy(array), dtype=numpy.float32)


Shape = tuple[int, ...]
Exporter = Callable[[GraphBuilder, object, LayerPath, str, Shape], tuple[str, Shape]]


def export_layer(graph: GraphBuilder, layer, where: LayerPath, x: str, shape: Shape) -> tuple[str, Shape]:
    """Emit the nodes of one layer reading tensor ``x`` of per-sample ``shape``; returns (output, shape)."""
    exporter = EXPORTERS.get(type(layer).__name__)
    if exporter is not None:
        return exporter(graph, layer, where, x, shape)
    if callable(getattr(layer, "export_onnx", None)):
        return _export_own_layer(graph, layer, where, x, shape)
    raise ExportError(f"{where} cannot be exported to ONNX: no exporter for {type(layer).__name__} "
                      f"(exportable: {', '.join(sorted(EXPORTERS))}, and layers of your own that define export_onnx)")


def _export_own_layer(graph: GraphBuilder, layer, where: LayerPath, x: str, shape: Shape) -> tuple[str, Shape]:
    """A layer of one's own that writes its nodes itself: ``layer.export_onnx(graph, prefix, x, shape)``
    returns its output tensor's name and per-sample shape (docs/custom-layers.md)."""
    try:
        result = layer.export_onnx(graph, where.prefix, x, tuple(shape))
    except ExportError:
        raise
    except Exception as exc:  # the layer's own code: whatever it raises is reported in one line
        raise ExportError(f"{where} cannot be exported to ONNX: its export_onnx failed ({type(exc).__name__}: {exc})") from exc
    try:
        output, out_shape = result
        out_shape = tuple(int(size) for size in out_shape)
    except (TypeError, ValueError):
        raise ExportError(f"{where}: export_onnx must return (output tensor name, per-sample shape), got {result!r}") from None
    if not isinstance(output, str):
        raise ExportError(f"{where}: export_onnx must return (output tensor name, per-sample shape), got {result!r}")
    expected = getattr(layer, "output_shape", None)
    if expected is not None and tuple(expected) != out_shape and tuple(layer.input_shape or ()) == tuple(shape):
        raise ExportError(f"{where}: export_onnx gives per-sample shape {out_shape}, but the layer's output is {tuple(expected)}")
    return output, out_shape


def _expect_image(where: LayerPath, shape: Shape) -> None:
    if len(shape) != 3:
        raise ExportError(f"{where} needs a (C, H, W) input, gets per-sample shape {shape}")


def _window_output(where: LayerPath, shape: Shape, kernel: int, stride: int, padding: int = 0) -> Shape:
    _expect_image(where, shape)
    h, w = (size + 2 * padding for size in shape[1:])
    if min(h, w) < kernel:
        raise ExportError(f"{where}: a {kernel}x{kernel} window does not fit its {shape[1]}x{shape[2]} input")
    return ((h - kernel) // stride + 1, (w - kernel) // stride + 1)


def _export_convolution(graph, layer, where, x, shape):
    out_hw = _window_output(where, shape, layer.kernel_size, layer.stride, layer.padding)
    if shape[0] != layer.in_channels:
        raise ExportError(f"{where} expects {layer.in_channels} input channels, gets {shape[0]}")
    inputs = [x, graph.constant(f"{where.prefix}.weight", host_array(layer, layer.params["weight"].data))]
    if "bias" in layer.params:
        inputs.append(graph.constant(f"{where.prefix}.bias", host_array(layer, layer.params["bias"].data)))
    k, s, p = layer.kernel_size, layer.stride, layer.padding
    y = graph.node("Conv", inputs, name=f"{where.prefix}.conv", kernel_shape=[k, k], strides=[s, s], pads=[p, p, p, p])
    return y, (layer.out_channels, *out_hw)


def _export_max_pool(graph, layer, where, x, shape):
    out_hw = _window_output(where, shape, layer.pool_size, layer.stride)
    k, s = layer.pool_size, layer.stride
    return graph.node("MaxPool", [x], name=f"{where.prefix}.maxpool", kernel_shape=[k, k], strides=[s, s]), (shape[0], *out_hw)


def _export_avg_pool(graph, layer, where, x, shape):
    out_hw = _window_output(where, shape, layer.pool_size, layer.stride)
    k, s = layer.pool_size, layer.stride
    # No padding, so every window is whole and count_include_pad cannot matter.
    y = graph.node("AveragePool", [x], name=f"{where.prefix}.avgpool", kernel_shape=[k, k], strides=[s, s])
    return y, (shape[0], *out_hw)


def _export_global_avg_pool(graph, layer, where, x, shape):
    _expect_image(where, shape)
    pooled = graph.node("GlobalAveragePool", [x], name=f"{where.prefix}.globalavgpool")
    # GlobalAveragePool keeps (N, C, 1, 1); the layer gives (N, C).
    return graph.node("Flatten", [pooled], name=f"{where.prefix}.flatten", axis=1), (shape[0],)


def _export_flatten(graph, layer, where, x, shape):
    # ONNX Flatten is row-major over (C, H, W): the library's feature order.
    return graph.node("Flatten", [x], name=f"{where.prefix}.flatten", axis=1), (math.prod(shape),)


def _export_fully_connected(graph, layer, where, x, shape):
    if shape != (layer.in_features,):
        raise ExportError(f"{where} expects {layer.in_features} input features, gets per-sample shape {shape}")
    weight = graph.constant(f"{where.prefix}.weight", host_array(layer, layer.params["weight"].data))
    bias = graph.constant(f"{where.prefix}.bias", host_array(layer, layer.params["bias"].data))
    # y = x @ W + b with W stored (in, out): Gemm without transposing B.
    return graph.node("Gemm", [x, weight, bias], name=f"{where.prefix}.gemm"), (layer.out_features,)


def _export_batch_norm(graph, layer, where, x, shape):
    channels = shape[0]
    if len(shape) not in (1, 3):
        raise ExportError(f"{where} needs a (C, H, W) or (F,) input, gets per-sample shape {shape}")
    running_mean = host_array(layer, layer.buffers["running_mean"])
    if running_mean.shape != (channels,):
        raise ExportError(f"{where} holds statistics of {running_mean.size} channels, its input has {channels}")
    ones, zeros = numpy.ones(channels, numpy.float32), numpy.zeros(channels, numpy.float32)
    gamma = host_array(layer, layer.params["weight"].data) if "weight" in layer.params else ones
    beta = host_array(layer, layer.params["bias"].data) if "bias" in layer.params else zeros
    inputs = [
        x,
        graph.constant(f"{where.prefix}.weight", gamma),
        graph.constant(f"{where.prefix}.bias", beta),
        graph.constant(f"{where.prefix}.running_mean", running_mean),
        graph.constant(f"{where.prefix}.running_var", host_array(layer, layer.buffers["running_var"])),
    ]
    # Inference form (training_mode 0, the default): (x - mean) / sqrt(var + eps) * gamma + beta.
    y = graph.node("BatchNormalization", inputs, name=f"{where.prefix}.batchnorm", epsilon=float(layer.eps))
    return y, shape


def _elementwise(op: str, **attributes) -> Exporter:
    def export(graph, layer, where, x, shape):
        values = {key: float(read(layer)) for key, read in attributes.items()}
        return graph.node(op, [x], name=f"{where.prefix}.{op.lower()}", **values), shape

    export.__name__ = f"_export_{op.lower()}"
    return export


def _export_gelu(graph, layer, where, x, shape):
    if graph.opset >= GELU_OPSET:
        return graph.node("Gelu", [x], name=f"{where.prefix}.gelu", approximate="tanh"), shape
    # Before opset 20: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), the same formula in steps.
    p = where.prefix
    cube = graph.node("Mul", [graph.node("Mul", [x, x], name=f"{p}.gelu.square"), x], name=f"{p}.gelu.cube")
    cubic = graph.node("Mul", [cube, graph.constant(f"{p}.gelu.k", 0.044715)], name=f"{p}.gelu.cubic")
    inner = graph.node("Add", [x, cubic], name=f"{p}.gelu.inner")
    scaled = graph.node("Mul", [inner, graph.constant(f"{p}.gelu.c", math.sqrt(2.0 / math.pi))], name=f"{p}.gelu.scaled")
    tanh = graph.node("Tanh", [scaled], name=f"{p}.gelu.tanh")
    one_plus = graph.node("Add", [tanh, graph.constant(f"{p}.gelu.one", 1.0)], name=f"{p}.gelu.one_plus")
    half_x = graph.node("Mul", [x, graph.constant(f"{p}.gelu.half", 0.5)], name=f"{p}.gelu.half_x")
    return graph.node("Mul", [half_x, one_plus], name=f"{p}.gelu"), shape


def _export_dropout(graph, layer, where, x, shape):
    # Evaluation form: the identity (kept as a node so each layer shows in the graph).
    return graph.node("Identity", [x], name=f"{where.prefix}.dropout"), shape


def _export_residual(graph, layer, where, x, shape):
    inner, inner_shape = x, shape
    for i, sub in enumerate(layer.layers):
        inner, inner_shape = export_layer(graph, sub, where.child(f"layers.{i}", sub), inner, inner_shape)
    skip, skip_shape = x, shape
    if layer.projection is not None:
        skip, skip_shape = export_layer(graph, layer.projection, where.child("projection", layer.projection), x, shape)
    if inner_shape != skip_shape:
        raise ExportError(f"{where}: the inner layers give {inner_shape}, the skip connection {skip_shape}")
    return graph.node("Add", [skip, inner], name=f"{where.prefix}.add"), inner_shape


def _normalize_input(graph: GraphBuilder, x: str, shape: Shape, normalization: Normalization) -> str:
    channels = shape[0]
    if len(normalization.mean) != channels:
        raise ExportError(f"normalisation has {len(normalization.mean)} channels, the network's input {channels}")
    per_channel = (1, channels) + (1,) * (len(shape) - 1)
    mean = graph.constant("input.mean", numpy.reshape(normalization.mean, per_channel))
    std = graph.constant("input.std", numpy.reshape(normalization.std, per_channel))
    centred = graph.node("Sub", [x, mean], name="input.subtract_mean")
    return graph.node("Div", [centred, std], name="input.divide_std")


#: layer type name -> function emitting its nodes. Types from :data:`cnn_backend.layers.LAYER_TYPES`
#: that are missing here are refused in one line naming the layer.
EXPORTERS: dict[str, Exporter] = {
    "Convolution": _export_convolution,
    "MaxPool": _export_max_pool,
    "AvgPool": _export_avg_pool,
    "GlobalAvgPool": _export_global_avg_pool,
    "Flatten": _export_flatten,
    "FullyConnected": _export_fully_connected,
    "BatchNorm": _export_batch_norm,
    "ReLU": _elementwise("Relu"),
    "LeakyReLU": _elementwise("LeakyRelu", alpha=lambda layer: layer.negative_slope),
    "Tanh": _elementwise("Tanh"),
    "Sigmoid": _elementwise("Sigmoid"),
    "GELU": _export_gelu,
    "Dropout": _export_dropout,
    "Residual": _export_residual,
}


# == checkpoints ====================================================================================


def checkpoint_preparation(checkpoint, n_classes: int | None) -> tuple[list[str] | None, Normalization | None]:
    """Class names and input normalisation of a checkpoint, for the metadata and the graph's first nodes.

    What training recorded about its input (``__inputs__``, the same record ``evaluate``, ``predict``
    and ``Sequential.load`` read); for files that record none, the run settings' ``class_names``, else
    Fashion-MNIST's class names when the network has 10 outputs (``n_classes``; None when unknown),
    and no normalisation: what such runs were trained on.
    """
    inputs = checkpoint.input_spec() if hasattr(checkpoint, "input_spec") else None
    if inputs is not None and inputs.recorded:
        return list(inputs.class_names), inputs.normalization
    names = checkpoint.settings.get("class_names")
    if names is None and n_classes == len(CLASS_NAMES):
        names = CLASS_NAMES
    return (list(names) if names is not None else None), None


# == the export command =============================================================================


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``export`` command's options."""
    # Imported here: the command line's package loads this module only when the command is run.
    from .cli.arguments import add_import_option

    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a .npz written by train (or Sequential.save)")
    parser.add_argument("out", type=Path, metavar="OUT.onnx", help="the ONNX file to write (replaced atomically)")
    add_import_option(parser)
    parser.add_argument("--opset", type=_opset_number, default=DEFAULT_OPSET, metavar="N",
                        help=f"ONNX opset to write, {MIN_OPSET} or newer (default: {DEFAULT_OPSET}; "
                        f"below {GELU_OPSET}, GELU is written as elementary operators)")
    parser.add_argument("--softmax", action="store_true", help="end in a Softmax: output 'probabilities' instead of 'logits'")


def run(args: argparse.Namespace) -> int:
    """The ``export`` command: load the checkpoint on the CPU, write the graph, print one summary line."""
    from .backend import get_backend
    from .checkpoint import load_checkpoint
    from .cli.console import say

    check_onnx_path(args.out)
    import_onnx()  # before any work: a missing package is reported first
    checkpoint = load_checkpoint(args.checkpoint, require_training_state=False)
    _refuse_beyond_float32(checkpoint)
    model = checkpoint.build_model(get_backend("cpu", "float32"))
    class_names, normalization = checkpoint_preparation(checkpoint, getattr(model.layers[-1], "out_features", None))
    path = export_onnx(model, args.out, opset=args.opset, softmax=args.softmax, class_names=class_names, normalization=normalization)
    shape = ", ".join([BATCH_DIM, *map(str, resolve_input_shape(model))])
    output = PROBABILITIES_NAME if args.softmax else LOGITS_NAME
    say(
        f"wrote {path}: opset {args.opset}, input {INPUT_NAME} float32 ({shape}) in [0, 1]"
        f"{', normalised in the graph' if normalization else ''}, output {output}"
    )
    return 0


def _refuse_beyond_float32(checkpoint) -> None:
    """ExportError for a float64 file whose finite weights float32, the graph's type, cannot hold
    (NaN and infinity are refused when the model is built, as for every command)."""
    largest = float(numpy.finfo(numpy.float32).max)
    for name, array in {**checkpoint.parameters, **checkpoint.buffers}.items():
        finite = array[numpy.isfinite(array)] if array.dtype.kind == "f" else array[:0]
        if finite.size and float(numpy.abs(finite).max()) > largest:
            raise ExportError(
                f"{checkpoint.path}: {name} holds values beyond float32's range, and an ONNX export is written in "
                f"float32: this model cannot be exported"
            )


def _opset_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _library_version() -> str:
    from . import __version__

    return __version__


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
