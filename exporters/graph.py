"""An otkit ONNX file as both backends read it: parsing, external data, metadata, the input/output interface.

The ONNX Runtime runner (:mod:`exporters.onnx`) and the TensorRT build (:mod:`exporters.tensorrt`) both start from an
ONNX file: :func:`load_onnx` parses it and confines its external data to the model's folder, :func:`read_metadata`
decodes the kit's ``otkit.*`` entries, :func:`graph_interface` checks that it is an (N, C, H, W) -> (N, K) classifier
and :func:`infer_precision` names its precision when no metadata does. Neither backend imports the other; what they
share lives here. Writing metadata is the ONNX exporter's (:mod:`exporters.onnx.metadata`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from exporters.formats import META_PREFIX, Precision
from kit.errors import UserError
from kit.io import require_file

__all__ = [
    "Interface",
    "decode_errors",
    "elem_type_name",
    "external_data_files",
    "first_line",
    "graph_interface",
    "infer_precision",
    "load_onnx",
    "read_metadata",
    "shape_text",
    "static_dim",
    "uses_external_data",
]

_ONNX_FLOAT_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}
#: what an engine's input may be: float, or uint8 pixels 0-255 (with ``--engine-input dtype=uint8``)
_ONNX_INPUT_TYPES = {**_ONNX_FLOAT_TYPES, onnx.TensorProto.UINT8: np.uint8}


def first_line(e: BaseException) -> str:
    """``Type: first line of the message`` of an exception, for one-line errors."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def static_dim(value: onnx.ValueInfoProto, axis: int) -> int | None:
    """The fixed size of ``value``'s dimension ``axis``, or ``None`` when it is symbolic or absent."""
    dims = value.type.tensor_type.shape.dim
    if axis >= len(dims) or not dims[axis].HasField("dim_value"):
        return None
    return int(dims[axis].dim_value)


def shape_text(value: onnx.ValueInfoProto) -> list[int | str]:
    """``value``'s shape for messages: sizes, symbolic names, ``"?"`` for unknown ones."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim]


def decode_errors() -> tuple[type[BaseException], ...]:
    """What parsing bytes that are not an ONNX model raises."""
    from google.protobuf.message import DecodeError

    return (DecodeError, ValueError, onnx.checker.ValidationError)


def load_onnx(source: str | Path | bytes, what: str = "ONNX file") -> tuple[onnx.ModelProto, bytes, str]:
    """Read and parse an ONNX file (or bytes).

    The tensors a file keeps in external data files are not read into the returned proto; those files must lie in the
    model's folder or below it (a location that leads elsewhere is refused), and they are found from the model's
    folder, not from the current one.

    Returns
    -------
    proto : onnx.ModelProto
    data : bytes
        The file's bytes.
    label : str
        The file name (or ``"<bytes>"``), for messages.

    Raises
    ------
    UserError
        A missing file, bytes that do not parse as an ONNX model (corrupt or truncated), bytes with external data (they
        have no folder to find it in), a missing external data file or one outside the model's folder.
    """
    path = None
    if isinstance(source, (bytes, bytearray)):
        data, label = bytes(source), "<bytes>"
    else:
        path = require_file(source, what)
        data, label = path.read_bytes(), str(path)
    try:
        proto = onnx.load_model_from_string(data)
    except decode_errors() as e:
        raise UserError(f"{label} is not a valid ONNX file (corrupt or truncated?): {first_line(e)}") from e
    if not proto.HasField("graph") or not len(proto.graph.node) or not len(proto.graph.output):
        raise UserError(f"{label} is not a valid ONNX file (corrupt or truncated?): it holds no complete graph")
    external = uses_external_data(proto)
    if external and path is None:
        raise UserError(f"{label} keeps tensors in external data files: load it from its file, not from bytes")
    if external and path is not None:
        external_data_files(proto, path)  # refuses locations outside the model's folder and missing files
    try:
        # with external data, the checker must see the file's path: it finds (and checks) the data files from it
        onnx.checker.check_model(str(path) if external else proto)
    except onnx.checker.ValidationError as e:
        raise UserError(f"{label} is not a valid ONNX file (corrupt or truncated?): {first_line(e)}") from e
    return proto, data, label


def _external_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return (t for t in _get_all_tensors(proto) if uses_external_data(t))


def uses_external_data(proto: onnx.ModelProto) -> bool:
    """Whether any tensor of ``proto`` keeps its data in an external file."""
    return next(_external_tensors(proto), None) is not None


def external_data_files(proto: onnx.ModelProto, path: str | Path) -> list[tuple[str, Path]]:
    """The external data files of the model read from ``path``: sorted, unique ``(location, file)`` pairs.

    ``location`` is the tensor's ``location`` entry as written in the model (a path relative to the model's folder);
    ``file`` the file it names. Empty for a model without external data.

    Raises
    ------
    UserError
        A tensor without a location, a location that is absolute or leads outside the model's folder (``..``, a
        symbolic link), or a missing file.
    """
    base = Path(path).resolve().parent
    found: dict[str, Path] = {}
    for t in _external_tensors(proto):
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        if location in found:
            continue
        rel = Path(location)
        target = (base / rel).resolve()
        if not location or rel.is_absolute() or ".." in rel.parts or not target.is_relative_to(base):
            raise UserError(f"{path}: tensor {t.name!r} keeps its data in {location!r}, outside the model's folder "
                            "(refused)")
        if not target.is_file():
            raise UserError(f"{path}: external data file {location!r} of tensor {t.name!r} not found beside the model")
        found[location] = target
    return sorted(found.items())


def read_metadata(proto: onnx.ModelProto) -> dict[str, Any]:
    """The ``otkit.*`` metadata of an ONNX graph, prefix removed, JSON values decoded (text kept as text)."""
    out: dict[str, Any] = {}
    for p in proto.metadata_props:
        if p.key.startswith(META_PREFIX):
            try:
                out[p.key[len(META_PREFIX):]] = json.loads(p.value)
            except (ValueError, RecursionError):  # not JSON, an integer beyond str's digit limit, or nested too deep
                out[p.key[len(META_PREFIX):]] = p.value
    return out


@dataclass(frozen=True)
class Interface:
    """The one input and one output of a graph the kit can run, as :func:`graph_interface` found them.

    ``input_dtype`` is a numpy type (``np.float32``, ``np.float16`` or ``np.uint8``), ``output_dtype`` a float one;
    ``input_shape`` is the kit's (C, H, W) (for an NHWC graph, its dimensions 3, 1, 2) and ``num_classes`` the K of
    the (N, K) logits.
    """

    input_name: str
    output_name: str
    input_dtype: Any
    output_dtype: Any
    input_shape: tuple[int, int, int]
    num_classes: int


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def elem_type_name(t: int) -> str:
    """ONNX element type name, or the raw number for a value no ONNX version defines (a corrupt file)."""
    try:
        return onnx.TensorProto.DataType.Name(t)
    except ValueError:
        return f"element type {t}"


def graph_interface(proto: onnx.ModelProto, label: str, meta: dict[str, Any], layout: str = "nchw") -> Interface:
    """Check that a graph is an image classifier the kit can run: one rank-4 image input, one (N, K) output.

    ``meta`` (:func:`read_metadata`) supplies (C, H, W) or K where the graph leaves them symbolic; ``layout``
    (``nchw`` or ``nhwc``, from the engine's input convention) says which of the input's dimensions is C.

    Raises
    ------
    UserError
        One line saying what the graph takes or returns instead, ``label`` naming the file.
    """
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    outputs = list(proto.graph.output)
    if len(inputs) != 1 or len(outputs) != 1:
        raise UserError(f"{label} has {len(inputs)} input(s) and {len(outputs)} output(s); otkit engines take one "
                        "image batch (N, C, H, W) and return one logits tensor (N, K)")
    inp, outp = inputs[0], outputs[0]
    rank = len(inp.type.tensor_type.shape.dim)
    if rank != 4:
        raise UserError(f"{label} takes a rank-{rank} input {inp.name!r} of shape {shape_text(inp)}; otkit engines "
                        "take image batches of rank 4 (N, C, H, W)")
    out_rank = len(outp.type.tensor_type.shape.dim)
    if out_rank != 2:
        raise UserError(f"{label} returns a rank-{out_rank} output {outp.name!r}; otkit engines return logits (N, K)")
    in_type, out_type = inp.type.tensor_type.elem_type, outp.type.tensor_type.elem_type
    if in_type not in _ONNX_INPUT_TYPES or out_type not in _ONNX_FLOAT_TYPES:
        raise UserError(f"{label}: input must be float32, float16 or uint8 and output float32 or float16, got "
                        f"{elem_type_name(in_type)} and {elem_type_name(out_type)}")
    dims = [static_dim(inp, a) for a in ((3, 1, 2) if layout == "nhwc" else (1, 2, 3))]
    recorded = meta.get("input_shape")
    if any(d is None for d in dims):
        if not (isinstance(recorded, list) and len(recorded) == 3 and all(_positive_int(v) for v in recorded)):
            raise UserError(f"{label}: input {inp.name!r} has shape {shape_text(inp)} with unknown (C, H, W), and no "
                            "otkit.input_shape metadata (three positive integers) says what it takes")
        dims = [int(v) for v in recorded]
    c, h, w = (int(d) for d in dims if d is not None)
    if min(c, h, w) < 1:
        raise UserError(f"{label}: input {inp.name!r} has shape {shape_text(inp)}; (C, H, W) must be positive")
    k = static_dim(outp, 1)
    if k is None:
        if not _positive_int(meta.get("num_classes")):
            raise UserError(f"{label}: output {outp.name!r} has shape {shape_text(outp)} with an unknown class count, "
                            "and no otkit.num_classes metadata (a positive integer)")
        k = int(meta["num_classes"])
    if k < 1:
        raise UserError(f"{label}: output {outp.name!r} has shape {shape_text(outp)}; the class count must be positive")
    return Interface(inp.name, outp.name, _ONNX_INPUT_TYPES[in_type], _ONNX_FLOAT_TYPES[out_type], (c, h, w), k)


def infer_precision(proto: onnx.ModelProto) -> str:
    """``int8`` for a graph with Q/DQ nodes, ``fp16`` for float16 weights, else ``fp32`` (for files without metadata)."""
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node):
        return Precision.INT8.value
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer):
        return Precision.FP16.value
    return Precision.FP32.value
