"""The PyTorch twin as an engine: :class:`TorchEngine`, the reference the other runners are measured against."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from exporters.base import Engine, check_max_batch
from exporters.formats import DEFAULT_MAX_BATCH
from kit.runtime import exact_cuda, model_tensor

__all__ = ["TorchEngine"]


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
        self.max_batch = check_max_batch(max_batch)
        first = model_tensor(model)
        self.device = first.device if first is not None else torch.device("cpu")
        self._cpu = self.device.type == "cpu"
        if self.device.type == "cuda":
            exact_cuda()  # an engine held to the twin within 1e-4 needs the twin in exact float32 (no TF32)
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
        engine = cls(model, info.input_shape, info.num_classes, info.weights_sha256, name=Path(path).name,
                     max_batch=max_batch)
        engine.recorded_weights = info.weights_sha256  # the checkpoint's own weights
        return engine

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is not torch.float32 or not (self._cpu and x.is_cpu):
            x = x.to(self.device, torch.float32)  # a no-op .to() still costs microseconds: skip it when it is one
        if not torch.is_grad_enabled():  # inside the caller's no_grad: entering another costs about 20 µs per call
            return self.model(x)
        with torch.no_grad():
            return self.model(x)
