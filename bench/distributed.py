"""One audit and one certificate with 1 and with N processes (``torchrun``, gloo), wall time, same machine (issue 21).

Runs, alternating, the same ``otkit audit`` and ``otkit certify`` command:

* ``1x1``: one process, one thread (``OMP_NUM_THREADS=1``): the reference whose report the N-process run must equal;
* ``1xN``: one process, N threads: what a user of one process gets from the same cores;
* ``Nx1``: ``torchrun --standalone --nproc-per-node N``, one thread each.

Reported: wall seconds (median of ``--repeat``), the speed-ups ``1x1 / Nx1`` and ``1xN / Nx1``, and whether the
N-process report equals the one-thread one (provenance aside). On a machine with fewer than N free cores the processes
contend; the ratio says so honestly. Model: the cnn-small of ``bench/common.py`` on digits:16 (cached), its fp32
ONNX export; or ``--model resnet20`` (the CIFAR-shaped one of ``bench/audit.py``).

Run::

    python bench/distributed.py [--nproc 2] [--samples 120] [--repeat 1] [--model cnn-small|resnet20]

Prints one JSON document on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def files(model: str) -> dict[str, str]:
    if model == "resnet20":
        from bench.audit import prepare

        f = prepare("resnet20")
        return {**f, "eps": str(8 / 255 * 4), "sigma": "0.25"}
    from bench.common import CACHE, digits_model
    from exporters.checkpoint import export_checkpoint

    digits_model("standard", 10)
    twin = CACHE / "cnn-small-digits16-standard-10.safetensors"
    engine = ROOT / "bench" / ".cache" / "distributed-cnn-small.onnx"
    if not engine.exists():
        export_checkpoint(twin, "onnx", engine)
    return {"twin": str(twin), "engine": str(engine), "data": "digits:16", "eps": "0.3", "sigma": "0.25"}


def command(kind: str, f: dict[str, str], samples: int, out: Path) -> list[str]:
    if kind == "audit":
        return ["audit", "--engine", f["engine"], "--twin", f["twin"], "--data", f["data"], "--attack",
                f"pgd-linf@{f['eps']}", "--samples", str(samples), "--batch-size", "16", "--seed", "0",
                "--allow-flag", "test-blind", "--out", str(out)]
    return ["certify", "--engine", f["engine"], "--data", f["data"], "--sigma", f["sigma"], "--noise-samples",
            "2000", "--samples", str(max(samples // 4, 4)), "--batch-size", "2", "--seed", "0", "--out", str(out)]


def timed(nproc: int | None, threads: int, args: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                if nproc else [sys.executable])
    t0 = time.perf_counter()
    res = subprocess.run([*launcher, "-m", "kit", "-q", *args], env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if res.returncode not in (0, 1):
        raise SystemExit(f"failed: {' '.join(args)}\n{res.stderr[-3000:]}")
    return wall


def report(out: Path) -> dict:
    name = "report.json" if (out / "report.json").exists() else "certificate.json"
    doc = json.loads((out / name).read_text())
    doc.pop("provenance")
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--samples", type=int, default=120)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--model", choices=["cnn-small", "resnet20"], default="cnn-small")
    args = ap.parse_args()
    f = files(args.model)
    n = args.nproc
    result: dict = {"model": args.model, "nproc": n, "samples": args.samples, "cpus": os.cpu_count(),
                    "load_before": os.getloadavg(), "runs": {}}
    for kind in ("audit", "certify"):
        walls: dict[str, list[float]] = {"1x1": [], f"1x{n}": [], f"{n}x1": []}
        same = True
        with tempfile.TemporaryDirectory() as d:
            for r in range(args.repeat):
                outs = {}
                for label, (nproc, threads) in (("1x1", (None, 1)), (f"1x{n}", (None, n)), (f"{n}x1", (n, 1))):
                    out = Path(d) / f"{kind}-{label}-{r}"
                    walls[label].append(timed(nproc, threads, command(kind, f, args.samples, out)))
                    outs[label] = out
                    log(f"{kind} {label}: {walls[label][-1]:.1f} s")
                same &= report(outs["1x1"]) == report(outs[f"{n}x1"])
        med = {k: statistics.median(v) for k, v in walls.items()}
        result["runs"][kind] = {"wall_s": {k: round(v, 2) for k, v in med.items()},
                                "speedup_vs_1x1": round(med["1x1"] / med[f"{n}x1"], 3),
                                f"speedup_vs_1x{n}": round(med[f"1x{n}"] / med[f"{n}x1"], 3),
                                "report_equals_one_process": same}
    result["load_after"] = os.getloadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
