"""``otkit export-spec``: a VNN-COMP benchmark of the balls an audit found robust, for formal verifiers
(docs/verifiers.md). Their answers come back with ``otkit report DIR --verifier-results``."""

from __future__ import annotations

from pathlib import Path

import click

from kit.cli.common import emit_json, status

__all__ = ["export_spec"]


@click.command("export-spec", epilog="""\b
Exit statuses:
  0  the benchmark was written
  2  usage or input error (report not otkit.report/1, no L-inf attack, an
     engine that is not an fp32 ONNX file, a radius above eps_max, OUT an
     existing folder that is not empty, no robust example to verify)""")
@click.argument("report_dir", metavar="DIR|REPORT.json", type=click.Path(path_type=Path))
@click.option("--engine", "engine_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The fp32 ONNX file to verify: the audited engine, or, when that is fp16 / int8 / TensorRT, the fp32 "
                   "ONNX export of the same model (the benchmark records which).")
@click.option("--radius", "radii", multiple=True, type=click.FloatRange(0, 1, min_open=True), metavar="R",
              help="L-inf radius in [0, 1] pixels, repeatable, at most the audit's eps_max [default: eps_max/4 and "
                   "eps_max/2].")
@click.option("--max-examples", type=click.IntRange(min=1), default=20, show_default=True,
              help="Properties per radius: the first examples, in audit order, that the attacks did not fool up to "
                   "that radius.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="Seconds per instance, written to instances.csv.")
@click.option("--data", "data_spec", default=None, metavar="SPEC",
              help="Where the report's dataset lies here, if not at its recorded spec.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The benchmark folder, new or empty: onnx/, vnnlib/, instances.csv, otkit-spec.json.")
def export_spec(report_dir: Path, engine_path: Path, radii: tuple[float, ...], max_examples: int, timeout: float,
                data_spec: str | None, out: Path) -> None:
    """Write a VNN-COMP benchmark for formal verifiers (α,β-CROWN, NNV, Marabou, ...) from an audit.

    For each radius, the examples the audit's L-inf attacks did not fool there each get one VNN-LIB property: the
    L-inf box around the example and "another class scores at least the label". A verifier's unsat proves the
    example robust in that ball (a lower bound beside the attacks' upper bound); sat is an adversarial the attacks
    missed. Fold the answers back with otkit report DIR --verifier-results RESULTS.csv --spec OUT.
    """
    from evaluators.formal import export_spec as write
    from evaluators.report import load_report

    manifest = write(load_report(report_dir), engine_path, out, radii=radii or None, max_examples=max_examples,
                     timeout=timeout, data_spec=data_spec)
    counts = {}
    for inst in manifest["instances"]:
        counts[inst["radius"]] = counts.get(inst["radius"], 0) + 1
    emit_json({"benchmark": str(out), "instances": len(manifest["instances"]),
               "per_radius": {f"{r:g}": c for r, c in counts.items()}, "onnx_sha256": manifest["onnx"]["sha256"],
               "is_audited_engine": manifest["onnx"]["is_audited_engine"], "dropped": manifest["dropped"]})
    status(f"wrote {out}/instances.csv ({len(manifest['instances'])} properties), {out}/onnx/model.onnx, "
           f"{out}/vnnlib/, {out}/otkit-spec.json; run a verifier on instances.csv, then otkit report "
           f"{report_dir} --verifier-results RESULTS.csv --spec {out}")
