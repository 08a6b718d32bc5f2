"""TensorRT: build a serialized engine from an otkit ONNX file, describe it in a JSON sidecar, and run it.

Building (:func:`build_engine`) uses the TensorRT Python API: a builder, a network filled by the ONNX parser (its errors
are reported with node names), one optimisation profile over the batch dimension (min/opt/max), a workspace
memory-pool limit, a timing cache kept between builds, and TF32 cleared so that FP32 engines match the twin.

Precision differs between major versions (:func:`network_plan`):

* TensorRT 10 builds FP32 from the FP32 ONNX file, FP16 from the same file with ``BuilderFlag.FP16`` (weak typing),
  and INT8 from the Q/DQ file (:mod:`exporters.quantize`) as a strongly typed network;
* TensorRT 11 removed the precision flags and builds strongly typed networks only, so FP16 and INT8 come from the fp16
  and Q/DQ ONNX files.

Beside each ``model.engine`` a ``model.engine.json`` sidecar records the TensorRT version, the GPU (name and compute
capability), the precision, the ONNX file's sha256, the engine's sha256 and the profile. An engine is valid only on the
GPU model and TensorRT version that built it, so :class:`TensorRTEngine` checks the sidecar before deserialising and
says so in one line when they differ.

TensorRT (and CUDA) are imported inside the functions that need them; this module imports without them. Its TensorRT
calls are type-checked against the ``tensorrt-stubs`` package (TensorRT 10 API) by ``tests/test_engines.py``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import kit
from exporters.engines import Engine, _check_max_batch
from exporters.formats import DEFAULT_MAX_BATCH, DEFAULT_OPSET, Precision
from exporters.parity import ParityError, ParityReport, measure_parity
from kit.errors import UserError
from kit.io import atomic_write, require_file

if TYPE_CHECKING:
    from torch import nn

    from exporters.onnx import OnnxExport
    from kit.checkpoint import CheckpointInfo

__all__ = [
    "SIDECAR_FORMAT",
    "TensorRTEngine",
    "TensorRTExport",
    "build_engine",
    "check_environment",
    "current_environment",
    "export_tensorrt",
    "network_plan",
    "describe_engine",
    "read_sidecar",
    "require_tensorrt",
    "sidecar_path",
    "tensorrt_version",
]

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "otkit.tensorrt-sidecar/1"
DEFAULT_WORKSPACE_MIB = 1024
INSTALL_HINT = "install it with pip install otkit[gpu] on a CUDA machine"


# ---------------------------------------------------------------------------------------------------- availability
def tensorrt_version() -> str | None:
    """The installed TensorRT's version, or ``None`` when it is not installed (or only its type stubs are).

    Raises
    ------
    UserError
        If TensorRT is installed but cannot be imported (missing CUDA libraries, ...).
    """
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:
        raise UserError(f"TensorRT is installed but cannot be imported: {str(e).splitlines()[0] if str(e) else e}") \
            from e
    version = getattr(trt, "__version__", None)
    if not isinstance(version, str) or not hasattr(trt, "Builder"):
        return None  # a bare namespace package: the tensorrt-stubs type stubs without the library
    return version


def _require_tensorrt() -> str:
    version = tensorrt_version()
    if version is None:
        raise UserError(f"TensorRT is not installed; {INSTALL_HINT}")
    return version


def _cuda_device(device: str | torch.device | None) -> torch.device | None:
    """The CUDA device to use, or ``None`` when this machine has none."""
    if not torch.cuda.is_available():
        return None
    dev = torch.device(device if device is not None else "cuda")
    if dev.type != "cuda":
        raise UserError(f"TensorRT engines run on a CUDA device, not {dev} (use --device cuda)")
    return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())


def _require_cuda(device: str | torch.device | None) -> torch.device:
    dev = _cuda_device(device)
    if dev is None:
        raise UserError("TensorRT needs a CUDA GPU and this machine has none")
    return dev


def require_tensorrt(device: str | torch.device | None = None) -> tuple[str, torch.device]:
    """TensorRT's version and the CUDA device to build on; checked before any export work starts.

    Raises
    ------
    UserError
        TensorRT is not installed (or only its type stubs are), or there is no CUDA GPU.
    """
    return _require_tensorrt(), _require_cuda(device)


def current_environment(device: str | torch.device | None = None) -> dict[str, Any]:
    """What this machine offers an engine: TensorRT version and GPU (``None`` where there is none)."""
    try:
        version = tensorrt_version()
    except UserError:
        version = None
    dev = _cuda_device(device)
    gpu = None
    if dev is not None:
        p = torch.cuda.get_device_properties(dev)
        gpu = {"name": p.name, "compute_capability": f"{p.major}.{p.minor}"}
    return {"tensorrt_version": version, "gpu": gpu}


# -------------------------------------------------------------------------------------------------------- sidecar
def sidecar_path(engine: str | Path) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def read_sidecar(engine: str | Path) -> dict[str, Any]:
    """The JSON sidecar of an engine.

    Raises
    ------
    UserError
        A missing or malformed sidecar.
    """
    path = sidecar_path(engine)
    if not path.is_file():
        raise UserError(f"{Path(engine).name} has no sidecar {path.name}: without it nothing says which GPU and "
                        "TensorRT version built the engine; rebuild it with otkit export --format tensorrt")
    try:
        side = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(side, dict) or side.get("format") != SIDECAR_FORMAT:
        raise UserError(f"{path} is not an otkit TensorRT sidecar (format {SIDECAR_FORMAT})")
    for key in ("tensorrt_version", "gpu", "engine_sha256", "precision", "input_shape", "num_classes", "profile"):
        if key not in side:
            raise UserError(f"{path} lacks {key!r}")
    return side


def _gpu_text(gpu: Any) -> str:
    if not isinstance(gpu, dict):
        return "no CUDA GPU"
    return f"{gpu.get('name')} (compute capability {gpu.get('compute_capability')})"


def check_environment(side: dict[str, Any], device: str | torch.device | None, label: str) -> None:
    """Refuse an engine built for another GPU model or TensorRT version than this machine's.

    Raises
    ------
    UserError
        One line naming what the engine was built for and what this machine has.
    """
    env = current_environment(device)
    built_gpu, here_gpu = side.get("gpu"), env["gpu"]
    same_gpu = (isinstance(built_gpu, dict) and isinstance(here_gpu, dict)
                and built_gpu.get("name") == here_gpu.get("name")
                and str(built_gpu.get("compute_capability")) == here_gpu.get("compute_capability"))
    same_trt = env["tensorrt_version"] is not None and env["tensorrt_version"] == side.get("tensorrt_version")
    if same_gpu and same_trt:
        return
    here_trt = f"TensorRT {env['tensorrt_version']}" if env["tensorrt_version"] else "no TensorRT"
    raise UserError(
        f"{label} was built for {_gpu_text(built_gpu)} with TensorRT {side.get('tensorrt_version')}, but this machine "
        f"has {_gpu_text(here_gpu)} and {here_trt}: a TensorRT engine runs only on the GPU model and TensorRT version "
        "that built it; rebuild it here with otkit export --format tensorrt"
    )


# ---------------------------------------------------------------------------------------------------------- build
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


def _dims(d: Any) -> list[int]:
    return [int(d[i]) for i in range(len(d))]


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
    version = _require_tensorrt()
    dev = _require_cuda(device)
    import tensorrt as trt

    from exporters.onnx import _infer_precision, _interface, load_onnx, read_metadata

    precision = Precision(precision)
    major = int(trt.__version__.split(".")[0])
    plan = network_plan(major, precision)
    proto, data, label = load_onnx(onnx_path)
    meta = read_metadata(proto)
    io = _interface(proto, label, meta)
    onnx_precision = str(meta.get("precision") or _infer_precision(proto))
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
    return engine_bytes, sidecar


# --------------------------------------------------------------------------------------------------------- runner
class TensorRTEngine(Engine):
    """A serialized TensorRT engine, run with one execution context on torch CUDA tensors.

    Inputs and outputs are torch CUDA tensors whose addresses TensorRT reads and writes (``set_tensor_address``);
    ``execute_async_v3`` runs on the current torch CUDA stream, so nothing is copied through the host and work stays
    ordered with the caller's.

    Parameters
    ----------
    path : str or Path
        The ``.engine`` file; its ``.engine.json`` sidecar must be beside it.
    device : str or torch.device
        CUDA device.
    max_batch : int, optional
        Largest batch per call; at most the profile's maximum (the default).

    Raises
    ------
    UserError
        A missing sidecar, an engine that does not match it, an engine built for another GPU or TensorRT version, no
        GPU or no TensorRT here.
    """

    backend = "tensorrt"

    def __init__(self, path: str | Path, device: str | torch.device = "cuda", max_batch: int | None = None) -> None:
        file: Path = require_file(path, "TensorRT engine")
        side = read_sidecar(file)
        data = file.read_bytes()
        sha = "sha256:" + hashlib.sha256(data).hexdigest()
        if side["engine_sha256"] != sha:
            raise UserError(f"{file.name} does not match its sidecar's sha256 (modified, or another engine's sidecar)")
        check_environment(side, device, file.name)
        self._setup(data, side, file.name, _require_cuda(device), max_batch)

    @classmethod
    def from_serialized(cls, data: bytes, sidecar: dict[str, Any], name: str, device: str | torch.device = "cuda",
                        max_batch: int | None = None) -> TensorRTEngine:
        """An engine just built in this process (no file yet), e.g. for the parity check before writing."""
        self = cls.__new__(cls)
        self._setup(data, {**sidecar, "engine_sha256": "sha256:" + hashlib.sha256(data).hexdigest()}, name,
                    _require_cuda(device), max_batch)
        return self

    def _setup(self, data: bytes, side: dict[str, Any], name: str, device: torch.device,
               max_batch: int | None) -> None:
        import tensorrt as trt

        self.device = device
        self.sidecar = side
        self.sha256 = str(side["engine_sha256"])
        self.precision = str(side["precision"])
        self.name = f"{name} [tensorrt {side.get('tensorrt_version')}]"
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(device):
            engine = self._runtime.deserialize_cuda_engine(data)
            if engine is None:
                raise UserError(f"TensorRT could not deserialize {name} (see its log above)")
            self._engine = engine
            self._context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise UserError(f"{name} has {len(inputs)} inputs and {len(outputs)} outputs; expected one of each")
        self._in, self._out = inputs[0], outputs[0]
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
        in_type, out_type = engine.get_tensor_dtype(self._in), engine.get_tensor_dtype(self._out)
        if in_type not in dtypes or out_type not in dtypes:
            raise UserError(f"{name}: input and output must be float32 or float16, got {in_type} and {out_type}")
        self._in_dtype, self._out_dtype = dtypes[in_type], dtypes[out_type]
        in_shape, out_shape = _dims(engine.get_tensor_shape(self._in)), _dims(engine.get_tensor_shape(self._out))
        if len(in_shape) != 4 or len(out_shape) != 2:
            raise UserError(f"{name}: input {in_shape} / output {out_shape}; expected (N, C, H, W) -> (N, K)")
        c, h, w = in_shape[1:]
        self.input_shape = (int(c), int(h), int(w))
        self.num_classes = int(out_shape[1]) if out_shape[1] > 0 else int(side["num_classes"])
        profile_max = _dims(engine.get_tensor_profile_shape(self._in, 0)[2])[0]
        self.profile_max = int(profile_max)
        chosen = _check_max_batch(max_batch if max_batch is not None else self.profile_max)
        if chosen > self.profile_max:
            raise UserError(f"{name} was built for batches of at most {self.profile_max}; max batch {chosen} is larger")
        self.max_batch = chosen

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        xin = x.detach().to(self.device, self._in_dtype).contiguous()
        n = int(xin.shape[0])
        c, h, w = self.input_shape
        ctx = self._context
        if not ctx.set_input_shape(self._in, (n, c, h, w)):
            raise RuntimeError(f"{self.name}: TensorRT refused input shape {(n, c, h, w)}")
        out = torch.empty((n, self.num_classes), dtype=self._out_dtype, device=self.device)
        ctx.set_tensor_address(self._in, xin.data_ptr())
        ctx.set_tensor_address(self._out, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.name}: TensorRT execution failed")
        return out

    def describe(self) -> dict[str, Any]:
        """What the engine is, with its sidecar."""
        return {**super().describe(), "sidecar": self.sidecar}


# ------------------------------------------------------------------------------------------------------- export
@dataclass
class TensorRTExport:
    """A written TensorRT engine, its sidecar, the ONNX file it was built from, and the checks."""

    path: Path
    sidecar_path: Path
    sidecar: dict[str, Any]
    onnx: OnnxExport
    parity: ParityReport
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {"path": str(self.path), "format": "tensorrt", "precision": self.sidecar["precision"],
                "sha256": self.sidecar["engine_sha256"], "sidecar": str(self.sidecar_path),
                "tensorrt_version": self.sidecar["tensorrt_version"], "gpu": self.sidecar["gpu"],
                "onnx": self.onnx.to_dict(), "parity": self.parity.to_dict(),
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


def export_tensorrt(
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
    workspace_mib: int = DEFAULT_WORKSPACE_MIB,
    timing_cache: str | Path | None = None,
    device: str | torch.device | None = None,
) -> TensorRTExport:
    """Twin -> checked ONNX file (``OUT.<precision>.onnx``) -> TensorRT engine ``OUT`` + sidecar, parity-checked.

    TensorRT and a GPU are checked first, before any work. The engine's parity against the twin is measured from
    the freshly built bytes; an FP32 engine beyond tolerance raises :class:`ParityError` and nothing is written.
    """
    version, dev = require_tensorrt(device)
    from exporters.onnx import export_onnx

    out = Path(out)
    if out.suffix.lower() not in (".engine", ".plan", ".trt"):
        raise UserError(f"TensorRT output must end in .engine, .plan or .trt: {out}")
    precision = Precision(precision)
    plan = network_plan(int(version.split(".")[0]), precision)
    onnx_path = out.with_suffix(f".{plan.onnx_precision}.onnx")
    onnx_export = export_onnx(twin, onnx_path, parity_x, info=info, precision=plan.onnx_precision, parity_y=parity_y,
                              calibration_x=calibration_x, calibration=calibration, opset=opset, max_batch=max_batch)
    t0 = time.perf_counter()
    data, side = build_engine(onnx_path, precision, max_batch=max_batch, workspace_mib=workspace_mib,
                              timing_cache=timing_cache, device=dev)
    build_s = time.perf_counter() - t0
    engine = TensorRTEngine.from_serialized(data, side, out.name, dev, max_batch)
    twin_dev = next(iter(twin.parameters())).device
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


def describe_engine(path: str | Path, device: str | torch.device | None = None) -> dict[str, Any]:
    """What a TensorRT engine file is: its sidecar, its sha256, and whether it can run on this machine.

    Raises
    ------
    UserError
        For a missing file. A missing or malformed sidecar, or an engine built elsewhere, is reported, not raised.
    """
    file: Path = require_file(path, "TensorRT engine")
    data = file.read_bytes()
    sha = "sha256:" + hashlib.sha256(data).hexdigest()
    env = current_environment(device)
    out: dict[str, Any] = {"path": str(file), "format": "tensorrt", "sha256": sha, "size_bytes": len(data),
                           "here": env}
    try:
        side = read_sidecar(file)
    except UserError as e:
        return {**out, "sidecar": None, "runnable_here": False, "reason": str(e)}
    out["sidecar"] = side
    if side["engine_sha256"] != sha:
        return {**out, "runnable_here": False, "reason": "the engine does not match its sidecar's sha256"}
    try:
        check_environment(side, device, file.name)
    except UserError as e:
        return {**out, "runnable_here": False, "reason": str(e)}
    return {**out, "runnable_here": True, "reason": ""}
