"""Weights trained elsewhere: reading a foreign weights file, finding its state dict, loading it strictly.

Reading never executes code. A PyTorch file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ``.tar``) is read only with
``torch.load(path, map_location="cpu", weights_only=True)``, whose restricted unpickler builds tensors and plain
containers and refuses every other global: a pickle that would construct an object or call a function (a whole
``torch.save(model)``, a class with ``__reduce__``) is refused with a :class:`~kit.errors.UserError` naming the refused
global. Besides torch's defaults, three plain-data globals that real training scripts store beside their weights are
allowed, none of which runs code when built: ``argparse.Namespace`` (the ``args`` of timm, DeiT, MAE, fairseq
checkpoints), and NumPy's ``scalar`` with ``numpy.dtype`` and its non-object dtype classes (``best_acc1`` saved as a
``numpy.float64``). A ``.safetensors`` file holds no code at all and is read with ``safetensors.safe_open``.

Where the weights are (:func:`find_state_dict`): released checkpoints put them at the top level (``torch.save(
model.state_dict())``) or under a key beside training state (``epoch``, ``optimizer``, ``args``). Without ``key`` the
first of these that holds a state dict wins:

1. the top level, when every value there is a tensor;
2. the well-known keys, in this fixed order: ``state_dict``, ``model_state_dict``, ``model``, ``net``, ``network``,
   ``module``, then the exponential-moving-average copies ``state_dict_ema``, ``model_ema``, ``ema_state_dict``,
   ``ema`` (last: the raw weights are what a release's own loader uses by default; the EMA copy is taken only when it
   is the only one, and ``key="model_ema"`` picks it explicitly).

A key may hold the state dict itself or a list of exactly one (``{"state_dict": [sd]}``); a list of several is
ambiguous and refused, naming the ``key`` that picks one (``state_dict.0``). ``key`` is a dotted path
(``checkpoint.model``, ``ema.weights``, ``state_dict.1``); a dictionary key that itself contains dots matches whole.
A state dict is a non-empty mapping whose every value is a tensor, so ``epoch`` or ``optimizer`` entries beside the
weights never pass for weights.

:func:`strip_prefixes` removes the wrappers' prefixes (``module.`` of DataParallel / DistributedDataParallel,
``_orig_mod.`` of ``torch.compile``) and :func:`load_strict` loads strictly, with messages that name the first missing,
unexpected or mis-shaped tensor.
"""

from __future__ import annotations

import functools
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from kit.errors import UserError
from kit.io import require_file

log = logging.getLogger(__name__)

#: Suffixes read with ``torch.load(weights_only=True)``.
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
#: Keys searched, in this order, when no ``key`` is given (after the top level itself).
WELL_KNOWN_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module")
#: Exponential-moving-average copies, searched after :data:`WELL_KNOWN_KEYS`.
EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema")
#: Prefixes :func:`strip_prefixes` removes when every key carries one.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_MAX_KEYS_LISTED = 10


@functools.lru_cache(maxsize=1)
def _extra_safe_globals() -> tuple[Any, ...]:
    """Plain-data globals allowed beside torch's defaults (see the module docstring)."""
    import argparse

    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    extra: list[Any] = [argparse.Namespace, np.dtype, scalar]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:  # numpy >= 1.25: a class per dtype, which a pickled dtype names
        extra += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and n != "ObjectDType"]
    return tuple(extra)


def _show(key: Any, limit: int = 40) -> str:
    """A key of anyone's file, fit for a one-line message (no control characters, bounded length)."""
    text = key if isinstance(key, str) else repr(key)
    if not text.isprintable():
        text = ascii(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _list_keys(keys: list[Any]) -> str:
    shown = ", ".join(_show(k) for k in keys[:_MAX_KEYS_LISTED])
    more = len(keys) - _MAX_KEYS_LISTED
    return shown + (f", ... ({more} more)" if more > 0 else "") if keys else "(none)"


def _read_torch(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(list(_extra_safe_globals())):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own message ends with advice to load the file unsafely; ours must not pass that on.
        opcode = re.search(r"Unsupported operand (\d+)", str(e))
        if opcode:  # garbage and the opcodes of old-style class pickles look alike: refused either way
            raise UserError(f"refusing to load {path}: torch.load(weights_only=True) does not read it (pickle opcode "
                            f"{opcode.group(1)}): a corrupt file, or one holding objects other than tensors (possibly "
                            "code)") from e
        refused = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", str(e))
        what = f" ({refused.group(1)})" if refused else ""
        raise UserError(
            f"refusing to load {path}: it holds objects other than tensors{what} (possibly code, e.g. a whole model "
            "saved with torch.save(model)), and weights are only read with torch.load(weights_only=True)"
        ) from e
    except Exception as e:  # torch.load of arbitrary bytes raises anything: KeyError on garbage, EOFError when empty
        first = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable PyTorch file: {first[:200]}") from e


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} is not a readable safetensors file: {e}") from e


def read_weights(path: str | Path) -> Any:
    """Read a foreign weights file without executing anything it holds.

    Parameters
    ----------
    path : path
        ``.pt``, ``.pth``, ``.bin``, ``.ckpt`` or ``.tar``: read with ``torch.load(map_location="cpu",
        weights_only=True)`` (tensors and plain containers only; see the module docstring for the three plain-data
        globals also allowed). ``.safetensors``: read with ``safetensors.safe_open``.

    Returns
    -------
    object
        What the file holds: for a PyTorch file any tree of dicts, lists and tensors (give it to
        :func:`find_state_dict`); for safetensors a dict of tensors.

    Raises
    ------
    UserError
        A missing file, an unknown suffix, an unreadable or corrupt file, or a pickle holding anything but tensors and
        plain data (possibly code): refused, never loaded unsafely.
    """
    path = require_file(path, "weights file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix in TORCH_SUFFIXES:
        return _read_torch(path)
    hint = " (a torch.export program .pt2 is imported as a program, not as weights)" if suffix == ".pt2" else ""
    raise UserError(f"{path}: unknown weights file type {suffix or '(no suffix)'!r}: expected "
                    f"{', '.join(TORCH_SUFFIXES)} or .safetensors{hint}")


def _is_state_dict(value: Any) -> bool:
    return (isinstance(value, Mapping) and len(value) > 0
            and all(isinstance(k, str) for k in value) and all(isinstance(v, torch.Tensor) for v in value.values()))


def _as_state_dict(value: Any, where: str, source: str) -> tuple[dict[str, torch.Tensor], str] | None:
    """``value`` as a state dict (itself, or the one dict of a one-element list); None when it is neither.

    A list of several state dicts is refused: which one is meant is the caller's choice.
    """
    if _is_state_dict(value):
        return dict(value), where
    if isinstance(value, (list, tuple)):
        dicts = [i for i, v in enumerate(value) if _is_state_dict(v)]
        if len(value) == 1 and dicts:
            return dict(value[0]), f"{where}[0]"
        if len(dicts) > 1:
            path = where.strip("'") if where != "top level" else ""
            picks = ", ".join(f"{path}.{i}" if path else str(i) for i in dicts[:4])
            raise UserError(f"{source}: {where} holds {len(dicts)} state dicts (one per model?): pick one with "
                            f"--key ({picks}{', ...' if len(dicts) > 4 else ''})")
    return None


def _resolve(obj: Any, key: str, source: str) -> Any:
    """Follow the dotted path ``key`` (longest dictionary key first, integers index lists)."""
    parts = key.split(".")
    node, i = obj, 0
    trail: list[str] = []
    while i < len(parts):
        for j in range(len(parts), i, -1):
            part = ".".join(parts[i:j])
            if isinstance(node, Mapping) and part in node:
                node = node[part]
                break
            if (j == i + 1 and isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node)):
                node = node[int(part)]
                break
        else:
            where = f"under {'.'.join(trail)!r}" if trail else "at the top level"
            if isinstance(node, Mapping):
                have = f"keys there: {_list_keys(list(node))}"
            elif isinstance(node, (list, tuple)):
                have = f"a list of {len(node)} there"
            else:
                have = f"a {type(node).__name__} there"
            raise UserError(f"--key {_show(key, 80)}: {source} has no {_show(parts[i])!r} {where} ({have})")
        trail.append(".".join(parts[i:j]))
        i = j
    return node


def find_state_dict(obj: Any, key: str | None = None, source: str = "") -> tuple[dict[str, torch.Tensor], str]:
    """Find the state dict in what :func:`read_weights` returned.

    Parameters
    ----------
    obj : object
        The file's content.
    key : str, optional
        Where the weights are, as a dotted path (``model``, ``checkpoint.model``, ``ema.weights``, ``state_dict.0``).
        Without it: the top level when all its values are tensors, else the first well-known key holding a state
        dict, in the order of :data:`WELL_KNOWN_KEYS` then :data:`EMA_KEYS`.
    source : str
        The file, for messages.

    Returns
    -------
    state : dict
        Tensor name -> tensor, in the file's order.
    where : str
        Where it was found, for messages and records: ``"top level"``, ``"'state_dict'"``, ``"'state_dict'[0]"``,
        ``"'checkpoint.model'"``.

    Raises
    ------
    UserError
        ``key`` not in the file or not holding a state dict; a list of several state dicts; no layout fits (the
        message lists the top-level keys and suggests ``--key``).
    """
    source = source or "the weights file"
    if key:
        value = _resolve(obj, key, source)
        found = _as_state_dict(value, repr(key), source)
        if found is None:
            if isinstance(value, Mapping):
                bad = [k for k, v in value.items() if not isinstance(v, torch.Tensor)]
                what = (f"a dict whose entries are not all tensors ({_list_keys(bad)})" if value
                        else "an empty dict")
            else:
                what = f"a {type(value).__name__}"
            raise UserError(f"--key {_show(key, 80)}: {source} holds {what} there, not a state dict")
        return found
    found = _as_state_dict(obj, "top level", source)
    if found is not None:
        return found
    if isinstance(obj, Mapping):
        for name in WELL_KNOWN_KEYS + EMA_KEYS:
            if name in obj:
                found = _as_state_dict(obj[name], repr(name), source)
                if found is not None:
                    if name in EMA_KEYS:
                        log.info("%s: using the exponential-moving-average weights under %r (the only state dict "
                                 "found)", source, name)
                    return found
        raise UserError(f"{source}: no state dict found; its top-level keys are {_list_keys(list(obj))}: name the "
                        "one holding the weights with --key KEY (dotted for nested ones, e.g. --key checkpoint.model)")
    raise UserError(f"{source} holds a {type(obj).__name__}, not a state dict (a dict of tensors)")


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove wrapper prefixes shared by every key, repeatedly.

    ``module.`` (``nn.DataParallel``, ``DistributedDataParallel``) and ``_orig_mod.`` (``torch.compile``), in any
    nesting (``module._orig_mod.``, ``_orig_mod.module.``), are removed only when every key carries them.

    Returns
    -------
    state : dict
        The same tensors under the shortened names.
    removed : list of str
        The prefixes removed, outermost first (empty when none).
    """
    out = dict(state)
    removed: list[str] = []
    while out:
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) and len(k) > len(prefix) for k in out):
                out = {k[len(prefix):]: v for k, v in out.items()}
                removed.append(prefix)
                break
        else:
            break
    return out, removed


def _shape(t: torch.Tensor) -> str:
    return str(tuple(int(s) for s in t.shape))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _prefix_hint(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str:
    """``; every checkpoint key starts with 'X.'`` when dropping that one prefix would make the keys fit."""
    heads = {k.split(".", 1)[0] for k in state}
    if len(heads) == 1 and all("." in k for k in state):
        head = next(iter(heads))
        if {k.split(".", 1)[1] for k in state} == set(expected):
            return f"; every checkpoint key starts with {_show(head + '.')!r}, which the model's keys do not"
    return ""


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` strictly: every key present, none extra, every shape equal.

    Floating-point tensors of another precision (fp16, bf16, fp64 checkpoints) are cast to the dtype of the model's
    tensor (logged); integer and boolean tensors are never cast, and a floating/integer mismatch is refused.

    Parameters
    ----------
    model : nn.Module
    state : mapping
        Tensor name -> tensor (after :func:`find_state_dict` and :func:`strip_prefixes`).
    source : str
        The file, for messages.

    Raises
    ------
    UserError
        Missing or unexpected keys (their counts and the first of each), the first tensor whose shape differs (both
        shapes, and how many differ), or a tensor whose kind of dtype differs.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{_plural(len(missing), 'key')} of the model missing from the checkpoint (first: "
                         f"{_show(missing[0], 80)})")
        if unexpected:
            parts.append(f"{_plural(len(unexpected), 'checkpoint key')} unknown to the model (first: "
                         f"{_show(unexpected[0], 80)})")
        raise UserError(f"{source}: weights do not fit the model: {'; '.join(parts)}{_prefix_hint(state, expected)}")
    mismatched = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if mismatched:
        k = mismatched[0]
        more = f" ({_plural(len(mismatched), 'tensor')} differ)" if len(mismatched) > 1 else ""
        raise UserError(f"{source}: {k}: checkpoint has {_shape(state[k])}, model expects {_shape(expected[k])}{more}")
    loaded: dict[str, torch.Tensor] = {}
    cast: dict[tuple[torch.dtype, torch.dtype], int] = {}
    for k, want in expected.items():
        got = state[k]
        if got.dtype != want.dtype:
            if got.is_floating_point() and want.is_floating_point():
                cast[(got.dtype, want.dtype)] = cast.get((got.dtype, want.dtype), 0) + 1
                got = got.to(want.dtype)
            elif (got.is_floating_point() or got.is_complex() or got.dtype == torch.bool
                  or want.is_floating_point() or want.is_complex() or want.dtype == torch.bool):
                raise UserError(f"{source}: {k}: checkpoint holds {got.dtype} values, model expects {want.dtype} "
                                "(only floating-point precisions are converted)")
        loaded[k] = got
    if cast:
        said = ", ".join(f"{_plural(n, 'tensor')} {a} -> {b}" for (a, b), n in cast.items())
        log.info("%s: floating-point weights cast to the model's precision: %s", source, said)
    try:
        model.load_state_dict(loaded, strict=True)
    except RuntimeError as e:  # checked above; what is left is torch's own refusal, in one line
        raise UserError(f"{source}: weights do not fit the model: {str(e).splitlines()[0]}") from e
