"""An ONNX file on disk: its checks (:func:`validate_onnx`), its identity (:func:`engine_sha256`, external data
included) and what it is (:func:`describe_onnx`). Parsing and external-data confinement are :mod:`exporters.graph`'s.

``onnx`` is imported by the checks and :func:`describe_onnx` only: :func:`engine_sha256` and :func:`combined_sha256`
(what an audit needs) read the file with :func:`exporters.graph.read_graph`'s parser.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exporters.graph import (
    elem_type_name,
    external_data_files,
    first_line,
    graph_interface,
    infer_precision,
    load_onnx,
    read_metadata,
    shape_text,
    uses_external_data,
)
from exporters.onnxproto import decode_error, parse_model
from kit.errors import UserError
from kit.io import require_file

if TYPE_CHECKING:
    import onnx

__all__ = ["combined_sha256", "describe_onnx", "engine_sha256", "validate_onnx"]


def validate_onnx(proto: onnx.ModelProto, path: str | Path | None = None) -> onnx.ModelProto:
    """``onnx.checker.check_model(full_check=True)`` and strict shape inference with type checks.

    ``path`` is the file ``proto`` was read from: a model with external data is checked from its file, so that the
    checker finds the data files beside it whatever the current folder.

    Returns
    -------
    onnx.ModelProto
        The graph with inferred shapes (the input is not modified).

    Raises
    ------
    onnx.checker.ValidationError, onnx.shape_inference.InferenceError
        On an invalid graph.
    """
    import onnx

    if path is not None and uses_external_data(proto):
        onnx.checker.check_model(str(path), full_check=True)
    else:
        onnx.checker.check_model(proto, full_check=True)
    return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)


def combined_sha256(data: bytes, files: Sequence[tuple[str, Path]]) -> str:
    """``"sha256:<hex>"`` of a model's bytes, alone, or with its external data files (see :func:`engine_sha256`)."""
    from kit.io import sha256_file

    own = hashlib.sha256(data).hexdigest()
    if not files:
        return "sha256:" + own
    h = hashlib.sha256(b"otkit.onnx-external-data/1\n")
    h.update(f"{own}\n".encode())
    for location, file in files:
        h.update(f"{location}\t{sha256_file(file)}\n".encode())
    return "sha256:" + h.hexdigest()


def engine_sha256(path: str | Path) -> str:
    """``"sha256:<hex>"`` identity of an engine file, covering every byte the runtime will read.

    The plain sha256 of the file's bytes, except for an ONNX file that keeps tensors in external data files: then the
    sha256 of the text ``"otkit.onnx-external-data/1\n"``, the model file's hex sha256 and a newline, then, per
    external data file in sorted order of its location, ``"<location>\t<hex sha256>\n"``. Editing the weights in
    an external data file thus changes the hash, while the hash of a self-contained file stays what
    ``sha256sum`` prints.

    A file that does not parse as ONNX gets its plain sha256 too (loading it fails; hashing it need not).

    Raises
    ------
    UserError
        A missing file; for ONNX, a missing external data file or one outside the model's folder.
    """
    from exporters.formats import engine_kind
    from kit.io import sha256_file

    p = require_file(path, "engine file")
    if engine_kind(p) != "onnx":
        return "sha256:" + sha256_file(p)
    data = p.read_bytes()
    try:
        proto = parse_model(data)
    except (decode_error(), ValueError):
        return combined_sha256(data, [])  # no model, so no external data: the file's bytes are all there is
    return combined_sha256(data, external_data_files(proto, p) if uses_external_data(proto) else [])


def describe_onnx(path: str | Path) -> dict[str, Any]:
    """What an ONNX file is: opset, inputs and outputs, metadata, sha256, checks, providers available.

    Raises
    ------
    UserError
        For a missing, corrupt or truncated file.
    """
    import onnx
    import onnxruntime as ort

    proto, data, label = load_onnx(path)
    external = external_data_files(proto, path) if uses_external_data(proto) else []
    checks: dict[str, str] = {}
    try:
        validate_onnx(proto, path)
        checks["checker_full"] = "pass"
        checks["strict_shape_inference"] = "pass"
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as e:
        # ValueError: the full check's shape inference on an element type no ONNX version defines (a corrupt file)
        checks["checker_full"] = f"fail: {first_line(e)}"
    meta = read_metadata(proto)
    try:
        io = graph_interface(proto, label, meta)
        runnable = {"runnable": True, "input_shape": list(io.input_shape), "num_classes": io.num_classes}
    except UserError as e:
        runnable = {"runnable": False, "reason": str(e)}
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1

    def value(v: onnx.ValueInfoProto) -> dict[str, Any]:
        return {"name": v.name, "type": elem_type_name(v.type.tensor_type.elem_type).lower(),
                "shape": shape_text(v)}

    initializers = {i.name for i in proto.graph.initializer}
    return {
        "path": label,
        "format": "onnx",
        "sha256": combined_sha256(data, external),
        "size_bytes": len(data),
        "external_data": [{"location": loc, "size_bytes": f.stat().st_size} for loc, f in external],
        "ir_version": proto.ir_version,
        "opset": {(o.domain or "ai.onnx"): o.version for o in proto.opset_import},
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "precision": str(meta.get("precision") or infer_precision(proto)),
        "inputs": [value(v) for v in proto.graph.input if v.name not in initializers],
        "outputs": [value(v) for v in proto.graph.output],
        "nodes": len(proto.graph.node),
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "parameters": int(sum(int(np.prod(t.dims)) for t in proto.graph.initializer)),
        "metadata": meta,
        "checks": checks,
        "otkit_engine": runnable,
        "providers_available": list(ort.get_available_providers()),
    }
