"""ONNX export of a twin, its self-checks, and the ONNX Runtime engine that runs the file.

Export (:func:`export_onnx`) runs in three steps:

1. :func:`torch_to_onnx`: ``torch.onnx.export`` with the current exporter (``dynamo=True``), opset >= 18, a dynamic
   batch dimension and the model in eval mode. Only when that exporter fails does the legacy TorchScript exporter run;
   which one ran, and why, is recorded in the file.
2. Reduced precision, when asked for (:mod:`exporters.quantize`): float16, or static int8 Q/DQ calibrated on dataset
   samples.
3. :func:`write_onnx_export`: the kit's metadata goes into ``metadata_props`` (twin weights sha256, architecture,
   classes, input shape and range, kit version, precision, exporter), then ``onnx.checker.check_model(full_check=True)``
   and strict shape inference, then parity against the twin on real samples through :class:`OnnxRuntimeEngine`. An
   FP32 export beyond tolerance raises :class:`exporters.parity.ParityError` with the numbers and writes nothing; fp16
   and int8 exports report their agreement and logit gap. The file is written atomically.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import onnx
import torch
from torch import nn

import kit
from exporters.engines import Engine, _check_max_batch
from exporters.formats import DEFAULT_MAX_BATCH, DEFAULT_OPSET, META_PREFIX, MIN_OPSET, ORT_PROVIDERS, Precision
from exporters.parity import ParityError, ParityReport, measure_parity
from kit.errors import UserError
from kit.io import atomic_write, require_file

if TYPE_CHECKING:
    from kit.checkpoint import CheckpointInfo

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "PROVIDERS",
    "OnnxExport",
    "OnnxGraph",
    "OnnxRuntimeEngine",
    "describe_onnx",
    "engine_sha256",
    "export_onnx",
    "external_data_files",
    "load_onnx",
    "read_metadata",
    "torch_to_onnx",
    "validate_onnx",
    "write_onnx_export",
]

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
FORMAT_TAG = "otkit.onnx/1"

PROVIDERS = ORT_PROVIDERS

_ONNX_FLOAT_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


# ---------------------------------------------------------------------------------------------------------- export
@dataclass
class OnnxGraph:
    """An FP32 ONNX graph fresh from the PyTorch exporter.

    Attributes
    ----------
    proto : onnx.ModelProto
        The graph: one float32 input ``input`` (batch, C, H, W) with a dynamic batch, one output ``logits``.
    exporter : str
        ``"dynamo"`` (torch.export-based) or ``"torchscript"`` (the legacy exporter, only after the first failed).
    exporter_note : str
        Why the legacy exporter ran (empty when it did not).
    opset : int
    seconds : float
        Time the export took.
    """

    proto: onnx.ModelProto
    exporter: str
    exporter_note: str
    opset: int
    seconds: float


@contextlib.contextmanager
def _quiet_torch_exporter() -> Iterator[None]:
    """Keep the exporter's chatter off the user's terminal.

    The exporter logs every optimisation pass at INFO (``onnx_ir``, ``onnxscript``), warns about optional libraries it
    does not need (torchvision ops) and raises internal deprecation warnings; real failures still raise.
    """
    names = ("torch.onnx._internal.exporter._registration", "onnx_ir", "onnxscript")
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for lg, level in zip(loggers, before):
            lg.setLevel(level)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def torch_to_onnx(model: nn.Module, input_shape: Sequence[int], *, opset: int = DEFAULT_OPSET,
                  dynamo: bool = True) -> OnnxGraph:
    """Export ``model`` (in eval mode, on the CPU) to an FP32 ONNX graph with a dynamic batch dimension.

    Parameters
    ----------
    model : nn.Module
        Takes (N, C, H, W) pixels in [0, 1], returns logits (N, K). A copy is exported; the model is not modified.
    input_shape : sequence of int
        (C, H, W).
    opset : int
        ONNX opset, >= 18.
    dynamo : bool
        Try the current (torch.export-based) exporter first; ``False`` goes straight to the legacy one.

    Returns
    -------
    OnnxGraph
    """
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise UserError(f"opset must be an integer >= {MIN_OPSET}, got {opset!r}")
    params = next(iter(model.parameters()), None)
    on_cpu = params is None or params.device.type == "cpu"
    m = (model if on_cpu else copy.deepcopy(model).cpu()).eval()
    c, h, w = (int(v) for v in input_shape)
    example = torch.rand(2, c, h, w, generator=torch.Generator().manual_seed(0))
    note = ""
    t0 = time.perf_counter()
    proto: onnx.ModelProto | None = None
    if dynamo:
        try:
            with _quiet_torch_exporter(), torch.no_grad():
                program = torch.onnx.export(
                    m, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME], dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                    verbose=False,
                )
            if program is None:
                raise RuntimeError("torch.onnx.export(dynamo=True) returned no program")
            proto = program.model_proto
        except Exception as e:  # any failure of the new exporter sends us to the legacy one  # noqa: BLE001
            note = f"dynamo exporter failed ({_first_line(e)})"
            log.warning("ONNX export: %s; falling back to the legacy TorchScript exporter", note)
    exporter = "dynamo"
    if proto is None:
        exporter = "torchscript"
        note = note or "legacy exporter requested"
        with tempfile.TemporaryDirectory(prefix="otkit-onnx-") as tmp:
            path = Path(tmp, "model.onnx")
            with _quiet_torch_exporter(), torch.no_grad():
                torch.onnx.export(
                    m, (example,), str(path), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    do_constant_folding=True,
                )
            proto = onnx.load(str(path))
    got = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if got < MIN_OPSET:
        raise RuntimeError(f"the {exporter} exporter wrote opset {got}, below the required {MIN_OPSET}")
    return OnnxGraph(proto=proto, exporter=exporter, exporter_note=note, opset=got, seconds=time.perf_counter() - t0)


def _model_record(model: nn.Module, info: CheckpointInfo | None, num_classes: int) -> dict[str, Any]:
    """What the twin is: from its checkpoint when there is one, else from the model itself."""
    if info is not None:
        return {"weights_sha256": info.weights_sha256, "arch": info.arch, "arch_name": info.arch_name,
                "classes": list(info.class_names), "num_classes": info.num_classes,
                "input_shape": list(info.input_shape), "normalization": info.normalization,
                "dataset": info.dataset, "defense": info.defense}
    from kit.checkpoint import weights_sha256

    config = getattr(model, "config", None)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return {"weights_sha256": weights_sha256(state), "arch": config if isinstance(config, dict) else {},
            "arch_name": getattr(model, "name", type(model).__name__),
            "classes": [str(i) for i in range(num_classes)], "num_classes": num_classes,
            "input_shape": list(getattr(model, "input_shape", [])), "normalization": {}, "dataset": {},
            "defense": ""}


def build_metadata(record: dict[str, Any], *, precision: Precision, graph: OnnxGraph, max_batch: int,
                   calibration: dict[str, Any] | None = None) -> dict[str, str]:
    """The ``metadata_props`` of an otkit ONNX file (keys prefixed ``otkit.``, values text or JSON)."""
    meta: dict[str, Any] = {
        "format": FORMAT_TAG,
        "kit_version": kit.__version__,
        "torch_version": torch.__version__,
        "weights_sha256": record["weights_sha256"],
        "arch": record["arch_name"],
        "arch_record": record["arch"],
        "classes": record["classes"],
        "num_classes": record["num_classes"],
        "input_shape": record["input_shape"],
        "input_layout": "NCHW",
        "input_range": [0.0, 1.0],
        "normalization": "inside the graph",
        "precision": precision.value,
        "exporter": graph.exporter,
        "exporter_note": graph.exporter_note,
        "opset": graph.opset,
        "max_batch": max_batch,
        "dataset": record["dataset"],
        "defense": record["defense"],
    }
    if calibration is not None:
        meta["calibration"] = calibration
    return {META_PREFIX + k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in meta.items()}


def set_metadata(proto: onnx.ModelProto, meta: dict[str, str]) -> None:
    """Replace the ``otkit.*`` entries of ``proto.metadata_props`` by ``meta`` (others are kept)."""
    keep = [(p.key, p.value) for p in proto.metadata_props if not p.key.startswith(META_PREFIX)]
    del proto.metadata_props[:]
    for k, v in [*keep, *sorted(meta.items())]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


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
    if path is not None and _uses_external_data(proto):
        onnx.checker.check_model(str(path), full_check=True)
    else:
        onnx.checker.check_model(proto, full_check=True)
    return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)


@dataclass
class OnnxExport:
    """A written ONNX export and its checks.

    Attributes
    ----------
    path : Path
    precision : str
    exporter : str
        ``"dynamo"`` or ``"torchscript"``.
    exporter_note : str
    opset : int
    sha256 : str
        ``"sha256:<hex>"`` of the file.
    size_bytes : int
    parity : ParityReport
    metadata : dict
        The ``otkit.*`` metadata as written (decoded).
    seconds : dict
        Wall time of ``export``, ``convert`` (fp16/int8), ``check`` and ``parity``.
    """

    path: Path
    precision: str
    exporter: str
    exporter_note: str
    opset: int
    sha256: str
    size_bytes: int
    parity: ParityReport
    metadata: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {"path": str(self.path), "format": "onnx", "precision": self.precision, "exporter": self.exporter,
                "exporter_note": self.exporter_note, "opset": self.opset, "sha256": self.sha256,
                "size_bytes": self.size_bytes, "parity": self.parity.to_dict(),
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


def write_onnx_export(
    graph: OnnxGraph,
    out: str | Path,
    twin: nn.Module,
    parity_x: torch.Tensor,
    *,
    info: CheckpointInfo | None = None,
    precision: Precision | str = Precision.FP32,
    parity_y: torch.Tensor | None = None,
    calibration_x: torch.Tensor | None = None,
    calibration: dict[str, Any] | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> OnnxExport:
    """Convert (fp16/int8), stamp metadata, self-check, check parity against ``twin``, then write ``out`` atomically.

    Parameters
    ----------
    graph : OnnxGraph
        An FP32 export of ``twin`` (:func:`torch_to_onnx`); it can serve several precisions.
    out : str or Path
        Destination ``.onnx`` file; nothing is written unless every check passes.
    twin : nn.Module
        The reference model; its logits on ``parity_x`` are compared to ONNX Runtime's (CPU).
    parity_x : torch.Tensor
        Real samples (N, C, H, W) in [0, 1], preferably from the test split.
    info : CheckpointInfo, optional
        The twin's checkpoint metadata (weights sha256, classes, ...); without it they come from the model.
    precision : Precision or str
        ``fp32``, ``fp16`` or ``int8``.
    parity_y : torch.Tensor, optional
        Labels of ``parity_x``, to report accuracies.
    calibration_x : torch.Tensor, optional
        int8 only (required there): calibration samples, preferably from the training split.
    calibration : dict, optional
        Where the calibration samples came from (recorded in the metadata).
    max_batch : int
        Largest batch the runner sends in one call (recorded in the metadata).

    Raises
    ------
    ParityError
        An FP32 export whose logits are beyond tolerance (nothing is written).
    """
    from exporters import quantize

    precision = Precision(precision)
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise UserError(f"ONNX output must end in .onnx: {out}")
    max_batch = _check_max_batch(max_batch)
    seconds = {"export": graph.seconds}
    t0 = time.perf_counter()
    if precision is Precision.FP16:
        proto = quantize.to_fp16(graph.proto)
    elif precision is Precision.INT8:
        if calibration_x is None or len(calibration_x) == 0:
            raise UserError("int8 export needs calibration samples")
        calib = calibration_x.detach().to("cpu", torch.float32).numpy()
        proto = quantize.to_int8(graph.proto, calib)
        calibration = {"samples": len(calib), **(calibration or {})}
    else:
        proto = copy.deepcopy(graph.proto)
    seconds["convert"] = time.perf_counter() - t0
    num_classes = _static_dim(graph.proto.graph.output[0], 1)
    if num_classes is None:
        raise RuntimeError("the exported graph has no static class dimension")
    record = _model_record(twin, info, num_classes)
    meta = build_metadata(record, precision=precision, graph=graph, max_batch=max_batch,
                          calibration=calibration if precision is Precision.INT8 else None)
    set_metadata(proto, meta)
    proto.doc_string = f"otkit {kit.__version__}: {record['arch_name']} ({precision.value}), pixels in [0, 1] NCHW"
    t0 = time.perf_counter()
    validate_onnx(proto)
    seconds["check"] = time.perf_counter() - t0
    data = proto.SerializeToString()
    t0 = time.perf_counter()
    engine = OnnxRuntimeEngine(data, name=out.name, providers=["cpu"], max_batch=max_batch)
    twin_dev = next(iter(twin.parameters())).device
    parity = measure_parity(twin.eval(), engine, parity_x.to(twin_dev), precision=precision,
                            name=engine.name, labels=parity_y, runtime="onnxruntime", batch_size=max_batch)
    seconds["parity"] = time.perf_counter() - t0
    if not parity.passed:
        raise ParityError(parity)
    with atomic_write(out) as f:
        f.write(data)
    return OnnxExport(path=out, precision=precision.value, exporter=graph.exporter, exporter_note=graph.exporter_note,
                      opset=graph.opset, sha256="sha256:" + hashlib.sha256(data).hexdigest(), size_bytes=len(data),
                      parity=parity, metadata=read_metadata(proto), seconds=seconds)


def export_onnx(
    twin: nn.Module,
    out: str | Path,
    parity_x: torch.Tensor,
    *,
    info: CheckpointInfo | None = None,
    precision: Precision | str = Precision.FP32,
    parity_y: torch.Tensor | None = None,
    calibration_x: torch.Tensor | None = None,
    calibration: dict[str, Any] | None = None,
    opset: int = DEFAULT_OPSET,
    max_batch: int = DEFAULT_MAX_BATCH,
    dynamo: bool = True,
) -> OnnxExport:
    """Export ``twin`` to ``out`` at ``precision`` and check it (:func:`torch_to_onnx` + :func:`write_onnx_export`).

    ``twin`` must take (N, C, H, W) pixels in [0, 1]; its input shape is that of ``parity_x``.
    """
    graph = torch_to_onnx(twin, tuple(parity_x.shape[1:]), opset=opset, dynamo=dynamo)
    return write_onnx_export(graph, out, twin, parity_x, info=info, precision=precision, parity_y=parity_y,
                             calibration_x=calibration_x, calibration=calibration, max_batch=max_batch)


# --------------------------------------------------------------------------------------------------------- loading
def _static_dim(value: onnx.ValueInfoProto, axis: int) -> int | None:
    dims = value.type.tensor_type.shape.dim
    if axis >= len(dims) or not dims[axis].HasField("dim_value"):
        return None
    return int(dims[axis].dim_value)


def _shape_text(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim]


def _decode_errors() -> tuple[type[BaseException], ...]:
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
    except _decode_errors() as e:
        raise UserError(f"{label} is not a valid ONNX file (corrupt or truncated?): {_first_line(e)}") from e
    if not proto.HasField("graph") or not len(proto.graph.node) or not len(proto.graph.output):
        raise UserError(f"{label} is not a valid ONNX file (corrupt or truncated?): it holds no complete graph")
    external = _uses_external_data(proto)
    if external and path is None:
        raise UserError(f"{label} keeps tensors in external data files: load it from its file, not from bytes")
    if external and path is not None:
        external_data_files(proto, path)  # refuses locations outside the model's folder and missing files
    try:
        # with external data, the checker must see the file's path: it finds (and checks) the data files from it
        onnx.checker.check_model(str(path) if external else proto)
    except onnx.checker.ValidationError as e:
        raise UserError(f"{label} is not a valid ONNX file (corrupt or truncated?): {_first_line(e)}") from e
    return proto, data, label


def _external_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return (t for t in _get_all_tensors(proto) if uses_external_data(t))


def _uses_external_data(proto: onnx.ModelProto) -> bool:
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


def _combined_sha256(data: bytes, files: Sequence[tuple[str, Path]]) -> str:
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
        proto = onnx.load_model_from_string(data)
    except _decode_errors():
        return _combined_sha256(data, [])  # no model, so no external data: the file's bytes are all there is
    return _combined_sha256(data, external_data_files(proto, p) if _uses_external_data(proto) else [])


@dataclass(frozen=True)
class _Interface:
    input_name: str
    output_name: str
    input_dtype: Any
    output_dtype: Any
    input_shape: tuple[int, int, int]
    num_classes: int


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _elem_type_name(t: int) -> str:
    """ONNX element type name, or the raw number for a value no ONNX version defines (a corrupt file)."""
    try:
        return onnx.TensorProto.DataType.Name(t)
    except ValueError:
        return f"element type {t}"


def _interface(proto: onnx.ModelProto, label: str, meta: dict[str, Any]) -> _Interface:
    """Check that a graph is an image classifier the kit can run: one (N, C, H, W) float input, one (N, K) output."""
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    outputs = list(proto.graph.output)
    if len(inputs) != 1 or len(outputs) != 1:
        raise UserError(f"{label} has {len(inputs)} input(s) and {len(outputs)} output(s); otkit engines take one "
                        "image batch (N, C, H, W) and return one logits tensor (N, K)")
    inp, outp = inputs[0], outputs[0]
    rank = len(inp.type.tensor_type.shape.dim)
    if rank != 4:
        raise UserError(f"{label} takes a rank-{rank} input {inp.name!r} of shape {_shape_text(inp)}; otkit engines "
                        "take image batches of rank 4 (N, C, H, W)")
    out_rank = len(outp.type.tensor_type.shape.dim)
    if out_rank != 2:
        raise UserError(f"{label} returns a rank-{out_rank} output {outp.name!r}; otkit engines return logits (N, K)")
    in_type, out_type = inp.type.tensor_type.elem_type, outp.type.tensor_type.elem_type
    if in_type not in _ONNX_FLOAT_TYPES or out_type not in _ONNX_FLOAT_TYPES:
        raise UserError(f"{label}: input and output must be float32 or float16 tensors, got "
                        f"{_elem_type_name(in_type)} and {_elem_type_name(out_type)}")
    dims = [_static_dim(inp, a) for a in (1, 2, 3)]
    recorded = meta.get("input_shape")
    if any(d is None for d in dims):
        if not (isinstance(recorded, list) and len(recorded) == 3 and all(_positive_int(v) for v in recorded)):
            raise UserError(f"{label}: input {inp.name!r} has shape {_shape_text(inp)} with unknown (C, H, W), and no "
                            "otkit.input_shape metadata (three positive integers) says what it takes")
        dims = [int(v) for v in recorded]
    c, h, w = (int(d) for d in dims if d is not None)
    if min(c, h, w) < 1:
        raise UserError(f"{label}: input {inp.name!r} has shape {_shape_text(inp)}; (C, H, W) must be positive")
    k = _static_dim(outp, 1)
    if k is None:
        if not _positive_int(meta.get("num_classes")):
            raise UserError(f"{label}: output {outp.name!r} has shape {_shape_text(outp)} with an unknown class count, "
                            "and no otkit.num_classes metadata (a positive integer)")
        k = int(meta["num_classes"])
    if k < 1:
        raise UserError(f"{label}: output {outp.name!r} has shape {_shape_text(outp)}; the class count must be positive")
    return _Interface(inp.name, outp.name, _ONNX_FLOAT_TYPES[in_type], _ONNX_FLOAT_TYPES[out_type], (c, h, w), k)


def _infer_precision(proto: onnx.ModelProto) -> str:
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node):
        return Precision.INT8.value
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer):
        return Precision.FP16.value
    return Precision.FP32.value


def _ort_errors() -> tuple[type[BaseException], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    return tuple(c for c in (getattr(state, n, None) for n in names) if isinstance(c, type)) + (RuntimeError,)


# ---------------------------------------------------------------------------------------------------------- runner
#: ONNX element types of the float tensors the runner binds (what ``IOBinding`` takes for ``element_type``).
_ONNX_ELEMENT = {np.float32: onnx.TensorProto.FLOAT, np.float16: onnx.TensorProto.FLOAT16}


class _CpuBinding(NamedTuple):
    """ONNX Runtime's C-level IO binding for the CPU (what ``InferenceSession.run_with_iobinding`` itself calls), with
    everything a call needs resolved once.

    ``InferenceSession.run`` spends several microseconds per call in Python (graph-capture and input-name checks,
    numpy wrapping of the input and the output), as does the public ``IOBinding`` wrapper (an ``OrtDevice`` built per
    bind). At batch 1 on a small model that is 10-20 % of the inference, so the runner binds the caller's torch input
    and a fresh output buffer by address on the C-level objects directly. A tuple, so a call unpacks it in one step.
    """

    new: Callable[[], Any]  # a fresh C-level SessionIOBinding on the session
    run: Callable[[Any, Any], Any]  # the C-level session's run_with_iobinding(binding, run_options)
    device: Any  # the C-level OrtDevice of the CPU
    input_name: str
    input_element: int  # ONNX element type of the input (float or float16)
    output_name: str
    output_element: int
    output_dtype: Any  # numpy dtype of the output buffer
    num_classes: int


def _cpu_binding(session: Any, io: _Interface) -> _CpuBinding | None:
    """The C-level IO binding of ``session``, or None when this ONNX Runtime does not expose it as expected.

    Uses ``InferenceSession._sess`` and ``onnxruntime.capi._pybind_state.SessionIOBinding``, the objects the public
    wrappers delegate to (checked with ONNX Runtime 1.31; not a public API, so they are probed here once): when they
    are missing the runner uses ``InferenceSession.run``, which gives the same logits, a few microseconds slower.
    """
    import onnxruntime as ort

    try:
        from onnxruntime.capi import _pybind_state as capi

        sess = session._sess
        run = sess.run_with_iobinding
        device = ort.OrtDevice.make("cpu", 0)._get_c_device()
        capi.SessionIOBinding(sess)
    except (ImportError, AttributeError, TypeError, RuntimeError) as e:
        log.info("ONNX Runtime %s exposes no C-level IO binding (%s); the runner uses InferenceSession.run",
                 ort.__version__, _first_line(e))
        return None
    return _CpuBinding(new=functools.partial(capi.SessionIOBinding, sess), run=run, device=device,
                       input_name=io.input_name, input_element=_ONNX_ELEMENT[io.input_dtype],
                       output_name=io.output_name, output_element=_ONNX_ELEMENT[io.output_dtype],
                       output_dtype=io.output_dtype, num_classes=io.num_classes)


class OnnxRuntimeEngine(Engine):
    """An ONNX file run by ONNX Runtime on the CPU, CUDA or TensorRT execution provider.

    The session is created with exactly the providers asked for; each must be available and active after creation
    (no silent fallback to the CPU), and the session's run-time fallback is disabled. On CUDA, inputs and outputs are
    bound to torch CUDA tensors (IO binding), so batches stay on the GPU, and TF32 is off for FP32 parity.

    On the CPU the runner adds only a few microseconds to the session's own run (``bench/engines.py``; figures in
    docs/BENCHMARKS.md): names, element types and the expected shape are resolved once here; a call checks the
    shape, dtype and device on the tensor's metadata (no pass over the pixels), binds the caller's contiguous CPU
    tensor and a fresh output tensor by address through ONNX Runtime's IO binding (one binding per thread, so
    concurrent callers do not share one), and returns that output: no numpy round trip, no copy of either side.

    Parameters
    ----------
    source : str, Path or bytes
        The ONNX file (or its bytes).
    device : str or torch.device
        Where the session computes; CUDA providers need a CUDA device.
    providers : sequence of str, optional
        Short names from :data:`PROVIDERS`; default ``["cpu"]`` on a CPU device, ``["cuda"]`` on a CUDA device.
        ``"tensorrt"`` runs with CUDA behind it for the nodes TensorRT does not take.
    max_batch : int, optional
        Largest batch per session run; default: the file's ``otkit.max_batch``, else 256.
    name : str, optional
        Label (default: the file name).

    Raises
    ------
    UserError
        Corrupt or truncated file, a graph that is not (N, C, H, W) -> (N, K), an unknown or unavailable provider.
    """

    backend = "onnxruntime"

    def __init__(self, source: str | Path | bytes, device: str | torch.device = "cpu",
                 providers: Sequence[str] | None = None, max_batch: int | None = None,
                 name: str | None = None) -> None:
        import onnxruntime as ort

        proto, data, label = load_onnx(source)
        external = [] if isinstance(source, (bytes, bytearray)) or not _uses_external_data(proto) else \
            external_data_files(proto, source)
        self.metadata = read_metadata(proto)
        self._io = _interface(proto, label, self.metadata)
        self.device = torch.device(device)
        short = [p.strip().lower() for p in (providers or (["cpu"] if self.device.type == "cpu" else ["cuda"]))]
        unknown = [p for p in short if p not in PROVIDERS]
        if unknown:
            raise UserError(f"unknown ONNX Runtime provider(s) {', '.join(unknown)}; use {', '.join(PROVIDERS)}")
        gpu = [p for p in short if p != "cpu"]
        if gpu and self.device.type != "cuda":
            raise UserError(f"provider(s) {', '.join(gpu)} run on a CUDA device, not {self.device} (use --device cuda)")
        if not gpu and self.device.type != "cpu":
            raise UserError(f"provider cpu runs on the CPU, not {self.device}")
        if "tensorrt" in short and "cuda" not in short:
            short.append("cuda")  # TensorRT hands the nodes it does not take to CUDA, never silently to the CPU
        wanted = [PROVIDERS[p] for p in short]
        available = ort.get_available_providers()
        missing = [p for p in wanted if p not in available]
        if missing:
            raise UserError(f"ONNX Runtime {ort.__version__} has no {', '.join(missing)} here (available: "
                            f"{', '.join(available)}); on a CUDA machine install onnxruntime-gpu, not onnxruntime")
        index = self.device.index if self.device.index is not None else (
            torch.cuda.current_device() if self.device.type == "cuda" else 0)
        options = {
            "CUDAExecutionProvider": {"device_id": str(index), "use_tf32": "0"},
            "TensorrtExecutionProvider": {"device_id": str(index), "trt_fp16_enable": "False"},
            "CPUExecutionProvider": {},
        }
        so = ort.SessionOptions()
        so.log_severity_level = 3
        try:
            # a model with external data is opened from its path: ONNX Runtime finds the data from the model's folder
            self._session = ort.InferenceSession(str(source) if external else data, sess_options=so, providers=wanted,
                                                 provider_options=[options[p] for p in wanted])
        except _ort_errors() as e:
            raise UserError(f"ONNX Runtime cannot open {label}: {_first_line(e)}") from e
        active = self._session.get_providers()
        inactive = [p for p in wanted if p not in active]
        if inactive:
            raise UserError(f"ONNX Runtime did not activate {', '.join(inactive)} for {label} (active: "
                            f"{', '.join(active)}); check the CUDA / TensorRT libraries")
        self._session.disable_fallback()
        self.providers = active
        self.path = None if isinstance(source, (bytes, bytearray)) else Path(source)
        self._index = index
        self.input_shape = self._io.input_shape
        self.num_classes = self._io.num_classes
        self.precision = str(self.metadata.get("precision") or _infer_precision(proto))
        self.sha256 = _combined_sha256(data, external)  # engine_sha256: external data files included
        recorded = self.metadata.get("max_batch")
        default = recorded if isinstance(recorded, int) and not isinstance(recorded, bool) else DEFAULT_MAX_BATCH
        self.max_batch = _check_max_batch(max_batch if max_batch is not None else default)
        base = name or (Path(label).name if not isinstance(source, (bytes, bytearray)) else "model.onnx")
        self.name = f"{base} [onnxruntime {'+'.join(short)}]"
        # Everything a call needs, resolved once: the per-call path reads plain attributes only.
        self._torch_in = torch.float16 if self._io.input_dtype is np.float16 else torch.float32
        self._torch_out = torch.float16 if self._io.output_dtype is np.float16 else torch.float32
        self._outputs = [self._io.output_name]
        self._cuda = self.device.type == "cuda"
        self._fast = None if self._cuda else _cpu_binding(self._session, self._io)
        # __call__ serves float32 logits straight from the binding; a float16 output goes the general way (converted)
        self._fast_call = self._fast if self._torch_out is torch.float32 else None
        self._local = threading.local()  # one IO binding per calling thread

    @property
    def session(self) -> Any:
        """The ``onnxruntime.InferenceSession`` (for benchmarks and inspection)."""
        return self._session

    @property
    def io_names(self) -> tuple[str, str]:
        """Names of the graph's input and output."""
        return self._io.input_name, self._io.output_name

    @property
    def io_binding(self) -> bool:
        """Whether calls bind torch memory directly (always on CUDA; on the CPU when ONNX Runtime allows it)."""
        return self._cuda or self._fast is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x``: float32 (N, num_classes) on ``x.device`` (see :meth:`Engine.__call__`).

        The common case, a contiguous CPU tensor of the graph's input dtype with 1 to ``max_batch`` inputs, is served
        here with the fewest possible touches of torch (shape, dtype, device, contiguity, address, one allocation):
        right after an inference each of them runs with cold caches and costs about a microsecond. Every other case
        (other dtype or device, strided views, empty or oversized batches, bad input) takes the general path of
        :class:`Engine`, with the same results.
        """
        fast = self._fast_call
        if fast is not None and type(x) is torch.Tensor:
            shape = x.shape
            if (len(shape) == 4 and shape[1:] == self.input_shape and x.dtype is self._torch_in and x.is_cpu
                    and x.is_contiguous() and 0 < shape[0] <= self.max_batch):
                return self._run_bound_cpu(fast, x, shape)
        return super().__call__(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self._cuda:
            return self._run_bound(x)
        if x.dtype is not self._torch_in or not x.is_cpu:
            x = x.to("cpu", self._torch_in)
        if self._fast is None:
            return self._run_numpy(x)
        if not x.is_contiguous():
            x = x.contiguous()
        return self._run_bound_cpu(self._fast, x, x.shape)

    def _run_bound_cpu(self, fast: _CpuBinding, x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Run a contiguous CPU batch of the input dtype through this thread's IO binding into a fresh tensor.

        The output is allocated by numpy and wrapped by ``torch.from_numpy``: ``torch.empty`` goes through the
        dispatcher and costs several microseconds more per call right after an inference (measured on the loaded
        2-core development machine).
        """
        new, run, device, input_name, input_element, output_name, output_element, output_dtype, k = fast
        n = shape[0]
        out = torch.from_numpy(np.empty((n, k), output_dtype))
        try:
            binding = self._local.binding
        except AttributeError:
            binding = self._local.binding = new()
        # The binding holds raw addresses: both tensors stay alive (referenced here) until the run has returned, and
        # every call rebinds both before running, so a stale address is never read.
        binding.bind_input(input_name, device, input_element, shape, x.data_ptr())
        binding.bind_output(output_name, device, output_element, (n, k), out.data_ptr())
        run(binding, None)
        return out

    def _run_numpy(self, x: torch.Tensor) -> torch.Tensor:
        """The public ``InferenceSession.run`` on a numpy view of ``x`` (a CPU tensor of the input dtype)."""
        arr = x.detach().numpy() if x.requires_grad else x.numpy()  # zero-copy either way
        (out,) = self._session.run(self._outputs, {self._io.input_name: arr})
        return torch.from_numpy(out)

    def _run_bound(self, x: torch.Tensor) -> torch.Tensor:
        """IO binding: ONNX Runtime reads the input from and writes the logits into torch CUDA memory."""
        xin = x.detach().to(self.device, self._torch_in).contiguous()
        out = torch.empty((int(xin.shape[0]), self.num_classes), dtype=self._torch_out, device=self.device)
        binding = self._session.io_binding()
        binding.bind_input(self._io.input_name, device_type="cuda", device_id=self._index,
                           element_type=self._io.input_dtype, shape=tuple(xin.shape), buffer_ptr=xin.data_ptr())
        binding.bind_output(self._io.output_name, device_type="cuda", device_id=self._index,
                            element_type=self._io.output_dtype, shape=tuple(out.shape), buffer_ptr=out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # the input is written before ONNX Runtime reads it
        self._session.run_with_iobinding(binding)  # returns once the outputs are written
        return out

    def describe(self) -> dict[str, Any]:
        """What the engine is, with the active providers."""
        return {**super().describe(), "providers": list(self.providers)}


def describe_onnx(path: str | Path) -> dict[str, Any]:
    """What an ONNX file is: opset, inputs and outputs, metadata, sha256, checks, providers available.

    Raises
    ------
    UserError
        For a missing, corrupt or truncated file.
    """
    import onnxruntime as ort

    proto, data, label = load_onnx(path)
    external = external_data_files(proto, path) if _uses_external_data(proto) else []
    checks: dict[str, str] = {}
    try:
        validate_onnx(proto, path)
        checks["checker_full"] = "pass"
        checks["strict_shape_inference"] = "pass"
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as e:
        # ValueError: the full check's shape inference on an element type no ONNX version defines (a corrupt file)
        checks["checker_full"] = f"fail: {_first_line(e)}"
    meta = read_metadata(proto)
    try:
        io = _interface(proto, label, meta)
        runnable = {"runnable": True, "input_shape": list(io.input_shape), "num_classes": io.num_classes}
    except UserError as e:
        runnable = {"runnable": False, "reason": str(e)}
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1

    def value(v: onnx.ValueInfoProto) -> dict[str, Any]:
        return {"name": v.name, "type": _elem_type_name(v.type.tensor_type.elem_type).lower(),
                "shape": _shape_text(v)}

    initializers = {i.name for i in proto.graph.initializer}
    return {
        "path": label,
        "format": "onnx",
        "sha256": _combined_sha256(data, external),
        "size_bytes": len(data),
        "external_data": [{"location": loc, "size_bytes": f.stat().st_size} for loc, f in external],
        "ir_version": proto.ir_version,
        "opset": {(o.domain or "ai.onnx"): o.version for o in proto.opset_import},
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "precision": str(meta.get("precision") or _infer_precision(proto)),
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
