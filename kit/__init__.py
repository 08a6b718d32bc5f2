"""otkit: robustness certification and deployment kit for image classifiers.

The top-level packages are ``kit`` (data, checkpoints, optimal transport, attacks, defenses, CLI), ``models`` (the model
zoo), ``exporters`` (ONNX / TensorRT export and engine runners) and ``evaluators`` (curves, AUAC, audits, reports).
"""

__version__ = "0.1.0"

from kit.errors import UserError  # noqa: E402  (re-exported: the one exception users see)

__all__ = ["UserError", "__version__"]
