"""Common base of the model zoo: in-model normalisation, a features/logits split, and a rebuildable config.

Every classifier of the zoo takes pixels in ``[0, 1]`` with shape ``(N, C, H, W)`` and normalises them itself, so that a
checkpoint or an exported ONNX graph is self-contained: whoever runs it feeds raw pixels and cannot forget (or double)
the normalisation. The penultimate layer is exposed as :meth:`Classifier.features`, the latent that feature-space losses
(GOT, the OT-Classifier) work on.

This module imports only torch and the standard library; user mistakes raise :class:`ValueError` with a one-line message
that names the model and the problem (the ``kit`` layer wraps them into its ``UserError``).
"""

from __future__ import annotations

import copy
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["Classifier", "Normalize", "check_input_shape", "check_num_classes"]


def _is_int(value: object) -> bool:
    """Return whether ``value`` is an integer (``bool`` excluded)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_num_classes(num_classes: object, model: str) -> int:
    """Validate a class count.

    Parameters
    ----------
    num_classes
        The requested number of classes; must be an ``int`` >= 2.
    model
        Model name used in the error message.

    Returns
    -------
    int
        ``num_classes`` unchanged.

    Raises
    ------
    ValueError
        If ``num_classes`` is not an integer >= 2.
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"model '{model}': num_classes must be an integer >= 2, got {num_classes!r}")
    return num_classes


def check_input_shape(input_shape: object, model: str) -> tuple[int, int, int]:
    """Validate an input shape ``(C, H, W)``.

    Parameters
    ----------
    input_shape
        A sequence of three positive integers (channels, height, width); a list (as read back from JSON) is accepted.
    model
        Model name used in the error message.

    Returns
    -------
    tuple of int
        The shape as a ``(C, H, W)`` tuple.

    Raises
    ------
    ValueError
        If ``input_shape`` is not three positive integers.
    """
    if (
        isinstance(input_shape, (str, bytes))
        or not isinstance(input_shape, Sequence)
        or len(input_shape) != 3
        or not all(_is_int(v) and v > 0 for v in input_shape)
    ):
        raise ValueError(
            f"model '{model}': input_shape must be three positive integers (channels, height, width), "
            f"got {input_shape!r}"
        )
    c, h, w = (int(v) for v in input_shape)
    return c, h, w


def _channel_values(
    values: Sequence[float] | None, default: float, channels: int, what: str, model: str
) -> list[float]:
    """Expand a per-channel statistic to ``channels`` finite floats (length 1 broadcasts, ``None`` -> default)."""
    if values is None:
        return [default] * channels
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"model '{model}': {what} must be a list of numbers, got {values!r}")
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"model '{model}': {what} must be a list of numbers, got {values!r}") from None
    if len(floats) == 1:
        floats = floats * channels
    if len(floats) != channels:
        raise ValueError(
            f"model '{model}': {what} has {len(values)} values but the input has {channels} channel(s); "
            f"give 1 or {channels}"
        )
    if not all(math.isfinite(v) for v in floats):
        raise ValueError(f"model '{model}': {what} must be finite, got {list(values)!r}")
    return floats


def _shortest(buffer: torch.Tensor) -> list[float]:
    """Shortest decimal floats that round-trip to the float32 values of ``buffer``."""
    out: list[float] = []
    for value in buffer.detach().flatten().tolist():
        exact = struct.unpack("f", struct.pack("f", value))[0]
        for digits in range(6, 10):
            candidate = float(f"{value:.{digits}g}")
            if struct.unpack("f", struct.pack("f", candidate))[0] == exact:
                break
        out.append(candidate)
    return out


class Normalize(nn.Module):
    """Per-channel affine normalisation ``(x - mean) / std`` with the statistics stored as buffers.

    The statistics are persistent buffers of shape ``(1, C, 1, 1)``, so they are part of ``state_dict`` and are baked
    into an exported ONNX graph as constants.

    Parameters
    ----------
    mean
        Per-channel mean, length ``channels`` or 1 (broadcast; a bare number is accepted too). ``None`` means 0 for
        every channel.
    std
        Per-channel standard deviation (strictly positive), length ``channels`` or 1 (or a bare number). ``None``
        means 1.
    channels
        Number of input channels ``C``.
    model
        Model name used in error messages.

    Raises
    ------
    ValueError
        On a length mismatch, a non-finite value, or a non-positive ``std``.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channels: int = 3,
        model: str = "model",
    ) -> None:
        super().__init__()
        mean_values = _channel_values(mean, 0.0, channels, "mean", model)
        std_values = _channel_values(std, 1.0, channels, "std", model)
        if not all(v > 0 for v in std_values):
            raise ValueError(f"model '{model}': std must be strictly positive, got {list(std_values)!r}")
        self.register_buffer("mean", torch.tensor(mean_values, dtype=torch.float32).view(1, channels, 1, 1))
        self.register_buffer("std", torch.tensor(std_values, dtype=torch.float32).view(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``(x - mean) / std`` broadcast over ``(N, C, H, W)``."""
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        """Show the statistics in ``repr``."""
        return f"mean={self.stats()[0]}, std={self.stats()[1]}"

    def stats(self) -> tuple[list[float], list[float]]:
        """Return the current per-channel ``(mean, std)`` as lists of Python floats.

        The buffers are float32; each value is given as the shortest decimal that rounds back to the same float32, so
        ``0.1307`` reads back as ``0.1307`` and not ``0.13070000708103180``. The values follow the buffers, including
        after ``load_state_dict``.
        """
        return _shortest(self.mean), _shortest(self.std)


class Classifier(nn.Module):
    """Base class of every model of the zoo: ``forward(x) = logits_from_features(features(x))``.

    Subclasses build their layers after calling ``super().__init__`` and implement :meth:`extract` (the network from the
    *normalised* input to the penultimate layer) and :meth:`logits_from_features`. Normalisation lives inside the model
    (``self.normalize``), so inputs are always pixels in ``[0, 1]``.

    Parameters
    ----------
    name
        Registry name of the architecture (e.g. ``"resnet18"``, ``"wrn-28-10"``); recorded in :attr:`config`.
    num_classes
        Number of output classes (>= 2).
    input_shape
        ``(C, H, W)`` of the inputs the model is built for.
    mean, std
        Per-channel normalisation statistics (length ``C`` or 1); ``None`` means identity.
    arch_config
        JSON-serialisable architecture keyword arguments needed to rebuild the model (recorded in :attr:`config`).
    min_size
        Smallest ``(H, W)`` the architecture accepts; a smaller ``input_shape`` raises :class:`ValueError`.

    Attributes
    ----------
    num_classes : int
        Number of classes.
    input_shape : tuple of int
        ``(C, H, W)``.
    feature_dim : int
        Size of :meth:`features` per sample; subclasses set it.
    config : dict
        JSON-serialisable keyword arguments that rebuild the model with ``models.from_config``: ``name``,
        ``num_classes``, ``input_shape`` (a list), ``mean`` and ``std`` (per-channel lists) and the architecture
        options. A read-only property returning a fresh dict.
    normalize : Normalize
        The input normalisation.
    """

    feature_dim: int

    def __init__(
        self,
        name: str,
        num_classes: int,
        input_shape: Sequence[int],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        arch_config: Mapping[str, Any] | None = None,
        min_size: tuple[int, int] = (1, 1),
    ) -> None:
        super().__init__()
        self.num_classes = check_num_classes(num_classes, name)
        self.input_shape = check_input_shape(input_shape, name)
        channels, height, width = self.input_shape
        if height < min_size[0] or width < min_size[1]:
            raise ValueError(
                f"model '{name}' needs inputs of at least {min_size[0]}x{min_size[1]} pixels, "
                f"got {height}x{width}"
            )
        self.normalize = Normalize(mean, std, channels, name)
        self._name = name
        self._arch_config: dict[str, Any] = dict(arch_config or {})

    @property
    def name(self) -> str:
        """Registry name of the architecture (``config["name"]``); ``models.create`` sets it to the requested name."""
        return self._name

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable keyword arguments that rebuild this architecture with ``models.from_config``.

        A fresh dict on every access: ``name``, ``num_classes``, ``input_shape`` (a list), ``mean`` and ``std``
        (per-channel lists read from the normalisation buffers, so they follow ``load_state_dict``) and the
        architecture options (e.g. ``dropout``, ``latent_dim``).
        """
        mean, std = self.normalize.stats()
        return {
            "name": self._name,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "mean": mean,
            "std": std,
            **copy.deepcopy(self._arch_config),
        }

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """Map a *normalised* input ``(N, C, H, W)`` to the penultimate layer ``(N, feature_dim)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement extract()")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the penultimate-layer features of pixel inputs.

        Parameters
        ----------
        x : torch.Tensor
            Pixels in ``[0, 1]``, shape ``(N, C, H, W)``.

        Returns
        -------
        torch.Tensor
            Shape ``(N, feature_dim)``; normalisation is applied first.
        """
        return self.extract(self.normalize(x))

    def logits_from_features(self, z: torch.Tensor) -> torch.Tensor:
        """Map features ``(N, feature_dim)`` to logits ``(N, num_classes)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement logits_from_features()")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(N, num_classes)`` of pixel inputs ``(N, C, H, W)`` in ``[0, 1]``.

        The input is not validated here (this must stay traceable for ONNX export and cheap); call :meth:`check_input`
        at a boundary where user data enters.
        """
        return self.logits_from_features(self.features(x))

    def check_input(self, x: torch.Tensor) -> None:
        """Check that ``x`` is a floating-point batch of the shape this model was built for.

        Parameters
        ----------
        x : torch.Tensor
            Candidate input.

        Raises
        ------
        ValueError
            If ``x`` is not a floating tensor of shape ``(N, C, H, W)`` with ``N >= 1`` and ``(C, H, W)`` equal to
            :attr:`input_shape`.
        """
        name = self.name
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"model '{name}' expects a torch.Tensor, got {type(x).__name__}")
        c, h, w = self.input_shape
        if x.dim() != 4:
            raise ValueError(
                f"model '{name}' expects a batch of shape (N, {c}, {h}, {w}), got a {x.dim()}-d tensor "
                f"of shape {tuple(x.shape)}"
            )
        if x.shape[0] < 1:
            raise ValueError(f"model '{name}' got an empty batch")
        if x.shape[1] != c:
            raise ValueError(f"model '{name}' expects {c} channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
        if (x.shape[2], x.shape[3]) != (h, w):
            raise ValueError(
                f"model '{name}' was built for {h}x{w} inputs, got {x.shape[2]}x{x.shape[3]} (shape {tuple(x.shape)})"
            )
        if not x.is_floating_point():
            raise ValueError(f"model '{name}' expects floating-point pixels in [0, 1], got dtype {x.dtype}")
