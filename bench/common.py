"""Shared set-up for the benchmarks: models trained on the embedded digits data, and a timer."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kit.checkpoint import load_twin
from kit.defenses.trainer import TrainConfig, train

CACHE = Path(__file__).resolve().parent / ".cache"


def digits_model(defense: str = "standard", epochs: int = 10, **params) -> torch.nn.Module:
    """A cnn-small trained on digits:16 (cached in bench/.cache between runs)."""
    CACHE.mkdir(exist_ok=True)
    tag = "-".join(f"{k}{v}" for k, v in sorted(params.items()))
    path = CACHE / f"cnn-small-digits16-{defense}-{epochs}{'-' + tag if tag else ''}.safetensors"
    if not path.exists():
        train(TrainConfig(defense=defense, arch="cnn-small", data="digits:16", epochs=epochs, defense_params=params),
              path)
    return load_twin(path)[0]


def timed(fn: Callable[[], object], repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls (seconds), after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def forward_backward_seconds(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Best wall time (:func:`timed`) of one forward + backward of the whole batch to the input: the model's own
    cost of one attack step, the reference of the attack benchmarks."""

    def fb() -> None:
        xg = x.clone().requires_grad_(True)
        torch.autograd.grad(torch.nn.functional.cross_entropy(model(xg), y, reduction="sum"), xg)

    return timed(fb)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS does not report them)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def source_revision() -> str | None:
    """The commit the benchmark's code comes from (``git describe --always --dirty --abbrev=40``: the full hash, with
    ``-dirty`` when the checkout has uncommitted changes), so a result document names the source of its figures; None
    outside a git checkout or without git."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def device_description(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU model and its logical CPU count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} logical CPUs)"


def median_time(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of ``repeat`` calls (seconds) after ``warmup`` calls, and all the times (synchronising CUDA)."""
    t = median_times(fn, repeat, warmup)
    return t["wall_s"], t["wall_all_s"]


def median_times(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> dict[str, float | list[float]]:
    """Median wall time and median CPU time of this process over ``repeat`` calls (seconds), with all of them.

    On a shared, loaded machine the wall time includes the time spent waiting for a core; the process CPU time
    (``time.process_time``, all threads) does not, so with one thread it is close to what an idle core would take
    (cache and memory-bandwidth contention still count). With CUDA the device is synchronised around each call.
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu),
            "wall_all_s": [round(v, 5) for v in wall], "cpu_all_s": [round(v, 5) for v in cpu]}


def emit(doc: object, json_path: Path | None = None) -> None:
    """Print a benchmark's JSON document on stdout and, if asked, write it to ``json_path`` atomically."""
    import json

    from kit.io import atomic_write

    text = json.dumps(doc, indent=1)
    print(text)
    if json_path:
        with atomic_write(json_path, "w") as f:
            f.write(text)

