"""``otkit audit`` (audit a deployed engine against its twin, write the AUAC report: docs/audit.md) and ``otkit run``
(train, export, audit each artifact: docs/run.md).

Plain click commands; ``kit.cli`` adds them to the ``otkit`` group.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import click

from kit.cli.common import (
    CI,
    PROVIDERS,
    ListedOption,
    arch_option,
    attack_names,
    ci_options,
    command_device,
    command_seed,
    command_world,
    dependency_versions,
    emit_json,
    engine_input_option,
    flag_ids,
    lead_lock,
    option_given,
    publish_ci,
    seed_option,
    set_interrupt_hint,
    sign_key_option,
    status,
    table,
    twin_import_options,
)
from kit.errors import UserError

AUDIT_EXIT = """\b
Exit statuses:
  0  pass: the engine matches its twin and every gate holds
  1  fail: verdict mismatch (an attack's curves or a threat model's worst
     case), a --min-auac gate failed, or an error flag not allowed with
     --allow-flag (the report's first sentence says which)
  2  usage or input error, --out in use by another run, or a refused write; no
     report is written and nothing on disk changes
  130 interrupted (Ctrl-C): finished batches are kept, --resume continues"""


def _fmt_ci(ci: list[float]) -> str:
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def audit_rows(doc: dict[str, Any]) -> list[dict[str, str]]:
    """The per-attack summary table of a report document."""
    rows = []
    for r in doc["attacks"]:
        fid = r["fidelity"]
        rows.append({"attack": r["name"], "norm": r["norm"], "eps_max": f"{r['eps_max']:.4g}",
                     "twin AUAC": f"{r['twin']['auac']:.4f}", "engine AUAC": f"{r['engine']['auac']:.4f}",
                     "gap": f"{fid['auac_gap']:+.4f}", "gap 95% CI": _fmt_ci(fid["auac_gap_ci"]),
                     "max curve gap": f"{fid['max_gap']:.4f} @ {fid['max_gap_eps']:.3g}", "verdict": fid["verdict"]})
    return rows


AUDIT_COLUMNS = ["attack", "norm", "eps_max", "twin AUAC", "engine AUAC", "gap", "gap 95% CI", "max curve gap",
                 "verdict"]


def flag_effect(doc: dict[str, Any], check: dict[str, Any]) -> str:
    from evaluators.render import flag_effect as effect

    return effect(doc, check)


def blackbox_engine_only(worst: dict[str, Any]) -> int:
    from evaluators.render import blackbox_engine_only as count

    return count(worst)


def _engine_only_text(w: dict[str, Any]) -> str:
    eo = w.get("engine_only")
    return f"{eo['count'][-1]} (twin-guided {eo['twin_guided_count'][-1]})" if eo else "-"


def print_audit(doc: dict[str, Any]) -> None:
    """The audit's one-screen summary on stdout."""
    c = doc["clean"]
    click.echo(f"engine {doc['engine']['path']} [{doc['engine']['format']}, {doc['engine']['precision']}] vs twin "
               f"{doc['twin']['path']} on {doc['data']['n']} examples of {doc['data']['spec']}")
    gap_tol = c.get("max_logit_gap_tolerance")
    gap = "not finite" if c["max_logit_gap"] is None else format(c["max_logit_gap"], ".3g")
    click.echo(f"clean: twin {c['twin_accuracy']:.4f}, engine {c['engine_accuracy']:.4f}, top-1 agreement "
               f"{c['top1_agreement']:.4f}, max logit gap {gap}"
               f"{f' (tolerance {gap_tol:.3g})' if gap_tol is not None else ''} -> {c['verdict']}")
    s = c.get("spot_check")
    if s:
        click.echo(f"spot check: {s['n']} examples drawn at random from the split, top-1 agreement "
                   f"{s['top1_agreement']:.4f} -> {s['verdict']}")
    click.echo("")
    if doc.get("worst_case"):
        rows = [{"threat model": w["norm"], "eps_max": f"{w['eps_max']:.4g}",
                 "engine worst-case AUAC": f"{w['engine']['auac']:.4f}",
                 "95% CI": f"[{w['engine']['auac_ci'][0]:.4f}, {w['engine']['auac_ci'][1]:.4f}]",
                 "twin": f"{w['twin']['auac']:.4f}",
                 "engine-only found": _engine_only_text(w),
                 "black box, engine below twin": str(blackbox_engine_only(w)) if w.get("blackbox") else "-",
                 "verdict": w.get("fidelity", {}).get("verdict", "-"),
                 "over": ", ".join(w["attacks"])} for w in doc["worst_case"]]
        click.echo(table(rows, ["threat model", "eps_max", "engine worst-case AUAC", "95% CI", "twin",
                                "engine-only found", "black box, engine below twin", "verdict", "over"]))
        click.echo("")
    click.echo(table(audit_rows(doc), AUDIT_COLUMNS))
    click.echo("(every AUAC comes from attacks: an empirical upper bound on robustness, not a certificate)")
    for g in doc["gates"]:
        lower = f", lower 95% limit {g['engine_auac_lower']:.4f}" if "engine_auac_lower" in g else ""
        click.echo(f"gate {g['attack']}: engine AUAC (upper bound) {g['engine_auac']:.4f}{lower} >= "
                   f"{g['min_auac']:.4f}: "
                   f"{'passed' if g['passed'] else 'FAILED'}")
    if doc["checks"]:
        click.echo("\nchecks (see docs/checks.md):")
        for f in doc["checks"]:
            click.echo(f"  [{f['severity']}]{flag_effect(doc, f)} {f['id']} ({f['attack'] or 'model'}): "
                       f"{f['message']}")
    click.echo(f"\nverdict: {doc['verdict']}   status: {doc['status']}")


@click.command(epilog=AUDIT_EXIT)
@click.option("--engine", "engine_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The deployed artifact: .onnx (fp32/fp16/int8) or a TensorRT .engine.")
@click.option("--twin", "twin_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The PyTorch model the engine was exported from: a kit checkpoint, or weights / a .pt2 program / "
                   "an ONNX file trained elsewhere, imported on the fly with the flags below (docs/byom.md).")
@click.option("--data", "data_spec", default=None, help="Dataset spec (default: the one the twin was trained on).")
@click.option("--split", type=click.Choice(["test", "train"]), default="test")
@click.option("--attack", "attacks", multiple=True, required=True, metavar="NAME[@EPS_MAX][:KEY=VALUE,...]", cls=ListedOption,
              listed=attack_names, help="Attack, repeatable; NAME@EPS_MAX overrides --eps-max, :key=value,... sets "
              "the attack's own parameters (steps, restarts, ...); autoattack / autoattack-l2 run AutoAttack's four "
              "attacks (APGD-CE, APGD-T, FAB-T, Square).")
@click.option("--eps-max", type=float, default=None, help="Largest epsilon of the curves (pixels in [0, 1]; "
              "unit-mass transport cost for Wasserstein attacks).")
@click.option("--samples", type=click.IntRange(min=1), default=500, help="Examples audited (seeded subset).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, help="Examples per resumable batch.")
@click.option("--rungs", type=click.IntRange(min=1), default=8, help="Ladder radii of the minimum-epsilon search.")
@click.option("--tol-auac", type=click.FloatRange(0, 1), default=0.01, help="Largest |AUAC gap| of a match.")
@click.option("--tol-curve", type=click.FloatRange(0, 1), default=0.02, help="Largest curve gap of a match.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.98, help="Smallest clean top-1 agreement.")
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.05,
              help="Significance level: a curve gap counts only where McNemar's test gives p < alpha.")
@click.option("--min-auac", "gates", multiple=True, metavar="NORM|ATTACK=VALUE",
              help="Release gate, repeatable: fail when the lower end of the engine's AUAC interval is below VALUE, "
                   "for a threat model's worst case (linf=0.3, l2=, wasserstein=) or one attack (pgd-linf=0.3).")
@click.option("--blackbox-samples", type=click.IntRange(min=0), default=100,
              help="Examples attacked by Square directly on the engine (0: skip the black-box check).")
@click.option("--spot-check", type=click.IntRange(min=0), default=1000,
              help="Clean examples drawn at random from the whole split (a seed from the OS's entropy, recorded) on "
                   "which the engine must agree with the twin as on the audited ones (0: none).")
@click.option("--provider", "providers", multiple=True, type=click.Choice(PROVIDERS),
              help="ONNX Runtime provider (repeatable; default: the --device's).")
@click.option("--allow-flag", "allowed_flags", multiple=True, metavar="ID", cls=ListedOption, listed=flag_ids,
              help="Let an error-level validity flag pass instead of failing the audit (repeatable; recorded in the "
                   "report; docs/checks.md).")
@click.option("--engine-only/--no-engine-only", "engine_only", default=True, show_default=True,
              help="Search for inputs that fool the engine but not the twin with the differential attack on a "
                   "replica of the engine's arithmetic (int8 ONNX: its graph with fake quantisation; fp16: the twin "
                   "in half precision); fp32 engines need none.")
@click.option("--resume", is_flag=True, help="Continue an interrupted audit in --out.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for report.json, report.md, report.html, curves.png, adversarials.npz.")
@seed_option
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout instead of the summary.")
@sign_key_option
@ci_options
@arch_option
@engine_input_option
@twin_import_options
@click.pass_context
def audit(ctx: click.Context, engine_path: Path, twin_path: Path, data_spec: str | None, split: str,
          attacks: tuple[str, ...], eps_max: float | None, samples: int, batch_size: int, rungs: int,
          tol_auac: float, tol_curve: float, min_agreement: float, alpha: float, gates: tuple[str, ...], blackbox_samples: int,
          spot_check: int, providers: tuple[str, ...], allowed_flags: tuple[str, ...], engine_only: bool, resume: bool,
          out: Path, seed: int | None, as_json: bool, sign_key: Any = None, ci: CI = CI.NONE, junit: Path | None = None,
          arch: str | None = None, engine_input: Any = None, twin_options: Any = None) -> None:
    """Audit a deployed engine against its PyTorch twin and write the AUAC robustness report.

    Every AUAC comes from attacks: an empirical upper bound on the engine's robustness (a stronger attack can only
    lower it), not a certificate.

    Every candidate is crafted with the twin's gradients and judged by both the twin and the engine; the curves,
    their gaps and the verdict go to OUT/report.json (schema otkit.report/1) with report.md, report.html and
    curves.png beside it. docs/audit.md explains the method and every field.
    """
    import torch

    from evaluators.audit import AuditConfig, Gate, Tolerances, finish, load_audit_inputs, run_audit
    from evaluators.evaluate import AttackRequest, check_radii
    from evaluators.report import write_report

    seed = command_seed(ctx, seed)
    cfg = AuditConfig(attacks=AttackRequest.parse_all(attacks, eps_max), batch_size=batch_size,
                      rungs=rungs, seed=seed, gates=[Gate.parse(g) for g in gates],
                      tolerances=Tolerances(auac=tol_auac, curve=tol_curve, agreement=min_agreement, alpha=alpha),
                      blackbox_samples=blackbox_samples, allowed_flags=allowed_flags, engine_only=engine_only,
                      spot_check=spot_check)
    world = command_world()  # under torchrun: this process's rank (docs/distributed.md)
    device = command_device(ctx)
    command = shlex.join(["otkit", *sys.argv[1:]])
    # one audit per report folder; taken first, so a second audit is refused at once (a folder the lock creates is
    # removed again if the audit fails before writing anything); under torchrun the lead process holds it for all
    with lead_lock(out, command):
        inputs = load_audit_inputs(engine_path, twin_path, data_spec, split, samples, seed, device, providers,
                                   arch=arch, twin_options=twin_options, engine_input=engine_input,
                                   notice=option_given(ctx, "samples"))
        check_radii(cfg.attacks, inputs.engine.input_shape)
        torch.manual_seed(seed)
        set_interrupt_hint(f"finished batches are kept in {out}: add --resume to the same command to continue")
        # run_audit checks the resume state before it removes the old report (an exit 2 changes nothing on disk)
        doc, adversarials = run_audit(inputs, cfg, out, resume=resume, versions=dependency_versions(),
                                      command=command, world=world)
        if doc is None:  # another process's batches are done: the lead writes the report
            return
        paths = write_report(doc, out, adversarials)
        if sign_key is not None:
            from evaluators.attestation import sign_folder

            paths.append(sign_folder(out, sign_key))
        finish(out)
    if as_json:
        emit_json(doc)
    else:
        print_audit(doc)
    status(f"wrote {', '.join(str(p) for p in paths)}")
    clean = doc["clean"]
    if clean["verdict"] != "match":
        click.echo(f"{clean['reason']}: the engine and the twin disagree before any attack; if either was made outside "
                   "the kit, check what it takes (--engine-input, --input-range/--mean/--std/--input-layout; "
                   "docs/byom.md)", err=True)
    # the Markdown as written (write_report adds the adversarials' hash to its own copy of the document)
    publish_ci(ci, junit, [(f"audit of {engine_path.name}", doc, (out / "report.md").read_text("utf-8"), out)],
               as_json)
    if doc["status"] != "pass":
        ctx.exit(1)


RUN_EXIT = """\b
Exit statuses:
  0  every artifact passed its audit
  1  an audit or a certificate failed (verdict mismatch, a gate, an error
     flag not allowed); the summary says which
  2  usage or input error (bad run file, missing data), or a refused write
  130 interrupted (Ctrl-C): --resume continues"""


@click.command(epilog=RUN_EXIT)
@click.argument("run_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="Run name (folder under --out); overrides the file's.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Parent folder of the run; overrides the file's (default runs/).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training epochs; overrides [train].")
@click.option("--print-config", is_flag=True, help="Print the resolved run configuration (JSON) and exit.")
@click.option("--resume", is_flag=True, help="Continue the training and the audits where they stopped.")
@seed_option
@click.option("--json", "as_json", is_flag=True, help="Print summary.json to stdout instead of the table.")
@sign_key_option
@ci_options
@click.pass_context
def run(ctx: click.Context, run_file: Path | None, name: str | None, out_dir: Path | None, epochs: int | None,
        print_config: bool, resume: bool, seed: int | None, as_json: bool, sign_key: Any = None, ci: CI = CI.NONE,
        junit: Path | None = None) -> None:
    """The main job: train, export (ONNX fp32/fp16/int8, TensorRT where available), audit each artifact, report.

    RUN_FILE is a TOML run description (docs/run.md); without it the embedded default runs: SAT on digits with a
    small CNN, a few minutes on a laptop CPU. Everything goes to OUT/NAME/.
    """
    import dataclasses

    from evaluators.pipeline import load_run_config, run_pipeline

    cfg = load_run_config(run_file)
    if name is not None:
        if not name or "/" in name:
            raise UserError(f"--name must be a plain folder name, got {name!r}")
        cfg = dataclasses.replace(cfg, name=name)
    if out_dir is not None:
        cfg = dataclasses.replace(cfg, out=str(out_dir))
    if epochs is not None:
        cfg = dataclasses.replace(cfg, train={**cfg.train, "epochs": epochs})
    if print_config:
        emit_json(cfg.to_dict())
        return
    set_interrupt_hint("finished steps are kept in the run folder: add --resume to the same command to continue")
    world = command_world()  # under torchrun: the lead trains and exports, every process audits (docs/distributed.md)
    summary = run_pipeline(cfg, device=command_device(ctx), seed=command_seed(ctx, seed), resume=resume,
                           command=shlex.join(["otkit", *sys.argv[1:]]), versions=dependency_versions(), world=world,
                           sign_key=sign_key)
    if summary is None:  # another process: its batches are done, the lead writes the summary
        return
    if as_json:
        emit_json(summary)
    else:
        print_run_summary(summary)
    publish_ci(ci, junit, run_documents(summary), as_json)
    if summary["status"] != "pass":
        ctx.exit(1)


def run_documents(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any], str, Path]]:
    """(title, document, Markdown, folder) of every report and certificate a run wrote, for :func:`publish_ci`."""
    from evaluators.certificate import load_certificate
    from evaluators.report import load_report

    out = []
    for r in summary["artifacts"]:
        if r["status"] == "skipped":
            continue
        folder = Path(r["report"]).parent
        out.append((f"audit of {r['format']}", load_report(folder), (folder / "report.md").read_text("utf-8"),
                    folder))
        if "certificate" in r:
            folder = Path(r["certificate"]).parent
            out.append((f"certificate of {r['format']}", load_certificate(folder),
                        (folder / "certificate.md").read_text("utf-8"), folder))
    return out


def print_run_summary(summary: dict[str, Any]) -> None:
    """One screen: the twin, then one row per artifact, then where the reports are."""
    click.echo(f"twin {summary['checkpoint']} ({summary['defense']}), held-out accuracy "
               f"{summary['clean_accuracy']:.4f}, {summary['weights_sha256']}\n")
    rows = []
    for r in summary["artifacts"]:
        if r["status"] == "skipped":
            rows.append({"artifact": r["format"], "status": "skipped"})
            continue
        auacs = "  ".join(f"{k} {v:.3f}" for k, v in (r.get("worst_case_auac") or r["engine_auac"]).items())
        certified = f"{r['certified_auac']:.3f}" if "certified_auac" in r else "-"
        rows.append({"artifact": r["format"], "precision": r["precision"], "agreement": f"{r['top1_agreement']:.4f}",
                     "worst-case AUAC (upper bound)": auacs, "certified AUAC (lower bound, 1-alpha)": certified,
                     "flags": str(r["flags"]), "verdict": r["verdict"], "status": r["status"]})
    click.echo(table(rows, ["artifact", "precision", "agreement", "worst-case AUAC (upper bound)",
                            "certified AUAC (lower bound, 1-alpha)", "flags", "verdict", "status"]))
    for r in summary["artifacts"]:
        if r["status"] == "skipped":
            click.echo(f"\n{r['format']} skipped: {r['note']}")
    click.echo("\nreports:")
    for r in summary["artifacts"]:
        if r["status"] != "skipped":
            click.echo(f"  {r['report']}")
            if "certificate" in r:
                click.echo(f"  {r['certificate']} ({r['certificate_status']})")
    click.echo(f"\nrun {summary['run']}: {summary['status']} in {summary['seconds']:.0f} s")
