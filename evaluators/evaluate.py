"""Evaluate a PyTorch classifier: per-example eps* for each attack, accuracy curves, AUAC and validity checks.

The output is the ``curves.json`` document (schema ``otkit.curves/1``); the audit report reuses its per-attack shape.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import kit
from evaluators import checks as C
from evaluators.curves import curve_record
from evaluators.plots import plot_curves
from kit.attacks.base import LP_NORMS, Norm
from kit.attacks.pgd import FGSM, PGD
from kit.attacks.registry import AttackSpec, get_attack
from kit.attacks.search import SearchResult, min_eps_search
from kit.errors import UserError
from kit.io import atomic_write
from kit.runtime import progress_bar

log = logging.getLogger(__name__)
SCHEMA = "otkit.curves/1"


@dataclass(frozen=True)
class AttackRequest:
    """An attack to run and its eps_max (``NAME`` or ``NAME@EPS_MAX`` on the command line)."""

    spec: AttackSpec
    eps_max: float

    @classmethod
    def parse(cls, text: str, default_eps_max: float | None) -> AttackRequest:
        """``NAME[@EPS_MAX][:key=value,...]`` (one registered attack; presets are expanded by :meth:`parse_all`)."""
        head, colon, params = text.partition(":")
        name, sep, eps = head.partition("@")
        spec = get_attack(name.strip())
        if colon:
            spec = spec.with_params(_params(params, text))
        if sep:
            try:
                value = float(eps)
            except ValueError:
                raise UserError(f"bad epsilon in {text!r}: expected NAME@EPS_MAX, e.g. pgd-l2@1.5") from None
        elif default_eps_max is None:
            raise UserError(f"no eps_max for {name}: give --eps-max or {name}@EPS_MAX")
        else:
            value = default_eps_max
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"eps_max must be a positive finite number, got {value} for {name}")
        if spec.norm is Norm.LINF and value > 1:
            raise UserError(f"eps_max {value:g} for {name} is beyond 1, the largest L-inf distance between two images "
                            "with pixels in [0, 1]: every example would count as fooled and the AUAC would say nothing")
        return cls(spec, value)

    @classmethod
    def parse_all(cls, texts: Sequence[str], default_eps_max: float | None) -> list[AttackRequest]:
        """Every ``--attack`` (or run-file entry), a preset such as ``autoattack@0.3`` expanded into its attacks
        (:data:`kit.attacks.registry.PRESETS`) at the same eps_max; parameters apply to single attacks only."""
        from kit.attacks.registry import PRESETS, expand

        out = []
        for text in texts:
            head, colon, _ = text.partition(":")
            name, sep, eps = head.partition("@")
            members = PRESETS.get(name.strip())
            if members is None:
                out.append(cls.parse(text, default_eps_max))
                continue
            if colon:
                raise UserError(f"{name.strip()} is a preset: set parameters on its attacks one by one instead "
                                f"({', '.join(expand(name.strip()))})")
            for m in members:  # a member may carry its own parameters: NAME:key=value
                m_name, m_colon, m_params = m.partition(":")
                out.append(cls.parse(f"{m_name}{sep}{eps}{m_colon}{m_params}", default_eps_max))
        return out

    def check_radius(self, input_shape: Sequence[int]) -> None:
        """Refuse an eps_max beyond :func:`largest_radius` for images of ``input_shape`` (C, H, W)."""
        bound = largest_radius(self.spec.norm, input_shape)
        if self.eps_max > bound:
            shape = "x".join(map(str, input_shape))
            raise UserError(f"eps_max {self.eps_max:g} for {self.spec.name} is beyond {bound:.4g}, the largest "
                            f"{self.spec.norm.value} distance between two {shape} images with pixels in [0, 1]: the "
                            "curve would end in a ball holding every image and the AUAC would say nothing")


def _params(text: str, where: str) -> dict[str, str]:
    """``key=value,key=value`` as a dict of texts (typed later against the attack's own parameters)."""
    out: dict[str, str] = {}
    for item in text.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise UserError(f"bad attack parameters in {where!r}: expected NAME@EPS:key=value,key=value")
        if key.strip() in out:
            raise UserError(f"attack parameter {key.strip()!r} given twice in {where!r}")
        out[key.strip()] = value.strip()
    return out


def largest_radius(norm: Norm, input_shape: Sequence[int]) -> float:
    r"""The largest distance between two images of ``input_shape`` (C, H, W) with pixels in [0, 1] under ``norm``.

    L-inf: 1. L2: :math:`\sqrt{CHW}`. Wasserstein (unit-mass images, Euclidean pixel distance as ground cost, see
    :mod:`kit.ot.local`): no unit of mass moves farther than the image's diagonal, :math:`\sqrt{(H-1)^2 + (W-1)^2}`.
    """
    c, h, w = (int(v) for v in input_shape)
    if norm is Norm.LINF:
        return 1.0
    if norm is Norm.L2:
        return math.sqrt(c * h * w)
    return math.hypot(h - 1, w - 1)


def check_radii(requests: Sequence[AttackRequest], input_shape: Sequence[int]) -> None:
    """:meth:`AttackRequest.check_radius` for every request (before any work)."""
    for r in requests:
        r.check_radius(input_shape)


def run_search(spec: AttackSpec, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_max: float, *, seed: int,
               batch_size: int, rungs: int, tol: float | None, desc: str = "") -> SearchResult:
    """Minimum-epsilon search for one attack over ``x`` in batches (results concatenated in order)."""
    attack = spec.build(model, seed=seed)
    parts = []
    with progress_bar(desc or spec.name, total=len(x), unit="ex") as bar:
        for i in range(0, len(x), batch_size):
            m = len(x[i : i + batch_size])
            parts.append(min_eps_search(attack, x[i : i + batch_size], y[i : i + batch_size], eps_max, rungs, tol,
                                        on_step=bar.within(i, m)))
    return SearchResult(
        torch.cat([p.eps_star for p in parts]), torch.cat([p.x_adv for p in parts]),
        torch.cat([p.forwards for p in parts]), torch.cat([p.backwards for p in parts]),
    )


def attack_record(name: str, spec: AttackSpec, eps_max: float, res: SearchResult, seed: int,
                  extra_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """One entry of ``attacks`` in curves.json."""
    return {
        "name": name,
        "norm": spec.norm.value,
        "eps_max": eps_max,
        "config": {**spec.config(), **(extra_config or {})},
        **curve_record(res.eps_star, eps_max, seed=seed),
        "passes": {
            "forward_per_example": res.forwards.double().mean().item(),
            "backward_per_example": res.backwards.double().mean().item(),
        },
    }


def run_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, combined: dict[Norm, tuple[float, SearchResult]],
               *, seed: int, check_samples: int = 200) -> list[C.Flag]:
    """Model-level checks, then per norm: unbounded epsilon, FGSM / PGD / Square at fixed radii vs the combined eps*."""
    flags = C.check_outputs(model, x[:check_samples])
    flags += C.check_gradients(model, x[:check_samples], y[:check_samples])
    xs, ys = x[:check_samples], y[:check_samples]
    for norm, (eps_max, res) in combined.items():
        if norm not in LP_NORMS:  # the fixed-radius checks below are L-inf / L2 attacks
            continue
        eps_star = res.eps_star[:check_samples]
        f = C.check_unbounded(model, xs, ys, norm, seed=seed)
        flags += [f] if f else []
        radii = [eps_max / 4, eps_max / 2, eps_max]
        fixed_acc = []
        for eps in radii:
            fg = FGSM(model, eps=eps, norm=norm)(xs, ys)
            pg = PGD(model, eps=eps, norm=norm, steps=20, seed=seed)(xs, ys)
            fixed_acc.append(pg.robust_accuracy)
            for check_id, source, r in (("single-step-beats-multi-step", "FGSM", fg),
                                        ("fixed-eps-contradiction", "PGD-20", pg)):
                f = C.check_fixed_eps(check_id, source, eps, r.success, eps_star, attack=f"{source.lower()}-{norm.value}")
                flags += [f] if f else []
        f = C.check_monotone(f"pgd-20-{norm.value} (fixed eps)", [0.0, *radii],
                             [(res.eps_star[:check_samples] > 0).double().mean().item(), *fixed_acc])
        flags += [f] if f else []
        square = get_attack(f"square-{norm.value}").build(model, seed=seed, queries=500)
        sub = slice(0, min(100, check_samples))
        for eps in (eps_max / 2, eps_max):
            sq = square(x[sub], y[sub], eps=eps)
            f = C.check_fixed_eps("black-box-beats-white-box", "Square", eps, sq.success, res.eps_star[sub],
                                  attack=f"square-{norm.value}")
            flags += [f] if f else []
    # one flag per id and attack is enough: keep the first (smallest radius)
    seen, unique = set(), []
    for f in flags:
        if (f.id, f.attack) not in seen:
            seen.add((f.id, f.attack))
            unique.append(f)
    return unique


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, requests: Sequence[AttackRequest], *, seed: int = 0,
             batch_size: int = 256, rungs: int = 8, tol: float | None = None, checks: bool = True) -> dict[str, Any]:
    """Run every requested attack and the checks; return the curves.json document (without model/data sections)."""
    if not requests:
        raise UserError("no attack requested: give at least one --attack")
    t0 = time.perf_counter()
    model.eval()
    records, flags = [], []
    by_norm: dict[Norm, list[tuple[float, SearchResult]]] = {}
    for req in requests:
        res = run_search(req.spec, model, x, y, req.eps_max, seed=seed, batch_size=batch_size, rungs=rungs, tol=tol)
        cfg = {} if req.spec.cls in ("FMN", "TrustRegion") else {"rungs": rungs, "tol": tol or req.eps_max / 256}
        rec = attack_record(req.spec.name, req.spec, req.eps_max, res, seed, cfg)
        records.append(rec)
        f = C.check_reverify(model, x, y, res.x_adv, res.eps_star, req.spec.norm, req.spec.name)
        flags += [f] if f else []
        by_norm.setdefault(req.spec.norm, []).append((req.eps_max, res))
    combined_records, combined = [], {}
    for norm, items in by_norm.items():
        eps_max = max(e for e, _ in items)
        best = SearchResult.combine([r for _, r in items])
        combined[norm] = (eps_max, best)
        if len(items) > 1:
            rec = curve_record(best.eps_star, eps_max, seed=seed)
            combined_records.append({"name": f"combined-{norm.value}", "norm": norm.value, "eps_max": eps_max,
                                     "attacks": [r["name"] for r in records if r["norm"] == norm.value], **rec})
    if checks:
        flags += run_checks(model, x, y, combined, seed=seed)
    return {
        "schema": SCHEMA,
        "attacks": records,
        "combined": combined_records,
        "checks": [f.to_dict() for f in flags],
        "provenance": {"kit_version": kit.__version__, "torch": torch.__version__, "seed": seed,
                       "device": str(x.device), "seconds": time.perf_counter() - t0},
    }


def write_outputs(doc: dict[str, Any], out: Path, title: str = "") -> tuple[Path, Path]:
    """Write ``curves.json`` and ``curves.png`` into ``out`` (each atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "curves.json", out / "curves.png"
    plot_curves(doc["attacks"] + [{**c, "style": "--"} for c in doc["combined"]], png_path, title)
    with atomic_write(json_path, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
    return json_path, png_path
