"""The one training loop. Each defense supplies its loss (and adversary); this owns the rest.

Every epoch is seeded from ``(seed, epoch)`` alone (the shuffle, the defense's random draws, the augmentation), and the
defense is told the epoch before it starts (:meth:`kit.defenses.base.Defense.start_epoch`), so a run resumed from its
epoch checkpoint ends with exactly the weights an uninterrupted run would have. After each epoch the loop writes
four files, committed together (each written to a temporary first, then all renamed; a failure while writing leaves
the previous epoch's four files as they were):

- ``OUT`` (``.safetensors``): the twin, with its metadata (see :mod:`kit.checkpoint`);
- ``OUT`` with suffix ``.resume.pt``: optimiser, defense and gradient-scaler state for ``--resume`` (read with
  ``weights_only=True``);
- ``OUT`` with suffix ``.metrics.jsonl``: one JSON line per epoch (loss parts, held-out clean and adversarial
  accuracy, seconds);
- ``OUT`` with suffix ``.config.json``: the resolved training configuration (``augment="auto"`` and ``amp`` resolved
  for the data and device, the defense's parameters with its defaults filled in).

The checkpoint is renamed into place last: a checkpoint on disk always has its resume state beside it. An existing
``OUT`` is continued (``resume``) or replaced (``overwrite``), never silently; while a run trains, the hidden lock
``.OUT.lock`` beside it keeps a second run away (:func:`kit.io.file_lock`).

A run's options can come from the ``[train]`` table of a TOML file (:func:`load_train_config`; ``docs/train.md``).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
import math
import pickle
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import tomllib
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from kit.arch import build_model, is_file_arch
from kit.attacks.base import Attack
from kit.checkpoint import CheckpointInfo, read_checkpoint, save_checkpoint
from kit.data import Dataset, load_dataset
from kit.defenses.base import Defense, create_defense
from kit.errors import UserError
from kit.io import atomic_files, file_lock, require_file
from kit.runtime import progress

log = logging.getLogger(__name__)


class Optimizer(str, Enum):
    SGD = "sgd"
    ADAM = "adam"


class Schedule(str, Enum):
    CONSTANT = "constant"
    MULTISTEP = "multistep"
    COSINE = "cosine"


class Augment(str, Enum):
    """Training-time augmentation: ``auto`` is ``crop-flip`` for 3-channel (natural) images and ``none`` otherwise
    (greyscale digits and MNIST, where a horizontal flip can change the class)."""

    AUTO = "auto"
    NONE = "none"
    CROP_FLIP = "crop-flip"


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved beside the checkpoint and inside it).

    ``augment`` is one of :class:`Augment`; ``amp`` asks for mixed precision (CUDA only: on a CPU the run warns and
    trains in float32); ``eval_adv_samples`` held-out examples are attacked after every epoch (0: none);
    ``train_samples`` > 0 trains on a class-stratified subset of that many training images
    (:meth:`kit.data.Dataset.stratified`, seeded by ``data_seed``; 0, the default, is the whole split).
    """

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
    eval_adv_samples: int = 128
    train_samples: int = 0
    augment: str = Augment.AUTO.value
    amp: bool = False
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
        if self.eval_adv_samples < 0:
            raise UserError(f"eval adversarial samples must be >= 0, got {self.eval_adv_samples}")
        if self.train_samples < 0:
            raise UserError(f"train samples must be >= 0 (0: the whole training split), got {self.train_samples}")
        if self.augment not in {a.value for a in Augment}:
            raise UserError(f"unknown augment {self.augment!r}; known: {', '.join(a.value for a in Augment)}")
        create_defense(self.defense, **self.defense_params)  # an unknown defense or parameter name, before any work
        if not isinstance(self.arch_kwargs, dict):
            raise UserError(f"arch_kwargs must be a table of options, got {self.arch_kwargs!r}")
        if not is_file_arch(self.arch):  # a user file is imported only when training starts
            try:
                models.check_options(self.arch, self.arch_kwargs)
            except ValueError as e:
                raise UserError(str(e)) from e

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        if not self.train_samples:  # the whole split: left out, so records (and hashes) of earlier runs stay equal
            del d["train_samples"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "training options") -> TrainConfig:
        """Build from a mapping of field names; unknown names and wrong types are a :class:`UserError`."""
        d = check_config_types(d, source)
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


# ------------------------------------------------------------------------------------------------ configuration files
_KINDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
          "tuple[float, ...]": "an array of numbers", "dict[str, Any]": "a table"}


def _type_ok(kind: str, value: Any) -> bool:
    number = (int, float)
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, number) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "tuple[float, ...]":
        return isinstance(value, (list, tuple)) and all(
            isinstance(v, number) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if kind == "dict[str, Any]":
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    raise TypeError(f"TrainConfig field kind {kind!r} has no check")  # a new field needs a line above


def check_config_types(d: dict[str, Any], source: str = "training options") -> dict[str, Any]:
    """Check a mapping of :class:`TrainConfig` field names against the fields' types; return a copy.

    Keys may be spelled with ``-`` for ``_`` (``batch-size``). Unknown keys and values of the wrong type are a
    :class:`UserError` naming ``source`` and the key. Integers are accepted where a float is expected.
    """
    kinds = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    unknown = []
    for key, value in d.items():
        name = str(key).replace("-", "_")
        if name not in kinds:
            unknown.append(str(key))
            continue
        if not _type_ok(kinds[name], value):
            raise UserError(f"{source}: {key} must be {_KINDS[kinds[name]]}, got {type(value).__name__} {value!r}")
        if name in out:
            raise UserError(f"{source}: {key} is given twice (as {name} and {name.replace('_', '-')})")
        out[name] = float(value) if kinds[name] == "float" else value
    if unknown:
        raise UserError(f"{source}: unknown training option(s) {', '.join(sorted(unknown))}; known: "
                        f"{', '.join(kinds)}")
    return out


def load_train_config(path: str | Path) -> dict[str, Any]:
    """Read the ``[train]`` table of a TOML file: the :class:`TrainConfig` fields it sets, type-checked.

    The file may hold other tables (a future ``otkit run`` config keeps its other sections beside ``[train]``);
    they are ignored here. ``[train.defense_params]`` and ``[train.arch_kwargs]`` are sub-tables.

    Returns
    -------
    dict
        Field name -> value, only for the fields the file sets (defaults are the caller's business).

    Raises
    ------
    UserError
        A missing or unreadable file, malformed TOML, no ``[train]`` table, an unknown key or a value of the wrong
        type; one line naming the file.
    """
    p = require_file(path, "config file")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{p}: malformed TOML: {e}") from e
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise UserError(f"cannot read config file {p}: {e.strerror or e}") from e
    if "train" not in data:
        raise UserError(f"{p}: no [train] table")
    table = data["train"]
    if not isinstance(table, dict):
        raise UserError(f"{p}: 'train' must be a table ([train]), got {type(table).__name__}")
    return check_config_types(table, f"{p} [train]")


# ----------------------------------------------------------------------------------------------------- augmentation
def resolve_augment(augment: str | Augment, input_shape: tuple[int, int, int] | list[int]) -> Augment:
    """``auto`` -> ``crop-flip`` for 3-channel images, ``none`` otherwise; other values unchanged."""
    aug = Augment(augment)
    if aug is Augment.AUTO:
        return Augment.CROP_FLIP if int(input_shape[0]) == 3 else Augment.NONE
    return aug


def crop_padding(height: int, width: int) -> int:
    """Padding of the random crop: 4 pixels for images of 32 pixels and more (the CIFAR recipe), 2 below."""
    return 4 if min(height, width) >= 32 else 2


def draw_crop_flip(n: int, pad: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random offsets and flips for ``n`` images, from ``generator`` (CPU): in this order, ``dy`` (n,) and ``dx``
    (n,) uniform in ``0 .. 2*pad``, then ``flip`` (n,) bool with probability 1/2."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.randint(0, 2, (n,), generator=generator).bool()
    return dy, dx, flip


def apply_crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int
                    ) -> torch.Tensor:
    """Zero-pad each image of ``x`` (N, C, H, W) by ``pad``, crop the H x W window at offset ``(dy, dx)`` of the padded
    image, and mirror it left-right where ``flip``: ``out[n, c, i, j] = padded[n, c, dy + i, dx + j']`` with
    ``j' = W - 1 - j`` where flipped. One gather for the whole batch (no PIL, no per-image loop)."""
    n, c, h, w = x.shape
    dev = x.device
    dy, dx, flip = dy.to(dev), dx.to(dev), flip.to(dev)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h, device=dev)  # (N, H)
    cols = torch.arange(w, device=dev).expand(n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]  # (N, W)
    return padded[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int | None = None) -> torch.Tensor:
    """Random crop (zero padding, :func:`crop_padding` unless given) and horizontal flip of a batch (N, C, H, W)."""
    pad = crop_padding(x.shape[2], x.shape[3]) if pad is None else int(pad)
    return apply_crop_flip(x, *draw_crop_flip(x.shape[0], pad, generator), pad=pad)


def augment_seed(epoch_seed: int) -> int:
    """Seed of an epoch's augmentation generator, decorrelated from the shuffle's (which uses ``epoch_seed``)."""
    return (epoch_seed * 6364136223846793005 + 1442695040888963407) % (2**63)


# --------------------------------------------------------------------------------------------------------- helpers
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


def _own_attack(obj: Defense, depth: int = 0) -> Attack | None:
    """The first :class:`~kit.attacks.base.Attack` among a defense's attributes (or those of a defense it wraps)."""
    for value in vars(obj).values():
        if isinstance(value, Attack):
            return value
    if depth < 2:
        for value in vars(obj).values():
            if isinstance(value, Defense):
                found = _own_attack(value, depth + 1)
                if found is not None:
                    return found
    return None


def eval_adversary(defense: Defense, model: nn.Module, seed: int = 0) -> Attack | None:
    """The attack that scores held-out adversarial accuracy after each epoch.

    The defense's own adversary (a shallow copy, run in eval mode, stopping at each example's first adversarial,
    seeded with ``seed``) if it keeps one; else L-inf (or the defense's ``norm``) PGD at the defense's ``eps`` with
    its ``steps`` (10 if it has none), from a seeded random start; else (``standard``, ``otc``: no threat model)
    ``None``.
    """
    own = _own_attack(defense)
    if own is not None:
        attack = copy.copy(own)
        attack.eval_mode = True
        if hasattr(attack, "early_stop"):
            attack.early_stop = True
        if hasattr(attack, "seed"):
            attack.seed = int(seed)
        return attack
    p = defense.params
    eps = p.get("eps")
    if isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0:
        from kit.attacks.pgd import PGD

        steps = p.get("steps")
        steps = int(steps) if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else 10
        return PGD(model, eps=float(eps), norm=p.get("norm", "linf"), steps=steps, seed=int(seed))
    return None


def adversarial_accuracy(attack: Attack, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``(x, y)`` still classified correctly under ``attack`` (misclassified clean counts as fooled).

    The attack's solver warnings (a projection or Sinkhorn cut short by its iteration bound) are collected and logged
    once at debug level: this is a progress metric, and the defenses silence the same warnings in training.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        res = attack(x, y)
    if caught:
        log.debug("held-out adversary %s: %d solver warning(s), e.g. %s", type(attack).__name__, len(caught),
                  caught[0].message)
    return res.robust_accuracy


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


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """The JSON round trip of ``d`` (tuples become lists), so that saved and live configurations compare equal."""
    return json.loads(json.dumps(d))


# ----------------------------------------------------------------------------------------------------------- train
def train(
    cfg: TrainConfig,
    out: str | Path,
    device: torch.device | str = "cpu",
    resume: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    overwrite: bool = False,
    on_start: Callable[[], None] | None = None,
) -> TrainResult:
    """Train ``cfg.arch`` on ``cfg.data`` with ``cfg.defense``; write the checkpoint and its sidecars to ``out``.

    Per batch: augmentation (``cfg.augment``, resolved by :func:`resolve_augment`; :func:`crop_flip` drawing from a
    generator seeded per epoch), then the defense's loss (under CUDA autocast with a gradient scaler when ``cfg.amp``
    and the device is CUDA), one optimiser step. Per epoch: held-out clean accuracy on ``cfg.eval_samples`` test
    examples and adversarial accuracy on the first ``cfg.eval_adv_samples`` of them (:func:`eval_adversary`).

    Parameters
    ----------
    cfg : TrainConfig
    out : path ending in ``.safetensors``
    device : torch.device or str
    resume : bool
        Continue from ``out``'s ``.resume.pt`` state (same configuration, ``epochs`` may be raised to train longer).
    overwrite : bool
        Replace an existing ``out`` (and its sidecars). Without ``resume`` or ``overwrite``, an existing ``out`` is a
        :class:`UserError`. The old files stay until the first epoch's files replace them all at once.
    on_epoch : callable, optional
        Called with each epoch's metrics record (the CLI prints them).
    on_start : callable, optional
        Called once every check passed (options, ``out``, the resume state), before the first epoch: a caller that
        writes files of its own beside the run writes them here, so that a refused run writes nothing.

    Returns
    -------
    TrainResult
        ``info.train_config`` and ``OUT.config.json`` hold the resolved configuration.
    """
    cfg.validate()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out must end in .safetensors: {out}")
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other: continue the training or replace it")
    _check_out(out, resume, overwrite)  # before the lock creates anything: an error here leaves the disk as it was
    with file_lock(out, "--out"):
        _check_out(out, resume, overwrite)  # again, now that no other process can write it
        return _train_locked(cfg, out, torch.device(device), resume, on_epoch, on_start)


def _check_out(out: Path, resume: bool, overwrite: bool) -> None:
    if out.exists() and not out.is_file():
        raise UserError(f"--out {out} exists and is not a file")
    resume_path = sidecar(out, "resume.pt")
    if resume:
        if not resume_path.exists():
            raise UserError(f"nothing to resume: {resume_path} does not exist (train without --resume first)")
        return
    if not overwrite:
        there = [p for p in (out, resume_path, sidecar(out, "metrics.jsonl"), sidecar(out, "config.json"))
                 if p.exists()]
        if there:
            raise UserError(f"{there[0]} already exists: give --resume to continue its training or --overwrite to "
                            "replace it")


def training_set(cfg: TrainConfig) -> Dataset:
    """The images ``cfg`` trains on: the training split of ``cfg.data``, or its class-stratified subset of
    ``cfg.train_samples`` images (:meth:`kit.data.Dataset.stratified`, seeded by ``data_seed``)."""
    train_set = load_dataset(cfg.data, "train", seed=cfg.data_seed)
    return train_set.stratified(cfg.train_samples, seed=cfg.data_seed) if cfg.train_samples else train_set


def _train_locked(cfg: TrainConfig, out: Path, device: torch.device, resume: bool,
                  on_epoch: Callable[[dict[str, Any]], None] | None,
                  on_start: Callable[[], None] | None = None) -> TrainResult:
    """:func:`train`'s work, with ``out`` locked and checked."""
    train_set = training_set(cfg)
    held_out = load_dataset(cfg.data, "test", seed=cfg.data_seed).subset(cfg.eval_samples, seed=cfg.data_seed,
                                                                         notice=False)  # eval_samples is a cap
    augment = resolve_augment(cfg.augment, train_set.input_shape)
    use_amp = bool(cfg.amp) and device.type == "cuda"
    if cfg.amp and not use_amp:
        log.warning("amp: mixed precision needs a CUDA device; training in float32 on %s", device)
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
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    # the resolved configuration: what was asked for, with every "auto" and default made explicit
    cfg = dataclasses.replace(cfg, augment=augment.value, amp=use_amp,
                              defense_params=_jsonable(dict(defense.params)))
    cfg_dict = _jsonable(cfg.to_dict())

    start_epoch, history = 0, []
    resume_path, metrics_path = sidecar(out, "resume.pt"), sidecar(out, "metrics.jsonl")
    if resume:
        state = _load_resume(resume_path)
        # an option the kit gained after the run started is taken at its default, which keeps the old behaviour
        saved = {**_jsonable(TrainConfig().to_dict()), **json.loads(state["config"])}
        saved["defense_params"] = {**_jsonable(dict(defense.defaults)), **saved["defense_params"]}
        differ = [k for k in cfg_dict if k != "epochs" and saved[k] != cfg_dict[k]]
        if differ:
            raise UserError(f"cannot resume {out}: options changed since it was started ({', '.join(differ)})")
        if state["data_fingerprint"] != train_set.fingerprint:
            raise UserError(f"cannot resume {out}: the training data changed (fingerprint differs)")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        defense.load_state_dict(state["defense"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"])
        history = json.loads(state["history"])
        if start_epoch >= cfg.epochs:
            log.info("%s already trained for %d epochs; nothing to do", out, start_epoch)

    info = CheckpointInfo(
        arch=arch_record,
        num_classes=train_set.num_classes,
        class_names=list(train_set.class_names),
        input_shape=list(train_set.input_shape),
        normalization={"mean": arch_kwargs.get("mean"), "std": arch_kwargs.get("std")},
        dataset={"spec": cfg.data, "fingerprint": train_set.fingerprint, "n_train": len(train_set)},
        defense=cfg.defense,
        train_config=cfg_dict,
    )
    n_adv = min(cfg.eval_adv_samples, len(held_out))
    if on_start is not None:
        on_start()
    adv_x, adv_y = held_out.x[:n_adv].to(device), held_out.y[:n_adv].to(device)

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        lr = cfg.lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        epoch_seed = cfg.seed * 100_003 + epoch
        torch.manual_seed(epoch_seed)
        defense.start_epoch(epoch, cfg.epochs)
        loader = train_set.loader(cfg.batch_size, shuffle=True, seed=epoch_seed)
        aug_gen = torch.Generator().manual_seed(augment_seed(epoch_seed))
        sums: dict[str, float] = {}
        seen = 0
        model.train()
        for x, y in progress(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", total=len(loader)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if augment is Augment.CROP_FLIP:
                x = crop_flip(x, aug_gen)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                loss, parts = defense.loss(model, x, y)
            if not torch.isfinite(loss):
                raise UserError(f"training diverged at epoch {epoch + 1} (loss {loss.item()}); lower --lr")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            n = len(y)
            seen += n
            sums["loss"] = sums.get("loss", 0.0) + loss.item() * n
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": lr,
            **{k: v / max(seen, 1) for k, v in sums.items()},
            "test_acc": accuracy(model, held_out, device),
        }
        attack = eval_adversary(defense, model, seed=cfg.seed) if n_adv else None
        if attack is not None:
            record["test_adv_acc"] = adversarial_accuracy(attack, adv_x, adv_y)
            record["test_adv_n"] = n_adv
            record["test_adv_attack"] = type(attack).__name__
        record["seconds"] = time.perf_counter() - t0
        history.append(record)
        info.train_config = {**cfg_dict, "epochs_done": epoch + 1}
        state = {
            "epoch": epoch + 1,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "defense": defense.state_dict(),
            "scaler": scaler.state_dict(),
            "config": json.dumps(cfg_dict),
            "data_fingerprint": train_set.fingerprint,
            "history": json.dumps(history),
        }
        # The epoch's four files together or not at all; the checkpoint, the file that looks usable, comes last.
        with atomic_files() as files:
            with files.open(resume_path) as f:
                buf = io.BytesIO()
                torch.save(state, buf)  # in memory first: a full disk is then a plain OSError from write()
                f.write(buf.getbuffer())
            with files.open(metrics_path, "w") as f:
                f.write("".join(json.dumps(r) + "\n" for r in history))
            with files.open(sidecar(out, "config.json"), "w") as f:
                json.dump(cfg_dict, f, indent=2)
            info = save_checkpoint(model, files.temp(out), info)
        if on_epoch is not None:
            on_epoch(record)

    if start_epoch >= cfg.epochs and out.exists():
        info = read_checkpoint(out)[1]
    model.eval()
    return TrainResult(path=out, info=info, history=history, model=model)
