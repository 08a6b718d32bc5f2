"""An otkit ONNX file as both backends read it: parsing, external data, metadata, the input/output interface.

The ONNX Runtime runner (:mod:`exporters.onnx`) and the TensorRT build (:mod:`exporters.tensorrt`) both start from an
ONNX file: :func:`load_onnx` parses it and confines its external data to the model's folder, :func:`read_metadata`
decodes the kit's ``otkit.*`` entries, :func:`graph_interface` checks that it is an (N, C, H, W) -> (N, K) classifier
and :func:`infer_precision` names its precision when no metadata does; :func:`precision_census` counts what the graph
really computes in reduced precision and :func:`deployed_precision` names it from those counts. Neither backend
imports the other; what they share lives here. Writing metadata is the ONNX exporter's (:mod:`exporters.onnx.metadata`).

Running a file needs no ``onnx`` package (about 0.7 s of CPU to import): :func:`read_graph` parses it with the kit's
own reader (:mod:`exporters.onnxproto`) and leaves validation to ONNX Runtime, which checks the graph when it opens
it. Every function here reads either an ``onnx.ModelProto`` or that reader's message; only :func:`load_onnx` (a
checked ``onnx.ModelProto``, for export, the TensorRT build, the twin rebuilt from a graph, ``engine info``) imports
``onnx``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exporters.formats import META_PREFIX, Precision
from exporters.onnxproto import AttributeType, DataLocation, TensorType, decode_error, parse_model
from kit.errors import UserError
from kit.io import require_file

if TYPE_CHECKING:
    import onnx

__all__ = [
    "Interface",
    "REDUCED_PRECISION_BAR",
    "decode_errors",
    "deployed_precision",
    "elem_type_name",
    "external_data_files",
    "first_line",
    "graph_interface",
    "infer_precision",
    "load_onnx",
    "precision_census",
    "read_graph",
    "read_metadata",
    "shape_text",
    "static_dim",
    "uses_external_data",
]

_ONNX_FLOAT_TYPES = {TensorType.FLOAT: np.float32, TensorType.FLOAT16: np.float16}
#: what an engine's input may be: float, or uint8 pixels 0-255 (with ``--engine-input dtype=uint8``)
_ONNX_INPUT_TYPES = {**_ONNX_FLOAT_TYPES, TensorType.UINT8: np.uint8}


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
    """What parsing bytes that are not an ONNX model raises (with ``onnx``, or :func:`read_graph`'s reader)."""
    import onnx

    return (decode_error(), ValueError, onnx.checker.ValidationError)


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
    import onnx

    proto, data, label, path = _parse(source, what, onnx.load_model_from_string, decode_errors())
    external = uses_external_data(proto)
    try:
        # with external data, the checker must see the file's path: it finds (and checks) the data files from it
        onnx.checker.check_model(str(path) if external else proto)
    except onnx.checker.ValidationError as e:
        raise UserError(f"{label} is not a valid ONNX file: onnx.checker refuses it ({first_line(e)}); a corrupt or "
                        "truncated file, or a graph its opset does not allow") from e
    return proto, data, label


def read_graph(source: str | Path | bytes, what: str = "ONNX file") -> tuple[Any, bytes, str]:
    """Read and parse an ONNX file (or bytes) without the ``onnx`` package, for running it.

    Returns and raises as :func:`load_onnx` (the same refusals, the same external data confinement, the same
    messages), except that the graph is not put through ``onnx.checker``: ONNX Runtime checks it when it opens the
    file. The ``proto`` returned is :mod:`exporters.onnxproto`'s ``ModelProto``, which every function of this module
    reads like ONNX's.
    """
    proto, data, label, _ = _parse(source, what, parse_model, (decode_error(), ValueError))
    return proto, data, label


def _parse(source: str | Path | bytes, what: str, parse: Any,
           errors: tuple[type[BaseException], ...]) -> tuple[Any, bytes, str, Path | None]:
    """The file's bytes parsed with ``parse``, its graph present, its external data files confined and present."""
    path = None
    if isinstance(source, (bytes, bytearray)):
        data, label = bytes(source), "<bytes>"
    else:
        path = require_file(source, what)
        data, label = path.read_bytes(), str(path)
    try:
        proto = parse(data)
    except errors as e:
        # protobuf's own message names the private message type the kit parses with (otkit_onnx.ModelProto)
        detail = "its bytes are not a protobuf ModelProto" if isinstance(e, decode_error()) else first_line(e)
        raise UserError(f"{label} is not a valid ONNX file (corrupt or truncated?): {detail}") from e
    if not proto.HasField("graph") or not len(proto.graph.node) or not len(proto.graph.output):
        raise UserError(f"{label} is not a valid ONNX file (corrupt or truncated?): it holds no complete graph")
    external = uses_external_data(proto)
    if external and path is None:
        raise UserError(f"{label} keeps tensors in external data files: load it from its file, not from bytes")
    if external and path is not None:
        external_data_files(proto, path)  # refuses locations outside the model's folder and missing files
    return proto, data, label, path


def _graph_tensors(graph: Any) -> Iterator[Any]:
    """The initializers and the node attributes' tensors of ``graph`` and of its subgraphs, depth first."""
    yield from graph.initializer
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: Any) -> Iterator[Any]:
    for a in node.attribute:
        if a.HasField("t"):
            yield a.t
        yield from a.tensors
        if a.type == AttributeType.GRAPH:
            yield from _graph_tensors(a.g)
        if a.type == AttributeType.GRAPHS:
            for g in a.graphs:
                yield from _graph_tensors(g)


def _external_tensors(proto: Any) -> Iterator[Any]:
    """The tensors that keep their data in an external file: those ``onnx.external_data_helper`` finds (the
    initializers and attribute tensors of the graph, its subgraphs and the model's functions)."""
    functions = (t for f in proto.functions for n in f.node for t in _node_tensors(n))
    return (t for t in (*_graph_tensors(proto.graph), *functions)
            if t.HasField("data_location") and t.data_location == DataLocation.EXTERNAL)


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
    the (N, K) logits. ``static_batch`` is N where the graph fixes it (``torch.onnx.export`` without ``dynamic_axes``
    writes 1), else None.
    """

    input_name: str
    output_name: str
    input_dtype: Any
    output_dtype: Any
    input_shape: tuple[int, int, int]
    num_classes: int
    static_batch: int | None = None


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def elem_type_name(t: int) -> str:
    """ONNX element type name, or the raw number for a value no ONNX version defines (a corrupt file)."""
    try:
        return TensorType(t).name
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
            unknown = "/".join(n for n, d in zip("CHW", dims) if d is None)
            raise UserError(f"{label}: input {inp.name!r} has shape {shape_text(inp)}: its {unknown} "
                            f"{'is' if len(unknown) == 1 else 'are'} not fixed, and the kit audits one image size; "
                            "export the model with a fixed (C, H, W) (no dynamic axes but the batch)")
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
    batch = static_dim(inp, 0)
    return Interface(inp.name, outp.name, _ONNX_INPUT_TYPES[in_type], _ONNX_FLOAT_TYPES[out_type], (c, h, w), k,
                     batch if batch is not None and batch >= 1 else None)


def infer_precision(proto: onnx.ModelProto) -> str:
    """``int8`` for a graph with Q/DQ nodes, ``fp16`` for float16 weights, else ``fp32`` (for files without metadata)."""
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node):
        return Precision.INT8.value
    if any(t.data_type == TensorType.FLOAT16 for t in proto.graph.initializer):
        return Precision.FP16.value
    return Precision.FP32.value


#: Share of the weight elements of the compute operators that must be stored at a precision (or narrower) for
#: :func:`deployed_precision` to name it: 90%, which leaves room for the first and last layers that int8 deployments
#: often keep in float.
REDUCED_PRECISION_BAR = 0.9

#: Operators whose weights decide the precision, with the input(s) that may hold the weight, in the order tried: the
#: first that leads to a constant is the weight (a MatMul of two activations has none).
_COMPUTE_WEIGHTS: dict[str, tuple[int, ...]] = {
    "Conv": (1,), "ConvTranspose": (1,), "Gemm": (1, 0), "MatMul": (1, 0),
    # the QOperator format computes in integers without Q/DQ nodes: its weights are integer tensors
    "QLinearConv": (3,), "QLinearMatMul": (3, 0), "ConvInteger": (1,), "MatMulInteger": (1, 0),
}
#: Nodes a weight may pass through between its stored tensor and its operator without changing its values' precision.
_LAYOUT_OPS = frozenset({"Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})
_INT8_TYPES = frozenset({TensorType.INT8, TensorType.UINT8, TensorType.INT4, TensorType.UINT4})
_INT_TYPES = _INT8_TYPES | {TensorType.INT16, TensorType.UINT16, TensorType.INT32, TensorType.UINT32,
                            TensorType.INT64, TensorType.UINT64}
_WEIGHT_CLASSES = ("int8", "fp16", "fp32", "other")


def _all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph of its nodes (If, Loop, Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == AttributeType.GRAPH:
                yield from _all_graphs(a.g)
            elif a.type == AttributeType.GRAPHS:
                for g in a.graphs:
                    yield from _all_graphs(g)


def _elements(dims: Any) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _constant_tensor(node: onnx.NodeProto) -> tuple[int, int] | None:
    """``(element type, elements)`` of a Constant node's value, or ``None`` when it holds none the census counts."""
    for a in node.attribute:
        if a.name == "value" and a.type == AttributeType.TENSOR:
            return a.t.data_type, _elements(a.t.dims)
        if a.name == "value_float":
            return TensorType.FLOAT, 1
        if a.name == "value_floats":
            return TensorType.FLOAT, len(a.floats)
    return None


def _tally(table: dict[str, dict[str, int]], key: str, elements: int) -> None:
    entry = table.setdefault(key, {"tensors": 0, "elements": 0})
    entry["tensors"] += 1
    entry["elements"] += elements


def precision_census(proto: onnx.ModelProto) -> dict[str, Any]:
    """Count what an ONNX graph really computes in reduced precision, from the graph alone (no runtime).

    Every graph of the model is read (subgraphs of If/Loop/Scan included); "constants" are the initializers (sparse
    ones too) and the tensors of Constant nodes. Each weight of a compute operator (Conv, ConvTranspose, Gemm, MatMul
    and the QOperator forms QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger) is traced back from the operator
    through layout nodes (Identity, Transpose, Reshape, Squeeze, Unsqueeze, Flatten), Cast and DequantizeLinear to the
    constant that stores it, and classed as:

    * ``int8``: it passes a DequantizeLinear (or feeds a QOperator) from an 8-bit-or-narrower integer constant (INT8,
      UINT8, INT4, UINT4);
    * ``fp16``: it reaches its operator as float16 (stored in float16, or cast to float16 on the way); a float16
      weight cast back to float32 before its operator is ``fp32``, since the operator computes in float32;
    * ``fp32``: it reaches its operator as float32;
    * ``other``: anything else (bfloat16, double, float8 or int16 through a DequantizeLinear).

    A weight that does not lead to a constant (computed at run time, a graph input) is not classed: the operator
    counts in ``weights.without_constant_weight``. A constant shared by several operators counts once.

    Returns
    -------
    dict
        JSON-ready counts:

        ``nodes``
            number of nodes.
        ``quantize_linear``, ``dequantize_linear``
            QuantizeLinear and DequantizeLinear nodes.
        ``qdq_activation_pairs``
            DequantizeLinear nodes fed by a QuantizeLinear (quantised activations).
        ``weight_dequantize``
            DequantizeLinear nodes whose quantised input is an integer constant (weights and biases).
        ``dq_constants``
            element type name -> ``{"tensors", "elements"}`` of the integer constants feeding DequantizeLinear.
        ``constants``
            element type name -> ``{"tensors", "elements"}`` of every constant (``FLOAT16`` and ``FLOAT`` among them).
        ``casts``
            target element type name -> number of Cast nodes.
        ``inputs``, ``outputs``
            element type names of the graph's inputs (initializers excluded) and outputs.
        ``weights``
            the compute operators' weights: ``ops`` (operator type -> weight tensors, in the order first met),
            ``tensors`` and ``elements`` (all classed weights), one ``{"tensors", "elements"}`` per class (``int8``,
            ``fp16``, ``fp32``, ``other``), ``int8_activations`` (``int8`` weights whose operator's data input also
            comes from a DequantizeLinear: fully Q/DQ operators), ``without_constant_weight`` (operators whose weight
            is computed or an input), and ``int8_share`` / ``fp16_share``: the ``int8`` / ``fp16`` elements over all
            classed weight elements (0.0 when there are none).
        ``tensors``
            one entry per classed weight: ``op``, ``node`` (its name), ``tensor`` (the stored constant), ``elements``,
            ``stored`` (the constant's element type), ``seen`` (the element type the operator receives) and
            ``class``.
    """
    graphs = list(_all_graphs(proto.graph))
    nodes = [n for g in graphs for n in g.node]
    const_type: dict[str, int] = {}
    const_elements: dict[str, int] = {}
    for g in graphs:
        for t in g.initializer:
            const_type[t.name], const_elements[t.name] = t.data_type, _elements(t.dims)
        for s in g.sparse_initializer:
            const_type[s.values.name], const_elements[s.values.name] = s.values.data_type, _elements(s.dims)
    for n in nodes:
        value = _constant_tensor(n) if n.op_type == "Constant" and n.domain in ("", "ai.onnx") else None
        if value is not None and n.output:
            const_type[n.output[0]], const_elements[n.output[0]] = value
    producer = {out: n for n in nodes for out in n.output if out}

    constants: dict[str, dict[str, int]] = {}
    for name, t in const_type.items():
        _tally(constants, elem_type_name(t), const_elements[name])
    casts: dict[str, int] = {}
    for n in nodes:
        if n.op_type == "Cast":
            to = next((int(a.i) for a in n.attribute if a.name == "to"), 0)
            casts[elem_type_name(to)] = casts.get(elem_type_name(to), 0) + 1

    def source(name: str) -> str | None:
        """The constant a value is, through layout nodes and casts only (for a DequantizeLinear's quantised input)."""
        seen_names: set[str] = set()
        while name not in const_type:
            node = producer.get(name)
            if node is None or name in seen_names or node.op_type not in _LAYOUT_OPS | {"Cast"} or not node.input:
                return None
            seen_names.add(name)
            name = node.input[0]
        return name

    dq_nodes = [n for n in nodes if n.op_type == "DequantizeLinear"]
    pairs = sum(1 for n in dq_nodes if n.input and getattr(producer.get(n.input[0]), "op_type", "") == "QuantizeLinear")
    dq_constants: dict[str, dict[str, int]] = {}
    weight_dq = 0
    counted_dq: set[str] = set()
    for n in dq_nodes:
        src = source(n.input[0]) if n.input else None
        if src is None or const_type[src] not in _INT_TYPES:
            continue
        weight_dq += 1
        if src not in counted_dq:
            counted_dq.add(src)
            _tally(dq_constants, elem_type_name(const_type[src]), const_elements[src])

    def trace(name: str) -> tuple[str, int, int, bool] | None:
        """``(constant, stored type, type the operator receives, dequantised)`` of a weight, or ``None``."""
        cast_to: int | None = None
        dq_out: int | None = None
        visited: set[str] = set()
        while name not in const_type:
            node = producer.get(name)
            if node is None or name in visited or not node.input:
                return None
            visited.add(name)
            if node.op_type == "Cast":
                if cast_to is None and dq_out is None:
                    cast_to = next((int(a.i) for a in node.attribute if a.name == "to"), 0)
            elif node.op_type == "DequantizeLinear":
                if dq_out is None:  # its output has its scale's type
                    scale = source(node.input[1]) if len(node.input) > 1 else None
                    dq_out = const_type[scale] if scale is not None else TensorType.FLOAT
            elif node.op_type not in _LAYOUT_OPS:
                return None
            name = node.input[0]
        stored = const_type[name]
        seen = cast_to if cast_to is not None else dq_out if dq_out is not None else stored
        return name, stored, seen, dq_out is not None

    weights: dict[str, Any] = {"ops": {}, "tensors": 0, "elements": 0,
                               **{c: {"tensors": 0, "elements": 0} for c in _WEIGHT_CLASSES},
                               "int8_activations": 0, "without_constant_weight": 0}
    tensors: list[dict[str, Any]] = []
    classed: set[tuple[str, str]] = set()
    for n in nodes:
        slots = _COMPUTE_WEIGHTS.get(n.op_type) if n.domain in ("", "ai.onnx") else None
        if slots is None:
            continue
        found = next(((i, t) for i in slots if i < len(n.input) and (t := trace(n.input[i])) is not None), None)
        if found is None:
            weights["without_constant_weight"] += 1
            continue
        slot, (const, stored, seen, dequantised) = found
        integer_op = n.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul")
        if (dequantised or integer_op) and stored in _INT8_TYPES:
            cls = "int8"
        elif dequantised or integer_op:
            cls = "other"
        else:
            cls = {TensorType.FLOAT16: "fp16", TensorType.FLOAT: "fp32"}.get(seen, "other")
        if (const, cls) in classed:
            continue
        classed.add((const, cls))
        elements = const_elements[const]
        weights["ops"][n.op_type] = weights["ops"].get(n.op_type, 0) + 1
        weights["tensors"] += 1
        weights["elements"] += elements
        weights[cls]["tensors"] += 1
        weights[cls]["elements"] += elements
        data_slot = 0 if slot != 0 else (3 if n.op_type == "QLinearMatMul" else 1)
        data = producer.get(n.input[data_slot]) if data_slot < len(n.input) else None
        if cls == "int8" and (integer_op or getattr(data, "op_type", "") == "DequantizeLinear"):
            weights["int8_activations"] += 1
        tensors.append({"op": n.op_type, "node": n.name, "tensor": const, "elements": elements,
                        "stored": elem_type_name(stored), "seen": elem_type_name(seen), "class": cls})
    total = weights["elements"]
    weights["int8_share"] = weights["int8"]["elements"] / total if total else 0.0
    weights["fp16_share"] = weights["fp16"]["elements"] / total if total else 0.0

    initializers = set(const_type)
    return {
        "nodes": len(nodes),
        "quantize_linear": sum(1 for n in nodes if n.op_type == "QuantizeLinear"),
        "dequantize_linear": len(dq_nodes),
        "qdq_activation_pairs": pairs,
        "weight_dequantize": weight_dq,
        "dq_constants": dq_constants,
        "constants": constants,
        "casts": casts,
        "inputs": [elem_type_name(i.type.tensor_type.elem_type) for i in proto.graph.input
                   if i.name not in initializers],
        "outputs": [elem_type_name(o.type.tensor_type.elem_type) for o in proto.graph.output],
        "weights": weights,
        "tensors": tensors,
    }


def deployed_precision(census: dict[str, Any]) -> str:
    """The precision a graph computes in, from its :func:`precision_census`: ``int8``, ``fp16`` or ``fp32``.

    The rule, on the weights of the compute operators (Conv, ConvTranspose, Gemm, MatMul and their QOperator forms),
    by element count:

    * ``int8`` when at least :data:`REDUCED_PRECISION_BAR` (90%) of the weight elements are ``int8`` (8-bit integers
      dequantised by a DequantizeLinear, or feeding a QOperator);
    * else ``fp16`` when at least 90% are 16 bits or narrower (``fp16`` + ``int8``): a mostly float16 graph;
    * else ``fp32``.

    A graph with no compute operator at all has nothing to measure and falls back to :func:`infer_precision`'s rule
    (any DequantizeLinear: ``int8``; any float16 constant: ``fp16``). Compute operators whose weights are computed at
    run time are not classed; when they are all there is, the graph counts as ``fp32``.
    """
    w = census["weights"]
    total = w["elements"]
    if total == 0:
        if w["without_constant_weight"]:
            return Precision.FP32.value
        if census["dequantize_linear"]:
            return Precision.INT8.value
        if census["constants"].get("FLOAT16", {}).get("tensors", 0):
            return Precision.FP16.value
        return Precision.FP32.value
    int8, fp16 = w["int8"]["elements"], w["fp16"]["elements"]
    if int8 >= REDUCED_PRECISION_BAR * total:
        return Precision.INT8.value
    if int8 + fp16 >= REDUCED_PRECISION_BAR * total:
        return Precision.FP16.value
    return Precision.FP32.value
