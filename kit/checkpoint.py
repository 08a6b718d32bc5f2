"""Saving and loading twins safely.

A checkpoint is one ``.safetensors`` file: the weights, and in its metadata (``__metadata__``, text only) a JSON record
under the key ``otkit`` with the architecture, classes, input shape, normalisation, dataset fingerprint, defense and
training configuration, kit version and the sha256 of the weights. Loading never executes a pickle: safetensors holds
no code, and a ``.pt`` file is read only with ``torch.load(weights_only=True)``, which refuses anything but tensors and
plain containers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import kit
from kit.arch import arch_name, rebuild_model
from kit.errors import UserError
from kit.io import atomic_write, require_file

FORMAT = "otkit.checkpoint/1"


@dataclass
class CheckpointInfo:
    """What a checkpoint says about itself (everything except the weights)."""

    arch: dict[str, Any]
    num_classes: int
    class_names: list[str]
    input_shape: list[int]
    normalization: dict[str, Any]
    dataset: dict[str, Any] = field(default_factory=dict)
    defense: str = "standard"
    train_config: dict[str, Any] = field(default_factory=dict)
    kit_version: str = kit.__version__
    weights_sha256: str = ""
    created: str = ""
    format: str = FORMAT

    @property
    def arch_name(self) -> str:
        return arch_name(self.arch)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> CheckpointInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {"arch", "num_classes", "class_names", "input_shape", "normalization"} - d.keys()
        if missing:
            raise UserError(f"{source}: checkpoint metadata lacks {', '.join(sorted(missing))}")
        return cls(**{k: v for k, v in d.items() if k in names})


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order: name, dtype, shape and raw bytes of each."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage: clone every tensor into its own contiguous buffer.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(model: nn.Module, path: str | Path, info: CheckpointInfo) -> CheckpointInfo:
    """Write ``model``'s weights and ``info`` to ``path`` (``.safetensors``) atomically; return the info as written."""
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"checkpoint path must end in .safetensors: {path}")
    state = _plain_state(model)
    info = dataclasses.replace(
        info,
        weights_sha256=weights_sha256(state),
        created=info.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        kit_version=kit.__version__,
    )
    blob = save(state, metadata={"format": FORMAT, "otkit": json.dumps(info.to_dict(), sort_keys=True)})
    with atomic_write(path) as f:
        f.write(blob)
    return info


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file: {e}") from e
    return state, meta


def _read_pt(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"refusing to load {path}: it holds objects other than tensors (possibly code), "
            f"and weights are only read with torch.load(weights_only=True) [{first}]"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable PyTorch file: {str(e).splitlines()[0] if str(e) else e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        meta = obj.get("otkit")
        state = obj["state_dict"]
    elif isinstance(obj, dict):
        meta, state = None, obj
    else:
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: the state dict holds values that are not tensors")
    return state, meta if isinstance(meta, dict) else None


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Read weights and metadata without building the model; verify the weights' sha256.

    Raises
    ------
    UserError
        Missing or unreadable file, missing metadata, a weights hash that does not match the metadata, or a ``.pt``
        pickle holding anything but tensors.
    """
    path = require_file(path, "checkpoint")
    if path.suffix in (".pt", ".pth"):
        state, meta = _read_pt(path)
        if meta is None:
            raise UserError(
                f"{path} is a bare state dict without otkit metadata (architecture, classes, input shape); "
                "retrain or save it with kit.checkpoint.save_checkpoint"
            )
    else:
        state, raw = _read_safetensors(path)
        if "otkit" not in raw:
            raise UserError(f"{path} has no otkit metadata: it was not written by otkit")
        try:
            meta = json.loads(raw["otkit"])
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: otkit metadata is not valid JSON ({e})") from e
    info = CheckpointInfo.from_dict(meta, str(path))
    actual = weights_sha256(state)
    if info.weights_sha256 and info.weights_sha256 != actual:
        raise UserError(f"{path}: weights do not match their recorded sha256 (file modified or corrupt)")
    info.weights_sha256 = actual
    return state, info


def load_twin(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, CheckpointInfo]:
    """Rebuild the model a checkpoint describes, load its weights (strictly) and return it in eval mode.

    Returns
    -------
    model : nn.Module
        In eval mode, on ``device``, taking pixels in [0, 1] of shape (N, *info.input_shape).
    info : CheckpointInfo
    """
    path = Path(path)
    state, info = read_checkpoint(path)
    model = rebuild_model(info.arch, search_dirs=(path.parent,))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit architecture {info.arch_name}: {str(e).splitlines()[0]}") from e
    return model.to(device).eval(), info
