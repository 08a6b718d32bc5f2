"""Name -> factory registry of the model zoo (timm-style).

Factories have the signature ``fn(num_classes, input_shape, **kwargs) -> Classifier`` and are registered with the
:func:`register` decorator. Besides literal names, the registry knows *patterns* such as ``wrn-D-W`` whose numeric
fields are parsed from the requested name and passed to the factory as keyword arguments.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from models.base import Classifier, check_input_shape, check_num_classes

__all__ = ["create", "describe", "from_config", "list_models", "register", "register_pattern"]

Factory = Callable[..., Classifier]


@dataclass(frozen=True)
class _Entry:
    """One registered architecture: a literal name, or a pattern with a parser."""

    display: str
    description: str
    factory: Factory
    parse: Callable[[str], dict[str, Any] | None] | None = None
    prefix: str = ""
    rule: str = ""


_ENTRIES: list[_Entry] = []


def _known() -> str:
    return ", ".join(entry.display for entry in _ENTRIES)


def _check_new(name: str, lower: str) -> None:
    """Reject a malformed or already registered name (``lower`` is the part that must be lower-case)."""
    if not isinstance(name, str) or not name or lower != lower.strip().lower():
        raise ValueError(f"model names must be non-empty lower-case strings, got {name!r}")
    if any(entry.display == name for entry in _ENTRIES):
        raise ValueError(f"model '{name}' is already registered")


def register(name: str, description: str) -> Callable[[Factory], Factory]:
    """Register a model factory under a literal name.

    Parameters
    ----------
    name
        Lower-case registry name, e.g. ``"resnet18"``.
    description
        One-line description for the CLI table (architecture and paper/source).

    Returns
    -------
    callable
        A decorator that registers ``fn(num_classes, input_shape, **kwargs) -> Classifier`` and returns it unchanged.

    Raises
    ------
    ValueError
        If the name is empty, not lower-case, or already registered.

    Examples
    --------
    >>> @register("my-net", "My network (Doe et al. 2024)")  # doctest: +SKIP
    ... def my_net(num_classes, input_shape, **kwargs):
    ...     return MyNet(num_classes, input_shape, **kwargs)
    """
    _check_new(name, name)

    def decorator(fn: Factory) -> Factory:
        _ENTRIES.append(_Entry(display=name, description=" ".join(description.split()), factory=fn))
        return fn

    return decorator


def register_pattern(
    display: str,
    description: str,
    prefix: str,
    parse: Callable[[str], dict[str, Any] | None],
    rule: str,
) -> Callable[[Factory], Factory]:
    """Register a factory for a family of names such as ``wrn-D-W``.

    Parameters
    ----------
    display
        How the family is listed by :func:`list_models`, e.g. ``"wrn-D-W"``.
    description
        One-line description for the CLI table.
    prefix
        Names starting with this prefix belong to the family, e.g. ``"wrn-"``; a name with the prefix that ``parse``
        rejects raises :class:`ValueError` quoting ``rule``.
    parse
        Maps a requested name to the factory keyword arguments it encodes, or ``None`` if it does not fit the pattern.
    rule
        Human-readable statement of what a valid name looks like.

    Returns
    -------
    callable
        A decorator registering the factory; the keyword arguments produced by ``parse`` cannot also be given by the
        caller.
    """
    _check_new(display, prefix)

    def decorator(fn: Factory) -> Factory:
        _ENTRIES.append(
            _Entry(
                display=display,
                description=" ".join(description.split()),
                factory=fn,
                parse=parse,
                prefix=prefix,
                rule=rule,
            )
        )
        return fn

    return decorator


def _resolve(name: object, allow_pattern: bool = False) -> tuple[_Entry, dict[str, Any], str]:
    """Find the entry for ``name``; return it, the keyword arguments encoded in the name, and the canonical name.

    With ``allow_pattern`` the family's display name itself (``wrn-D-W``) resolves too (for :func:`describe`).
    """
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {name!r}; known: {_known()}")
    key = name.strip().lower()
    for entry in _ENTRIES:
        if entry.parse is None and entry.display == key:
            return entry, {}, key
    for entry in _ENTRIES:
        if entry.parse is not None and (key.startswith(entry.prefix) or key == entry.display.lower()):
            if allow_pattern and key == entry.display.lower():
                return entry, {}, entry.display
            encoded = entry.parse(key)
            if encoded is None:
                raise ValueError(f"bad model name '{name}': {entry.rule}")
            return entry, encoded, key
    raise ValueError(f"unknown model '{name}'; known: {_known()}")


def _check_kwargs(entry: _Entry, name: str, kwargs: Mapping[str, Any], encoded: Mapping[str, Any]) -> None:
    """Turn unknown or conflicting keyword arguments into a one-line ValueError instead of a TypeError."""
    clash = sorted(set(kwargs) & set(encoded))
    if clash:
        raise ValueError(f"model '{name}': option(s) {', '.join(clash)} are set by the name and cannot be given too")
    params = inspect.signature(entry.factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [
        p.name
        for p in params.values()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        and p.name not in ("num_classes", "input_shape")
        and p.name not in encoded
    ]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"model '{name}' has no option(s) {', '.join(unknown)}; accepted: {', '.join(accepted) or 'none'}"
        )


def check_options(name: str, kwargs: Mapping[str, Any]) -> None:
    """Refuse, without building anything, a name or options that :func:`create` would refuse for any data.

    Checks the name, the option names, and that ``mean`` / ``std`` are a number or a list of numbers (``std`` > 0);
    what depends on the data (their length against the channels, an input too small) is checked by :func:`create`.

    Raises
    ------
    ValueError
        One line naming the model and the problem.
    """
    entry, encoded, canonical = _resolve(name)
    _check_kwargs(entry, canonical, kwargs, encoded)
    for key in ("mean", "std"):
        if key not in kwargs or kwargs[key] is None:
            continue
        v = kwargs[key]
        values = v if isinstance(v, (list, tuple)) else [v]
        if not values or not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in values):
            raise ValueError(f"model '{canonical}': {key} must be a number or a list of numbers, got {v!r}")
        if key == "std" and not all(e > 0 for e in values):
            raise ValueError(f"model '{canonical}': std must be positive, got {v!r}")


def create(name: str, num_classes: int, input_shape: tuple[int, int, int], **kwargs: Any) -> Classifier:
    """Build a registered model.

    Parameters
    ----------
    name
        Registry name (case-insensitive), e.g. ``"cnn-small"`` or ``"wrn-28-10"``.
    num_classes
        Number of classes, >= 2.
    input_shape
        ``(C, H, W)`` of the inputs, three positive integers.
    **kwargs
        ``mean`` / ``std`` (per-channel normalisation, length ``C`` or 1) and architecture options (e.g. ``dropout``,
        ``latent_dim``).

    Returns
    -------
    Classifier
        A freshly initialised model whose ``config`` rebuilds it through :func:`from_config`.

    Raises
    ------
    ValueError
        For an unknown name, a malformed pattern name, a bad class count or shape, an input too small for the
        architecture, or an unknown option.
    """
    entry, encoded, key = _resolve(name)
    check_num_classes(num_classes, key)
    shape = check_input_shape(input_shape, key)
    _check_kwargs(entry, key, kwargs, encoded)
    model = entry.factory(num_classes, shape, **encoded, **kwargs)
    if not isinstance(model, Classifier):
        raise TypeError(f"factory of model '{key}' returned {type(model).__name__}, not a Classifier")
    model._name = key  # the registry name wins over the class default (a factory may be registered twice)
    return model


def from_config(config: Mapping[str, Any]) -> Classifier:
    """Rebuild a model from its :attr:`Classifier.config`.

    Parameters
    ----------
    config
        A mapping with ``name``, ``num_classes``, ``input_shape`` and the remaining keyword arguments of :func:`create`
        (as produced by ``model.config``, possibly after a JSON round trip).

    Returns
    -------
    Classifier
        A freshly initialised model with the same architecture and normalisation; load the weights with
        ``load_state_dict``.

    Raises
    ------
    ValueError
        If the config is not a mapping or lacks a required key, or if :func:`create` rejects it.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"model config must be a dict, got {type(config).__name__}")
    missing = [key for key in ("name", "num_classes", "input_shape") if key not in config]
    if missing:
        raise ValueError(f"model config lacks {', '.join(missing)}; it has {', '.join(map(str, config)) or 'nothing'}")
    rest = {str(k): v for k, v in config.items() if k not in ("name", "num_classes", "input_shape")}
    shape = config["input_shape"]
    shape = tuple(shape) if isinstance(shape, list) else shape
    return create(config["name"], config["num_classes"], shape, **rest)


def list_models() -> list[str]:
    """Return the registered names in registration order; pattern families appear as their pattern (``wrn-D-W``)."""
    return [entry.display for entry in _ENTRIES]


def describe(name: str) -> str:
    """Return the one-line description of a registered model (a concrete or pattern name).

    Raises
    ------
    ValueError
        For an unknown or malformed name.
    """
    entry, _, _ = _resolve(name, allow_pattern=True)
    return entry.description
