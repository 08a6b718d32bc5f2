"""Building a TensorRT engine from an otkit ONNX file, and writing it with its sidecar after a parity check.

Building (:func:`build_engine`) uses the TensorRT Python API: a builder, a network filled by the ONNX parser (its errors
are reported with node names), one optimisation profile over the batch dimension (min/opt/max), a workspace
memory-pool limit, a timing cache kept between builds, and TF32 cleared so that FP32 engines match the twin.

Precision differs between major versions (:func:`network_plan`):

* TensorRT 10 builds FP32 from the FP32 ONNX file, FP16 from the same file with ``BuilderFlag.FP16`` (weak typing),
  and INT8 from the Q/DQ file (:mod:`exporters.onnx.quantize`) as a strongly typed network;
* TensorRT 11 removed the precision flags and builds strongly typed networks only, so FP16 and INT8 come from the fp16
  and Q/DQ ONNX files.

The build takes an ONNX file already written (it reads it with :mod:`exporters.graph`, never with the ONNX exporter);
:func:`write_tensorrt_export` builds, checks parity against the twin from the fresh bytes, then writes the engine and
its sidecar. Exporting a twin all the way (ONNX first) is :func:`exporters.checkpoint.export_tensorrt`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import kit
from exporters.formats import DEFAULT_MAX_BATCH, Precision
from exporters.parity import ParityError, ParityReport, measure_parity
from exporters.tensorrt.environment import (
    SIDECAR_FORMAT,
    current_environment,
    require_cuda,
    require_library,
    require_tensorrt,
    sidecar_path,
)
from exporters.tensorrt.runner import TensorRTEngine
from kit.errors import UserError
from kit.io import atomic_write
from kit.runtime import model_device

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "DEFAULT_WORKSPACE_MIB",
    "NetworkPlan",
    "TensorRTExport",
    "build_engine",
    "network_plan",
    "write_tensorrt_export",
]

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE_MIB = 1024


@dataclass(frozen=True)
class NetworkPlan:
    """How to build a network at a precision with a given TensorRT major version.

    Attributes
    ----------
    onnx_precision : str
        Precision of the ONNX file to parse.
    strongly_typed : bool
        Whether the network is strongly typed (types come from the ONNX file).
    fp16_flag : bool
        Whether ``BuilderFlag.FP16`` is set (TensorRT 10, weak typing only).
    """

    onnx_precision: str
    strongly_typed: bool
    fp16_flag: bool


def network_plan(major: int, precision: Precision | str) -> NetworkPlan:
    """Which ONNX file, typing mode and flags build ``precision`` on TensorRT ``major`` (see the module docstring)."""
    precision = Precision(precision)
    if major >= 11:  # precision flags removed; every network is strongly typed
        return NetworkPlan(onnx_precision=precision.value, strongly_typed=True, fp16_flag=False)
    if precision is Precision.FP16:
        return NetworkPlan(onnx_precision=Precision.FP32.value, strongly_typed=False, fp16_flag=True)
    if precision is Precision.INT8:
        return NetworkPlan(onnx_precision=Precision.INT8.value, strongly_typed=True, fp16_flag=False)
    return NetworkPlan(onnx_precision=Precision.FP32.value, strongly_typed=False, fp16_flag=False)


def _default_timing_cache(version: str, env_gpu: dict[str, Any]) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "otkit" / "tensorrt"
    cc = str(env_gpu.get("compute_capability", "unknown")).replace(".", "")
    return root / f"timing-trt{version}-sm{cc}.cache"


def _parser_errors(parser: Any) -> str:
    """Every parser error as ``node N (name, op): description``."""
    out = []
    for i in range(int(parser.num_errors)):
        err = parser.get_error(i)
        node, name = int(err.node()), str(err.node_name())
        where = f"node {node} ({name})" if node >= 0 or name else "model"
        out.append(f"{where}: {err.desc()}")
    return "; ".join(out) or "no error recorded"


def build_engine(
    onnx_path: str | Path,
    precision: Precision | str = Precision.FP32,
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    opt_batch: int | None = None,
    min_batch: int = 1,
    workspace_mib: int = DEFAULT_WORKSPACE_MIB,
    timing_cache: str | Path | None = None,
    device: str | torch.device | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """Build a serialized TensorRT engine from an otkit ONNX file.

    Parameters
    ----------
    onnx_path : str or Path
        ONNX file with one (batch, C, H, W) input; its precision must be what :func:`network_plan` asks for.
    precision : Precision or str
        Engine precision.
    max_batch, opt_batch, min_batch : int
        The optimisation profile over the batch dimension (``opt_batch`` defaults to ``max_batch``).
    workspace_mib : int
        Workspace memory-pool limit, MiB.
    timing_cache : str or Path, optional
        Timing cache read before and written after the build (default: a per-GPU file under ``~/.cache/otkit``).
    device : str or torch.device, optional
        CUDA device to build on.

    Returns
    -------
    engine : bytes
        The serialized engine.
    sidecar : dict
        What the sidecar records (without ``engine_sha256``, which the caller adds with the path it writes).

    Raises
    ------
    UserError
        No TensorRT or GPU, an ONNX file of the wrong precision, parser errors (with node names), a failed build.
    """
    version = require_library()
    dev = require_cuda(device)
    import tensorrt as trt

    from exporters.graph import graph_interface, infer_precision, load_onnx, read_metadata

    precision = Precision(precision)
    major = int(trt.__version__.split(".")[0])
    plan = network_plan(major, precision)
    proto, data, label = load_onnx(onnx_path)
    meta = read_metadata(proto)
    io = graph_interface(proto, label, meta)
    onnx_precision = str(meta.get("precision") or infer_precision(proto))
    if onnx_precision != plan.onnx_precision:
        raise UserError(f"TensorRT {version} builds {precision.value} engines from {plan.onnx_precision} ONNX files; "
                        f"{label} is {onnx_precision}")
    if not (1 <= min_batch <= (opt_batch or max_batch) <= max_batch):
        raise UserError(f"the batch profile needs 1 <= min <= opt <= max, got {min_batch}, {opt_batch}, {max_batch}")
    opt = opt_batch or max_batch
    env_gpu = current_environment(dev)["gpu"] or {}
    cache_path = Path(timing_cache) if timing_cache is not None else _default_timing_cache(version, env_gpu)

    t0 = time.perf_counter()
    with torch.cuda.device(dev):
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 0
        if plan.strongly_typed and major < 11:  # TensorRT 11 networks are always strongly typed
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(data, str(Path(onnx_path).resolve())):
            raise UserError(f"TensorRT's ONNX parser rejected {label}: {_parser_errors(parser)}")
        if network.num_inputs != 1 or network.num_outputs != 1:
            raise UserError(f"{label}: TensorRT sees {network.num_inputs} inputs and {network.num_outputs} outputs, "
                            "expected one of each")
        inp = network.get_input(0)
        c, h, w = io.input_shape
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
        tf32_cleared = major < 11 or hasattr(trt.BuilderFlag, "TF32")  # guarded: 11.x may drop the flag too
        if tf32_cleared:
            config.clear_flag(trt.BuilderFlag.TF32)  # FP32 parity: no 10-bit-mantissa inner products
        if plan.fp16_flag:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, trt.Dims4(min_batch, c, h, w), trt.Dims4(opt, c, h, w),
                          trt.Dims4(max_batch, c, h, w))
        config.add_optimization_profile(profile)
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise UserError(f"TensorRT {version} could not build an engine from {label} (see its log above)")
        engine_bytes = bytes(memoryview(serialized))
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(cache_path) as f:
                f.write(bytes(memoryview(config.get_timing_cache().serialize())))
        except (OSError, UserError) as e:
            log.warning("TensorRT timing cache not saved to %s: %s", cache_path, e)
    seconds = time.perf_counter() - t0

    twin = {k: meta.get(k) for k in ("weights_sha256", "arch", "classes", "kit_version") if k in meta}
    sidecar = {
        "format": SIDECAR_FORMAT,
        "kit_version": kit.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tensorrt_version": version,
        "gpu": env_gpu,
        "cuda_version": torch.version.cuda,
        "precision": precision.value,
        "strongly_typed": plan.strongly_typed or major >= 11,
        "builder_flags": (["FP16"] if plan.fp16_flag else []),
        "tf32": False if tf32_cleared else "no TF32 flag in this TensorRT",
        "onnx": {"file": Path(onnx_path).name, "sha256": "sha256:" + hashlib.sha256(data).hexdigest(),
                 "precision": onnx_precision},
        "input": inp.name,
        "input_shape": [c, h, w],
        "num_classes": io.num_classes,
        "profile": {"min": [min_batch, c, h, w], "opt": [opt, c, h, w], "max": [max_batch, c, h, w]},
        "workspace_mib": int(workspace_mib),
        "timing_cache": str(cache_path),
        "build_seconds": round(seconds, 3),
        "twin": twin,
    }
    if "input_convention" in meta:  # what the ONNX file records it takes; the engine takes the same
        sidecar["input_convention"] = meta["input_convention"]
    return engine_bytes, sidecar


# ------------------------------------------------------------------------------------------------------- export
@dataclass
class TensorRTExport:
    """A written TensorRT engine, its sidecar, the ONNX export it was built from, and the checks.

    ``onnx`` is the :class:`exporters.onnx.OnnxExport` the engine was built from when the caller made one
    (:func:`exporters.checkpoint.export_tensorrt` does), else ``None``.
    """

    path: Path
    sidecar_path: Path
    sidecar: dict[str, Any]
    onnx: Any
    parity: ParityReport
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {"path": str(self.path), "format": "tensorrt", "precision": self.sidecar["precision"],
                "sha256": self.sidecar["engine_sha256"], "sidecar": str(self.sidecar_path),
                "tensorrt_version": self.sidecar["tensorrt_version"], "gpu": self.sidecar["gpu"],
                "onnx": self.onnx.to_dict() if self.onnx is not None else None, "parity": self.parity.to_dict(),
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


def write_tensorrt_export(
    onnx_path: str | Path,
    out: str | Path,
    twin: nn.Module,
    parity_x: torch.Tensor,
    *,
    precision: Precision | str = Precision.FP32,
    parity_y: torch.Tensor | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    workspace_mib: int = DEFAULT_WORKSPACE_MIB,
    timing_cache: str | Path | None = None,
    device: str | torch.device | None = None,
    onnx_export: Any = None,
) -> TensorRTExport:
    """Written ONNX file -> TensorRT engine ``out`` + sidecar, parity-checked against ``twin``.

    ``onnx_path`` must be of the precision :func:`network_plan` asks for (its writer, e.g.
    :func:`exporters.checkpoint.export_tensorrt`, picks it). TensorRT and a GPU are checked first, before any work. The
    engine's parity against the twin is measured from the freshly built bytes; an FP32 engine beyond tolerance raises
    :class:`ParityError` and nothing is written. ``onnx_export`` (the ONNX export's result) is kept in the result.
    """
    _, dev = require_tensorrt(device)
    out = Path(out)
    if out.suffix.lower() not in (".engine", ".plan", ".trt"):
        raise UserError(f"TensorRT output must end in .engine, .plan or .trt: {out}")
    precision = Precision(precision)
    t0 = time.perf_counter()
    data, side = build_engine(onnx_path, precision, max_batch=max_batch, workspace_mib=workspace_mib,
                              timing_cache=timing_cache, device=dev)
    build_s = time.perf_counter() - t0
    engine = TensorRTEngine.from_serialized(data, side, out.name, dev, max_batch)
    twin_dev = model_device(twin)
    t0 = time.perf_counter()
    parity = measure_parity(twin.eval(), engine, parity_x.to(twin_dev), precision=precision, name=engine.name,
                            labels=parity_y, runtime="tensorrt", batch_size=max_batch)
    if not parity.passed:
        raise ParityError(parity)
    side = engine.sidecar
    with atomic_write(out) as f:
        f.write(data)
    side_path = sidecar_path(out)
    with atomic_write(side_path, "w") as f:
        f.write(json.dumps(side, indent=2, sort_keys=True) + "\n")
    return TensorRTExport(path=out, sidecar_path=side_path, sidecar=side, onnx=onnx_export, parity=parity,
                          seconds={"build": build_s, "parity": time.perf_counter() - t0})
