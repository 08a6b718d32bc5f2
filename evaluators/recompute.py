"""Re-derive an audit report's figures from its own per-example results, and check stored adversarials against it.

A report (``otkit.report/1``) stores, per attack, each example's eps* on the twin and on the engine. Every other figure
of an attack follows from them, the attack's ``eps_max``, the report's ``tolerances``, ``provenance.seed`` and its
``statistics`` (grid points, bootstrap resamples): the accuracy curves, AUACs and their intervals, the fidelity
statistics and verdict. The clean verdict follows from the stored agreement and tolerance (and its spot check's);
the overall verdict, the gates and the status from those. :func:`recompute_report` re-derives all of them with the
very functions the audit uses (:func:`evaluators.audit.side_record`, :func:`evaluators.audit.fidelity`,
:func:`evaluators.audit.clean_verdict`, :func:`evaluators.audit.decide`) and lists each field that differs.
:func:`check_adversarials` checks that an ``adversarials.npz`` holds exactly the engine-side adversarials the report
describes.

What cannot be re-derived from the report alone: the eps* themselves and the clean accuracies (they need the models
and the data: :mod:`evaluators.replay` checks what those allow, and ``otkit verify --recheck`` re-runs the engine on
stored adversarials), the ``reason`` texts (wording), the checks, the pass counts and the provenance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["DEFAULT_N_BOOT", "TOLERANCE", "check_adversarials", "eps_array", "recompute_report", "rederive"]

#: Bootstrap resamples of reports written before ``statistics`` was recorded (the audit's default then and now).
DEFAULT_N_BOOT = 1000

#: Largest difference between a stored and a recomputed number that still counts as equal (absolute and relative).
TOLERANCE = 1e-9


def eps_array(eps_star: list[float | None]) -> np.ndarray:
    """A report's eps* list as floats, ``null`` (never fooled up to eps_max) as ``inf``."""
    return np.array([math.inf if v is None else float(v) for v in eps_star], dtype=float)


def _statistics(doc: Mapping[str, Any], attack: Mapping[str, Any]) -> tuple[int, int]:
    stats = doc.get("statistics") or {}
    return int(stats.get("points", len(attack["eps_grid"]))), int(stats.get("n_boot", DEFAULT_N_BOOT))


def rederive(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of ``doc`` that follow from its per-example results, recomputed as the audit computes them.

    Returns
    -------
    dict
        ``{"attacks": [{"eps_grid", "twin", "engine", "fidelity"}, ...], "clean": {"verdict"}, "verdict", "gates",
        "status"}``, in the report's layout (``twin`` and ``engine`` hold ``accuracy``, ``auac``, ``auac_ci`` and
        ``eps_star``).

    Raises
    ------
    UserError
        Tolerances outside [0, 1].
    """
    from evaluators.audit import (
        Gate,
        Tolerances,
        clean_verdict,
        combine_clean,
        decide,
        fidelity,
        side_record,
        worst_case_record,
    )
    from evaluators.curves import eps_grid

    tols = Tolerances(**{k: doc["tolerances"][k] for k in ("auac", "curve", "agreement", "alpha")})
    seed = int(doc["provenance"]["seed"])
    records = []
    for a in doc["attacks"]:
        points, n_boot = _statistics(doc, a)
        eps_max = float(a["eps_max"])
        t, e = eps_array(a["twin"]["eps_star"]), eps_array(a["engine"]["eps_star"])
        records.append({
            "name": a["name"],
            "eps_grid": [float(v) for v in eps_grid(eps_max, points)],
            "twin": side_record(t, eps_max, points, seed),
            "engine": side_record(e, eps_max, points, seed),
            "fidelity": fidelity(t, e, eps_max, tols, points=points, n_boot=n_boot, seed=seed),
        })
    worst = []
    for w in doc.get("worst_case", []):  # absent in reports written before it existed
        same = [a for a in doc["attacks"] if a["norm"] == w["norm"]]
        points = len(w["eps_grid"])
        worst.append(worst_case_record(
            w["norm"], float(w["eps_max"]), [a["name"] for a in same],
            [eps_array(a["engine"]["eps_star"]) for a in same], [eps_array(a["twin"]["eps_star"]) for a in same],
            w.get("blackbox"), points, seed, w.get("engine_only"),
            # reports written before the worst case had a verdict of its own: none re-derived either
            tolerances=tols if "fidelity" in w else None, n_boot=_statistics(doc, same[0])[1] if same else 1000))
    c = doc["clean"]
    clean = {"verdict": clean_verdict(c["top1_agreement"], tols, c["max_logit_gap"], c.get("max_logit_gap_tolerance"),
                                      n=int(doc["data"]["n"]) if "p_value" in c else None)}
    spot = c.get("spot_check")
    if spot:  # the clean comparison on examples drawn at random from the split: a mismatch there is the clean one's
        clean["spot_check"] = {"verdict": clean_verdict(spot["top1_agreement"], tols, spot["max_logit_gap"],
                                                        spot["max_logit_gap_tolerance"], n=int(spot["n"]))}
        clean["verdict"] = combine_clean(clean["verdict"], "", clean["spot_check"]["verdict"], "")[0]
    gates = [Gate(str(g["attack"]), float(g["min_auac"])) for g in doc["gates"]]
    verdict, gate_records, status = decide(clean, records, gates, doc.get("checks", []),
                                           doc.get("allowed_flags", []), worst,
                                           lower_limit="worst_case" in doc)
    return {"attacks": records, "worst_case": worst, "clean": clean, "verdict": verdict, "gates": gate_records,
            "status": status}


def _show(v: Any) -> str:
    if isinstance(v, float):
        return format(v, ".10g")
    if isinstance(v, list) and len(v) > 6:
        return f"a list of {len(v)}"
    return str(v)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b or a == b and type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=TOLERANCE)
    return a == b


def _compare(where: str, stored: Any, expected: Any, out: list[str]) -> None:
    """One line per differing field; a list differing in several places is one line (its first difference)."""
    if isinstance(expected, list):
        if not isinstance(stored, list) or len(stored) != len(expected):
            n = len(stored) if isinstance(stored, list) else "no"
            out.append(f"{where}: report has {n} values, recomputed {len(expected)}")
            return
        bad = [i for i, (s, e) in enumerate(zip(stored, expected)) if not _same(s, e)]
        if bad:
            i = bad[0]
            more = f" ({len(bad) - 1} more value(s) differ)" if len(bad) > 1 else ""
            out.append(f"{where}[{i}]: report says {_show(stored[i])}, recomputed {_show(expected[i])}{more}")
        return
    if not _same(stored, expected):
        out.append(f"{where}: report says {_show(stored)}, recomputed {_show(expected)}")


_SIDE_FIELDS = ("accuracy", "auac", "auac_ci", "eps_star")
_FIDELITY_FIELDS = ("max_gap", "max_gap_eps", "auac_gap", "auac_gap_ci", "mcnemar_p", "verdict")


def recompute_report(doc: Mapping[str, Any]) -> list[str]:
    """Re-derive every figure of ``doc`` that follows from its per-example results (:func:`rederive`); list the
    differences, one line per field, e.g. ``"attacks[0].engine.auac: report says 0.9, recomputed 0.6234375"``.

    Numbers count as equal within :data:`TOLERANCE` (1e-9, absolute or relative); an honest report recomputes to the
    last bit. ``doc`` must be a valid ``otkit.report/1`` document (:func:`evaluators.report.validate_report`).
    An empty list means every derived figure is what the stored results give.
    """
    expected = rederive(doc)
    out: list[str] = []
    for i, (a, r) in enumerate(zip(doc["attacks"], expected["attacks"])):
        at = f"attacks[{i}]"
        _compare(f"{at}.eps_grid", a["eps_grid"], r["eps_grid"], out)
        for side in ("twin", "engine"):
            for k in _SIDE_FIELDS:
                _compare(f"{at}.{side}.{k}", a[side][k], r[side][k], out)
        for k in _FIDELITY_FIELDS:
            _compare(f"{at}.fidelity.{k}", a["fidelity"][k], r["fidelity"][k], out)
    for i, (w, r) in enumerate(zip(doc.get("worst_case", []), expected["worst_case"])):
        at = f"worst_case[{i}]"
        _compare(f"{at}.eps_grid", w["eps_grid"], r["eps_grid"], out)
        _compare(f"{at}.attacks", w["attacks"], r["attacks"], out)
        for side in ("twin", "engine"):
            for k in _SIDE_FIELDS:
                _compare(f"{at}.{side}.{k}", w[side][k], r[side][k], out)
        if "fidelity" in w or "fidelity" in r:
            for k in _FIDELITY_FIELDS:
                _compare(f"{at}.fidelity.{k}", w.get("fidelity", {}).get(k), r.get("fidelity", {}).get(k), out)
    _compare("clean.verdict", doc["clean"]["verdict"], expected["clean"]["verdict"], out)
    if "spot_check" in expected["clean"]:
        _compare("clean.spot_check.verdict", doc["clean"]["spot_check"]["verdict"],
                 expected["clean"]["spot_check"]["verdict"], out)
    for i, (g, r) in enumerate(zip(doc["gates"], expected["gates"])):
        for k in ("engine_auac", "engine_auac_lower", "passed"):
            if k in g or k in r and "worst_case" in doc:
                _compare(f"gates[{i}].{k}", g.get(k), r.get(k), out)
    _compare("verdict", doc["verdict"], expected["verdict"], out)
    _compare("status", doc["status"], expected["status"], out)
    return out


def check_adversarials(doc: Mapping[str, Any], stored: Mapping[str, Mapping[str, np.ndarray]],
                       source: str = "adversarials.npz") -> list[str]:
    """Check stored engine-side adversarials (:func:`evaluators.report.load_adversarials`) against the report.

    The audit stores, for every attack, each example the engine is fooled on (engine ``eps_star`` not ``null``): its
    index in the audited subset, its eps* on the engine and the engine's prediction. So, per attack: the stored indices
    are exactly the examples with an engine eps*, once each; each stored ``eps`` is the report's engine eps* of its
    example; each ``pred`` differs from its label; pixels are finite and in [0, 1]. Returns one line per problem
    (empty when the file agrees with the report).
    """
    out: list[str] = []
    attacks = {a["name"]: a for a in doc["attacks"]}
    for name in sorted(set(stored) - set(attacks)):
        out.append(f"{source}: attack {name!r} is not in the report")
    for name, a in attacks.items():
        if name not in stored:
            out.append(f"{source}: no adversarials of {name!r}, which the report audited")
            continue
        s = stored[name]
        where = f"{source} {name}"
        index = np.asarray(s["index"], dtype=np.int64)
        eps_star = a["engine"]["eps_star"]
        fooled = {i for i, v in enumerate(eps_star) if v is not None}
        uniq, counts = np.unique(index, return_counts=True)
        if (counts > 1).any():
            out.append(f"{where}: example(s) stored more than once: {', '.join(map(str, uniq[counts > 1][:8]))}")
        have = set(int(i) for i in index)
        extra = sorted(have - fooled)
        missing = sorted(fooled - have)
        if extra:
            out.append(f"{where}: {len(extra)} stored example(s) that the report does not call fooled on the engine "
                       f"(index {', '.join(map(str, extra[:8]))}{'...' if len(extra) > 8 else ''})")
        if missing:
            out.append(f"{where}: {len(missing)} example(s) fooled on the engine per the report are not stored "
                       f"(index {', '.join(map(str, missing[:8]))}{'...' if len(missing) > 8 else ''})")
        wrong = [(int(i), float(e)) for i, e in zip(index, s["eps"])
                 if 0 <= int(i) < len(eps_star) and eps_star[int(i)] is not None and not _same(float(e),
                                                                                                eps_star[int(i)])]
        if wrong:
            i, e = wrong[0]
            more = f" ({len(wrong) - 1} more)" if len(wrong) > 1 else ""
            out.append(f"{where}: example {i} has eps {e:.10g} but the report's engine eps_star is "
                       f"{eps_star[i]:.10g}{more}")
        same = np.asarray(s["pred"]) == np.asarray(s["y"])
        if same.any():
            out.append(f"{where}: {int(same.sum())} stored adversarial(s) whose prediction is their label "
                       f"(index {', '.join(map(str, index[same][:8]))})")
        x = np.asarray(s["x"])
        if x.size and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            out.append(f"{where}: pixels outside [0, 1]")
    return out
