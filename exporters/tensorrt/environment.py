"""Where a TensorRT engine may run: TensorRT and GPU availability, and the JSON sidecar that records what built it.

An engine is valid only on the GPU model and TensorRT version that built it. Beside each ``model.engine`` a
``model.engine.json`` sidecar (:data:`SIDECAR_FORMAT`) records them, with the precision, the ONNX file's sha256, the
engine's sha256 and the profile; :func:`check_environment` compares it with this machine. TensorRT is imported inside
the functions that need it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from kit.errors import UserError

__all__ = [
    "INSTALL_HINT",
    "SIDECAR_FORMAT",
    "check_environment",
    "cuda_device",
    "current_environment",
    "read_sidecar",
    "require_cuda",
    "require_library",
    "require_tensorrt",
    "sidecar_path",
    "tensorrt_version",
]

SIDECAR_FORMAT = "otkit.tensorrt-sidecar/1"
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


def require_library() -> str:
    """TensorRT's version; raises :class:`UserError` when it is not installed (or only its type stubs are)."""
    version = tensorrt_version()
    if version is None:
        raise UserError(f"TensorRT is not installed; {INSTALL_HINT}")
    return version


def cuda_device(device: str | torch.device | None) -> torch.device | None:
    """The CUDA device to use, or ``None`` when this machine has none (a non-CUDA ``device`` is refused)."""
    if not torch.cuda.is_available():
        return None
    dev = torch.device(device if device is not None else "cuda")
    if dev.type != "cuda":
        raise UserError(f"TensorRT engines run on a CUDA device, not {dev} (use --device cuda)")
    return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())


def require_cuda(device: str | torch.device | None) -> torch.device:
    """The CUDA device to use; raises :class:`UserError` when this machine has none."""
    dev = cuda_device(device)
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
    return require_library(), require_cuda(device)


def current_environment(device: str | torch.device | None = None) -> dict[str, Any]:
    """What this machine offers an engine: TensorRT version and GPU (``None`` where there is none)."""
    try:
        version = tensorrt_version()
    except UserError:
        version = None
    dev = cuda_device(device)
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
