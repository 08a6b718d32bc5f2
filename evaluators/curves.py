r"""Accuracy-vs-epsilon curves and the AUAC, computed exactly from per-example eps*.

The SAT paper (``000_e2e3710bc929b9d7.txt``, Section IV) defines the Area Under the Accuracy Curve

.. math::

    \mathrm{AUAC}_{\varepsilon_{max}}(f) = \frac{1}{\varepsilon_{max}} \int_0^{\varepsilon_{max}} \mathrm{acc}(\varepsilon)\,
    d\varepsilon, \qquad \mathrm{acc}(\varepsilon) = \frac{1}{n} \sum_i \mathbf{1}[\varepsilon^*_i > \varepsilon],

where :math:`\varepsilon^*_i` is the size of the smallest adversarial perturbation found for example *i* (0 when it is
misclassified clean). Because :math:`\int_0^{\varepsilon_{max}} \mathbf{1}[\varepsilon^* > e]\,de =
\min(\varepsilon^*, \varepsilon_{max})`, the integral is exact: ``AUAC = mean(min(eps*, eps_max)) / eps_max``. The
trapezoid rule on a grid (epsilon = 0 included), as published tables use, is given for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

ArrayLike = Sequence[float] | np.ndarray | torch.Tensor


def _as_array(eps_star: ArrayLike) -> np.ndarray:
    a = eps_star.detach().cpu().double().numpy() if isinstance(eps_star, torch.Tensor) else np.asarray(eps_star, float)
    a = np.array([math.inf if v is None else v for v in a.tolist()], dtype=float) if a.dtype == object else a
    if a.ndim != 1 or a.size == 0:
        raise ValueError("eps_star must be a non-empty 1-D array")
    if np.isnan(a).any() or (a < 0).any():
        raise ValueError("eps_star must be >= 0 (inf for never fooled)")
    return a


def accuracy_at(eps_star: ArrayLike, eps: float | ArrayLike) -> np.ndarray | float:
    """Accuracy at each ``eps``: the fraction of examples with eps* > eps (an example at eps* = eps is fooled)."""
    a = np.sort(_as_array(eps_star))
    e = np.asarray(eps, dtype=float)
    acc = 1.0 - np.searchsorted(a, e, side="right") / a.size
    return float(acc) if acc.ndim == 0 else acc


def auac(eps_star: ArrayLike, eps_max: float) -> float:
    """Exact AUAC: ``mean(min(eps*, eps_max)) / eps_max``, computed as ``mean(min(eps* / eps_max, 1))``: every term
    at most 1, so the rounding of the mean cannot take a fully robust curve above 1 (the mean of three equal radii
    divided by one of them can be 1.0000000000000002, which a report's schema refuses)."""
    if not eps_max > 0:
        raise ValueError(f"eps_max must be positive, got {eps_max}")
    return float(np.minimum(_as_array(eps_star) / eps_max, 1.0).mean())


def auac_trapezoid(eps_grid: ArrayLike, accuracy: ArrayLike) -> float:
    """AUAC by the trapezoid rule over a grid starting at 0 (as the SAT paper's tables)."""
    g, acc = np.asarray(eps_grid, float), np.asarray(accuracy, float)
    if g.ndim != 1 or g.shape != acc.shape or g.size < 2 or g[0] != 0 or (np.diff(g) <= 0).any():
        raise ValueError("eps_grid must be increasing, start at 0, and match accuracy in length")
    return float(np.sum((acc[1:] + acc[:-1]) * np.diff(g)) / 2 / g[-1])


def auac_bootstrap_ci(
    eps_star: ArrayLike, eps_max: float, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the exact AUAC, resampling examples."""
    a = np.minimum(_as_array(eps_star), eps_max) / eps_max
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, a.size, size=(n_boot, a.size))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_gap_ci(eps_a: np.ndarray, eps_b: np.ndarray, eps_max: float, n_boot: int = 1000,
                  seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of AUAC(b) - AUAC(a) from paired per-example eps* (examples resampled
    together, ``n_boot`` resamples seeded by ``seed``)."""
    d = (np.minimum(eps_b, eps_max) - np.minimum(eps_a, eps_max)) / eps_max
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return float(lo), float(hi)


def eps_grid(eps_max: float, points: int = 33) -> np.ndarray:
    """``points`` equally spaced radii from 0 to ``eps_max``."""
    return np.linspace(0.0, eps_max, points)


def curve_record(eps_star: ArrayLike, eps_max: float, points: int = 33, seed: int = 0) -> dict:
    """The curve fields shared by ``curves.json`` and the audit report.

    ``eps_star`` holds one value per example, ``None`` for never fooled up to eps_max.
    """
    a = _as_array(eps_star)
    grid = eps_grid(eps_max, points)
    lo, hi = auac_bootstrap_ci(a, eps_max, seed=seed)
    return {
        "eps_star": [None if not math.isfinite(v) or v > eps_max else float(v) for v in a],
        "eps_grid": [float(v) for v in grid],
        "accuracy": [float(v) for v in accuracy_at(a, grid)],
        "auac": auac(a, eps_max),
        "auac_ci": [lo, hi],
    }
