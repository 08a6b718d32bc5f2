"""The kit's ``metadata_props`` of an ONNX file: what the twin is, and how the file was made.

:func:`build_metadata` and :func:`set_metadata` write them (keys prefixed ``otkit.``, values text or JSON);
:func:`read_metadata` (from :mod:`exporters.graph`, which the TensorRT build shares) reads them back.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import onnx
import torch
from torch import nn

import kit
from exporters.formats import META_PREFIX, Precision
from exporters.graph import read_metadata
from kit.convention import IDENTITY

if TYPE_CHECKING:
    from exporters.onnx.export import OnnxGraph
    from kit.checkpoint import CheckpointInfo

__all__ = ["FORMAT_TAG", "build_metadata", "model_record", "read_metadata", "set_metadata", "toolchain"]

FORMAT_TAG = "otkit.onnx/1"
#: The packages whose versions decide the bytes of an export: the exporters (torch, onnxscript for dynamo, onnx) and
#: ONNX Runtime's float16 converter and int8 quantiser.
TOOLCHAIN = ("torch", "onnx", "onnxscript", "onnxruntime")


def toolchain() -> dict[str, str]:
    """The installed versions of :data:`TOOLCHAIN` (``""`` for one that is not installed): an export made with the same
    versions from the same twin is the same graph (:mod:`exporters.onnx.compare`). ONNX Runtime's is its module's
    (imported: an export and an audit have it loaded already), whichever build provides it."""
    from importlib import metadata

    found = {"torch": torch.__version__}  # the running build (a local "+cpu" tag included)
    for name in ("onnx", "onnxscript"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = ""
    try:  # whichever build provides the module (onnxruntime-gpu on GPU machines), as it runs
        import onnxruntime

        found["onnxruntime"] = str(onnxruntime.__version__)
    except ImportError:
        found["onnxruntime"] = ""
    return found


def model_record(model: nn.Module, info: CheckpointInfo | None, num_classes: int) -> dict[str, Any]:
    """What the twin is: from its checkpoint when there is one, else from the model itself."""
    if info is not None:
        # an imported graph's record carries the graph itself (kit/twins): the ONNX file is that graph already
        arch = {k: v for k, v in info.arch.items() if k not in ("graph", "archive", "conversion")}
        return {"weights_sha256": info.weights_sha256, "arch": arch, "arch_name": info.arch_name,
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
        "toolchain": toolchain(),
        "weights_sha256": record["weights_sha256"],
        "arch": record["arch_name"],
        "arch_record": record["arch"],
        "classes": record["classes"],
        "num_classes": record["num_classes"],
        "input_shape": record["input_shape"],
        "input_layout": "NCHW",
        "input_range": [0.0, 1.0],
        "input_convention": IDENTITY.to_dict(),  # what the graph takes: the kit's own pixels (no --engine-input)
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
