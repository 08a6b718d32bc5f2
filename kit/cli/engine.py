"""``otkit export`` (a checkpoint to ONNX or TensorRT, parity-checked) and ``otkit engine`` (``info``, ``run``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from exporters.formats import DEFAULT_MAX_BATCH, DEFAULT_OPSET, MIN_OPSET, ExportFormat, Precision
from kit.cli.common import (
    PROVIDERS,
    arch_option,
    command_device,
    command_seed,
    emit_json,
    engine_input_option,
    option_given,
    seed_option,
    status,
    table,
    twin_import_options,
)

# exporters.formats imports no torch or onnx, so --help stays fast
_FORMATS = [f.value for f in ExportFormat]
_PRECISIONS = [p.value for p in Precision]


def _fmt_float(v: Any, spec: str = ".3g") -> str:
    return "" if v is None else format(v, spec)


def _parity_rows(reports: list[tuple[str, str, Any]]) -> list[dict[str, Any]]:
    """Table rows from (file, exporter, ParityReport)."""
    return [{"file": f, "engine": r.engine.split(" [", 1)[-1].rstrip("]"), "precision": r.precision, "exporter": ex,
             "samples": r.samples, "max|dlogit|": _fmt_float(r.max_abs_diff),
             "mean|dlogit|": _fmt_float(r.mean_abs_diff), "tolerance": _fmt_float(r.tolerance),
             "top-1 agree": f"{r.top1_agreement:.4f}", "twin acc": _fmt_float(r.twin_accuracy, ".4f"),
             "engine acc": _fmt_float(r.engine_accuracy, ".4f"), "verdict": r.verdict} for f, ex, r in reports]


_PARITY_COLUMNS = ["file", "engine", "precision", "exporter", "samples", "max|dlogit|", "mean|dlogit|", "tolerance",
                   "top-1 agree", "twin acc", "engine acc", "verdict"]


@click.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(_FORMATS), default="onnx",
              help="onnx (fp32), onnx-fp16, onnx-int8 (static Q/DQ) or a TensorRT engine.")
@click.option("--precision", type=click.Choice(_PRECISIONS), default=None,
              help="TensorRT precision (default fp32); the ONNX formats imply theirs.")
@click.option("--max-batch", type=click.IntRange(min=1), default=DEFAULT_MAX_BATCH,
              help="Largest batch per engine call (the TensorRT profile's maximum).")
@click.option("--data", "data_spec", default=None,
              help="Dataset of the parity check (test split) and int8 calibration (train split); default: the "
                   "checkpoint's.")
@click.option("--samples", type=click.IntRange(min=1), default=256, help="Test samples of the parity check.")
@click.option("--calibration-samples", type=click.IntRange(min=1), default=256, help="Training samples for int8.")
@click.option("--opset", type=click.IntRange(min=MIN_OPSET), default=DEFAULT_OPSET, help="ONNX opset.")
@click.option("--workspace-mib", type=click.IntRange(min=1), default=1024, help="TensorRT workspace limit (MiB).")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TensorRT timing cache file (default: one per TensorRT version and GPU architecture under "
                   "$XDG_CACHE_HOME/otkit/tensorrt, ~/.cache/otkit/tensorrt without it).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output file: .onnx, or .engine for TensorRT (its ONNX file and .engine.json sidecar go beside).")
@seed_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the parity table.")
@arch_option
@click.pass_context
def export(ctx: click.Context, checkpoint: Path, fmt: str, precision: str | None, max_batch: int,
           data_spec: str | None, samples: int, calibration_samples: int, opset: int, workspace_mib: int,
           timing_cache: Path | None, out: Path, seed: int | None, as_json: bool, arch: str | None = None) -> None:
    """Export a checkpoint to ONNX (fp32, fp16, int8) or TensorRT, checked against the twin on real samples.

    Each export is checked (onnx.checker full check, strict shape inference) and compared with the twin on test
    samples: an FP32 export beyond tolerance fails with exit status 1 and writes nothing; fp16 and int8 exports report
    their top-1 agreement and logit gap.
    """
    from exporters.checkpoint import export_checkpoint
    from exporters.parity import ParityError

    try:
        exp = export_checkpoint(checkpoint, fmt, out, precision=precision, max_batch=max_batch, data_spec=data_spec,
                                samples=samples, calibration_samples=calibration_samples, opset=opset,
                                workspace_mib=workspace_mib, timing_cache=timing_cache, device=command_device(ctx),
                                seed=command_seed(ctx, seed), arch=arch)
        result, reports = exp.result, exp.reports
    except ParityError as e:
        if as_json:
            emit_json({"checkpoint": str(checkpoint), "written": False, "parity": e.report.to_dict()})
        else:
            click.echo(table(_parity_rows([(out.name, "", e.report)]), _PARITY_COLUMNS))
        click.echo(f"Error: {e}; nothing written", err=True)
        ctx.exit(1)
    if as_json:
        emit_json({"checkpoint": str(checkpoint), "weights_sha256": exp.weights_sha256, "data": exp.data_spec,
                    "written": True, **result.to_dict()})
    else:
        click.echo(table(_parity_rows(reports), _PARITY_COLUMNS))
        if getattr(result, "exporter_note", ""):
            click.echo(f"note: {result.exporter_note}", err=True)
    status(f"wrote {out} ({exp.sha256})")


# -------------------------------------------------------------------------------------------------------------- engine
@click.group()
def engine() -> None:
    """Exported engines (.onnx, TensorRT .engine, or a checkpoint as the twin): inspect and run them."""


@engine.command("info")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def engine_info(ctx: click.Context, path: Path, as_json: bool) -> None:
    """What a file is: format, opset, inputs/outputs, metadata, sha256, and where it can run."""
    from exporters.formats import engine_kind
    from kit.io import require_file

    kind = engine_kind(require_file(path, "engine file"))
    if kind == "onnx":
        from exporters.onnx import describe_onnx

        doc = describe_onnx(path)
    elif kind == "tensorrt":
        from exporters.tensorrt import describe_engine

        doc = describe_engine(path)
    else:
        from kit.checkpoint import read_checkpoint
        from kit.io import sha256_file

        _, ck = read_checkpoint(path)
        doc = {"path": str(path), "format": "torch checkpoint", "sha256": "sha256:" + sha256_file(path),
               "weights_sha256": ck.weights_sha256, "arch": ck.arch_name, "input_shape": ck.input_shape,
               "num_classes": ck.num_classes, "classes": ck.class_names, "precision": "fp32"}
    if as_json:
        emit_json(doc)
        return
    for key, val in doc.items():
        if isinstance(val, dict) and val and key in ("metadata", "sidecar", "checks", "ops", "opset", "here",
                                                     "otkit_engine"):
            click.echo(f"{key}:")
            width = max(len(str(k)) for k in val) + 2
            for k, v in val.items():
                click.echo(f"  {k:<{width}}{json.dumps(v) if not isinstance(v, str) else v}")
        elif isinstance(val, list) and val and isinstance(val[0], dict):
            click.echo(f"{key}:")
            for item in val:
                click.echo("  " + "  ".join(f"{k} {v}" for k, v in item.items()))
        else:
            click.echo(f"{key:<20}{', '.join(map(str, val)) if isinstance(val, list) else val}")


@engine.command("run")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", "data_spec", required=True, help="Dataset spec (otkit data --help).")
@click.option("--split", type=click.Choice(["test", "train"]), default="test")
@click.option("--samples", type=click.IntRange(min=1), default=1000, help="Examples run (seeded subset).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Largest batch per engine call.")
@click.option("--provider", "providers", multiple=True, type=click.Choice(PROVIDERS),
              help="ONNX Runtime provider, repeatable (default: cpu on the CPU, cuda on a GPU).")
@click.option("--twin", "twin_ckpt", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Model to compare against (logit gap, top-1 agreement; exit 1 if an FP32 engine is beyond "
                   "tolerance): a kit checkpoint, or a model trained elsewhere with the flags below (docs/byom.md).")
@seed_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@arch_option
@engine_input_option
@twin_import_options
@click.pass_context
def engine_run(ctx: click.Context, path: Path, data_spec: str, split: str, samples: int, batch_size: int | None,
               providers: tuple[str, ...], twin_ckpt: Path | None, seed: int | None, as_json: bool,
               arch: str | None = None, engine_input: Any = None, twin_options: Any = None) -> None:
    """Run an engine on a dataset: accuracy and images/s, and parity against its twin with --twin."""
    import time

    from exporters.checkpoint import fitting_dataset
    from exporters.engines import TorchEngine, check_compatible, load_engine
    from exporters.twins import load_any_twin, with_engine_input

    device = command_device(ctx)
    eng = load_engine(path, device, providers=list(providers) or None, max_batch=batch_size, arch=arch,
                      input_convention=engine_input)
    ds = fitting_dataset(data_spec, split, list(eng.input_shape), eng.num_classes, eng.name, samples,
                         command_seed(ctx, seed), notice=option_given(ctx, "samples"))
    twin = None
    if twin_ckpt is not None:
        options = with_engine_input(twin_options, twin_ckpt, path, eng.input_convention)
        loaded = load_any_twin(twin_ckpt, device, options, samples=ds.x)
        twin = TorchEngine(loaded.model, loaded.info.input_shape, loaded.info.num_classes,
                           loaded.info.weights_sha256 or "", name=twin_ckpt.name,
                           max_batch=batch_size or eng.max_batch)
        check_compatible(twin, eng.input_shape, eng.num_classes, str(path))
    x = ds.x.to(device)

    def timed_call(batch: Any) -> tuple[Any, float]:
        import torch

        t0 = time.perf_counter()
        out = eng(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - t0

    timed_call(x[:eng.max_batch])  # warm-up, untimed: first-call set-up (cuDNN's algorithm choice, TensorRT's context)
    logits, seconds = timed_call(x)
    acc = float((logits.argmax(1).cpu() == ds.y).double().mean())
    doc: dict[str, Any] = {"engine": eng.describe(), "data": {"spec": data_spec, "split": split, "n": len(ds),
                                                               "fingerprint": ds.fingerprint},
                           "accuracy": acc, "seconds": seconds, "images_per_s": len(ds) / seconds if seconds else None}
    failed = False
    if twin is not None:
        from exporters.parity import compare_logits

        report = compare_logits(twin(eng.input_convention.as_seen(x)), logits, precision=eng.precision, name=eng.name, labels=ds.y,
                                runtime=eng.parity_runtime)
        doc["parity"] = report.to_dict()
        failed = not report.passed
    if as_json:
        emit_json(doc)
    else:
        click.echo(f"{eng.name}  {eng.precision}  {eng.sha256}")
        click.echo(f"accuracy {acc:.4f} on {len(ds)} {split} examples of {data_spec}  "
                   f"({doc['images_per_s']:.0f} images/s, batch {eng.max_batch})")
        if twin is not None:
            click.echo(table(_parity_rows([(path.name, eng.exporter, report)]), _PARITY_COLUMNS))
    if failed:
        click.echo(f"Error: parity check failed: {report.summary()}", err=True)
        ctx.exit(1)
