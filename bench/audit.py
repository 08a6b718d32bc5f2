"""The cost of an audit, old against new in one run (issue 20): wall and CPU seconds of ``otkit audit``, the twin's
passes per example, and every example's eps* compared.

Two builds of the kit run the same command on the same files, alternating, in one session:

* **new**: this checkout;
* **old**: a git worktree of ``--old`` (default ``HEAD~1``... give the commit before the change you measure), made
  under ``bench/.cache/audit/old-<sha>`` and run with its own ``kit`` first on ``sys.path`` (same venv).

Models (cached under ``bench/.cache/audit``):

* ``cnn-small`` on the embedded digits (1x16x16), 10 epochs, fp32 ONNX engine;
* ``mnist``: a cnn-small on the real MNIST digits of ``../shared/data/mnist-10k`` (1x28x28), 3 epochs, fp32 ONNX
  engine (skipped with a message where the data is absent);
* ``resnet20`` on CIFAR-shaped images (3x32x32): the embedded digits' 8x8 images upsampled to 32x32 (bilinear) and
  repeated on three channels, written as an ``npz`` dataset; trained 4 epochs, fp32 ONNX engine. CIFAR itself is not
  on this machine; the network and the image size are CIFAR's, which is what the cost depends on.

For each model and each ``--samples`` size, both builds run
``otkit audit --engine E --twin T --data D --attack pgd-linf@EPS --samples N --seed 0 --allow-flag test-blind``
(defaults otherwise: black box on 100 examples, engine-only search). Reported per run: wall seconds, CPU seconds
(user + system of the child), the report's twin forward / backward passes per example, and per example whether the
new eps* (twin and engine side) is equal, smaller or larger than the old, for the attack and for the threat
model's worst case (where the black box's radii join). Start-up is measured apart: ``otkit audit
--help`` (wall, CPU) for each build.

Run::

    python bench/audit.py --old <commit> [--models cnn-small,mnist,resnet20] [--samples 50,100,200,400] [--repeat 1]

Prints one JSON document on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = ROOT / "bench" / ".cache" / "audit"
EPS = {"cnn-small": 0.3, "mnist": 0.3, "resnet20": 8 / 255 * 4}
MNIST = ROOT.parent / "shared" / "data" / "mnist-10k"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cifar_shaped_npz(path: Path) -> Path:
    """The embedded digits as 3x32x32 uint8 images (bilinear upsampling, three equal channels) and their labels."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from kit.data import load_dataset

    if path.exists():
        return path
    xs, ys = [], []
    for split in ("train", "test"):
        d = load_dataset("digits", split)
        xs.append(d.x)
        ys.append(d.y)
    x = torch.cat(xs)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)
    np.savez(path, x=(x * 255).round().to(torch.uint8).numpy(), y=torch.cat(ys).numpy().astype(np.int64))
    return path


def prepare(model: str) -> dict[str, str]:
    """Twin, fp32 ONNX engine and data spec of ``model`` (trained once, cached)."""
    from exporters.checkpoint import export_checkpoint
    from kit.defenses.trainer import TrainConfig, train

    CACHE.mkdir(parents=True, exist_ok=True)
    if model == "cnn-small":
        from bench.common import CACHE as COMMON
        from bench.common import digits_model

        digits_model("standard", 10)
        twin = COMMON / "cnn-small-digits16-standard-10.safetensors"
        data = "digits:16"
    elif model == "mnist":
        twin = ROOT / "bench" / ".cache" / "cnn-small-mnist-mnist-10k-standard-3.safetensors"
        data = f"mnist:{MNIST}"
        if not MNIST.exists():
            raise SystemExit(f"{MNIST} is absent: the mnist model needs the real MNIST digits (../shared/data)")
        if not twin.exists():
            log("training cnn-small on MNIST-10k (once)")
            train(TrainConfig(defense="standard", arch="cnn-small", data=data, epochs=3, seed=0), twin)
    else:
        npz = cifar_shaped_npz(CACHE / "digits-3x32x32.npz")
        twin = CACHE / "resnet20-digits32.safetensors"
        data = f"npz:{npz}"
        if not twin.exists():
            log("training resnet20 on CIFAR-shaped digits (once)")
            train(TrainConfig(defense="standard", arch="resnet20", data=data, epochs=4, seed=0), twin)
    engine = CACHE / f"{model}.onnx"
    if not engine.exists():
        export_checkpoint(twin, "onnx", engine)
    return {"twin": str(twin), "engine": str(engine), "data": data}


def worktree(commit: str) -> Path:
    sha = subprocess.run(["git", "rev-parse", commit], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    path = CACHE / f"old-{sha[:12]}"
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=ROOT, check=True,
                       capture_output=True)
    return path


def run_kit(tree: Path, args: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """``python -m kit ARGS`` with ``tree``'s kit first on the path: (wall s, child CPU s, the process)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kit", *args], cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc


def compare(old: list, new: list) -> dict[str, int]:
    """Per example: new eps* equal to, smaller or larger than the old (None = not fooled up to eps_max)."""
    inf = float("inf")
    out = {"equal": 0, "smaller": 0, "larger": 0}
    for a, b in zip(old, new, strict=True):
        a, b = inf if a is None else a, inf if b is None else b
        out["equal" if abs(a - b) <= 1e-12 or a == b else ("smaller" if b < a else "larger")] += 1
    return out


def audit_once(tree: Path, files: dict[str, str], eps: float, samples: int, out: Path) -> dict:
    args = ["audit", "--engine", files["engine"], "--twin", files["twin"], "--data", files["data"],
            "--attack", f"pgd-linf@{eps:g}", "--samples", str(samples), "--seed", "0", "--allow-flag", "test-blind",
            "--out", str(out)]
    wall, cpu, proc = run_kit(tree, args)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"audit failed in {tree}:\n{proc.stderr[-3000:]}")
    report = json.loads(next(out.rglob("report.json")).read_text())
    att = report["attacks"][0]
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "passes": att["passes"],
            "eps_twin": att["twin"]["eps_star"], "eps_engine": att["engine"]["eps_star"],
            "worst_twin": report["worst_case"][0]["twin"]["eps_star"],
            "worst_engine": report["worst_case"][0]["engine"]["eps_star"],
            "worst_auac_engine": report["worst_case"][0]["engine"]["auac"],
            "blackbox_flags": sum(c["id"] == "black-box-beats-white-box" for c in report["checks"]),
            "auac_twin": att["twin"]["auac"], "auac_engine": att["engine"]["auac"], "status": report["status"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, help="commit of the old build (e.g. the one before the change)")
    ap.add_argument("--models", default="cnn-small,resnet20")
    ap.add_argument("--samples", default="50,100,200,400")
    ap.add_argument("--repeat", type=int, default=1, help="runs per build and size (the fastest is kept)")
    args = ap.parse_args()
    old_tree, new_tree = worktree(args.old), ROOT
    result: dict = {"old": args.old, "new": "working tree", "load_before": os.getloadavg(), "startup": {},
                    "audits": []}
    for name, tree in (("old", old_tree), ("new", new_tree)):
        best = min((run_kit(tree, ["audit", "--help"])[:2] for _ in range(3)), key=lambda t: t[0])
        result["startup"][name] = {"help_wall_s": round(best[0], 3), "help_cpu_s": round(best[1], 3)}
    log(f"start-up (audit --help): {result['startup']}")
    for model in args.models.split(","):
        files = prepare(model)
        for n in (int(s) for s in args.samples.split(",")):
            row: dict = {"model": model, "samples": n}
            for build, tree in (("old", old_tree), ("new", new_tree)):
                runs = []
                for _ in range(args.repeat):
                    with tempfile.TemporaryDirectory() as d:
                        runs.append(audit_once(tree, files, EPS[model], n, Path(d)))
                row[build] = min(runs, key=lambda r: r["wall_s"])
            o, w = row["old"], row["new"]
            row["wall_ratio"] = round(w["wall_s"] / o["wall_s"], 3)
            row["cpu_ratio"] = round(w["cpu_s"] / o["cpu_s"], 3)
            row["backward_ratio"] = round(w["passes"]["backward_per_example"]
                                          / max(o["passes"]["backward_per_example"], 1e-9), 3)
            row["forward_ratio"] = round(w["passes"]["forward_per_example"]
                                         / max(o["passes"]["forward_per_example"], 1e-9), 3)
            row["eps_twin"] = compare(o.pop("eps_twin"), w.pop("eps_twin"))
            row["eps_engine"] = compare(o.pop("eps_engine"), w.pop("eps_engine"))
            # the worst case: the black box's radii join the twin-guided ones there
            row["worst_twin"] = compare(o.pop("worst_twin"), w.pop("worst_twin"))
            row["worst_engine"] = compare(o.pop("worst_engine"), w.pop("worst_engine"))
            log(f"{model} n={n}: wall {o['wall_s']} -> {w['wall_s']} s ({row['wall_ratio']}x), CPU {o['cpu_s']} -> "
                f"{w['cpu_s']} s ({row['cpu_ratio']}x), backward/example "
                f"{o['passes']['backward_per_example']:.1f} -> {w['passes']['backward_per_example']:.1f}, "
                f"eps* twin {row['eps_twin']}, engine {row['eps_engine']}; worst case twin {row['worst_twin']}, "
                f"engine {row['worst_engine']}")
            result["audits"].append(row)
    result["load_after"] = os.getloadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
