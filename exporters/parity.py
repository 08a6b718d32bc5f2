"""Parity of an exported engine against its PyTorch twin on real samples.

For logits :math:`z^{twin}, z^{eng} \\in \\mathbb{R}^{N \\times K}` of the same batch the report gives
:math:`\\max_{n,k} |z^{eng}_{nk} - z^{twin}_{nk}|` (the logit gap), its mean, the logit scale
:math:`s = \\max_{n,k} |z^{twin}_{nk}|`, and the top-1 agreement
:math:`\\frac{1}{N} \\sum_n [\\arg\\max_k z^{eng}_{nk} = \\arg\\max_k z^{twin}_{nk}]`.

An FP32 engine must satisfy :math:`\\max|\\Delta| \\le atol + rtol \\cdot s`; reduced-precision engines (fp16, int8)
are not held to FP32 tolerances: their report states the agreement and the gap, and the verdict is ``"reported"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from exporters.formats import Precision

__all__ = ["FP32_TOLERANCE", "ParityError", "ParityReport", "compare_logits", "measure_parity"]

#: (atol, rtol) of the FP32 check, per runtime. ONNX Runtime's CPU kernels (and its CUDA provider, TF32 off) match
#: PyTorch to ~1e-6 relative; TensorRT picks other convolution algorithms, so it gets ten times more room. That holds
#: the kit's TensorRT engines (TF32 cleared) and ONNX Runtime's TensorRT provider, whose TF32 cannot be turned off
#: (:attr:`exporters.base.Engine.parity_runtime` says which applies).
FP32_TOLERANCE: dict[str, tuple[float, float]] = {"onnxruntime": (1e-4, 1e-4), "tensorrt": (1e-3, 1e-3)}


@dataclass(frozen=True)
class ParityReport:
    """How closely an engine's logits follow the twin's on the same samples.

    Attributes
    ----------
    engine : str
        What was compared (file name and runtime).
    precision : str
        ``fp32``, ``fp16`` or ``int8``.
    samples : int
        Number of samples compared.
    max_abs_diff, mean_abs_diff : float
        Largest and mean absolute logit difference.
    logit_scale : float
        Largest absolute twin logit (the scale the tolerance is relative to).
    top1_agreement : float
        Fraction of samples where the engine and the twin predict the same class.
    twin_accuracy, engine_accuracy : float or None
        Accuracy against the labels, when labels were given.
    tolerance : float or None
        The allowed ``max_abs_diff`` (FP32 only).
    verdict : str
        ``"pass"``, ``"fail"`` (FP32 beyond tolerance, or non-finite logits) or ``"reported"`` (reduced precision).
    """

    engine: str
    precision: str
    samples: int
    max_abs_diff: float
    mean_abs_diff: float
    logit_scale: float
    top1_agreement: float
    twin_accuracy: float | None
    engine_accuracy: float | None
    tolerance: float | None
    verdict: str

    @property
    def passed(self) -> bool:
        """False only for a failed FP32 check (or non-finite logits)."""
        return self.verdict != "fail"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)

    def summary(self) -> str:
        """One line with the numbers."""
        tol = f" (tolerance {self.tolerance:.3g})" if self.tolerance is not None else ""
        return (f"{self.engine} [{self.precision}] on {self.samples} samples: "
                f"max|dlogit| {self.max_abs_diff:.3g}{tol}, mean {self.mean_abs_diff:.3g}, "
                f"logit scale {self.logit_scale:.3g}, top-1 agreement {self.top1_agreement:.4f}")


class ParityError(Exception):
    """An FP32 export whose logits are beyond tolerance from its twin's: a fidelity failure (CLI exit status 1).

    Attributes
    ----------
    report : ParityReport
        The numbers.
    """

    def __init__(self, report: ParityReport) -> None:
        super().__init__(f"parity check failed: {report.summary()}")
        self.report = report


def compare_logits(
    twin: torch.Tensor,
    engine: torch.Tensor,
    *,
    precision: Precision | str,
    name: str,
    labels: torch.Tensor | None = None,
    runtime: str = "onnxruntime",
) -> ParityReport:
    """Compare two (N, K) logit tensors; see the module docstring for the statistics and the verdict.

    Parameters
    ----------
    twin, engine : torch.Tensor
        Logits of the twin and of the engine on the same samples, shape (N, K).
    precision : Precision or str
        The engine's precision; only ``fp32`` is held to a tolerance.
    name : str
        What the engine is, for the report.
    labels : torch.Tensor, optional
        (N,) class indices, to report both accuracies.
    runtime : str
        ``"onnxruntime"`` or ``"tensorrt"``: selects the FP32 tolerance from :data:`FP32_TOLERANCE`.
    """
    precision = Precision(precision)
    a = twin.detach().to("cpu", torch.float64)
    b = engine.detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"{name}: engine logits have shape {tuple(b.shape)}, the twin's {tuple(a.shape)}")
    n = int(a.shape[0])
    diff = (a - b).abs()
    finite = bool(torch.isfinite(b).all())
    max_diff = float(diff.max()) if n else 0.0
    mean_diff = float(diff.mean()) if n else 0.0
    scale = float(a.abs().max()) if n else 0.0
    agree = float((a.argmax(1) == b.argmax(1)).double().mean()) if n else 1.0
    twin_acc = eng_acc = None
    if labels is not None and n:
        y = labels.detach().to("cpu")
        twin_acc = float((a.argmax(1) == y).double().mean())
        eng_acc = float((b.argmax(1) == y).double().mean())
    tolerance = None
    if precision is Precision.FP32:
        atol, rtol = FP32_TOLERANCE[runtime]
        tolerance = atol + rtol * scale
        verdict = "pass" if finite and max_diff <= tolerance else "fail"
    else:
        verdict = "reported" if finite else "fail"
    if not finite:
        max_diff = math.inf
    return ParityReport(engine=name, precision=precision.value, samples=n, max_abs_diff=max_diff,
                        mean_abs_diff=mean_diff, logit_scale=scale, top1_agreement=agree, twin_accuracy=twin_acc,
                        engine_accuracy=eng_acc, tolerance=tolerance, verdict=verdict)


def measure_parity(
    twin: Callable[[torch.Tensor], torch.Tensor],
    engine: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    precision: Precision | str,
    name: str,
    labels: torch.Tensor | None = None,
    runtime: str = "onnxruntime",
    batch_size: int = 256,
) -> ParityReport:
    """Run ``twin`` and ``engine`` on ``x`` (in batches, without gradients) and :func:`compare_logits`.

    Parameters
    ----------
    twin, engine : callable
        Map a float batch in [0, 1] of shape (B, C, H, W) to logits (B, K).
    x : torch.Tensor
        Real samples, shape (N, C, H, W), on the twin's device.
    """
    outs_a, outs_b = [], []
    with torch.no_grad():
        for i in range(0, int(x.shape[0]), batch_size):
            chunk = x[i:i + batch_size]
            outs_a.append(twin(chunk).float())
            outs_b.append(engine(chunk).float())
    a = torch.cat(outs_a) if outs_a else torch.empty(0, 0)
    b = torch.cat(outs_b) if outs_b else torch.empty(0, 0)
    return compare_logits(a, b, precision=precision, name=name, labels=labels, runtime=runtime)
