"""``otkit report`` and ``otkit verify``: re-render an audit report, and check it against the files it names.

Both are plain click commands; ``kit.cli`` adds them to the ``otkit`` group (``cli.add_command``), whose
:class:`kit.cli.KitGroup` turns a :class:`kit.errors.UserError` into one line and exit status 2. Only click and the
kit's light modules are imported here: the report library, numpy, torch and the engines load when a command runs.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Any

import click

from kit.cli.common import emit_json, engine_input_option, sign_key_option, status, table, twin_import_options
from kit.errors import UserError

__all__ = ["DEFAULT_RECHECK", "ReportFormat", "VERIFY_EXIT_STATUSES", "WAIVABLE", "report", "verify"]

#: Stored adversarials ``otkit verify`` re-runs on the engine unless told otherwise.
DEFAULT_RECHECK = 16

#: What ``otkit verify --waive`` can excuse: the twin not given, no adversarials.npz, no recheck, no data replay.
WAIVABLE = ("twin", "adversarials", "recheck", "data")

VERIFY_EXIT_STATUSES = """\b
Exit statuses:
  0  everything checked matches: the engine sha256 (ONNX external data included),
     the twin sha256, adversarials.npz (sha256 and content), the rechecked
     adversarials, the audited examples replayed (fingerprint, clean
     accuracies, eps* = 0 sets, adversarial distances, radii), and every
     figure re-derived from the per-example eps* (curves, AUACs, intervals,
     fidelity, verdicts, gates, status), and with --public-key the
     signature and every subject it signs; only what --waive names may be
     left unchecked
  1  a difference (each named on stderr), or the twin, adversarials.npz or
     the recheck missing without --waive; with --public-key, no bundle, a
     damaged one, or no signature by that key
  2  usage or input error (missing report, engine or twin, corrupt
     adversarials.npz, report not otkit.report/1, unreadable public key, a
     dataset that cannot be read: --waive data skips the replay)"""


class ReportFormat(str, Enum):
    """What ``otkit report --format`` renders."""

    MD = "md"
    HTML = "html"
    JSON = "json"
    MODEL_INDEX = "model-index"
    MODEL_CARD = "model-card"


def _report_path(source: Path) -> Path:
    return source / "report.json" if source.is_dir() else source


def _is_certificate(source: Path) -> bool:
    """A certificate folder (certificate.json and no report.json) or a file whose schema is the certificate's."""
    if source.is_dir():
        return (source / "certificate.json").is_file() and not (source / "report.json").is_file()
    if source.is_file() and source.suffix == ".json" and source.stat().st_size < 1 << 26:
        try:
            import json

            return json.loads(source.read_text(encoding="utf-8")).get("schema") == "otkit.certificate/1"
        except (ValueError, UnicodeDecodeError, AttributeError, RecursionError):
            return False
    return False


def _verify_certificate(ctx: click.Context, source: Path, engine_path: Path, twin_path: Path | None, recheck: int,
                        waive: list[str], data_spec: str | None, as_json: bool, arch: str | None,
                        engine_input: Any, pub: Any) -> None:
    """``otkit verify`` of a certificate: the engine's (and twin's) hashes, every derived figure re-derived from the
    counts, and N examples drawn at random certified again with the certificate's seeds (--recheck N; needs the
    data)."""
    from evaluators.certificate import load_certificate, recompute_certificate
    from exporters.engines import load_engine
    from kit.io import require_file
    from kit.runtime import resolve_device

    doc = load_certificate(source)
    require_file(engine_path, "engine file")
    problems: list[str] = []
    hashes = [_engine_row(engine_path, doc["engine"]["sha256"])]
    if doc["twin"] is not None:
        if twin_path is not None:
            require_file(twin_path, "twin checkpoint")
            hashes.append(_hash_row("twin sha256", twin_path, doc["twin"]["sha256"]))
        elif "twin" not in waive:
            problems.append("twin not checked: give --twin CHECKPOINT (or --waive twin)")
    for h in hashes:
        if h["match"] is False:
            problems.append(f"{h['item']} differs: {h['file']} is {h['actual']}, the certificate says {h['expected']}")
    differences = recompute_certificate(doc)
    problems += differences
    replayed: list[str] = []
    if "data" in waive or "recheck" in waive or recheck == 0:
        note = "waived" if ("data" in waive or "recheck" in waive) else "--recheck 0"
        if note == "--recheck 0":
            problems.append("recheck skipped (--recheck 0): give --recheck N (or --waive recheck)")
    else:
        from evaluators.replay import random_picks, replay_certificate, same_noise

        device = resolve_device((ctx.find_root().obj or {}).get("device", "auto"))
        raw = doc["engine"].get("input_convention")
        if engine_input is None and raw is not None:
            from kit.convention import InputConvention

            engine_input = InputConvention.from_dict(raw, "certificate: engine.input_convention")
        engine = load_engine(engine_path, device, arch=arch, input_convention=engine_input)
        picks = random_picks(doc["data"]["n"], recheck)
        replayed = replay_certificate(doc, engine, device, examples=picks, spec=data_spec)
        note = f"{len(picks)} example(s) certified again" + (
            " (the same noise)" if same_noise(doc, device) else
            f" (new noise: {doc['provenance']['device']} drew the certificate's; counts within sampling error)")
        if len(picks) < doc["data"]["n"]:
            note += f"; drawn at random: {', '.join(map(str, picks))}"
    problems += replayed
    folder = source if source.is_dir() else source.parent
    signature = _signature(doc, folder, pub, hashes)
    problems += signature["problems"]
    ok = not problems
    if as_json:
        emit_json({"certificate": str(source), "match": ok, "hashes": hashes,
                   "recomputed": {"match": not differences, "differences": differences},
                   "replayed": {"note": note, "match": not replayed, "differences": replayed},
                   "signature": signature, "waived": waive, "problems": problems})
    else:
        rows = [{"item": h["item"], "file": os.path.basename(h["file"]), "certificate says": _short(h["expected"]),
                 "found": _short(h["actual"] or "-"), "result": "match" if h["match"] else "DIFFERS"} for h in hashes]
        rows.append({"item": "derived figures", "file": "certificate.json", "certificate says": "p_lower, radii, curve",
                     "found": "recomputed equal" if not differences else f"{len(differences)} field(s) differ",
                     "result": "match" if not differences else "DIFFERS"})
        rows.append({"item": "certified examples", "file": "", "certificate says": "predictions and counts",
                     "found": note if not replayed else f"{len(replayed)} difference(s)",
                     "result": ("waived" if note == "waived" else "NOT CHECKED" if note == "--recheck 0" else
                                "match" if not replayed else "DIFFERS")})
        rows.append(_signature_row(signature, "certificate says"))
        click.echo(table(rows, ["item", "file", "certificate says", "found", "result"]))
    for line in problems:
        click.echo(f"verify: {line}", err=True)
    if signature["note"]:
        click.echo(f"verify: {signature['note']}", err=True)
    if not ok:
        ctx.exit(1)


# -------------------------------------------------------------------------------------------------------------- report
@click.command("report", epilog="""\b
Exit statuses:
  0  rendered
  2  usage or input error (missing file, invalid JSON, report not otkit.report/1,
     a bad --source-url)""")
@click.argument("source", metavar="DIR|REPORT.json", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice([f.value for f in ReportFormat]), default=ReportFormat.MD.value,
              show_default=True, help="md: release notes; html: one self-contained page (plot embedded); json: the "
                                      "validated document; model-index: the Hugging Face model card's model-index "
                                      "metadata (YAML front matter); model-card: a README section with the table and "
                                      "plots (docs/release.md).")
@click.option("--certificate", "certificates", multiple=True, type=click.Path(path_type=Path), metavar="DIR",
              help="model-index / model-card: add the certified AUAC of this certificate (otkit certify's folder) as "
                   "a lower bound beside the audit's upper bounds (repeatable). SOURCE may itself be a certificate.")
@click.option("--name", "model_name", default=None, help="model-index / model-card: the model's name "
                                                          "[default: the engine file's name without its extension]")
@click.option("--source-url", default=None, metavar="URL",
              help="model-index / model-card: where the report is published (the release page), written as each "
                   "result's source.")
@click.option("--verifier-results", "results", default=None, type=click.Path(dir_okay=False, path_type=Path),
              metavar="CSV", help="Fold a formal verifier's sat / unsat / unknown answers on the benchmark of "
                                  "otkit export-spec (--spec) into the report, in place: its verification section, "
                                  "and the verifier-beats-attacks flag for a sat the attacks missed (docs/verifiers.md).")
@click.option("--spec", "spec_dir", default=None, type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="With --verifier-results: the benchmark folder (its otkit-spec.json).")
@click.option("--verifier", default=None, metavar="NAME", help="With --verifier-results: the verifier's name and "
                                                              "version, recorded in the report.")
@sign_key_option(lazy=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write to this file (atomically) instead of stdout. model-card: the plots are linked relative "
                   "to this file's folder (on stdout, to the current folder).")
@click.pass_context
def report(ctx: click.Context, source: Path, fmt: str, certificates: tuple[Path, ...], model_name: str | None,
           source_url: str | None, results: Path | None, spec_dir: Path | None, verifier: str | None,
           out: Path | None, sign_key: Any = None) -> None:
    """Re-render an audit report from its report.json (the folder or the file), or write its release metadata.

    The document is validated against otkit.report/1 first. For html the accuracy plot is drawn again from the
    document and embedded, so the page needs no other file. model-index and model-card read SOURCE (a report or a
    certificate) and every --certificate: clean accuracy, worst-case AUAC per threat model (empirical upper bounds)
    and certified AUAC (lower bounds), each metric named with its bound.
    """
    import json

    from evaluators.report import load_report, plot_png, render_html, render_markdown
    from kit.io import atomic_write

    kind = ReportFormat(fmt)
    if results is not None or spec_dir is not None:
        from kit.signing import load_signing_key

        _fold(source, results, spec_dir, verifier, None if sign_key is None else load_signing_key(sign_key))
        return
    if verifier is not None:
        raise UserError("--verifier goes with --verifier-results")
    # $OTKIT_SIGN_KEY, set for a whole CI job, is left alone here: only the flag itself asks for a signature
    if ctx.get_parameter_source("sign_key") is click.core.ParameterSource.COMMANDLINE:
        raise UserError("--sign-key goes with --verifier-results (the report is signed again after the fold); a "
                        "rendering or release text is not signed: sign the folder with audit or certify --sign-key")
    if kind in (ReportFormat.MODEL_INDEX, ReportFormat.MODEL_CARD):
        text = _release_text(kind, source, certificates, model_name, source_url, out)
    elif certificates or model_name is not None or source_url is not None:
        raise UserError("--certificate, --name and --source-url go with --format model-index or model-card")
    elif kind is ReportFormat.MD:
        text = render_markdown(load_report(source))
    elif kind is ReportFormat.HTML:
        doc = load_report(source)
        text = render_html(doc, plot_png(doc))
    else:
        text = json.dumps(load_report(source), indent=2, allow_nan=False) + "\n"
    if out is None:
        click.echo(text, nl=False)
        return
    with atomic_write(out, "w") as f:
        f.write(text)
    status(f"wrote {out}")


def _fold(source: Path, results: Path | None, spec_dir: Path | None, verifier: str | None, sign_key: Any) -> None:
    """``--verifier-results``: the answers folded into the report folder, rewritten in place (re-signed with
    ``--sign-key``; an old signature is removed, since the report changed)."""
    import json

    from evaluators.formal import fold_results, read_results
    from evaluators.render import verification_rows
    from evaluators.report import load_adversarials, load_report, write_report
    from kit.io import require_file

    if results is None or spec_dir is None:
        raise UserError("--verifier-results and --spec go together")
    if not source.is_dir():
        raise UserError(f"--verifier-results rewrites a report folder: give the folder, not {source}")
    doc = load_report(source)
    manifest_path = require_file(spec_dir / "otkit-spec.json", "benchmark manifest")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{manifest_path}: not valid JSON") from None
    folded = fold_results(doc, manifest, read_results(results), verifier=verifier or "")
    stored = doc["artifacts"]["adversarials"]
    adversarials = load_adversarials(source / stored) if stored else None
    paths = write_report(folded, source, adversarials)
    if sign_key is not None:
        from evaluators.attestation import sign_folder

        paths.append(sign_folder(source, sign_key))
    rows = verification_rows(folded["verification"])
    click.echo(table(rows, list(rows[0])))
    beaten = [c for c in folded["checks"] if c["id"] == "verifier-beats-attacks"]
    for c in beaten:
        click.echo(f"warning: verifier-beats-attacks: {c['message']}", err=True)
    status(f"wrote {', '.join(str(p) for p in paths)}")


def _plot_link(document: Path, name: str, base: Path) -> str | None:
    """The path of plot ``name`` beside ``document`` (a report or certificate folder, or its JSON file) relative to
    ``base`` (where the model card is written), POSIX-style; ``None`` when the plot is not there (the card then
    leaves it out rather than link nothing)."""
    plot = (document if document.is_dir() else document.parent) / name
    if not plot.is_file():
        return None
    try:  # the paths as given (abspath, not resolve: a symlinked folder keeps its name)
        return Path(os.path.relpath(os.path.abspath(plot), os.path.abspath(base))).as_posix()
    except ValueError:  # another drive (Windows): no relative path; the bare name, to upload beside the card
        return name


def _release_text(kind: ReportFormat, source: Path, certificates: tuple[Path, ...], name: str | None,
                  source_url: str | None, out: Path | None = None) -> str:
    """``--format model-index`` / ``model-card``: the documents read and checked, then rendered. The card links each
    plot where it lies, relative to the card's file (``out``) or, on stdout, to the current folder."""
    import re

    from evaluators.certificate import load_certificate
    from evaluators.release import check_with_huggingface_hub, model_card, model_index, model_index_yaml
    from evaluators.report import load_report

    if source_url is not None and not re.fullmatch(r"https?://[^\s<>\"'`]+", source_url):
        raise UserError(f"--source-url must be an http(s) URL without spaces or quotes, got {source_url!r}")
    if name is not None and (not name.strip() or len(name) > 200 or any(c in name for c in "\n\r")):
        raise UserError(f"--name must be one line of at most 200 characters, got {name!r}")
    report_doc = None if _is_certificate(source) else load_report(source)
    cert_paths = ([source] if report_doc is None else []) + list(certificates)
    certs = [load_certificate(c) for c in cert_paths]
    if kind is ReportFormat.MODEL_CARD:
        base = out.parent if out is not None else Path.cwd()
        curves = _plot_link(source, "curves.png", base) if report_doc is not None else None
        certified = [_plot_link(c, "certified.png", base) for c in cert_paths]
        return model_card(report_doc, certs, name=name, source_url=source_url, curves=curves, certified=certified)
    index = model_index(report_doc, certs, name=name, source_url=source_url)
    problem = check_with_huggingface_hub(index)
    if problem is not None:  # our output disagrees with the reference reader: a bug of ours, said plainly
        raise RuntimeError(f"the model-index does not round-trip through huggingface_hub: {problem}")
    return model_index_yaml(index)


# -------------------------------------------------------------------------------------------------------------- verify
def _sha256(path: Path) -> str:
    from kit.io import sha256_file

    return "sha256:" + sha256_file(path)


def _short(digest: str) -> str:
    return digest[:19] + "..." if len(digest) > 22 else digest


def _hash_row(item: str, path: Path, expected: str, actual: str | None = None) -> dict[str, Any]:
    actual = actual or _sha256(path)
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
    """Up to ``budget`` positions spread across attacks (round robin), drawn at random within each attack's array
    (:func:`evaluators.replay.random_picks`: a forged entry cannot sit where the recheck is known not to look)."""
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
    from evaluators.replay import random_picks

    return {k: random_picks(sizes[k], m) for k, m in take.items() if m}


def _recheck(engine: Any, npz_path: Path, stored: dict[str, dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """Run the engine on up to ``budget`` stored adversarials; per attack, the ones whose prediction changed."""
    import numpy as np
    import torch

    picks = _spread({name: len(a["x"]) for name, a in stored.items()}, budget)
    if not picks:
        return []
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


def _signature(doc: dict[str, Any], folder: Path, pub: Any, hashes: list[dict[str, Any]]) -> dict[str, Any]:
    """The signature check of ``otkit verify --public-key`` (:func:`evaluators.attestation.check_signature`), with
    the engine and twin digests just computed from the files given; without a key, a note when a bundle is there."""
    from evaluators.attestation import BUNDLE_NAMES, check_signature, document_kind

    bundle = folder / BUNDLE_NAMES[document_kind(doc)]
    if pub is None:
        note = (f"{bundle.name} is beside it: give --public-key PUB to check the signature" if bundle.is_file()
                else "")
        return {"checked": False, "bundle": str(bundle), "subjects": [], "problems": [], "note": note}
    actual = {h["item"]: h["actual"] for h in hashes}
    rows, problems = check_signature(doc, folder, pub, engine_sha256=actual.get("engine sha256"),
                                     twin_sha256=actual.get("twin sha256"))
    return {"checked": True, "bundle": str(bundle), "keyid": pub.keyid, "subjects": rows, "problems": problems,
            "note": ""}


def _signature_row(signature: dict[str, Any], says: str) -> dict[str, Any]:
    """The signature's row of verify's table."""
    name = os.path.basename(signature["bundle"])
    if not signature["checked"]:
        found = "present, not checked" if signature["note"] else "not signed"
        return {"item": "signature", "file": name if signature["note"] else "", says: "-", "found": found,
                "result": "NOT CHECKED" if signature["note"] else "-"}
    n = len(signature["subjects"])
    bad = signature["problems"]
    return {"item": "signature", "file": name, says: f"key {signature['keyid'][:16]}...",
            "found": f"{n} subject(s) match" if not bad else f"{len(bad)} problem(s)",
            "result": "match" if not bad else "DIFFERS"}


def _engine_row(engine_path: Path, expected: str) -> dict[str, Any]:
    """The engine's hash row: :func:`exporters.onnx.engine_sha256` (an ONNX file's external data included)."""
    from exporters.onnx import engine_sha256

    row = _hash_row("engine sha256", engine_path, expected, engine_sha256(engine_path))
    if not row["match"] and row["actual"] != _sha256(engine_path) and _sha256(engine_path) == expected:
        row["note"] = "the report's hash is of the model file alone; it does not cover the external data files"
    return row


def _folded(norm: Any) -> dict[str, Any] | None:
    """The input convention folded into a twin, as the report records it (``None``: none)."""
    from kit.convention import InputConvention

    folded = InputConvention.from_folded(norm, "twin")
    return None if folded is None else folded.to_dict()


def _engine_input(doc: dict[str, Any], given: Any) -> Any:
    """The engine's input convention: the report's (what it was audited with), or ``--engine-input`` if the report
    records none; both and different: a UserError."""
    from kit.convention import InputConvention

    raw = doc["engine"].get("input_convention")
    recorded = None if raw is None else InputConvention.from_dict(raw, "report: engine.input_convention")
    if given is not None and recorded is not None and given != recorded:
        raise UserError(f"--engine-input {given} contradicts the report, which audited the engine with {recorded}")
    return given if given is not None else recorded


@click.command("verify", epilog=VERIFY_EXIT_STATUSES)
@click.argument("report_file", metavar="REPORT.json|DIR", type=click.Path(path_type=Path))
@click.option("--engine", "engine_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The engine file the report says it audited (.onnx, .engine, or a checkpoint). An ONNX file's "
                   "external data files are hashed with it.")
@click.option("--twin", "twin_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The twin; its file sha256 is checked too. Required unless --waive twin. A twin trained "
                   "elsewhere takes the flags it was audited with (docs/byom.md).")
@click.option("--recheck", type=click.IntRange(min=0), default=DEFAULT_RECHECK, show_default=True, metavar="N",
              help="Run the engine on up to N stored adversarials (adversarials.npz beside the report, spread across "
                   "attacks, drawn at random): each must still get the stored prediction, and not its true label. "
                   "For a certificate: certify N of its examples, drawn at random, again with its seeds. 0 skips "
                   "the recheck, which then needs --waive recheck.")
@click.option("--waive", "waived", multiple=True, type=click.Choice(WAIVABLE),
              help="Accept a check left undone (repeatable): twin (no --twin), adversarials (no adversarials.npz: its "
                   "hash, content and the recheck), recheck (no recheck of stored adversarials), data (the audited examples "
                   "are not drawn again: clean accuracies, eps* = 0 sets and adversarial distances unchecked). Waived "
                   "checks are listed in the output.")
@click.option("--data", "data_spec", default=None, metavar="SPEC",
              help="Where the report's dataset lies here, if not at its recorded spec (the drawn examples must have "
                   "the report's fingerprint).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--public-key", "public_key", default=None, type=click.Path(dir_okay=False, path_type=Path), metavar="PUB",
              help="Check the signature (report.sigstore.json beside a report, certificate.sigstore.json beside a "
                   "certificate, from --sign-key) with this ed25519 public key, and every subject it signs: the engine "
                   "and twin given here, the data fingerprint and each file the command wrote (report.json, report.md, "
                   "report.html, curves.png, adversarials.npz; certificate.json, certificate.md, certificate.html, "
                   "certified.png); other files in the folder are not signed. A document without a valid signature by "
                   "this key fails.")
@click.option("--arch", "arch", default=None, metavar="FILE.py:NAME",
              help="When verify rebuilds a checkpoint engine (the recheck, the data replay) whose architecture is "
                   "your own Python file: that file, "
                   "imported (its code runs) only if NAME and its sha256 match the checkpoint. Never imported without "
                   "it.")
@engine_input_option
@twin_import_options
@click.pass_context
def verify(ctx: click.Context, report_file: Path, engine_path: Path, twin_path: Path | None, recheck: int,
           waived: tuple[str, ...], data_spec: str | None, as_json: bool, public_key: Path | None = None,
           arch: str | None = None, engine_input: Any = None, twin_options: Any = None) -> None:
    """Check a report against the files it names and against its own per-example results.

    The sha256 of the engine (with an ONNX file's external data files), of the twin and of adversarials.npz must be
    the report's; adversarials.npz must hold exactly the engine-side adversarials the report describes; up to N of
    them must still fool the engine as stored (--recheck); the audited examples, drawn again from the report's data,
    must have its fingerprint, the engine's (and twin's) clean accuracy on them must be the report's (with the twin:
    the clean agreement, logit gap, its tolerance and the clean verdict measured again too), eps* must be 0
    exactly where a model misclassifies clean, and each stored L-inf/L2 adversarial must lie at its stored eps* from
    its example; every eps_max must lie within its norm's largest distance; and every figure derived from the
    per-example eps* (curves, AUACs and intervals, fidelity statistics and verdicts, gates, verdict, status) must
    recompute to the report's. A check that cannot run (no --twin, no adversarials.npz, --recheck 0 or nothing to
    recheck) fails unless --waive names it; a dataset that cannot be read is an input error (exit status 2), and
    --waive data skips the replay.

    Every input is checked before any hash is compared (a missing file is exit status 2, not a mismatch).

    A certificate (a folder with certificate.json, from otkit certify) is verified instead: the engine's (and twin's)
    sha256, every figure re-derived from its counts, and N examples drawn at random (--recheck) certified again with
    its own seeds (docs/certify.md).
    """
    from evaluators.recompute import check_adversarials, recompute_report
    from evaluators.report import load_adversarials, load_report
    from kit.io import require_file

    waive = [w for w in WAIVABLE if w in waived]
    pub = None
    if public_key is not None:
        from kit.signing import load_public_key

        pub = load_public_key(public_key)
    if _is_certificate(report_file):
        _verify_certificate(ctx, report_file, engine_path, twin_path, recheck, waive, data_spec, as_json, arch,
                            engine_input, pub)
        return
    loaded: dict[str, Any] = {}

    def _device() -> Any:
        from kit.runtime import resolve_device

        if "device" not in loaded:
            loaded["device"] = resolve_device((ctx.find_root().obj or {}).get("device", "auto"))
        return loaded["device"]

    def _engine() -> Any:  # loaded once, when a check needs to run it
        from exporters.engines import load_engine

        if "engine" not in loaded:
            loaded["engine"] = load_engine(engine_path, _device(), arch=arch,
                                           input_convention=_engine_input(doc, engine_input))
        return loaded["engine"]

    def _twin() -> Any:  # built once, as the report's audit built it
        import dataclasses

        from exporters.twins import load_any_twin, source_kind, with_engine_input

        if "twin" not in loaded:
            kind = source_kind(twin_path)
            options = twin_options
            if kind != "checkpoint":
                options = with_engine_input(options, twin_path, engine_path, _engine().input_convention)
                if options.convention is None and doc["twin"].get("input_convention"):  # what the audit folded in
                    from kit.convention import InputConvention

                    options = dataclasses.replace(options, convention=InputConvention.from_dict(
                        doc["twin"]["input_convention"], "report: twin.input_convention"))
            loaded["twin"] = load_any_twin(twin_path, _device(), options, kind=kind)
        return loaded["twin"]

    doc = load_report(report_file)
    rpath = _report_path(report_file)
    require_file(engine_path, "engine file")
    if twin_path is not None:
        require_file(twin_path, "twin checkpoint")
    stored_name = doc["artifacts"]["adversarials"]
    npz_path = rpath.parent / stored_name if stored_name is not None else None
    stored = load_adversarials(npz_path) if npz_path is not None and npz_path.is_file() else None
    problems: list[str] = []

    hashes = [_engine_row(engine_path, doc["engine"]["sha256"])]
    if twin_path is not None:
        row = _hash_row("twin sha256", twin_path, doc["twin"]["sha256"])
        if not row["match"]:
            row["note"] = _twin_hint(twin_path, doc["twin"]["weights_sha256"])
        hashes.append(row)
    else:
        hashes.append({"item": "twin sha256", "file": "", "expected": doc["twin"]["sha256"], "actual": None,
                       "match": None, "note": "no --twin: waived" if "twin" in waive else "no --twin"})
        if "twin" not in waive:
            problems.append("twin not checked: give --twin CHECKPOINT (or --waive twin)")

    adv_sha = doc["artifacts"].get("adversarials_sha256")  # absent in reports written before it was recorded
    content: list[str] = []
    if stored is not None and npz_path is not None:  # a stored file implies its path
        if adv_sha is not None:
            hashes.append(_hash_row("adversarials sha256", npz_path, adv_sha))
        content = check_adversarials(doc, stored, npz_path.name)
    else:
        why = ("the report stores no adversarials" if npz_path is None
               else f"{npz_path} is not beside the report")
        hashes.append({"item": "adversarials sha256", "file": str(npz_path or ""), "expected": adv_sha or "",
                       "actual": None, "match": None,
                       "note": f"{why}: waived" if "adversarials" in waive else why})
        if "adversarials" not in waive:
            problems.append(f"adversarials not checked: {why} (or --waive adversarials)")

    rechecked: list[dict[str, Any]] = []
    recheck_note = ""
    if "recheck" in waive:
        recheck_note = "waived"
    elif recheck == 0:
        recheck_note = "--recheck 0"
        problems.append("recheck skipped (--recheck 0): give --recheck N (or --waive recheck)")
    elif stored is None or npz_path is None:
        # already a problem above, unless waived there
        recheck_note = "no adversarials: waived" if "adversarials" in waive else "no adversarials"
    elif not any(len(a["x"]) for a in stored.values()):
        recheck_note = "no stored adversarial to run"
        problems.append("recheck had nothing to run: adversarials.npz holds no adversarial (or --waive recheck)")
    else:
        rechecked = _recheck(_engine(), npz_path, stored, recheck)

    replayed: list[str] = []
    if "data" in waive:
        replay_note = "waived"
    else:
        from evaluators.replay import replay_report

        replay_note = "replayed"
        twin = _twin().model if twin_path is not None else None
        replayed = replay_report(doc, _engine(), twin, _device(), stored=stored, spec=data_spec)

    # a twin imported from elsewhere is built with flags: the twin as built (weights, folded input), not only its
    # file, must be the audited one (a kit checkpoint's file determines its twin)
    if twin_path is not None and doc["twin"].get("source"):
        built = _twin()
        for field, expected, actual in (
                ("twin weights sha256", doc["twin"]["weights_sha256"], built.info.weights_sha256),
                ("twin input convention", doc["twin"].get("input_convention"),
                 _folded(built.info.normalization))):
            if expected != actual:
                problems.append(f"{field} differs: the twin built from {twin_path.name} with these flags has "
                                f"{actual}, the report's had {expected} (give the flags it was audited with)")

    flagged: list[str] = []
    if "data" not in waive:  # with the replay, which has loaded the engine and twin: a hash-only verify reads neither
        from evaluators.replay import file_flags

        built = _twin() if twin_path is not None else None
        flagged = file_flags(doc, _engine(), engine_path, built.model if built else None, built.info if built else None)
    differences = recompute_report(doc)
    signature = _signature(doc, rpath.parent, pub, hashes)

    for h in hashes:
        if h["match"] is False:
            note = f" ({h['note']})" if h.get("note") else ""
            problems.append(f"{h['item']} differs: {h['file']} is {h['actual']}, the report says {h['expected']}{note}")
    problems += content
    for r in rechecked:
        for b in r["failures"]:
            problems.append(f"recheck {r['attack']} example {b['index']}: {b['why']} (stored pred {b['stored_pred']}, "
                            f"engine now {b['pred']}, label {b['y']}, logit margin {b['margin']:.3g})")
    problems += replayed
    problems += flagged
    problems += differences
    problems += signature["problems"]
    ok = not problems
    if as_json:
        emit_json({"report": str(rpath), "match": ok, "hashes": hashes,
                    "adversarials": None if stored is None else {"file": str(npz_path), "match": not content,
                                                                 "problems": content},
                    "recheck": rechecked, "recheck_note": recheck_note,
                    "recomputed": {"match": not differences, "differences": differences},
                    "replayed": {"note": replay_note, "match": not replayed, "differences": replayed},
                    "flags": {"match": not flagged, "differences": flagged},
                    "signature": signature, "waived": waive, "problems": problems})
    else:
        def result(h: dict[str, Any]) -> str:
            if h["match"] is None:
                return "waived" if str(h.get("note", "")).endswith("waived") else "NOT CHECKED"
            return "match" if h["match"] else "DIFFERS"

        rows = [{"item": h["item"], "file": os.path.basename(h["file"]), "report says": _short(h["expected"] or "-"),
                 "found": "absent" if h["actual"] is None else _short(h["actual"]), "result": result(h)}
                for h in hashes]
        if stored is not None:
            n_adv = sum(len(a["x"]) for a in stored.values())
            rows.append({"item": "adversarials content", "file": npz_path.name if npz_path else "",
                         "report says": "engine eps* per example", "found": f"{n_adv} adversarial(s)",
                         "result": "match" if not content else "DIFFERS"})
        rows += [{"item": f"recheck {r['attack']}", "file": npz_path.name if npz_path else "",
                  "report says": f"{r['checked']} adversarial(s)",
                  "found": f"{r['pred_match']} same pred, {r['still_adversarial']} still adversarial",
                  "result": "match" if r["match"] else "DIFFERS"} for r in rechecked]
        if not rechecked:
            rows.append({"item": "recheck", "file": "", "report says": "-", "found": recheck_note or "-",
                         "result": "waived" if recheck_note.endswith("waived") else
                         "NOT CHECKED"})
        rows.append({"item": "audited examples", "file": "", "report says": "clean accuracy, eps* = 0, distances",
                     "found": "waived" if replay_note == "waived" else
                     ("replayed equal" if not replayed else f"{len(replayed)} difference(s)"),
                     "result": "waived" if replay_note == "waived" else ("match" if not replayed else "DIFFERS")})
        rows.append({"item": "flags from the files", "file": "", "report says": "precision, weights, graph",
                     "found": "waived" if replay_note == "waived" else
                     ("raised again equal" if not flagged else f"{len(flagged)} flag(s) missing"),
                     "result": "waived" if replay_note == "waived" else ("match" if not flagged else "DIFFERS")})
        rows.append({"item": "derived figures", "file": rpath.name, "report says": "curves, AUACs, fidelity, gates",
                     "found": "recomputed equal" if not differences else f"{len(differences)} field(s) differ",
                     "result": "match" if not differences else "DIFFERS"})
        rows.append(_signature_row(signature, "report says"))
        click.echo(table(rows, ["item", "file", "report says", "found", "result"]))
    for line in problems:
        click.echo(f"verify: {line}", err=True)
    if signature["note"]:
        click.echo(f"verify: {signature['note']}", err=True)
    if waive:
        click.echo(f"verify: waived: {', '.join(waive)}", err=True)
    if not ok:
        ctx.exit(1)
