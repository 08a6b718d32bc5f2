"""Start-up of an ``otkit`` command, up to its first attack step (docs/BENCHMARKS.md, "Start-up").

    python scripts/startup_probe.py audit --engine m.onnx --twin m.safetensors --attack pgd-linf@0.3 --samples 20 ...

runs the command as ``python -m kit`` does and prints to stderr, at the first call of an attack (``Attack.__call__``):
the process's CPU seconds (user + system, every thread) and wall seconds since start, and which heavy libraries are
imported by then. With ``STARTUP_PROBE_STOP=1`` in the environment the command stops there (``SystemExit``), so
that ``python -m cProfile`` or ``/usr/bin/time`` see the start-up alone. Add ``-X importtime`` before the script for
the import tree. Measurement only: nothing of the kit imports this file.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import runpy
import sys
import time

HEAVY = ("torch", "onnx", "onnxruntime", "onnxscript", "numpy", "scipy", "sklearn", "matplotlib", "ot", "PIL",
         "jsonschema", "safetensors", "tqdm")


def _since_start() -> float:
    """Wall seconds since the process started (/proc where there is one, else since this script started)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _T0


_T0 = time.perf_counter()
_done = False


def _report() -> None:
    global _done
    if _done:
        return
    _done = True
    cpu = time.process_time()
    loaded = [m for m in HEAVY if m in sys.modules]
    print(f"startup-probe: first attack step after {cpu:.2f} s CPU, {_since_start():.2f} s wall; "
          f"imported: {', '.join(loaded)}", file=sys.stderr, flush=True)
    if os.environ.get("STARTUP_PROBE_STOP") == "1":
        raise SystemExit(0)


class _Patch(importlib.abc.MetaPathFinder):
    """Wraps ``kit.attacks.base.Attack.__call__`` once that module is executed (the probe imports nothing itself)."""

    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201
        if name != "kit.attacks.base":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):  # noqa: ANN001, ANN202
            exec_module(module)
            call = module.Attack.__call__

            def first_call(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
                _report()
                return call(self, *args, **kwargs)

            module.Attack.__call__ = first_call

        spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


if __name__ == "__main__":
    sys.meta_path.insert(0, _Patch())
    sys.argv = ["otkit", *sys.argv[1:]]
    runpy.run_module("kit", run_name="__main__", alter_sys=True)
