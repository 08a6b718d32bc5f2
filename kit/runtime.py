"""Run-time settings shared by the library and the CLI: device choice, seeding and progress bars.

Progress bars go to stderr and are silent when stdout or stderr is not a terminal, or when the user asked for quiet.
torch and numpy are imported by the functions that need them: the CLI's root callback imports this module for
:func:`set_quiet`, and ``otkit COMMAND --help`` must not pay for torch.
"""

from __future__ import annotations

import contextlib
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from kit.errors import UserError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence (or re-enable) progress bars for this process."""
    global _quiet
    _quiet = bool(quiet)


def progress_enabled() -> bool:
    """True when a progress bar would be seen by a person: not quiet, and stdout and stderr are terminals."""
    return not _quiet and sys.stdout.isatty() and sys.stderr.isatty()


def progress(iterable: Iterable[T], desc: str, total: int | None = None, leave: bool = False) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar on stderr when :func:`progress_enabled`, else return it unchanged."""
    if not progress_enabled():
        return iter(iterable)
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, desc=desc, total=total, leave=leave, file=sys.stderr, dynamic_ncols=True))


class ProgressBar:
    """A bar that the caller moves: :meth:`advance` by a count, or :meth:`set` to a (possibly fractional) position.

    Made by :func:`progress_bar`; where no person would see it (not a terminal, or quiet) every method does nothing.
    """

    def __init__(self, bar: Any = None) -> None:
        self._bar = bar
        self._last = 0.0

    def advance(self, n: float = 1) -> None:
        if self._bar is not None:
            self.set(self._bar.n + n)

    def set(self, value: float) -> None:
        """Move the bar to ``value`` (clipped to its total); redrawn at most ten times a second."""
        if self._bar is None:
            return
        total = self._bar.total
        self._bar.n = min(value, total) if total is not None else value
        now = time.monotonic()
        if now - self._last > 0.1:
            self._last = now
            self._bar.refresh()

    def within(self, start: float, size: float) -> Callable[[float], None]:
        """A callback that moves the bar to ``start + fraction * size``: the progress of one batch of ``size``
        items that starts at ``start`` (e.g. ``on_step`` of :func:`kit.attacks.search.min_eps_search`)."""
        return lambda fraction: self.set(start + fraction * size)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def open_bar(desc: str, total: float | None, unit: str = "it") -> ProgressBar:
    """A :class:`ProgressBar` on stderr (a do-nothing one when :func:`progress_enabled` is false); the caller closes
    it. For work that advances in uneven steps, e.g. examples of a batch part-way through their search."""
    if not progress_enabled():
        return ProgressBar()
    from tqdm.auto import tqdm

    return ProgressBar(tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} {unit} [{elapsed}<{remaining}]"
                            if total is not None else None))


@contextlib.contextmanager
def progress_bar(desc: str, total: float | None, unit: str = "it") -> Iterator[ProgressBar]:
    """:func:`open_bar` for the duration of a ``with`` block."""
    bar = open_bar(desc, total, unit)
    try:
        yield bar
    finally:
        bar.close()


@contextlib.contextmanager
def phase(desc: str) -> Iterator[None]:
    """A line on stderr naming a step that has nothing to count (an export, a check) with its running time,
    refreshed twice a second until the step ends; nothing when :func:`progress_enabled` is false."""
    if not progress_enabled():
        yield
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=None, desc=desc, leave=False, file=sys.stderr, bar_format="{desc}: {elapsed}")
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.5):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()


def model_tensor(model: torch.nn.Module) -> torch.Tensor | None:
    """A tensor that says where ``model`` lives and in what dtype: its first parameter, else its first floating
    buffer (a graph rebuilt from ONNX holds buffers only), else None."""
    p = next(iter(model.parameters()), None)
    if p is not None:
        return p
    return next((b for b in model.buffers() if b.is_floating_point()), None)


def run_fixed_batch(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int) -> torch.Tensor:
    """``run`` on ``x`` for a graph whose batch size is fixed at ``batch``: in chunks of that size, the last one padded
    with zeros and its extra outputs dropped, so each input gets what the graph gives it alone (and no gradient
    crosses between inputs)."""
    import torch

    outs = []
    for chunk in x.split(batch):
        n = chunk.shape[0]
        if n < batch:
            chunk = torch.cat([chunk, chunk.new_zeros((batch - n, *chunk.shape[1:]))])
        outs.append(run(chunk)[:n])
    return torch.cat(outs) if outs else run(x)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s tensors are (:func:`model_tensor`; the CPU for a model without any)."""
    import torch

    t = model_tensor(model)
    return t.device if t is not None else torch.device("cpu")


def exact_cuda() -> None:
    """CUDA arithmetic the kit can compare and replay, for the whole process: IEEE float32 (TF32 off for cuDNN
    convolutions, which torch computes in TF32 by default with 10-bit mantissas, and for matrix products) and
    deterministic cuDNN algorithms (no autotuning, no atomics in the convolution backward passes an attack takes).

    The kit holds a float32 engine to the twin within 1e-4 (export's parity, the audit's clean agreement, ``engine
    run --twin``); a twin computed in TF32 on an Ampere or later GPU differs from an exact float32 engine by several
    times that on a ResNet. And the gradients an attack follows should not change between two runs (sums with CUDA
    atomics elsewhere, such as ``index_add_``, may still differ in their last bits). Called
    by :func:`resolve_device` for every CUDA device the kit resolves, by :func:`kit.checkpoint.load_twin` on CUDA
    and by the twin's runner. It sets the legacy flags, which every torch release reads, and on torch 2.9 and later
    the per-operator ``fp32_precision`` settings too.
    """
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    if hasattr(torch.backends.cudnn, "conv"):  # torch >= 2.9: the per-operator settings, which the kernels read (a
        # "tf32" set at backend level would otherwise still reach convolutions through their inherited "none")
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cudnn.rnn.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


#: How ``--device`` is spelt (checked without importing torch: :func:`check_device_spelling`).
DEVICE_SPELLING = re.compile(r"auto|cpu|cuda(:[0-9]+)?", re.ASCII)
UNKNOWN_DEVICE = "unknown device {!r}: use auto, cpu, cuda or cuda:N"


def check_device_spelling(spec: str) -> None:
    """Refuse a ``--device`` that no machine has (``gpu``, ``cuda:1x``) before anything is loaded."""
    if not DEVICE_SPELLING.fullmatch(spec.strip().lower()):
        raise UserError(UNKNOWN_DEVICE.format(spec))


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a usable :class:`torch.device`.

    ``auto`` picks the first CUDA device when one is present, else the CPU. Asking for CUDA where there is none, or for
    a device index that does not exist, is a :class:`UserError`. A CUDA device turns TF32 off and cuDNN
    deterministic (:func:`exact_cuda`).
    """
    dev = _resolve_device(spec)
    if dev.type == "cuda":
        exact_cuda()
    return dev


def _resolve_device(spec: str | torch.device | None) -> torch.device:
    import torch

    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        raise UserError(UNKNOWN_DEVICE.format(spec)) from e
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise UserError(f"unsupported device {spec!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"device {spec!r} requested but CUDA is not available on this machine (use --device cpu)")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {spec!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def lazy_exports(module: str, where: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's ``__getattr__`` and ``__dir__`` (PEP 562) importing each public name from its module on first use.

    ``where`` maps each name to the module it lives in; a name found is cached in the package, so later lookups skip
    the function. The package imports nothing heavy until a name is used (``otkit --help`` stays without torch).
    """
    import importlib

    def __getattr__(name: str) -> Any:
        home = where.get(name)
        if home is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        setattr(sys.modules[module], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[module]), *where})

    return __getattr__, __dir__

