"""Property-based fuzzing of every loader: whatever bytes a user hands the kit, a loader either returns a well-formed
result or raises :class:`kit.errors.UserError`. Any other exception is a crash, and so is a loader that creates or
modifies a file, or that grows the process's peak memory by gigabytes.

Each property writes hostile inputs to a fresh temporary folder and calls the real loader: random bytes, structured
mutations of a valid file (truncation, flipped bytes, overwritten length fields, inserted and deleted runs), and
hand-made files that are wrong in one way at a time (magic, dimensions, sizes, dtypes, NaN/inf, object arrays, pickles
that name other globals, JSON/TOML of the wrong types, deep nesting).

Budgets: the ``ci`` profile (default; what ``make test`` runs) is small, derandomized and keeps no example database,
so CI is reproducible and takes about a minute for the whole module on 2 cores. ``make fuzz`` runs the same properties
under the ``long`` profile (``OTKIT_FUZZ_PROFILE=long``: random seeds, many more examples, failures kept in
``.hypothesis/`` for replay). ``OTKIT_FUZZ_SCALE`` multiplies either profile's example counts.
"""

from __future__ import annotations

import copy
import datetime as dt
import gzip
import hashlib
import io
import json
import os
import pickle
import resource
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomllib
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kit.errors import UserError

pytestmark = pytest.mark.fuzz

# ------------------------------------------------------------------------------------------------------------ budget
_PROFILE = os.environ.get("OTKIT_FUZZ_PROFILE", "ci")
if _PROFILE not in ("ci", "long"):
    raise pytest.UsageError(f"OTKIT_FUZZ_PROFILE must be ci or long, got {_PROFILE!r}")
_SCALE = float(os.environ.get("OTKIT_FUZZ_SCALE", "1"))
_COMMON = dict(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
settings.register_profile("otkit-fuzz-ci", derandomize=True, database=None, **_COMMON)
settings.register_profile("otkit-fuzz-long", derandomize=False, **_COMMON)  # default database: .hypothesis/


def budget(ci: int, long: int) -> settings:
    """Settings of one property: ``ci`` examples under the CI profile, ``long`` under ``make fuzz``."""
    n = ci if _PROFILE == "ci" else long
    return settings(settings.get_profile(f"otkit-fuzz-{_PROFILE}"), max_examples=max(1, int(n * _SCALE)))


# ----------------------------------------------------------------------------------------------------------- harness
_MAX_RSS_GROWTH = 1 << 30  # bytes of peak-RSS growth one loader call may cause


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    out = {}
    for p in sorted(root.rglob("*")):
        s = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else ""
        out[str(p.relative_to(root))] = (s.st_mode, s.st_size, digest)
    return out


def call_loader(name: str, root: Path, call: Callable[[], Any], check: Callable[[Any], None] | None = None,
                must_fail: bool = False) -> Any:
    """Call a loader on files under ``root``: a result (checked by ``check``) or a one-line UserError, nothing else.

    Any other exception propagates (a crash). The folder must be byte-for-byte unchanged afterwards, and the peak
    RSS of the process must not grow by a gigabyte. Returns the result, or None after a UserError.
    """
    before, rss = _snapshot(root), _peak_rss()
    try:
        result = call()
    except UserError as e:
        message = str(e)
        assert message and "\n" not in message, repr(message)
        event(f"{name}: UserError")
        result = None
    else:
        event(f"{name}: loaded")
        assert not must_fail, f"loader accepted an input it must refuse: {result!r}"
        if check is not None:
            check(result)
    assert _snapshot(root) == before, "the loader created, removed or modified a file"
    assert _peak_rss() - rss < _MAX_RSS_GROWTH, "the loader grew the peak RSS by more than 1 GiB"
    return result


def workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="otkit-fuzz-")


# -------------------------------------------------------------------------------------------------------- mutations
_INTERESTING_32 = [0, 1, 2, 3, 4, 8, 10, 28, 32, 100, 255, 256, 3072, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
                   0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]
_INTERESTING_64 = [0, 1, 8, 255, 2**31, 2**32 - 1, 2**40, 2**62, 2**63 - 1, 2**64 - 1]


@st.composite
def mutated(draw: st.DrawFn, valid: bytes, max_ops: int = 4) -> bytes:
    """``valid`` after 1..max_ops byte-level mutations: truncate, flip a bit, set a byte, write an interesting
    32/64-bit integer (either endianness), insert, delete or duplicate a run, append junk."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, max_ops))):
        n = len(data)
        op = draw(st.sampled_from(["truncate", "flip", "set", "int32", "int64", "insert", "delete", "dup", "append"]))
        if op == "truncate":
            data = data[: draw(st.integers(0, n))]
        elif op == "append":
            data += draw(st.binary(min_size=1, max_size=64))
        elif op == "insert":
            i = draw(st.integers(0, n))
            data[i:i] = draw(st.binary(min_size=1, max_size=32))
        elif n == 0:
            continue
        elif op == "flip":
            i = draw(st.integers(0, n - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[draw(st.integers(0, n - 1))] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]) | st.integers(0, 255))
        elif op in ("int32", "int64"):
            size = 4 if op == "int32" else 8
            value = draw(st.sampled_from(_INTERESTING_32 if size == 4 else _INTERESTING_64))
            raw = value.to_bytes(size, draw(st.sampled_from(["big", "little"])))
            i = draw(st.integers(0, max(n - 1, 0)))
            data[i:i + size] = raw
        elif op == "delete":
            i = draw(st.integers(0, n - 1))
            del data[i:i + draw(st.integers(1, 64))]
        else:  # dup
            i = draw(st.integers(0, n - 1))
            j = draw(st.integers(i, min(n, i + 64)))
            data[j:j] = data[i:j]
    return bytes(data)


def hostile(valid: bytes, max_size: int = 512) -> st.SearchStrategy[bytes]:
    """Random bytes, or a mutation of ``valid``, or ``valid`` itself."""
    return st.one_of(st.just(valid), mutated(valid), st.binary(max_size=max_size))


_json_leaf = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
              | st.text(max_size=12) | st.sampled_from([0, 1, -1, 3, 2**63, "", "sha256:", "fp32", "onnx"]))
json_values = st.recursive(
    _json_leaf,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
# JSON text fragments json.dumps never writes: deep nesting, numbers beyond float or int-to-str limits, bare constants.
_RAW_JSON = ["[" * 5000 + "]" * 5000, "{\"a\":" * 5000 + "1" + "}" * 5000, "[" * 1100 + "]" * 1100,
             "1e400", "-1e400", "1" * 5000, "NaN", "-Infinity", "Infinity", "1.0e-400", "-0", "0.0"]


def json_text(doc: Any, raws: dict[str, str]) -> str:
    """``json.dumps(doc)`` with the sentinel strings of ``raws`` replaced by their raw JSON fragments."""
    text = json.dumps(doc)
    for sentinel, raw in raws.items():
        text = text.replace(json.dumps(sentinel), raw)
    return text


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated_json(draw: st.DrawFn, base: Any, max_ops: int = 3, raw: bool = True) -> tuple[Any, dict[str, str]]:
    """A deep copy of ``base`` with 1..max_ops edits at random paths: a value replaced (by any JSON value, a raw
    fragment such as deep nesting or 1e400, or a wrong-typed value), a key deleted or added, an element dropped."""
    doc = copy.deepcopy(base)
    raws: dict[str, str] = {}
    for _ in range(draw(st.integers(1, max_ops))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "replace", "delete", "add", "raw"] if raw else ["replace", "delete",
                                                                                          "add"]))
        if op == "raw":
            sentinel = f"\x00raw{len(raws)}\x00"
            raws[sentinel] = draw(st.sampled_from(_RAW_JSON))
            value: Any = sentinel
        else:
            value = draw(json_values)
        if not path:
            if op in ("replace", "raw"):
                doc = value
            continue
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        last = path[-1]
        if op in ("replace", "raw"):
            parent[last] = value
        elif op == "delete":
            del parent[last]
        elif isinstance(parent[last], dict):
            parent[last][draw(st.text(max_size=8))] = value
        elif isinstance(parent[last], list):
            parent[last].insert(draw(st.integers(0, len(parent[last]))), value)
    return doc, raws


# --------------------------------------------------------------------------------------------------------- datasets
def check_dataset(split: str, spec: str) -> Callable[[Any], None]:
    def check(ds: Any) -> None:
        from kit.data import Dataset

        assert isinstance(ds, Dataset) and ds.split == split and ds.spec == spec
        x, y = ds.x, ds.y
        assert x.dtype == torch.float32 and x.ndim == 4 and x.is_contiguous() and min(x.shape) >= 1
        assert bool(torch.isfinite(x).all()) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert y.dtype == torch.int64 and tuple(y.shape) == (x.shape[0],)
        assert 0 <= int(y.min()) and int(y.max()) < ds.num_classes >= 1
        assert all(isinstance(n, str) for n in ds.class_names)
        assert ds.fingerprint.startswith("sha256:")

    return check


# IDX (MNIST, Fashion-MNIST) ------------------------------------------------------------------------------------
def idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


@st.composite
def idx_file(draw: st.DrawFn, valid: bytes, ndim: int) -> bytes:
    kind = draw(st.sampled_from(["valid", "mutated", "mutated", "header", "random"]))
    if kind == "valid":
        return valid
    if kind == "mutated":
        return draw(mutated(valid))
    if kind == "random":
        return draw(st.binary(max_size=256))
    magic = draw(st.sampled_from([b"\0\0", b"\0\1", b"\x1f\x8b", b"\xff\xff"]))
    code = draw(st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0xFF]))
    nd = draw(st.sampled_from([ndim, ndim, 0, 1, 3, 4, 255]))
    dims = draw(st.lists(st.sampled_from(_INTERESTING_32) | st.integers(0, 2**32 - 1), min_size=nd, max_size=nd))
    payload = draw(st.binary(max_size=256) | st.just(valid[4 + 4 * ndim:]))
    return magic + bytes([code, nd]) + b"".join(d.to_bytes(4, "big") for d in dims) + payload


@st.composite
def idx_dataset(draw: st.DrawFn) -> dict[str, Any]:
    n, h, w = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    images = idx_bytes(rng.integers(0, 256, (n, h, w), dtype=np.uint8))
    labels = idx_bytes(rng.integers(0, draw(st.sampled_from([10, 11, 256])), n, dtype=np.uint8))
    files = {}
    for name, valid, nd in (("images-idx3-ubyte", images, 3), ("labels-idx1-ubyte", labels, 1)):
        if draw(st.integers(0, 19)) == 0:
            continue  # missing file
        data = draw(idx_file(valid, nd))
        gz = draw(st.booleans())
        if gz:
            data = gzip.compress(data, mtime=0)
            if draw(st.integers(0, 3)) == 0:
                data = draw(mutated(data))
        files[name + (".gz" if gz else "")] = data
    return {"kind": draw(st.sampled_from(["mnist", "fashion-mnist"])), "split": draw(st.sampled_from(["train", "test"])),
            "layout": draw(st.sampled_from(["", "raw", "sub/raw"])), "files": files}


@budget(ci=300, long=6000)
@given(case=idx_dataset())
def test_fuzz_idx(case: dict[str, Any]) -> None:
    from kit.data import load_dataset

    with workdir() as tmp:
        root = Path(tmp)
        sub = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[case["kind"]]
        folder = root / case["layout"].replace("sub", sub)
        folder.mkdir(parents=True, exist_ok=True)
        prefix = "train" if case["split"] == "train" else "t10k"
        for name, data in case["files"].items():
            (folder / f"{prefix}-{name}").write_bytes(data)
        spec = f"{case['kind']}:{root}"
        call_loader("load_dataset", root, lambda: load_dataset(spec, case["split"]), check_dataset(case["split"], spec))


# CIFAR (restricted unpickler) ------------------------------------------------------------------------------------
class _Reduce:
    """Pickles as ``func(*args)``: how a crafted pickle calls any global."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


def _evil_payloads(target: Path) -> list[Any]:
    """Objects whose pickles reference globals a CIFAR batch never holds, or numpy calls that allocate any shape."""
    import builtins
    import subprocess

    try:
        from numpy._core.multiarray import _reconstruct as rec
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct as rec

    touch = f"touch {target}"
    u8 = np.dtype(np.uint8)
    return [
        _Reduce(os.system, touch),
        _Reduce(subprocess.call, ["touch", str(target)]),
        _Reduce(builtins.eval, f"open({str(target)!r}, 'w')"),
        _Reduce(builtins.exec, "import os"),
        _Reduce(np.load, str(target)),
        _Reduce(builtins.open, str(target), "w"),
        {b"data": _Reduce(os.system, touch)},
        # numpy.ndarray called directly: an uninitialised array of gigabytes from a few bytes of pickle
        {b"data": _Reduce(np.ndarray, (2**21, 3072), u8), b"labels": _Reduce(np.ndarray, (2**21,), u8),
         b"label_names": [b"x"] * 10},
        # numpy's own reconstruction, asked for a shape the file does not hold
        {b"data": _Reduce(rec, np.ndarray, (2**21, 3072), u8), b"labels": _Reduce(rec, np.ndarray, (2**21,), u8),
         b"label_names": [b"x"] * 10},
    ]


def evil_pickle(i: int, protocol: int, target: Path) -> bytes:
    """The i-th crafted pickle aimed at ``target``: an object of :func:`_evil_payloads`, or a hand-written one."""
    payloads = _evil_payloads(target)
    if i < len(payloads):
        return pickle.dumps(payloads[i], protocol=protocol)
    raw = _RAW_EVIL[i - len(payloads)]
    if raw.startswith(b"\x80\x04"):  # protocol 4: frame length and argument length follow the target
        arg = f"touch {target}".encode()
        body = b"\x8c\x02os\x8c\x06system\x93\x8c" + bytes([len(arg)]) + arg + b"\x85R."
        return b"\x80\x04\x95" + struct.pack("<Q", len(body)) + body
    return raw.replace(b"{t}", str(target).encode())


# Hand-written pickles: protocol 0 GLOBAL and protocol 4 STACK_GLOBAL calls of os.system / posix.system.
_RAW_EVIL = [b"cos\nsystem\n(S'touch {t}'\ntR.", b"cposix\nsystem\n(S'touch {t}'\ntR.",
             b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x06system\x93\x8c\x0atouch {t}\x85R.",
             b"cbuiltins\ngetattr\n(cnumpy\nndarray\nS'tofile'\ntR."]

_label_lists = st.one_of(
    st.lists(st.integers(-3, 12), max_size=6),
    st.lists(st.integers(-(2**70), 2**70), max_size=4),
    st.lists(st.floats() | st.text(max_size=3) | st.none() | st.binary(max_size=3), max_size=4),
    st.lists(st.lists(st.integers(0, 9), max_size=3), max_size=3),
    hnp.arrays(st.sampled_from([np.uint8, np.int64, np.float32, np.int8, np.uint64, np.bool_]),
               hnp.array_shapes(min_dims=0, max_dims=2, max_side=4)),
    st.none() | st.text(max_size=4) | st.integers(),
)
_data_arrays = st.one_of(
    hnp.arrays(st.sampled_from([np.uint8, np.float32, np.int16, np.bool_, np.float64]),
               st.tuples(st.integers(0, 3), st.sampled_from([3072, 3071, 1, 0, 1024]))),
    hnp.arrays(np.uint8, hnp.array_shapes(min_dims=0, max_dims=4, max_side=5)),
    st.binary(max_size=16) | st.none() | st.lists(st.integers(0, 255), max_size=8),
)
_name_lists = st.one_of(
    st.lists(st.binary(max_size=6), min_size=0, max_size=12),
    st.lists(st.text(max_size=6) | st.integers() | st.none(), max_size=12),
    st.lists(st.sampled_from([b"\xff\xfe", b"cat", b""]), min_size=100, max_size=100),
    st.text(max_size=5) | st.none() | st.binary(max_size=5),
)


def _cifar_valid(kind: str, name: str, n: int, rng: np.random.Generator) -> dict:
    if name in ("batches.meta", "meta"):
        if kind == "cifar10":
            return {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": n}
        return {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                b"coarse_label_names": [f"k{i}".encode() for i in range(20)]}
    d = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
         b"filenames": [f"{i}.png".encode() for i in range(n)]}
    if kind == "cifar10":
        d[b"labels"] = [int(v) for v in rng.integers(0, 10, n)]
    else:
        d[b"fine_labels"] = [int(v) for v in rng.integers(0, 100, n)]
        d[b"coarse_labels"] = [int(v) for v in rng.integers(0, 20, n)]
    return d


@st.composite
def cifar_file(draw: st.DrawFn, kind: str, name: str, n: int) -> tuple[bytes | tuple[int, int], bool]:
    """(pickle bytes, False), or ((i, protocol), True) for :func:`evil_pickle`: evil files must be refused."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    valid = _cifar_valid(kind, name, n, rng)
    protocol = draw(st.integers(0, pickle.HIGHEST_PROTOCOL))
    variant = draw(st.sampled_from(["valid", "valid", "fields", "fields", "mutated", "evil", "random"]))
    if variant == "evil":
        return (draw(st.integers(0, len(_evil_payloads(Path("x"))) + len(_RAW_EVIL) - 1)), protocol), True
    if variant == "random":
        return draw(st.binary(max_size=512)), False
    if variant == "fields":
        for key in list(valid):
            if draw(st.integers(0, 2)) == 0:
                choice = draw(st.sampled_from(["delete", "labels", "data", "names", "json"]))
                if choice == "delete":
                    del valid[key]
                else:
                    valid[key] = draw({"labels": _label_lists, "data": _data_arrays, "names": _name_lists,
                                       "json": json_values}[choice])
        if draw(st.booleans()):  # keys re-saved as str by Python 3
            valid = {k.decode(): v for k, v in valid.items()}
        if draw(st.integers(0, 9)) == 0:
            valid = draw(st.sampled_from([[valid], (valid,), None, 3, "data"]))
    data = pickle.dumps(valid, protocol=protocol)
    if variant == "mutated":
        data = draw(mutated(data))
    return data, False


@st.composite
def cifar_dataset(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["cifar10", "cifar100"]))
    split = draw(st.sampled_from(["train", "test"]))
    if kind == "cifar10":
        names = ["batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
        read = {"batches.meta", *([f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"])}
    else:
        names = ["meta", "train", "test"]
        read = {"meta", split}
    files = {}
    for name in names:
        if draw(st.integers(0, 29)) == 0:
            continue
        # most files valid: a single broken one is the interesting case; the others must get past the first
        files[name] = draw(cifar_file(kind, name, draw(st.integers(1, 3)))) if draw(
            st.integers(0, 2)) == 0 else (pickle.dumps(_cifar_valid(kind, name, 2, np.random.default_rng(0))), False)
    return {"kind": kind, "split": split, "files": files, "read": read,
            "parent": draw(st.booleans())}


@budget(ci=250, long=5000)
@given(case=cifar_dataset())
def test_fuzz_cifar(case: dict[str, Any]) -> None:
    from kit.data import load_dataset

    with workdir() as tmp:
        root = Path(tmp)
        folder = root / {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[case["kind"]] \
            if case["parent"] else root
        folder.mkdir(exist_ok=True)
        evil_read = False
        for name, (data, evil) in case["files"].items():
            if evil:
                data = evil_pickle(*data, target=root / "PWNED")
            (folder / name).write_bytes(data)
            evil_read |= evil and name in case["read"]
        spec = f"{case['kind']}:{root}"
        # (an evil file the split reads is refused unless an earlier file of the split fails first: still no success)
        call_loader("load_dataset", root, lambda: load_dataset(spec, case["split"]), check_dataset(case["split"], spec),
                    must_fail=evil_read)
        assert not (root / "PWNED").exists()


# npz ---------------------------------------------------------------------------------------------------------------
_NPZ_DTYPES = [np.uint8, np.float32, np.float64, np.float16, np.int64, np.int8, np.uint64, np.bool_, np.complex64,
               "U3", "S2", "M8[s]", [("a", "u1"), ("b", "<f4")]]


def npy_header(descr: str, shape: tuple, fortran: bool = False, version: tuple[int, int] = (1, 0)) -> bytes:
    """A .npy header that declares anything (the writer does not check it against data)."""
    buf = io.BytesIO()
    header = {"descr": descr, "fortran_order": fortran, "shape": shape}
    if version == (1, 0):
        np.lib.format.write_array_header_1_0(buf, header)
    else:
        np.lib.format.write_array_header_2_0(buf, header)
    return buf.getvalue()


@st.composite
def npz_array(draw: st.DrawFn, role: str, n: int | None = None) -> Any:
    """One array of an npz: plausible for its role (images, labels, names; ``n`` of them), or of any dtype and shape,
    an object array, or a raw member whose header declares a shape its data does not back."""
    kind = draw(st.sampled_from(["plausible"] * 6 + ["any", "object", "header"]))
    if kind == "object":
        return np.array(draw(st.lists(st.integers() | st.text(max_size=3) | st.none(), max_size=4)) + [None],
                        dtype=object)
    if kind == "header":  # raw member: a declared shape the data does not back
        descr = draw(st.sampled_from(["<f4", "|u1", "<i8", "|O", "|V8", "<U5", ">f8", "<c8", "|b1"]))
        shape = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 100, 2**20, 2**31, 2**40, 10**12]),
                                    max_size=4)))
        payload = draw(st.binary(max_size=64))
        return npy_header(descr, shape, draw(st.booleans()), draw(st.sampled_from([(1, 0), (2, 0)]))) + payload
    if kind == "any":
        dtype = draw(st.sampled_from(_NPZ_DTYPES))
        return draw(hnp.arrays(np.dtype(dtype), hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4)))
    n = draw(st.integers(0, 6)) if n is None or draw(st.integers(0, 9)) == 0 else n
    if role == "x":
        dtype = draw(st.sampled_from([np.uint8, np.float32, np.float64, np.float16]))
        shape = draw(st.sampled_from([(n, 4, 4), (n, 1, 3, 3), (n, 3, 2, 2), (n, 2, 2, 3), (n, 2, 2, 1), (n, 5, 2, 2)]))
        elements = st.floats(0, 1, width=16) if np.dtype(dtype).kind == "f" else None
        if draw(st.integers(0, 3)) == 0 and np.dtype(dtype).kind == "f":
            elements = st.floats(-0.5, 1.5, width=16) | st.sampled_from([float("nan"), float("inf"), -0.0])
        return draw(hnp.arrays(dtype, shape, elements=elements))
    if role == "y":
        dtype = draw(st.sampled_from([np.int64, np.int64, np.uint8, np.int32, np.uint64, np.float32]))
        info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
        elements = (st.integers(0, 9) | st.integers(-2, 12) | st.sampled_from([int(info.max), int(info.min)])).filter(
            lambda v: info.min <= v <= info.max) if info else None
        return draw(hnp.arrays(dtype, draw(st.sampled_from([(n,)] * 4 + [(n, 1), ()])), elements=elements))
    if draw(st.booleans()):
        return draw(hnp.arrays(draw(st.sampled_from(["U4", "S4"])), st.integers(0, 12).map(lambda k: (k,))))
    return np.array([b"\xff\xfe", b"a"], dtype="S2")


@st.composite
def npz_file(draw: st.DrawFn) -> bytes:
    shape = draw(st.sampled_from(["xy", "split", "other"]))
    keys = {"xy": ["x", "y"], "split": ["x_train", "y_train", "x_test", "y_test"],
            "other": draw(st.lists(st.sampled_from(["x", "y", "x_train", "y_test", "X", "data"]), max_size=3,
                                   unique=True))}[shape]
    keys = [k for k in keys if draw(st.integers(0, 14)) != 0]
    if draw(st.booleans()):
        keys.append("class_names")
    sizes = {"train": draw(st.integers(1, 6)), "test": draw(st.integers(1, 6)), "": draw(st.integers(2, 8))}
    members: dict[str, Any] = {
        k: draw(npz_array(k.split("_")[0] if k != "class_names" else "names", sizes.get(k.partition("_")[2], 4)))
        for k in keys}
    buf = io.BytesIO()
    method = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
    with zipfile.ZipFile(buf, "w", method) as z:
        for k, v in members.items():
            if isinstance(v, bytes):
                z.writestr(k + ".npy", v)
            else:
                member = io.BytesIO()
                np.lib.format.write_array(member, v, allow_pickle=True)
                z.writestr(k + ".npy", member.getvalue())
    data = buf.getvalue()
    variant = draw(st.sampled_from(["archive", "archive", "archive", "mutated", "npy", "random"]))
    if variant == "mutated":
        return draw(mutated(data))
    if variant == "npy":
        member = io.BytesIO()
        np.save(member, np.zeros((2, 2), np.uint8))
        return member.getvalue()
    if variant == "random":
        return draw(st.binary(max_size=256))
    return data


@budget(ci=400, long=8000)
@given(data=npz_file(), split=st.sampled_from(["train", "test"]), seed=st.integers(0, 3))
def test_fuzz_npz(data: bytes, split: str, seed: int) -> None:
    from kit.data import load_dataset

    with workdir() as tmp:
        root = Path(tmp)
        (root / "d.npz").write_bytes(data)
        spec = f"npz:{root / 'd.npz'}"
        call_loader("load_dataset", root, lambda: load_dataset(spec, split, seed), check_dataset(split, spec))


# image folders -----------------------------------------------------------------------------------------------------
_MODES = ["L", "RGB", "RGBA", "1", "P", "LA", "I;16", "I", "F", "CMYK"]


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header declares ``width`` x ``height`` grey pixels, with a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


@st.composite
def image_bytes(draw: st.DrawFn, size: tuple[int, int]) -> bytes:
    from PIL import Image

    variant = draw(st.sampled_from(["image", "image", "image", "mutated", "random", "bomb"]))
    if variant == "random":
        return draw(st.binary(max_size=128))
    if variant == "bomb":
        return bomb_png(draw(st.sampled_from([1, 2**14, 10_000, 100_000, 2**31 - 1])),
                        draw(st.sampled_from([1, 2**14, 10_000, 100_000, 2**31 - 1])))
    mode = draw(st.sampled_from(_MODES))
    fmt = draw(st.sampled_from(["PNG", "JPEG"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    im = Image.new(mode, size)
    im.putdata([tuple(v) if len(im.getbands()) > 1 else int(v[0])
                for v in rng.integers(0, 256, (size[0] * size[1], len(im.getbands())))])
    buf = io.BytesIO()
    try:
        im.save(buf, fmt)
    except (OSError, ValueError, KeyError):
        im.convert("RGB").save(buf, fmt)
    data = buf.getvalue()
    return draw(mutated(data)) if variant == "mutated" else data


@st.composite
def image_folder(draw: st.DrawFn) -> dict[str, bytes]:
    layout = draw(st.sampled_from(["flat", "flat", "split", "lone"]))
    classes = draw(st.lists(st.sampled_from(["a", "b", "cat", "0", ".hidden", "é x"]), min_size=1, max_size=3,
                            unique=True))
    sizes = [(draw(st.integers(1, 5)), draw(st.integers(1, 5)))]
    if draw(st.integers(0, 3)) == 0:
        sizes.append((draw(st.integers(1, 5)), draw(st.integers(1, 5))))  # mixed sizes
    tops = {"flat": [""], "split": ["train/", "test/"], "lone": [draw(st.sampled_from(["train/", "test/"]))]}[layout]
    files: dict[str, bytes] = {}
    for top in tops:
        for c in classes:
            for i in range(draw(st.integers(0, 3))):
                suffix = draw(st.sampled_from([".png", ".png", ".jpg", ".JPEG", ".gif", ".txt"]))
                files[f"{top}{c}/{i}{suffix}"] = draw(image_bytes(draw(st.sampled_from(sizes))))
    if draw(st.integers(0, 9)) == 0:
        files["stray.png"] = draw(image_bytes((2, 2)))
    return files


@budget(ci=250, long=5000)
@given(files=image_folder(), split=st.sampled_from(["train", "test"]))
def test_fuzz_image_folder(files: dict[str, bytes], split: str) -> None:
    from kit.data import load_dataset

    with workdir() as tmp:
        root = Path(tmp)
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        spec = f"folder:{root}"
        call_loader("load_dataset", root, lambda: load_dataset(spec, split), check_dataset(split, spec))


# ------------------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def checkpoint_base(tmp_path_factory) -> tuple[bytes, dict[str, torch.Tensor], dict[str, str]]:
    """A real checkpoint of a tiny model: (file bytes, state, safetensors metadata)."""
    from safetensors import safe_open

    from kit.checkpoint import CheckpointInfo, save_checkpoint

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    info = CheckpointInfo(arch={"name": "cnn-small", "params": {}}, num_classes=3, class_names=["a", "b", "c"],
                          input_shape=[1, 4, 4], normalization={"mean": [0.0], "std": [1.0]},
                          dataset={"spec": "digits:4"}, defense="standard")
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_checkpoint(model, path, info)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        state = {k: f.get_tensor(k) for k in f.keys()}
    return path.read_bytes(), state, meta


def _reseal(record: Any, state: dict[str, torch.Tensor]) -> Any:
    """Recompute the record's hashes after an edit, so the fuzzed fields reach the code behind the hash checks."""
    import kit.checkpoint as C

    if not isinstance(record, dict):
        return record
    record = dict(record)
    record["weights_sha256"] = C.weights_sha256(state)
    if hasattr(C, "checkpoint_sha256") and "checkpoint_sha256" in record:
        try:
            record["checkpoint_sha256"] = C.checkpoint_sha256(record, record["weights_sha256"])
        except (TypeError, ValueError):
            pass
    return record


@st.composite
def checkpoint_file(draw: st.DrawFn, base: tuple[bytes, dict[str, torch.Tensor], dict[str, str]]) -> bytes:
    from safetensors.torch import save

    blob, state, meta = base
    variant = draw(st.sampled_from(["record", "record", "record", "metadata", "bytes", "header"]))
    if variant == "bytes":
        return draw(hostile(blob))
    if variant == "header":  # a safetensors header of any JSON, with a length prefix that may lie
        header, raws = draw(mutated_json(json.loads(blob[8:8 + struct.unpack("<Q", blob[:8])[0]])))
        text = json_text(header, raws).encode()
        length = draw(st.sampled_from([len(text), len(text) + 1, 0, 2**32, 2**63 - 1]))
        return struct.pack("<Q", length) + text + blob[8 + struct.unpack("<Q", blob[:8])[0]:]
    record = json.loads(meta["otkit"])
    new_meta = dict(meta)
    if variant == "record":
        record, raws = draw(mutated_json(record))
        if draw(st.booleans()):
            record = _reseal(record, state)
        new_meta["otkit"] = json_text(record, raws)
    else:
        extra = draw(st.dictionaries(st.sampled_from(["otkit", "format", "x"]), st.text(max_size=20) | st.sampled_from(
            ["[" * 5000, "null", "[]", "{}", "1e400", '"otkit"']), max_size=3))
        new_meta.update(extra)
        if draw(st.integers(0, 4)) == 0:
            new_meta.pop("otkit", None)
    return save(state, metadata=new_meta)


def _check_checkpoint(result: Any) -> None:
    from kit.checkpoint import CheckpointInfo

    state, info = result
    assert isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    assert isinstance(info, CheckpointInfo)
    assert isinstance(info.arch, dict), info.arch
    assert isinstance(info.num_classes, int) and not isinstance(info.num_classes, bool) and info.num_classes >= 1
    assert isinstance(info.class_names, list) and all(isinstance(n, str) for n in info.class_names)
    assert len(info.class_names) == info.num_classes
    assert isinstance(info.input_shape, list) and len(info.input_shape) == 3
    assert all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in info.input_shape)
    assert isinstance(info.normalization, dict)
    assert isinstance(info.weights_sha256, str) and info.weights_sha256.startswith("sha256:")


@budget(ci=300, long=5000)
@given(data=st.data())
def test_fuzz_checkpoint(checkpoint_base, data: st.DataObject) -> None:
    from kit.checkpoint import read_checkpoint

    blob = data.draw(checkpoint_file(checkpoint_base))
    with workdir() as tmp:
        root = Path(tmp)
        (root / "model.safetensors").write_bytes(blob)
        call_loader("read_checkpoint", root, lambda: read_checkpoint(root / "model.safetensors"), _check_checkpoint)


# ------------------------------------------------------------------------------------------------------------- ONNX
def tiny_onnx(input_dims: list[Any] | None = None, output_dims: list[Any] | None = None,
              in_type: int = 1, out_type: int = 1, meta: list[tuple[str, str]] | None = None) -> bytes:
    """A (N, 1, 4, 4) -> (N, 3) classifier: Flatten, MatMul, Add (built with onnx.helper; no torch export)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, input_dims or ["N", 1, 4, 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, output_dims or ["N", 3])
    x.type.tensor_type.elem_type, y.type.tensor_type.elem_type = in_type, out_type
    w = numpy_helper.from_array(rng.normal(size=(16, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(size=(3,)).astype(np.float32), "b")
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1), helper.make_node("MatMul", ["f", "w"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["logits"])]
    model = helper.make_model(helper.make_graph(nodes, "tiny", [x], [y], [w, b]),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for k, v in meta or []:
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    return model.SerializeToString()


_META_KEYS = ["otkit.input_shape", "otkit.num_classes", "otkit.max_batch", "otkit.precision", "otkit.format",
              "otkit.twin_weights_sha256", "otkit.arch", "otkit.class_names", "producer", "otkit."]
_DIMS = st.sampled_from(["N", "", 0, 1, 3, 4, 16, -1, 2**31, 2**40]) | st.none()


@st.composite
def onnx_file(draw: st.DrawFn) -> bytes:
    variant = draw(st.sampled_from(["meta", "meta", "meta", "shapes", "bytes"]))
    meta = []
    if variant in ("meta", "shapes"):
        for _ in range(draw(st.integers(0, 5))):
            key = draw(st.sampled_from(_META_KEYS) | st.text(max_size=10))
            if draw(st.booleans()):
                value = json.dumps(draw(json_values | st.lists(st.integers(-2, 2**40) | st.floats(), max_size=4)))
            else:
                value = draw(st.text(max_size=20) | st.sampled_from(_RAW_JSON))
            meta.append((key, value))
    if variant == "shapes":
        def dims(n: int) -> list[Any]:
            return [d if d is not None else "" for d in draw(st.lists(_DIMS, min_size=n, max_size=n))]

        types = st.sampled_from([1, 10, 11, 7, 16, 0, 999])
        try:
            return tiny_onnx(dims(draw(st.sampled_from([4, 4, 3, 2, 5]))), dims(draw(st.sampled_from([2, 2, 1, 3]))),
                             draw(types), draw(types), meta)
        except (ValueError, TypeError):
            return tiny_onnx(meta=meta)
    valid = tiny_onnx(meta=meta)
    return draw(hostile(valid)) if variant == "bytes" else valid


def _check_describe(doc: Any) -> None:
    assert isinstance(doc, dict) and doc["format"] == "onnx"
    json.dumps(doc, default=str)  # what `otkit models show --json` prints
    run = doc["otkit_engine"]
    if run["runnable"]:
        shape = run["input_shape"]
        assert len(shape) == 3 and all(isinstance(d, int) and d >= 1 for d in shape), shape
        assert isinstance(run["num_classes"], int) and run["num_classes"] >= 1


def _check_engine(engine: Any) -> None:
    from exporters.engines import Engine

    assert isinstance(engine, Engine)
    shape = tuple(engine.input_shape)
    assert len(shape) == 3 and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape), shape
    assert isinstance(engine.num_classes, int) and not isinstance(engine.num_classes, bool) and engine.num_classes >= 1
    assert isinstance(engine.max_batch, int) and engine.max_batch >= 1
    assert isinstance(engine.sha256, str) and engine.sha256.startswith("sha256:")
    assert isinstance(engine.precision, str)


@budget(ci=400, long=8000)
@given(data=onnx_file())
def test_fuzz_onnx(data: bytes) -> None:
    from exporters.engines import load_engine
    from exporters.onnx import describe_onnx

    with workdir() as tmp:
        root = Path(tmp)
        (root / "model.onnx").write_bytes(data)
        call_loader("describe_onnx", root, lambda: describe_onnx(root / "model.onnx"), _check_describe)
        call_loader("load_engine", root, lambda: load_engine(root / "model.onnx", "cpu"), _check_engine)


# -------------------------------------------------------------------------------------------------------- run files
def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v))
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_str(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def toml_text(doc: dict[str, Any]) -> str:
    return "".join(f"{_toml_str(k)} = {toml_value(v)}\n" for k, v in doc.items())


_toml_leaf = (st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=10)
              | st.datetimes() | st.dates() | st.times()
              | st.sampled_from(["onnx", "tensorrt", "pgd-linf@0.3", "", "sat", "cnn-small", "digits:8", 0, 1, -1]))
toml_values = st.recursive(_toml_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(
    st.sampled_from(["formats", "attacks", "gates", "eps", "x", "samples"]) | st.text(max_size=6), c, max_size=3),
                           max_leaves=8)


@st.composite
def run_doc(draw: st.DrawFn) -> dict[str, Any]:
    """The embedded default run, with 1..3 values replaced by hostile TOML values, keys deleted or added."""
    from evaluators.pipeline import default_run_text

    doc = tomllib.loads(default_run_text())
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)[1:]))
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if op == "replace":
            parent[path[-1]] = draw(toml_values)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent[path[-1]], dict):
            parent[path[-1]][draw(st.text(max_size=6))] = draw(toml_values)
    return doc


@st.composite
def run_text(draw: st.DrawFn) -> bytes:
    from evaluators.pipeline import default_run_text

    base = default_run_text().encode()
    variant = draw(st.sampled_from(["doc", "doc", "mutated", "random", "nested"]))
    if variant == "mutated":
        return draw(mutated(base))
    if variant == "random":
        return draw(st.binary(max_size=256) | st.text(max_size=256).map(str.encode))
    if variant == "nested":
        depth = draw(st.sampled_from([10, 500, 5000, 50_000]))
        return draw(st.sampled_from([b"x = " + b"[" * depth + b"]" * depth, b"x = " + b"{a = " * depth + b"1"
                                     + b"}" * depth, b"[" + b"a." * depth + b"b]\n"]))
    return toml_text(draw(run_doc())).encode()


def _check_run(cfg: Any) -> None:
    from evaluators.pipeline import RunConfig

    assert isinstance(cfg, RunConfig)
    assert isinstance(cfg.name, str) and isinstance(cfg.out, str) and isinstance(cfg.train, dict)
    assert isinstance(cfg.export.formats, list) and all(isinstance(f, str) for f in cfg.export.formats)
    for n in (cfg.export.samples, cfg.export.calibration_samples, cfg.export.max_batch, cfg.audit.samples,
              cfg.audit.batch_size):
        assert isinstance(n, int) and not isinstance(n, bool)
    assert isinstance(cfg.audit.attacks, list) and all(isinstance(a, str) for a in cfg.audit.attacks)
    assert isinstance(cfg.audit.gates, dict) and all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
        for k, v in cfg.audit.gates.items())
    assert cfg.audit.eps_max is None or isinstance(cfg.audit.eps_max, (int, float))
    json.dumps(cfg.to_dict(), default=str)  # what the run writes to run-config.json


@budget(ci=300, long=5000)
@given(text=run_text(), doc=run_doc())
def test_fuzz_run_file(text: bytes, doc: dict[str, Any]) -> None:
    from evaluators.pipeline import load_run_config, parse_run_config

    with workdir() as tmp:
        root = Path(tmp)
        (root / "run.toml").write_bytes(text)
        call_loader("load_run_config", root, lambda: load_run_config(root / "run.toml"), _check_run)
        call_loader("parse_run_config", root, lambda: parse_run_config(doc, "fuzz.toml"), _check_run)


# ----------------------------------------------------------------------------------------------------- report.json
@pytest.fixture(scope="module")
def report_base(tmp_path_factory) -> dict[str, Any]:
    """A real report folder (report.json, adversarials.npz) beside a real tiny ONNX engine and twin checkpoint."""
    import evaluators.report as R
    from exporters.onnx import OnnxRuntimeEngine
    from tests.test_report import attack_entry, make_doc

    folder = tmp_path_factory.mktemp("report")
    engine_bytes = tiny_onnx()
    (folder / "model.onnx").write_bytes(engine_bytes)
    engine = OnnxRuntimeEngine(folder / "model.onnx")
    n = 8
    rng = np.random.default_rng(0)
    eps_t = np.where(rng.random(n) < 0.2, np.inf, rng.uniform(0, 0.3, n))
    doc = make_doc([attack_entry("pgd-linf", "linf", 0.3, eps_t, eps_t, tol_auac=1.0, tol_curve=1.0, points=5)], n,
                   engine_sha=engine.sha256)
    x = rng.random((4, 1, 4, 4)).astype(np.float32)
    pred = engine(torch.from_numpy(x)).argmax(1).numpy()
    adversarials = {"pgd-linf": {"x": x, "y": (pred + 1) % 3, "index": np.arange(4), "eps": np.full(4, 0.1),
                                 "pred": pred}}
    R.write_report(doc, folder / "rep", adversarials)
    return {"engine": engine_bytes, "report": (folder / "rep" / "report.json").read_text(),
            "npz": (folder / "rep" / "adversarials.npz").read_bytes()}


@st.composite
def report_text(draw: st.DrawFn, base: str) -> bytes:
    variant = draw(st.sampled_from(["doc", "doc", "doc", "doc", "mutated", "random", "encoding"]))
    if variant == "mutated":
        return draw(mutated(base.encode()))
    if variant == "random":
        return draw(st.binary(max_size=256))
    if variant == "encoding":
        return draw(st.sampled_from([b"\xef\xbb\xbf" + base.encode(), base.encode("utf-16"), base.encode()[:-2]]))
    doc, raws = draw(mutated_json(json.loads(base)))
    return json_text(doc, raws).encode()


def _check_report(doc: Any) -> None:
    assert isinstance(doc, dict) and doc["schema"] == "otkit.report/1"
    json.dumps(doc, allow_nan=False)


@budget(ci=300, long=5000)
@given(data=st.data())
def test_fuzz_report(report_base, data: st.DataObject) -> None:
    from evaluators.report import load_report

    text = data.draw(report_text(report_base["report"]))
    with workdir() as tmp:
        root = Path(tmp)
        (root / "report.json").write_bytes(text)
        call_loader("load_report(file)", root, lambda: load_report(root / "report.json"), _check_report)
        call_loader("load_report(dir)", root, lambda: load_report(root), _check_report)


@st.composite
def npz_adversarials(draw: st.DrawFn, base: bytes) -> bytes | None:
    variant = draw(st.sampled_from(["valid", "valid", "absent", "bytes", "arrays"]))
    if variant == "absent":
        return None
    if variant == "bytes":
        return draw(hostile(base))
    if variant == "valid":
        return base
    with np.load(io.BytesIO(base)) as z:
        arrays = {k: z[k] for k in z.files}
    for k in list(arrays):
        if draw(st.integers(0, 3)) == 0:
            arrays[k] = draw(npz_array("any"))
            if isinstance(arrays[k], bytes):
                arrays[k] = np.zeros(3)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@budget(ci=120, long=2000)
@given(data=st.data(), recheck=st.sampled_from([0, 0, 1, 3]), as_json=st.booleans(), twin=st.booleans())
def test_fuzz_verify(report_base, checkpoint_base, data: st.DataObject, recheck: int, as_json: bool,
                     twin: bool) -> None:
    from click.testing import CliRunner

    from kit.cli import cli

    text = data.draw(report_text(report_base["report"]))
    npz = data.draw(npz_adversarials(report_base["npz"]))
    with workdir() as tmp:
        root = Path(tmp)
        (root / "rep").mkdir()
        (root / "rep" / "report.json").write_bytes(text)
        if npz is not None:
            (root / "rep" / "adversarials.npz").write_bytes(npz)
        (root / "model.onnx").write_bytes(report_base["engine"])
        (root / "twin.safetensors").write_bytes(checkpoint_base[0])
        args = ["--device", "cpu", "-q", "verify", str(root / "rep"), "--engine", str(root / "model.onnx")]
        args += ["--recheck", str(recheck)] if recheck else []
        args += ["--json"] if as_json else []
        args += ["--twin", str(root / "twin.safetensors")] if twin else []

        def call() -> Any:
            return CliRunner().invoke(cli, args, catch_exceptions=False)

        def check(r: Any) -> None:
            assert r.exit_code in (0, 1, 2), (r.exit_code, r.output)
            assert "Traceback" not in r.output
            if r.exit_code == 2:
                lines = r.stderr.strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith("Error: ") and r.stdout == "", r.stderr
            if as_json and r.exit_code in (0, 1):
                json.loads(r.stdout)

        call_loader("verify", root, call, check)
