"""A model summary, like Keras's ``model.summary()`` or torchinfo: each layer with its output shape,
parameter count and multiply-accumulates per sample, then the totals and the parameter memory.

:func:`summarize` returns the table as data; :func:`format_summary` prints it. MACs count the
multiply-accumulates of Convolution (``outputs * C_in * K * K``), FullyConnected
(``in_features * out_features``) and BatchNorm (one scale-and-shift per value); pooling,
activations and the residual additions are not counted. A container (a layer with children) counts
those of the layers inside it unless it defines ``macs`` itself (:meth:`Layer.macs`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .layers import LAYER_TYPES, AvgPool, Layer, MaxPool
from .layers.base import walk_layers
from .spec import layer_options


@dataclass
class LayerRow:
    """One line of the table. ``depth`` above 0 marks a layer inside a container, 2 inside a
    container that is itself inside one (its numbers are already part of the container's row)."""

    name: str
    type: str
    description: str
    output_shape: tuple
    params: int
    macs: int
    depth: int = 0


@dataclass
class ModelSummary:
    input_shape: tuple
    dtype: str
    rows: list[LayerRow] = field(default_factory=list)
    total_params: int = 0
    total_buffers: int = 0
    total_macs: int = 0
    parameter_bytes: int = 0
    buffer_bytes: int = 0
    name: str | None = None

    def as_dict(self) -> dict:
        """JSON-ready."""
        document = asdict(self)
        document["input_shape"] = list(self.input_shape)
        for row in document["rows"]:
            row["output_shape"] = list(row["output_shape"])
        return document


def _count(layer: Layer) -> int:
    return sum(param.data.size for _, param in layer.named_parameters())


def _describe(layer: Layer) -> str:
    """The options a spec would need to write for this layer (those left at their default omitted)."""
    options = layer.spec()
    kind = options.pop("type")
    known = layer_options(kind) if LAYER_TYPES.get(kind) is type(layer) else {}
    options.pop("layers", None)
    shown = {key: value for key, value in options.items() if key not in known or known[key][1] != value}
    if isinstance(layer, (MaxPool, AvgPool)) and shown.get("stride") == layer.pool_size:
        del shown["stride"]
    return ", ".join(f"{key}={value}" for key, value in shown.items())


def summarize(model) -> ModelSummary:
    """The summary of a built :class:`~cnn_backend.model.Sequential` (one with its input shape)."""
    if model.input_shape is None:
        raise ValueError(
            "the model has no input shape yet: build it with one (build_model, or Sequential(..., input_shape=...)), "
            "or run it on a batch first"
        )
    if any(layer.output_shape is None for _, layer in model.named_layers()):
        # layers made with their sizes, shape recorded by a forward pass: shapes only (and a layer inside
        # a container left unbuilt is refused there, in one line)
        model.build(model.input_shape)
    itemsize = model.backend.dtype.itemsize
    summary = ModelSummary(tuple(model.input_shape), model.backend.dtype.name, name=model.spec_options.get("name"))
    for index, layer in enumerate(model.layers):  # each layer's row, then those of the layers inside it, a level deeper
        summary.rows += [
            LayerRow(name, type(inner).__name__, _describe(inner), inner.output_shape, _count(inner), inner.macs(), depth=depth)
            for name, inner, depth in walk_layers(layer, str(index), dotted=True)
        ]
    summary.total_params = sum(param.data.size for param in model.parameters())
    summary.total_buffers = sum(value.size for _, value in model.named_buffers())
    summary.total_macs = sum(layer.macs() for layer in model.layers)
    summary.parameter_bytes = summary.total_params * itemsize
    # Each buffer's own size: an integer counter keeps its dtype (int64), not the model's float one.
    summary.buffer_bytes = sum(int(value.nbytes) for _, value in model.named_buffers())
    return summary


def _shape_text(shape: tuple) -> str:
    return "x".join(str(size) for size in shape)


def _memory_text(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def format_summary(summary: ModelSummary) -> str:
    """The table as text (one layer a line; nested layers indented)."""
    header = ("layer", "type", "options", "output", "params", "MACs")
    lines = []
    for row in summary.rows:
        indent = "  " * row.depth
        lines.append((indent + row.name, row.type, row.description, _shape_text(row.output_shape), f"{row.params:,}", f"{row.macs:,}"))
    widths = [max(len(header[i]), *(len(line[i]) for line in lines)) for i in range(len(header))]

    def render(cells) -> str:
        left = [cells[i].ljust(widths[i]) for i in range(4)]
        right = [cells[i].rjust(widths[i]) for i in range(4, 6)]
        return "  ".join(left + right)

    rule = "-" * len(render(header))
    title = f"model {summary.name or ''}".rstrip() + f": input {_shape_text(summary.input_shape)} per sample, {summary.dtype}"
    out = [title, render(header), rule] + [render(line) for line in lines] + [rule]
    out.append(
        f"total: {summary.total_params:,} parameters ({_memory_text(summary.parameter_bytes)} as {summary.dtype}), "
        f"{summary.total_buffers:,} buffer values ({_memory_text(summary.buffer_bytes)}), "
        f"{summary.total_macs:,} MACs per sample"
    )
    return "\n".join(out)
