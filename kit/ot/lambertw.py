r"""The principal branch of the Lambert W function in torch, including a log-argument form that never overflows.

:math:`W(x)` is the real solution :math:`w \ge -1` of :math:`w e^{w} = x` for :math:`x \ge -1/e`. The projected
Sinkhorn iteration (Wong, Schmidt & Kolter 2019, Lemma 2 and Algorithm 2; seed ``002_7913be17f57a5a98.txt``) needs
:math:`W(\lambda s\, e^{\lambda w})`, whose argument overflows float32 (and float64) for the large regularisations
:math:`\lambda` that make the projection sharp. :func:`lambertw_exp` therefore takes the logarithm of the argument,
:math:`L = \log x`, and solves for :math:`y = \log W(e^{L})`, the root of

.. math::

    f(y) = e^{y} + y - L = 0 ,

which is smooth, increasing and convex in :math:`y` for every real :math:`L`, so Halley's iteration converges cubically
from the initial guesses below without ever forming :math:`e^{L}`:

- :math:`L < 1`: :math:`W \approx x / (1 + x)`, i.e. :math:`y_0 = L - \operatorname{softplus}(L)` (exact as
  :math:`L \to -\infty`, where :math:`W(x) = x - x^2 + O(x^3)`);
- :math:`L \ge 1`: the asymptotic expansion :math:`W \approx L - \log L + \log L / L` (exact at :math:`L = 1`).

:func:`log_lambertw_exp` returns :math:`y` itself, accurate also where :math:`W(e^L)` underflows, and :func:`lambertw`
is the ordinary :math:`W(x)`, including the negative part :math:`[-1/e, 0)` of the principal branch (Halley on
:math:`w e^{w} - x` from the branch-point series :math:`W \approx -1 + p - p^2/3 + 11 p^3/72`,
:math:`p = \sqrt{2(1 + e x)}`). Arguments below :math:`-1/e` (complex W) give NaN.

All functions work elementwise in the input's dtype and device, are not differentiable (they run without autograd) and
match ``scipy.special.lambertw(x).real`` to about 1e-14 relative in float64 and a few float32 ulps in float32 (see
``tests/test_projection.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["lambertw", "lambertw_exp", "log_lambertw_exp"]

# Halley iterations. From the initial guesses the relative error of y is below 0.5 everywhere; Halley's cubic
# convergence takes that below float64 precision in 5 steps. One more is a safety margin.
_HALLEY_STEPS = 6


def _check_float(t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, dtype=torch.get_default_dtype())
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    return t


@torch.no_grad()
def log_lambertw_exp(log_x: torch.Tensor) -> torch.Tensor:
    r""":math:`\log W(e^{L})` for any real :math:`L` (``log_x``), elementwise, without forming :math:`e^{L}`.

    Parameters
    ----------
    log_x : tensor
        :math:`L = \log x`; ``-inf`` gives ``-inf`` (W(0) = 0), ``+inf`` gives ``+inf``, NaN gives NaN.

    Returns
    -------
    tensor
        :math:`y` with :math:`e^{y} + y = L`, same shape, dtype and device.
    """
    L = _check_float(log_x)
    finite = torch.isfinite(L)
    Lf = torch.where(finite, L, torch.zeros_like(L))
    # initial guesses (see the module docstring)
    small = Lf - F.softplus(Lf)
    Lc = Lf.clamp_min(1.0)
    logL = torch.log(Lc)
    large = torch.log(Lc - logL + logL / Lc)
    y = torch.where(Lf < 1.0, small, large)
    # e^y below the smallest normal number only adds a relative 1e-35 (float32) to f = e^y + y - L, and clamping keeps
    # exp away from subnormal results, which are an order of magnitude slower on CPUs
    floor = math.log(torch.finfo(y.dtype).tiny) + 8.0
    for _ in range(_HALLEY_STEPS):
        ey = torch.exp(y.clamp_min(floor))
        f = ey + y - Lf
        fp = ey + 1.0
        # Halley: y -= f / (f' - f f'' / (2 f')), with f'' = e^y
        y = y - f / (fp - f * ey / (2.0 * fp))
    y = torch.where(finite, y, L)  # -inf -> -inf, +inf -> +inf, nan -> nan
    return y


@torch.no_grad()
def lambertw_exp(log_x: torch.Tensor) -> torch.Tensor:
    r""":math:`W(e^{L})` for any real :math:`L` (``log_x``), elementwise, accurate for :math:`L` up to :math:`10^5`
    and beyond (the result is about :math:`L - \log L`) without forming :math:`e^{L}`.

    Parameters
    ----------
    log_x : tensor
        :math:`L = \log x`.

    Returns
    -------
    tensor
        :math:`W(e^{L}) = e^{y}` with :math:`y` from :func:`log_lambertw_exp`; same shape, dtype and device.
    """
    L = _check_float(log_x)
    w = torch.exp(log_lambertw_exp(L))
    # For W > 1, e^y carries a relative error |y| ulp; one fixed-point polish W = L - log W (contracting by 1/W)
    # brings it back to a few ulp (e.g. at L = 1e300).
    big = torch.isfinite(L) & (w > 1.0)
    return torch.where(big, L - torch.log(torch.where(big, w, torch.ones_like(w))), w)


@torch.no_grad()
def lambertw(x: torch.Tensor) -> torch.Tensor:
    r"""Principal branch :math:`W_0(x)` for real :math:`x \ge -1/e` (NaN below), elementwise.

    Positive arguments go through :func:`lambertw_exp` (so 1e-300 and 1e300 are as accurate as 1); the negative
    branch part :math:`[-1/e, 0)` uses Halley on :math:`w e^{w} - x`. Close to the branch point :math:`-1/e` the
    function has an infinite slope, so its relative accuracy there is that of the argument's distance to
    :math:`-1/e`.

    Parameters
    ----------
    x : tensor

    Returns
    -------
    tensor
        :math:`W_0(x)`, same shape, dtype and device (``inf`` at ``inf``, NaN at NaN and below :math:`-1/e`).
    """
    x = _check_float(x)
    pos = x > 0
    xp = torch.where(pos, x, torch.ones_like(x))
    out = lambertw_exp(torch.log(xp))
    # One fixed-point polish with the argument itself: W = x e^{-W} contracts errors by W (< 1 here), removing the
    # relative error |log x| * ulp that going through log x costs for tiny x.
    out = torch.where(out < 1.0, xp * torch.exp(-out), out)
    out = torch.where(pos, out, torch.zeros_like(x))
    neg = (x < 0) & (x >= -1.0 / math.e)
    if bool(neg.any()):
        xn = torch.where(neg, x, torch.full_like(x, -0.1))
        p = torch.sqrt((2.0 * (1.0 + math.e * xn)).clamp_min(0.0))
        branch = -1.0 + p - p * p / 3.0 + 11.0 / 72.0 * p * p * p
        series = xn - xn * xn + 1.5 * xn * xn * xn
        w = torch.where(xn < -0.25, branch, series)
        for _ in range(2 * _HALLEY_STEPS):
            ew = torch.exp(w)
            f = w * ew - xn
            wp1 = w + 1.0
            live = wp1 > 0  # at the branch point w = -1 itself there is nothing left to do
            wp1 = torch.where(live, wp1, torch.ones_like(wp1))
            denom = ew * wp1 - (w + 2.0) * f / (2.0 * wp1)
            step = torch.where(live & (denom != 0), f / denom, torch.zeros_like(f))
            w = (w - step).clamp_min(-1.0)
        out = torch.where(neg, w, out)
    out = torch.where(x < -1.0 / math.e, torch.full_like(x, float("nan")), out)
    return torch.where(torch.isnan(x), x, out)
