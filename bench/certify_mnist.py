"""Certified vs attacked on real MNIST digits (issue 19): the certificate/attack sandwich for both smoothing kinds,
and an independent soundness check of every certified radius.

Steps (training and exports are cached in ``bench/.cache/certify_mnist``; ``--retrain`` ignores the cache):

1. **Gaussian model.** ``otkit train --defense gaussian --param sigma=0.25`` (cnn-small, ``mnist-10k``), exported to
   fp32 ONNX with ``otkit export``.
2. **Gaussian certificate.** ``otkit certify --engine M.onnx --twin M.safetensors --sigma 0.25 --n 10000`` on the
   first ``--samples`` examples (the command's own SmoothAdv attack gives the upper-bound curve).
3. **Independent L2 attack.** For every example certified with radius R > 0: the registry's ``pgd-l2`` on the soft
   smoothed twin (:class:`evaluators.certify.SoftSmoothed`, fresh noise per step) at radius ``f * R`` for each factor
   f of ``--factors`` (f < 1: inside the certificate), against the *certified* class; both the final iterate and the
   first iterate that fooled the soft twin are judged by the ONNX engine's smoothed prediction
   (:func:`kit.smoothing.predict`, its own noise seeds). A candidate within R that PREDICT puts in another class is a
   violation.
4. **Wasserstein.** Flow-noise models (``bench-flow-noise``: cross-entropy on Levine & Feizi's Laplace flow noise,
   defined below, trained by the kit's trainer) at a few sigmas, and the Gaussian model reused; each (model, sigma)
   is certified on ``--probe`` held-out examples (test examples after the certified ones, so disjoint from them) and
   the one with the largest mean certified radius is certified with ``otkit certify --smoothing wasserstein`` on
   ``--w-samples`` examples, then attacked independently with the registry's ``wasserstein-pgd`` as in step 3.

Run (progress on stderr, one JSON document on stdout)::

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/certify_mnist.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kit.defenses.base import Defense, register_defense  # noqa: E402
from kit.smoothing import flow_divergence  # noqa: E402

DATA = "mnist:/work/shared/data/mnist-10k"
CACHE = ROOT / "bench" / ".cache" / "certify_mnist"
OTKIT = str(Path(sys.executable).parent / "otkit")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@register_defense
class FlowNoise(Defense):
    r"""Cross-entropy on :math:`x + m\,\mathrm{div}\,F`, :math:`F_e \sim \mathrm{Laplace}(0, \sigma/\sqrt 2)` i.i.d.
    on every flow between 4-neighbouring pixels, :math:`m` the image's mass: the noise of
    :class:`kit.smoothing.WassersteinNoise` (unit-mass scale), one draw per example and batch (Levine & Feizi 2020
    train their base classifier on the smoothing noise, as Cohen et al. do). Benchmark-only (not in the kit)."""

    name = "bench-flow-noise"
    description = "cross-entropy on Laplace flow noise (Wasserstein smoothing's base classifier), bench only"
    defaults: dict[str, Any] = {"sigma": 0.01}

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        n, c, h, w = x.shape
        b = float(self.params["sigma"]) / math.sqrt(2.0)

        def laplace(shape: tuple[int, ...]) -> torch.Tensor:
            e = torch.empty((2, *shape), device=x.device, dtype=x.dtype).exponential_()
            return b * (e[0] - e[1])

        mass = x.flatten(1).sum(1).view(n, 1, 1, 1)
        noisy = x + mass * flow_divergence(laplace((n, c, h, w - 1)), laplace((n, c, h - 1, w)))
        ce = F.cross_entropy(model(noisy), y)
        return ce, {"noisy_ce": ce.item()}


def run(cmd: list[str]) -> tuple[float, int, str]:
    """Run a CLI command (1 thread); return its seconds, exit status and stdout; stderr goes to ours."""
    log("$ " + " ".join(cmd))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    return time.perf_counter() - t0, p.returncode, p.stdout


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def metrics(ckpt: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in ckpt.with_suffix(".metrics.jsonl").read_text().splitlines() if line]
    return {"epochs": len(rows), "held_out_acc_last5": [r["test_acc"] for r in rows[-5:]],
            "train_seconds_sum_of_epochs": round(sum(r["seconds"] for r in rows), 1)}


def train_gaussian(sigma: float, epochs: int, retrain: bool) -> tuple[Path, dict[str, Any]]:
    ckpt = CACHE / f"cnn-small-gaussian-{sigma:g}-e{epochs}.safetensors"
    info: dict[str, Any] = {"checkpoint": rel(ckpt)}
    if retrain or not ckpt.exists():
        cmd = [OTKIT, "train", "--defense", "gaussian", "--param", f"sigma={sigma:g}", "--arch", "cnn-small",
               "--data", DATA, "--epochs", str(epochs), "--eval-adv-samples", "0", "--overwrite", "--out", rel(ckpt)]
        s, rc, _ = run(cmd)
        if rc:
            raise SystemExit(f"training failed ({rc})")
        info.update(command=" ".join(["otkit", *cmd[1:]]), seconds=round(s, 1), cached=False)
    else:
        info.update(cached=True)
    info.update(metrics(ckpt))
    return ckpt, info


def train_flow(sigma: float, epochs: int, lr: float, retrain: bool) -> tuple[Path, dict[str, Any]]:
    from kit.defenses.trainer import TrainConfig, train

    tag = "" if lr == 0.05 else f"-lr{lr:g}"  # 0.05: the trainer's default
    ckpt = CACHE / f"cnn-small-flow-{sigma:g}-e{epochs}{tag}.safetensors"
    info: dict[str, Any] = {"checkpoint": rel(ckpt), "defense": f"bench-flow-noise sigma={sigma:g}", "lr": lr}
    if retrain or not ckpt.exists():
        log(f"train bench-flow-noise sigma {sigma:g}, {epochs} epochs, lr {lr:g}")
        t0 = time.perf_counter()
        train(TrainConfig(defense="bench-flow-noise", arch="cnn-small", data=DATA, epochs=epochs, lr=lr,
                          eval_adv_samples=0, defense_params={"sigma": sigma}), ckpt, overwrite=True)
        info.update(seconds=round(time.perf_counter() - t0, 1), cached=False)
    else:
        info.update(cached=True)
    info.update(metrics(ckpt))
    return ckpt, info


def export(ckpt: Path, retrain: bool) -> tuple[Path, dict[str, Any]]:
    onnx = ckpt.with_suffix(".onnx")
    info: dict[str, Any] = {"engine": rel(onnx)}
    if retrain or not onnx.exists():
        cmd = [OTKIT, "export", rel(ckpt), "--format", "onnx", "--json", "--out", rel(onnx)]
        s, rc, out = run(cmd)
        if rc:
            raise SystemExit(f"export failed ({rc})")
        info.update(command=" ".join(["otkit", *cmd[1:]]), seconds=round(s, 1), cached=False)
        try:
            info["parity"] = json.loads(out)
        except json.JSONDecodeError:
            pass
    else:
        info.update(cached=True)
    return onnx, info


def certify_cli(onnx: Path, ckpt: Path, kind: str, sigma: float, samples: int, n: int, attack_n: int, out: Path,
                extra: list[str] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [OTKIT, "certify", "--engine", rel(onnx), "--twin", rel(ckpt), "--smoothing", kind, "--sigma", f"{sigma:g}",
           "--n", str(n), "--samples", str(samples), "--attack-n", str(attack_n), *extra, "--out", rel(out)]
    s, rc, _ = run(cmd)
    if rc not in (0, 1):
        raise SystemExit(f"certify failed ({rc})")
    doc = json.loads((out / "certificate.json").read_text())
    return doc, {"command": " ".join(["otkit", *cmd[1:]]), "exit_status": rc, "seconds": round(s, 1)}


def sandwich(doc: dict[str, Any], points: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)) -> dict[str, Any]:
    """The certified and attack curves at fractions of r_max, and any grid point where attack < certified."""
    c, a = doc["certified"], doc["attack"]
    grid = np.array(c["radius_grid"])
    cert, att = np.array(c["accuracy"]), np.array(a["accuracy"])
    rows = []
    for f in points:
        k = int(np.argmin(np.abs(grid - f * c["r_max"])))
        rows.append({"radius": float(grid[k]), "certified": float(cert[k]), "attack": float(att[k])})
    below = [{"radius": float(g), "certified": float(ci), "attack": float(ai)}
             for g, ci, ai in zip(grid, cert, att) if ai < ci - 1e-12]
    ex = doc["examples"]
    pred, lab, rad = np.array(ex["prediction"]), np.array(ex["label"]), np.array(ex["radius"])
    return {"n_examples": len(lab), "r_max": c["r_max"], "ceiling": doc["smoothing"]["max_radius"],
            "certified_auac": c["auac"], "attack_auac": a["auac"], "smoothed_accuracy": c["smoothed_accuracy"],
            "abstain_rate": c["abstain_rate"], "mean_radius": c["mean_radius"],
            "certified_with_radius_gt_0": int((rad > 0).sum()),
            "certified_wrong_class": int(((pred >= 0) & (pred != lab)).sum()),
            "attack_radii": a["radii"], "curve": rows, "attack_below_certified": below,
            "flags": [f["id"] for f in doc["checks"]], "command_violations": a["violations"],
            "status": doc["status"]}


def load_examples(doc: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The certificate's examples again (fingerprint and labels checked)."""
    from kit.data import load_dataset

    d = doc["data"]
    ds = load_dataset(d["spec"], d["split"], seed=0).subset(d["n"], seed=d["seed"])
    if ds.fingerprint != d["fingerprint"] or ds.y.tolist() != doc["examples"]["label"]:
        raise SystemExit("the certificate's examples could not be drawn again")
    return ds.x, ds.y


def independent_attack(doc: dict[str, Any], onnx: Path, ckpt: Path, factors: list[float], *, m: int, steps: int,
                       predict_n: int, seed: int) -> dict[str, Any]:
    """Attack every example certified with R > 0 at f * R (soft smoothed twin), judged by the engine's PREDICT."""
    from evaluators.certify import SMOOTHED_ATTACK, SoftSmoothed
    from exporters.engines import load_engine
    from kit.attacks.registry import get_attack
    from kit.checkpoint import load_twin
    from kit.smoothing import example_generator, make_noise, predict

    sm = doc["smoothing"]
    kind, sigma, alpha = sm["kind"], sm["sigma"], sm["alpha"]
    noise = make_noise(kind, sigma)
    engine = load_engine(onnx, "cpu")
    twin = load_twin(ckpt)[0].eval()
    x, _ = load_examples(doc)
    ex = doc["examples"]
    cert = torch.tensor(ex["prediction"])
    radius = np.array(ex["radius"])
    sel = np.nonzero(radius > 0)[0]
    name = SMOOTHED_ATTACK[kind]
    labels = lambda b: engine(b).argmax(1)  # noqa: E731
    out: dict[str, Any] = {"attack": name, "target": "the certified class (untargeted, away from it)",
                           "soft_twin_m": m, "steps": steps, "predict_n": predict_n, "alpha": alpha, "seed": seed,
                           "examples": int(sel.size), "by_factor": []}
    total_violations: list[dict[str, Any]] = []
    for fi, f in enumerate(factors):
        t0 = time.perf_counter()
        xs, cs = x[sel], cert[sel]
        eps = torch.tensor(f * radius[sel], dtype=xs.dtype)
        gen = torch.Generator().manual_seed(10_000 * seed + fi)
        soft = SoftSmoothed(twin, noise, m, gen)
        attack = get_attack(name).build(soft, seed=seed, steps=steps, early_stop=False)
        res = attack(xs, cs, eps=eps)
        counts = {"judged": 0, "other_class": 0, "certified_class": 0, "abstain": 0}
        fooled_examples = 0
        max_ratio = 0.0  # largest candidate distance / R among the judged (L2: measured; Wasserstein: plan cost)
        mass_dev = 0.0
        viol = []
        for t, j in enumerate(sel.tolist()):
            cands = [("last", res.x_last[t])]
            if bool(res.success[t]) and not torch.equal(res.x_adv[t], res.x_last[t]):
                cands.append(("first-soft-fooled", res.x_adv[t]))
            hit = False
            for which, xc in cands:
                if noise.norm == "l2":
                    dist = float((xc - xs[t]).flatten().norm())
                else:  # a bound on the distance: the plan's cost (first fooled) or the projection's radius (last)
                    dist = float(res.norm[t]) if which != "last" else float(eps[t])
                    mass_dev = max(mass_dev, float(abs(xc.sum() - xs[t].sum()) / xs[t].sum()))
                max_ratio = max(max_ratio, dist / radius[j])
                g = example_generator(1000 + seed, (fi + 1) * 100_000 + 2 * j + (which != "last"))
                label, p = predict(labels, xc, noise, predict_n, alpha, 1000, g, engine.num_classes)
                counts["judged"] += 1
                if label < 0:
                    counts["abstain"] += 1
                elif label == int(cs[t]):
                    counts["certified_class"] += 1
                else:
                    counts["other_class"] += 1
                    hit = True
                    if dist < radius[j]:
                        viol.append({"index": j, "radius": float(radius[j]), "factor": f, "distance": dist,
                                     "certified_class": int(cs[t]), "predicted": int(label), "p_value": p,
                                     "candidate": which})
            fooled_examples += hit
        row = {"factor": f, "examples_fooled": fooled_examples, "candidates": counts,
               "soft_twin_fooled": int(res.success.sum()), "max_distance_over_radius": round(max_ratio, 6),
               "violations": len(viol), "seconds": round(time.perf_counter() - t0, 1)}
        if noise.norm != "l2":
            row["max_relative_mass_change"] = mass_dev
        out["by_factor"].append(row)
        total_violations += viol
        log(f"  {name} at {f:g} R: {fooled_examples}/{sel.size} examples fooled (PREDICT), {len(viol)} violations, "
            f"{row['seconds']} s")
    out["violations"] = total_violations
    out["violations_inside_radius"] = len(total_violations)
    return out


def probe_wasserstein(candidates: list[tuple[str, Path, float]], probe: int, offset: int, n: int, alpha: float,
                      seed: int) -> list[dict[str, Any]]:
    """Certify ``probe`` held-out test examples (after the first ``offset`` of the certificates' subset) per
    (model, sigma); the selection criterion is the mean certified radius (0 for abstain / wrong)."""
    from exporters.engines import load_engine
    from kit.data import load_dataset
    from kit.smoothing import certify, example_generator, make_noise

    ds = load_dataset(DATA, "test", seed=0).subset(offset + probe, seed=0)
    x, y = ds.x[offset:], ds.y[offset:]
    rows = []
    for tag, onnx, sigma in candidates:
        t0 = time.perf_counter()
        engine = load_engine(onnx, "cpu")
        noise = make_noise("wasserstein", sigma)
        labels = lambda b, e=engine: e(b).argmax(1)  # noqa: E731
        rad, correct, abstain = [], 0, 0
        for j in range(len(x)):
            c = certify(labels, x[j], noise, 100, n, alpha, 1000, example_generator(seed, offset + j), 10)
            abstain += c.prediction < 0
            ok = c.prediction == int(y[j])
            correct += ok
            rad.append(c.radius if ok else 0.0)
        rad_a = np.array(rad)
        ceiling = noise.max_radius(n, alpha)
        rows.append({"model": tag, "sigma": sigma, "correct": correct, "abstain": abstain, "examples": len(x),
                     "mean_radius": float(rad_a.mean()), "ceiling": ceiling,
                     "certified_auac": float(np.minimum(rad_a, ceiling).mean() / ceiling),
                     "seconds": round(time.perf_counter() - t0, 1)})
        log(f"  probe {tag} sigma {sigma:g}: {correct}/{len(x)} correct, {abstain} abstain, mean radius "
            f"{rad_a.mean():.4g} (ceiling {ceiling:.4g})")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--attack-n", type=int, default=1000)
    ap.add_argument("--factors", default="0.99,1.25,1.5,2,4")
    ap.add_argument("--m", type=int, default=16, help="noise draws of the soft smoothed twin per attack step")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--predict-n", type=int, default=1000)
    ap.add_argument("--flow-sigmas", default="0.004,0.008,0.016,0.032")
    ap.add_argument("--flow-lr", type=float, default=0.05, help="SGD peak lr of the flow-noise models")
    ap.add_argument("--probe", type=int, default=20)
    ap.add_argument("--w-samples", type=int, default=50)
    ap.add_argument("--w-factors", default="0.99,2,4,8,16,32")
    ap.add_argument("--g-wide", type=float, default=2.0, help="r-max of a second Gaussian certificate (0: none)")
    ap.add_argument("--w-wide", type=float, default=0.3, help="r-max of a second Wasserstein certificate (0: none)")
    ap.add_argument("--w-m", type=int, default=8)
    ap.add_argument("--w-steps", type=int, default=20)
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--skip", action="append", default=[], choices=["gaussian", "wasserstein"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from bench.common import cpu_model, emit, load_average

    CACHE.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    doc: dict[str, Any] = {"benchmark": "certified vs attacked on MNIST-10k (issue 19)", "data": DATA,
                           "machine": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "threads": 1,
                                       "torch": torch.__version__, "load_average_at_start": load_average()}}
    steps: dict[str, float] = {}

    ckpt_g, tr = train_gaussian(args.sigma, args.epochs, args.retrain)
    onnx_g, ex = export(ckpt_g, args.retrain)
    doc["gaussian_model"] = {"train": tr, "export": ex}
    steps["1_train_gaussian"] = tr.get("seconds", 0.0)
    steps["1_export_gaussian"] = ex.get("seconds", 0.0)

    if "gaussian" not in args.skip:
        log(f"== Gaussian certificate, sigma {args.sigma:g}, {args.samples} examples, n {args.n}")
        cdoc, cinfo = certify_cli(onnx_g, ckpt_g, "gaussian", args.sigma, args.samples, args.n, args.attack_n,
                                  CACHE / "cert-gaussian")
        steps["2_certify_gaussian"] = cinfo["seconds"]
        log("== independent pgd-l2 attack on the soft smoothed twin, judged by the engine's PREDICT")
        t0 = time.perf_counter()
        ind = independent_attack(cdoc, onnx_g, ckpt_g, [float(v) for v in args.factors.split(",")], m=args.m,
                                 steps=args.steps, predict_n=args.predict_n, seed=1)
        steps["3_independent_attack_gaussian"] = round(time.perf_counter() - t0, 1)
        doc["gaussian"] = {"certify": cinfo, "sandwich": sandwich(cdoc), "independent_attack": ind}
        if args.g_wide > 0:
            log(f"== Gaussian certificate again with --r-max {args.g_wide:g} (the attack ladder past the ceiling)")
            wdoc, winfo = certify_cli(onnx_g, ckpt_g, "gaussian", args.sigma, args.samples, args.n, args.attack_n,
                                      CACHE / "cert-gaussian-wide", ["--r-max", f"{args.g_wide:g}"])
            steps["2b_certify_gaussian_wide"] = winfo["seconds"]
            doc["gaussian"]["wide"] = {"certify": winfo, "sandwich": sandwich(wdoc, (0, 0.125, 0.25, 0.375, 0.5,
                                                                                      0.625, 0.75, 0.875, 1.0)),
                                       "same_counts": wdoc["examples"]["count"] == cdoc["examples"]["count"]}

    if "wasserstein" not in args.skip:
        log("== Wasserstein: flow-noise models and the sigma probe")
        cands: list[tuple[str, Path, Path, float]] = []
        trained = []
        t0 = time.perf_counter()
        for s in [float(v) for v in args.flow_sigmas.split(",")]:
            ck, tr = train_flow(s, args.epochs, args.flow_lr, args.retrain)
            ox, ex = export(ck, args.retrain)
            trained.append({"train": tr, "export": ex})
            cands.append((f"flow-noise {s:g}", ck, ox, s))
        steps["4_train_export_flow_models"] = round(time.perf_counter() - t0, 1)
        for s in [float(v) for v in args.flow_sigmas.split(",")]:
            cands.append((f"gaussian {args.sigma:g} (reused)", ckpt_g, onnx_g, s))
        t0 = time.perf_counter()
        offset = max(args.samples, args.w_samples)
        probe = probe_wasserstein([(t, o, s) for t, _, o, s in cands], args.probe, offset, args.n, 0.001, seed=0)
        steps["4_probe_sigma"] = round(time.perf_counter() - t0, 1)
        best = max(range(len(cands)), key=lambda k: probe[k]["mean_radius"])
        tag, ck, ox, s = cands[best]
        log(f"== Wasserstein certificate: {tag}, sigma {s:g}, {args.w_samples} examples")
        cdoc, cinfo = certify_cli(ox, ck, "wasserstein", s, args.w_samples, args.n, args.attack_n,
                                  CACHE / "cert-wasserstein")
        steps["4_certify_wasserstein"] = cinfo["seconds"]
        log("== independent wasserstein-pgd attack on the soft smoothed twin, judged by the engine's PREDICT")
        t0 = time.perf_counter()
        ind = independent_attack(cdoc, ox, ck, [float(v) for v in args.w_factors.split(",")], m=args.w_m,
                                 steps=args.w_steps, predict_n=args.predict_n, seed=1)
        steps["4_independent_attack_wasserstein"] = round(time.perf_counter() - t0, 1)
        doc["wasserstein"] = {"models": trained, "probe": {"examples": f"test subset (seed 0) positions "
                                                           f"{offset}..{offset + args.probe - 1}", "n": args.n,
                                                           "criterion": "largest mean certified radius",
                                                           "rows": probe, "chosen": probe[best]},
                              "certify": cinfo, "sandwich": sandwich(cdoc), "independent_attack": ind}
        if args.w_wide > 0:
            log(f"== Wasserstein certificate again with --r-max {args.w_wide:g} (the attack ladder past the ceiling)")
            wdoc, winfo = certify_cli(ox, ck, "wasserstein", s, args.w_samples, args.n, args.attack_n,
                                      CACHE / "cert-wasserstein-wide", ["--r-max", f"{args.w_wide:g}"])
            steps["4b_certify_wasserstein_wide"] = winfo["seconds"]
            doc["wasserstein"]["wide"] = {"certify": winfo, "sandwich": sandwich(wdoc, (0, 0.125, 0.25, 0.375, 0.5,
                                                                                          0.625, 0.75, 0.875, 1.0)),
                                          "same_counts": wdoc["examples"]["count"] == cdoc["examples"]["count"]}

    doc["seconds"] = {**steps, "total_this_run": round(time.perf_counter() - t_start, 1)}
    doc["machine"]["load_average_at_end"] = load_average()
    emit(doc, args.json)


if __name__ == "__main__":
    main()
