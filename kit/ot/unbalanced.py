r"""The KL-relaxed (unbalanced) Sinkhorn projection of Subramanyam, "Sinkhorn adversarial attack and defense"
(seed ``004_f6c2e34a4740926f.txt``), in the log domain, with a global or a local k x k cost.

**The plan part** (seed Eq. 6). For non-negative measures :math:`x, z` on the pixels of one channel and a cost
:math:`C_{ij} = \|\mathrm{pos}_i - \mathrm{pos}_j\|_p`,

.. math::

    \min_{\Pi \ge 0}\ \langle \Pi, C\rangle + \eta \sum_{ij} \Pi_{ij} (\ln \Pi_{ij} - 1)
        + \tau\, \mathrm{KL}(\Pi\mathbf{1} \,\|\, x) + \tau\, \mathrm{KL}(\Pi^\top\mathbf{1} \,\|\, z),

with the generalised :math:`\mathrm{KL}(a\|b) = \sum a \ln(a/b) - a + b`. Its dual (seed Eq. 7 without the
:math:`z` terms) is maximised by the closed-form block updates, seed Eqs. 11 and 13, with
:math:`\kappa = \eta\tau/(\eta+\tau)`:

.. math::

    \alpha_i \leftarrow \kappa \Big[\ln x_i - \operatorname{LSE}_j \frac{\beta_j - C_{ij}}{\eta}\Big], \qquad
    \beta_j \leftarrow \kappa \Big[\ln z_j - \operatorname{LSE}_i \frac{\alpha_i - C_{ij}}{\eta}\Big],

and the plan is :math:`B(\alpha, \beta)_{ij} = \exp((\alpha_i + \beta_j - C_{ij})/\eta)`. This is exactly POT's
``ot.unbalanced.sinkhorn_knopp_unbalanced(x, z, C, reg=eta, reg_m=tau, reg_type="entropy")`` with
:math:`u = e^{\alpha/\eta}, v = e^{\beta/\eta}` (same start :math:`u = v = 1`, same order: :math:`\alpha` then
:math:`\beta` with the new :math:`\alpha`), written with log-sum-exps so that no kernel :math:`e^{-C/\eta}` is formed:
:func:`unbalanced_sinkhorn`. Mass stays within its channel; a pixel with :math:`x_i = 0` has
:math:`\alpha_i = -\infty` (an empty row).

**The projection** (seed Eqs. 7-15, Algorithm 1): given the clean image :math:`x` and the gradient step
:math:`w` (Eq. 3), every iteration runs the :math:`\alpha` update (Eq. 11), the :math:`\beta` update (Eq. 13, with
the current :math:`z`) and the :math:`z` update (Eq. 15)

.. math::

    z \leftarrow \min\big(u,\ w + \tfrac{\tau}{\gamma}\, e^{-\beta/\tau}\big),

then normalises the plan and checks :math:`\langle B, C\rangle \le \varepsilon` (seed §V-A):
:func:`unbalanced_projection`.

Choices where the seed is vague or inconsistent (equation numbers of the seed):

- *Sign of the z update (Eqs. 14-15).* Setting Eq. 14 to zero gives :math:`z = w - \frac{\tau}{\gamma}e^{-\beta/\tau}`,
  Eq. 15 prints a plus. Eq. 7 also drops the :math:`\tau\langle \mathbf{1}, z\rangle` of the conjugate
  :math:`-G^*(-\beta) = -\tau\langle z, e^{-\beta/\tau} - 1\rangle`. We keep Eq. 15 as printed: it is the exact
  minimiser in :math:`z` of the saddle problem :math:`\min_z \max_{\alpha,\beta}` of the full dual plus
  :math:`\frac{\gamma}{2}\|z - (w + \tau/\gamma)\|^2`, so a fixed point of the iterations minimises

  .. math::

      J(z) = \frac{\gamma}{2}\big\|z - w - \tfrac{\tau}{\gamma}\big\|^2 + \mathrm{UOT}_{\eta,\tau}(x, z)
      \quad \text{over } 0 \le z \le u

  (the tests check this against scipy's L-BFGS-B on POT's unbalanced solver). Eq. 15 keeps :math:`z > w \ge 0`, which
  :math:`\ln z` in Eq. 13 needs, and the coupled map :math:`z \mapsto z'` has slope
  :math:`-\frac{\eta}{\eta+\tau}\frac{z' - w}{z}`, small for the usual :math:`\eta \ll \tau`; the minus sign can
  give :math:`z \le 0`.
- *Bounds on z (deviation).* :math:`w` is first clipped to the image box [0, 1] (a gradient step may leave it), and the
  :math:`z` update is box constrained, :math:`z \le u = 1` (the largest pixel value); since the :math:`z`
  sub-problem is a separable quadratic, the clip of Eq. 15 is its exact box-constrained minimiser.
- *Order (Eqs. 12-13).* Eq. 13 writes :math:`\alpha^k` in the :math:`\beta` update; we use :math:`\alpha^{k+1}`
  (Gauss-Seidel, as Sinkhorn, POT, and the seed's own convergence proof, Eqs. 55-57). :math:`z^0` is Eq. 15 at
  :math:`\beta^0`: :math:`\min(u, w + \tau/\gamma)` from the cold start :math:`\alpha^0 = \beta^0 = 0`, and from the
  new :math:`w` after a warm start.
- *Entropy.* Eq. 7's term :math:`\eta \sum e^{(\alpha+\beta-C)/\eta}` is the dual of
  :math:`\eta\langle \Pi, \ln\Pi - 1\rangle` (Eq. 2 and 6 write :math:`\langle \Pi, \ln \Pi\rangle`; the two differ by
  :math:`\eta\,\mathbf{1}^\top\Pi\mathbf{1}`); POT's ``reg_type="entropy"`` is the same.
- *Scale.* The solver works on the images as given (pixel values in [0, 1], cap :math:`u = 1`), as the seed argues
  against normalising images to probability vectors (§III); :math:`\gamma, \eta, \tau` are meant on that scale. The
  plan is then normalised to unit mass (seed §V-A, :math:`\mathbf{1}^\top B\mathbf{1} = 1`), so its cost is in the
  kit's unit-mass scale, the scale of :math:`\varepsilon`.
- *Normalisation (deviation).* The seed divides :math:`B` by its total. We scale the columns instead, channel by
  channel: :math:`\sigma_j = \min(s, u/b_j)` with :math:`b = B^\top\mathbf{1}` and :math:`s` the water-filling level
  with :math:`\sum_j \min(s\, b_j, u) = \sum_i x_i` (exact, by sorting). The output
  :math:`\hat z = \sigma \odot b` then keeps every channel's mass and stays in [0, u] (plain division can push a pixel
  above 1, and clamping would lose mass); for one channel and no active cap it is the seed's division.
- *The* :math:`\varepsilon` *check (seed §V-A).* "For convergence, we use the number of Sinkhorn iterations and
  :math:`B \odot C \le \epsilon`": every iteration the normalised plan's cost is checked, and an example stops as
  soon as it exceeds :math:`\varepsilon` (otherwise at convergence or ``max_iter``). Its plan is then pulled back onto
  the sphere (deviation, so that the radius holds exactly): the returned plan is the mixture
  :math:`\hat\Pi = (1-t)\,\mathrm{diag}(x) + t\, B\,\mathrm{diag}(\sigma)`, :math:`t = \varepsilon / \langle B
  \mathrm{diag}(\sigma), C\rangle`, whose output :math:`(1-t)x + t\hat z` is still in the box with the same mass.

**What the returned radius means.** :attr:`UnbalancedProjection.cost` is :math:`\langle\hat\Pi, C\rangle / m`
(:math:`m` the example's mass), the cost of the plan whose target marginal is the output. An unbalanced plan does not
start from :math:`x`: its source marginal :math:`\hat\Pi\mathbf{1}` differs from :math:`x` by
:attr:`UnbalancedProjection.mass_change` :math:`= \|\hat\Pi\mathbf{1} - x\|_1 / m` (mass destroyed plus created), so
``cost`` is *not* a bound on the balanced distance :math:`W(x, \hat z)`; with small :math:`\eta` the plan is nearly
diagonal and ``cost`` is nearly 0 while the image changes. :attr:`UnbalancedProjection.balanced_bound`
:math:`= \mathrm{cost} + \frac{D}{2}\,\mathrm{mass\_change}` (:math:`D` the image diagonal in the cost's p-norm) is a
true upper bound of the balanced 1-Wasserstein distance between the unit-mass input and output under the global
pixel cost (triangle inequality through :math:`\hat\Pi\mathbf{1}`, which has the same mass per channel as :math:`x`).

**Convergence.** The duals contract at rate :math:`\tau/(\tau+\eta)` per half-iteration (seed Lemma 2), so small
:math:`\eta/\tau` is slow. An example has converged when the plan's target marginal (the output before
normalisation) moves by at most ``tol`` in relative L1, :math:`\|b^k - b^{k-1}\|_1 \le \mathrm{tol}\,\|x\|_1`,
and so does :math:`z` in the projection (a criterion on the duals themselves stalls in float32 at pixels that
receive almost no mass, where :math:`|\beta|/\eta` is in the thousands). Iterations stop at ``max_iter`` with a
:class:`UnbalancedConvergenceWarning` naming ``max_iter``.

Layouts: with ``kernel_size=k`` the plan is local, (N, C, k*k, H, W) as in :mod:`kit.ot.local`; with
``kernel_size=None`` it is global, (N, C, H*W, H*W) with ``plan[n, c, i, j]`` the mass from flat pixel i to flat
pixel j (small images only: memory is :math:`(HW)^2` per channel).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from kit.errors import UserError
from kit.ot.local import check_kernel_size, local_cost, neighbours, valid_offsets
from kit.ot.precision import full_precision

__all__ = [
    "UnbalancedConvergenceWarning",
    "UnbalancedResult",
    "UnbalancedProjection",
    "PixelCost",
    "unbalanced_sinkhorn",
    "unbalanced_projection",
]


class UnbalancedConvergenceWarning(RuntimeWarning):
    """The unbalanced Sinkhorn iterations stopped at ``max_iter`` before reaching ``tol`` for some example."""


# ------------------------------------------------------------------------------------------------------------ cost


class PixelCost:
    r"""The pixel cost :math:`C_{ij} = \|\mathrm{pos}_i - \mathrm{pos}_j\|_p`, global or restricted to a k x k window.

    Both layouts use one operation, :meth:`soft_min`: :math:`\mathrm{out}_t = \operatorname{LSE}_s
    ((v_s - C_{ts})/\eta)`; since :math:`C` is symmetric (and so is the window), it serves both the row
    sums (over targets) and the column sums (over sources) of the plan.

    Parameters
    ----------
    height, width : int
    kernel_size : int or None
        Odd window size (local plan), or None for the global cost (all pixel pairs).
    p : float
        Exponent of the pixel distance (>= 1).
    device, dtype
    """

    def __init__(
        self,
        height: int,
        width: int,
        kernel_size: int | None,
        p: float,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not (isinstance(p, (int, float)) and not isinstance(p, bool) and 1 <= p < math.inf):
            raise UserError(f"cost exponent p must be a finite number >= 1, got {p!r}")
        self.height, self.width, self.p = int(height), int(width), float(p)
        self.kernel_size = None if kernel_size is None else check_kernel_size(kernel_size)
        if self.kernel_size is None:
            ii, jj = torch.meshgrid(
                torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij"
            )
            pos = torch.stack([ii.reshape(-1), jj.reshape(-1)], 1).to(torch.float64)
            disp = (pos[:, None, :] - pos[None, :, :]).abs()
            self.cost = (disp**self.p).sum(-1).pow(1.0 / self.p).to(dtype)  # (HW, HW)
            self._k = 0
            self._valid = torch.ones(0, dtype=torch.bool, device=device)
        else:
            self._k = self.kernel_size
            self.cost = local_cost(self._k, self.p, device=device, dtype=dtype)  # (k*k,)
            self._valid = valid_offsets(height, width, self._k, device=device)  # (k*k, H, W)
        self.log_cost = self.cost.log()  # -inf where the cost is 0
        self.diameter = ((height - 1) ** self.p + (width - 1) ** self.p) ** (1.0 / self.p)

    @property
    def is_global(self) -> bool:
        return self.kernel_size is None

    def _bias(self, eta: float) -> torch.Tensor:
        r""":math:`-C/\eta`, ``-inf`` off the image (local layout (k*k, H, W)), cached per eta."""
        if getattr(self, "_bias_eta", None) != eta:
            if self.is_global:
                self._bias_t = -self.cost / eta
            else:
                k = self._k
                b = (-self.cost / eta).view(k * k, 1, 1).expand(k * k, self.height, self.width)
                self._bias_t = b.masked_fill(~self._valid, -math.inf).contiguous()
            self._bias_eta = eta
        return self._bias_t

    def soft_min(self, v: torch.Tensor, eta: float) -> torch.Tensor:
        r""":math:`\operatorname{LSE}_s ((v_s - C_{ts})/\eta)` for every pixel t: (n, C, H, W) -> same.

        Entries of ``v`` may be ``-inf``; the result is ``-inf`` where every term is.
        """
        return self._soft_min(v, eta, False)[0]

    def soft_min_with_cost(self, v: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
        r""":meth:`soft_min` and :math:`\ln \sum_s e^{(v_s - C_{ts})/\eta} C_{ts}` (for the column costs
        :math:`\sum_s B_{st} C_{st}`), from the same exponentials."""
        lse, lse_c = self._soft_min(v, eta, True)
        if lse_c is None:  # pragma: no cover - _soft_min returns it when asked
            raise RuntimeError("cost-weighted soft-min missing")
        return lse, lse_c

    def _soft_min(self, v: torch.Tensor, eta: float, cost_weighted: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        n, c, h, w = v.shape
        if self.is_global:
            arg = torch.add(self._bias(eta), v.reshape(n, c, 1, h * w), alpha=1.0 / eta)  # (n, C, HW, HW)
            dim = -1
            weight = self.cost
        else:
            k = self._k
            arg = torch.add(self._bias(eta), neighbours(v, k), alpha=1.0 / eta)  # (n, C, k*k, H, W)
            dim = 2
            weight = self.cost.view(k * k, 1, 1)
        m = arg.amax(dim, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        arg = arg.sub_(m)
        # terms below the smallest normal number are dropped (they are < 1e-37 of the largest, which is 1): exp would
        # return subnormals, which are very slow on CPUs
        arg = arg.masked_fill_(arg < math.log(torch.finfo(arg.dtype).tiny), -math.inf)
        e = arg.exp_()
        m = m.squeeze(dim)
        lse = e.sum(dim).log_().add_(m)
        if not cost_weighted:
            return lse.reshape(n, c, h, w), None
        lse_c = (e * weight).sum(dim).log_().add_(m)
        return lse.reshape(n, c, h, w), lse_c.reshape(n, c, h, w)

    def log_plan(self, alpha: torch.Tensor, beta: torch.Tensor, eta: float) -> torch.Tensor:
        r""":math:`\ln B_{ij} = (\alpha_i + \beta_j - C_{ij})/\eta` in this cost's layout (``-inf`` off the window)."""
        n, c, h, w = alpha.shape
        if self.is_global:
            a = alpha.reshape(n, c, h * w, 1)
            b = beta.reshape(n, c, 1, h * w)
            return (a + b - self.cost) / eta
        k = self._k
        nb = neighbours(beta, k).masked_fill(~self._valid, -math.inf)
        return ((alpha[:, :, None] + nb - self.cost.view(k * k, 1, 1)) / eta).masked_fill(~self._valid, -math.inf)

    def plan_cost(self, plan: torch.Tensor) -> torch.Tensor:
        r""":math:`\langle \Pi, C\rangle` per example: plan in this layout -> (N,)."""
        if self.is_global:
            return torch.einsum("ncij,ij->n", plan, self.cost.to(plan.dtype))
        return torch.einsum("ncohw,o->n", plan, self.cost.to(plan.dtype))

    def identity_plan(self, x: torch.Tensor) -> torch.Tensor:
        """The plan that leaves ``x`` (N, C, H, W) in place, in this layout."""
        n, c, h, w = x.shape
        if self.is_global:
            return torch.diag_embed(x.reshape(n, c, h * w))
        k = self._k
        out = x.new_zeros(n, c, k * k, h, w)
        out[:, :, (k * k) // 2] = x
        return out


# --------------------------------------------------------------------------------------------------------- results


@dataclass
class UnbalancedResult:
    r"""What :func:`unbalanced_sinkhorn` returns (the plan part of the seed's Eq. 6).

    Attributes
    ----------
    alpha, beta : (N, C, H, W) tensors
        Dual potentials (POT's ``log_u * reg``, ``log_v * reg``). ``alpha`` is ``-inf`` where the source is 0; ``beta``
        is 0 where no source mass can reach (an empty column).
    n_iter : (N,) int64 tensor
        Iterations (one :math:`\alpha` and one :math:`\beta` update each) run for each example.
    converged : (N,) bool tensor
    err : (N,) tensor
        Last relative L1 change of the target marginal, :math:`\|b^k - b^{k-1}\|_1 / \|a\|_1`.
    eta, tau : float
    geometry : PixelCost
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    n_iter: torch.Tensor
    converged: torch.Tensor
    err: torch.Tensor
    eta: float
    tau: float
    geometry: PixelCost = field(repr=False)

    def log_plan(self) -> torch.Tensor:
        r""":math:`\ln B(\alpha,\beta)`: (N, C, k*k, H, W) local or (N, C, HW, HW) global."""
        return self.geometry.log_plan(self.alpha, self.beta, self.eta)

    def plan(self) -> torch.Tensor:
        r"""The plan :math:`B_{ij} = e^{(\alpha_i + \beta_j - C_{ij})/\eta}` (unnormalised), in the cost's layout."""
        return self.log_plan().exp()

    def transport_cost(self) -> torch.Tensor:
        r""":math:`\langle B, C\rangle` per example (the scale of the inputs): (N,)."""
        return self.geometry.plan_cost(self.plan())


@dataclass
class UnbalancedProjection:
    r"""What :func:`unbalanced_projection` returns.

    Attributes
    ----------
    x_proj : (N, C, H, W) tensor
        The output, in [0, 1], with the mass of ``x`` in every channel: the target marginal of the normalised plan,
        in pixel scale.
    cost : (N,) tensor
        :math:`\langle\hat\Pi, C\rangle` in the unit-mass scale (<= eps), for the plan whose target marginal is
        ``x_proj``; its source marginal is *not* exactly ``x`` (see ``mass_change``).
    mass_change : (N,) tensor
        :math:`\|\hat\Pi\mathbf{1} - x\|_1 / m`: mass the unbalanced plan destroys plus creates, unit-mass scale.
    balanced_bound : (N,) tensor
        ``cost + diameter / 2 * mass_change``: an upper bound of the exact balanced 1-Wasserstein distance between
        ``x / m`` and ``x_proj / m`` under the global pixel cost.
    shrink : (N,) tensor
        The mixing weight :math:`t \in [0, 1]` of the plan against the identity (1 when the ball did not bind).
    eps_stopped : (N,) bool tensor
        The iterations stopped because the normalised plan left the ball (the seed's check).
    n_iter, converged, err
        As in :class:`UnbalancedResult`; ``converged`` is False for examples stopped by the ball or by ``max_iter``.
    alpha, beta, log_z : (N, C, H, W) tensors
        Final potentials and :math:`\ln z` (``(alpha, beta)`` warm-starts the next projection).
    col_scale : (N, C, H, W) tensor
        The column scaling :math:`\sigma` of the normalisation.
    mass : (N,) tensor
        :math:`m`, the total mass of each clean example (pixel scale).
    eta, tau, gamma : float
    geometry : PixelCost
    """

    x_proj: torch.Tensor
    cost: torch.Tensor
    mass_change: torch.Tensor
    balanced_bound: torch.Tensor
    shrink: torch.Tensor
    eps_stopped: torch.Tensor
    n_iter: torch.Tensor
    converged: torch.Tensor
    err: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    log_z: torch.Tensor
    col_scale: torch.Tensor
    mass: torch.Tensor
    eta: float
    tau: float
    gamma: float
    geometry: PixelCost = field(repr=False)
    _x: torch.Tensor = field(repr=False)

    @property
    def z(self) -> torch.Tensor:
        """The seed's z (Eq. 15) at the last iteration, pixel scale: (N, C, H, W)."""
        return self.log_z.exp()

    def raw_plan(self) -> torch.Tensor:
        r"""The unnormalised plan :math:`B(\alpha, \beta)` of the last iteration (pixel scale), cost's layout."""
        return self.geometry.log_plan(self.alpha, self.beta, self.eta).exp()

    def normalized_plan(self) -> torch.Tensor:
        r"""The returned plan in unit-mass scale, :math:`\hat\Pi = ((1-t)\,\mathrm{diag}(x) + t\,B\,\mathrm{diag}
        (\sigma)) / m`: its target marginal is ``x_proj / m`` and its cost is ``cost``."""
        n = self.alpha.shape[0]
        if self.geometry.is_global:
            scaled = self.raw_plan() * self.col_scale.reshape(n, self.alpha.shape[1], 1, -1)
        else:
            scaled = self.raw_plan() * neighbours(self.col_scale, self.geometry._k)
        t = self.shrink.view(n, 1, 1, 1, *([1] * (scaled.dim() - 4)))
        plan = t * scaled + (1 - t) * self.geometry.identity_plan(self._x)
        m = self.mass.clamp_min(torch.finfo(self.mass.dtype).tiny)
        return plan / m.view(n, *([1] * (plan.dim() - 1)))


# --------------------------------------------------------------------------------------------------------- helpers


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise UserError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_iter(max_iter: int, tol: float) -> tuple[int, float]:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise UserError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (tol >= 0) or math.isinf(tol):
        raise UserError(f"tol must be a finite number >= 0, got {tol!r}")
    return max_iter, float(tol)


def _check_measure(name: str, v: torch.Tensor, *, box: bool) -> None:
    if not isinstance(v, torch.Tensor) or v.dim() != 4:
        raise UserError(f"{name} must be a (N, C, H, W) tensor, got shape {tuple(getattr(v, 'shape', ()))}")
    if not v.is_floating_point():
        raise UserError(f"{name} must be floating point, got {v.dtype}")
    if not torch.isfinite(v).all():
        raise UserError(f"{name} contains NaN or infinite values")
    if v.numel() and v.min() < 0:
        raise UserError(f"{name} has negative mass (min {v.min().item():.4g})")
    if box and v.numel() and v.max() > 1:
        raise UserError(f"{name} must lie in [0, 1], got max {v.max().item():.4g}")


def _marginal_change(new: torch.Tensor, old: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Relative L1 change ``||new - old||_1 / mass`` per example: (n, ...), (n, ...), (n,) -> (n,)."""
    return (new - old).abs().flatten(1).sum(1) / mass.clamp_min(torch.finfo(new.dtype).tiny)


def _waterfill(b: torch.Tensor, cap: float, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Column scales :math:`\sigma_j = \min(s, u / b_j)` with :math:`\sum_j \min(s\, b_j, u) = M`, per channel.

    ``b`` (n, C, P) >= 0, ``cap`` u > 0, ``target`` (n, C) the masses M. Exact: with b sorted in decreasing order,
    the q largest are capped and :math:`s = (M - q u) / \sum_{l > q} b_{(l)}`, for the first q where the (q+1)-th is
    not. Returns (sigma (n, C, P), feasible (n,)): infeasible where even capping every positive b_j at u cannot reach
    M (then sigma caps every column).
    """
    srt = b.sort(-1, descending=True).values
    npix = b.shape[-1]
    q = torch.arange(npix, device=b.device, dtype=b.dtype)
    tail = srt.flip(-1).cumsum(-1).flip(-1)  # tail[q] = sum_{l >= q} srt[l]  (0-based: q capped before index q)
    s_q = (target[..., None] - q * cap) / tail.clamp_min(torch.finfo(b.dtype).tiny)
    ok = (s_q * srt <= cap * (1 + 4 * torch.finfo(b.dtype).eps)) & (tail > 0) & (target[..., None] - q * cap >= 0)
    has = ok.any(-1)
    first = torch.where(has, ok.float().argmax(-1), torch.zeros_like(has, dtype=torch.long))
    s = s_q.gather(-1, first[..., None]).squeeze(-1)
    s = torch.where(has, s, torch.full_like(s, math.inf))
    s = torch.where(target > 0, s, torch.zeros_like(s))  # empty channel: nothing to place
    feasible = (has | (target <= 0)).all(-1)
    big = torch.where(b > 0, cap / b.clamp_min(torch.finfo(b.dtype).tiny), torch.full_like(b, math.inf))
    sigma = torch.minimum(s[..., None].expand_as(b), big)
    sigma = torch.where(torch.isfinite(sigma), sigma, torch.zeros_like(sigma))
    return sigma, feasible


def _warn(n_bad: int, n: int, max_iter: int, err: float, tol: float, what: str) -> None:
    warnings.warn(
        f"{what}: {n_bad} of {n} examples did not converge in max_iter={max_iter} iterations (largest relative "
        f"marginal change {err:.3g} > tol={tol:g}); raise max_iter, or use float64 for small eta",
        UnbalancedConvergenceWarning,
        stacklevel=4,  # the caller, past full_precision
    )


# ---------------------------------------------------------------------------------------------------------- solvers


@full_precision
def unbalanced_sinkhorn(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    eta: float = 1e-3,
    tau: float = 1e-2,
    kernel_size: int | None = 5,
    p: float = 2,
    max_iter: int = 1000,
    tol: float = 1e-6,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    warn: bool = True,
) -> UnbalancedResult:
    r"""KL-relaxed entropic OT between the images ``a`` and ``b`` (seed Eq. 6; updates Eqs. 11, 13), log domain.

    Solves, channel by channel,

    .. math::

        \min_{\Pi \ge 0} \langle \Pi, C\rangle + \eta\langle \Pi, \ln\Pi - 1\rangle
            + \tau\,\mathrm{KL}(\Pi\mathbf{1}\|a) + \tau\,\mathrm{KL}(\Pi^\top\mathbf{1}\|b),

    the problem of POT's ``ot.unbalanced.sinkhorn_knopp_unbalanced(a, b, C, reg=eta, reg_m=tau,
    reg_type="entropy")``, iterate for iterate.

    Parameters
    ----------
    a, b : (N, C, H, W) tensors
        Non-negative measures (any scale). Pixels of ``b`` must be positive where some mass of ``a`` can reach them
        for a finite optimum (zeros are allowed; they give empty columns).
    eta, tau : float
        Entropic regularisation :math:`\eta` and marginal relaxation :math:`\tau` (POT's ``reg``, ``reg_m``).
    kernel_size : int or None
        Local window (odd) or None for the global cost.
    p : float
        Pixel distance exponent.
    max_iter, tol
        Hard bound and tolerance on the relative L1 change of the target marginal per iteration.
    init : (alpha, beta), optional
        Warm start.
    warn : bool
        Issue an :class:`UnbalancedConvergenceWarning` when some example hits ``max_iter``.

    Returns
    -------
    UnbalancedResult
    """
    _check_measure("a", a, box=False)
    _check_measure("b", b, box=False)
    if a.shape != b.shape:
        raise UserError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    eta, tau = _check_positive("eta", eta), _check_positive("tau", tau)
    max_iter, tol = _check_iter(max_iter, tol)
    geo = PixelCost(a.shape[2], a.shape[3], kernel_size, p, device=a.device, dtype=a.dtype)
    kappa = eta * tau / (eta + tau)
    log_a, log_b = a.log(), b.log()
    n = a.shape[0]
    if init is None:
        alpha, beta = torch.zeros_like(a), torch.zeros_like(a)
    else:
        alpha, beta = init[0].to(a).clone(), init[1].to(a).clone()
    n_iter = torch.zeros(n, dtype=torch.long, device=a.device)
    err = torch.full((n,), math.inf, dtype=a.dtype, device=a.device)
    mass_a = a.flatten(1).sum(1)
    done = mass_a <= 0  # nothing to transport
    alpha = torch.where(a > 0, alpha, torch.full_like(a, -math.inf))
    marg = (beta / eta + geo.soft_min(alpha, eta)).exp()  # target marginal of the start
    for _ in range(max_iter):
        idx = (~done).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        be = beta[idx]
        al_new = kappa * (log_a[idx] - geo.soft_min(be, eta))  # Eq. 11
        s = geo.soft_min(al_new, eta)
        be_new = torch.where(torch.isfinite(s), kappa * (log_b[idx] - s), torch.zeros_like(s))  # Eq. 13
        m_new = (be_new / eta + s).exp()
        e = _marginal_change(m_new, marg[idx], mass_a[idx])
        alpha[idx], beta[idx], marg[idx], err[idx] = al_new, be_new, m_new, e
        n_iter[idx] += 1
        done[idx] = e <= tol
    converged = done.clone()
    err[mass_a <= 0] = 0
    if warn and not converged.all():
        bad = ~converged
        _warn(int(bad.sum()), n, max_iter, float(err[bad].max()), tol, "unbalanced_sinkhorn")
    return UnbalancedResult(alpha, beta, n_iter, converged, err, eta, tau, geo)


@full_precision
def unbalanced_projection(
    x: torch.Tensor,
    w: torch.Tensor,
    eps: float | torch.Tensor,
    *,
    gamma: float = 0.5,
    eta: float = 1e-3,
    tau: float = 1e-2,
    kernel_size: int | None = 5,
    p: float = 2,
    max_iter: int = 1000,
    tol: float = 1e-5,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    warn: bool = True,
) -> UnbalancedProjection:
    r"""Drop ``w`` into the unbalanced Wasserstein ball of radius ``eps`` around ``x`` (seed Eqs. 7-15, Algorithm 1).

    Iterates, per example and in the log domain (:math:`\kappa = \eta\tau/(\eta+\tau)`, :math:`u = 1`),

    .. math::

        \alpha &\leftarrow \kappa\,[\ln x - \operatorname{LSE}_j((\beta_j - C_{ij})/\eta)] && \text{(Eq. 11)} \\
        \beta &\leftarrow \kappa\,[\ln z - \operatorname{LSE}_i((\alpha_i - C_{ij})/\eta)] && \text{(Eq. 13)} \\
        z &\leftarrow \min(u,\ w + \tfrac{\tau}{\gamma} e^{-\beta/\tau}) && \text{(Eq. 15, box-constrained)}

    whose fixed point minimises :math:`\frac{\gamma}{2}\|z - w - \tau/\gamma\|^2 + \mathrm{UOT}_{\eta,\tau}(x, z)`
    over :math:`0 \le z \le u`; after each iteration the plan :math:`B(\alpha, \beta)` is normalised (column scaling
    to the mass of x, capped at u) and its unit-mass cost checked against ``eps``. See the module docstring for every
    choice and deviation, and for what the returned radius means.

    Parameters
    ----------
    x : (N, C, H, W) tensor in [0, 1]
        The clean images (the source).
    w : (N, C, H, W) tensor
        The gradient step (seed Eq. 3); clipped to [0, 1].
    eps : float or (N,) tensor
        Radii in the unit-mass scale (>= 0; ``inf`` turns the check off).
    gamma, eta, tau : float
        :math:`\gamma` (pull towards w), :math:`\eta` (entropy), :math:`\tau` (marginal relaxation); seed defaults
        0.5, 0.001, 0.01 (§V-A).
    kernel_size : int or None
        Local window (odd, default 5) or None for the seed's global cost.
    p : float
        Pixel distance exponent (default 2; the seed uses 1).
    max_iter, tol
        Hard bound on the iterations and tolerance on the relative L1 change of the plan's target marginal per
        iteration (see the module docstring).
    init : (alpha, beta), optional
        Warm start, e.g. the previous projection's ``alpha, beta``; :math:`z^0` is always Eq. 15 at
        :math:`\beta^0` and the new ``w``.
    warn : bool
        Warn (naming ``max_iter``) when some example neither converged nor was stopped by the ball.

    Returns
    -------
    UnbalancedProjection
    """
    _check_measure("x", x, box=True)
    if not isinstance(w, torch.Tensor) or w.shape != x.shape:
        raise UserError(f"w must be a tensor of the shape of x {tuple(x.shape)}, got {tuple(getattr(w, 'shape', ()))}")
    if not torch.isfinite(w).all():
        raise UserError("w contains NaN or infinite values (non-finite gradients?)")
    gamma = _check_positive("gamma", gamma)
    eta, tau = _check_positive("eta", eta), _check_positive("tau", tau)
    max_iter, tol = _check_iter(max_iter, tol)
    n, c, h, wd = x.shape
    if isinstance(eps, torch.Tensor):
        if eps.shape != (n,):
            raise UserError(f"per-example eps must have shape ({n},), got {tuple(eps.shape)}")
        eps_v = eps.to(device=x.device, dtype=x.dtype)
    else:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise UserError(f"eps must be a number >= 0, got {eps!r}")
        eps_v = torch.full((n,), float(eps), device=x.device, dtype=x.dtype)
    if torch.isnan(eps_v).any() or (eps_v < 0).any():
        raise UserError("eps must be >= 0")

    geo = PixelCost(h, wd, kernel_size, p, device=x.device, dtype=x.dtype)
    kappa = eta * tau / (eta + tau)
    cap = 1.0
    log_cap = 0.0
    log_x = x.log()
    log_w = w.clamp(0, 1).log()
    log_off = math.log(tau / gamma)
    mass = x.flatten(1).sum(1)
    ch_mass = x.flatten(2).sum(2)  # (n, C)

    if init is None:
        alpha, beta = torch.zeros_like(x), torch.zeros_like(x)
    else:
        if len(init) != 2 or any(not isinstance(t, torch.Tensor) or t.shape != x.shape for t in init):
            raise UserError(f"init must be a pair (alpha, beta) of tensors of shape {tuple(x.shape)}")
        alpha, beta = (t.detach().to(x).clone() for t in init)
    log_z = torch.logaddexp(log_w, log_off - beta / tau).clamp(max=log_cap)  # Eq. 15 at beta^0
    alpha = torch.where(x > 0, alpha, torch.full_like(x, -math.inf))
    marg = (beta / eta + geo.soft_min(alpha, eta)).exp()  # target marginal of the start

    n_iter = torch.zeros(n, dtype=torch.long, device=x.device)
    err = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
    converged = torch.zeros(n, dtype=torch.bool, device=x.device)
    eps_stopped = torch.zeros_like(converged)
    trivial = (mass <= 0) | (eps_v <= 0)  # nothing to move, or no budget: the identity plan
    done = trivial.clone()
    converged[trivial] = True
    err[trivial] = 0
    check = torch.isfinite(eps_v)

    for _ in range(max_iter):
        idx = (~done).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        be, lz = beta[idx], log_z[idx]
        al_new = kappa * (log_x[idx] - geo.soft_min(be, eta))  # Eq. 11
        chk = check[idx]
        if chk.any():
            s, s_c = geo.soft_min_with_cost(al_new, eta)
        else:
            s = geo.soft_min(al_new, eta)
        be_new = torch.where(torch.isfinite(s), kappa * (lz - s), torch.zeros_like(s))  # Eq. 13
        lz_new = torch.logaddexp(log_w[idx], log_off - be_new / tau).clamp(max=log_cap)  # Eq. 15, box
        m_new = (be_new / eta + s).exp()
        e = torch.maximum(_marginal_change(m_new, marg[idx], mass[idx]),
                          _marginal_change(lz_new.exp(), lz.exp(), mass[idx]))
        alpha[idx], beta[idx], log_z[idx], marg[idx], err[idx] = al_new, be_new, lz_new, m_new, e
        n_iter[idx] += 1
        conv = e <= tol
        # the seed's check: the normalised plan's cost against eps
        over = torch.zeros_like(conv)
        if chk.any():
            cost = _normalised_cost(be_new, s, s_c, cap, ch_mass[idx], mass[idx], eta)[0]
            over = chk & (cost > eps_v[idx])
        converged[idx] = conv & ~over
        eps_stopped[idx] = over
        done[idx] = conv | over

    # final plan, normalisation, ball
    s, s_c = geo.soft_min_with_cost(alpha, eta)
    cost_full, sigma, feasible = _normalised_cost(beta, s, s_c, cap, ch_mass, mass, eta)
    t = eps_v / cost_full.clamp_min(torch.finfo(x.dtype).tiny)
    t = torch.where(cost_full > eps_v, t, torch.ones_like(cost_full))
    t = torch.where(feasible & ~trivial, t.clamp(0, 1), torch.zeros_like(t))
    log_b = beta / eta + s
    z_hat = sigma * log_b.exp()  # pixel scale, <= cap, channel mass of x
    tt = t.view(n, 1, 1, 1)
    x_proj = (tt * z_hat + (1 - tt) * x).clamp(0, 1)  # the clamp only removes float rounding above 1
    cost = t * cost_full
    # source marginal of B diag(sigma): exp(alpha/eta + LSE_j((beta_j + eta ln sigma_j - C_ij)/eta))
    r = (alpha / eta + geo.soft_min(beta + eta * sigma.log(), eta)).exp()
    r = torch.where(x > 0, r, torch.zeros_like(r))
    safe_m = mass.clamp_min(torch.finfo(x.dtype).tiny)
    mass_change = t * (r - x).flatten(1).abs().sum(1) / safe_m
    balanced_bound = cost + 0.5 * geo.diameter * mass_change

    if warn:
        bad = ~(converged | eps_stopped)
        if bad.any():
            _warn(int(bad.sum()), n, max_iter, float(err[bad].max()), tol, "unbalanced_projection")
    return UnbalancedProjection(
        x_proj=x_proj,
        cost=cost,
        mass_change=mass_change,
        balanced_bound=balanced_bound,
        shrink=t,
        eps_stopped=eps_stopped,
        n_iter=n_iter,
        converged=converged,
        err=err,
        alpha=alpha,
        beta=beta,
        log_z=log_z,
        col_scale=sigma,
        mass=mass,
        eta=eta,
        tau=tau,
        gamma=gamma,
        geometry=geo,
        _x=x,
    )


def _normalised_cost(
    beta: torch.Tensor,
    s: torch.Tensor,
    s_c: torch.Tensor,
    cap: float,
    ch_mass: torch.Tensor,
    mass: torch.Tensor,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Unit-mass cost of the normalised plan :math:`B\,\mathrm{diag}(\sigma)`, the scales :math:`\sigma` and
    feasibility, from :math:`\beta`, :math:`s_j = \operatorname{LSE}_i((\alpha_i - C_{ij})/\eta)` and its
    cost-weighted twin ``s_c`` (:meth:`PixelCost.soft_min`)."""
    n, c = beta.shape[:2]
    b = (beta / eta + s).exp()  # target marginal of B
    sigma, feasible = _waterfill(b.reshape(n, c, -1), cap, ch_mass)
    sigma = sigma.reshape_as(b)
    col_cost = (beta / eta + s_c).exp()  # sum_i B_ij C_ij
    cost = (sigma * col_cost).flatten(1).sum(1) / mass.clamp_min(torch.finfo(beta.dtype).tiny)
    return cost, sigma, feasible
