"""One interface for everything the audit evaluates: the twin, ONNX Runtime sessions and TensorRT engines.

An :class:`Engine` is called with a float batch in [0, 1] of shape (N, C, H, W) and returns float32 logits (N, K) on
the caller's device. It splits batches larger than ``max_batch`` itself. Each engine says what it is: ``name``,
``sha256`` (of the file it runs, or the twin's weights), ``precision``, ``input_shape`` and ``num_classes``.

The runners live beside their exporters, one per backend: :class:`TorchEngine` here,
:class:`exporters.onnx.OnnxRuntimeEngine` and :class:`exporters.tensorrt.TensorRTEngine`. :func:`load_engine` picks one
by file type.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from exporters.formats import DEFAULT_MAX_BATCH, engine_kind
from kit.errors import UserError

__all__ = ["Engine", "TorchEngine", "check_compatible", "load_engine"]


class Engine(ABC):
    """Base of the runners: input checks, batching, and the caller's device for the output.

    Subclasses set the attributes below in ``__init__`` and implement :meth:`_run`.

    Attributes
    ----------
    name : str
        Human-readable identity, e.g. ``"model.onnx [onnxruntime CPUExecutionProvider]"``.
    sha256 : str
        ``"sha256:<hex>"`` of the file the engine runs (the checkpoint's weights hash for the twin).
    precision : str
        ``"fp32"``, ``"fp16"`` or ``"int8"``.
    input_shape : tuple of int
        (C, H, W) of one input.
    num_classes : int
        Number of logits per input.
    max_batch : int
        Largest batch sent to the backend in one call.
    device : torch.device
        Where the backend computes.
    backend : str
        ``"torch"``, ``"onnxruntime"`` or ``"tensorrt"``.
    """

    name: str
    sha256: str
    precision: str
    input_shape: tuple[int, int, int]
    num_classes: int
    max_batch: int
    device: torch.device
    backend: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x``.

        Parameters
        ----------
        x : torch.Tensor
            Float pixels in [0, 1], shape (N, C, H, W) with (C, H, W) equal to :attr:`input_shape`; any device.

        Returns
        -------
        torch.Tensor
            float32 logits (N, num_classes) on ``x.device``.

        Notes
        -----
        Only the type, shape and dtype are checked, in Python on the tensor's metadata: the runner's per-call cost is
        measured against a bare backend call (``bench/engines.py``, target <= 1.05), so no check reads the pixels.
        The [0, 1] range is the caller's contract (the attacks clamp to it) and is not verified per call: a scan for
        it (min/max or isfinite) would cost a pass over the batch on every call.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.name} expects a torch.Tensor, got {type(x).__name__}")
        shape = x.shape
        if len(shape) != 4 or shape[1:] != self.input_shape or not x.is_floating_point():
            self._reject(x)
        n = shape[0]
        if n <= self.max_batch:  # the common case, kept lean: the runner's overhead is measured per call
            if n == 0:
                return torch.empty(0, self.num_classes, dtype=torch.float32, device=x.device)
            out = self._run(x)
        else:
            out = torch.cat([self._run(x[i:i + self.max_batch]) for i in range(0, n, self.max_batch)])
        # is_cpu is a cheap flag; comparing torch.device objects costs about a microsecond per call
        if out.dtype is not torch.float32 or (not (out.is_cpu and x.is_cpu) and out.device != x.device):
            out = out.to(device=x.device, dtype=torch.float32)
        return out

    @abstractmethod
    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of one batch of 1 to ``max_batch`` inputs (any device, any float dtype); subclasses implement it."""

    def _reject(self, x: torch.Tensor) -> None:
        """Raise the error that says why ``x`` is not a batch this engine takes."""
        if x.dim() != 4 or x.shape[1:] != self.input_shape:
            c, h, w = self.input_shape
            raise ValueError(f"{self.name} takes batches of shape (N, {c}, {h}, {w}), got {tuple(x.shape)}")
        raise ValueError(f"{self.name} takes floating-point pixels in [0, 1], got dtype {x.dtype}")

    def describe(self) -> dict[str, Any]:
        """What the engine is, JSON-ready."""
        return {"name": self.name, "backend": self.backend, "sha256": self.sha256, "precision": self.precision,
                "input_shape": list(self.input_shape), "num_classes": self.num_classes, "max_batch": self.max_batch,
                "device": str(self.device)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, precision={self.precision}, device={self.device})"


def _check_max_batch(max_batch: int) -> int:
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise UserError(f"max batch must be an integer >= 1, got {max_batch!r}")
    return max_batch


class TorchEngine(Engine):
    """The PyTorch twin as an engine (eval mode, no gradients).

    Parameters
    ----------
    model : nn.Module
        A classifier taking (N, C, H, W) pixels in [0, 1]; it is put in eval mode and left on its device.
    input_shape : sequence of int
        (C, H, W).
    num_classes : int
    sha256 : str
        Identity of the weights (the checkpoint's ``weights_sha256``).
    name : str, optional
    max_batch : int, optional
    """

    backend = "torch"

    def __init__(self, model: nn.Module, input_shape: Sequence[int], num_classes: int, sha256: str,
                 name: str = "twin", max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self.model = model.eval()
        c, h, w = (int(v) for v in input_shape)
        self.input_shape = (c, h, w)
        self.num_classes = int(num_classes)
        self.sha256 = sha256
        self.name = f"{name} [torch]"
        self.max_batch = _check_max_batch(max_batch)
        first = next(iter(model.parameters()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self._cpu = self.device.type == "cpu"
        self.precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(
            first.dtype if first is not None else torch.float32, "fp32")

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu",
                        max_batch: int = DEFAULT_MAX_BATCH, *, arch: str | None = None) -> TorchEngine:
        """The twin a checkpoint describes (``kit.checkpoint.load_twin``) as an engine.

        ``arch`` (``FILE.py:NAME``) is needed for a checkpoint whose architecture is a user's Python file: nothing is
        imported unless the caller names it and it matches the checkpoint's record.
        """
        from kit.checkpoint import load_twin

        model, info = load_twin(path, device=device, arch=arch)
        return cls(model, info.input_shape, info.num_classes, info.weights_sha256, name=Path(path).name,
                   max_batch=max_batch)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is not torch.float32 or not (self._cpu and x.is_cpu):
            x = x.to(self.device, torch.float32)  # a no-op .to() still costs microseconds: skip it when it is one
        if not torch.is_grad_enabled():  # inside the caller's no_grad: entering another costs about 20 µs per call
            return self.model(x)
        with torch.no_grad():
            return self.model(x)


def load_engine(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    providers: Sequence[str] | None = None,
    max_batch: int | None = None,
    arch: str | None = None,
) -> Engine:
    """Open a checkpoint (``.safetensors``/``.pt``), an ONNX file or a TensorRT engine as an :class:`Engine`.

    Parameters
    ----------
    path : str or Path
        The file; its suffix chooses the runner (:func:`exporters.formats.engine_kind`).
    device : str or torch.device
        Where the engine computes. For ONNX files it also picks the default provider: ``cpu`` for a CPU device,
        ``cuda`` for a CUDA one.
    providers : sequence of str, optional
        ONNX Runtime providers by short name (``cpu``, ``cuda``, ``tensorrt``); ONNX files only.
    max_batch : int, optional
        Override of the largest batch per backend call (default: what the file records, else 256).
    arch : str, optional
        ``FILE.py:NAME`` for a checkpoint whose architecture is a user's Python file (``--arch``): it is imported only
        when named here and matching the checkpoint's record (:func:`kit.arch.rebuild_model`). Other files ignore it.

    Raises
    ------
    UserError
        For a missing, unknown, corrupt or unusable file (wrong input rank, an engine built for another GPU or
        TensorRT version, a missing runtime).
    """
    from kit.io import require_file

    path = require_file(path, "engine file")
    kind = engine_kind(path)
    dev = torch.device(device)
    if providers is not None and kind != "onnx":
        raise UserError(f"{path}: providers apply to ONNX files only")
    if kind == "torch":
        return TorchEngine.from_checkpoint(path, dev, max_batch=max_batch or DEFAULT_MAX_BATCH, arch=arch)
    if kind == "onnx":
        from exporters.onnx import OnnxRuntimeEngine

        return OnnxRuntimeEngine(path, device=dev, providers=providers, max_batch=max_batch)
    from exporters.tensorrt import TensorRTEngine

    return TensorRTEngine(path, device=dev, max_batch=max_batch)


def check_compatible(engine: Engine, input_shape: Sequence[int], num_classes: int, what: str) -> None:
    """Refuse an engine that does not fit a dataset, before any work starts.

    Raises
    ------
    UserError
        If the engine's input shape or class count differs from the dataset's.
    """
    shape = tuple(int(v) for v in input_shape)
    if tuple(engine.input_shape) != shape:
        raise UserError(f"{engine.name} takes inputs {'x'.join(map(str, engine.input_shape))} but {what} has "
                        f"{'x'.join(map(str, shape))}")
    if engine.num_classes != int(num_classes):
        raise UserError(f"{engine.name} predicts {engine.num_classes} classes but {what} has {num_classes}")
