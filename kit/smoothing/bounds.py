r"""Binomial confidence bounds and tests for Monte-Carlo certificates (Cohen, Rosenfeld & Kolter, ICML 2019, §3.2).

A smoothed classifier's top-class probability :math:`p_A = P_\delta(f(x + \delta) = c_A)` is known only through
:math:`k` hits among :math:`n` independent noisy samples, :math:`k \sim \mathrm{Bin}(n, p_A)`. Everything here is exact
(no normal approximation) and computed in float64 with :mod:`scipy.stats`:

- :func:`clopper_pearson`: the two-sided exact interval at confidence :math:`1 - \alpha` (Clopper & Pearson 1934),
  :math:`[B(\alpha/2;\ k, n - k + 1),\ B(1 - \alpha/2;\ k + 1, n - k)]` with :math:`B(q; a, b)` the Beta quantile
  (0 below when :math:`k = 0`, 1 above when :math:`k = n`);
- :func:`lower_confidence_bound`: the one-sided lower bound at confidence :math:`1 - \alpha`,
  :math:`\underline{p_A} = B(\alpha;\ k, n - k + 1)` (0 when :math:`k = 0`), the largest :math:`p` with
  :math:`P(\mathrm{Bin}(n, p) \ge k) \le \alpha`. This is what CERTIFY uses (Cohen et al.'s ``LowerConfBound``, their
  code's ``proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]``): :math:`P(\underline{p_A} > p_A) \le \alpha`;
- :func:`binomial_test_p`: the exact binomial test's p-value, two-sided by default, as PREDICT uses it (abstain unless
  ``binomial_test_p(n_A, n_A + n_B, 0.5) <= alpha``; Hung & Fithian 2019 show this two-sided test bounds the
  probability of returning a wrong class by :math:`\alpha`).

Counts ``k`` and ``n`` may be integers or integer numpy arrays (broadcast together); a user mistake (``n < 1``,
``k`` outside ``[0, n]``, ``alpha`` outside (0, 1), a non-integer count) raises :class:`~kit.errors.UserError`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

from kit.errors import UserError

_ALTERNATIVES = ("two-sided", "greater", "less")


def _counts(k: Any, n: Any) -> tuple[np.ndarray, np.ndarray]:
    """``k``, ``n`` as broadcast int64 arrays with ``n >= 1`` and ``0 <= k <= n``; :class:`UserError` otherwise."""
    arrays = []
    for name, value in (("k", k), ("n", n)):
        if isinstance(value, bool) or (isinstance(value, np.ndarray) and value.dtype == bool):
            raise UserError(f"{name} must be an integer count, got {value!r}")
        a = np.asarray(value)
        if a.dtype.kind not in "iuf" and not (a.size == 0 and a.dtype.kind in "fO"):
            raise UserError(f"{name} must be an integer count (or an array of them), got {value!r}")
        a = a.astype(np.float64) if a.size == 0 else a
        if a.dtype.kind == "f" and not (np.isfinite(a).all() and (a == np.round(a)).all()):
            raise UserError(f"{name} must be an integer count, got {value!r}")
        arrays.append(a.astype(np.int64))
    try:
        ka, na = np.broadcast_arrays(*arrays)
    except ValueError:
        raise UserError(f"k and n have shapes {arrays[0].shape} and {arrays[1].shape} that do not broadcast") from None
    if (na < 1).any():
        raise UserError(f"n must be >= 1, got {int(na.min())}")
    if (ka < 0).any() or (ka > na).any():
        raise UserError("k must lie in [0, n]")
    return ka, na


def _alpha(alpha: Any) -> np.ndarray:
    if isinstance(alpha, bool):
        raise UserError(f"alpha must be a number in (0, 1), got {alpha!r}")
    a = np.asarray(alpha)
    if a.dtype.kind not in "iuf" or a.size == 0:
        raise UserError(f"alpha must be a number in (0, 1), got {alpha!r}")
    a = a.astype(np.float64)
    if not ((a > 0) & (a < 1)).all():  # NaN fails too
        raise UserError(f"alpha must lie in (0, 1), got {alpha!r}")
    return a


def _out(a: np.ndarray) -> np.ndarray | np.float64:
    """0-d results as numpy scalars, arrays as arrays."""
    return a[()] if a.ndim == 0 else a


def clopper_pearson(k: Any, n: Any, alpha: Any) -> tuple[np.ndarray | np.float64, np.ndarray | np.float64]:
    r"""Two-sided Clopper–Pearson interval for a binomial proportion at confidence :math:`1 - \alpha`.

    .. math::

        \mathrm{lo} = B(\tfrac{\alpha}{2};\ k,\ n - k + 1), \qquad
        \mathrm{hi} = B(1 - \tfrac{\alpha}{2};\ k + 1,\ n - k),

    with :math:`B(q; a, b)` the quantile of a Beta(a, b) law, ``lo = 0`` when ``k = 0`` and ``hi = 1`` when ``k = n``.
    The same interval as ``scipy.stats.binomtest(k, n).proportion_ci(1 - alpha, method="exact")``, vectorised.

    Parameters
    ----------
    k, n : int or int array
        Successes and trials, broadcast together; ``n >= 1``, ``0 <= k <= n``.
    alpha : float or array
        Total miscoverage, in (0, 1) (``alpha / 2`` on each side).

    Returns
    -------
    lo, hi : float64 (numpy scalars for scalar input, else arrays of the broadcast shape)
    """
    ka, na = _counts(k, n)
    a = _alpha(alpha)
    with np.errstate(invalid="ignore"):
        lo = np.where(ka == 0, 0.0, stats.beta.ppf(a / 2, np.maximum(ka, 1), na - ka + 1))
        hi = np.where(ka == na, 1.0, stats.beta.ppf(1 - a / 2, ka + 1, np.maximum(na - ka, 1)))
    return _out(np.asarray(lo, np.float64)), _out(np.asarray(hi, np.float64))


def lower_confidence_bound(k: Any, n: Any, alpha: Any) -> np.ndarray | np.float64:
    r"""One-sided Clopper–Pearson lower bound of a binomial proportion at confidence :math:`1 - \alpha`.

    .. math::

        \underline{p} = B(\alpha;\ k,\ n - k + 1) \quad (0 \text{ when } k = 0),

    the root in :math:`p` of :math:`P(\mathrm{Bin}(n, p) \ge k) = \alpha`, so that
    :math:`P_{k \sim \mathrm{Bin}(n, p)}(\underline{p}(k) > p) \le \alpha` for every :math:`p`. With :math:`k = n` it
    is :math:`\alpha^{1/n}`, the largest bound ``n`` samples can give. CERTIFY's ``LowerConfBound`` (Cohen et al.
    2019, §3.2).

    Parameters
    ----------
    k, n : int or int array
        Hits and samples, broadcast together; ``n >= 1``, ``0 <= k <= n``.
    alpha : float or array
        In (0, 1).

    Returns
    -------
    float64 (a numpy scalar for scalar input, else an array of the broadcast shape)
    """
    ka, na = _counts(k, n)
    a = _alpha(alpha)
    with np.errstate(invalid="ignore"):
        lo = np.where(ka == 0, 0.0, stats.beta.ppf(a, np.maximum(ka, 1), na - ka + 1))
    return _out(np.asarray(lo, np.float64))


def binomial_test_p(k: Any, n: Any, p: float = 0.5, alternative: str = "two-sided") -> np.ndarray | np.float64:
    r"""Exact binomial test p-value of ``k`` successes in ``n`` trials against success probability ``p``.

    PREDICT (Cohen et al. 2019, §3.2) calls it with the top two counts, ``binomial_test_p(n_A, n_A + n_B, 0.5)``, and
    abstains unless the p-value is at most :math:`\alpha`; as in their code (``scipy.stats.binom_test``) the test is
    two-sided. ``alternative="greater"`` gives the one-sided :math:`P(\mathrm{Bin}(n, p) \ge k)`, ``"less"``
    :math:`P(\mathrm{Bin}(n, p) \le k)`. Wraps ``scipy.stats.binomtest``, elementwise over arrays.

    Parameters
    ----------
    k, n : int or int array
        ``n >= 1``, ``0 <= k <= n``.
    p : float
        Success probability under the null, in [0, 1].
    alternative : {"two-sided", "greater", "less"}

    Returns
    -------
    float64 p-value(s) in [0, 1]
    """
    ka, na = _counts(k, n)
    if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)) or not 0 <= p <= 1:
        raise UserError(f"p must be a number in [0, 1], got {p!r}")
    if alternative not in _ALTERNATIVES:
        raise UserError(f"alternative must be one of {', '.join(_ALTERNATIVES)}, got {alternative!r}")
    out = np.empty(ka.shape, dtype=np.float64)
    for idx in np.ndindex(ka.shape):
        out[idx] = stats.binomtest(int(ka[idx]), int(na[idx]), float(p), alternative=alternative).pvalue
    return _out(out)
