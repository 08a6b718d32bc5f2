"""Saving and loading twins safely.

A checkpoint is one ``.safetensors`` file: the weights, and in its metadata (``__metadata__``, text only) a JSON record
under the key ``otkit`` with the architecture, classes, input shape, normalisation, dataset fingerprint, defense and
training configuration, kit version, the sha256 of the weights (``weights_sha256``) and ``checkpoint_sha256``, a sha256
over the record's canonical JSON and the weights hash together, so that neither the metadata nor the weights can change
unnoticed (integrity, not authenticity: anyone who edits the file can recompute the hash).

Loading never executes code the caller did not name: safetensors holds no code, a ``.pt`` file is read only with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers, and an architecture defined
in a user's Python file is imported only when the caller names that file again (``arch=``, ``--arch`` on the command
line) and its sha256 matches the record (:func:`kit.arch.rebuild_model`).

Checkpoints written before ``checkpoint_sha256`` existed (format ``otkit.checkpoint/1``) are still read, with a warning
that their metadata is not covered by any hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
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
from kit.runtime import exact_cuda

log = logging.getLogger(__name__)

FORMAT = "otkit.checkpoint/2"
#: Formats read: /1 has no ``checkpoint_sha256`` (its metadata is not hashed), /2 has it.
LEGACY_FORMAT = "otkit.checkpoint/1"


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
    checkpoint_sha256: str = ""
    #: for a model trained elsewhere (``otkit models import``): the file it came from, its sha256, how it was read
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def arch_name(self) -> str:
        return arch_name(self.arch)

    def data_spec(self, given: str | None, source: str) -> str:
        """``given`` (a ``--data SPEC``), else the dataset this checkpoint was trained on; neither: a UserError."""
        spec = given or self.dataset.get("spec")
        if not spec:
            raise UserError(f"{source} does not record its dataset: give --data SPEC")
        return str(spec)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> CheckpointInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {"arch", "num_classes", "class_names", "input_shape", "normalization"} - d.keys()
        if missing:
            raise UserError(f"{source}: checkpoint metadata lacks {', '.join(sorted(missing))}")
        info = cls(**{k: v for k, v in d.items() if k in names})
        info._check_types(source)
        return info

    def _check_types(self, source: str) -> None:
        """Refuse metadata whose fields have the wrong JSON types (metadata is anyone's text)."""

        def bad(name: str, want: str) -> UserError:
            return UserError(f"{source}: checkpoint metadata field {name!r} must be {want}, got "
                             f"{type(getattr(self, name)).__name__}")

        def count(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        for name in ("arch", "normalization", "dataset", "train_config", "source"):
            if not isinstance(getattr(self, name), dict):
                raise bad(name, "an object")
        for name in ("defense", "kit_version", "weights_sha256", "checkpoint_sha256", "created", "format"):
            if not isinstance(getattr(self, name), str):
                raise bad(name, "text")
        if not count(self.num_classes):
            raise bad("num_classes", "an integer >= 1")
        if not (isinstance(self.class_names, list) and all(isinstance(c, str) for c in self.class_names)
                and len(self.class_names) == self.num_classes):
            raise bad("class_names", f"a list of {self.num_classes} names")
        if not (isinstance(self.input_shape, list) and len(self.input_shape) == 3
                and all(count(v) for v in self.input_shape)):
            raise bad("input_shape", "a list of 3 positive integers (C, H, W)")


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order: name, dtype, shape and raw bytes of each."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode()


def checkpoint_sha256(record: dict[str, Any], weights_hash: str) -> str:
    """sha256 over a metadata record (without its ``checkpoint_sha256`` key) as canonical JSON, and ``weights_hash``.

    The record must be JSON-shaped (what ``json.loads`` gives): :func:`save_checkpoint` hashes the record after a JSON
    round trip, :func:`read_checkpoint` the record as read.
    """
    body = {k: v for k, v in record.items() if k != "checkpoint_sha256"}
    h = hashlib.sha256(b"otkit.checkpoint_sha256/1\n")
    h.update(_canonical(body))
    h.update(b"\n" + weights_hash.encode())
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
    weights = weights_sha256(state)
    info = dataclasses.replace(
        info,
        weights_sha256=weights,
        created=info.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        kit_version=kit.__version__,
        format=FORMAT,
        checkpoint_sha256="",
    )
    try:
        record = json.loads(json.dumps(info.to_dict(), sort_keys=True))  # the record exactly as it will be read
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot write {path}: its metadata is not JSON ({e})") from e
    info.checkpoint_sha256 = record["checkpoint_sha256"] = checkpoint_sha256(record, weights)
    blob = save(state, metadata={"format": FORMAT, "otkit": json.dumps(record, sort_keys=True)})
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
        raise _unreadable(path, e) from e
    return state, meta


# files a user may hand to a command that takes a kit checkpoint, and where each goes instead (.pt and .pth are read
# as PyTorch files before this)
_OTHER_FORMATS = {
    ".onnx": "an ONNX file: `otkit engine info` describes it, `otkit models import` makes a checkpoint of it",
    ".engine": "a TensorRT engine: `otkit engine info` describes it",
    ".plan": "a TensorRT engine: `otkit engine info` describes it",
    ".pt2": "a torch.export program: `otkit models import` makes a checkpoint of it",
    ".ckpt": "a PyTorch file: `otkit models import` reads its weights (docs/byom.md)",
}


def _unreadable(path: Path, e: Exception) -> UserError:
    """The refusal of a file that is not a kit checkpoint; where its suffix names another format, what takes it."""
    other = _OTHER_FORMATS.get(Path(path).suffix.lower())
    hint = f" (it looks like {other})" if other else ""
    return UserError(f"{path} is not a readable safetensors file{hint}: {e}")


def _read_pt(path: Path, bare_ok: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    from kit.twins.layouts import read_weights  # the one reader of PyTorch files: weights_only, refusals explained

    obj = read_weights(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        meta = obj.get("otkit")
        state = obj["state_dict"]
    elif isinstance(obj, dict):
        meta, state = None, obj
    elif bare_ok:
        return {}, None
    else:
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if bare_ok:
        return {}, meta if isinstance(meta, dict) else None
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: the state dict holds values that are not tensors")
    return state, meta if isinstance(meta, dict) else None


def has_kit_metadata(path: str | Path) -> bool:
    """Whether ``path`` is a kit checkpoint (otkit metadata) rather than weights from elsewhere; reads no code.

    A ``.safetensors`` file is told by its header alone; a ``.pt`` file is read with ``torch.load(weights_only=True)``
    (what :func:`read_checkpoint` refuses, it refuses too).
    """
    path = require_file(path, "checkpoint")
    if path.suffix == ".safetensors":
        return "otkit" in _read_safetensors_metadata(path)
    if path.suffix in (".pt", ".pth"):
        return _read_pt(path, bare_ok=True)[1] is not None
    return False


def _read_safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, e) from e


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Read weights and metadata without building the model (nothing is imported); verify their hashes.

    ``checkpoint_sha256`` must match the metadata and weights together, and ``weights_sha256`` the weights. A
    checkpoint older than ``checkpoint_sha256`` (format ``otkit.checkpoint/1``, no such field) is read with a logged
    warning: its metadata is not covered by any hash.

    Raises
    ------
    UserError
        Missing or unreadable file, missing metadata, metadata or weights that do not match their hashes, an unknown
        format, or a ``.pt`` pickle holding anything but tensors.
    """
    path = require_file(path, "checkpoint")
    if path.suffix in (".pt", ".pth"):
        state, meta = _read_pt(path)
        if meta is None:
            raise UserError(
                f"{path} holds weights without otkit metadata (architecture, classes, input shape): make it a kit "
                f"checkpoint with otkit models import {path.name} --arch ARCH --num-classes N --input-shape C,H,W "
                "--out FILE.safetensors (docs/byom.md)"
            )
    else:
        state, raw = _read_safetensors(path)
        if "otkit" not in raw:
            raise UserError(f"{path} has no otkit metadata: it was not written by otkit (otkit models import makes "
                            "it a kit checkpoint, docs/byom.md)")
        try:
            meta = json.loads(raw["otkit"])
        except (ValueError, RecursionError) as e:  # bad JSON, a 5000-digit integer, nesting deeper than Python's stack
            raise UserError(f"{path}: otkit metadata is not valid JSON ({type(e).__name__}: {str(e)[:120]})") from e
    if not isinstance(meta, dict):
        raise UserError(f"{path}: otkit metadata is not a JSON object")
    fmt = meta.get("format", LEGACY_FORMAT)
    if fmt not in (FORMAT, LEGACY_FORMAT):
        raise UserError(f"{path}: unknown checkpoint format {fmt!r} (this otkit reads {LEGACY_FORMAT} and {FORMAT})")
    actual = weights_sha256(state)
    if meta.get("weights_sha256") and meta["weights_sha256"] != actual:
        raise UserError(f"{path}: weights do not match their recorded sha256 (file modified or corrupt)")
    recorded = meta.get("checkpoint_sha256")
    if recorded:
        try:
            expected = checkpoint_sha256(meta, actual)
        except (TypeError, ValueError) as e:
            raise UserError(f"{path}: otkit metadata is not plain JSON ({e})") from e
        if recorded != expected:
            raise UserError(f"{path}: metadata or weights modified since the checkpoint was written "
                            "(checkpoint_sha256 does not match; file modified or corrupt)")
    else:
        log.warning("%s records no checkpoint_sha256 (format %s: written before metadata was hashed): its weights "
                    "are checked but its metadata is not covered by any hash", path, fmt)
    info = CheckpointInfo.from_dict(meta, str(path))
    info.weights_sha256 = actual
    return state, info


def load_twin(path: str | Path, device: str | torch.device = "cpu", *,
              arch: str | None = None) -> tuple[nn.Module, CheckpointInfo]:
    """Rebuild the model a checkpoint describes, load its weights (strictly) and return it in eval mode.

    Parameters
    ----------
    path : path
        The checkpoint.
    device : str or torch.device
    arch : str, optional
        ``FILE.py:NAME`` for a checkpoint whose architecture is a user's Python file: the caller names the file to
        import (``--arch``), and it must match the record (callable name, sha256) before it is imported. Nothing is
        imported without it; it is ignored for zoo architectures.

    Returns
    -------
    model : nn.Module
        In eval mode, on ``device``, taking pixels in [0, 1] of shape (N, *info.input_shape).
    info : CheckpointInfo
    """
    path = Path(path)
    state, info = read_checkpoint(path)
    model = rebuild_model(info.arch, arch=arch, source=str(path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit architecture {info.arch_name}: {str(e).splitlines()[0]}") from e
    if torch.device(device).type == "cuda":
        exact_cuda()  # the twin in exact float32: TF32 would put it beyond an FP32 engine's parity tolerance
    return model.to(device).eval(), info
