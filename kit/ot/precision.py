"""The solvers' arithmetic outside automatic mixed precision.

Under ``torch.autocast`` (``otkit train --amp``) matrix products run in float16 or bfloat16, whatever their inputs. The
log-domain solvers cannot afford it: a squared-distance cost :math:`|x|^2 + |y|^2 - 2 x \\cdot y` cancels to noise in
float16 (errors of order 1 on costs of order 1e-2), and the dual updates, Newton steps and Anderson mixing lose their
precision the same way. :func:`full_precision` runs a solver with autocast off on the devices of its tensor arguments;
the solvers themselves compute half-precision inputs in float32.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["full_precision"]

F = TypeVar("F", bound=Callable[..., Any])


def full_precision(fn: F) -> F:
    """Decorate a solver so that it runs with autocast off on every device type of its tensor arguments."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        kinds = {t.device.type for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)}
        with contextlib.ExitStack() as stack:
            for kind in sorted(kinds):
                if torch.is_autocast_enabled(kind):
                    stack.enter_context(torch.autocast(device_type=kind, enabled=False))
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]
