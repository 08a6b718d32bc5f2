r"""Local transport plans on images (Wong, Schmidt & Kolter 2019, §4.3; seed ``002_7913be17f57a5a98.txt``).

Mass may move only inside a k x k window around its pixel, within its channel, so a plan on an (N, C, H, W) batch is
an (N, C, k*k, H, W) tensor ``plan`` with

.. math::

    \Pi[n, c, o, i, j] = \text{mass moved from pixel } (i, j) \text{ to pixel } (i + d_i(o), j + d_j(o)),

where offset ``o`` enumerates the window row by row, :math:`d_i(o) = \lfloor o / k \rfloor - \lfloor k/2 \rfloor` and
:math:`d_j(o) = (o \bmod k) - \lfloor k/2 \rfloor` (the ordering of :func:`torch.nn.functional.unfold`). The cost of an
offset is the p-norm of the displacement, :math:`C_o = \|(d_i, d_j)\|_p`; the paper uses p = 2 (the Euclidean pixel
distance, which makes the transport cost the 1-Wasserstein distance). The same k x k cost serves every channel.

Offsets that leave the image are not allowed: :func:`valid_offsets` masks them, and every plan built in
:mod:`kit.ot` is zero there, so the source marginal (:func:`source_marginal`) and the target marginal
(:func:`target_marginal`) both conserve mass exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kit.errors import UserError


def check_kernel_size(kernel_size: int) -> int:
    """Return ``kernel_size`` if it is an odd integer >= 1; otherwise raise :class:`UserError`."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise UserError(f"kernel size must be an odd integer >= 1, got {kernel_size!r}")
    return kernel_size


def local_cost(
    kernel_size: int = 5, p: float = 2, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    r"""Cost of each offset of a k x k window, :math:`C_o = \|(d_i, d_j)\|_p`, as a (k*k,) tensor (0 at the centre)."""
    k = check_kernel_size(kernel_size)
    if not (p >= 1 and p < float("inf")):
        raise UserError(f"cost exponent p must be a finite number >= 1, got {p!r}")
    r = k // 2
    d = torch.arange(-r, r + 1, device=device, dtype=dtype or torch.get_default_dtype())
    di, dj = torch.meshgrid(d, d, indexing="ij")
    return (di.abs() ** p + dj.abs() ** p).pow(1.0 / p).reshape(-1)


def valid_offsets(
    height: int, width: int, kernel_size: int, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """(k*k, H, W) bool mask: ``True`` where offset ``o`` from pixel (i, j) lands inside the image."""
    k = check_kernel_size(kernel_size)
    ones = torch.ones(1, 1, height, width, device=device)
    return neighbours(ones, k)[0, 0] > 0.5


def neighbours(v: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Values at the window of each pixel: ``out[n, c, o, i, j] = v[n, c, i + d_i(o), j + d_j(o)]`` (0 outside).

    ``v`` (N, C, H, W) -> (N, C, k*k, H, W). Used to read a target-side quantity (a dual variable, an image) from
    each source pixel's window. Built from zero padding and strided views (``Tensor.unfold``), which on some CPU
    builds is tens of times faster than ``F.unfold`` (im2col); same values, same offset order.
    """
    n, c, h, w = v.shape
    k = kernel_size
    padded = F.pad(v, (k // 2,) * 4)
    patches = padded.unfold(2, k, 1).unfold(3, k, 1)  # a view (N, C, H, W, k, k)
    return patches.permute(0, 1, 4, 5, 2, 3).reshape(n, c, k * k, h, w)


def source_marginal(plan: torch.Tensor) -> torch.Tensor:
    """Mass leaving each pixel: (N, C, k*k, H, W) -> (N, C, H, W)."""
    return plan.sum(2)


def target_marginal(plan: torch.Tensor) -> torch.Tensor:
    """Mass arriving at each pixel, :math:`z[i', j'] = \\sum_o \\Pi[o, i' - d_i(o), j' - d_j(o)]`.

    (N, C, k*k, H, W) -> (N, C, H, W): the adjoint of :func:`neighbours` (``F.fold``).
    """
    n, c, kk, h, w = plan.shape
    k = int(round(kk**0.5))
    out = F.fold(plan.reshape(n * c, kk, h * w), (h, w), k, padding=k // 2)
    return out.reshape(n, c, h, w)


def plan_cost(plan: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    r"""Transport cost :math:`\langle \Pi, C \rangle` per example: (N, C, k*k, H, W), (k*k,) -> (N,)."""
    return torch.einsum("ncohw,o->n", plan, cost.to(plan.dtype))


def exact_local_wasserstein(
    x: torch.Tensor, z: torch.Tensor, kernel_size: int = 5, p: float = 2
) -> torch.Tensor:
    """Exact OT cost between images ``x`` and ``z`` (N, C, H, W) under the local cost, with POT's network simplex.

    The reference that the kit's projections are tested against: per example, the sum over channels of ``ot.emd2``
    between the channel of ``x`` and the channel of ``z`` (float64), with the cost of moving further than the window
    set prohibitively high. Each channel of ``z`` must carry the mass of the same channel of ``x``. Small images only:
    the LP has (H*W)^2 variables per channel. Returns (N,) float64 on the CPU.
    """
    import ot  # POT, the reference solver

    k = check_kernel_size(kernel_size)
    n, c, h, w = x.shape
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([ii.reshape(-1), jj.reshape(-1)], 1).double()
    disp = (pos[:, None, :] - pos[None, :, :]).abs()
    c_full = (disp**p).sum(-1) ** (1.0 / p)
    outside = (disp > k // 2).any(-1)
    big = float(c_full.max()) * 1e3 + 1e3
    c_np = torch.where(outside, torch.full_like(c_full, big), c_full).numpy()
    xs = x.detach().double().cpu().reshape(n, c, -1).numpy()
    zs = z.detach().double().cpu().reshape(n, c, -1).numpy()
    out = torch.zeros(n, dtype=torch.float64)
    for a in range(n):
        for ch in range(c):
            mx, mz = xs[a, ch].sum(), zs[a, ch].sum()
            if abs(mx - mz) > 1e-6 * max(1.0, mx):
                raise UserError(f"example {a}, channel {ch}: masses differ ({mx:.6g} vs {mz:.6g})")
            if mx <= 0:
                continue
            out[a] += float(ot.emd2(xs[a, ch] / mx, zs[a, ch] / mz, c_np, numItermax=1_000_000)) * mx
    return out
