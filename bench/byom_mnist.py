"""A model trained outside the kit, on real MNIST digits, imported and audited (issue 17's check on real data).

What a user of the kit does with a model of their own, end to end, with nothing but the command line after training:

1. Train ``bench/byom_net.py:Net`` with a plain PyTorch loop on ``mnist:DIR`` (normalised input, mean 0.1307 /
   std 0.3081 applied by the loop), and save it as researchers do:
   ``torch.save({"epoch": E, "model_state_dict": ..., "optimizer_state_dict": ...}, "researcher.pth")``; export the
   deployed engine with ``torch.onnx.export`` taking normalised input (no kit metadata).
2. ``otkit models import researcher.pth --arch bench/byom_net.py:Net --num-classes 10 --input-shape 1,28,28
   --mean 0.1307 --std 0.3081 --dataset mnist:DIR --out imported.safetensors``.
3. ``otkit audit --engine user.onnx --engine-input mnist --twin imported.safetensors ...`` (the twin from the weights)
   and ``otkit audit --engine user.onnx --engine-input mnist --twin user.onnx ...`` (the ONNX-only twin, rebuilt from
   the graph): both must say ``match`` (else the script exits 1); the two audits' AUACs are printed side by side,
   where they should agree (the ONNX twin's gradients are the original's). A status that fails on a flag
   (``test-blind`` below about 300 samples) is stated on stderr beside the verdict.

Run::

    python bench/byom_mnist.py --data ../shared/data/mnist-10k [--epochs 2] [--samples 500] [--out bench/.cache/byom]

Prints one JSON document (the figures, the commands and their wall times) on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

MEAN, STD = 0.1307, 0.3081


def train_elsewhere(data_dir: Path, epochs: int, out: Path) -> dict:
    """A researcher's loop: no kit code except the dataset reader (the IDX files are read as any loader would)."""
    from bench.byom_net import Net
    from kit.data import load_dataset

    train = load_dataset(f"mnist:{data_dir}", "train")
    test = load_dataset(f"mnist:{data_dir}", "test")
    torch.manual_seed(0)
    model = Net(10, (1, 28, 28))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    norm = lambda x: (x - MEAN) / STD  # noqa: E731  (the loop normalises, the model does not)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(len(train.x))
        model.train()
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(norm(train.x[idx])), train.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = float((model(norm(test.x)).argmax(1) == test.y).double().mean())
        print(f"epoch {epoch + 1}: test accuracy {acc:.4f}", file=sys.stderr)
    torch.save({"epoch": epochs, "model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict()},
               out / "researcher.pth")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice: a user's export, as is
        torch.onnx.export(model, (torch.zeros(2, 1, 28, 28),), str(out / "user.onnx"), dynamo=False,
                          opset_version=18, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return {"epochs": epochs, "test_accuracy": acc, "train_seconds": time.perf_counter() - t0}


def otkit(*args: str) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "kit", *args]
    print("$ otkit " + shlex.join(args), file=sys.stderr)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if res.returncode not in (0, 1):
        raise SystemExit(f"otkit {shlex.join(args)} failed ({res.returncode}):\n{res.stderr}")
    return seconds, res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="folder of MNIST IDX files (../shared/data/mnist-10k)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--out", type=Path, default=HERE / ".cache" / "byom")
    a = ap.parse_args()
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = a.data.resolve()
    done = out / "trained.json"  # a rerun reuses the training and the finished audits (delete --out to redo them)
    if done.exists() and (out / "researcher.pth").exists() and (out / "user.onnx").exists():
        trained = json.loads(done.read_text())
    else:
        trained = train_elsewhere(data, a.epochs, out)
        done.write_text(json.dumps(trained))
    spec = f"mnist:{data}"
    t_import, imported = otkit("models", "import", str(out / "researcher.pth"), "--arch", "bench/byom_net.py:Net",
                               "--num-classes", "10", "--input-shape", "1,28,28", "--mean", str(MEAN), "--std",
                               str(STD), "--dataset", spec, "--out", str(out / "imported.safetensors"),
                               "--overwrite", "--json")
    attacks = ["--attack", "pgd-linf@0.3", "--attack", "fmn-l2@3"]
    common = [*attacks, "--samples", str(a.samples), "--data", spec, "--json"]
    audits = {}
    for name, twin, extra in (("weights twin", out / "imported.safetensors", ["--arch", "bench/byom_net.py:Net"]),
                              ("ONNX-only twin", out / "user.onnx", [])):
        folder = out / ("audit-" + name.split()[0].lower())
        if (folder / "report.json").exists():
            doc = json.loads((folder / "report.json").read_text())
            seconds = doc["provenance"]["seconds"]
        else:
            seconds, stdout = otkit("audit", "--engine", str(out / "user.onnx"), "--engine-input", "mnist",
                                    "--twin", str(twin), *extra, *common, "--out", str(folder))
            doc = json.loads(stdout)
        audits[name] = {
            "seconds": seconds, "verdict": doc["verdict"], "status": doc["status"],
            "clean": {k: doc["clean"][k] for k in ("twin_accuracy", "engine_accuracy", "top1_agreement",
                                                      "max_logit_gap")},
            "attacks": {r["name"]: {"engine_auac": r["engine"]["auac"], "twin_auac": r["twin"]["auac"],
                                      "eps_max": r["eps_max"]} for r in doc["attacks"]},
            "checks": [f["id"] for f in doc["checks"]],
        }
    print(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "data": spec, "trained_elsewhere": trained,
                      "import": {"seconds": t_import, **json.loads(imported)}, "audits": audits}, indent=2))
    # the claim of this check (module docstring): both twins match the engine; a failed status is stated beside it
    for name, a in audits.items():
        if a["status"] != "pass":
            print(f"{name}: status {a['status']} (verdict {a['verdict']}; flags: {', '.join(a['checks']) or 'none'}"
                  f"{'; test-blind: raise --samples' if 'test-blind' in a['checks'] else ''})", file=sys.stderr)
    if any(a["verdict"] != "match" for a in audits.values()):
        raise SystemExit("a twin does not match the engine: " + ", ".join(
            f"{name} {a['verdict']}" for name, a in audits.items()))


if __name__ == "__main__":
    main()
