"""The engine-only attack's cost and yield (issue 18): one audit of an int8 engine with and without it.

Trains (or reuses, bench/.cache) the demo's kind of model, a cnn-small on digits:16, exports it to int8 ONNX, and audits
it twice with the same attacks, examples and seed: ``--no-engine-only`` and ``--engine-only``. Prints one JSON document:
both wall times, the extra cost as a fraction of the audit without it, and per threat model the engine-only adversarials
found within eps_max by the differential attack and by the twin-guided search, with the worst-case AUACs.

Run::

    python bench/engine_only.py [--samples 200] [--defense standard] [--epochs 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--defense", default="standard")
    ap.add_argument("--epochs", type=int, default=10)
    a = ap.parse_args()
    from click.testing import CliRunner

    from bench.common import CACHE
    from kit.cli import cli
    from kit.defenses.trainer import TrainConfig, train

    CACHE.mkdir(exist_ok=True)
    ckpt = CACHE / f"engine-only-{a.defense}-{a.epochs}.safetensors"
    if not ckpt.exists():
        train(TrainConfig(defense=a.defense, arch="cnn-small", data="digits:16", epochs=a.epochs), ckpt)
    engine = CACHE / f"engine-only-{a.defense}-{a.epochs}.int8.onnx"
    runner = CliRunner()
    if not engine.exists():
        r = runner.invoke(cli, ["-q", "export", str(ckpt), "--format", "onnx-int8", "--out", str(engine)])
        assert r.exit_code == 0, r.output
    runs = {}
    for flag in ("--no-engine-only", "--engine-only"):
        out = CACHE / f"engine-only-audit{flag}"
        t0 = time.perf_counter()
        r = runner.invoke(cli, ["-q", "audit", "--engine", str(engine), "--twin", str(ckpt), "--attack", "pgd-linf@0.3",
                                "--attack", "pgd-l2@2", "--samples", str(a.samples), flag, "--out", str(out), "--json"])
        seconds = time.perf_counter() - t0
        doc = json.loads(r.stdout)
        runs[flag] = {"seconds": seconds, "status": doc["status"], "replica": doc.get("replica"),
                      "worst_case": {w["norm"]: {
                          "eps_max": w["eps_max"], "engine_auac": w["engine"]["auac"],
                          "engine_only_differential": w["engine_only"]["count"][-1] if w.get("engine_only") else None,
                          "engine_only_twin_guided": w["engine_only"]["twin_guided_count"][-1]
                          if w.get("engine_only") else None} for w in doc["worst_case"]}}
    base, full = runs["--no-engine-only"]["seconds"], runs["--engine-only"]["seconds"]
    print(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "samples": a.samples, "engine": engine.name,
                      "extra_cost_fraction": (full - base) / base, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
