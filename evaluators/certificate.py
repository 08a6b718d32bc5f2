r"""The certificate files (``otkit certify``): schema ``otkit.certificate/1``, loading, re-derivation and writing.

A certificate folder holds::

    certified.png      the certified accuracy curve (a lower bound) and, with a twin, the attack curve of the smoothed
                       engine (an empirical upper bound) on one axis
    certificate.md     the same as GitHub-flavoured Markdown
    certificate.html   one self-contained page
    certificate.json   the document (``evaluators/schemas/certificate.schema.json``), written LAST

Every derived figure of the document follows from the stored counts: ``p_lower`` is the one-sided Clopper-Pearson
bound of ``count`` out of ``n`` at ``alpha``, ``radius`` the noise model's radius of it, the curve and the certified
AUAC the radii of the correctly classified examples. :func:`recompute_certificate` re-derives them (``otkit verify``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from evaluators.render import plot_certificate_png, render_certificate_html, render_certificate_markdown
from evaluators.report import plain_json, read_json_document, schema_errors
from kit.errors import UserError
from kit.io import atomic_write

__all__ = ["ATTACK_BOUND", "CERTIFICATE_FILES", "CERTIFIED_BOUND", "SCHEMA", "SIGNATURE_FILE", "certificate_schema", "certified_curve", "is_certificate", "load_certificate", "recompute_certificate",
           "remove_certificate", "validate_certificate", "write_certificate"]

log = logging.getLogger(__name__)

SCHEMA = "otkit.certificate/1"

#: what every certified figure is; the document says so in its ``bound`` field, its pages and the CLI's summary
CERTIFIED_BOUND = "certified lower bound (randomized smoothing): each radius holds with probability at least 1 - alpha"

#: what the attack on the smoothed engine is (``attack.bound``)
ATTACK_BOUND = "empirical upper bound from attacks"

#: the files of a certificate folder, in the order :func:`write_certificate` writes them (the JSON last)
CERTIFICATE_FILES = ("certified.png", "certificate.md", "certificate.html", "certificate.json")
#: The signature bundle ``--sign-key`` writes beside the certificate (evaluators.attestation).
SIGNATURE_FILE = "certificate.sigstore.json"


@functools.lru_cache(maxsize=1)
def _schema_text() -> str:
    return (resources.files("evaluators") / "schemas" / "certificate.schema.json").read_text(encoding="utf-8")


def certificate_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``otkit.certificate/1``, a fresh copy."""
    return json.loads(_schema_text())


def _fail(source: str, where: str, message: str) -> UserError:
    return UserError(f"{source} does not match {SCHEMA}: {where}: {message}")


def validate_certificate(doc: Any, source: str = "certificate.json") -> dict[str, Any]:
    """Check a certificate against ``otkit.certificate/1``; return it as plain JSON types.

    The JSON Schema first, then what it cannot say: one entry per example in every per-example list, a grid from 0
    up to ``r_max`` with one accuracy per radius, abstentions with radius 0, and a ``status`` that agrees with the
    gates and the error flags not allowed.
    """
    plain = plain_json(doc, source, SCHEMA)
    schema_errors(plain, certificate_schema(), source, SCHEMA)
    n = plain["data"]["n"]
    for key, values in plain["examples"].items():
        if len(values) != n:
            raise _fail(source, f"examples/{key}", f"has {len(values)} values but data/n is {n}")
    ex = plain["examples"]
    if any(p < 0 and r != 0 for p, r in zip(ex["prediction"], ex["radius"])):
        raise _fail(source, "examples/radius", "an abstention (prediction -1) with a nonzero radius")
    if any(c > plain["smoothing"]["n"] for c in ex["count"]):
        raise _fail(source, "examples/count", "a count above smoothing/n")
    cert = plain["certified"]
    grid = cert["radius_grid"]
    if grid[0] != 0 or any(b <= a for a, b in zip(grid, grid[1:])) or abs(grid[-1] - cert["r_max"]) > 1e-9 * max(
            1.0, cert["r_max"]):
        raise _fail(source, "certified/radius_grid", "must increase strictly from 0 to r_max")
    if len(cert["accuracy"]) != len(grid):
        raise _fail(source, "certified/accuracy", f"has {len(cert['accuracy'])} values but radius_grid has {len(grid)}")
    att = plain["attack"]
    if att is not None:
        if len(att["accuracy"]) != len(att["eps_grid"]):
            raise _fail(source, "attack/accuracy", "does not have one value per eps_grid radius")
        if len(att["eps_star"]) != n:
            raise _fail(source, "attack/eps_star", f"has {len(att['eps_star'])} values but data/n is {n}")
    failed = [g for g in plain["gates"] if not g["passed"]]
    errors = [c["id"] for c in plain["checks"] if c["severity"] == "error" and c["id"] not in plain["allowed_flags"]]
    if plain["status"] == "pass" and (failed or errors):
        raise _fail(source, "status", "is pass but " + ("a gate failed" if failed else f"error flag {errors[0]}"))
    return plain


def recompute_certificate(doc: dict[str, Any]) -> list[str]:
    """Every derived figure of ``doc`` re-derived from its counts with the functions that made it (1e-9); the
    differences as ``"FIELD: report says A, recomputed B"`` lines (empty when all agree)."""
    from kit.smoothing import lower_confidence_bound, make_noise

    sm, ex = doc["smoothing"], doc["examples"]
    noise = make_noise(sm["kind"], sm["sigma"])
    pred = np.asarray(ex["prediction"], dtype=np.int64)
    count = np.asarray(ex["count"], dtype=np.int64)
    label = np.asarray(ex["label"], dtype=np.int64)
    p_lower = np.where(pred >= 0, lower_confidence_bound(count, sm["n"], sm["alpha"]), 0.0)
    radius = np.where(pred >= 0, noise.radius(p_lower), 0.0)
    correct = pred == label
    curve = certified_curve(radius, correct, doc["certified"]["r_max"], len(doc["certified"]["radius_grid"]))
    out = []

    def same(name: str, said: Any, got: Any) -> None:
        a, b = np.asarray(said, dtype=float), np.asarray(got, dtype=float)
        if a.shape != b.shape or not np.allclose(a, b, rtol=1e-9, atol=1e-9):
            i = int(np.argmax(np.abs(a - b))) if a.shape == b.shape and a.ndim else None
            at = f"[{i}]" if i is not None else ""
            show = (a.flat[i], b.flat[i]) if i is not None else (said, got)
            out.append(f"{name}{at}: report says {show[0]}, recomputed {show[1]}")

    same("smoothing.max_radius", sm["max_radius"], noise.max_radius(sm["n"], sm["alpha"]))
    same("examples.p_lower", ex["p_lower"], p_lower)
    same("examples.radius", ex["radius"], radius)
    same("certified.accuracy", doc["certified"]["accuracy"], curve["accuracy"])
    same("certified.auac", doc["certified"]["auac"], curve["auac"])
    same("certified.smoothed_accuracy", doc["certified"]["smoothed_accuracy"], correct.mean() if len(correct) else 0)
    same("certified.abstain_rate", doc["certified"]["abstain_rate"], (pred < 0).mean() if len(pred) else 0)
    same("certified.mean_radius", doc["certified"]["mean_radius"],
         np.where(correct, radius, 0.0).mean() if len(correct) else 0)
    for g in doc["gates"]:
        same("gates.certified_auac", g["certified_auac"], curve["auac"])
        if g["passed"] != (curve["auac"] >= g["min_certified_auac"]):
            out.append(f"gates: passed {g['passed']} but certified AUAC {curve['auac']:.6g} vs "
                       f"{g['min_certified_auac']:g}")
    errors = [c["id"] for c in doc["checks"] if c["severity"] == "error" and c["id"] not in doc["allowed_flags"]]
    status = "pass" if all(g["passed"] for g in doc["gates"]) and not errors else "fail"
    if doc["status"] != status:
        out.append(f"status: certificate says {doc['status']}, recomputed {status}")
    if doc["bound"] != CERTIFIED_BOUND:
        out.append(f"bound: certificate says {doc['bound']!r}, a certificate of this kit says {CERTIFIED_BOUND!r}")
    att = doc["attack"]
    if att is not None:
        # the attack's curve from its per-example eps* (the eps* themselves only a new attack could check)
        if att["bound"] != ATTACK_BOUND:
            out.append(f"attack.bound: certificate says {att['bound']!r}, an attack's figure is {ATTACK_BOUND!r}")
        r_max = doc["certified"]["r_max"]
        eps = np.array([np.inf if v is None else float(v) for v in att["eps_star"]])
        grid = np.asarray(att["eps_grid"], dtype=float)
        same("attack.eps_grid", grid, doc["certified"]["radius_grid"])
        same("attack.accuracy", att["accuracy"], [(eps > r).mean() if len(eps) else 0.0 for r in grid])
        same("attack.auac", att["auac"], np.minimum(eps, r_max).mean() / r_max if len(eps) else 0.0)
        # the attack's eps* of an example certified correct lies inside its certified radius exactly where it recorded
        # a violation (a candidate PREDICT named another class than the certified one, inside the radius): a count
        # raised after the attack ran moves the radius past the eps* the attack found without recording one
        recorded = {int(v["index"]) for v in att["violations"]}
        inside = np.flatnonzero((pred >= 0) & correct & (eps < radius)) if len(eps) == len(radius) else []
        for i in inside:
            if int(i) not in recorded:
                out.append(f"attack.violations: example {int(i)} was fooled at {eps[i]:.6g} (attack.eps_star), inside "
                           f"its certified radius {radius[i]:.6g}, but the certificate records no violation there")
        for k, v in enumerate(att["violations"]):
            i = int(v["index"])
            if not 0 <= i < len(radius) or not np.isclose(v["radius"], radius[i], rtol=1e-9, atol=1e-9):
                got = f"{radius[i]:.6g}" if 0 <= i < len(radius) else "no such example"
                out.append(f"attack.violations[{k}].radius: certificate says {v['radius']}, recomputed {got}")
        violated = any(c["id"] == "certificate-violated" for c in doc["checks"])
        if bool(att["violations"]) != violated:
            out.append(f"checks: {len(att['violations'])} violation(s) recorded but the certificate-violated flag is "
                       f"{'raised' if violated else 'absent'}")
    return out


def certified_curve(radius: np.ndarray, correct: np.ndarray, r_max: float, points: int) -> dict[str, Any]:
    """The certified accuracy on a grid of ``points`` radii from 0 to ``r_max`` and the certified AUAC
    (:func:`kit.smoothing.certified_auac`): an example counts at r when it is certified correct with radius at least r (Cohen et al.'s convention)."""
    from kit.smoothing import certified_accuracy, certified_auac

    grid = np.linspace(0.0, r_max, points)
    return {"r_max": float(r_max), "radius_grid": [float(v) for v in grid],
            "accuracy": [float(v) for v in certified_accuracy(radius, correct, grid)],
            "auac": float(certified_auac(radius, correct, r_max))}


def remove_certificate(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete a folder's certificate files, ``certificate.json`` FIRST (an interrupted re-run never looks complete)."""
    out = Path(out_dir)
    removed = []
    names = list(reversed(CERTIFICATE_FILES))  # certificate.json first, then its signature, then the rest
    for name in [names[0], SIGNATURE_FILE, *names[1:]]:
        p = out / name
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


def is_certificate(doc: dict[str, Any]) -> bool:
    """Whether a document is a certificate (``otkit.certificate/1``) rather than an audit report."""
    return doc.get("schema") == SCHEMA


def write_certificate(doc: dict[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Validate ``doc`` and write the certificate files, ``certificate.json`` last, each atomically; a failed step
    leaves no ``certificate.json``. Returns the paths written."""
    doc = validate_certificate(doc)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create certificate folder {out}: {e.strerror}") from None
    png_path, md, page, main = (out / name for name in CERTIFICATE_FILES)
    for stale in (main, out / SIGNATURE_FILE):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    png = plot_certificate_png(doc)
    with atomic_write(png_path) as f:
        f.write(png)
    with atomic_write(md, "w") as f:
        f.write(render_certificate_markdown(doc))
    with atomic_write(page, "w") as f:
        f.write(render_certificate_html(doc, png))
    with atomic_write(main, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
        f.write("\n")
    log.debug("wrote the certificate to %s", out)  # the CLI names every file it wrote
    return [png_path, md, page, main]


def load_certificate(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``DIR/certificate.json`` (or the file itself); one-line :class:`UserError` otherwise."""
    p, doc = read_json_document(path, "certificate.json", SCHEMA, "certificate")
    return validate_certificate(doc, source=str(p))
