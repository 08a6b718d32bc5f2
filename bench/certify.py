"""Certification throughput and memory (issue 19).

1. **Throughput.** Engine forward passes per second inside the certificate loop (``evaluators.certify.run_certify``:
   noise drawn, batches cut, predictions counted, per-example generators) against the bare engine called on
   same-sized batches of pre-made noisy images. Both sides run the same ONNX Runtime session, so the ratio
   (certify / bare) is what the loop adds; the issue's target is >= 0.9.
2. **Memory.** Peak resident memory of a child process certifying the same examples at n = 10^4 and n = 10^5 noise
   samples: the noise streams in blocks, so it must stay flat.

Models: a cnn-small on digits:16 (bench/.cache; a 1x16x16 network so small that drawing the noise is a fifth of the
work) and resnet20 on 3x32x32 (random weights, uniform images: the cost of a deployed CIFAR model), both exported to
fp32 ONNX and run by ONNX Runtime on the CPU with one thread. Run::

    python bench/certify.py [--samples 8] [--n 20000] [--batch 256]

Prints one JSON document; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def export_model(folder: Path) -> Path:
    from bench.common import CACHE, digits_model
    from exporters.checkpoint import export_checkpoint

    digits_model("standard", 10)
    ckpt = CACHE / "cnn-small-digits16-standard-10.safetensors"
    return export_checkpoint(ckpt, "onnx", folder / "m.onnx").path


def resnet20_inputs(folder: Path, samples: int):
    """resnet20 (random weights: speed does not depend on training) exported to fp32 ONNX, on uniform 3x32x32
    images: a model whose forward pass costs what a deployed CIFAR model's does."""
    import models
    from evaluators.certify import CertifyInputs
    from exporters.engines import load_engine
    from exporters.onnx import torch_to_onnx, write_onnx_export

    torch.manual_seed(0)
    model = models.create("resnet20", 10, (3, 32, 32)).eval()
    x = torch.rand(max(samples, 16), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    path = write_onnx_export(torch_to_onnx(model, (3, 32, 32)), folder / "resnet20.onnx", model, x[:16]).path
    y = torch.zeros(samples, dtype=torch.long)
    data = {"spec": "uniform noise 3x32x32", "split": "test", "fingerprint": "sha256:" + "0" * 64, "n": samples,
            "seed": 0}
    return CertifyInputs(engine=load_engine(path, "cpu"), engine_path=path, engine_format="onnx", twin=None,
                         twin_path=None, twin_info=None, x=x[:samples], y=y, data=data)


def throughput(inp, samples: int, n: int, batch: int, rounds: int = 3) -> dict:
    """``rounds`` alternating runs of the certificate loop and of the bare engine on as many images (noise made
    beforehand, same batch size); the median of each side's rate, and of the per-round ratios."""
    import statistics

    from evaluators.certify import CertifyConfig, run_certify

    cfg = CertifyConfig(smoothing="gaussian", sigma=0.25, n=n, n0=100, noise_batch=batch, batch_size=samples)
    engine = inp.engine
    x = inp.x[0].unsqueeze(0) + 0.25 * torch.randn(batch, *inp.x.shape[1:], generator=torch.Generator().manual_seed(0))
    loops, bares, forwards = [], [], 0
    with tempfile.TemporaryDirectory() as d:
        for r in range(rounds):
            t0 = time.perf_counter()
            doc = run_certify(inp, cfg, Path(d) / f"c{r}")
            loops.append(time.perf_counter() - t0)
            forwards = doc["provenance"]["engine_forwards"]
            calls = -(-forwards // batch)
            with torch.no_grad():
                engine(x)
                t0 = time.perf_counter()
                for _ in range(calls):
                    engine(x).argmax(1)
                bares.append(time.perf_counter() - t0)
    calls = -(-forwards // batch)
    ratios = [(forwards / lp) / (calls * batch / bp) for lp, bp in zip(loops, bares)]
    return {"model": inp.engine.name, "input_shape": list(inp.x.shape[1:]), "samples": samples, "n": n, "n0": 100,
            "noise_batch": batch, "engine_forwards": forwards, "rounds": rounds,
            "certify_seconds": [round(v, 3) for v in loops], "bare_seconds": [round(v, 3) for v in bares],
            "certify_forwards_per_s": round(forwards / statistics.median(loops)),
            "bare_forwards_per_s": round(calls * batch / statistics.median(bares)),
            "ratio": round(statistics.median(ratios), 3), "ratio_per_round": [round(v, 3) for v in ratios]}


CHILD = """
import resource, sys, tempfile
from pathlib import Path
sys.path.insert(0, {root!r})
from evaluators.certify import CertifyConfig, load_certify_inputs, run_certify
inp = load_certify_inputs(Path({onnx!r}), None, "digits:16", "test", {samples}, 0, "cpu")
cfg = CertifyConfig(smoothing="gaussian", sigma=0.25, n={n}, n0=100, noise_batch={batch}, batch_size={samples})
with tempfile.TemporaryDirectory() as d:
    run_certify(inp, cfg, Path(d) / "c")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_mib(onnx: Path, samples: int, n: int, batch: int) -> float:
    code = CHILD.format(root=str(ROOT), onnx=str(onnx), samples=samples, n=n, batch=batch)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return round(int(out.strip().splitlines()[-1]) / 1024, 1)  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--memory-samples", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from bench.common import cpu_model, load_average

    with tempfile.TemporaryDirectory() as d:
        from evaluators.certify import load_certify_inputs

        onnx = export_model(Path(d))
        tp = []
        for name, inp, n in (("cnn-small", load_certify_inputs(onnx, None, "digits:16", "test", args.samples, 0, "cpu"),
                              args.n),
                             ("resnet20", resnet20_inputs(Path(d), 2), max(2000, args.n // 10))):
            log(f"throughput ({name}): certify loop vs bare engine")
            tp.append(throughput(inp, len(inp.x), n, args.batch))
            log(f"  ratio {tp[-1]['ratio']}")
        mem = {}
        for n in (10_000, 100_000):
            log(f"peak memory at n = {n}")
            mem[str(n)] = peak_rss_mib(onnx, args.memory_samples, n, args.batch)
    print(json.dumps({"benchmark": "otkit certify: engine forwards per second vs the bare engine; peak memory vs n",
                      "target": "ratio >= 0.9; memory flat in n", "throughput": tp,
                      "peak_rss_mib": mem, "peak_rss_ratio_1e5_vs_1e4": round(mem["100000"] / mem["10000"], 3),
                      "machine": {"cpu": cpu_model(), "threads": 1, "load_average_at_end": load_average(),
                                  "torch": torch.__version__}}, indent=2))


if __name__ == "__main__":
    main()
