"""``otkit report`` and ``otkit verify``: re-render an audit report, and check it against the files it names.

Both are plain click commands; ``kit.cli`` registers them on the ``otkit`` group (``cli.add_command``), whose
:class:`kit.cli.KitGroup` turns a :class:`kit.errors.UserError` into one line and exit status 2. Only click and the
kit's light modules are imported here: the report library, numpy, torch and the engines load when a command runs.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Any

import click

from kit.errors import UserError

__all__ = ["ReportFormat", "VERIFY_EXIT_STATUSES", "report", "verify"]

VERIFY_EXIT_STATUSES = """\b
Exit statuses:
  0  every hash checked (and every rechecked adversarial) matches the report
  1  a hash or a rechecked adversarial differs (each named on stderr)
  2  usage or input error (missing file, corrupt adversarials.npz, report not otkit.report/1)"""


class ReportFormat(str, Enum):
    """What ``otkit report --format`` renders."""

    MD = "md"
    HTML = "html"
    JSON = "json"


def _emit_json(obj: Any) -> None:
    from kit.cli import _emit_json as emit  # lazy: kit.cli registers this module's commands

    emit(obj)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    from kit.cli import _table as table

    return table(rows, columns)


def _report_path(source: Path) -> Path:
    return source / "report.json" if source.is_dir() else source


# -------------------------------------------------------------------------------------------------------------- report
@click.command("report", epilog="""\b
Exit statuses:
  0  rendered
  2  usage or input error (missing file, invalid JSON, report not otkit.report/1)""")
@click.argument("source", metavar="DIR|REPORT.json", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice([f.value for f in ReportFormat]), default=ReportFormat.MD.value,
              show_default=True, help="md: release notes; html: one self-contained page (plot embedded); json: the "
                                      "validated document.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write to this file (atomically) instead of stdout.")
def report(source: Path, fmt: str, out: Path | None) -> None:
    """Re-render an audit report from its report.json (the folder or the file).

    The document is validated against otkit.report/1 first. For html the accuracy plot is drawn again from the
    document and embedded, so the page needs no other file.
    """
    import json

    from evaluators.report import load_report, plot_png, render_html, render_markdown
    from kit.io import atomic_write

    doc = load_report(source)
    kind = ReportFormat(fmt)
    if kind is ReportFormat.MD:
        text = render_markdown(doc)
    elif kind is ReportFormat.HTML:
        text = render_html(doc, plot_png(doc))
    else:
        text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    if out is None:
        click.echo(text, nl=False)
        return
    with atomic_write(out, "w") as f:
        f.write(text)
    click.echo(f"wrote {out}", err=True)


# -------------------------------------------------------------------------------------------------------------- verify
def _sha256(path: Path) -> str:
    from kit.io import sha256_file

    return "sha256:" + sha256_file(path)


def _short(digest: str) -> str:
    return digest[:19] + "..." if len(digest) > 22 else digest


def _hash_row(item: str, path: Path, expected: str) -> dict[str, Any]:
    actual = _sha256(path)
    return {"item": item, "file": str(path), "expected": expected, "actual": actual, "match": actual == expected}


def _twin_hint(path: Path, expected_weights: str) -> str:
    """Why a twin file differs: its weights too, or only the file around them (metadata, format)."""
    from kit.checkpoint import read_checkpoint

    try:
        _, info = read_checkpoint(path)
    except UserError as e:
        return f"not a valid checkpoint: {e}"
    same = info.weights_sha256 == expected_weights
    return "same weights, other metadata" if same else "different weights"


def _spread(sizes: dict[str, int], budget: int) -> dict[str, list[int]]:
    """Up to ``budget`` positions spread across attacks (round robin) and evenly within each attack's array."""
    take = dict.fromkeys(sizes, 0)
    left = budget
    while left > 0:
        open_ = [k for k in sizes if take[k] < sizes[k]]
        if not open_:
            break
        for k in open_:
            if left == 0:
                break
            take[k] += 1
            left -= 1
    out = {}
    for k, m in take.items():
        if m:
            pos = sorted({round(v) for v in (i * (sizes[k] - 1) / max(m - 1, 1) for i in range(m))})
            out[k] = pos
    return out


def _recheck(engine_path: Path, npz_path: Path, budget: int, device: Any) -> list[dict[str, Any]]:
    """Run the engine on up to ``budget`` stored adversarials; per attack, the ones whose prediction changed."""
    import numpy as np
    import torch

    from evaluators.report import load_adversarials
    from exporters.engines import load_engine

    stored = load_adversarials(npz_path)
    if not stored:
        raise UserError(f"{npz_path} holds no adversarials to recheck")
    engine = load_engine(engine_path, device)
    picks = _spread({name: len(a["x"]) for name, a in stored.items()}, budget)
    rows = []
    for name, pos in picks.items():
        a = stored[name]
        x = torch.from_numpy(np.ascontiguousarray(a["x"][pos], dtype=np.float32))
        if tuple(x.shape[1:]) != tuple(engine.input_shape):
            raise UserError(f"{npz_path}: adversarials of {name!r} have shape {tuple(x.shape[1:])} but {engine.name} "
                            f"takes {tuple(engine.input_shape)}")
        logits = engine(x.to(engine.device)).cpu()
        new = logits.argmax(1).numpy()
        pred, y = a["pred"][pos].astype(np.int64), a["y"][pos].astype(np.int64)
        top2 = torch.topk(logits, 2, dim=1).values
        bad = []
        for j, p in enumerate(pos):
            if new[j] != pred[j] or new[j] == y[j]:
                bad.append({"position": int(p), "index": int(a["index"][p]), "y": int(y[j]),
                            "stored_pred": int(pred[j]), "pred": int(new[j]), "margin": float(top2[j, 0] - top2[j, 1]),
                            "why": "prediction changed" if new[j] != pred[j] else "classified correctly"})
        rows.append({"attack": name, "checked": len(pos), "pred_match": int((new == pred).sum()),
                     "still_adversarial": int((new != y).sum()), "match": not bad, "failures": bad})
    return rows


@click.command("verify", epilog=VERIFY_EXIT_STATUSES)
@click.argument("report_file", metavar="REPORT.json|DIR", type=click.Path(path_type=Path))
@click.option("--engine", "engine_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The engine file the report says it audited (.onnx, .engine, or a checkpoint).")
@click.option("--twin", "twin_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The twin checkpoint; its file sha256 is checked too.")
@click.option("--recheck", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="Also run the engine on up to N stored adversarials (adversarials.npz beside the report, spread "
                   "across attacks): each must still get the stored prediction, and not its true label.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def verify(ctx: click.Context, report_file: Path, engine_path: Path, twin_path: Path | None, recheck: int,
           as_json: bool) -> None:
    """Check that a report describes these exact files: sha256 of the engine (and twin, and adversarials.npz when it
    lies beside the report), and optionally predictions.

    Every input is checked before any hash is compared (a missing file is exit status 2, not a mismatch).
    """
    from evaluators.report import load_report
    from kit.io import require_file

    doc = load_report(report_file)
    rpath = _report_path(report_file)
    require_file(engine_path, "engine file")
    if twin_path is not None:
        require_file(twin_path, "twin checkpoint")
    stored = doc["artifacts"]["adversarials"]
    npz_path = None
    if recheck:
        if stored is None:
            raise UserError(f"{rpath} stores no adversarials (artifacts.adversarials is null): nothing to recheck")
        npz_path = require_file(rpath.parent / stored, "adversarials file")

    hashes = [_hash_row("engine sha256", engine_path, doc["engine"]["sha256"])]
    if twin_path is not None:
        row = _hash_row("twin sha256", twin_path, doc["twin"]["sha256"])
        if not row["match"]:
            row["note"] = _twin_hint(twin_path, doc["twin"]["weights_sha256"])
        hashes.append(row)
    adv_sha = doc["artifacts"].get("adversarials_sha256")  # absent in reports written before it was recorded
    if stored is not None and adv_sha is not None:
        adv_file = rpath.parent / stored
        if adv_file.is_file():
            hashes.append(_hash_row("adversarials sha256", adv_file, adv_sha))
        else:  # a report published without its adversarials: nothing to compare, and not a difference
            hashes.append({"item": "adversarials sha256", "file": str(adv_file), "expected": adv_sha, "actual": None,
                           "match": None, "note": "not beside the report: not checked"})
    rechecked: list[dict[str, Any]] = []
    if npz_path is not None:
        from kit.runtime import resolve_device

        obj = ctx.find_root().obj or {}
        rechecked = _recheck(engine_path, npz_path, recheck, resolve_device(obj.get("device", "auto")))

    problems = []
    for h in hashes:
        if h["match"] is False:
            note = f" ({h['note']})" if h.get("note") else ""
            problems.append(f"{h['item']} differs: {h['file']} is {h['actual']}, the report says {h['expected']}{note}")
    for r in rechecked:
        for b in r["failures"]:
            problems.append(f"recheck {r['attack']} example {b['index']}: {b['why']} (stored pred {b['stored_pred']}, "
                            f"engine now {b['pred']}, label {b['y']}, logit margin {b['margin']:.3g})")
    ok = not problems
    if as_json:
        _emit_json({"report": str(rpath), "match": ok, "hashes": hashes, "recheck": rechecked, "problems": problems})
    else:
        rows = [{"item": h["item"], "file": os.path.basename(h["file"]), "report says": _short(h["expected"]),
                 "found": "absent" if h["actual"] is None else _short(h["actual"]),
                 "result": {True: "match", False: "DIFFERS", None: "not checked"}[h["match"]]} for h in hashes]
        rows += [{"item": f"recheck {r['attack']}", "file": npz_path.name if npz_path else "",
                  "report says": f"{r['checked']} adversarial(s)",
                  "found": f"{r['pred_match']} same pred, {r['still_adversarial']} still adversarial",
                  "result": "match" if r["match"] else "DIFFERS"} for r in rechecked]
        click.echo(_table(rows, ["item", "file", "report says", "found", "result"]))
    for line in problems:
        click.echo(f"verify: {line}", err=True)
    if not ok:
        ctx.exit(1)
