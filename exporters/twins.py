"""Twin sources: every way to obtain a twin, as one thing (a module taking [0, 1] pixels and a CheckpointInfo).

A twin is the PyTorch model whose gradients drive an audit. The kit's own checkpoints carry everything; a model
trained elsewhere comes as one of:

========================  =============================================================  ==========================
source                    what is read                                                   what the user states
========================  =============================================================  ==========================
kit checkpoint            ``.safetensors`` (or ``.pt``) with otkit metadata              nothing
weights                   ``.pt``/``.pth``/``.bin``/``.ckpt`` (``torch.load(weights_only=  ``--arch``, classes,
                          True)``) or ``.safetensors``; the state dict found in the       ``--input-shape``
                          layouts released checkpoints use (:mod:`kit.twins.layouts`)
program                   a ``torch.export`` archive (``.pt2``): the program's module     classes, if not static
onnx                      an ONNX graph rebuilt as a differentiable torch module          classes, if not static
                          (:mod:`kit.twins.from_onnx`), checked against ONNX Runtime
========================  =============================================================  ==========================

A model trained on normalised, 0-255 or NHWC input gets its :class:`~kit.convention.InputConvention` folded in
(:class:`~kit.convention.InputModule`, or for a zoo architecture its own normalisation), so the twin takes [0, 1]
NCHW pixels like every kit model and epsilons stay in pixel units. :func:`import_twin` builds the twin and the
CheckpointInfo that ``otkit models import`` saves as a kit checkpoint; :func:`load_any_twin` is what ``--twin``
accepts everywhere (a kit checkpoint, or any source above imported on the fly with the same flags).

No code is imported from any source: weights are read without unpickling code, a program is a graph, an ONNX file a
graph; only a Python architecture file the user names (``--arch FILE.py:NAME``) runs, as for training.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from kit.convention import IDENTITY, InputConvention, InputModule
from kit.errors import UserError
from kit.io import require_file
from kit.runtime import exact_cuda

__all__ = ["SOURCE_KINDS", "ImportedTwin", "TwinOptions", "import_twin", "load_any_twin", "source_kind",
           "with_engine_input"]

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".safetensors")
SOURCE_KINDS = ("checkpoint", "weights", "program", "onnx")

#: samples of uniform noise the ONNX twin is checked on when no real data is given
NOISE_SAMPLES = 64


@dataclass(frozen=True)
class TwinOptions:
    """What the user states about a model the file does not describe (the flags of ``otkit models import``).

    Attributes
    ----------
    arch : str, optional
        For weights: a zoo name, ``FILE.py:NAME``, ``timm:NAME`` or ``torchvision:NAME``. For a kit checkpoint built
        from a Python file: that file (``--arch``, as everywhere).
    num_classes : int, optional
    classes : tuple of str, optional
        Class names (``--classes FILE``); their number is the class count.
    input_shape : (C, H, W), optional
    convention : InputConvention, optional
        The model's input (range, mean/std, layout), folded into the twin.
    dataset : str, optional
        A dataset spec, recorded with its fingerprint (and the real samples an ONNX twin is checked on).
    key : str, optional
        Where the state dict is in a weights file (``--key``, dotted).
    """

    arch: str | None = None
    num_classes: int | None = None
    classes: tuple[str, ...] | None = None
    input_shape: tuple[int, int, int] | None = None
    convention: InputConvention | None = None
    dataset: str | None = None
    key: str | None = None

    def stated(self) -> list[str]:
        """The flags given, as their command-line names (for "a kit checkpoint says this itself" errors)."""
        flags = {"num_classes": "--num-classes", "classes": "--classes", "input_shape": "--input-shape",
                 "convention": "--input-range/--mean/--std/--input-layout", "dataset": "--dataset", "key": "--key"}
        return [flag for name, flag in flags.items() if getattr(self, name) is not None]


@dataclass
class ImportedTwin:
    """A twin from any source: the module (eval mode, [0, 1] NCHW pixels in), its metadata, and the ONNX parity.

    ``parity`` is the :class:`exporters.parity.ParityReport` (as a dict) of an ONNX-derived twin against ONNX Runtime
    on the check samples; ``None`` for the other sources.
    """

    model: nn.Module
    info: Any  # kit.checkpoint.CheckpointInfo
    kind: str
    parity: dict[str, Any] | None = None


def source_kind(path: str | Path) -> str:
    """``checkpoint`` (a kit checkpoint), ``weights``, ``program`` (``.pt2``) or ``onnx``, from the file.

    Raises
    ------
    UserError
        A missing file or a suffix no source uses.
    """
    from kit.checkpoint import has_kit_metadata

    path = require_file(path, "twin")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".pt2":
        return "program"
    if suffix in WEIGHT_SUFFIXES:
        return "checkpoint" if has_kit_metadata(path) else "weights"
    raise UserError(f"{path}: unknown twin file type {suffix or '(no suffix)'}: give a kit checkpoint, weights "
                    f"({', '.join(WEIGHT_SUFFIXES)}), a torch.export program (.pt2) or an ONNX file (.onnx)")


def with_engine_input(options: TwinOptions, twin_path: str | Path, engine_path: str | Path,
                      engine_input: InputConvention) -> TwinOptions:
    """A twin rebuilt from the engine's own file takes what the engine takes (``engine_input``, its ``--engine-input``
    or recorded convention) unless its own ``--input-*`` flags say otherwise; any other twin, ``options`` as given."""
    same = Path(twin_path).resolve() == Path(engine_path).resolve()
    if same and options.convention is None and not engine_input.identity:
        return dataclasses.replace(options, convention=engine_input)
    return options


def load_any_twin(path: str | Path, device: str | torch.device = "cpu", options: TwinOptions | None = None, *,
                  samples: torch.Tensor | None = None, kind: str | None = None) -> ImportedTwin:
    """What ``--twin`` accepts: a kit checkpoint as it is, anything else imported on the fly (:func:`import_twin`).

    ``kind`` is :func:`source_kind`'s answer when the caller has it already (telling a ``.pt`` file's kind reads it).

    Raises
    ------
    UserError
        Import flags beside a kit checkpoint (it states those facts itself), and everything :func:`import_twin` and
        :func:`kit.checkpoint.load_twin` refuse.
    """
    from kit.checkpoint import load_twin

    options = options or TwinOptions()
    kind = kind or source_kind(path)
    if kind != "checkpoint":
        twin = import_twin(path, options, samples=samples, kind=kind)
        twin.model = twin.model.to(device).eval()
        if torch.device(device).type == "cuda":
            exact_cuda()  # again: an imported architecture file may have turned TF32 or cuDNN autotuning on
        return twin
    stated = options.stated()
    if stated:
        raise UserError(f"{path} is a kit checkpoint: it records its classes, input shape and input itself; drop "
                        f"{', '.join(stated)}")
    model, info = load_twin(path, device=device, arch=options.arch)
    return ImportedTwin(model, info, kind)


def import_twin(path: str | Path, options: TwinOptions, *, samples: torch.Tensor | None = None,
                kind: str | None = None) -> ImportedTwin:
    """Build a twin from a model trained elsewhere, with the CheckpointInfo a kit checkpoint of it records.

    Parameters
    ----------
    path : path
        Weights, a ``.pt2`` program or an ONNX file (not a kit checkpoint: load those with ``load_twin``).
    options : TwinOptions
        What the file does not say.
    samples : torch.Tensor, optional
        Real [0, 1] pixels (N, C, H, W) to check an ONNX twin against ONNX Runtime on; default: the ``--dataset``'s
        test images, else uniform noise (stated in the parity record).
    kind : str, optional
        :func:`source_kind`'s answer, when the caller has it already.

    Returns
    -------
    ImportedTwin
        The module on the CPU in eval mode.

    Raises
    ------
    UserError
        A missing fact (one line naming the flag), contradictory flags, a file no layout fits, weights that do not
        fit the architecture (the first offending tensor named), an ONNX twin that does not match ONNX Runtime.
    """
    kind = kind or source_kind(path)
    if kind == "checkpoint":
        raise UserError(f"{path} is already a kit checkpoint: nothing to import (otkit models show {path})")
    path = Path(path)
    convention = options.convention or IDENTITY
    data = path.read_bytes()
    source: dict[str, Any] = {"kind": kind, "file": path.name, "sha256": "sha256:" + hashlib.sha256(data).hexdigest()}
    parity = None
    if kind == "weights":
        model, record, shape, num_classes = _from_weights(path, options, convention, source)
    elif kind == "program":
        model, record, shape, num_classes = _from_program(path, options, convention, source)
    else:
        model, record, shape, num_classes, parity = _from_onnx(path, options, convention, source, samples)
    named = source.pop("class_names", None)  # what the file itself names (a kit ONNX export's metadata)
    recorded_data = source.pop("recorded_dataset", None)
    classes = list(options.classes) if options.classes is not None else \
        list(named) if named else [str(i) for i in range(num_classes)]
    info = _info(record, classes, shape, convention, options, source)
    if not info.dataset and recorded_data:  # no --dataset: the kit export's own record, as it states it
        info.dataset = dict(recorded_data)
    from kit.checkpoint import weights_sha256

    info.weights_sha256 = weights_sha256({k: v.detach() for k, v in model.state_dict().items()})
    return ImportedTwin(model.eval(), info, kind, parity)


# --------------------------------------------------------------------------------------------------------- sources
def _from_weights(path: Path, options: TwinOptions, convention: InputConvention,
                  source: dict[str, Any]) -> tuple[nn.Module, dict[str, Any], tuple[int, int, int], int]:
    from kit.arch import build_model, is_file_arch
    from kit.twins import hub, layouts

    if not options.arch:
        raise UserError(f"{path} holds weights only: give the architecture with --arch (a zoo name, FILE.py:NAME, "
                        "timm:NAME or torchvision:NAME)")
    num_classes = _num_classes(options, None, str(path))
    shape = _input_shape(options, None, str(path))
    obj = layouts.read_weights(path)
    state, where = layouts.find_state_dict(obj, options.key, str(path))
    state, stripped = layouts.strip_prefixes(state)
    source.update(state_dict=where, prefixes_stripped=stripped, key=options.key)
    arch = options.arch
    convention.check_channels(shape[0], str(path))
    try:
        if hub.is_hub_arch(arch):
            model, record = hub.build_hub(arch, num_classes, shape)
        elif is_file_arch(arch):
            model, record = build_model(arch, num_classes, shape)
        else:  # a zoo model: its own normalisation layer takes the convention (it is NCHW by construction)
            if convention.layout != "nchw":
                raise UserError(f"zoo model {arch} takes NCHW input: --input-layout {convention.layout} does not "
                                "apply")
            mean, std = _affine(convention, shape[0])
            model, record = build_model(arch, num_classes, shape, {"mean": mean, "std": std})
    except (RuntimeError, MemoryError) as e:  # e.g. an input shape whose layers do not fit in memory
        raise UserError(f"cannot build {arch} for input shape {','.join(map(str, shape))}: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    state, lead = _strip_shared_head(state, model)
    if lead:
        source["prefixes_stripped"] = [*stripped, lead]
    own = {k: v for k, v in model.state_dict().items() if k.startswith("normalize.")} if record["kind"] == "zoo" else {}
    if own:
        if not any(k in state for k in own):
            state = {**state, **own}  # weights trained outside the kit have no normalisation buffers: ours
        elif options.convention is not None and not options.convention.identity:
            raise UserError(f"{path} holds its own normalisation ({', '.join(sorted(own))}); drop "
                            "--input-range/--mean/--std")
        convention = IDENTITY  # folded into the zoo model's normalisation (ours, or the one the weights carry)
    layouts.load_strict(model, state, str(path))
    if own:
        record = {"kind": "zoo", "config": model.config}  # the normalisation the model holds now
        source["normalization"] = {"mean": model.config.get("mean"), "std": model.config.get("std")}
    return _wrap(model, record, convention), record, shape, num_classes


def _strip_shared_head(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """Drop one leading ``name.`` that every key carries when the rest is exactly the model's keys (PyTorch
    Lightning's ``model.``, a wrapper's ``backbone.``); ``(state, "")`` when that is not so."""
    expected = set(model.state_dict())
    if set(state) == expected or not state or not all("." in k for k in state):
        return state, ""
    heads = {k.split(".", 1)[0] for k in state}
    if len(heads) != 1:
        return state, ""
    rest = {k.split(".", 1)[1]: v for k, v in state.items()}
    own = {k for k in expected if k.startswith("normalize.")}
    if set(rest) == expected or set(rest) == expected - own:
        return rest, f"{next(iter(heads))}."
    return state, ""


def _from_program(path: Path, options: TwinOptions, convention: InputConvention,
                  source: dict[str, Any]) -> tuple[nn.Module, dict[str, Any], tuple[int, int, int], int]:
    from kit.twins import from_program

    _no_arch(options, path)
    model, meta = from_program.load_program(path)
    if not meta.get("batch_dynamic"):
        raise UserError(f"{path} was exported for one batch size only: export it with a dynamic batch dimension, "
                        "torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim('batch')},))")
    if meta.get("input_dtype", "float32") != "float32":
        raise UserError(f"{path} takes {meta['input_dtype']} input: export the program with float32 input (the twin "
                        "computes in float32)")
    native = meta.get("input_shape")
    kit_shape = None if native is None else _kit_shape(tuple(native), convention)
    shape = _input_shape(options, kit_shape, str(path))
    num_classes = _num_classes(options, meta.get("num_classes"), str(path))
    convention.check_channels(shape[0], str(path))
    record = from_program.program_record(path)
    source.update({k: v for k, v in meta.items() if k not in ("input_shape", "num_classes")})
    return _wrap(model, record, convention), record, shape, num_classes


def _from_onnx(path: Path, options: TwinOptions, convention: InputConvention, source: dict[str, Any],
               samples: torch.Tensor | None) -> tuple[nn.Module, dict[str, Any], tuple[int, int, int], int,
                                                      dict[str, Any]]:
    from exporters.graph import graph_interface, infer_precision, load_onnx, read_metadata
    from exporters.onnx.runner import OnnxRuntimeEngine
    from exporters.parity import compare_logits
    from kit.twins.from_onnx import graph_skeleton, onnx_to_torch

    _no_arch(options, path)
    proto, _, label = load_onnx(path)
    meta = read_metadata(proto)
    given = options.convention
    # the ONNX Runtime session the twin is checked against takes what the graph takes: a uint8 graph is fed uint8
    # pixels, while the twin takes the same values unrounded (kit.convention.InputModule)
    uint8 = _graph_input_type(proto) == "uint8"
    if given is not None and uint8 and given.dtype != "uint8":
        given = dataclasses.replace(given, dtype="uint8")
    engine = OnnxRuntimeEngine(path, input_convention=given,
                               convention_flag="--input-range/--mean/--std/--input-layout")
    convention = engine.input_convention
    io = graph_interface(proto, label, meta, layout=convention.layout)
    shape = _input_shape(options, io.input_shape, str(path))
    if options.convention is None and shape[0] not in (1, 3, 4) and shape[2] in (1, 3, 4):  # no layout stated
        log.warning("note: %s takes (C, H, W) = (%s) read as channels first; if its channels come last (NHWC), give "
                    "--input-layout nhwc", path.name, ", ".join(map(str, shape)))
    num_classes = _num_classes(options, io.num_classes, str(path))
    x, what = _check_samples(samples, options, shape, str(path))
    module = onnx_to_torch(path)  # reads external data from the model's folder
    record = {"kind": "onnx", "graph": base64.b64encode(graph_skeleton(proto)).decode("ascii"),
              "conversion": module.report}
    model = _wrap(module, record, convention)
    precision = str(meta.get("precision") or infer_precision(proto))
    # the check: the rebuilt module against ONNX Runtime on the same pixels (exact tolerance for an fp32 graph; an
    # fp16 / int8 graph's float twin is reported, as export reports its reduced-precision files)
    with torch.no_grad():
        twin_logits = model(convention.as_seen(x)).float()
    parity = compare_logits(twin_logits, engine(x), precision=precision, name=f"{path.name} rebuilt in torch")
    source.update(precision=precision, conversion=module.report,
                  parity={**parity.to_dict(), "samples_from": what})
    recorded = meta.get("classes")
    if isinstance(recorded, list) and len(recorded) == num_classes and all(isinstance(c, str) for c in recorded):
        source["class_names"] = recorded
    weights = meta.get("weights_sha256")  # a kit export names the weights it was made from (engine-weights-differ)
    source["recorded_weights_sha256"] = weights if isinstance(weights, str) and weights else None
    data = meta.get("dataset")  # ... and the data its checkpoint was trained on (kept where --dataset is not given)
    if isinstance(data, dict) and isinstance(data.get("spec"), str) and data["spec"]:
        source["recorded_dataset"] = data
    if not parity.passed:
        raise UserError(f"the torch module rebuilt from {path.name} does not match ONNX Runtime: {parity.summary()}; "
                        "it cannot serve as the twin")
    log.debug("ONNX twin check: %s", parity.summary())
    return model, record, shape, num_classes, source["parity"]


def _graph_input_type(proto: Any) -> str:
    """The element type name of the graph's first non-initializer input (``float``, ``uint8``, ...)."""
    import onnx

    initializers = {i.name for i in proto.graph.initializer}
    for i in proto.graph.input:
        if i.name not in initializers:
            return onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name
    return ""


# --------------------------------------------------------------------------------------------------------- helpers
def _no_arch(options: TwinOptions, path: Path) -> None:
    if options.arch or options.key:
        given = "--arch" if options.arch else "--key"
        raise UserError(f"{path} holds its own graph: {given} applies to weight files only")


def _wrap(model: nn.Module, record: dict[str, Any], convention: InputConvention) -> nn.Module:
    if convention.identity:
        return model
    record["input"] = convention.to_dict()
    return InputModule(model, convention)


def _affine(convention: InputConvention, channels: int) -> tuple[list[float], list[float]]:
    """The per-channel mean/std on [0, 1] pixels equal to ``convention`` (range then normalisation)."""
    lo, hi = convention.range
    mean = convention.mean or (0.0,)
    std = convention.std or (1.0,)
    n = max(len(mean), len(std))
    mean = [mean[i if len(mean) > 1 else 0] for i in range(n)]
    std = [std[i if len(std) > 1 else 0] for i in range(n)]
    return [(m - lo) / (hi - lo) for m in mean], [s / (hi - lo) for s in std]


def _kit_shape(native: tuple[int, ...], convention: InputConvention) -> tuple[int, int, int] | None:
    if len(native) != 3:
        return None
    a, b, c = (int(v) for v in native)
    return (c, a, b) if convention.layout == "nhwc" else (a, b, c)


def _input_shape(options: TwinOptions, found: tuple[int, int, int] | None, what: str) -> tuple[int, int, int]:
    if options.input_shape is not None and found is not None and tuple(options.input_shape) != tuple(found):
        raise UserError(f"--input-shape {','.join(map(str, options.input_shape))} contradicts {what}, which takes "
                        f"{','.join(map(str, found))} (C,H,W)")
    shape = options.input_shape or found
    if shape is None:
        raise UserError(f"{what} does not say what it takes: give --input-shape C,H,W")
    return tuple(int(v) for v in shape)  # type: ignore[return-value]


def _num_classes(options: TwinOptions, found: int | None, what: str) -> int:
    stated = options.num_classes
    if options.classes is not None:
        if stated is not None and stated != len(options.classes):
            raise UserError(f"--num-classes {stated} contradicts --classes, which names {len(options.classes)}")
        stated = len(options.classes)
    if stated is not None and found is not None and stated != found:
        raise UserError(f"{what} predicts {found} classes, not {stated}")
    k = stated or found
    if not k:
        raise UserError(f"{what} does not say how many classes it predicts: give --num-classes N or --classes FILE")
    return int(k)


def _check_samples(samples: torch.Tensor | None, options: TwinOptions, shape: tuple[int, int, int],
                   what: str) -> tuple[torch.Tensor, str]:
    """The real pixels an ONNX twin is checked on (the audit's, the ``--dataset``'s test images, else noise), after
    checking that they fit the graph."""
    if samples is not None:
        x, where = samples[:NOISE_SAMPLES * 4].detach().to("cpu", torch.float32), "the audited data"
    elif options.dataset:
        from kit.data import load_dataset

        ds = load_dataset(options.dataset, "test", seed=0).subset(NOISE_SAMPLES * 4, seed=0, notice=False)
        x, where = ds.x, f"{options.dataset} (test)"
    else:
        g = torch.Generator().manual_seed(0)
        return torch.rand((NOISE_SAMPLES, *shape), generator=g), "uniform noise (no --dataset given)"
    got = tuple(int(v) for v in x.shape[1:])
    if got != tuple(shape):
        c, h, w = shape
        hint = " (an NHWC graph? give --input-layout nhwc, or layout=nhwc in --engine-input)" \
            if (c, h, w) == (got[1], got[2], got[0]) else ""
        raise UserError(f"{what} takes inputs {'x'.join(map(str, shape))} but the data has "
                        f"{'x'.join(map(str, got))}{hint}")
    return x, where


def _info(record: dict[str, Any], classes: list[str], shape: tuple[int, int, int], convention: InputConvention,
          options: TwinOptions, source: dict[str, Any]) -> Any:
    from kit.arch import arch_name
    from kit.checkpoint import CheckpointInfo

    dataset: dict[str, Any] = {}
    if options.dataset:
        from kit.data import load_dataset

        ds = load_dataset(options.dataset, "train", seed=0)
        if list(ds.input_shape) != list(shape) or ds.num_classes != len(classes):
            raise UserError(f"--dataset {options.dataset} has {'x'.join(map(str, ds.input_shape))} inputs and "
                            f"{ds.num_classes} classes; the model takes {'x'.join(map(str, shape))} and "
                            f"{len(classes)}")
        dataset = {"spec": options.dataset, "fingerprint": ds.fingerprint, "n_train": len(ds)}
        if options.classes is None and classes == [str(i) for i in range(len(classes))]:
            classes = list(ds.class_names)
    normalization = convention.folded_record()
    info = CheckpointInfo(arch=record, num_classes=len(classes), class_names=classes, input_shape=list(shape),
                          normalization=normalization, dataset=dataset, defense="unknown (trained elsewhere)",
                          train_config={}, source=source)
    log.debug("imported %s as %s", source.get("file"), arch_name(record))
    return info


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """``C,H,W`` (also ``CxHxW``) as three positive integers.

    Raises
    ------
    UserError
        Anything else.
    """
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1 or max(dims) > 1 << 16:
        raise UserError(f"--input-shape must be C,H,W (three positive integers), got {text!r}")
    return dims  # type: ignore[return-value]


def read_class_names(path: str | Path) -> tuple[str, ...]:
    """Class names from a text file, one per line (blank lines and surrounding spaces ignored).

    Raises
    ------
    UserError
        A missing or unreadable file, no names, or a name repeated.
    """
    path = require_file(path, "classes file")
    try:
        names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read classes file {path}: {e}") from e
    if not names:
        raise UserError(f"classes file {path} names no class (one name per line)")
    if len(set(names)) != len(names):
        raise UserError(f"classes file {path} repeats a class name")
    return names
