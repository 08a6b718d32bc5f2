"""Per-example minimum epsilon: an ascending ladder with warm starts, then per-example bisection.

The accuracy curve of a model under attack is determined by one number per example, the smallest perturbation size
eps* at which the attack fools it: the accuracy at epsilon is the fraction of examples with eps* > epsilon (the AUAC
definition of the SAT paper, ``000_e2e3710bc929b9d7.txt``). Running a fixed-budget attack at every epsilon of a grid
spends most of its work re-proving what is known. Here each example climbs a ladder of radii only until it is fooled,
each rung warm-started from the previous rung's last iterate; then each fooled example is bisected on its own interval
(one batch, per-example epsilons), warm-started from its smallest adversarial so far. eps* is the norm of the smallest
verified adversarial found: 0 if the example is misclassified clean, +inf if it was never fooled up to eps_max.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kit.attacks.base import LP_NORMS, Attack, AttackResult, lp_norm
from kit.errors import UserError


@dataclass
class SearchResult:
    """Per-example outcome of a minimum-epsilon search (or of a minimum-norm attack capped at eps_max).

    Attributes
    ----------
    eps_star : (N,) float64 tensor
        Size of the smallest adversarial found; 0 when misclassified clean, ``inf`` when none up to ``eps_max``.
    x_adv : (N, C, H, W) tensor
        That adversarial (the clean input where none was found).
    forwards, backwards : (N,) int64 tensors
        Passes spent on each example, all phases together.
    """

    eps_star: torch.Tensor
    x_adv: torch.Tensor
    forwards: torch.Tensor
    backwards: torch.Tensor

    @staticmethod
    def combine(results: list[SearchResult]) -> SearchResult:
        """Per-example minimum over several attacks' results (costs add up)."""
        if not results:
            raise ValueError("nothing to combine")
        eps = torch.stack([r.eps_star for r in results])
        best = eps.argmin(0)
        x_adv = torch.stack([r.x_adv for r in results])[best, torch.arange(eps.shape[1])]
        return SearchResult(
            eps.min(0).values, x_adv, sum(r.forwards for r in results), sum(r.backwards for r in results)
        )


def from_attack_result(res: AttackResult, x: torch.Tensor, eps_max: float) -> SearchResult:
    """eps* from one attack run (a minimum-norm attack, capped at ``eps_max``)."""
    norm = res.norm.double()
    eps_star = torch.where(res.success & (norm <= eps_max * (1 + 1e-6)), norm, torch.full_like(norm, math.inf))
    x_adv = torch.where(torch.isinf(eps_star).view(-1, 1, 1, 1), x, res.x_adv)
    return SearchResult(eps_star, x_adv, res.forwards.clone(), res.backwards.clone())


def min_eps_search(
    attack: Attack,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_max: float,
    rungs: int = 8,
    tol: float | None = None,
    warm_start: bool = True,
    on_step: Callable[[float], None] | None = None,
) -> SearchResult:
    """Smallest epsilon per example at which a fixed-budget attack fools the model, up to ``eps_max``.

    Parameters
    ----------
    attack : Attack
        A fixed-budget attack (PGD, APGD, Square) accepting per-example ``eps`` and ``init``. A minimum-norm attack
        (``attack.minimum_norm``) is run once, capped at ``eps_max``.
    x : (N, C, H, W) tensor in [0, 1]
    y : (N,) int64 tensor
    eps_max : float
        Largest radius considered.
    rungs : int
        Number of equally spaced ladder radii ``eps_max * k / rungs``, k = 1..rungs.
    tol : float, optional
        Bisection stops when the interval is this narrow; default ``eps_max / 256``.
    warm_start : bool
        Start each rung from the previous rung's last iterate, and each bisection step from the smallest adversarial.
    on_step : callable, optional
        Called after every attack run with the estimated fraction of the search done (in [0, 1], 1 at the end), for
        progress bars within a batch.

    Returns
    -------
    SearchResult
        ``eps_star`` is the norm of the smallest adversarial verified by the model (an upper bound on the true
        minimum), 0 for examples misclassified clean, ``inf`` for examples not fooled up to ``eps_max``.
    """
    if not (isinstance(eps_max, (int, float)) and math.isfinite(eps_max) and eps_max > 0):
        raise UserError(f"eps_max must be a positive finite number, got {eps_max!r}")
    if rungs < 1:
        raise UserError(f"rungs must be at least 1, got {rungs}")
    tol = eps_max / 256 if tol is None else float(tol)
    if tol <= 0:
        raise UserError(f"tolerance must be positive, got {tol}")
    if attack.minimum_norm:
        out = from_attack_result(attack(x, y, eps=eps_max), x, eps_max)
        if on_step is not None:
            on_step(1.0)
        return out
    # attack runs of a full search: the ladder, then about log2(rung width / tol) bisection steps
    expected = rungs + max(1, math.ceil(math.log2(max(eps_max / rungs / tol, 1.0)))) + 1
    done = 0

    n = x.shape[0]
    dev = x.device
    eps_star = torch.full((n,), math.inf, dtype=torch.float64, device=dev)
    x_best = x.detach().clone()
    fwd = torch.zeros(n, dtype=torch.long, device=dev)
    bwd = torch.zeros_like(fwd)
    lo = torch.zeros(n, dtype=x.dtype, device=dev)  # largest radius at which the example resisted
    hi = torch.full((n,), math.inf, dtype=x.dtype, device=dev)  # smallest radius at which it was fooled

    def run(idx: torch.Tensor, eps: torch.Tensor, init: torch.Tensor | None) -> AttackResult:
        nonlocal done
        res = attack(x[idx], y[idx], eps=eps, init=init)
        fwd[idx] += res.forwards
        bwd[idx] += res.backwards
        hit = idx[res.success]
        if hit.numel():
            if attack.norm in LP_NORMS:  # measured here, not taken from the attack
                found = lp_norm(res.x_adv[res.success] - x[hit], attack.norm).double()
            else:  # a Wasserstein radius is the cost of the attack's transport plan
                found = res.norm[res.success].double()
            better = found < eps_star[hit]
            eps_star[hit[better]] = found[better]
            x_best[hit[better]] = res.x_adv[res.success][better]
        if on_step is not None:
            done += 1
            on_step(min(done / expected, 0.99))
        return res

    # Ladder: each example climbs until fooled (the first rung's clean check finds the misclassified ones: eps* = 0).
    active = torch.arange(n, device=dev)
    last = x.detach().clone()
    for k in range(1, rungs + 1):
        if active.numel() == 0:
            break
        r = eps_max * k / rungs
        res = run(active, torch.full((active.numel(),), r, dtype=x.dtype, device=dev),
                  last[active] if warm_start and k > 1 else None)
        if res.x_last is not None:
            last[active] = res.x_last
        fooled = res.success
        hi[active[fooled]] = r
        lo[active[~fooled]] = r
        active = active[~fooled]

    # Bisection on [lo, hi] for every fooled example with eps* > 0, all in one batch with per-example radii.
    hi = torch.minimum(hi, eps_star.to(x.dtype))
    while True:
        idx = ((hi - lo > tol) & (eps_star > 0) & torch.isfinite(eps_star)).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        mid = (lo[idx] + hi[idx]) / 2
        res = run(idx, mid, x_best[idx] if warm_start else None)
        fooled = res.success
        found = eps_star[idx].to(x.dtype)
        hi[idx] = torch.where(fooled, torch.minimum(mid, found), hi[idx])
        lo[idx] = torch.where(fooled, lo[idx], mid)
    if on_step is not None:
        on_step(1.0)
    return SearchResult(eps_star, x_best, fwd, bwd)
