"""What a TensorRT engine file is, and whether it can run here: :func:`describe_engine` (``otkit engine info``)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from exporters.tensorrt.environment import check_environment, current_environment, read_sidecar
from kit.errors import UserError
from kit.io import require_file

__all__ = ["describe_engine"]


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
