"""The one training loop. Each defense supplies its loss (and adversary); this owns the rest.

Every epoch is seeded from ``(seed, epoch)`` alone, so a run resumed from its epoch checkpoint ends with exactly the
weights an uninterrupted run would have. After each epoch the loop writes, atomically:

- ``OUT`` (``.safetensors``): the twin, with its metadata (see :mod:`kit.checkpoint`);
- ``OUT`` with suffix ``.resume.pt``: optimiser and defense state for ``--resume`` (read with ``weights_only=True``);
- ``OUT`` with suffix ``.metrics.jsonl``: one JSON line per epoch (loss parts, held-out clean accuracy, seconds);
- ``OUT`` with suffix ``.config.json``: the resolved training configuration.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from kit.arch import build_model, is_file_arch
from kit.checkpoint import CheckpointInfo, read_checkpoint, save_checkpoint
from kit.data import Dataset, load_dataset
from kit.defenses.base import create_defense
from kit.errors import UserError
from kit.io import atomic_write
from kit.runtime import progress

log = logging.getLogger(__name__)


class Optimizer(str, Enum):
    SGD = "sgd"
    ADAM = "adam"


class Schedule(str, Enum):
    CONSTANT = "constant"
    MULTISTEP = "multistep"
    COSINE = "cosine"


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved beside the checkpoint and inside it)."""

    defense: str = "standard"
    arch: str = "cnn-small"
    data: str = "digits"
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = Optimizer.SGD.value
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = Schedule.COSINE.value
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    seed: int = 0
    data_seed: int = 0
    eval_samples: int = 1000
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    defense_params: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise :class:`UserError` for values no run can use."""
        if self.epochs < 1:
            raise UserError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"learning rate must be positive and finite, got {self.lr}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise UserError("weight decay must be >= 0 and momentum in [0, 1)")
        if self.optimizer not in {o.value for o in Optimizer}:
            raise UserError(f"unknown optimizer {self.optimizer!r}; known: {', '.join(o.value for o in Optimizer)}")
        if self.schedule not in {s.value for s in Schedule}:
            raise UserError(f"unknown schedule {self.schedule!r}; known: {', '.join(s.value for s in Schedule)}")
        if any(not 0 < m < 1 for m in self.milestones) or not 0 < self.gamma <= 1:
            raise UserError("milestones must be fractions of the run in (0, 1) and gamma in (0, 1]")
        if self.eval_samples < 1:
            raise UserError(f"eval samples must be at least 1, got {self.eval_samples}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UserError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        d = dict(d)
        if "milestones" in d:
            d["milestones"] = tuple(d["milestones"])
        return cls(**d)

    def lr_at(self, epoch: int) -> float:
        """Learning rate for 0-based ``epoch`` (the schedule is a pure function of the epoch)."""
        if self.schedule == Schedule.COSINE.value:
            return self.lr * 0.5 * (1 + math.cos(math.pi * epoch / self.epochs))
        if self.schedule == Schedule.MULTISTEP.value:
            passed = sum(epoch >= round(m * self.epochs) for m in self.milestones)
            return self.lr * self.gamma**passed
        return self.lr


@dataclass
class TrainResult:
    """What :func:`train` produced."""

    path: Path
    info: CheckpointInfo
    history: list[dict[str, Any]]
    model: nn.Module

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


def sidecar(out: Path, kind: str) -> Path:
    """Path of a file written beside checkpoint ``out``: ``m.safetensors`` -> ``m.<kind>``."""
    return out.with_suffix(f".{kind}")


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of images (N, C, H, W); std floored at 1e-3."""
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset, device: torch.device, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on ``data``."""
    model.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        x, y = data.x[i : i + batch_size].to(device), data.y[i : i + batch_size].to(device)
        correct += int((model(x).argmax(1) == y).sum())
    return correct / max(len(data), 1)


def _make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == Optimizer.ADAM.value:
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _load_resume(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise UserError(f"cannot read resume state {path}: {str(e).splitlines()[0] if str(e) else e}") from e


def train(
    cfg: TrainConfig,
    out: str | Path,
    device: torch.device | str = "cpu",
    resume: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``cfg.arch`` on ``cfg.data`` with ``cfg.defense``; write the checkpoint and its sidecars to ``out``.

    Parameters
    ----------
    cfg : TrainConfig
    out : path ending in ``.safetensors``
    device : torch.device or str
    resume : bool
        Continue from ``out``'s ``.resume.pt`` state (same configuration, ``epochs`` may be raised to train longer).
    on_epoch : callable, optional
        Called with each epoch's metrics record (the CLI prints them).

    Returns
    -------
    TrainResult
    """
    cfg.validate()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out must end in .safetensors: {out}")
    if not out.parent.exists():
        out.parent.mkdir(parents=True)
    device = torch.device(device)

    train_set = load_dataset(cfg.data, "train", seed=cfg.data_seed)
    held_out = load_dataset(cfg.data, "test", seed=cfg.data_seed).subset(cfg.eval_samples, seed=cfg.data_seed)
    mean, std = channel_stats(train_set.x)
    arch_kwargs = dict(cfg.arch_kwargs)
    if not is_file_arch(cfg.arch):
        arch_kwargs.setdefault("mean", mean)
        arch_kwargs.setdefault("std", std)
    torch.manual_seed(cfg.seed)
    model, arch_record = build_model(cfg.arch, train_set.num_classes, train_set.input_shape, arch_kwargs)
    model.to(device)
    defense = create_defense(cfg.defense, **cfg.defense_params)
    defense.setup(model)
    optimizer = _make_optimizer(cfg, model)

    start_epoch, history = 0, []
    resume_path, metrics_path = sidecar(out, "resume.pt"), sidecar(out, "metrics.jsonl")
    if resume:
        if not resume_path.exists():
            raise UserError(f"nothing to resume: {resume_path} does not exist (train without --resume first)")
        state = _load_resume(resume_path)
        saved = json.loads(state["config"])
        mine = cfg.to_dict()
        differ = [k for k in mine if k != "epochs" and saved.get(k) != mine[k]]
        if differ:
            raise UserError(f"cannot resume {out}: options changed since it was started ({', '.join(differ)})")
        if state["data_fingerprint"] != train_set.fingerprint:
            raise UserError(f"cannot resume {out}: the training data changed (fingerprint differs)")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        defense.load_state_dict(state["defense"])
        start_epoch = int(state["epoch"])
        history = json.loads(state["history"])
        if start_epoch >= cfg.epochs:
            log.info("%s already trained for %d epochs; nothing to do", out, start_epoch)
    else:
        metrics_path.unlink(missing_ok=True)

    with atomic_write(sidecar(out, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    info = CheckpointInfo(
        arch=arch_record,
        num_classes=train_set.num_classes,
        class_names=list(train_set.class_names),
        input_shape=list(train_set.input_shape),
        normalization={"mean": arch_kwargs.get("mean"), "std": arch_kwargs.get("std")},
        dataset={"spec": cfg.data, "fingerprint": train_set.fingerprint, "n_train": len(train_set)},
        defense=cfg.defense,
        train_config=cfg.to_dict(),
    )

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        lr = cfg.lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        epoch_seed = cfg.seed * 100_003 + epoch
        torch.manual_seed(epoch_seed)
        loader = train_set.loader(cfg.batch_size, shuffle=True, seed=epoch_seed)
        sums: dict[str, float] = {}
        seen = 0
        model.train()
        for x, y in progress(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", total=len(loader)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss, parts = defense.loss(model, x, y)
            if not torch.isfinite(loss):
                raise UserError(f"training diverged at epoch {epoch + 1} (loss {loss.item()}); lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = len(y)
            seen += n
            sums["loss"] = sums.get("loss", 0.0) + loss.item() * n
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
        record = {
            "epoch": epoch + 1,
            "lr": lr,
            **{k: v / max(seen, 1) for k, v in sums.items()},
            "test_acc": accuracy(model, held_out, device),
            "seconds": time.perf_counter() - t0,
        }
        history.append(record)
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        info.train_config = {**cfg.to_dict(), "epochs_done": epoch + 1}
        info = save_checkpoint(model, out, info)
        state = {
            "epoch": epoch + 1,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "defense": defense.state_dict(),
            "config": json.dumps(cfg.to_dict()),
            "data_fingerprint": train_set.fingerprint,
            "history": json.dumps(history),
        }
        with atomic_write(resume_path) as f:
            torch.save(state, f)
        if on_epoch is not None:
            on_epoch(record)

    if start_epoch >= cfg.epochs and out.exists():
        info = read_checkpoint(out)[1]
    model.eval()
    return TrainResult(path=out, info=info, history=history, model=model)
