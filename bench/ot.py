"""Optimal-transport benchmarks of issue 4, in one run and one JSON document (figures go to docs/BENCHMARKS.md).

- Projected Sinkhorn (``bench/ot_projection.py``): batch 32 at 1x28x28 and 3x32x32, 5x5 local plans, with 1 and with
  2 CPU threads: seconds per iteration, iterations and wall seconds to a converged projection (cold, and warm from
  the previous step's duals as in PGD), with our defaults, at the paper's settings (the published problem) and at
  the attack's (``reg=100``), next to the published projection (11 ms x 32 iterations = 0.35 s at 1x28x28,
  59 ms x 28 = 1.65 s at 3x32x32, one core); budget use (exact cost of the output / eps, POT's exact LP) on a few
  examples. With CUDA, the same at batch 32 on the GPU and batch 100 at 3x32x32 (the paper: about 0.02 s per
  iteration on a Titan X).
- Sinkhorn divergence (``bench/ot_sinkhorn.py``): 128 vs 128 points in 10-D, 50 iterations, forward + backward,
  against POT's ``solve_sample`` on the same input (ratio), with 1 and with 2 threads.

The document records the device, the CPU model, torch's version and the load average before and after each part
(the figures of a shared machine are only as good as its load). Every timing is a median of several runs.

Run: ``python bench/ot.py [--quick] [--json out.json] [--no-exact] [--sizes 1x28x28,3x32x32]``. Progress goes to
stderr, the JSON document to stdout.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

# Run as a script, this file's folder comes first on sys.path, and this file would shadow POT (``import ot``).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from bench import ot_projection, ot_sinkhorn  # noqa: E402
from bench.common import cpu_model, device_description, emit, load_average  # noqa: E402


def _log(message: str) -> None:
    print(f"[bench/ot {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(quick: bool = False, exact: bool = True, sizes: tuple[str, ...] = ("1x28x28", "3x32x32"),
        repeat: int = 5) -> dict:
    """Both benchmarks; the JSON-ready document described in the module docstring."""
    cuda = torch.cuda.is_available()
    doc: dict = {
        "device": device_description(torch.device("cuda")) if cuda else "cpu",
        "cpu": cpu_model(), "logical_cpus": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "quick": quick, "load_start": load_average(),
    }
    t0 = time.perf_counter()
    _log("projected Sinkhorn on the CPU")
    doc["projection_cpu"] = ot_projection.run(sizes, batch=32, device=torch.device("cpu"), quick=quick, exact=exact,
                                              repeat=repeat, log=_log)
    if cuda:
        gpu = torch.device("cuda")
        _log("projected Sinkhorn on the GPU")
        doc["projection_gpu"] = ot_projection.run(sizes, batch=32, device=gpu, quick=quick, exact=False,
                                                  repeat=repeat, log=_log)
        doc["projection_gpu_batch100"] = ot_projection.run(("3x32x32",), batch=100, device=gpu, quick=quick,
                                                           exact=False, repeat=repeat, log=_log)
    doc["sinkhorn_divergence"] = {}
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            _log(f"Sinkhorn divergence, {threads} thread(s)")
            doc["sinkhorn_divergence"][f"cpu_threads_{threads}"] = ot_sinkhorn.run(
                device=torch.device("cpu"), repeat=3 if quick else repeat)
        finally:
            torch.set_num_threads(old)
    if cuda:
        doc["sinkhorn_divergence"]["gpu"] = ot_sinkhorn.run(device=torch.device("cuda"), repeat=repeat)
    doc["load_end"] = load_average()
    doc["wall_seconds"] = round(time.perf_counter() - t0, 1)
    doc["summary"] = _summary(doc)
    return doc


def _summary(doc: dict) -> dict:
    """The headline ratios: published projection total / ours (cold and warm; ours with its defaults and at the
    paper's settings), per iteration, and POT / ours."""
    out: dict = {}
    for name, row in doc["projection_cpu"].items():
        for key in ("threads_1", "threads_2"):
            if key not in row:
                continue
            e = row[key]
            item = {"ours_ms_per_iteration": round(e["seconds_per_iteration"]["median_s"] * 1e3, 2),
                    "ours_ms_per_iteration_cpu_time": round(e["seconds_per_iteration"]["cpu_median_s"] * 1e3, 2),
                    "ours_cold_ms": round(e["converge"]["step_cold"]["seconds"] * 1e3, 1),
                    "ours_cold_ms_cpu_time": round(e["converge"]["step_cold"]["cpu_seconds"] * 1e3, 1),
                    "ours_warm_ms_cpu_time": round(e["converge"]["step_warm"]["cpu_seconds"] * 1e3, 1),
                    "ours_cold_iterations_mean_max": [e["converge"]["step_cold"]["iterations_mean"],
                                                      e["converge"]["step_cold"]["iterations_max"]],
                    "ours_warm_ms": round(e["converge"]["step_warm"]["seconds"] * 1e3, 1),
                    "ours_warm_iterations_mean_max": [e["converge"]["step_warm"]["iterations_mean"],
                                                      e["converge"]["step_warm"]["iterations_max"]]}
            if "published" in row:
                item["published_total_ms"] = round(row["published"]["total_seconds"] * 1e3, 1)
                for k in (f"{kind}{setting}{clock}" for setting in ("", "_paper_settings", "_attack_settings")
                          for kind in ("cold", "warm") for clock in ("", "_cpu_time")):
                    if f"published_total_over_ours_{k}" in e:
                        item[f"published_over_ours_{k}"] = round(e[f"published_total_over_ours_{k}"], 2)
            out[f"projection_{name}_{key}"] = item
    for key, rep in doc["sinkhorn_divergence"].items():
        out[f"sinkhorn_divergence_{key}"] = {f"{v}_pot_over_ours": round(rep[v]["pot_over_ours"], 2)
                                             for v in ("entropic", "transport")}
        out[f"sinkhorn_divergence_{key}"].update({f"{v}_pot_over_ours_cpu_time": round(rep[v]["pot_over_ours_cpu"], 2)
                                                  for v in ("entropic", "transport")})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer timing runs, one exact LP per size")
    ap.add_argument("--no-exact", action="store_true", help="skip the exact LPs (budget use)")
    ap.add_argument("--sizes", default="1x28x28,3x32x32", help="comma-separated CxHxW for the projection")
    ap.add_argument("--repeat", type=int, default=5, help="timing runs per figure (median)")
    ap.add_argument("--json", type=Path, help="also write the document here (atomically)")
    args = ap.parse_args()
    doc = run(quick=args.quick, exact=not args.no_exact, sizes=tuple(args.sizes.split(",")), repeat=args.repeat)
    emit(doc, args.json)


if __name__ == "__main__":
    main()
