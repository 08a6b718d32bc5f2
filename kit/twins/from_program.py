"""``torch.export`` programs (``.pt2``, written by ``torch.export.save``) as twins, read without running their code.

What ``torch.export.load`` runs (torch 2.13, read in its source and confirmed with crafted archives)
----------------------------------------------------------------------------------------------------
``torch.export.load`` warns in its own docstring never to load untrusted files, and it means it. A ``.pt2`` is a zip
(``torch._C.PyTorchFileReader``) holding ``models/<name>.json`` (the graph, schema in
``torch/_export/serde/schema.py``), ``data/weights/*`` and ``data/constants/*`` (raw tensor bytes described by
``*_config.json``), ``data/sample_inputs/<name>.pt`` (a pickle) and optionally ``data/aotinductor/`` and
``extra/``. Loading it can execute code chosen by whoever wrote the file, in at least these places:

1. ``torch/export/pt2_archive/_package.py`` ``_load_state_dict`` and ``_load_constants``: any weight or constant
   whose config says ``"use_pickle": true`` (meant for tensor subclasses) is read with
   ``torch.load(..., weights_only=False)``, the unrestricted unpickler: a ``__reduce__`` runs at load (confirmed).
2. ``_load_constants``: ``opaque_obj_*`` constants go through plain ``pickle.loads`` (arbitrary code), and
   ``custom_obj_*`` (torchbind objects) through ``torch._C._pickle_load_obj``.
3. ``torch/_export/serde/serialize.py`` ``deserialize_torch_artifact``, used for ``data/sample_inputs/*.pt`` (always)
   and for legacy ``data/weights/<name>.pt`` / ``data/constants/<name>.pt`` files: it tries ``weights_only=True`` and,
   when that fails, **falls back to** ``torch.load(weights_only=False)`` (confirmed: the payload runs, then the load
   fails).
4. ``GraphModuleDeserializer._parse_sym_expr``: every symbolic-shape ``expr_str`` of the JSON is parsed with
   ``sympy.sympify``, which ``eval``s its text (confirmed with
   ``(lambda: 0).__globals__['__builtins__']['__import__']('os').system(...)`` as a tensor size).
5. ``torch.fx`` code generation (``GraphModule.recompile`` ``exec``s generated Python): placeholder names are written
   into the generated ``def forward(...)`` unescaped, ``get_attr`` path atoms inside ``getattr(x, "...")`` and
   keyword-argument names of higher-order ops as ``name = value``; a crafted input name runs at load (confirmed).
6. ``ExportedProgram.module()`` with ``check_guards=True`` (the default) ``exec``s the archive's ``guards_code``
   strings (``torch/export/_unlift.py`` ``_convert_guards_code_to_fn``): they run at the first forward (confirmed).
7. ``load_pt2`` loads compiled AOTInductor packages found under ``data/aotinductor/`` (native shared libraries).

The graph's operators themselves are resolved by name from ``torch``, ``operator`` and ``math``
(``deserialize_operator``) and then restricted by the program's verifier to registered operators and a short list of
builtins; among ATen's operators a few touch files (``aten::from_file`` maps a file, ``aten::save`` writes one).
``tests/test_twin_sources.py`` holds crafted archives for items 1, 3, 4, 5, 6 and 7.

How otkit reads a program instead
---------------------------------
The archive is read into memory with torch's own zip reader (``torch.export.pt2_archive.PT2ArchiveReader``) and checked
against an allow-list before torch deserializes anything; then a **new** archive is written from the checked parts
only and that one is given to ``torch.export.load`` (so no zip-parser difference between the check and the load):

* entries: only ``models/model.json``, the two payload configs, the tensors they reference, the sample inputs and the
  archive's bookkeeping files; ``extra/`` files are dropped; AOTInductor, ExecuTorch, MTIA, legacy pickled weight
  files, several programs or anything unknown are refused (naming the entry);
* payloads: every weight and constant must be raw bytes (``"use_pickle": false``) named ``weight_<n>`` /
  ``tensor_<n>``; custom and opaque objects are refused;
* sample inputs: read with ``torch.load(weights_only=True)`` (refused if that fails: no fallback), must be plain
  tensors, and are written anew with ``torch.save`` (so torch's own ``weights_only=True`` attempt succeeds);
* the graph JSON: node metadata (stack traces, module stacks: free text) is dropped and ``guards_code`` emptied
  (``.module(check_guards=False)`` is used as well: input shapes are still checked, by a pre-hook that runs no text of
  the file); every other string is checked by the field it sits in: names must be Python identifiers, attribute paths
  dotted identifiers, node targets ATen operators (``torch.ops.aten.<op>.<overload>``, except the file-touching ones)
  or the symbolic-shape builtins, ``expr_str`` a token-level allow-list of SymPy constructors, integers, symbol names
  and quoted symbol names (no attribute access, indexing, lambda or calls outside the list), tree specs plain
  tuples/lists/dicts, and an unknown text field refuses the file. Subgraphs (control flow, higher-order ops), custom
  objects, operators as values, effect tokens and non-tensor inputs are refused.

What remains trusted is torch itself: its JSON deserializer on checked input and its ATen kernels, as for any model
run by any runtime.

The module and its mode
-----------------------
``ExportedProgram.module()`` returns a ``torch.fx.GraphModule`` whose ``train()`` and ``eval()`` raise
``NotImplementedError``: the mode was fixed when the program was traced (``batch_norm``'s ``training`` argument,
``dropout``'s ``train`` argument are constants of the graph). :func:`load_program` reads those arguments and refuses a
program traced in training mode (batch statistics, active dropout, running-statistics updates); for an eval-mode
program it returns the module with ``eval()`` made a no-op (so ``load_twin``'s ``.eval()`` works) and ``train(True)``
refused (a ``copy.deepcopy`` of it is rebuilt by torch without that guard: its ``train()`` only sets the flags, the
graph stays as exported). Lifted tensor constants, plain attributes in torch's module (``.to(device)`` would leave them
behind), are made non-persistent buffers.

Persistence inside a kit checkpoint
-----------------------------------
:func:`program_record` returns a JSON-able record holding the checked archive as a *skeleton*: every weight payload
(``data/weights/``: the parameters and persistent buffers, which are exactly ``module.state_dict()``) is replaced by an
empty record (torch then builds zeros of the recorded shape; a storage shared by differently-shaped views keeps its
length, as zeros), the sample inputs become zeros of their shapes (no example data travels with the checkpoint),
constants (non-persistent buffers, lifted constants) are kept, and the archive is compressed with zlib and
base64-encoded. :func:`rebuild_program` checks the record's sha256, reads the skeleton through the same checks and
returns a module with zero weights; ``load_state_dict(state, strict=True)`` with the state dict of the module from
:func:`load_program` (the checkpoint's tensors) restores it exactly: the same bits, the same logits. Size cost: the
graph JSON compressed, times 4/3 for base64, plus the constants: measured 4 KB of metadata for cnn-small, 12 KB for
ResNet-20 and ResNet-18, 15 KB for WRN-28-10 (whose weights are 146 MB); weights are stored once, as the checkpoint's
tensors. The skeleton archive itself (what :func:`rebuild_program` holds in memory) is 30 to 260 KB.

Limits
------
One tensor input of rank 4 and one tensor output of rank 2 (a program returning a tuple or dict is refused); ATen
operators only (no custom ops, no higher-order ops such as ``cond``); the program runs on the device its constants
were exported for (a program exported on CUDA with device-specific constants needs that device); files from a torch
whose schema major version differs are refused by torch. The checks keep a crafted file from running code, not from
costing time or memory: huge declared shapes or shape formulas such as ``Pow(Integer(9), Integer(10**9))`` can still
make loading slow or run out of memory, as with any model file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import keyword
import logging
import re
import sys
import types
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from kit.errors import UserError
from kit.io import require_file

log = logging.getLogger(__name__)

RECORD_FORMAT = "otkit.program/1"

_MODEL = "models/model.json"
_SAMPLE = "data/sample_inputs/model.pt"
_WEIGHTS_DIR = "data/weights/"
_CONSTANTS_DIR = "data/constants/"
_WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
_CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
_BOOKKEEPING = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
_REFUSED_DIRS = {
    "data/aotinductor/": "compiled AOTInductor code (native libraries)",
    "data/executorch/": "an ExecuTorch program",
    "data/mtia": "MTIA code",
    "xl_model_weights/": "externally stored weights",
}
_MAX_SKELETON_BYTES = 1 << 30

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_DOTTED = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*\Z")
_VERSION = re.compile(r"[0-9A-Za-z.+_\-]{0,64}\Z")
_DEVICE_TYPE = re.compile(r"[a-z_]{1,16}\Z")
_ATEN = re.compile(r"torch\.ops\.aten\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)\Z")

#: ATen operators refused in a program: they read, map or write files, print, or rebind storage.
DENIED_ATEN = frozenset({"from_file", "save", "_print", "set_", "set_data", "record_stream", "pin_memory",
                         "_pin_memory", "_copy_from", "_copy_from_and_resize"})
#: Targets other than ATen operators that a program may call (symbolic-shape arithmetic, grad mode).
ALLOWED_TARGETS = frozenset(
    [f"_operator.{n}" for n in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "eq",
                                "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_", "abs")]
    + ["math.ceil", "math.floor", "math.trunc", "torch._C._set_grad_enabled"]
    + [f"torch.sym_{n}" for n in ("int", "float", "max", "min", "not", "sqrt", "ite", "sum")]
)

_SYM_TOKEN = re.compile(r"\s+|(?P<num>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
                        r"|'[A-Za-z0-9_.+\-]*'|\*\*|[-+*/(),=]")
_SYMBOL = re.compile(r"[a-z]{1,8}[0-9]+\Z")
_SYM_NAMES = frozenset({
    # SymPy constructors that srepr() writes for shape expressions, and their assumptions
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Mod", "floor", "ceiling",
    "sqrt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality", "StrictLessThan", "StrictGreaterThan",
    "LessThan", "GreaterThan", "And", "Or", "Not", "Xor", "Piecewise", "ExprCondPair", "ITE", "true", "false",
    "True", "False", "BooleanTrue", "BooleanFalse", "oo", "zoo", "nan", "Infinity", "NegativeInfinity", "Half", "One",
    "Zero", "NegativeOne", "precision", "positive", "negative", "nonnegative", "nonpositive", "integer", "real",
    "finite", "infinite", "zero", "nonzero", "even", "odd", "commutative", "extended_real",
    # torch.utils._sympy.functions, as the deserializer names them
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift",
    "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
})

#: Schema fields refused wherever they appear, with the reason given.
_REFUSED_FIELDS = {
    "as_graph": "a subgraph (control flow or a higher-order operator)",
    "as_custom_obj": "a custom (torchbind) object",
    "as_custom_objs": "custom (torchbind) objects",
    "as_operator": "an operator passed as a value",
    "custom_obj": "a custom (torchbind) object input",
    "token": "effect tokens (operators with side effects)",
    "constant_input": "a non-tensor input",
}
_IDENT_FIELDS = frozenset({"name", "as_name", "forward_arg_names", "user_input_name"})
_DOTTED_FIELDS = frozenset({"parameter_name", "buffer_name", "tensor_constant_name", "fqn"})
_TRAIN_ARGS = ("training", "train")
_RANDOM_OPS = frozenset({"rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like",
                         "bernoulli", "bernoulli_", "normal", "normal_", "uniform", "uniform_", "multinomial",
                         "poisson", "exponential_", "geometric_", "cauchy_", "log_normal_", "random_"})


class _Refused(Exception):
    """A check failed; the message says what (wrapped into a UserError naming the file)."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _show(text: str, limit: int = 60) -> str:
    text = text if text.isprintable() else ascii(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return _show(text.splitlines()[0], 200) if text else type(e).__name__


# ---------------------------------------------------------------------------------------------------------------------
# checks on the graph JSON


def _check_ident(value: str, field: str) -> None:
    if not (_IDENT.match(value) and not keyword.iskeyword(value) and not value.startswith("__")):
        raise _Refused(f"{field} {_show(value)!r} is not a plain identifier")


def _check_dotted(value: str, field: str) -> None:
    if value and not (_DOTTED.match(value) and not any(a.startswith("__") for a in value.split("."))):
        raise _Refused(f"{field} {_show(value)!r} is not a dotted name")


def _check_target(value: str) -> None:
    m = _ATEN.match(value)
    if m:
        if m.group(1) in DENIED_ATEN:
            raise _Refused(f"it calls aten.{m.group(1)}, which otkit does not run (it touches files or storage)")
        return
    if value not in ALLOWED_TARGETS:
        raise _Refused(f"it calls {_show(value)!r}: only ATen operators are loaded (no custom or higher-order ops)")


def _check_sym_expr(value: str) -> None:
    """A shape expression, before sympy.sympify (which evals it) sees it: allow-listed tokens only."""
    if len(value) > 4000:
        raise _Refused("a shape expression is implausibly long")
    pos = 0
    while pos < len(value):
        m = _SYM_TOKEN.match(value, pos)
        if not m or m.end() == pos:
            raise _Refused(f"shape expression {_show(value)!r} holds {_show(value[pos:pos + 10])!r}, which is not "
                           "part of a shape formula")
        name = m.group("name")
        if name is not None and name not in _SYM_NAMES and not _SYMBOL.match(name):
            raise _Refused(f"shape expression {_show(value)!r} names {_show(name)!r}")
        pos = m.end()


def _check_treespec(value: str) -> None:
    try:
        spec = json.loads(value)
    except (ValueError, RecursionError) as e:
        raise _Refused("a tree spec is not JSON") from e

    def node(n: Any, depth: int) -> None:
        if depth > 16 or not isinstance(n, dict) or set(n) != {"type", "context", "children_spec"}:
            raise _Refused("a tree spec has an unexpected form")
        typ, ctx = n["type"], n["context"]
        if typ not in (None, "builtins.tuple", "builtins.list", "builtins.dict"):
            raise _Refused(f"inputs or outputs are a {_show(str(typ))} (only tensors, tuples, lists, dicts)")
        if ctx is not None:
            try:
                parsed = json.loads(ctx) if isinstance(ctx, str) else ctx
            except ValueError as e:
                raise _Refused("a tree spec context is not JSON") from e
            if parsed is not None and not (typ == "builtins.dict" and isinstance(parsed, list)
                                           and all(isinstance(k, str) and _IDENT.match(k) for k in parsed)):
                raise _Refused("a tree spec has an unexpected context")
        if not isinstance(n["children_spec"], list):
            raise _Refused("a tree spec has an unexpected form")
        for child in n["children_spec"]:
            node(child, depth + 1)

    if not (isinstance(spec, list) and len(spec) == 2 and spec[0] == 1):
        raise _Refused("a tree spec has an unknown version")
    node(spec[1], 0)


def _check_text(field: str, value: str) -> None:
    if field in _IDENT_FIELDS:
        _check_ident(value, field)
    elif field in _DOTTED_FIELDS:
        _check_dotted(value, field)
    elif field == "target":
        _check_target(value)
    elif field == "expr_str":
        _check_sym_expr(value)
    elif field in ("as_string", "as_strings"):  # operator arguments, written into generated code with repr()
        if len(value) > 4000 or not value.isprintable():
            raise _Refused(f"a string argument {_show(value)!r} is not plain text")
    elif field in ("in_spec", "out_spec"):
        _check_treespec(value)
    elif field == "torch_version":
        if not _VERSION.match(value):
            raise _Refused("its torch version is not a version")
    elif field == "verifiers":
        if value not in ("ATEN", "TRAINING", ""):
            raise _Refused(f"it names verifier {_show(value)!r}")
    elif field == "type":
        if not _DEVICE_TYPE.match(value):
            raise _Refused(f"device type {_show(value)!r}")
    else:
        raise _Refused(f"it has a text field {_show(field)!r} this otkit does not know (newer torch?)")


def _walk(obj: Any, field: str, depth: int = 0) -> None:
    """Check every dictionary key and text of the JSON ``obj`` by the field it sits in."""
    if depth > 200:
        raise _Refused("its graph is nested implausibly deep")
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not (isinstance(k, str) and _IDENT.match(k) and not k.startswith("__")):
                raise _Refused(f"it has a key {_show(str(k))!r} that is not an identifier")
            if k in _REFUSED_FIELDS:
                raise _Refused(f"it uses {_REFUSED_FIELDS[k]}")
            if k in ("custom_obj_values", "treespec_namedtuple_fields") and v:
                raise _Refused("it uses custom objects or named tuples" if k == "custom_obj_values"
                               else "its inputs or outputs are named tuples")
            _walk(v, k, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            _walk(v, field, depth + 1)
    elif isinstance(obj, str):
        _check_text(field, obj)


def _sanitize_model(raw: bytes) -> bytes:
    """The graph JSON with free text removed (node metadata, guards) and everything else checked."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise _Refused(f"{_MODEL} is not JSON") from e
    gm = doc.get("graph_module") if isinstance(doc, dict) else None
    if not isinstance(gm, dict) or not isinstance(gm.get("graph"), dict):
        raise _Refused(f"{_MODEL} holds no graph")
    doc["guards_code"] = []
    gm["metadata"] = {}
    nodes = gm["graph"].get("nodes")
    if not isinstance(nodes, list):
        raise _Refused(f"{_MODEL} holds no graph")
    for n in nodes:
        if isinstance(n, dict):
            n["metadata"] = {}
    _walk(doc, "")
    return json.dumps(doc).encode()


def _check_payload_config(raw: bytes, what: str, prefix: str) -> dict[str, Any]:
    try:
        cfg = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise _Refused(f"its {what} config is not JSON") from e
    entries = cfg.get("config") if isinstance(cfg, dict) else None
    if not isinstance(entries, dict):
        raise _Refused(f"its {what} config has an unexpected form")
    for fqn, meta in entries.items():
        if not (isinstance(fqn, str) and fqn and isinstance(meta, dict)):
            raise _Refused(f"its {what} config names {_show(str(fqn))!r}")
        _check_dotted(fqn, what)
        if meta.get("use_pickle") is not False:
            raise _Refused(f"{what} {fqn} is stored as a pickle (a tensor subclass), which would be unpickled with "
                           "code: only raw tensors are loaded")
        path_name = meta.get("path_name")
        if not (isinstance(path_name, str) and re.fullmatch(re.escape(prefix) + r"[0-9]+", path_name)):
            shown = _show(str(path_name))
            kind = "a custom or opaque object" if isinstance(path_name, str) and "obj_" in path_name else "an entry"
            raise _Refused(f"{what} {fqn} is {kind} ({shown}): only raw tensors are loaded")
        if not isinstance(meta.get("tensor_meta"), dict):
            raise _Refused(f"{what} {fqn} has no tensor description")
        _walk(meta["tensor_meta"], "tensor_meta")
    return entries


def _check_sample_inputs(raw: bytes) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    try:
        sample = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code (UnpicklingError) or any corruption: refused, never retried unsafely
        raise _Refused("its sample inputs hold objects other than tensors (possibly code), and pickles are only read "
                       "with torch.load(weights_only=True)") from e
    if not (isinstance(sample, tuple) and len(sample) == 2 and isinstance(sample[0], tuple)
            and isinstance(sample[1], dict)
            and all(isinstance(t, torch.Tensor) for t in (*sample[0], *sample[1].values()))):
        raise _Refused("its sample inputs are not tensors (only programs taking tensors are loaded)")
    return tuple(sample[0]), dict(sample[1])


def _save_sample(sample: tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]], zeros: bool) -> bytes:
    """The sample inputs pickled anew by torch.save from plain tensors (zeros of their shapes in a skeleton)."""
    def plain(t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(t) if zeros else t.detach().clone()

    buf = io.BytesIO()
    torch.save((tuple(plain(t) for t in sample[0]), {k: plain(t) for k, t in sample[1].items()}), buf)
    return buf.getvalue()


def _refused_entry(name: str) -> str | None:
    for prefix, what in _REFUSED_DIRS.items():
        if name.startswith(prefix):
            return f"it holds {what} ({_show(name)})"
    if name.startswith("models/") and name != _MODEL:
        return f"it holds several programs ({_show(name)}); otkit loads an archive with one, 'model'"
    if name.startswith((_WEIGHTS_DIR, _CONSTANTS_DIR)) and name.endswith(".pt"):
        return f"it stores tensors in a legacy pickle ({_show(name)}): re-save the program with this torch"
    return None


class _Archive:
    """The checked parts of a ``.pt2`` archive, ready to be written anew."""

    def __init__(self, data: bytes) -> None:
        from torch.export.pt2_archive import PT2ArchiveReader
        from torch.export.pt2_archive import constants as c

        try:
            reader = PT2ArchiveReader(io.BytesIO(data))
            names = list(reader.get_file_names())
        except Exception as e:  # torch's zip reader on arbitrary bytes: RuntimeError, AssertionError, ...
            raise _Refused(f"it is not a torch.export archive ({_first_line(e)})") from e

        def read(name: str) -> bytes:
            try:
                return reader.read_bytes(name)
            except Exception as e:  # a record that fails its CRC, a truncated archive, ...
                raise _Refused(f"it is not a torch.export archive ({_show(name)}: {_first_line(e)})") from e

        version = read(c.ARCHIVE_VERSION_PATH).decode("ascii", "replace")
        if version != c.ARCHIVE_VERSION_VALUE:
            raise _Refused(f"its archive version is {_show(version)}, this torch reads {c.ARCHIVE_VERSION_VALUE}")
        if "byteorder" in names and read("byteorder").decode("ascii", "replace") != sys.byteorder:
            raise _Refused("its tensors were written with another byte order")
        for name in names:
            problem = _refused_entry(name)
            if problem:
                raise _Refused(problem)
        for required in (_MODEL, _SAMPLE, _WEIGHTS_CONFIG, _CONSTANTS_CONFIG):
            if required not in names:
                raise _Refused(f"it has no {required} (not written by torch.export.save of this torch generation)")
        allowed = set(_BOOKKEEPING) | {_MODEL, _SAMPLE, _WEIGHTS_CONFIG, _CONSTANTS_CONFIG}
        self.model = _sanitize_model(read(_MODEL))
        self.sample = _check_sample_inputs(read(_SAMPLE))
        self.weights = _check_payload_config(read(_WEIGHTS_CONFIG), "weight", "weight_")
        self.constants = _check_payload_config(read(_CONSTANTS_CONFIG), "constant", "tensor_")
        self.payloads: dict[str, bytes] = {}
        for directory, entries in ((_WEIGHTS_DIR, self.weights), (_CONSTANTS_DIR, self.constants)):
            for meta in entries.values():
                name = directory + meta["path_name"]
                if name not in names:
                    raise _Refused(f"it lacks {name}")
                if name not in self.payloads:
                    self.payloads[name] = read(name)
                allowed.add(name)
        unknown = [n for n in names if n not in allowed and not n.startswith("extra/")]
        if unknown:
            raise _Refused(f"it holds an entry otkit does not know: {_show(unknown[0])}")
        saved = json.loads(self.model).get("torch_version")
        self.torch_version: str | None = saved if isinstance(saved, str) and saved else None

    def _skeleton_payloads(self) -> dict[str, bytes]:
        """Weight payloads emptied: torch builds zeros of the recorded shape for an empty record.

        A storage read through one contiguous, offset-free description becomes empty; one shared by several
        different views (or a strided one) keeps its length, as zeros, so every view stays within it.
        """
        views: dict[str, list[Any]] = {}
        for meta in self.weights.values():
            views.setdefault(_WEIGHTS_DIR + meta["path_name"], []).append(meta["tensor_meta"])
        out = dict(self.payloads)
        for name, metas in views.items():
            out[name] = b"" if _plain_view(metas) else bytes(len(self.payloads[name]))
        return out

    def to_bytes(self, skeleton: bool = False) -> bytes:
        from torch.export.pt2_archive import PT2ArchiveWriter
        from torch.export.pt2_archive import constants as c

        payloads = self._skeleton_payloads() if skeleton else self.payloads
        buf = io.BytesIO()
        with PT2ArchiveWriter(buf) as w:
            w.write_string(c.ARCHIVE_FORMAT_PATH, c.ARCHIVE_FORMAT_VALUE)
            w.write_string(c.ARCHIVE_VERSION_PATH, c.ARCHIVE_VERSION_VALUE)
            w.write_string("byteorder", sys.byteorder)
            w.write_bytes(_MODEL, self.model)
            w.write_bytes(_WEIGHTS_CONFIG, json.dumps({"config": self.weights}).encode())
            w.write_bytes(_CONSTANTS_CONFIG, json.dumps({"config": self.constants}).encode())
            for name, data in payloads.items():
                w.write_bytes(name, data)
            w.write_bytes(_SAMPLE, _save_sample(self.sample, zeros=skeleton))
        return buf.getvalue()


def _plain_view(metas: list[Any]) -> bool:
    first = metas[0]
    if any(m != first for m in metas[1:]):
        return False
    try:
        sizes = [int(s["as_int"]) for s in first["sizes"]]
        strides = [int(s["as_int"]) for s in first["strides"]]
        offset = int(first["storage_offset"]["as_int"])
    except (KeyError, TypeError, ValueError):
        return False
    expected, step = [], 1
    for size in reversed(sizes):
        expected.append(step)
        step *= max(size, 1)
    return offset == 0 and all(a == b for a, b, n in zip(strides, reversed(expected), sizes) if n > 1)


# ---------------------------------------------------------------------------------------------------------------------
# loading


class _CaptureErrors(logging.Filter):
    """Keeps the exceptions torch.export.load logs (it logs the real error, then raises a generic one)."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[BaseException] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])
            return False
        return True


@contextmanager
def _captured(logger_name: str) -> Iterator[_CaptureErrors]:
    capture = _CaptureErrors()
    logger = logging.getLogger(logger_name)
    logger.addFilter(capture)
    try:
        yield capture
    finally:
        logger.removeFilter(capture)


def _fixed_train(self: nn.Module, mode: bool = True) -> nn.Module:
    if mode:
        raise UserError("an imported torch.export program runs as it was exported (eval mode): it cannot be put in "
                        "training mode")
    nn.Module.train(self, False)
    return self


def _fixed_eval(self: nn.Module) -> nn.Module:
    return _fixed_train(self, False)


def _finish_module(module: nn.Module) -> nn.Module:
    """eval() a no-op and train(True) refused; plain tensor attributes (lifted constants) made buffers."""
    for sub in module.modules():
        for name, value in list(vars(sub).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                delattr(sub, name)
                sub.register_buffer(name, value, persistent=False)
    module.__dict__.pop("train", None)
    module.__dict__.pop("eval", None)
    module.train = types.MethodType(_fixed_train, module)  # type: ignore[method-assign]
    module.eval = types.MethodType(_fixed_eval, module)  # type: ignore[method-assign]
    nn.Module.train(module, False)
    return module


def _arg_value(node: torch.fx.Node, index: int, arg: Any) -> Any:
    if index < len(node.args):
        return node.args[index]
    if arg.name in node.kwargs:
        return node.kwargs[arg.name]
    return arg.default_value if arg.has_default_value() else None


def _mode_and_randomness(graph: torch.fx.Graph) -> tuple[list[str], list[str]]:
    """Operators that run in training mode, and random operators, by ATen name."""
    training, random = [], []
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        base = schema.name.split("::", 1)[-1]
        if "_batch_norm_with_update" in base:
            training.append(base)
        for i, arg in enumerate(schema.arguments):
            if arg.name in _TRAIN_ARGS:
                value = _arg_value(node, i, arg)
                if value is True or (value is None and arg.name == "train"):
                    training.append(base)
        if base in _RANDOM_OPS:
            random.append(base)
    return sorted(set(training)), sorted(set(random))


def _placeholder_val(ep: Any, name: str) -> Any:
    for node in ep.graph.nodes:
        if node.name == name:
            return node.meta.get("val")
    return None


def _dims(val: Any) -> list[int | None]:
    return [int(d) if isinstance(d, int) else None for d in val.shape]


def _batch_range(ep: Any, val: Any) -> list[int | None] | None:
    dim = val.shape[0]
    if isinstance(dim, int):
        return [dim, dim]
    expr = getattr(getattr(dim, "node", None), "expr", None)
    vr = ep.range_constraints.get(expr) if expr is not None else None
    if vr is None:
        return None

    def bound(v: Any) -> int | None:  # a sympy Integer, or an infinity (unbounded)
        return int(v) if isinstance(v, int) or getattr(v, "is_Integer", False) else None

    return [bound(vr.lower), bound(vr.upper)]


def _check_program(ep: Any) -> dict[str, Any]:
    """The program's interface, checked: one (N, C, H, W) tensor in, one (N, K) tensor out, eval mode."""
    from torch.export.graph_signature import InputKind, OutputKind, TensorArgument
    from torch.utils import _pytree as pytree

    sig = ep.graph_signature
    state_kinds = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
    users = [s for s in sig.input_specs if s.kind == InputKind.USER_INPUT]
    others = [s for s in sig.input_specs if s.kind not in state_kinds and s.kind != InputKind.USER_INPUT]
    if len(users) != 1 or others or not isinstance(users[0].arg, TensorArgument):
        raise _Refused(f"it takes {len(users) + len(others)} inputs: a classifier program takes exactly one tensor")
    if ep.call_spec.in_spec != pytree.tree_structure(((0,), {})):
        raise _Refused("it is not called with one positional tensor (export it as export(model, (x,)))")
    mutations = [s for s in sig.output_specs if s.kind in (OutputKind.BUFFER_MUTATION, OutputKind.PARAMETER_MUTATION)]
    if mutations:
        raise _Refused("it was exported in training mode (it updates batch-norm running statistics): call "
                       "model.eval() before torch.export.export")
    outs = [s for s in sig.output_specs if s.kind == OutputKind.USER_OUTPUT]
    if len(outs) != 1 or len(sig.output_specs) != 1 or not isinstance(outs[0].arg, TensorArgument):
        raise _Refused(f"it returns {len(sig.output_specs)} outputs: a classifier program returns one logits tensor")
    if ep.call_spec.out_spec != pytree.tree_structure(0):
        raise _Refused("it returns a tuple, list or dict: export a module that returns the logits tensor itself")
    x, y = _placeholder_val(ep, users[0].arg.name), _placeholder_val(ep, outs[0].arg.name)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = list(x.shape) if isinstance(x, torch.Tensor) else "?"
        raise _Refused(f"its input has shape {shape}: a classifier program takes (N, C, H, W)")
    if not isinstance(y, torch.Tensor) or y.dim() != 2:
        shape = list(y.shape) if isinstance(y, torch.Tensor) else "?"
        raise _Refused(f"its output has shape {shape}: a classifier program returns (N, K) logits")
    training, random = _mode_and_randomness(ep.graph)
    if training:
        raise _Refused(f"it was exported in training mode ({', '.join(training)} as in training: batch statistics "
                       "or active dropout): call model.eval() before torch.export.export")
    x_dims, y_dims = _dims(x), _dims(y)
    info: dict[str, Any] = {
        "input_shape": x_dims[1:] if None not in x_dims[1:] else None,
        "num_classes": y_dims[1],
        "batch_dynamic": x_dims[0] is None,
        "batch_range": _batch_range(ep, x),
        "input_dtype": str(x.dtype).replace("torch.", ""),
        "traced_mode": "eval",
    }
    if random:
        info["random_ops"] = random
        log.warning("the program calls random operators (%s): its logits differ from call to call", ", ".join(random))
    return info


def _load(data: bytes, source: str) -> tuple[nn.Module, dict[str, Any], _Archive]:
    try:
        archive = _Archive(data)
    except _Refused as e:
        raise UserError(f"refusing to load {source}: {e}") from e
    checked = archive.to_bytes()
    with _captured("torch.export") as capture:
        try:
            ep = torch.export.load(io.BytesIO(checked))
        except Exception as e:  # torch's deserializer on a (checked) archive: version skew, unknown ops, ...
            cause = capture.errors[-1] if capture.errors else e
            saved = f" (saved by torch {archive.torch_version}, this is {torch.__version__})" \
                if archive.torch_version and archive.torch_version != torch.__version__ else ""
            raise UserError(f"{source}: torch cannot load this program{saved}: {_first_line(cause)}") from e
    try:
        info = _check_program(ep)
    except _Refused as e:
        raise UserError(f"refusing to load {source}: {e}") from e
    try:
        graph_module = ep.module(check_guards=False)
    except Exception as e:  # torch builds the module from the (checked) graph: names clashing with nn.Module's own
        raise UserError(f"{source}: torch cannot build a module from this program: {_first_line(e)}") from e
    module = _finish_module(graph_module)
    info["torch_version_saved"] = archive.torch_version
    return module, info, archive


def _source_bytes(path_or_bytes: str | Path | bytes) -> tuple[bytes, str]:
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return bytes(path_or_bytes), "the program"
    path = require_file(path_or_bytes, "program")
    try:
        return path.read_bytes(), str(path)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from e


def load_program(path: str | Path | bytes) -> tuple[nn.Module, dict[str, Any]]:
    """Load a ``torch.export`` program (``.pt2``) as an ``nn.Module``, after checking that loading it runs no code.

    Parameters
    ----------
    path : path or bytes
        A file written by ``torch.export.save`` (or its bytes).

    Returns
    -------
    module : nn.Module
        ``ExportedProgram.module(check_guards=False)``: a ``torch.fx.GraphModule`` taking (N, C, H, W) and returning
        (N, K) logits, differentiable, in the eval mode it was exported in (``eval()`` is a no-op, ``train(True)``
        raises :class:`UserError`). Its ``state_dict()`` holds the parameters and persistent buffers under their
        original names; constants are non-persistent buffers.
    info : dict
        ``input_shape`` ([C, H, W], or None when a dimension is symbolic), ``num_classes`` (K or None),
        ``batch_dynamic`` (bool), ``batch_range`` ([min, max], max None when unbounded; None when unknown),
        ``input_dtype``, ``traced_mode`` (``"eval"``), ``program_sha256`` (hex sha256 of the file's bytes),
        ``torch_version_saved`` (the torch that saved it, or None), ``random_ops`` (only when it calls any).

    Raises
    ------
    UserError
        A missing, corrupt or foreign file; an archive failing the checks of the module docstring (pickled payloads,
        compiled code, unknown operators, free text where a name belongs...); a program that does not take one
        (N, C, H, W) tensor and return one (N, K) tensor, or that was exported in training mode.
    """
    data, source = _source_bytes(path)
    module, info, _ = _load(data, source)
    info["program_sha256"] = _sha256(data)
    return module, info


def program_record(path_or_bytes: str | Path | bytes) -> dict[str, Any]:
    """A JSON-able record from which :func:`rebuild_program` rebuilds the program's module without its weights.

    The record holds the checked archive (see the module docstring) with its weight payloads emptied, compressed with
    zlib and base64-encoded; the weights belong in the checkpoint's tensors (the ``state_dict()`` of the module
    :func:`load_program` returned). Call it for a program :func:`load_program` accepted.

    Returns
    -------
    dict
        ``{"kind": "program", "format": "otkit.program/1", "encoding": "zlib+base64", "archive": str,
        "archive_sha256": hex sha256 of the skeleton archive, "archive_bytes": its size, "program_sha256": hex sha256
        of the original file, "torch_version_saved": str or None}``.
    """
    data, source = _source_bytes(path_or_bytes)
    try:
        archive = _Archive(data)
    except _Refused as e:
        raise UserError(f"refusing to load {source}: {e}") from e
    skeleton = archive.to_bytes(skeleton=True)
    return {
        "kind": "program",
        "format": RECORD_FORMAT,
        "encoding": "zlib+base64",
        "archive": base64.b64encode(zlib.compress(skeleton, 9)).decode("ascii"),
        "archive_sha256": _sha256(skeleton),
        "archive_bytes": len(skeleton),
        "program_sha256": _sha256(data),
        "torch_version_saved": archive.torch_version,
    }


def rebuild_program(record: dict[str, Any], source: str = "the checkpoint") -> nn.Module:
    """Rebuild the module of a :func:`program_record`, with zero weights, through the checks of :func:`load_program`.

    ``module.load_state_dict(state, strict=True)`` with the checkpoint's tensors then restores the program exactly.

    Parameters
    ----------
    record : dict
        The record (metadata: anyone's text, checked again like a file).
    source : str
        The checkpoint, for messages.

    Raises
    ------
    UserError
        A malformed record, an archive that does not match its sha256, or one failing the checks.
    """
    if not isinstance(record, dict) or record.get("kind") != "program":
        raise UserError(f"{source}: not a program record")
    if record.get("format") != RECORD_FORMAT or record.get("encoding") != "zlib+base64":
        raise UserError(f"{source}: unknown program record format {_show(str(record.get('format')))!r} (this otkit "
                        f"reads {RECORD_FORMAT})")
    text, expected = record.get("archive"), record.get("archive_sha256")
    if not isinstance(text, str) or not isinstance(expected, str):
        raise UserError(f"{source}: its program record has no archive and sha256")
    try:
        blob = base64.b64decode(text.encode("ascii"), validate=True)
        inflater = zlib.decompressobj()
        skeleton = inflater.decompress(blob, _MAX_SKELETON_BYTES)
    except (binascii.Error, UnicodeEncodeError, zlib.error, ValueError) as e:
        raise UserError(f"{source}: its program record is not valid zlib+base64 ({e})") from e
    if not inflater.eof or inflater.unconsumed_tail:
        raise UserError(f"{source}: its program archive is truncated or larger than {_MAX_SKELETON_BYTES} bytes")
    if _sha256(skeleton) != expected:
        raise UserError(f"{source}: its program archive does not match its recorded sha256 (modified or corrupt)")
    module, _, _ = _load(skeleton, source)
    return module
