"""Many processes, one run: the ``torchrun`` environment, exact batch shards and fixed-size result exchange.

Launched by ``torchrun`` (one process per GPU, or per CPU worker), ``otkit audit`` and ``otkit certify`` split their
batches over the processes and gather the results on rank 0, which alone writes the report (docs/distributed.md).

* **Exact shards.** The unit of work is the batch the single-process run would make (examples ``b*B .. b*B+B-1``),
  and rank ``r`` of ``W`` takes batches ``r, r+W, r+2W, ...``: every example exactly once, no padding (unlike
  ``DistributedSampler``, which repeats examples to even the shards out and skews the accuracy). A batch's numbers
  depend only on its examples and the seed, never on the rank or the number of processes, so an N-process report
  equals the one-process report, whatever N (a rank with no batch only waits).
* **Fixed-size exchange.** Each batch's arrays go from the rank that computed them to every rank as tensors of a
  shape announced first (a fixed-size header: dtype code, rank of the array, its dimensions), never pickled objects.
  The collectives carry small CPU arrays, so the process group is gloo's also where the models run on GPUs.

Nothing here is imported unless a command runs: ``torch.distributed`` is imported by :func:`world` when ``torchrun``'s
variables are set.
"""

from __future__ import annotations

import atexit
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kit.errors import UserError

#: dtypes a batch's arrays may have, by their code in the exchange header
_DTYPES = [np.dtype(t) for t in ("float64", "float32", "float16", "int64", "int32", "uint8", "bool")]
_HEADER = 10  # dtype code, ndim, then up to 8 dimensions
_NAME_BYTES = 256


@dataclass
class World:
    """This process's place among the processes of one run (rank 0 of 1 outside ``torchrun``)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    _group: Any = field(default=None, repr=False)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def lead(self) -> bool:
        """Rank 0: the process that prints, writes the report and holds the output folder's lock."""
        return self.rank == 0

    def owns(self, batch: int) -> bool:
        """Whether batch ``batch`` is this rank's (``batch % size == rank``)."""
        return batch % self.size == self.rank

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def share(self, batch: int, arrays: Mapping[str, np.ndarray] | None, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Batch ``batch``'s arrays on every rank, sent by the rank that owns it.

        The owner passes its ``arrays`` (every key of ``keys``); the others pass ``None`` and receive them, bit for
        bit. Every rank must call this for the same batches, in the same order, with the same ``keys``.
        """
        if not self.distributed:
            if arrays is None:
                raise ValueError(f"batch {batch} has no arrays in a one-process run")
            return {k: arrays[k] for k in keys}
        import torch
        import torch.distributed as dist

        src = batch % self.size
        out = {}
        for k in keys:
            header = torch.zeros(_HEADER, dtype=torch.int64)
            if self.rank == src:
                if arrays is None:
                    raise ValueError(f"rank {self.rank} owns batch {batch} but has no arrays for it")
                a = np.array(arrays[k], order="C", copy=True)  # 0-d stays 0-d (unlike ascontiguousarray)
                if a.ndim > _HEADER - 2 or a.dtype not in _DTYPES:
                    raise ValueError(f"cannot exchange {k!r}: dtype {a.dtype}, {a.ndim} dimensions")
                header[0], header[1] = _DTYPES.index(a.dtype), a.ndim
                header[2:2 + a.ndim] = torch.tensor(a.shape, dtype=torch.int64)
            dist.broadcast(header, src=src)
            dtype, ndim = _DTYPES[int(header[0])], int(header[1])
            shape = tuple(int(v) for v in header[2:2 + ndim])
            # bytes travel as uint8: every dtype alike, bit for bit (-0.0 and NaN payloads included)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            buf = torch.empty(nbytes, dtype=torch.uint8)
            if self.rank == src:
                buf.copy_(torch.from_numpy(a.reshape(-1).view(np.uint8)))
            if nbytes:
                dist.broadcast(buf, src=src)
            out[k] = arrays[k] if self.rank == src else buf.numpy().view(dtype).reshape(shape).copy()
        return out

    def gather_text(self, text: str) -> list[str]:
        """Every rank's ``text`` (at most 256 UTF-8 bytes), in rank order, on every rank."""
        if not self.distributed:
            return [text]
        import torch
        import torch.distributed as dist

        raw = text.encode()[:_NAME_BYTES]
        mine = torch.zeros(_NAME_BYTES + 1, dtype=torch.uint8)
        mine[0] = len(raw)
        mine[1:1 + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else mine[1:1]
        got = [torch.zeros_like(mine) for _ in range(self.size)]
        dist.all_gather(got, mine)
        return [bytes(g[1:1 + int(g[0])].tolist()).decode(errors="replace") for g in got]

    def lead_says(self, flag: bool) -> bool:
        """The lead rank's ``flag``, on every rank (a decision its view of a shared folder makes for all)."""
        if not self.distributed:
            return bool(flag)
        import torch
        import torch.distributed as dist

        t = torch.tensor([int(bool(flag))], dtype=torch.int64)
        dist.broadcast(t, src=0)
        return bool(t)

    def total(self, value: int) -> int:
        """The sum of an integer count over every rank (engine passes, say), on every rank."""
        if not self.distributed:
            return int(value)
        import torch
        import torch.distributed as dist

        t = torch.tensor([int(value)], dtype=torch.int64)
        dist.all_reduce(t)
        return int(t)

    def close(self) -> None:
        if self.distributed and self._group is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._group = None


_WORLD: World | None = None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r} is not an integer (set by torchrun; see docs/distributed.md)") from None


def world() -> World:
    """The run's :class:`World`: from ``torchrun``'s ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (the gloo process
    group is joined on first use), else one process."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    size = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise UserError(f"RANK={rank} and WORLD_SIZE={size} do not describe a process of the run")
    if size == 1:
        _WORLD = World()
        return _WORLD
    import datetime

    import torch.distributed as dist

    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed: run without torchrun")
    if not dist.is_initialized():
        # gloo: the exchange carries small CPU arrays; a long first batch must not time the others out
        try:
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=6))
        except (ValueError, RuntimeError) as e:  # torchrun's rendezvous variables missing or unreachable
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot join the run's processes (WORLD_SIZE={size}, RANK={rank}): {first}; launch "
                            "with torchrun (docs/distributed.md)") from None
    _WORLD = World(rank=rank, size=size, local_rank=local, _group=dist.group.WORLD)
    # leave the group before the interpreter tears down (a group destroyed by its finaliser can abort the process)
    atexit.register(reset)
    return _WORLD


def reset() -> None:
    """Leave the process group and forget the world (tests; the end of a command)."""
    global _WORLD
    if _WORLD is not None:
        _WORLD.close()
    _WORLD = None


def rank_device(device: Any, spec: str, w: World) -> Any:
    """The device of this rank: under ``torchrun`` a CUDA device is ``cuda:LOCAL_RANK`` (one GPU per process); an
    explicit ``cuda:N`` is refused there (every process would take the same GPU)."""
    if not w.distributed or getattr(device, "type", None) != "cuda":
        return device
    import torch

    if ":" in spec:
        raise UserError(f"--device {spec} under torchrun would put every process on one GPU: give --device cuda "
                        "(or auto), and each process takes cuda:LOCAL_RANK")
    if w.local_rank >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK {w.local_rank} has no GPU: this machine has {torch.cuda.device_count()} (start "
                        "at most that many processes per node: torchrun --nproc-per-node)")
    dev = torch.device("cuda", w.local_rank)
    torch.cuda.set_device(dev)
    return dev


def device_name(device: Any) -> str:
    """The kind of device: a GPU's name (``NVIDIA H100 80GB HBM3``), else ``cpu``."""
    if getattr(device, "type", str(device)) != "cuda":
        return "cpu"
    import torch

    return torch.cuda.get_device_name(device)


def host_label(device: Any) -> str:
    """Where this rank runs: host name, device and, on a GPU, its name (``host cuda:1 NVIDIA H100 80GB HBM3``)."""
    name = device_name(device)
    return f"{socket.gethostname()} {device}" + ("" if name == "cpu" else f" {name}")
