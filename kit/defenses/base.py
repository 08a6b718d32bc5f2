"""The thin base every defense stands on, and the defense registry.

A defense supplies only its loss (and, through it, its adversary); :mod:`kit.defenses.trainer` owns everything else:
data, optimiser, schedule, checkpoints, resume, metrics and progress.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn as nn

from kit.errors import UserError

_REGISTRY: dict[str, type[Defense]] = {}


class Defense(ABC):
    """Base class: subclasses set ``name``, ``description``, ``defaults`` and write :meth:`loss`.

    Parameters given at construction override ``defaults``; unknown parameter names are a :class:`UserError`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **params: Any) -> None:
        unknown = set(params) - set(self.defaults)
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise UserError(f"defense {self.name!r} has no parameter(s) {', '.join(sorted(unknown))}; known: {known}")
        for key, value in params.items():  # the kind of value its default shows, before any work (ranges: setup)
            default = self.defaults[key]
            if default is None or value is None:
                continue
            number = isinstance(default, (int, float)) and not isinstance(default, bool)
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif number:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                    isinstance(value, int) or not isinstance(default, int) or float(value).is_integer())
            else:
                ok = isinstance(value, type(default))
            if not ok:
                want = "true or false" if isinstance(default, bool) else (
                    "an integer" if isinstance(default, int) and number else
                    "a number" if number else type(default).__name__)
                raise UserError(f"defense {self.name!r} parameter {key} must be {want}, got {value!r}")
        self.params: dict[str, Any] = {**self.defaults, **params}

    def setup(self, model: nn.Module) -> None:  # noqa: B027  (an optional hook)
        """Called once before training (a defense with its own networks or optimisers creates them here)."""

    def start_epoch(self, epoch: int, epochs: int) -> None:  # noqa: B027  (an optional hook)
        """Called by the trainer before every epoch, ``epoch`` 0-based out of ``epochs`` (also after ``--resume``).

        A defense whose behaviour follows training progress (e.g. ``wat``'s radius ramp) sets it here, as a pure
        function of ``(epoch, epochs)``, never from state accumulated over earlier epochs: a resumed run then matches
        an uninterrupted one. The default does nothing.
        """

    @abstractmethod
    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the scalar training loss for a batch and its named parts (floats, for the metrics log)."""

    def state_dict(self) -> dict[str, Any]:
        """Extra state to checkpoint for ``--resume`` (a defense's own networks and optimisers)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027  (an optional hook)
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


def warmup_factor(epoch: int, ramp_epochs: int) -> float:
    """The linear warm-up of 0-based ``epoch`` over ``ramp_epochs`` epochs: min(1, (epoch + 1) / ramp_epochs), and 1
    without a warm-up (``ramp_epochs`` 0). A pure function of the epoch, so a resumed run matches an uninterrupted one
    (:meth:`Defense.start_epoch`)."""
    return 1.0 if ramp_epochs <= 0 else min(1.0, (epoch + 1) / ramp_epochs)


def register_defense(cls: type[Defense]) -> type[Defense]:
    """Class decorator adding a defense to the registry under ``cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"defense name {cls.name!r} is empty or taken")
    _REGISTRY[cls.name] = cls
    return cls


def list_defenses() -> list[str]:
    """Registered defense names, in registration order."""
    return list(_REGISTRY)


def create_defense(name: str, **params: Any) -> Defense:
    """Instantiate a registered defense; an unknown name is a :class:`UserError` listing the known ones."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown defense {name!r}; known: {', '.join(_REGISTRY)}") from None
    return cls(**params)
