"""How a model or an engine wants its input, beside the kit's own convention.

Every kit model, attack and report works on float pixels in [0, 1], shape (N, C, H, W): epsilons are in those units.
A model trained elsewhere often takes something else: normalised pixels (``(x - mean) / std``), 0-255 values, NHWC
batches, or uint8 tensors. An :class:`InputConvention` says which, and :meth:`InputConvention.to_native` maps the
kit's pixels onto it, outside the model: the attacks keep working in [0, 1] pixel units on every side, and the
mapping is differentiable (except the final rounding of a uint8 input, which only engines take).

The mapping, per channel c::

    native = (lo + x * (hi - lo) - mean[c]) / std[c]        then NHWC: permute, uint8: round and cast

with ``range=(lo, hi)``, and ``mean``/``std`` in the units of that range (torchvision's 0.485/0.229 for a [0, 1]
model, 123.7/58.4 for a 0-255 one).

Text form (``--engine-input``), fields separated by ``;`` or spaces, lists by commas (``otkit models import`` takes the
same fields as separate flags: ``--input-range``, ``--mean``, ``--std``, ``--input-layout``)::

    range=0,255;layout=nhwc;dtype=uint8
    imagenet                      # a preset: mean 0.485,0.456,0.406 std 0.229,0.224,0.225
    mean=0.1307;std=0.3081
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from kit.errors import UserError

__all__ = ["DTYPES", "IDENTITY", "LAYOUTS", "PRESETS", "InputConvention", "InputModule", "floats", "parse_convention"]

LAYOUTS = ("nchw", "nhwc")
DTYPES = ("float32", "float16", "uint8")

#: Named normalisations (statistics of the training sets, in [0, 1] units)
PRESETS: dict[str, dict[str, Any]] = {
    "imagenet": {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    "cifar10": {"mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)},
    "mnist": {"mean": (0.1307,), "std": (0.3081,)},
    "inception": {"mean": (0.5,), "std": (0.5,)},  # [-1, 1]
}

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8}


@dataclass(frozen=True)
class InputConvention:
    """What a model takes: value range, per-channel normalisation, memory layout and element type.

    Parameters
    ----------
    range : (float, float)
        The values that pixel 0 and pixel 1 map to before normalisation: (0, 1), (0, 255), (-1, 1), ...
    mean, std : tuple of float, optional
        Per-channel normalisation in the units of ``range`` (length C or 1); ``None``: 0 and 1.
    layout : {"nchw", "nhwc"}
    dtype : {"float32", "float16", "uint8"}
        uint8 needs ``range=(0, 255)`` and no mean/std (the graph normalises inside).
    """

    range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str = "nchw"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        lo, hi = self.range
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise UserError(f"input range must be two finite numbers LO,HI with HI > LO, got {lo},{hi}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None and (not v or not all(math.isfinite(t) for t in v)):
                raise UserError(f"input {name} must be finite numbers (one per channel, or one), got "
                            f"{','.join(map(str, v)) if v else 'nothing'}")
        if self.std is not None and not all(t > 0 for t in self.std):
            raise UserError(f"input std must be positive, got {','.join(map(str, self.std))}")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std) \
                and 1 not in (len(self.mean), len(self.std)):
            raise UserError(f"input mean has {len(self.mean)} values but std has {len(self.std)}")
        if self.layout not in LAYOUTS:
            raise UserError(f"input layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.dtype not in DTYPES:
            raise UserError(f"input dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.dtype == "uint8" and (self.range != (0.0, 255.0) or self.mean is not None or self.std is not None):
            raise UserError("a uint8 input takes range=0,255 and no mean/std (a uint8 graph normalises inside)")

    # ------------------------------------------------------------------------------------------------ what it is
    @property
    def identity(self) -> bool:
        """Whether the model takes the kit's own pixels: float32 in [0, 1], NCHW, no normalisation."""
        return self == IDENTITY

    @property
    def differentiable(self) -> bool:
        """Whether gradients flow through :meth:`to_native` (all but uint8)."""
        return self.dtype != "uint8"

    def check_channels(self, channels: int, what: str) -> None:
        """Refuse mean/std whose length is neither 1 nor ``channels``."""
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None and len(v) not in (1, channels):
                raise UserError(f"{what} takes {channels} channel(s) but its input {name} has {len(v)} values")

    def native_shape(self, input_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The per-example shape the model sees for kit shape (C, H, W)."""
        c, h, w = input_shape
        return (h, w, c) if self.layout == "nhwc" else (c, h, w)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; :meth:`from_dict` reads it back."""
        return {"range": list(self.range), "mean": None if self.mean is None else list(self.mean),
                "std": None if self.std is None else list(self.std), "layout": self.layout, "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: Any, source: str = "metadata") -> InputConvention:
        """Read :meth:`to_dict`'s form (metadata is anyone's text: wrong types are a UserError)."""
        if not isinstance(d, dict):
            raise UserError(f"{source}: input convention must be an object, got {type(d).__name__}")
        unknown = set(d) - {"range", "mean", "std", "layout", "dtype"}
        if unknown:
            raise UserError(f"{source}: unknown input convention field(s) {', '.join(sorted(unknown))}")
        def numbers(v: Any, name: str) -> tuple[float, ...]:
            if not isinstance(v, (list, tuple)) or not all(isinstance(t, (int, float)) and not isinstance(t, bool)
                                                           for t in v):
                raise UserError(f"{source}: input convention {name} must be a list of numbers")
            return tuple(float(t) for t in v)

        rng = numbers(d.get("range", [0, 1]), "range")
        mean = None if d.get("mean") is None else numbers(d["mean"], "mean")
        std = None if d.get("std") is None else numbers(d["std"], "std")
        if len(rng) != 2:
            raise UserError(f"{source}: input range must be two numbers, got {list(rng)}")
        layout, dtype = d.get("layout", "nchw"), d.get("dtype", "float32")
        if not isinstance(layout, str) or not isinstance(dtype, str):
            raise UserError(f"{source}: input layout and dtype must be text")
        return cls(range=(rng[0], rng[1]), mean=mean, std=std, layout=layout, dtype=dtype)

    def folded_record(self) -> dict[str, Any]:
        """How a checkpoint records the convention folded into its twin (its ``normalization`` field)."""
        return {**self.to_dict(), "folded_into_twin": not self.identity}

    @classmethod
    def from_folded(cls, record: Any, source: str = "checkpoint") -> InputConvention | None:
        """The convention a :meth:`folded_record` says was folded into a twin; ``None`` when none was."""
        if not isinstance(record, dict) or not record.get("folded_into_twin"):
            return None
        fields = ("range", "mean", "std", "layout", "dtype")
        return cls.from_dict({k: record[k] for k in fields if k in record}, f"{source}: normalization")

    def __str__(self) -> str:
        """The text form :func:`parse_convention` reads (``identity`` for the kit's own)."""
        parts = []
        if self.range != (0.0, 1.0):
            parts.append(f"range={_num(self.range[0])},{_num(self.range[1])}")
        if self.mean is not None:
            parts.append("mean=" + ",".join(map(_num, self.mean)))
        if self.std is not None:
            parts.append("std=" + ",".join(map(_num, self.std)))
        if self.layout != "nchw":
            parts.append(f"layout={self.layout}")
        if self.dtype != "float32":
            parts.append(f"dtype={self.dtype}")
        return ";".join(parts) or "identity"

    # ----------------------------------------------------------------------------------------------- the mapping
    def to_native(self, x: torch.Tensor) -> torch.Tensor:
        """Map kit pixels (N, C, H, W) in [0, 1] to what the model takes (differentiable unless uint8)."""
        lo, hi = self.range
        if (lo, hi) != (0.0, 1.0):
            x = x * (hi - lo) + lo if lo else x * hi
        if self.mean is not None:
            x = x - _channels(self.mean, x)
        if self.std is not None:
            x = x / _channels(self.std, x)
        if self.layout == "nhwc":
            x = x.permute(0, 2, 3, 1)
        if self.dtype == "uint8":
            return x.detach().round().clamp_(0, 255).to(torch.uint8).contiguous()
        if self.dtype == "float16":
            x = x.to(torch.float16)
        return x.contiguous() if self.layout == "nhwc" else x

    def as_seen(self, x: torch.Tensor) -> torch.Tensor:
        """The kit pixels the model actually sees: ``x`` rounded to 1/255 for a uint8 input, else ``x`` itself.

        A twin compared with a uint8 engine is given these, so that both read the same image.
        """
        if self.dtype != "uint8":
            return x
        return (x * 255).round().clamp(0, 255) / 255

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.dtype]


IDENTITY = InputConvention()


def _channels(values: tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def floats(text: str, field: str) -> tuple[float, ...]:
    """``"a,b,c"`` as finite numbers (one per channel); an empty entry, a word or a NaN is a UserError."""
    parts = text.split(",")
    try:
        values = tuple(float(t) for t in parts)
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) for v in values):
        raise UserError(f"input {field} must be finite numbers separated by commas, got {text!r}")
    return values


def parse_convention(text: str) -> InputConvention:
    """Read the text form (module docstring): ``key=value`` fields separated by ``;`` or spaces, or a preset name.

    Keys: ``range`` (``LO,HI``; ``255`` alone means ``0,255``), ``mean``, ``std`` (comma lists), ``layout``
    (``nchw``/``nhwc``), ``dtype`` (``float32``/``float16``/``uint8``; ``uint8`` implies ``range=0,255``); presets:
    ``identity`` and those in :data:`PRESETS`. Later fields override earlier ones.

    Raises
    ------
    UserError
        An unknown key or preset, a malformed value, or a combination :class:`InputConvention` refuses.
    """
    fields: dict[str, Any] = {}
    tokens = [t for t in re.split(r"[;\s]+", text.strip()) if t]
    if not tokens:
        raise UserError("empty input description: give key=value fields (range, mean, std, layout, dtype) or a preset "
                        f"({', '.join(['identity', *PRESETS])})")
    preset = False
    for token in tokens:
        key, sep, value = token.partition("=")
        key = key.strip().lower()
        if not sep:
            if key == "identity":
                continue
            if key not in PRESETS:
                raise UserError(f"unknown input convention {token!r}: give key=value fields (range, mean, std, "
                                f"layout, dtype) or a preset ({', '.join(['identity', *PRESETS])})")
            fields.update(PRESETS[key])
            preset = True
            continue
        if key == "range":
            lo_hi = floats(value, "range")
            if len(lo_hi) == 1:
                lo_hi = (0.0, lo_hi[0])
            if len(lo_hi) != 2:
                raise UserError(f"input range must be LO,HI, got {value!r}")
            fields["range"] = lo_hi
        elif key in ("mean", "std"):
            fields[key] = floats(value, key)
        elif key in ("layout", "dtype"):
            fields[key] = value.strip().lower()
        else:
            raise UserError(f"unknown input convention field {key!r}: use range, mean, std, layout, dtype")
    if fields.get("dtype") == "uint8":
        fields.setdefault("range", (0.0, 255.0))
    if preset and tuple(fields.get("range", (0.0, 1.0))) != (0.0, 1.0):
        raise UserError("a preset's mean and std are in [0, 1] units: with another range give mean= and std= in the "
                        "units of that range")
    if "range" in fields:
        fields["range"] = (float(fields["range"][0]), float(fields["range"][1]))
    return InputConvention(**fields)


class InputModule(torch.nn.Module):
    """A model that takes another convention, made to take the kit's pixels: ``model(convention.to_native(x))``.

    The convention is folded in (differentiable): the twin of a model trained on normalised or 0-255 input takes
    [0, 1] pixels like every kit model, and attacks see gradients in pixel units. The wrapped model's weights are
    under ``model.`` in the state dict; the convention is not a tensor of it (the checkpoint records it as text).
    """

    def __init__(self, model: torch.nn.Module, convention: InputConvention) -> None:
        super().__init__()
        self.model = model
        # the twin computes in its own dtype: a float16 engine input feeds it float32, and a uint8 one the same 0-255
        # values unrounded (gradients do not pass a rounding; a uint8 graph's first Cast is then the identity)
        self.convention = dataclasses.replace(convention, dtype="float32")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.convention.to_native(x))

    def extra_repr(self) -> str:
        return f"input={self.convention}"
