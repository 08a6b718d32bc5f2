"""Engine benchmarks: per-call time of every runner against the bare backend call it wraps (target <= 1.05).

For each model (random weights: speed does not depend on training; cnn-small at the ``digits:16`` size 1x16x16, fed
real digits test images, resnet20 at 3x32x32 on uniform noise) the twin is exported once to fp32, fp16 and int8 ONNX,
and every runner available here is timed on the same batches (1, 16, 128):

* ``OnnxRuntimeEngine`` at fp32 / fp16 / int8 on the CPU provider, against its own session called bare, two ways:
  ``bare_ort_numpy`` is ``session.run(None, {name: x.numpy()})``, the bare call of a caller holding a torch tensor
  (the reference of the issue's target), and ``bare_ort`` is ``session.run([out], {name: array})`` on a numpy array
  prepared once, a stricter lower bound that touches no torch at all;
* ``TorchEngine`` (the twin) against ``model(x)`` inside an already-entered ``torch.no_grad()``;
* on a CUDA machine also the twin on CUDA, ``OnnxRuntimeEngine`` on CUDA (IO binding; needs onnxruntime-gpu) against a
  prepared IO binding of the same session, and ``TensorRTEngine`` (needs TensorRT) against a second execution context
  of the same engine with its addresses set once. Without a GPU these are skipped and the JSON says why.

Timing: the runner and its baselines are called in alternation, one call each per round (A B C, then C B A, so none
always runs first), with the garbage collector off; each call is timed alone with ``time.perf_counter`` (plus a CUDA
synchronisation on the GPU). A point runs at least ``--min-calls`` rounds at batch 1 (default 400) and 30 at larger
batches, then continues until its time budget (``--budget`` seconds) is spent. Reported per point and baseline: the
median time per call of each side with its interquartile range, the ratio of the medians (runner / bare, the figure
compared with the target), the quartiles of the per-round ratios (the spread a single call shows), a bootstrap 95 %
interval of the ratio of medians (its uncertainty), and the time the runner adds (median of the per-round differences,
with its interval). The 1-minute load average (``os.getloadavg``, what ``uptime`` shows) is recorded at every point,
with the CPU model, thread counts, nice value and versions.

Run: ``python bench/engines.py [--quick] [--models cnn-small,resnet20] [--budget S] [--json FILE]``; prints JSON
(``--json`` also writes it, atomically) and one line per point on stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from bench.common import cpu_model  # noqa: E402
from exporters.engines import Engine, TorchEngine  # noqa: E402
from exporters.onnx import OnnxRuntimeEngine, torch_to_onnx, write_onnx_export  # noqa: E402
from kit.io import atomic_write  # noqa: E402

TARGET = 1.05
#: Models benchmarked and their input shapes (cnn-small at the digits:16 size; resnet18 on a GPU only by default).
SHAPES: dict[str, tuple[int, int, int]] = {"cnn-small": (1, 16, 16), "resnet20": (3, 32, 32), "resnet18": (3, 32, 32)}
Call = Callable[[], object]


@dataclass
class Runner:
    """A runner under test and the bare calls it is compared with, per batch."""

    label: str
    engine: Engine
    baselines: Callable[[torch.Tensor], dict[str, Call]]  # batch on the engine's device -> named bare calls


# ------------------------------------------------------------------------------------------------------- timing
def interleaved(fns: dict[str, Call], *, min_rounds: int, budget_s: float, max_rounds: int = 20_000,
                sync: Callable[[], None] | None = None, warmup: int = 5) -> dict[str, np.ndarray]:
    """Seconds per call of each of ``fns``, called in alternation.

    Each round calls every function once, timed alone; the order reverses every other round. Rounds continue until
    ``min_rounds`` are done and ``budget_s`` seconds have passed (or ``max_rounds``). The garbage collector is off
    while timing, so a collection lands on neither side.

    Returns
    -------
    dict of str to numpy.ndarray
        Per-call seconds of each function, one entry per round, rounds aligned across functions.
    """
    names = list(fns)
    for name in names:  # at least 2 warm-up calls each, up to ``warmup`` within 0.5 s
        stop, k = time.perf_counter() + 0.5, 0
        while k < 2 or (k < warmup and time.perf_counter() < stop):
            fns[name]()
            k += 1
    if sync is not None:
        sync()
    times: dict[str, list[float]] = {k: [] for k in names}
    forward, backward = names, names[::-1]
    clock = time.perf_counter
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        end = clock() + budget_s
        rounds = 0
        while rounds < max_rounds and (rounds < min_rounds or clock() < end):
            for name in forward if rounds % 2 == 0 else backward:
                fn = fns[name]
                if sync is None:
                    t0 = clock()
                    fn()
                    t1 = clock()
                else:
                    t0 = clock()
                    fn()
                    sync()
                    t1 = clock()
                times[name].append(t1 - t0)
            rounds += 1
    finally:
        if enabled:
            gc.enable()
    return {k: np.asarray(v) for k, v in times.items()}


def compare(ours: np.ndarray, bare: np.ndarray, seed: int = 0, resamples: int = 1000) -> dict[str, Any]:
    """The runner against one bare call, from per-round times (seconds) of both.

    Returns the bare call's median and interquartile range, the ratio of medians ``median(ours) / median(bare)``
    (the figure compared with the target), the quartiles of the per-round ratios ``ours_i / bare_i`` (the spread one
    call shows), a bootstrap 95 % interval of the ratio of medians (its uncertainty; rounds are resampled as pairs),
    and the time the runner adds, as the median of the per-round differences ``ours_i - bare_i`` with its bootstrap
    interval (robust to load that changes between rounds).
    """
    ratio = float(np.median(ours) / np.median(bare))
    diff = ours - bare
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ours), size=(resamples, len(ours)))  # resample rounds (pairs stay together)
    boot = np.median(ours[idx], axis=1) / np.median(bare[idx], axis=1)
    boot_diff = np.median(diff[idx], axis=1)
    return {"median_us": _us(np.median(bare)), "iqr_us": [_us(q) for q in np.percentile(bare, [25, 75])],
            "ratio": round(ratio, 3),
            "ratio_round_iqr": [round(float(q), 3) for q in np.percentile(ours / bare, [25, 75])],
            "ratio_ci95": [round(float(q), 3) for q in np.percentile(boot, [2.5, 97.5])],
            "added_us": _us(np.median(diff)), "added_us_ci95": [_us(q) for q in np.percentile(boot_diff, [2.5, 97.5])],
            "meets_target": ratio <= TARGET}


def _us(seconds: float) -> float:
    return round(float(seconds) * 1e6, 1)


# ------------------------------------------------------------------------------------------------------ runners
def ort_baselines(engine: OnnxRuntimeEngine) -> Callable[[torch.Tensor], dict[str, Call]]:
    """Bare calls of the engine's own session (one session: two thread pools would compete while they alternate)."""
    sess = engine.session
    name, out = engine.io_names
    outputs = [out]

    def make(x: torch.Tensor) -> dict[str, Call]:
        if engine.device.type == "cpu":
            arr = x.numpy()
            return {"bare_ort": lambda: sess.run(outputs, {name: arr}),
                    "bare_ort_numpy": lambda: sess.run(None, {name: x.numpy()})}
        xin = x.contiguous()
        y = torch.empty(len(x), engine.num_classes, device=engine.device)
        binding = sess.io_binding()
        index = engine.device.index or 0
        binding.bind_input(name, "cuda", index, np.float32, tuple(xin.shape), xin.data_ptr())
        binding.bind_output(out, "cuda", index, np.float32, tuple(y.shape), y.data_ptr())
        return {"bare_ort_iobinding": lambda: sess.run_with_iobinding(binding)}

    return make


def torch_baselines(engine: TorchEngine) -> Callable[[torch.Tensor], dict[str, Call]]:
    """The bare module on the same batch (the caller has entered ``torch.no_grad``)."""
    model = engine.model
    return lambda x: {"bare_torch": lambda: model(x)}


def tensorrt_baselines(engine: Any) -> Callable[[torch.Tensor], dict[str, Call]]:
    """A second execution context of the same engine, shape and addresses set once: ``execute_async_v3`` alone."""
    context = engine._engine.create_execution_context()

    def make(x: torch.Tensor) -> dict[str, Call]:
        xin = x.to(engine.device, engine._in_dtype).contiguous()
        y = torch.empty(len(x), engine.num_classes, dtype=engine._out_dtype, device=engine.device)
        context.set_input_shape(engine._in, tuple(xin.shape))
        context.set_tensor_address(engine._in, xin.data_ptr())
        context.set_tensor_address(engine._out, y.data_ptr())
        stream = torch.cuda.current_stream(engine.device).cuda_stream
        return {"bare_tensorrt": lambda: (xin, y, context.execute_async_v3(stream))}  # keeps the buffers alive

    return make


def build_runners(arch: str, shape: tuple[int, int, int], folder: Path, cuda: bool,
                  notes: dict[str, str]) -> tuple[list[Runner], Callable[[int], torch.Tensor]]:
    """Every runner available here for ``arch``, and a function giving a batch of n inputs in [0, 1]."""
    torch.manual_seed(0)
    model = models.create(arch, 10, shape).eval()
    if shape == (1, 16, 16):
        from kit.data import load_dataset

        pool = load_dataset("digits:16", "test").x
    else:
        pool = torch.rand(256, *shape, generator=torch.Generator().manual_seed(0))

    def batch(n: int) -> torch.Tensor:
        return pool[torch.arange(n) % len(pool)].contiguous()

    x = batch(64)
    graph = torch_to_onnx(model, shape)
    files = {p: write_onnx_export(graph, folder / f"{arch}-{p}.onnx", model, x, precision=p,
                                  calibration_x=x if p == "int8" else None).path for p in ("fp32", "fp16", "int8")}
    out = []
    for p, path in files.items():
        engine = OnnxRuntimeEngine(path)
        out.append(Runner(f"onnx {p}", engine, ort_baselines(engine)))
    twin = TorchEngine(model, shape, 10, "-", name=arch)
    out.append(Runner("torch twin", twin, torch_baselines(twin)))
    if not cuda:
        return out, batch
    import onnxruntime as ort

    gpu_model = models.create(arch, 10, shape).eval().cuda()
    gpu_model.load_state_dict(model.state_dict())
    twin_gpu = TorchEngine(gpu_model, shape, 10, "-", name=arch)
    out.append(Runner("torch twin cuda", twin_gpu, torch_baselines(twin_gpu)))
    if "CUDAExecutionProvider" in ort.get_available_providers():
        for p in ("fp32", "fp16"):
            engine = OnnxRuntimeEngine(files[p], device="cuda")
            out.append(Runner(f"onnx {p} cuda", engine, ort_baselines(engine)))
    else:
        notes["onnxruntime_cuda"] = "skipped: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    from exporters.checkpoint import export_tensorrt
    from exporters.tensorrt import TensorRTEngine, tensorrt_version

    if tensorrt_version() is None:
        notes["tensorrt"] = "skipped: TensorRT is not installed"
        return out, batch
    for p in ("fp32", "fp16"):
        res = export_tensorrt(gpu_model, folder / f"{arch}-{p}.engine", x.cuda(), precision=p, device="cuda",
                              max_batch=128)
        trt_engine = TensorRTEngine(res.path, "cuda")
        out.append(Runner(f"tensorrt {p}", trt_engine, tensorrt_baselines(trt_engine)))
    return out, batch


# --------------------------------------------------------------------------------------------------------- main
def _call(engine: Engine, x: torch.Tensor) -> Call:
    """``engine(x)`` as a lambda, like the bare calls (the same Python call overhead on both sides)."""
    return lambda: engine(x)


def bench(arch: str, shape: tuple[int, int, int], batches: list[int], cuda: bool, args: argparse.Namespace,
          notes: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="otkit-bench-") as tmp:
        runners, batch = build_runners(arch, shape, Path(tmp), cuda, notes)
        for runner in runners:
            engine = runner.engine
            on_gpu = engine.device.type == "cuda"
            for b in batches:
                xd = batch(b).to(engine.device)
                load = os.getloadavg()[0]
                with torch.no_grad():
                    fns = {"ours": _call(engine, xd), **runner.baselines(xd)}
                    times = interleaved(fns, min_rounds=args.min_calls if b == 1 else 30, budget_s=args.budget,
                                        sync=torch.cuda.synchronize if on_gpu else None)
                ours = times.pop("ours")
                row: dict[str, Any] = {
                    "arch": arch, "input_shape": list(shape), "runner": runner.label, "backend": engine.backend,
                    "precision": engine.precision, "device": str(engine.device), "batch": b, "calls": len(ours),
                    "load_1min": round(load, 2), "ours_median_us": _us(np.median(ours)),
                    "ours_iqr_us": [_us(q) for q in np.percentile(ours, [25, 75])],
                    "images_per_s": round(b / float(np.median(ours)), 1),
                    "vs": {name: compare(ours, t) for name, t in times.items()},
                }
                rows.append(row)
                print(f"{arch:10s} {runner.label:16s} b{b:<4d} {row['ours_median_us']:>10.1f} us  "
                      + "  ".join(f"{k} x{v['ratio']:.3f} {v['ratio_ci95']} +{v['added_us']}us"
                                  for k, v in row["vs"].items())
                      + f"  calls {row['calls']}  load {row['load_1min']}", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="cnn-small only, batches 1 and 16, 0.5 s per point")
    parser.add_argument("--budget", type=float, default=None, help="seconds per point (default 3, --quick 0.5)")
    parser.add_argument("--min-calls", type=int, default=400, help="rounds at least, at batch 1 (default 400)")
    parser.add_argument("--models", help=f"comma-separated subset of {', '.join(SHAPES)} (default: all that apply)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.budget is None:
        args.budget = 0.5 if args.quick else 3.0
    import onnxruntime as ort

    cuda = torch.cuda.is_available()
    names = ["cnn-small"] + ([] if args.quick else ["resnet20"] + (["resnet18"] if cuda else []))
    if args.models:
        names = [m.strip() for m in args.models.split(",")]
        unknown = [m for m in names if m not in SHAPES]
        if unknown:
            parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    cases = [(m, SHAPES[m]) for m in names]
    batches = [1, 16] if args.quick else [1, 16, 128]
    notes: dict[str, str] = {}
    if not cuda:
        notes["cuda"] = ("skipped: no CUDA device here (torch.cuda.is_available() is False); the CUDA twin, "
                         "ONNX Runtime CUDA IO binding and TensorRT runners were not measured")
    machine = {"platform": platform.platform(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "onnxruntime": ort.__version__,
               "ort_providers": ort.get_available_providers(), "python": platform.python_version(),
               "nice": os.nice(0), "gpu": torch.cuda.get_device_name() if cuda else None}
    load_start = os.getloadavg()
    t0 = time.time()
    rows = [r for arch, shape in cases for r in bench(arch, shape, batches, cuda, args, notes)]
    summary: dict[str, Any] = {}
    for r in rows:
        for name, v in r["vs"].items():
            entry = summary.setdefault(name, {"points": 0, "within_target": 0, "max_ratio": 0.0, "min_ratio": 1e9})
            entry["points"] += 1
            entry["within_target"] += bool(v["meets_target"])
            entry["max_ratio"] = max(entry["max_ratio"], v["ratio"])
            entry["min_ratio"] = min(entry["min_ratio"], v["ratio"])
    doc = {
        "device": machine,
        "load": {"start_1_5_15min": [round(v, 2) for v in load_start],
                 "end_1_5_15min": [round(v, 2) for v in os.getloadavg()],
                 "per_point_1min": [r["load_1min"] for r in rows]},
        "settings": {"quick": args.quick, "models": names, "budget_s": args.budget,
                     "min_calls_batch1": args.min_calls, "batches": batches, "target": TARGET,
                     "seconds": round(time.time() - t0, 1)},
        "skipped": notes,
        "rows": rows,
        "summary": summary,
    }
    text = json.dumps(doc, indent=1)
    print(text)
    if args.json:
        with atomic_write(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
