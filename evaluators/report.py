r"""The audit report files: schema validation, loading, the adversarials archive, and atomic writing (the Markdown /
HTML / PNG renderers are :mod:`evaluators.render`).

An audit (:mod:`evaluators.audit`) produces one document, schema ``otkit.report/1``
(``evaluators/schemas/report.schema.json``; every field is explained in ``docs/audit.md``, section "The report"). This
module turns it into the files of a report folder::

    adversarials.npz   engine-side adversarial examples; per attack NAME: NAME/x, /y, /index, /eps, /pred
    curves.png         one panel per attack: twin (solid) and engine (dashed) accuracy on the shared epsilon grid
    report.md          release notes (GitHub-flavoured Markdown, no HTML)
    report.html        one self-contained page (inline CSS, the plot as a data URI, no scripts, nothing fetched)
    report.json        the document itself, written LAST

Each file is written atomically (:func:`kit.io.atomic_write`) and ``report.json`` only after every other file, so a
folder holding a ``report.json`` always holds a complete report. The accuracy curves shown are those of the document:
:math:`\mathrm{acc}(\varepsilon) = \frac1n \sum_i \mathbf 1[\varepsilon^*_i > \varepsilon]` on the grid, and the AUAC
of the SAT paper (``000_e2e3710bc929b9d7.txt``, Section IV), :math:`\frac{1}{\varepsilon_{max}}
\int_0^{\varepsilon_{max}} \mathrm{acc}(\varepsilon)\, d\varepsilon` (see :mod:`evaluators.curves`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import math
import os
import zipfile
import zlib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from evaluators.render import plot_png, render_html, render_markdown
from kit.errors import UserError
from kit.io import atomic_write, require_file

__all__ = [
    "ADVERSARIAL_FIELDS",
    "REPORT_FILES",
    "SIGNATURE_FILE",
    "SCHEMA",
    "load_adversarials",
    "load_report",
    "plain_json",
    "read_json_document",
    "plot_png",
    "plot_report",
    "remove_report",
    "render_html",
    "render_markdown",
    "report_schema",
    "schema_errors",
    "validate_report",
    "write_report",
]

log = logging.getLogger(__name__)

#: Schema id of the report document (its ``schema`` field).
SCHEMA = "otkit.report/1"

#: The files of a report folder, in the order :func:`write_report` writes them (``report.json`` last).
REPORT_FILES = ("adversarials.npz", "curves.png", "report.md", "report.html", "report.json")
#: The signature bundle ``--sign-key`` writes beside the report (evaluators.attestation); a rewrite removes a stale one.
SIGNATURE_FILE = "report.sigstore.json"

#: Arrays stored per attack in adversarials.npz (key ``NAME/FIELD``) and their dtypes.
ADVERSARIAL_FIELDS: dict[str, Any] = {
    "x": np.float32, "y": np.int64, "index": np.int64, "eps": np.float64, "pred": np.int64,
}



# ---------------------------------------------------------------------------------------------------------- schema
@functools.lru_cache(maxsize=1)
def _schema_text() -> str:
    return (resources.files("evaluators") / "schemas" / "report.schema.json").read_text(encoding="utf-8")


def report_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``otkit.report/1``, a fresh copy."""
    return json.loads(_schema_text())


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def _where(path: list[Any] | tuple[Any, ...]) -> str:
    return "/".join(str(p) for p in path) or "(top level)"


def _fail(source: str, path: list[Any] | tuple[Any, ...], message: str, schema: str = SCHEMA) -> UserError:
    message = " ".join(str(message).split())
    if len(message) > 200:
        message = message[:197] + "..."
    return UserError(f"{source} does not match {schema}: {_where(path)}: {message}")


def plain_json(obj: Any, source: str, schema: str) -> Any:
    """A copy of ``obj`` made of JSON types only (numpy scalars and arrays, tuples converted); NaN and inf refused
    with a :class:`UserError` saying where (``source`` does not match ``schema``)."""
    try:
        return _plain(obj, [], source)
    except UserError as e:
        raise UserError(str(e).replace(f"does not match {SCHEMA}:", f"does not match {schema}:", 1)) from None


def schema_errors(plain: Any, schema_doc: dict[str, Any], source: str, schema: str) -> None:
    """Raise the best-matching JSON Schema error of ``plain`` against ``schema_doc`` as one :class:`UserError`."""
    import jsonschema  # lazy: `otkit --help` does not need it

    validator = jsonschema.Draft202012Validator(schema_doc)
    error = jsonschema.exceptions.best_match(validator.iter_errors(plain))
    if error is not None:
        raise _fail(source, list(error.absolute_path), error.message, schema)


def _plain(obj: Any, path: list[Any], source: str) -> Any:
    """A copy of ``obj`` made of JSON types only (numpy scalars and arrays, tuples converted); NaN and inf refused."""
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        if not math.isfinite(float(obj)):
            raise _fail(source, path, f"{float(obj)} is not a finite number")
        return float(obj)
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise _fail(source, path, f"key {k!r} is not a string")
            out[k] = _plain(v, [*path, k], source)
        return out
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, (list, tuple)):
        return [_plain(v, [*path, i], source) for i, v in enumerate(obj)]
    raise _fail(source, path, f"a {type(obj).__name__} is not a JSON value")


def _check_consistency(doc: dict[str, Any], source: str) -> None:
    """What JSON Schema cannot say: lengths that must agree, ordered grids and intervals, and honest verdicts."""
    n = doc["data"]["n"]
    if doc["artifacts"]["adversarials"] is None and "adversarials_sha256" in doc["artifacts"]:
        raise _fail(source, ["artifacts", "adversarials_sha256"], "a hash of adversarials that were not stored")
    names: set[str] = set()
    for i, a in enumerate(doc["attacks"]):
        at = ["attacks", i]
        if a["name"] in names:
            raise _fail(source, [*at, "name"], f"attack name {a['name']!r} appears twice")
        names.add(a["name"])
        grid = a["eps_grid"]
        if grid[0] != 0:
            raise _fail(source, [*at, "eps_grid", 0], f"the grid must start at 0, not {grid[0]}")
        if any(b <= g for g, b in zip(grid, grid[1:])):
            raise _fail(source, [*at, "eps_grid"], "the grid must be strictly increasing")
        for side in ("twin", "engine"):
            c = a[side]
            if len(c["accuracy"]) != len(grid):
                raise _fail(source, [*at, side, "accuracy"],
                            f"has {len(c['accuracy'])} values but eps_grid has {len(grid)}")
            if len(c["eps_star"]) != n:
                raise _fail(source, [*at, side, "eps_star"], f"has {len(c['eps_star'])} values but data/n is {n}")
            if c["auac_ci"][0] > c["auac_ci"][1]:
                raise _fail(source, [*at, side, "auac_ci"], "lower bound above upper bound")
        fid = a["fidelity"]
        if len(fid["mcnemar_p"]) != len(grid):
            raise _fail(source, [*at, "fidelity", "mcnemar_p"],
                        f"has {len(fid['mcnemar_p'])} values but eps_grid has {len(grid)}")
        if fid["auac_gap_ci"][0] > fid["auac_gap_ci"][1]:
            raise _fail(source, [*at, "fidelity", "auac_gap_ci"], "lower bound above upper bound")
    norms = [w["norm"] for w in doc.get("worst_case", [])]
    for i, w in enumerate(doc.get("worst_case", [])):
        n = len(w["eps_grid"])
        for side in ("twin", "engine"):
            if len(w[side].get("accuracy", [])) != n or len(w[side].get("eps_star", [])) != doc["data"]["n"]:
                raise _fail(source, ["worst_case", i, side], "does not have one accuracy per grid radius and one "
                                                             "eps_star per example")
    for i, g in enumerate(doc["gates"]):
        if g["attack"] not in names and g["attack"] not in norms:
            raise _fail(source, ["gates", i, "attack"], f"no attack or threat model named {g['attack']!r}")
    mismatched = [a["name"] for a in doc["attacks"] if a["fidelity"]["verdict"] == "mismatch"]
    mismatched += [f"worst case {w['norm']}" for w in doc.get("worst_case", [])
                   if w.get("fidelity", {}).get("verdict") == "mismatch"]
    if doc["clean"]["verdict"] == "mismatch":
        mismatched.insert(0, "clean")
    if doc["verdict"] == "match" and mismatched:
        raise _fail(source, ["verdict"], f"is match but {', '.join(mismatched)} mismatch(es)")
    failed = [g["attack"] for g in doc["gates"] if not g["passed"]]
    if doc["status"] == "pass" and (doc["verdict"] == "mismatch" or failed):
        why = "the verdict is mismatch" if doc["verdict"] == "mismatch" else f"gate(s) failed: {', '.join(failed)}"
        raise _fail(source, ["status"], f"is pass but {why}")


def validate_report(doc: Any, source: str = "report.json") -> dict[str, Any]:
    """Check a report document against ``otkit.report/1``; return it as plain JSON types.

    The JSON Schema (``evaluators/schemas/report.schema.json``) is checked first, then what a schema cannot express:
    per-attack arrays as long as the grid (accuracy, mcnemar_p) or as the data (eps_star), grids that start at 0 and
    increase, ordered intervals, unique attack names, gates naming an attack, and verdicts that agree with their parts
    (``verdict`` is ``match`` only if the clean and every attack verdict match; ``status`` is ``pass`` only if the
    verdict is ``match`` and every gate passed).

    Parameters
    ----------
    doc : dict
        The document. numpy scalars and arrays and tuples are accepted and converted.
    source : str
        Name used in the error message.

    Returns
    -------
    dict
        A copy of ``doc`` holding only JSON types.

    Raises
    ------
    UserError
        ``"<source> does not match otkit.report/1: <path>: <message>"`` for the first error found.
    """
    plain = _plain(doc, [], source)
    schema_errors(plain, report_schema(), source, SCHEMA)
    _check_consistency(plain, source)
    return plain


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


#: deeper than any report (about 5 levels): validators and renderers recurse, so deeper text is refused up front
MAX_NESTING = 32


def _nesting(obj: Any) -> int:
    """Nesting depth of JSON data, counted without recursion (a hostile file may nest thousands deep)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_NESTING:
                break
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a report: ``DIR/report.json`` for a folder, else the file itself.

    Raises
    ------
    UserError
        Missing file, invalid JSON (NaN and Infinity included), a missing or different schema id, or a document that
        does not match ``otkit.report/1``.
    """
    p, doc = read_json_document(path, "report.json", SCHEMA, "report")
    return validate_report(doc, source=str(p))


def read_json_document(path: str | os.PathLike[str], default_name: str, schema: str, what: str
                       ) -> tuple[Path, dict[str, Any]]:
    """Read ``DIR/default_name`` for a folder, else the file itself, as a JSON object whose ``schema`` is ``schema``.

    Not validated further (the caller does). Raises a one-line :class:`UserError` for a missing file, text that is
    not JSON (NaN and Infinity included), JSON nested deeper than :data:`MAX_NESTING`, or another schema id.
    """
    p = Path(path)
    if p.is_dir():
        p = p / default_name
    require_file(p, what)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        raise UserError(f"{p} is not a JSON text file: {e.reason}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{p} is not valid JSON: line {e.lineno} column {e.colno}: {e.msg}") from None
    except ValueError as e:
        raise UserError(f"{p} is not valid JSON: {e}") from None
    except RecursionError:
        raise UserError(f"{p} is not a {what}: JSON nested deeper than Python can read") from None
    if _nesting(doc) > MAX_NESTING:
        raise UserError(f"{p} is not a {what}: JSON nested deeper than {MAX_NESTING} levels")
    if not isinstance(doc, dict):
        raise UserError(f"{p} is not a {what}: expected a JSON object, got {type(doc).__name__}")
    found = doc.get("schema")
    if found != schema:
        said = "has no schema id" if found is None else f"has schema {found!r}"
        raise UserError(f"{p} {said}; this kit reads {schema}")
    return p, doc


# ---------------------------------------------------------------------------------------------------- adversarials
def _check_adversarials(adversarials: Mapping[str, Mapping[str, Any]], doc: dict[str, Any]) -> dict[str, np.ndarray]:
    """Flatten ``{NAME: {field: array}}`` into npz keys ``NAME/field`` with the stored dtypes; refuse bad shapes."""
    names = {a["name"] for a in doc["attacks"]}
    n = doc["data"]["n"]
    flat: dict[str, np.ndarray] = {}
    for name, arrays in adversarials.items():
        if name not in names:
            raise ValueError(f"adversarials for {name!r}, which is not an attack of the report")
        missing = set(ADVERSARIAL_FIELDS) - set(arrays)
        extra = set(arrays) - set(ADVERSARIAL_FIELDS)
        if missing or extra:
            raise ValueError(f"adversarials of {name!r}: missing {sorted(missing)}, unexpected {sorted(extra)}")
        a = {k: np.asarray(arrays[k], dtype=dt) for k, dt in ADVERSARIAL_FIELDS.items()}
        m = len(a["x"])
        if a["x"].ndim != 4 or any(a[k].shape != (m,) for k in ("y", "index", "eps", "pred")):
            raise ValueError(f"adversarials of {name!r}: x must be (M, C, H, W) and y, index, eps, pred (M,); got "
                             + ", ".join(f"{k} {a[k].shape}" for k in ADVERSARIAL_FIELDS))
        if m and (a["index"].min() < 0 or a["index"].max() >= n):
            raise ValueError(f"adversarials of {name!r}: index outside [0, {n})")
        flat.update({f"{name}/{k}": v for k, v in a.items()})
    return flat


def load_adversarials(path: str | os.PathLike[str]) -> dict[str, dict[str, np.ndarray]]:
    """Read adversarials.npz back as ``{NAME: {x, y, index, eps, pred}}`` (no pickles).

    Raises
    ------
    UserError
        Missing or corrupt file, or an attack whose arrays are incomplete or of inconsistent lengths.
    """
    p = require_file(path, "adversarials file")
    out: dict[str, dict[str, np.ndarray]] = {}
    try:
        z = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{p} is corrupt or not an .npz file: {_one_line(e)}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise UserError(f"{p} is not an .npz archive (a single .npy array)")
    with z:
        for key in z.files:
            name, sep, field = key.rpartition("/")
            if not sep or field not in ADVERSARIAL_FIELDS:
                raise UserError(f"{p} is not an otkit adversarials file: unexpected array {key!r}")
            try:
                out.setdefault(name, {})[field] = z[key]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                raise UserError(f"{p} is corrupt: array {key!r}: {_one_line(e)}") from None
    for name, arrays in out.items():
        missing = sorted(set(ADVERSARIAL_FIELDS) - set(arrays))
        if missing:
            raise UserError(f"{p}: attack {name!r} lacks {', '.join(missing)}")
        m = len(arrays["x"]) if arrays["x"].ndim else -1
        if arrays["x"].ndim != 4 or any(arrays[k].shape != (m,) for k in ("y", "index", "eps", "pred")):
            raise UserError(f"{p}: arrays of attack {name!r} have inconsistent shapes")
        for k, dt in ADVERSARIAL_FIELDS.items():  # integers where integers belong, floats where floats do
            want = np.dtype(dt).kind in "iu"
            if arrays[k].dtype.kind not in ("iu" if want else "f"):
                raise UserError(f"{p}: array {name}/{k} has dtype {arrays[k].dtype}, expected "
                                f"{'integers' if want else 'floats'}")
    return out


# ----------------------------------------------------------------------------------------------------------- files
def plot_report(doc: dict[str, Any], path: str | os.PathLike[str]) -> bytes:
    """Write curves.png (see :func:`evaluators.render.plot_png`) atomically to ``path``; return its bytes."""
    png = plot_png(doc)
    with atomic_write(path) as f:
        f.write(png)
    return png


def remove_report(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete a report folder's files, ``report.json`` FIRST, so an interrupted re-run never looks complete.

    Returns the paths removed; missing files (or a missing folder) are fine.
    """
    out = Path(out_dir)
    removed = []
    names = list(reversed(REPORT_FILES))  # report.json first, then its signature, then the rest
    for name in [names[0], SIGNATURE_FILE, *names[1:]]:
        p = out / name
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


def write_report(doc: dict[str, Any], out_dir: str | os.PathLike[str],
                 adversarials: Mapping[str, Mapping[str, Any]] | None = None) -> list[Path]:
    """Validate ``doc`` and write the report folder, ``report.json`` last.

    Order: validate (a bad document or bad adversarial arrays write nothing), remove a stale ``report.json``, then
    write ``adversarials.npz`` (or remove a stale one), ``curves.png``, ``report.md``, ``report.html`` and finally
    ``report.json``, each atomically. If any step fails, no ``report.json`` exists afterwards.

    Parameters
    ----------
    doc : dict
        The ``otkit.report/1`` document. Its ``artifacts`` are set here: ``adversarials`` is ``"adversarials.npz"``
        and ``adversarials_sha256`` the sha256 of that file's bytes when ``adversarials`` is given, else
        ``adversarials`` is ``None`` (the caller's dict is not modified).
    out_dir : str or Path
        The report folder (created if missing).
    adversarials : dict, optional
        ``{attack NAME: {"x": (M, C, H, W) float32, "y": (M,) int64, "index": (M,) int64, "eps": (M,) float64,
        "pred": (M,) int64}}``: the engine-side adversarials, their true labels, their index in the audited subset,
        their eps* on the engine and the engine's prediction. NAME must be an attack of ``doc``.

    Returns
    -------
    list of Path
        The files written, in the order written: ``adversarials.npz`` (when given), ``curves.png``, ``report.md``,
        ``report.html``, ``report.json``.

    Raises
    ------
    UserError
        The document does not match ``otkit.report/1``, or the folder cannot be created.
    ValueError
        Adversarial arrays of the wrong shape, or for an attack not in the report (a bug in the caller).
    """
    doc = validate_report({**doc, "artifacts": {"adversarials": REPORT_FILES[0] if adversarials else None}})
    npz_bytes = None
    if adversarials:
        flat = _check_adversarials(adversarials, doc)
        buf = io.BytesIO()
        np.savez_compressed(buf, **flat)  # type: ignore[arg-type]  # numpy stubs: **kwds may hold allow_pickle
        npz_bytes = buf.getvalue()  # hashed as written: `otkit verify` recomputes it from the file
        doc["artifacts"]["adversarials_sha256"] = "sha256:" + hashlib.sha256(npz_bytes).hexdigest()
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create report folder {out}: {e.strerror}") from None
    npz, png_path, md, page, report_json = (out / name for name in REPORT_FILES)
    for stale in (report_json, out / SIGNATURE_FILE):  # neither may outlive a failed rewrite (nor sign a new one)
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    written = []
    if npz_bytes is not None:
        with atomic_write(npz) as f:
            f.write(npz_bytes)
        written.append(npz)
    else:
        with contextlib.suppress(FileNotFoundError):
            npz.unlink()
    png = plot_report(doc, png_path)
    with atomic_write(md, "w") as f:
        f.write(render_markdown(doc))
    with atomic_write(page, "w") as f:
        f.write(render_html(doc, png))
    with atomic_write(report_json, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
        f.write("\n")
    written += [png_path, md, page, report_json]
    log.debug("wrote the report to %s", out)  # the CLI names every file it wrote
    return written
