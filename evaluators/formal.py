r"""Formal verifiers: a VNN-COMP benchmark from an audit, and their answers folded back (docs/verifiers.md).

:func:`export_spec` writes, for examples the audit found robust at a radius, one VNN-LIB 1.0 property per (example,
radius), the ONNX network they speak about and ``instances.csv``, the layout of a VNN-COMP benchmark that
α,β-CROWN, NNV, PyRAT, Marabou and other verifiers read::

    OUT/onnx/model.onnx            the fp32 network, batch dimension fixed to 1, every tensor inside the file
    OUT/vnnlib/ex<i>_r<k>.vnnlib   one property per example i and radius k
    OUT/instances.csv              onnx,vnnlib,timeout per line (paths relative to OUT)
    OUT/otkit-spec.json            what each property is (example, label, radius, the audit's eps*), the report's
                                   data fingerprint and engine, the ONNX's sha256

A property states the *unsafe* set, as VNN-COMP does: the input lies in the L-inf box of radius :math:`r` around the
example (intersected with the pixel range), mapped into the network's own input space through the engine's input
convention, and some class :math:`j \ne y` scores at least the label's, :math:`Y_j \ge Y_y`. A verifier answers
``unsat`` when no such input exists (the example is *proved* robust at :math:`r`, on this ONNX file), ``sat`` with a
counterexample, or ``unknown`` / ``timeout``.

:func:`fold_results` reads a verifier's answers (a CSV in which each row names a ``.vnnlib`` file and a result) and
adds them to the report as ``verification``: the points, and per radius the fraction of audited examples proved
robust (a lower bound on the ONNX's accuracy at that radius, with no confidence level: a proof) beside the attacks'
accuracy there (an upper bound). A ``sat`` where the attacks found nothing below the radius raises the
``verifier-beats-attacks`` flag.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kit.errors import UserError

__all__ = ["RESULTS", "SPEC_SCHEMA", "export_spec", "fold_results", "read_results", "vnnlib_property"]

SPEC_SCHEMA = "otkit.spec/1"
#: A verifier's words for each answer (VNN-COMP's, older and newer) -> the report's
RESULTS = {"unsat": "unsat", "holds": "unsat", "verified": "unsat", "safe": "unsat", "robust": "unsat",
           "sat": "sat", "violated": "sat", "falsified": "sat", "unsafe": "sat",
           "unknown": "unknown", "timeout": "unknown", "error": "unknown", "unsound": "unknown"}


def _num(v: float) -> str:
    """A float as VNN-LIB's decimal, exact for the float64 value (no exponent: VNN-LIB 1.0 decimals have none)."""
    text = np.format_float_positional(float(v), unique=True, trim="-")
    return text if text not in ("-0",) else "0"


def vnnlib_property(lower: np.ndarray, upper: np.ndarray, label: int, classes: int, comment: str = "") -> str:
    """The VNN-LIB 1.0 text of one robustness property: inputs ``X_i`` in [lower_i, upper_i] (flattened in the
    network's input order) and the unsafe output set :math:`\\bigvee_{j \\ne y} Y_j \\ge Y_y`."""
    n = lower.size
    out = [f"; {line}" for line in comment.splitlines()] if comment else []
    out += [f"(declare-const X_{i} Real)" for i in range(n)]
    out.append("")
    out += [f"(declare-const Y_{j} Real)" for j in range(classes)]
    out += ["", "; the input box"]
    for i, (lo, hi) in enumerate(zip(lower.reshape(-1).tolist(), upper.reshape(-1).tolist())):
        out.append(f"(assert (<= X_{i} {_num(hi)}))")
        out.append(f"(assert (>= X_{i} {_num(lo)}))")
    out += ["", f"; unsafe: some class scores at least the label's (Y_{label})", "(assert (or"]
    out += [f"    (and (>= Y_{j} Y_{label}))" for j in range(classes) if j != label]
    out += ["))", ""]
    return "\n".join(out)


def _linf_eps_star(doc: Mapping[str, Any]) -> tuple[list[float | None], float, str]:
    """The engine's per-example L-inf eps* (the worst case over every L-inf attack), eps_max, and where it came
    from."""
    for w in doc.get("worst_case", []):
        if w["norm"] == "linf":
            return w["engine"]["eps_star"], float(w["eps_max"]), "worst case linf"
    attacks = [a for a in doc["attacks"] if a["norm"] == "linf"]
    if not attacks:
        raise UserError("the report has no L-inf attack: VNN-LIB boxes state L-inf balls (audit with pgd-linf, "
                        "apgd-ce or autoattack)")
    from evaluators.recompute import eps_array

    best = np.min(np.stack([eps_array(a["engine"]["eps_star"]) for a in attacks]), axis=0)
    return ([float(v) if np.isfinite(v) else None for v in best], max(float(a["eps_max"]) for a in attacks),
            ", ".join(a["name"] for a in attacks))


def _single_batch(proto: Any) -> Any:
    """A copy of the model (its tensors already inside it) with the first dimension of its inputs and outputs fixed
    to 1: verifiers want static shapes."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    for v in list(m.graph.input) + list(m.graph.output):
        dims = v.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_value = 1
    return m


def export_spec(doc: Mapping[str, Any], engine_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                radii: Sequence[float] | None = None, max_examples: int = 20, timeout: float = 300.0,
                data_spec: str | None = None) -> dict[str, Any]:
    """Write the benchmark of the module docstring; returns its manifest (also ``otkit-spec.json``).

    Parameters
    ----------
    doc : dict
        A valid ``otkit.report/1`` document with an L-inf attack.
    engine_path : path
        The ONNX file to verify: the audited engine when it is an fp32 ONNX file, else an fp32 ONNX export of the
        same model (the manifest records which; the points are about this file).
    out_dir : path
        The benchmark folder (created; if it exists, it must be empty).
    radii : sequence of float, optional
        L-inf radii in [0, 1] pixels (default: eps_max / 4 and eps_max / 2 of the L-inf worst case).
    max_examples : int
        At most this many examples per radius: the first, in audit order, that the audit found robust there (its
        eps* above the radius, or none found up to eps_max) and that the ONNX file classifies correctly.
    timeout : float
        Seconds per instance in ``instances.csv``.
    data_spec : str, optional
        Where the report's dataset is here, if not at its recorded spec.
    """
    import onnx

    from evaluators.replay import audited_examples
    from exporters.graph import infer_precision, load_onnx, uses_external_data
    from exporters.onnx import engine_sha256
    from kit.convention import InputConvention
    from kit.io import atomic_write

    out = Path(out_dir)
    held = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
    if {"instances.csv", "otkit-spec.json"} & set(held):
        raise UserError(f"{out} already holds a benchmark: choose another --out")
    if held and set(held) <= {"onnx", "vnnlib"}:  # an export stopped before its last two files (interrupted)
        raise UserError(f"{out} holds an unfinished benchmark ({', '.join(held)}/ without instances.csv): remove it "
                        f"or choose another --out")
    if held:  # e.g. a project's own folder: never mix a benchmark into other files
        raise UserError(f"{out} is a folder that holds other files: choose a new or empty --out")
    if max_examples < 1 or not (timeout > 0):
        raise UserError("--max-examples must be at least 1 and --timeout positive")
    eps_star, eps_max, source = _linf_eps_star(doc)
    radii = [eps_max / 4, eps_max / 2] if radii is None else sorted({float(r) for r in radii})
    for r in radii:
        if not (0 < r <= 1):
            raise UserError(f"every radius must be in (0, 1] (L-inf, pixels in [0, 1]), got {r}")
        if r > eps_max:
            raise UserError(f"radius {r:g} is above the audit's L-inf eps_max {eps_max:g}: the audit says nothing "
                            "about it")
    proto, _, label = load_onnx(engine_path, "--engine")
    if uses_external_data(proto):  # verifiers read one file: the data goes inside (load_onnx checked where it lies)
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(proto, str(Path(engine_path).resolve().parent))
    if len(proto.graph.input) != 1 or len(proto.graph.output) != 1:
        raise UserError(f"{label}: a verifier benchmark needs one input and one output, this graph has "
                        f"{len(proto.graph.input)} and {len(proto.graph.output)}")
    precision = infer_precision(proto)
    if precision != "fp32":
        raise UserError(f"{label} is {precision}: verifiers read fp32 networks; give the fp32 ONNX export of the "
                        "audited model (otkit export CKPT --format onnx)")
    raw = doc["engine"].get("input_convention")
    conv = InputConvention.from_dict(raw, "report: engine.input_convention") if raw else None
    if conv is not None and conv.dtype != "float32":
        raise UserError(f"the engine takes {conv.dtype} input: a VNN-LIB box is over real-valued inputs (float32)")
    digest = engine_sha256(engine_path)
    same = digest == doc["engine"]["sha256"]
    if not same and doc["engine"]["precision"] == "fp32" and doc["engine"]["format"] == "onnx":
        raise UserError(f"{label} is not the audited engine (sha256 {digest[:19]}..., the report says "
                        f"{doc['engine']['sha256'][:19]}...)")
    ds = audited_examples(doc, data_spec)
    x = ds.x.double()
    y = ds.y.numpy()

    single = _single_batch(proto)
    model_bytes = single.SerializeToString()
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    in_name = session.get_inputs()[0].name

    def native(t: Any) -> np.ndarray:
        t = conv.to_native(t) if conv is not None else t
        return t.double().numpy()

    classes = int(session.run(None, {in_name: native(x[:1]).astype(np.float32)})[0].shape[-1])

    instances: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    checked: dict[int, int] = {}
    files: dict[str, str] = {}
    for k, r in enumerate(radii):
        taken = 0
        for i, e in enumerate(eps_star):
            if taken >= max_examples:
                break
            if e is not None and e <= r:  # fooled at or below r (0: misclassified clean)
                continue
            if i not in checked:
                xi = native(x[i: i + 1]).astype(np.float32)
                checked[i] = int(np.argmax(session.run(None, {in_name: xi})[0], axis=1)[0])
                if checked[i] != int(y[i]):
                    dropped.append({"index": i, "why": f"the ONNX file predicts {checked[i]}, label {int(y[i])}"})
            if checked[i] != int(y[i]):
                continue
            lo = native((x[i: i + 1] - r).clamp(0.0, 1.0))
            hi = native((x[i: i + 1] + r).clamp(0.0, 1.0))
            name = f"ex{i}_r{k}.vnnlib"
            comment = (f"otkit export-spec: example {i} (label {int(y[i])}) of {doc['data']['spec']} "
                       f"{doc['data']['split']}, fingerprint {doc['data']['fingerprint']}\n"
                       f"L-inf radius {r:g}; the audit's eps* {'none up to ' + format(eps_max, 'g') if e is None else format(e, 'g')}"
                       f" ({source})\nunsat = no input in the box makes another class score at least the label")
            files[name] = vnnlib_property(np.minimum(lo, hi), np.maximum(lo, hi), int(y[i]), classes, comment)
            instances.append({"vnnlib": f"vnnlib/{name}", "index": i, "label": int(y[i]), "radius": r,
                              "eps_star": e})
            taken += 1
    if not instances:
        raise UserError("no example is robust at these radii by the audit (and classified correctly by the ONNX "
                        "file): nothing to verify; choose smaller --radius values")
    onnx.checker.check_model(model_bytes)  # the batch-1 copy is a valid model before anything is written
    (out / "onnx").mkdir(parents=True, exist_ok=True)
    (out / "vnnlib").mkdir(exist_ok=True)
    with atomic_write(out / "onnx" / "model.onnx") as f:
        f.write(model_bytes)
    for name, text in files.items():
        with atomic_write(out / "vnnlib" / name, "w") as f:
            f.write(text)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for inst in instances:
        w.writerow(["onnx/model.onnx", inst["vnnlib"], f"{timeout:g}"])
    manifest = {"schema": SPEC_SCHEMA, "norm": "linf", "radii": radii, "eps_source": source, "eps_max": eps_max,
                "report": {"data": dict(doc["data"]), "engine": {"path": doc["engine"]["path"],
                                                                "sha256": doc["engine"]["sha256"],
                                                                "precision": doc["engine"]["precision"]}},
                "onnx": {"file": "onnx/model.onnx", "sha256": "sha256:" + hashlib.sha256(model_bytes).hexdigest(),
                         "source": str(engine_path), "source_sha256": digest, "is_audited_engine": same},
                "timeout": timeout, "instances": instances, "dropped": dropped}
    with atomic_write(out / "otkit-spec.json", "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    with atomic_write(out / "instances.csv", "w") as f:  # last: a benchmark without it is unfinished
        f.write(buf.getvalue())
    return manifest


def read_results(path: str | os.PathLike[str]) -> dict[str, str]:
    """A verifier's answers: ``{vnnlib file name: "sat" | "unsat" | "unknown"}`` from a CSV in which each row holds a
    ``.vnnlib`` path and a result word (:data:`RESULTS`; VNN-COMP's results.csv, ``onnx,vnnlib,result[,time]`` or
    ``vnnlib,result``); ``#`` lines and a header are skipped."""
    from kit.io import require_file

    p = require_file(path, "verifier results")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{p}: not a text (CSV) file") from None
    out: dict[str, str] = {}
    for n, row in enumerate(csv.reader(text.splitlines()), 1):
        cells = [c.strip() for c in row]
        if not cells or not any(cells) or cells[0].startswith("#"):
            continue
        spec = [c for c in cells if c.lower().endswith(".vnnlib") or c.lower().endswith(".vnnlib.gz")]
        words = [RESULTS[c.lower()] for c in cells if c.lower() in RESULTS]
        if not spec:
            if n == 1:
                continue  # a header
            raise UserError(f"{p} line {n}: no .vnnlib file named")
        if len(words) != 1:
            raise UserError(f"{p} line {n}: expected one result ({', '.join(sorted(set(RESULTS)))}), found "
                            f"{len(words)}")
        key = re.sub(r"\.gz$", "", os.path.basename(spec[0].replace("\\", "/")))
        out[key] = words[0]
    if not out:
        raise UserError(f"{p}: no result rows")
    return out


def fold_results(doc: Mapping[str, Any], manifest: Mapping[str, Any], results: Mapping[str, str], *,
                 verifier: str = "") -> dict[str, Any]:
    """The report with its ``verification`` section (module docstring), and with the ``verifier-beats-attacks``
    flag where a verifier found an adversarial the attacks missed. ``manifest`` must be the benchmark of this
    report (same data fingerprint and engine record)."""
    from evaluators.checks import flag

    if manifest.get("schema") != SPEC_SCHEMA:
        raise UserError(f"not an otkit benchmark manifest (schema {manifest.get('schema')!r}, expected {SPEC_SCHEMA})")
    rec = manifest["report"]
    if rec["data"]["fingerprint"] != doc["data"]["fingerprint"] or rec["engine"]["sha256"] != doc["engine"]["sha256"]:
        raise UserError("the benchmark was exported from another report (its data fingerprint or engine differ)")
    by_name = {os.path.basename(i["vnnlib"]): i for i in manifest["instances"]}
    unknown_names = sorted(set(results) - set(by_name))
    if unknown_names:
        raise UserError(f"results for properties the benchmark does not have: {', '.join(unknown_names[:3])}")
    points = []
    for name, inst in by_name.items():
        points.append({"index": inst["index"], "radius": inst["radius"], "result": results.get(name, "unknown"),
                       "answered": name in results})
    points.sort(key=lambda p: (p["radius"], p["index"]))
    n = doc["data"]["n"]
    eps_star, eps_max, _ = _linf_eps_star(doc)
    per_radius = []
    for r in manifest["radii"]:
        pts = [p for p in points if p["radius"] == r]
        attacked = sum(1 for e in eps_star if e is None or e > r) / n
        per_radius.append({"radius": r, "properties": len(pts),
                           "unsat": sum(p["result"] == "unsat" for p in pts),
                           "sat": sum(p["result"] == "sat" for p in pts),
                           "unknown": sum(p["result"] == "unknown" for p in pts),
                           "verified_accuracy": sum(p["result"] == "unsat" for p in pts) / n,
                           "attack_accuracy": attacked})
    out = dict(doc)
    out["verification"] = {
        "verifier": verifier or None, "norm": "linf",
        "onnx_sha256": manifest["onnx"]["sha256"], "source_sha256": manifest["onnx"]["source_sha256"],
        "is_audited_engine": bool(manifest["onnx"]["is_audited_engine"]),
        "bound": "verified lower bound (a proof on this ONNX file, no confidence level)",
        "points": [{k: p[k] for k in ("index", "radius", "result")} for p in points],
        "radii": per_radius}
    beaten = [p for p in points if p["result"] == "sat"]
    checks = [c for c in doc["checks"] if c["id"] != "verifier-beats-attacks"]
    if beaten:
        where = ", ".join(f"example {p['index']} at {p['radius']:g}" for p in beaten[:5])
        checks.append(flag("verifier-beats-attacks",
                           f"the verifier found adversarials inside {len(beaten)} ball(s) the attacks called robust "
                           f"({where}{', ...' if len(beaten) > 5 else ''}): the attacks' AUACs overstate "
                           "robustness there").to_dict())
    out["checks"] = checks
    return out
