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

from kit.convention import IDENTITY, InputConvention
from kit.errors import UserError

__all__ = ["Engine", "check_input_type", "check_max_batch", "resolve_convention"]


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
    exporter : str
        What wrote the file, where it says: the kit's exporter (``dynamo`` or ``torchscript``) for the kit's ONNX
        exports, else the ONNX file's producer (e.g. ``pytorch 2.5.0``, ``tf2onnx 1.16``); empty for the others.
    input_convention : InputConvention
        What the backend itself takes (normalised, 0-255, NHWC, uint8 input); callers always give [0, 1] NCHW float
        pixels and the engine maps them (:meth:`use_convention`), so epsilons stay in pixel units on every side.
    recorded_weights : str
        The ``weights_sha256`` of the twin the file says it was made from: a kit ONNX export's
        ``otkit.weights_sha256``, a TensorRT engine's sidecar (``twin.weights_sha256``), a checkpoint's own weights;
        empty where the file records none (an ONNX file exported elsewhere). The audit compares it with its twin's
        (``engine-weights-differ``, docs/checks.md).
    """

    name: str
    sha256: str
    precision: str
    input_shape: tuple[int, int, int]
    num_classes: int
    max_batch: int
    device: torch.device
    backend: str
    exporter: str = ""
    input_convention: InputConvention = IDENTITY
    recorded_weights: str = ""

    def use_convention(self, convention: InputConvention) -> None:
        """Map every batch through ``convention`` before the backend sees it (subclasses call it in ``__init__``).

        :meth:`_run` then receives what the backend takes (e.g. NHWC uint8) instead of [0, 1] NCHW float pixels.
        """
        convention.check_channels(self.input_shape[0], self.name)
        self.input_convention = convention
        if not convention.identity:
            run = self._run
            self._backend = lambda x: run(convention.to_native(x))  # type: ignore[method-assign]

    def _backend(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`_run`, behind the input convention when the engine has one (:meth:`use_convention`)."""
        return self._run(x)

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
            out = self._backend(x)
        else:
            out = torch.cat([self._backend(x[i:i + self.max_batch]) for i in range(0, n, self.max_batch)])
        # is_cpu is a cheap flag; comparing torch.device objects costs about a microsecond per call
        if out.dtype is not torch.float32 or (not (out.is_cpu and x.is_cpu) and out.device != x.device):
            out = out.to(device=x.device, dtype=torch.float32)
        return out

    @abstractmethod
    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of one batch of 1 to ``max_batch`` inputs (any device; float pixels, or what the input convention
        gives); subclasses implement it."""

    def _reject(self, x: torch.Tensor) -> None:
        """Raise the error that says why ``x`` is not a batch this engine takes."""
        if x.dim() != 4 or x.shape[1:] != self.input_shape:
            c, h, w = self.input_shape
            raise ValueError(f"{self.name} takes batches of shape (N, {c}, {h}, {w}), got {tuple(x.shape)}")
        raise ValueError(f"{self.name} takes floating-point pixels in [0, 1], got dtype {x.dtype}")

    @property
    def parity_runtime(self) -> str:
        """Whose FP32 tolerance the engine is held to (:data:`exporters.parity.FP32_TOLERANCE`): ``tensorrt`` where
        TensorRT builds the kernels, else ``onnxruntime``."""
        return "tensorrt" if self.backend == "tensorrt" else "onnxruntime"

    def describe(self) -> dict[str, Any]:
        """What the engine is, JSON-ready."""
        return {"name": self.name, "backend": self.backend, "sha256": self.sha256, "precision": self.precision,
                "input_shape": list(self.input_shape), "num_classes": self.num_classes, "max_batch": self.max_batch,
                "device": str(self.device), "input_convention": self.input_convention.to_dict()}

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


def resolve_convention(metadata: dict[str, Any], given: InputConvention | None, label: str,
                       flag: str = "--engine-input") -> InputConvention:
    """The input convention of an engine file: ``given`` (``--engine-input``), else what its metadata records
    (``input_convention``, written by the kit's exporter), else the kit's own pixels.

    A file the kit exported before ``input_convention`` was recorded (it has ``format`` metadata) takes the kit's own
    pixels: that is recorded too. ``flag`` names the option ``given`` came from, for the message.

    Raises
    ------
    UserError
        Malformed recorded metadata, or ``given`` contradicting what the file records.
    """
    raw = metadata.get("input_convention")
    if raw is None and str(metadata.get("format", "")).startswith("otkit."):
        raw = IDENTITY.to_dict()
    recorded = None if raw is None else InputConvention.from_dict(raw, f"{label}: otkit.input_convention")
    if given is not None and recorded is not None and given != recorded:
        raise UserError(f"{flag} {given} contradicts {label}, which records its input as {recorded} (the kit "
                        f"exported it: leave {flag} out)")
    return given if given is not None else recorded if recorded is not None else IDENTITY


def check_input_type(input_dtype: str, convention: InputConvention, label: str) -> None:
    """Refuse a convention whose element type cannot feed the engine's input (``input_dtype``: ``float32``,
    ``float16`` or ``uint8``): a uint8 graph takes uint8 only, and float16 rounding is the graph's to do.

    Raises
    ------
    UserError
        A uint8 input without ``dtype=uint8``, ``dtype=uint8`` for a float input, ``dtype=float16`` for a float32 one.
    """
    if input_dtype == "uint8" and convention.dtype != "uint8":
        raise UserError(f"{label} takes uint8 pixels (0-255): describe its input with dtype=uint8 (--engine-input) "
                        "or, for a twin, --input-range 0,255")
    if input_dtype != "uint8" and convention.dtype == "uint8":
        raise UserError(f"{label} takes float input, not uint8: drop dtype=uint8 from --engine-input (range=0,255 "
                        "describes float 0-255 input)")
    if input_dtype == "float32" and convention.dtype == "float16":
        raise UserError(f"{label} takes float32 input: drop dtype=float16 from --engine-input")
