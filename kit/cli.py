"""The ``otkit`` command line: thin wrappers that parse, call library functions and print.

Messages for people go to stderr; results go to stdout (a table, or JSON with ``--json``).
"""

from __future__ import annotations

import errno
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import sys
import warnings
from pathlib import Path
from collections.abc import Callable
from typing import Any

import click

import kit
from exporters.formats import DEFAULT_MAX_BATCH, DEFAULT_OPSET, MIN_OPSET, ORT_PROVIDERS, ExportFormat, Precision
from kit.errors import UserError

EXIT_STATUSES = """\b
Exit statuses:
  0  success
  1  a check failed: an audit's gate or fidelity verdict (audit, run), a hash or
     recheck (verify), an FP32 parity check (export)
  2  usage or input error (bad option, missing or malformed file, unknown name,
     a folder in use, a write the disk refused), always one line "Error: ..."
  130 interrupted (Ctrl-C); train, audit and run continue with --resume"""


EXIT_INTERRUPTED = 130

#: errno values that mean "the disk or folder refused a write" (reported as ``cannot write PATH: reason``)
_WRITE_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EROFS", "EFBIG") if hasattr(errno, n))

_interrupt_hint: str | Callable[[], str | None] | None = None


def set_interrupt_hint(hint: str | Callable[[], str | None] | None) -> None:
    """What the one line printed on Ctrl-C tells the user to do next (e.g. how to resume); ``None``: nothing to do.

    A callable is asked at the moment of the interruption (e.g. whether an epoch has been saved yet)."""
    global _interrupt_hint
    _interrupt_hint = hint


def _current_hint() -> str | None:
    hint = _interrupt_hint
    return hint() if callable(hint) else hint


class _UserFacing(click.ClickException):
    """A UserError as click shows it: ``Error: <one line>`` on stderr, exit status 2."""

    exit_code = 2


def os_error_message(e: OSError) -> str:
    """One line for a failed read or write: the file, and the system's reason in its own words."""
    where = e.filename if e.filename is not None else "a file"
    reason = e.strerror or type(e).__name__
    verb = "cannot write" if e.errno in _WRITE_ERRNOS else "cannot use"
    return f"{verb} {where}: {reason}"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class KitGroup(click.Group):
    """A click group whose every failure is one line on stderr with a documented exit status.

    :class:`kit.UserError` and operating-system errors (a full disk, a read-only folder) from any subcommand become
    ``Error: ...`` and exit status 2; a usage error is one ``Error:`` line too (click's usage banner and "Try --help"
    lines are left out), exit status 2; Ctrl-C is ``Interrupted: ...`` (with how to resume, where the command can)
    and exit status 130. Python warnings from the libraries underneath are silenced unless ``--verbose``.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as e:
            raise _UserFacing(str(e)) from e
        except OSError as e:
            raise _UserFacing(os_error_message(e)) from e

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        set_interrupt_hint(None)
        try:
            with warnings.catch_warnings():
                if "-v" not in (args or sys.argv[1:]) and "--verbose" not in (args or sys.argv[1:]):
                    warnings.simplefilter("ignore")
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            click.echo(f"Error: {_one_line(e.format_message())}{hint}", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"Error: {_one_line(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        except (click.exceptions.Abort, KeyboardInterrupt):
            hint = _current_hint()
            tail = f"; {hint}" if hint else ""
            click.echo(f"Interrupted{tail}", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def dependency_versions() -> dict[str, Any]:
    """Versions of the kit and the libraries it runs on (TensorRT and onnxruntime-gpu only if installed)."""
    import torch

    out: dict[str, Any] = {"otkit": kit.__version__, "python": platform.python_version(), "torch": torch.__version__}
    for dist in ("onnx", "onnxruntime", "onnxruntime-gpu", "pot", "numpy", "click", "safetensors", "jsonschema"):
        v = _dist_version(dist)
        if v is not None or dist in ("onnx", "onnxruntime", "pot"):
            out[dist] = v
    try:
        import onnxruntime as ort

        out["onnxruntime_providers"] = list(ort.get_available_providers())
    except ImportError:
        out["onnxruntime_providers"] = []
    out["tensorrt"] = _tensorrt_version()
    return out


def _tensorrt_version() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        import tensorrt  # lazy: only when installed

        version = getattr(tensorrt, "__version__", None)  # None: only the tensorrt-stubs type stubs are installed
        return version if isinstance(version, str) and hasattr(tensorrt, "Builder") else None
    except Exception as e:  # a broken TensorRT install must not break --version  # noqa: BLE001
        return f"unusable ({type(e).__name__})"


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    v = dependency_versions()
    providers = ", ".join(v.pop("onnxruntime_providers")) or "none"
    click.echo(f"otkit {v.pop('otkit')}")
    for k, val in v.items():
        click.echo(f"  {k:<16}{val if val is not None else 'not installed'}")
    click.echo(f"  {'ort providers':<16}{providers}")
    ctx.exit()


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Left-aligned plain-text table (pastes into issues and terminals alike)."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def parse_params(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``("eps=0.1", "norm=linf")`` -> ``{"eps": 0.1, "norm": "linf"}``: each value is read as JSON, else kept as text."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"expected KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


def _device(ctx: click.Context):  # noqa: ANN202
    from kit.runtime import resolve_device

    return resolve_device(ctx.find_root().obj["device"])


def seed_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--seed N`` on a command: every random choice it makes (subsets, attack restarts, training)."""
    return click.option("--seed", "seed", type=int, default=None, show_default="0",
                        help="Seed for every random choice of this command.")(f)


def _seed(ctx: click.Context, seed: int | None) -> int:
    """The command's ``--seed``, else the (hidden, older) global ``otkit --seed N``, else 0."""
    return int(seed) if seed is not None else int(ctx.find_root().obj["seed"])


class AliasOption(click.Option):
    """An option with old spellings kept working but left out of ``--help`` (only the first name is shown)."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        record = super().get_help_record(ctx)
        if record is None:
            return None
        shown = self.opts[0] + (f" {self.make_metavar(ctx)}" if not self.is_flag else "")
        return shown, record[1]


@click.group(cls=KitGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
             epilog=EXIT_STATUSES)
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the kit's version and its dependencies', then exit.")
@click.option("--device", default="auto", metavar="auto|cpu|cuda[:N]", help="Where models and attacks run.")
@click.option("--seed", type=int, default=0, hidden=True,
              help="Seed for every random choice (kept for old scripts: each command takes --seed).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or status messages.")
@click.option("--verbose", "-v", is_flag=True, help="Log debugging detail to stderr.")
@click.pass_context
def cli(ctx: click.Context, device: str, seed: int, quiet: bool, verbose: bool) -> None:
    """otkit: robustness certification and deployment for image classifiers.

    Train defended networks, export them, audit deployed engines and issue AUAC robustness reports.
    """
    from kit.runtime import set_quiet

    set_quiet(quiet)
    logging.basicConfig(
        level=logging.DEBUG if verbose else (logging.ERROR if quiet else logging.INFO),
        format="%(message)s",
        stream=sys.stderr,
    )
    ctx.obj = {"device": device, "seed": seed, "quiet": quiet}


# ---------------------------------------------------------------------------------------------------------------- info
@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info(as_json: bool) -> None:
    """Devices, ONNX Runtime providers and TensorRT availability."""
    import torch

    v = dependency_versions()
    devices = [{"device": "cpu", "name": platform.processor() or platform.machine(), "detail": f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads"}]
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        p = torch.cuda.get_device_properties(i)
        devices.append({"device": f"cuda:{i}", "name": p.name,
                        "detail": f"compute {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB"})
    report = {
        "versions": {k: val for k, val in v.items() if k != "onnxruntime_providers"},
        "devices": devices,
        "onnxruntime_providers": v["onnxruntime_providers"],
        "tensorrt": {"available": v["tensorrt"] is not None, "version": v["tensorrt"]},
    }
    if as_json:
        _emit_json(report)
        return
    click.echo(_table(devices, ["device", "name", "detail"]))
    click.echo()
    click.echo(f"ONNX Runtime {v.get('onnxruntime')}: providers {', '.join(report['onnxruntime_providers']) or 'none'}")
    click.echo(f"TensorRT: {v['tensorrt'] or 'not installed (pip install otkit[gpu] on a CUDA machine)'}")


# ---------------------------------------------------------------------------------------------------------------- data
@cli.group(cls=KitGroup)
def data() -> None:
    """Datasets: digits (embedded), mnist:DIR, fashion-mnist:DIR, cifar10:DIR, cifar100:DIR, npz:FILE, folder:DIR."""


@data.command("inspect")
@click.argument("spec")
@seed_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def data_inspect(ctx: click.Context, spec: str, seed: int | None, as_json: bool) -> None:
    """Size, shape, classes and fingerprint of each split of SPEC."""
    from kit.data import load_dataset

    rows = []
    for split in ("train", "test"):
        ds = load_dataset(spec, split, seed=_seed(ctx, seed))
        rows.append({
            "split": split, "n": len(ds), "shape": "x".join(map(str, ds.input_shape)), "classes": ds.num_classes,
            "fingerprint": ds.fingerprint, "class_names": list(ds.class_names),
        })
    if as_json:
        _emit_json({"spec": spec, "splits": rows})
        return
    click.echo(_table(rows, ["split", "n", "shape", "classes", "fingerprint"]))
    names = rows[0]["class_names"]
    click.echo(f"class names: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")


# -------------------------------------------------------------------------------------------------------------- models
@cli.group(cls=KitGroup)
def models() -> None:
    """The model zoo and checkpoints."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def models_list(as_json: bool) -> None:
    """Architectures that --arch accepts (or path/to/file.py:ClassOrFactory for your own)."""
    import models as zoo

    rows = [{"name": n, "description": zoo.describe(n)} for n in zoo.list_models()]
    if as_json:
        _emit_json(rows)
    else:
        click.echo(_table(rows, ["name", "description"]))


@models.command("show")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def models_show(checkpoint: Path, as_json: bool) -> None:
    """What a checkpoint holds: architecture, classes, input shape, defense, dataset fingerprint, weights sha256."""
    from kit.checkpoint import read_checkpoint

    state, info = read_checkpoint(checkpoint)
    n_params = sum(t.numel() for t in state.values())
    if as_json:
        _emit_json({"path": str(checkpoint), "parameters": n_params, **info.to_dict()})
        return
    tc = info.train_config
    rows = [
        ("architecture", info.arch_name),
        ("parameters", f"{n_params:,} (tensors incl. buffers)"),
        ("input shape", "x".join(map(str, info.input_shape)) + " (pixels in [0, 1])"),
        ("classes", f"{info.num_classes}: {', '.join(info.class_names[:10])}{' ...' if info.num_classes > 10 else ''}"),
        ("normalisation", f"mean {info.normalization.get('mean')}, std {info.normalization.get('std')}"),
        ("defense", info.defense),
        ("dataset", f"{info.dataset.get('spec')} ({info.dataset.get('fingerprint')})"),
        ("epochs", f"{tc.get('epochs_done', '?')} of {tc.get('epochs', '?')}"),
        ("weights", info.weights_sha256),
        ("kit version", info.kit_version),
        ("created", info.created),
    ]
    for k, v in rows:
        click.echo(f"{k:<14}{v}")


# --------------------------------------------------------------------------------------------------------------- train
class LazyChoice(click.Choice):
    """A ``click.Choice`` whose choices come from a registry, loaded only when needed (``--help`` stays fast)."""

    def __init__(self, load: Callable[[], list[str]]) -> None:
        self._load = load
        self._loaded: tuple[str, ...] | None = None
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        if self._loaded is None:
            self._loaded = tuple(self._load())
        return self._loaded

    @choices.setter
    def choices(self, value: Any) -> None:  # click's __init__ assigns it; the registry is the source
        self._loaded = tuple(value)


def _defense_names() -> list[str]:
    from kit.defenses import list_defenses

    return list_defenses()


#: ``train`` options that set a TrainConfig field of the same meaning: click parameter name -> field name.
_TRAIN_FIELDS = {"defense": "defense", "arch": "arch", "data_spec": "data", "epochs": "epochs",
                 "batch_size": "batch_size", "optimizer": "optimizer", "lr": "lr", "momentum": "momentum",
                 "weight_decay": "weight_decay", "schedule": "schedule", "eval_samples": "eval_samples",
                 "eval_adv_samples": "eval_adv_samples", "augment": "augment", "amp": "amp"}


def _given(ctx: click.Context | None, name: str) -> bool:
    """Whether option ``name`` of ``ctx`` was set by the user (command line or environment), not by its default."""
    from click.core import ParameterSource

    if ctx is None:
        return False
    return ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)


def _train_config(ctx: click.Context, values: dict[str, Any], config: Path | None,
                  params: tuple[str, ...]):  # noqa: ANN202  (TrainConfig is imported lazily)
    """The run's TrainConfig: options given on the command line, else the ``--config`` file's ``[train]`` table, else
    the defaults. ``--param`` pairs override the file's ``[train.defense_params]`` key by key; the training seed is
    ``train --seed``, else the global ``--seed`` if given, else the file's ``seed``, else the global default."""
    from kit.defenses.trainer import TrainConfig, load_train_config

    resolved = load_train_config(config) if config is not None else {}
    for name, fld in _TRAIN_FIELDS.items():
        if _given(ctx, name):
            resolved[fld] = values[name]
    resolved["defense_params"] = {**resolved.get("defense_params", {}), **parse_params(params)}
    if values["seed"] is not None:
        resolved["seed"] = values["seed"]
    elif _given(ctx.parent, "seed") or "seed" not in resolved:
        resolved["seed"] = ctx.obj["seed"]
    return TrainConfig.from_dict(resolved, "train options")


@cli.command()
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TOML file whose [train] table sets any training option (docs/train.md); options given here win.")
@click.option("--defense", default="standard", type=LazyChoice(_defense_names), help="Training objective.")
@click.option("--arch", default="cnn-small", help="Zoo name (otkit models list) or path/to/file.py:ClassOrFactory.")
@click.option("--data", "data_spec", default="digits", help="Dataset spec (otkit data --help).")
@click.option("--epochs", type=click.IntRange(min=1), default=10)
@click.option("--batch-size", type=click.IntRange(min=1), default=64)
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd")
@click.option("--lr", type=float, default=0.05, help="Peak learning rate.")
@click.option("--momentum", type=float, default=0.9, help="SGD momentum.")
@click.option("--weight-decay", type=float, default=5e-4)
@click.option("--schedule", type=click.Choice(["constant", "multistep", "cosine"]), default="cosine")
@click.option("--augment", type=click.Choice(["auto", "none", "crop-flip"]), default="auto",
              help="Random crop + horizontal flip; auto: crop-flip for 3-channel images, none for greyscale.")
@click.option("--amp/--no-amp", default=False, help="Mixed precision (CUDA only; on a CPU: a warning, float32).")
@click.option("--eval-samples", type=click.IntRange(min=1), default=1000,
              help="Held-out test examples scored each epoch.")
@click.option("--eval-adv-samples", type=click.IntRange(min=0), default=128,
              help="Of those, how many are attacked each epoch with the defense's adversary (0: none).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Defense parameter, repeatable (e.g. --param eps=0.1); VALUE is read as JSON, else as text.")
@click.option("--seed", type=int, default=None, show_default="0", help="Seed for every random choice of training.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a line of text.")
@click.option("--resume", is_flag=True, help="Continue from OUT's .resume.pt state (raise --epochs to train longer).")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT (without --resume or --overwrite, an existing "
              "OUT is an error).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Checkpoint (.safetensors).")
@click.pass_context
def train(ctx: click.Context, config: Path | None, params: tuple[str, ...], resume: bool, overwrite: bool, out: Path,
          as_json: bool, **values: Any) -> None:
    """Train a (defended) network and write a checkpoint every epoch."""
    from kit.defenses.trainer import sidecar
    from kit.defenses.trainer import train as run_training

    cfg = _train_config(ctx, values, config, params)
    quiet = ctx.obj["quiet"]
    resume_state = sidecar(out, "resume.pt")
    set_interrupt_hint(lambda: f"every finished epoch is saved in {out}: add --resume to the same command to continue"
                       if resume_state.exists() else None)

    def on_epoch(rec: dict[str, Any]) -> None:
        if not quiet:
            adv = f"  adv acc {rec['test_adv_acc']:.4f} (first {rec['test_adv_n']})" if "test_adv_acc" in rec else ""
            click.echo(f"epoch {rec['epoch']:>3}/{cfg.epochs}  loss {rec['loss']:.4f}  "
                       f"held-out acc {rec['test_acc']:.4f}{adv}  {rec['seconds']:.1f}s", err=True)

    result = run_training(cfg, out, device=_device(ctx), resume=resume, overwrite=overwrite, on_epoch=on_epoch)
    doc = {"checkpoint": str(result.path), "weights_sha256": result.info.weights_sha256,
           "epochs": len(result.history) and result.history[-1]["epoch"],
           "test_acc": result.final.get("test_acc"), "test_adv_acc": result.final.get("test_adv_acc")}
    if as_json:
        _emit_json(doc)
        return
    adv = "" if doc["test_adv_acc"] is None else f", held-out adversarial accuracy {doc['test_adv_acc']:.4f}"
    acc = "n/a" if doc["test_acc"] is None else f"{doc['test_acc']:.4f}"
    click.echo(f"{doc['checkpoint']}: {doc['epochs']} epochs, held-out accuracy {acc}{adv}, "
               f"weights {doc['weights_sha256']}")


# ------------------------------------------------------------------------------------------------------------ evaluate
def _attack_names() -> list[str]:
    from kit.attacks.registry import list_attacks

    return list_attacks()


class ListedOption(click.Option):
    """A ``click.Option`` whose help ends with "One of: ..." from a registry, loaded only when that help is shown:
    importing the CLI (``otkit --help``, every command) does not import the registry and torch behind it."""

    def __init__(self, *args: Any, listed: Callable[[], list[str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._listed: Callable[[], list[str]] | None = listed

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        if self._listed is not None:
            self.help = f"{self.help or ''} One of: {', '.join(self._listed())}.".lstrip()
            self._listed = None
        return super().get_help_record(ctx)


def arch_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--arch FILE.py:NAME``: the one way a command may import a checkpoint's architecture file (docs/train.md)."""
    return click.option(
        "--arch", "arch", default=None, metavar="FILE.py:NAME",
        help="For a checkpoint whose architecture is your own Python file: that file, which is imported (its code "
             "runs) only if NAME and its sha256 match the checkpoint. Never imported without it.")(f)


def load_model_and_data(ckpt: Path, spec: str | None, split: str, samples: int | None, seed: int, device: Any, *,
                        arch: str | None = None):
    """The twin and the evaluation tensors, after checking that they fit each other.

    ``spec`` None: the dataset the checkpoint records (as ``otkit audit`` does). ``arch``: the user's ``--arch`` for a
    file architecture (:func:`kit.checkpoint.load_twin`)."""
    from kit.checkpoint import load_twin
    from kit.data import load_dataset

    model, info = load_twin(ckpt, device=device, arch=arch)
    spec = spec or (info.dataset or {}).get("spec")
    if not spec:
        raise UserError(f"{ckpt} does not record its dataset: give --data")
    ds = load_dataset(spec, split, seed=0)
    if list(ds.input_shape) != list(info.input_shape):
        raise UserError(f"{ckpt} takes inputs {'x'.join(map(str, info.input_shape))} but {spec} has "
                        f"{'x'.join(map(str, ds.input_shape))}")
    if ds.num_classes != info.num_classes:
        raise UserError(f"{ckpt} predicts {info.num_classes} classes but {spec} has {ds.num_classes}")
    if samples is not None:
        ds = ds.subset(samples, seed=seed)
    return model, info, ds


@cli.command()
@click.option("--twin", "--model", "ckpt", cls=AliasOption, required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="The checkpoint evaluated.")
@click.option("--data", "data_spec", default=None,
              help="Dataset spec (otkit data --help); default: the one the checkpoint was trained on.")
@click.option("--split", type=click.Choice(["test", "train"]), default="test")
@click.option("--attack", "attacks", multiple=True, required=True, metavar="NAME[@EPS_MAX]", cls=ListedOption,
              listed=_attack_names, help="Attack, repeatable; NAME@EPS_MAX overrides --eps-max for it.")
@click.option("--eps-max", type=float, default=None, help="Largest epsilon of the curves, in [0, 1] pixel units.")
@click.option("--samples", type=click.IntRange(min=1), default=500, help="Test examples evaluated (seeded subset).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256)
@click.option("--rungs", type=click.IntRange(min=1), default=8, help="Ladder radii of the minimum-epsilon search.")
@click.option("--checks/--no-checks", default=True, help="Run the validity checks (docs/checks.md).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for curves.json and curves.png.")
@seed_option
@click.option("--json", "as_json", is_flag=True, help="Print curves.json to stdout instead of a table.")
@arch_option
@click.pass_context
def evaluate(ctx: click.Context, ckpt: Path, data_spec: str | None, split: str, attacks: tuple[str, ...],
             eps_max: float | None, samples: int, batch_size: int, rungs: int, checks: bool, out: Path,
             seed: int | None, as_json: bool, arch: str | None = None) -> None:
    """Accuracy-vs-epsilon curves and AUAC of a checkpoint under attack, with validity checks."""
    import torch

    from evaluators.evaluate import AttackRequest, check_radii, write_outputs
    from evaluators.evaluate import evaluate as run_evaluation

    requests = [AttackRequest.parse(a, eps_max) for a in attacks]  # validate everything before any work
    device = _device(ctx)
    seed = _seed(ctx, seed)
    model, info, ds = load_model_and_data(ckpt, data_spec, split, samples, seed, device, arch=arch)
    check_radii(requests, info.input_shape)
    data_spec = ds.spec
    torch.manual_seed(seed)
    doc = run_evaluation(model, ds.x.to(device), ds.y.to(device), requests, seed=seed, batch_size=batch_size,
                         rungs=rungs, checks=checks)
    doc = {"schema": doc.pop("schema"),
           "model": {"path": str(ckpt), "weights_sha256": info.weights_sha256, "arch": info.arch_name,
                     "defense": info.defense},
           "data": {"spec": data_spec, "split": split, "fingerprint": ds.fingerprint, "n": len(ds)}, **doc}
    json_path, png_path = write_outputs(doc, out, title=f"{info.arch_name} ({info.defense}) on {data_spec}")
    if as_json:
        _emit_json(doc)
        return
    rows = [{"attack": r["name"], "norm": r["norm"], "eps_max": f"{r['eps_max']:.4g}",
             "clean": f"{r['accuracy'][0]:.4f}", "AUAC": f"{r['auac']:.4f}",
             "95% CI": f"[{r['auac_ci'][0]:.4f}, {r['auac_ci'][1]:.4f}]",
             "fwd/ex": f"{r['passes']['forward_per_example']:.1f}",
             "bwd/ex": f"{r['passes']['backward_per_example']:.1f}"} for r in doc["attacks"]]
    rows += [{"attack": c["name"], "norm": c["norm"], "eps_max": f"{c['eps_max']:.4g}", "clean": f"{c['accuracy'][0]:.4f}",
              "AUAC": f"{c['auac']:.4f}", "95% CI": f"[{c['auac_ci'][0]:.4f}, {c['auac_ci'][1]:.4f}]"}
             for c in doc["combined"]]
    click.echo(_table(rows, ["attack", "norm", "eps_max", "clean", "AUAC", "95% CI", "fwd/ex", "bwd/ex"]))
    if doc["checks"]:
        click.echo("\nchecks (see docs/checks.md):")
        for f in doc["checks"]:
            click.echo(f"  [{f['severity']}] {f['id']} ({f['attack'] or 'model'}): {f['message']}")
    else:
        click.echo("\nchecks: none raised")
    click.echo(f"\nwrote {json_path} and {png_path}", err=True)


# -------------------------------------------------------------------------------------------------------------- export
# exporters.formats imports no torch or onnx, so --help stays fast
_FORMATS = [f.value for f in ExportFormat]
_PRECISIONS = [p.value for p in Precision]
_PROVIDERS = list(ORT_PROVIDERS)


def _fmt_float(v: Any, spec: str = ".3g") -> str:
    return "" if v is None else format(v, spec)


def _parity_rows(reports: list[tuple[str, str, Any]]) -> list[dict[str, Any]]:
    """Table rows from (file, exporter, ParityReport)."""
    return [{"file": f, "engine": r.engine.split(" [", 1)[-1].rstrip("]"), "precision": r.precision, "exporter": ex,
             "samples": r.samples, "max|dlogit|": _fmt_float(r.max_abs_diff),
             "mean|dlogit|": _fmt_float(r.mean_abs_diff), "tolerance": _fmt_float(r.tolerance),
             "top-1 agree": f"{r.top1_agreement:.4f}", "twin acc": _fmt_float(r.twin_accuracy, ".4f"),
             "engine acc": _fmt_float(r.engine_accuracy, ".4f"), "verdict": r.verdict} for f, ex, r in reports]


_PARITY_COLUMNS = ["file", "engine", "precision", "exporter", "samples", "max|dlogit|", "mean|dlogit|", "tolerance",
                   "top-1 agree", "twin acc", "engine acc", "verdict"]


@cli.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(_FORMATS), default="onnx",
              help="onnx (fp32), onnx-fp16, onnx-int8 (static Q/DQ) or a TensorRT engine.")
@click.option("--precision", type=click.Choice(_PRECISIONS), default=None,
              help="TensorRT precision (default fp32); the ONNX formats imply theirs.")
@click.option("--max-batch", type=click.IntRange(min=1), default=DEFAULT_MAX_BATCH,
              help="Largest batch per engine call (the TensorRT profile's maximum).")
@click.option("--data", "data_spec", default=None,
              help="Dataset of the parity check (test split) and int8 calibration (train split); default: the "
                   "checkpoint's.")
@click.option("--samples", type=click.IntRange(min=1), default=256, help="Test samples of the parity check.")
@click.option("--calibration-samples", type=click.IntRange(min=1), default=256, help="Training samples for int8.")
@click.option("--opset", type=click.IntRange(min=MIN_OPSET), default=DEFAULT_OPSET, help="ONNX opset.")
@click.option("--workspace-mib", type=click.IntRange(min=1), default=1024, help="TensorRT workspace limit (MiB).")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TensorRT timing cache file (default: one per GPU under ~/.cache/otkit/tensorrt).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output file: .onnx, or .engine for TensorRT (its ONNX file and .engine.json sidecar go beside).")
@seed_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the parity table.")
@arch_option
@click.pass_context
def export(ctx: click.Context, checkpoint: Path, fmt: str, precision: str | None, max_batch: int,
           data_spec: str | None, samples: int, calibration_samples: int, opset: int, workspace_mib: int,
           timing_cache: Path | None, out: Path, seed: int | None, as_json: bool, arch: str | None = None) -> None:
    """Export a checkpoint to ONNX (fp32, fp16, int8) or TensorRT, checked against the twin on real samples.

    Each export is checked (onnx.checker full check, strict shape inference) and compared with the twin on test
    samples: an FP32 export beyond tolerance fails with exit status 1 and writes nothing; fp16 and int8 exports report
    their top-1 agreement and logit gap.
    """
    from exporters.checkpoint import export_checkpoint
    from exporters.parity import ParityError

    try:
        exp = export_checkpoint(checkpoint, fmt, out, precision=precision, max_batch=max_batch, data_spec=data_spec,
                                samples=samples, calibration_samples=calibration_samples, opset=opset,
                                workspace_mib=workspace_mib, timing_cache=timing_cache, device=_device(ctx),
                                seed=_seed(ctx, seed), arch=arch)
        result, reports = exp.result, exp.reports
    except ParityError as e:
        if as_json:
            _emit_json({"checkpoint": str(checkpoint), "written": False, "parity": e.report.to_dict()})
        else:
            click.echo(_table(_parity_rows([(out.name, "", e.report)]), _PARITY_COLUMNS))
        click.echo(f"Error: {e}; nothing written", err=True)
        ctx.exit(1)
    if as_json:
        _emit_json({"checkpoint": str(checkpoint), "weights_sha256": exp.weights_sha256, "data": exp.data_spec,
                    "written": True, **result.to_dict()})
        return
    click.echo(_table(_parity_rows(reports), _PARITY_COLUMNS))
    if getattr(result, "exporter_note", ""):
        click.echo(f"note: {result.exporter_note}", err=True)
    click.echo(f"wrote {out} ({exp.sha256})", err=True)


# -------------------------------------------------------------------------------------------------------------- engine
@cli.group(cls=KitGroup)
def engine() -> None:
    """Exported engines (.onnx, TensorRT .engine, or a checkpoint as the twin): inspect and run them."""


@engine.command("info")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def engine_info(ctx: click.Context, path: Path, as_json: bool) -> None:
    """What a file is: format, opset, inputs/outputs, metadata, sha256, and where it can run."""
    from exporters.formats import engine_kind
    from kit.io import require_file

    kind = engine_kind(require_file(path, "engine file"))
    if kind == "onnx":
        from exporters.onnx import describe_onnx

        doc = describe_onnx(path)
    elif kind == "tensorrt":
        from exporters.tensorrt import describe_engine

        doc = describe_engine(path)
    else:
        from kit.checkpoint import read_checkpoint
        from kit.io import sha256_file

        _, ck = read_checkpoint(path)
        doc = {"path": str(path), "format": "torch checkpoint", "sha256": "sha256:" + sha256_file(path),
               "weights_sha256": ck.weights_sha256, "arch": ck.arch_name, "input_shape": ck.input_shape,
               "num_classes": ck.num_classes, "classes": ck.class_names, "precision": "fp32"}
    if as_json:
        _emit_json(doc)
        return
    for key, val in doc.items():
        if isinstance(val, dict) and val and key in ("metadata", "sidecar", "checks", "ops", "opset", "here",
                                                     "otkit_engine"):
            click.echo(f"{key}:")
            width = max(len(str(k)) for k in val) + 2
            for k, v in val.items():
                click.echo(f"  {k:<{width}}{json.dumps(v) if not isinstance(v, str) else v}")
        elif isinstance(val, list) and val and isinstance(val[0], dict):
            click.echo(f"{key}:")
            for item in val:
                click.echo("  " + "  ".join(f"{k} {v}" for k, v in item.items()))
        else:
            click.echo(f"{key:<20}{', '.join(map(str, val)) if isinstance(val, list) else val}")


@engine.command("run")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", "data_spec", required=True, help="Dataset spec (otkit data --help).")
@click.option("--split", type=click.Choice(["test", "train"]), default="test")
@click.option("--samples", type=click.IntRange(min=1), default=1000, help="Examples run (seeded subset).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Largest batch per engine call.")
@click.option("--provider", "providers", multiple=True, type=click.Choice(_PROVIDERS),
              help="ONNX Runtime provider, repeatable (default: cpu on the CPU, cuda on a GPU).")
@click.option("--twin", "twin_ckpt", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Checkpoint to compare against (logit gap, top-1 agreement; exit 1 if an FP32 engine is beyond "
                   "tolerance).")
@seed_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@arch_option
@click.pass_context
def engine_run(ctx: click.Context, path: Path, data_spec: str, split: str, samples: int, batch_size: int | None,
               providers: tuple[str, ...], twin_ckpt: Path | None, seed: int | None, as_json: bool,
               arch: str | None = None) -> None:
    """Run an engine on a dataset: accuracy and images/s, and parity against its twin with --twin."""
    import time

    from exporters.engines import check_compatible, load_engine

    device = _device(ctx)
    eng = load_engine(path, device, providers=list(providers) or None, max_batch=batch_size, arch=arch)
    twin = None
    if twin_ckpt is not None:
        twin = load_engine(twin_ckpt, device, max_batch=batch_size, arch=arch)
        check_compatible(twin, eng.input_shape, eng.num_classes, str(path))
    from exporters.checkpoint import fitting_dataset

    ds = fitting_dataset(data_spec, split, list(eng.input_shape), eng.num_classes, eng.name, samples,
                          _seed(ctx, seed))
    x = ds.x.to(device)
    t0 = time.perf_counter()
    logits = eng(x)
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    acc = float((logits.argmax(1).cpu() == ds.y).double().mean())
    doc: dict[str, Any] = {"engine": eng.describe(), "data": {"spec": data_spec, "split": split, "n": len(ds),
                                                               "fingerprint": ds.fingerprint},
                           "accuracy": acc, "seconds": seconds, "images_per_s": len(ds) / seconds if seconds else None}
    failed = False
    if twin is not None:
        from exporters.parity import compare_logits

        report = compare_logits(twin(x), logits, precision=eng.precision, name=eng.name, labels=ds.y,
                                runtime="tensorrt" if eng.backend == "tensorrt" else "onnxruntime")
        doc["parity"] = report.to_dict()
        failed = not report.passed
    if as_json:
        _emit_json(doc)
    else:
        click.echo(f"{eng.name}  {eng.precision}  {eng.sha256}")
        click.echo(f"accuracy {acc:.4f} on {len(ds)} {split} examples of {data_spec}  "
                   f"({doc['images_per_s']:.0f} images/s, batch {eng.max_batch})")
        if twin is not None:
            click.echo(_table(_parity_rows([(path.name, "", report)]), _PARITY_COLUMNS))
    if failed:
        click.echo(f"Error: parity check failed: {report.summary()}", err=True)
        ctx.exit(1)


# Commands kept in their own modules register on `cli` when imported (they import `cli` from here).
from kit import cli_audit  # noqa: E402, F401  (isort: skip)
from kit.cli_report import report, verify  # noqa: E402  (isort: skip)

cli.add_command(report)
cli.add_command(verify)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="otkit")


if __name__ == "__main__":
    main()
