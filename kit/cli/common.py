"""What the ``otkit`` commands share: options, output, the command's device and seed, the Ctrl-C hint, versions.

Imports only click and the kit's light modules (no command module, no torch at import): ``otkit --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Any

import click

import kit
from exporters.formats import ORT_PROVIDERS
from kit.errors import UserError

__all__ = [
    "DEFENSE_NAMES", "EXIT_INTERRUPTED", "EXIT_STATUSES", "FLAG_IDS", "PROVIDERS", "AliasOption", "LazyChoice",
    "ListedOption", "arch_option", "attack_names", "command_device", "command_seed", "command_world", "lead_lock", "current_hint",
    "dependency_versions", "emit_json", "engine_input_option", "flag_ids", "os_error_message", "seed_option",
    "set_interrupt_hint", "table", "twin_import_options",
]

EXIT_STATUSES = """\b
Exit statuses:
  0  success
  1  a check failed: an audit's gate or fidelity verdict (audit, run), a
     certificate's gate or check (certify, run), a hash or recheck (verify),
     an FP32 parity check (export, engine run --twin)
  2  usage or input error (bad option, missing or malformed file, unknown name,
     a folder in use, a write the disk refused), always one line "Error: ..."
  130 interrupted (Ctrl-C); train, audit, certify and run continue with
     --resume"""


EXIT_INTERRUPTED = 130

#: errno values that mean "the disk or folder refused a write" (reported as ``cannot write PATH: reason``)
_WRITE_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EROFS", "EFBIG") if hasattr(errno, n))

#: ONNX Runtime providers ``--provider`` accepts (exporters.formats imports no torch or onnx, so --help stays fast)
PROVIDERS = list(ORT_PROVIDERS)

# Names from registries whose modules import torch, copied here so that ``--help`` imports none of them;
# tests/test_startup.py checks each copy against its registry.
#: The validity checks' ids, in the order of :data:`evaluators.checks.CHECKS` (``--allow-flag``'s help).
FLAG_IDS = (
    "curve-not-monotone", "not-zero-at-unbounded-eps", "zero-gradients", "non-finite-gradients",
    "outputs-look-like-probabilities", "randomised-outputs", "non-finite-outputs", "single-step-beats-multi-step",
    "black-box-beats-white-box", "fixed-eps-contradiction", "adversarial-not-verified", "precision-not-deployed",
    "engine-weights-differ", "engine-graph-differs", "test-blind", "engine-above-twin", "certificate-violated",
    "verifier-beats-attacks",
)
#: The defenses in registration order, as :func:`kit.defenses.list_defenses` gives them (``train --defense``'s help).
DEFENSE_NAMES = (
    "standard", "madry", "mixed", "trades", "atda", "sat", "got-pgd", "got-trades", "otc", "otc-adv", "unbalanced-at",
    "wat", "gaussian", "smoothadv",
)


# ------------------------------------------------------------------------------------------------------ interruption
_interrupt_hint: str | Callable[[], str | None] | None = None


def set_interrupt_hint(hint: str | Callable[[], str | None] | None) -> None:
    """What the one line printed on Ctrl-C tells the user to do next (e.g. how to resume); ``None``: nothing to do.

    A callable is asked at the moment of the interruption (e.g. whether an epoch has been saved yet)."""
    global _interrupt_hint
    _interrupt_hint = hint


def current_hint() -> str | None:
    """The hint :func:`set_interrupt_hint` set last, asked now if it is a callable."""
    hint = _interrupt_hint
    return hint() if callable(hint) else hint


def os_error_message(e: OSError) -> str:
    """One line for a failed read or write: the file, and the system's reason in its own words."""
    where = e.filename if e.filename is not None else "a file"
    reason = e.strerror or type(e).__name__
    verb = "cannot write" if e.errno in _WRITE_ERRNOS else "cannot use"
    return f"{verb} {where}: {reason}"


# ---------------------------------------------------------------------------------------------------------- versions
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


# ------------------------------------------------------------------------------------------------------------ output
def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Left-aligned plain-text table (pastes into issues and terminals alike)."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def status(message: str) -> None:
    """A status line on stderr ("wrote ..."), unless ``otkit --quiet``: people's messages, never results (those go
    to stdout), never errors or warnings (those are printed whatever ``--quiet`` says)."""
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    if not (isinstance(obj, dict) and obj.get("quiet")):
        click.echo(message, err=True)


def option_given(ctx: click.Context, name: str) -> bool:
    """Whether the user gave option ``name`` (on the command line or through the environment), not its default:
    a default is no request, so e.g. no "N examples requested but ..." note for it."""
    return ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT


def emit_json(obj: Any) -> None:
    """``obj`` as indented JSON on stdout (anything JSON does not know, as its text)."""
    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


# ------------------------------------------------------------------------------------------------ device and seed
def command_device(ctx: click.Context):  # noqa: ANN201  (torch.device; torch is imported lazily)
    """The device of the global ``otkit --device`` option, resolved (``auto``: CUDA when present); under ``torchrun``
    each process's own GPU (``cuda:LOCAL_RANK``)."""
    from kit.distributed import rank_device
    from kit.runtime import resolve_device

    spec = ctx.find_root().obj["device"]
    return rank_device(resolve_device(spec), spec, command_world())


def command_world():  # noqa: ANN201  (kit.distributed.World)
    """This process's place in the run (:func:`kit.distributed.world`; one process outside ``torchrun``). Ranks other
    than the lead show no progress bars."""
    from kit.distributed import world
    from kit.runtime import set_quiet

    w = world()
    if not w.lead:  # one voice: the lead's bars and status lines (errors still come from every process)
        set_quiet(True)
        logging.getLogger().setLevel(logging.WARNING)
    return w


@contextlib.contextmanager
def lead_lock(out: Path, command: str) -> Iterator[None]:
    """The output folder's lock (:func:`kit.io.folder_lock`), held by the lead process alone: under ``torchrun`` every
    process works for the same folder."""
    from kit.io import folder_lock

    if command_world().lead:
        with folder_lock(out, "--out", command=command):
            yield
    else:
        yield


def seed_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--seed N`` on a command: every random choice it makes (subsets, attack restarts, training)."""
    return click.option("--seed", "seed", type=int, default=None, show_default="0",
                        help="Seed for every random choice of this command.")(f)


def command_seed(ctx: click.Context, seed: int | None) -> int:
    """The command's ``--seed``, else the (hidden, older) global ``otkit --seed N``, else 0."""
    return int(seed) if seed is not None else int(ctx.find_root().obj["seed"])


# ----------------------------------------------------------------------------------------------------------- options
class AliasOption(click.Option):
    """An option with old spellings kept working but left out of ``--help`` (only the first name is shown)."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        record = super().get_help_record(ctx)
        if record is None:
            return None
        shown = self.opts[0] + (f" {self.make_metavar(ctx)}" if not self.is_flag else "")
        return shown, record[1]


class LazyChoice(click.Choice):
    """A ``click.Choice`` whose choices come from a registry, loaded only when needed (``--help`` stays fast).

    ``shown``: the names ``--help`` shows without loading the registry (a copy, such as :data:`DEFENSE_NAMES`); a
    value given on the command line is still checked against the registry itself.
    """

    def __init__(self, load: Callable[[], list[str]], shown: tuple[str, ...] | None = None) -> None:
        self._load = load
        self._loaded: tuple[str, ...] | None = None
        self._shown = shown
        self.case_sensitive = True

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str | None:
        if self._shown is not None and self._loaded is None and param.param_type_name == "option":
            return f"[{'|'.join(self._shown)}]"
        return super().get_metavar(param, ctx)

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        if self._loaded is None:
            self._loaded = tuple(self._load())
        return self._loaded

    @choices.setter
    def choices(self, value: Any) -> None:  # click's __init__ assigns it; the registry is the source
        self._loaded = tuple(value)


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


def flag_ids() -> list[str]:
    """The validity checks' ids (for ``ListedOption(listed=flag_ids)``): :data:`FLAG_IDS`, no import."""
    return list(FLAG_IDS)


def attack_names() -> list[str]:
    """The attack registry's names (for ``ListedOption(listed=attack_names)``; imports the registry, which imports no
    attack module and no torch, when called)."""
    from kit.attacks.registry import list_attacks

    return list_attacks()


def arch_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--arch FILE.py:NAME``: the one way a command may import a checkpoint's architecture file (docs/train.md)."""
    return click.option(
        "--arch", "arch", default=None, metavar="FILE.py:NAME",
        help="For a checkpoint whose architecture is your own Python file: that file, which is imported (its code "
             "runs) only if NAME and its sha256 match the checkpoint. Never imported without it.")(f)


# ------------------------------------------------------------------------------------- models trained elsewhere
_TWIN_FLAGS = ("num_classes", "classes_file", "input_shape", "input_range", "mean", "std", "input_layout", "key")


def twin_import_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The facts about a model trained elsewhere that ``otkit models import`` takes (docs/byom.md), on a command
    whose twin may be such a model: the command receives them as one ``twin_options`` (``TwinOptions``), with its
    ``--arch`` (and ``--dataset`` where it has one) inside."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kw: Any) -> Any:
        given = {k: kw.pop(k) for k in _TWIN_FLAGS}
        kw["twin_options"] = build_twin_options(given, arch=kw.get("arch"), dataset=kw.get("dataset"))
        return f(*args, **kw)

    options = [
        click.option("--num-classes", type=click.IntRange(min=1), default=None,
                     help="Model trained elsewhere: number of classes, where the file does not say."),
        click.option("--classes", "classes_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                     help="Model trained elsewhere: class names, one per line (sets the class count)."),
        click.option("--input-shape", default=None, metavar="C,H,W",
                     help="Model trained elsewhere: the shape of one input, where the file does not say."),
        click.option("--input-range", default=None, metavar="LO,HI",
                     help="Model trained elsewhere: the values it takes for pixels 0 and 1 (0,255 for 0-255 input) "
                          "[default: 0,1]."),
        click.option("--mean", default=None, metavar="M[,M,M]",
                     help="Model trained elsewhere: per-channel mean it subtracts (units of --input-range); folded "
                          "into the twin, which takes [0, 1] pixels."),
        click.option("--std", default=None, metavar="S[,S,S]",
                     help="Model trained elsewhere: per-channel std it divides by (units of --input-range)."),
        click.option("--input-layout", type=click.Choice(["nchw", "nhwc"]), default=None,
                     help="Model trained elsewhere: the layout of its input [default: nchw]."),
        click.option("--key", default=None, metavar="KEY[.KEY]",
                     help="Weights file: where the state dict is, when no known layout finds it."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def build_twin_options(given: dict[str, Any], arch: str | None = None, dataset: str | None = None) -> Any:
    """``TwinOptions`` from the flags of :func:`twin_import_options` (each parsed on its own: a bad one is a
    UserError naming it)."""
    from exporters.twins import TwinOptions, parse_input_shape, read_class_names
    from kit.convention import InputConvention, floats

    conv: dict[str, Any] = {}
    if given.get("input_range") is not None:
        lo_hi = floats(given["input_range"], "range (--input-range LO,HI)")
        if len(lo_hi) != 2:
            raise UserError(f"--input-range must be LO,HI, got {given['input_range']!r}")
        conv["range"] = lo_hi
    for key in ("mean", "std"):
        if given.get(key) is not None:
            conv[key] = floats(given[key], f"{key} (--{key})")
    if given.get("input_layout") is not None:
        conv["layout"] = given["input_layout"]
    return TwinOptions(
        arch=arch,
        num_classes=given.get("num_classes"),
        classes=read_class_names(given["classes_file"]) if given.get("classes_file") else None,
        input_shape=parse_input_shape(given["input_shape"]) if given.get("input_shape") else None,
        convention=InputConvention(**conv) if conv else None,
        dataset=dataset,
        key=given.get("key"),
    )


def engine_input_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--engine-input DESCRIPTION``: what an engine exported outside the kit takes (docs/byom.md); the command gets
    ``engine_input`` as an ``InputConvention`` or None."""

    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        if value is None:
            return None
        from kit.convention import parse_convention

        return parse_convention(value)

    return click.option(
        "--engine-input", "engine_input", default=None, metavar="DESCRIPTION", callback=parse,
        help="What an engine exported outside the kit takes, applied outside it so epsilons stay in [0, 1] pixels: "
             "fields range=LO,HI mean=M,.. std=S,.. layout=nchw|nhwc dtype=float32|float16|uint8 and presets "
             "(identity, imagenet, cifar10, mnist, inception), separated by ';' or spaces, later ones overriding "
             "earlier ones. The kit's own exports record it.")(f)


def sign_key_option(f: Callable[..., Any] | None = None, *, lazy: bool = False) -> Any:
    """``--sign-key KEY`` (or ``$OTKIT_SIGN_KEY``): sign what the command writes (docs/signing.md). The key is read
    when the command line is parsed, so a bad key stops the command before any work; the command gets ``sign_key``
    as a :class:`kit.signing.SigningKey` or None. ``lazy=True`` (``@sign_key_option(lazy=True)``): the command gets
    the key's path and reads it with :func:`kit.signing.load_signing_key` only where it signs (``otkit report`` signs
    only a fold, and must not fail on a key in the environment that it will not use)."""
    if f is None:
        return lambda g: sign_key_option(g, lazy=lazy)

    def load(ctx: click.Context, param: click.Parameter, value: Path | None) -> Any:
        if value is None:
            return None
        from kit.signing import load_signing_key

        return load_signing_key(value)

    return click.option(
        "--sign-key", "sign_key", default=None, envvar="OTKIT_SIGN_KEY", callback=None if lazy else load,
        type=click.Path(dir_okay=False, path_type=Path), metavar="KEY",
        help="Sign the report with this ed25519 private key (otkit keygen): an in-toto statement of the engine, twin, "
             "data fingerprint and every file written, in a Sigstore bundle beside it (*.sigstore.json); "
             "otkit verify --public-key checks it. Password, if any, in $OTKIT_SIGN_PASSWORD. [env: "
             "OTKIT_SIGN_KEY]")(f)


class CI(str, Enum):
    """Where ``--ci`` sends its annotations and summary."""

    AUTO = "auto"
    GITHUB = "github"
    NONE = "none"


def ci_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--ci auto|github|none`` and ``--junit FILE`` (docs/release.md); the command gets ``ci`` (a :class:`CI`
    resolved: ``auto`` is ``github`` when ``GITHUB_ACTIONS`` is ``true``) and ``junit`` (a Path or None, its
    folder checked when the command line is parsed)."""

    def resolve(ctx: click.Context, param: click.Parameter, value: str) -> CI:
        ci = CI(value)
        if ci is CI.AUTO:
            return CI.GITHUB if os.environ.get("GITHUB_ACTIONS") == "true" else CI.NONE
        return ci

    def check_junit(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
        if value is not None and not value.resolve().parent.is_dir():
            raise UserError(f"--junit {value}: no such folder {value.resolve().parent}")
        return value

    f = click.option("--junit", "junit", default=None, type=click.Path(dir_okay=False, path_type=Path),
                     metavar="FILE", callback=check_junit,
                     help="Also write the gates, verdicts and flags as JUnit XML test cases (Jenkins, GitLab).")(f)
    return click.option("--ci", "ci", type=click.Choice([c.value for c in CI]), default=CI.AUTO.value,
                        show_default=True, callback=resolve,
                        help="github: append the summary to $GITHUB_STEP_SUMMARY and print ::error / ::warning "
                             "annotations for failed gates, verdicts and flags; auto: github when $GITHUB_ACTIONS is "
                             "true.")(f)


def publish_ci(ci: CI, junit: Path | None, items: list[tuple[str, dict[str, Any], str, Path]],
               as_json: bool = False) -> None:
    """What ``--ci`` and ``--junit`` ask for, for the documents a command wrote: ``items`` holds (title, document,
    its Markdown, its folder). Annotations go to stdout, where the runner reads workflow commands, or to stderr with
    ``--json`` (stdout then holds the JSON alone; the runner reads both streams of a ``run`` step)."""
    from evaluators.ci import annotation, append_step_summary, cases, junit_xml
    from kit.io import atomic_write

    if ci is CI.GITHUB:
        for title, doc, _, _ in items:
            for c in cases(doc):
                if c.level is not None:
                    click.echo(annotation(c.level, f"otkit {title}: {c.name}", c.message), err=as_json)
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            for title, _, markdown, folder in items:
                if append_step_summary(summary, markdown + "\n", str(folder)):
                    click.echo(f"the step summary was cut to GitHub's 1 MiB limit; {title} is whole in {folder}",
                               err=True)
        else:
            click.echo("--ci github: GITHUB_STEP_SUMMARY is not set, so no step summary was written", err=True)
    if junit is not None:
        with atomic_write(junit) as f:
            f.write(junit_xml([(title, doc) for title, doc, _, _ in items]))
        status(f"wrote {junit}")
