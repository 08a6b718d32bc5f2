"""The interface every runner implements: :class:`Engine`, and the checks all backends share.

An :class:`Engine` is called with a float batch in [0, 1] of shape (N, C, H, W) and returns float32 logits (N, K) on
the caller's device. It splits batches larger than ``max_batch`` itself. Each engine says what it is: ``name``,
``sha256`` (of the file it runs, or the twin's weights), ``precision``, ``input_shape`` and ``num_classes``.

The runners, one per backend, implement it: :class:`exporters.torch.TorchEngine`,
:class:`exporters.onnx.OnnxRuntimeEngine` and :class:`exporters.tensorrt.TensorRTEngine`; the factory
:func:`exporters.engines.load_engine` picks one by file type. This module imports no backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from kit.errors import UserError

__all__ = ["Engine", "check_max_batch"]


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


def check_max_batch(max_batch: int) -> int:
    """``max_batch`` if it is an integer >= 1 (every runner checks its largest batch per backend call with it).

    Raises
    ------
    UserError
        For anything else (a bool, a float, zero or less).
    """
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise UserError(f"max batch must be an integer >= 1, got {max_batch!r}")
    return max_batch
