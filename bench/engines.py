"""Engine benchmarks: images/s of every runner at several batch sizes, and each runner's overhead.

For each architecture the twin is exported once (random weights: speed does not depend on training) to fp32, fp16 and
int8 ONNX, and every runner available here is timed on the same batches:

* ``TorchEngine`` (the twin), ``OnnxRuntimeEngine`` at fp32/fp16/int8 on the CPU provider;
* on a CUDA machine also the twin on CUDA, ``OnnxRuntimeEngine`` on CUDA (IO binding, with onnxruntime-gpu) and a
  ``TensorRTEngine`` (with TensorRT).

Overhead is the runner's time over a bare ``InferenceSession.run`` of the runner's own session on the same batch
(prepared numpy input, or a prepared IO binding on CUDA; target <= 1.05); for the twin, over a bare ``model(x)`` under
``torch.no_grad``. Runner and baseline are timed in alternation, best round each, to resist load from other processes.

Run: ``python bench/engines.py [--quick]``; prints JSON with the device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from bench.common import timed  # noqa: E402
from exporters.engines import Engine, TorchEngine  # noqa: E402
from exporters.onnx import OnnxRuntimeEngine, torch_to_onnx, write_onnx_export  # noqa: E402


def per_call(*fns: Callable[[], object], rounds: int = 7, min_seconds: float = 0.02) -> list[float]:
    """Seconds per call of each of ``fns``, timed in alternation (robust to load from other processes).

    Each round times every function with ``timed`` over enough calls to last ``min_seconds``; the best round counts.
    """
    loops = []
    for fn in fns:
        once = max(timed(fn, repeat=1), 1e-6)
        k = max(1, int(min_seconds / once))
        loops.append((k, lambda fn=fn, k=k: [fn() for _ in range(k)]))
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, (k, loop) in enumerate(loops):
            best[i] = min(best[i], timed(loop, repeat=1) / k)
    return best


def bare_session(engine: OnnxRuntimeEngine, x: torch.Tensor) -> Callable[[], object]:
    """The engine's own ONNX Runtime session called bare: a prepared numpy batch (CPU) or a prepared IO binding (CUDA).

    Using the same session (not a second one) keeps two thread pools from competing while they alternate.
    """
    import numpy as np

    sess = engine.session
    name, out = engine.io_names
    if engine.device.type == "cpu":
        arr = x.numpy()
        return lambda: sess.run([out], {name: arr})
    xin = x.to(engine.device).contiguous()
    y = torch.empty(len(x), engine.num_classes, device=engine.device)
    binding = sess.io_binding()
    binding.bind_input(name, "cuda", engine.device.index or 0, np.float32, tuple(xin.shape), xin.data_ptr())
    binding.bind_output(out, "cuda", engine.device.index or 0, np.float32, tuple(y.shape), y.data_ptr())
    return lambda: sess.run_with_iobinding(binding)


def runners(arch: str, shape: tuple[int, int, int], folder: Path, cuda: bool) -> list[tuple[Engine, Any]]:
    """Every runner available here for ``arch``, each with its bare baseline factory (or None)."""
    torch.manual_seed(0)
    model = models.create(arch, 10, shape).eval()
    x = torch.rand(64, *shape, generator=torch.Generator().manual_seed(0))
    graph = torch_to_onnx(model, shape)
    files = {p: write_onnx_export(graph, folder / f"{arch}-{p}.onnx", model, x, precision=p,
                                  calibration_x=x if p == "int8" else None).path for p in ("fp32", "fp16", "int8")}
    out: list[tuple[Engine, Any]] = [(TorchEngine(model, shape, 10, "-", name=arch), "torch")]
    out += [(OnnxRuntimeEngine(path), "ort") for path in files.values()]
    if cuda:
        import onnxruntime as ort

        out.append((TorchEngine(model.cuda(), shape, 10, "-", name=arch), "torch"))
        if "CUDAExecutionProvider" in ort.get_available_providers():
            out += [(OnnxRuntimeEngine(files[p], device="cuda"), "ort") for p in ("fp32", "fp16")]
        from exporters.tensorrt import TensorRTEngine, export_tensorrt, tensorrt_version

        if tensorrt_version() is not None:
            for p in ("fp32", "fp16"):
                res = export_tensorrt(model, folder / f"{arch}-{p}.engine", x.cuda(), precision=p, device="cuda")
                out.append((TensorRTEngine(res.path, "cuda"), None))
    return out


def bench(arch: str, shape: tuple[int, int, int], batches: list[int], cuda: bool) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="otkit-bench-") as tmp:
        for engine, baseline in runners(arch, shape, Path(tmp), cuda):
            for b in batches:
                x = torch.rand(b, *shape, generator=torch.Generator().manual_seed(b))
                xd = x.to(engine.device)
                with torch.no_grad():
                    if baseline == "ort":
                        t, t_bare = per_call(lambda: engine(xd), bare_session(engine, x))  # type: ignore[arg-type]
                    elif baseline == "torch":
                        model = engine.model  # type: ignore[attr-defined]
                        t, t_bare = per_call(lambda: engine(xd), lambda: model(xd))
                    else:
                        (t,), t_bare = per_call(lambda: engine(xd)), None
                row: dict[str, Any] = {"arch": arch, "runner": engine.name.replace(f"{arch}-", ""),
                                       "backend": engine.backend, "precision": engine.precision,
                                       "device": str(engine.device), "batch": b, "images_per_s": round(b / t, 1)}
                if t_bare is not None:
                    row[f"overhead_vs_bare_{'ort' if baseline == 'ort' else 'torch'}"] = round(t / t_bare, 3)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small model, two batch sizes")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    cases = [("cnn-small", (1, 28, 28))] if args.quick else [("cnn-small", (1, 28, 28)), ("resnet20", (3, 32, 32))]
    if cuda and not args.quick:
        cases.append(("resnet18", (3, 32, 32)))
    batches = [1, 64] if args.quick else [1, 16, 128]
    import onnxruntime as ort

    device = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
              "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers(),
              "gpu": torch.cuda.get_device_name() if cuda else None}
    rows = [r for arch, shape in cases for r in bench(arch, shape, batches, cuda)]
    ort_overheads = [r["overhead_vs_bare_ort"] for r in rows if "overhead_vs_bare_ort" in r]
    print(json.dumps({"device": device, "rows": rows,
                      "summary": {"max_overhead_vs_bare_ort": max(ort_overheads),
                                  "target": 1.05,
                                  "within_target": sum(o <= 1.05 for o in ort_overheads),
                                  "of": len(ort_overheads)}}, indent=2))


if __name__ == "__main__":
    main()
