"""Per-example minimum epsilon: an ascending ladder with warm starts, then per-example bisection.

The accuracy curve of a model under attack is determined by one number per example, the smallest perturbation size
eps* at which the attack fools it: the accuracy at epsilon is the fraction of examples with eps* > epsilon (the AUAC
definition of the SAT paper, ``000_e2e3710bc929b9d7.txt``). Running a fixed-budget attack at every epsilon of a grid
spends most of its work re-proving what is known. Here each example climbs a ladder of radii only until it is fooled,
each rung warm-started from the previous rung's last iterate; then each fooled example is bisected on its own interval
(one batch, per-example epsilons), warm-started from its smallest adversarial so far. eps* is the norm of the smallest
verified adversarial found: 0 if the example is misclassified clean, +inf if it was never fooled up to eps_max.

One search may serve several judges ("sides"): :func:`judged_search` judges every candidate for each side (an audit's
twin and its deployed engine) and keeps each side's ladder and bisection state, so the attack runs once for all sides
where they agree, instead of once per side. The attack's clean check runs once per search: later calls get the clean
logits back and skip it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kit.attacks.base import LP_NORMS, Attack, AttackResult, RowJudge, lp_norm, model_verdict
from kit.errors import UserError

#: A side's judge: ``judge(x, y) -> (N,) bool`` (fooled), or ``None`` for the attacked model's own verdict.
Judge = Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None


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
    known: torch.Tensor | None = None,
) -> SearchResult:
    """Smallest epsilon per example at which a fixed-budget attack fools the model, up to ``eps_max``.

    Parameters
    ----------
    attack : Attack
        A fixed-budget attack (PGD, APGD, Square) accepting per-example ``eps`` and ``init``. A minimum-norm attack
        (``attack.minimum_norm``) is run once, capped at ``eps_max``. Its :attr:`~kit.attacks.base.Attack.judge`, if
        set, decides what counts as fooled.
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
    known : (N,) tensor, optional
        Per example, a radius at which it is already known to be fooled (the smallest eps* of the attacks run before:
        as AutoAttack, attack only where something can still be learnt). The search stops with an example once the
        attack resisted at a radius at least this large: nothing it could still find would be smaller. Such an
        example keeps the adversarial it had found by then (from a rung above ``known``, before the bisection narrowed
        it), or none (``inf``). Where the attack's path for an example does not depend on the others in its batch
        (PGD and APGD once their random starts are drawn), every eps* below ``known`` is exactly what the search
        without it finds, and the others are at least that.

    Returns
    -------
    SearchResult
        ``eps_star`` is the norm of the smallest adversarial verified by the model (an upper bound on the true
        minimum), 0 for examples misclassified clean, ``inf`` for examples not fooled up to ``eps_max``.
    """
    return judged_search(attack, x, y, eps_max, {"model": attack.judge}, rungs, tol, warm_start, on_step,
                         known)["model"]


@contextmanager
def _judged_by(attack: Attack, judge: Judge | RowJudge) -> Iterator[None]:
    saved = attack.judge
    attack.judge = judge
    try:
        yield
    finally:
        attack.judge = saved


class _Sides(RowJudge):
    """The judge of one attack call in :func:`judged_search`: each candidate is judged for every side still wanted
    for its row, and each side keeps its first adversarial (and its size); the attack stops on a row once every
    wanted side has been fooled there."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, want: torch.Tensor, judges: list[Judge], attack: Attack):
        self.x, self.y, self.want, self.judges, self.attack = x, y, want, judges, attack
        m, k = want.shape
        self.done = torch.zeros_like(want)
        self.size = torch.full((m, k), math.inf, dtype=torch.float64, device=x.device)
        self.x_adv = x.unsqueeze(0).repeat(k, *([1] * x.dim()))  # (K, M, C, H, W)

    def judge_rows(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor,
                   size: torch.Tensor | None) -> torch.Tensor:
        pending = self.want[rows] & ~self.done[rows]  # (M, K)
        for k, judge in enumerate(self.judges):
            sel = pending[:, k].nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            if judge is None:
                fooled = model_verdict(logits[sel], y[sel], self.attack.targeted)
            else:  # only the candidates this side still waits for are shown to it (an engine's forward passes)
                fooled = judge(x[sel], y[sel]).to(device=rows.device, dtype=torch.bool)
            hit = sel[fooled]
            if hit.numel() == 0:
                continue
            r = rows[hit]
            if self.attack.norm in LP_NORMS:  # measured here, not taken from the attack
                found = lp_norm(x[hit] - self.x[r], self.attack.norm).double()
            elif size is not None:  # a Wasserstein radius is the cost of the attack's transport plan
                found = size[hit].double()
            elif torch.equal(x[hit], self.x[r]):  # the clean check: the inputs themselves
                found = torch.zeros(hit.numel(), dtype=torch.float64, device=x.device)
            else:
                raise RuntimeError(f"{type(self.attack).__name__} judged a Wasserstein candidate without its cost")
            self.done[r, k] = True
            self.size[r, k] = found
            self.x_adv[k, r] = x[hit]
        return (self.done[rows] | ~self.want[rows]).all(1)


def judged_search(
    attack: Attack,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_max: float,
    judges: Mapping[str, Judge],
    rungs: int = 8,
    tol: float | None = None,
    warm_start: bool = True,
    on_step: Callable[[float], None] | None = None,
    known: torch.Tensor | None = None,
) -> dict[str, SearchResult]:
    """:func:`min_eps_search` for several judges at once: one search, each candidate judged by every side.

    Every candidate the attack crafts (with its model's gradients) is judged for each side that has not yet been
    fooled on that example at that radius; the attack goes on with an example until every side it was run for is
    fooled, or its budget ends. Each side keeps its own ladder and bisection state (its interval ``[lo, hi]`` and its
    smallest adversarial): where the sides' intervals and warm starts coincide, one attack run serves them all; where
    they differ, the example is attacked once per side, in the same batch. An attack's path does not depend on who
    judges it, only where it stops, so each side meets the candidates a search of its own would meet: for an attack
    whose path depends only on its start and radius (PGD and APGD with one restart: warm starts after the first rung)
    and sides that agree on which examples are misclassified clean (the first rung's random starts are drawn for the
    examples not fooled clean), each side's eps* equals that of a separate :func:`min_eps_search` judged by that side
    alone, at the cost of one search where the sides agree.

    Parameters
    ----------
    attack : Attack
        As for :func:`min_eps_search`; its own ``judge`` is replaced during the search.
    judges : mapping of side name to judge
        ``judge(x, y) -> (N,) bool`` (fooled), e.g. a deployed engine's verdict, or ``None`` for the attacked model's
        own verdict (free: its logits are at hand). A judge is shown only the candidates of rows still waiting for it.
    x, y, eps_max, rungs, tol, warm_start, on_step, known
        As for :func:`min_eps_search` (``known`` holds for every side).

    Returns
    -------
    dict of side name to SearchResult
        Per side, eps* and the adversarial verified by that side. ``forwards`` and ``backwards`` are the attacked
        model's passes of the one search (the same tensors for every side: they are not to be added up).
    """
    if not (isinstance(eps_max, (int, float)) and math.isfinite(eps_max) and eps_max > 0):
        raise UserError(f"eps_max must be a positive finite number, got {eps_max!r}")
    if rungs < 1:
        raise UserError(f"rungs must be at least 1, got {rungs}")
    tol = eps_max / 256 if tol is None else float(tol)
    if tol <= 0:
        raise UserError(f"tolerance must be positive, got {tol}")
    names = list(judges)
    if not names:
        raise ValueError("judged_search needs at least one judge")
    if attack.minimum_norm:  # one run per side, each judged by its side alone
        out = {}
        for j, name in enumerate(names):
            with _judged_by(attack, judges[name]):
                out[name] = from_attack_result(attack(x, y, eps=eps_max), x, eps_max)
            if on_step is not None:
                on_step((j + 1) / len(names))
        return out
    # attack runs of a full search: the ladder, then about log2(rung width / tol) bisection steps
    expected = rungs + max(1, math.ceil(math.log2(max(eps_max / rungs / tol, 1.0)))) + 1
    done = 0

    n, k_sides = x.shape[0], len(names)
    side_judges = [judges[name] for name in names]
    dev = x.device
    eps_star = torch.full((k_sides, n), math.inf, dtype=torch.float64, device=dev)
    x_best = x.detach().unsqueeze(0).repeat(k_sides, *([1] * x.dim()))  # (K, N, C, H, W)
    fwd = torch.zeros(n, dtype=torch.long, device=dev)
    bwd = torch.zeros_like(fwd)
    lo = torch.zeros(k_sides, n, dtype=x.dtype, device=dev)  # largest radius at which the side resisted
    hi = torch.full((k_sides, n), math.inf, dtype=x.dtype, device=dev)  # smallest radius at which it was fooled
    clean: torch.Tensor | None = None  # the clean logits, from the first run (which checks every example clean)
    # radii already known to fool each example: a side that resisted at or beyond it leaves the search
    known = (torch.full((n,), math.inf, dtype=x.dtype, device=dev) if known is None
             else torch.as_tensor(known, device=dev).to(x.dtype).reshape(n))

    def run(ex: torch.Tensor, want: torch.Tensor, eps: torch.Tensor,
            init: torch.Tensor | None) -> tuple[torch.Tensor, AttackResult]:
        """Attack examples ``ex`` (M,) for the sides ``want`` (M, K); per row and side, whether it was fooled."""
        nonlocal done, clean
        sides = _Sides(x[ex], y[ex], want, side_judges, attack)
        with _judged_by(attack, sides):
            res = attack(x[ex], y[ex], eps=eps, init=init, clean_logits=None if clean is None else clean[ex])
        if clean is None and res.clean_logits is not None:
            clean = torch.zeros(n, res.clean_logits.shape[1], dtype=res.clean_logits.dtype, device=dev)
            clean[ex] = res.clean_logits.detach()
        fwd.index_add_(0, ex, res.forwards)  # an example may appear in two rows (one per side's interval)
        bwd.index_add_(0, ex, res.backwards)
        for k in range(k_sides):
            rows = sides.done[:, k].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            hit, found = ex[rows], sides.size[rows, k]
            better = found < eps_star[k, hit]
            eps_star[k, hit[better]] = found[better]
            x_best[k, hit[better]] = sides.x_adv[k, rows[better]]
        if on_step is not None:
            done += 1
            on_step(min(done / expected, 0.99))
        return sides.done, res

    # Ladder: each example climbs until every side is fooled (the first rung's clean check finds the examples
    # misclassified clean: eps* = 0 on that side).
    fooled = torch.zeros(k_sides, n, dtype=torch.bool, device=dev)
    last: torch.Tensor | None = None  # the previous rung's last iterates (attacks that return them)
    for k in range(1, rungs + 1):
        wanted = ~fooled & ((lo < known) | (k == 1))  # the first rung checks every example clean
        active = wanted.any(0).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        r = torch.full((active.numel(),), eps_max * k / rungs, dtype=x.dtype, device=dev)
        want = wanted[:, active].T
        hit, res = run(active, want, r, last[active] if warm_start and last is not None else None)
        if res.x_last is not None:  # else (Square) each rung starts as the attack starts on its own
            if last is None:
                last = x.detach().clone()
            last[active] = res.x_last
        for s in range(k_sides):
            won, held = want[:, s] & hit[:, s], want[:, s] & ~hit[:, s]
            hi[s, active[won]] = r[won]
            lo[s, active[held]] = r[held]
        fooled[:, active] |= hit.T

    # Bisection on each side's [lo, hi] for every fooled example with eps* > 0, all in one batch with per-example
    # radii; sides of an example with the same interval and the same warm start (smallest adversarial) share a row:
    # the attack's path does not depend on who judges it, so each side sees what a search of its own would.
    hi = torch.minimum(hi, eps_star.to(x.dtype))
    while True:
        need = (hi - lo > tol) & (eps_star > 0) & torch.isfinite(eps_star) & (lo < known)
        if not need.any():
            break
        ex_parts, want_parts, mid_parts, init_parts = [], [], [], []
        covered = torch.zeros_like(need)
        for s in range(k_sides):
            own = (need[s] & ~covered[s]).nonzero().squeeze(1)
            if own.numel() == 0:
                continue
            want = torch.zeros(own.numel(), k_sides, dtype=torch.bool, device=dev)
            want[:, s] = True
            for t in range(s + 1, k_sides):
                same = (need[t, own] & ~covered[t, own] & (lo[t, own] == lo[s, own]) & (hi[t, own] == hi[s, own])
                        & (x_best[t, own] == x_best[s, own]).flatten(1).all(1))
                want[:, t] = same
                covered[t, own[same]] = True
            ex_parts.append(own)
            want_parts.append(want)
            mid_parts.append((lo[s, own] + hi[s, own]) / 2)
            init_parts.append(x_best[s, own])
        ex, want, mid = torch.cat(ex_parts), torch.cat(want_parts), torch.cat(mid_parts)
        hit, _ = run(ex, want, mid, torch.cat(init_parts) if warm_start else None)
        for s in range(k_sides):
            rows = want[:, s].nonzero().squeeze(1)
            e, m, h = ex[rows], mid[rows], hit[rows, s]
            hi[s, e] = torch.where(h, torch.minimum(m, eps_star[s, e].to(x.dtype)), hi[s, e])
            lo[s, e] = torch.where(h, lo[s, e], m)
    if on_step is not None:
        on_step(1.0)
    return {name: SearchResult(eps_star[k], x_best[k], fwd, bwd) for k, name in enumerate(names)}
