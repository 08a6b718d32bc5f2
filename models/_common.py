"""Small helpers shared by the architecture modules (option validation, convolution arithmetic)."""

from __future__ import annotations


def conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Spatial output size of a convolution or pooling layer (floor mode, dilation 1).

    Parameters
    ----------
    size
        Input height or width.
    kernel, stride, padding
        Layer geometry.

    Returns
    -------
    int
        ``(size + 2 * padding - kernel) // stride + 1`` (may be <= 0 when the input is too small).
    """
    return (size + 2 * padding - kernel) // stride + 1


def check_dropout(dropout: object, model: str) -> float:
    """Validate a dropout probability in ``[0, 1)``.

    Raises
    ------
    ValueError
        If ``dropout`` is not a number in ``[0, 1)``.
    """
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"model '{model}': dropout must be a number in [0, 1), got {dropout!r}")
    return float(dropout)


def check_positive_int(value: object, what: str, model: str) -> int:
    """Validate a positive integer option.

    Raises
    ------
    ValueError
        If ``value`` is not an integer >= 1.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"model '{model}': {what} must be an integer >= 1, got {value!r}")
    return value
