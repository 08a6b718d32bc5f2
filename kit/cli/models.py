"""``otkit models``: the model zoo (``models list``) and what a checkpoint holds (``models show``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from kit.cli.common import emit_json, status, table, twin_import_options


@click.group()
def models() -> None:
    """The model zoo and checkpoints."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def models_list(as_json: bool) -> None:
    """Architectures that --arch accepts (or path/to/file.py:ClassOrFactory for your own)."""
    import models as zoo

    rows = [{"name": n, "description": zoo.describe(n)} for n in zoo.list_models()]
    if as_json:
        emit_json(rows)
    else:
        click.echo(table(rows, ["name", "description"]))


@models.command("show")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def models_show(checkpoint: Path, as_json: bool) -> None:
    """What a checkpoint holds: architecture, classes, input shape, defense, dataset fingerprint, weights sha256."""
    from kit.checkpoint import read_checkpoint

    state, info = read_checkpoint(checkpoint)
    n_params = sum(t.numel() for t in state.values())
    if as_json:
        emit_json({"path": str(checkpoint), "parameters": n_params, **info.to_dict()})
        return
    tc = info.train_config
    rows = [
        ("architecture", info.arch_name),
        ("parameters", f"{n_params:,} (tensors incl. buffers)"),
        ("input shape", "x".join(map(str, info.input_shape)) + " (pixels in [0, 1])"),
        ("classes", f"{info.num_classes}: {', '.join(info.class_names[:10])}{' ...' if info.num_classes > 10 else ''}"),
        ("normalisation", f"mean {info.normalization.get('mean')}, std {info.normalization.get('std')}"),
        *([("input", _convention_text(info.normalization))] if info.source else []),
        *([("imported from", f"{info.source.get('file')} ({info.source.get('kind')}, {info.source.get('sha256')})")]
          if info.source else []),
        ("defense", info.defense),
        ("dataset", f"{info.dataset.get('spec')} ({info.dataset.get('fingerprint')})" if info.dataset
         else "not recorded"),
        *([("epochs", f"{tc.get('epochs_done', '?')} of {tc.get('epochs', '?')}")] if tc else []),
        ("weights", info.weights_sha256),
        ("kit version", info.kit_version),
        ("created", info.created),
    ]
    for k, v in rows:
        click.echo(f"{k:<14}{v}")


@models.command("import")
@click.argument("source", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--arch", "arch", default=None, metavar="ARCH",
              help="For weights: the architecture, a zoo name (otkit models list), path/to/file.py:Factory (imported: "
                   "its code runs), timm:NAME or torchvision:NAME (optional packages; no weights downloaded).")
@click.option("--dataset", "dataset", default=None, metavar="SPEC",
              help="The dataset the model was trained on: recorded with its fingerprint (audits default to it), its "
                   "class names used, and an ONNX twin checked on its test images.")
@twin_import_options
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The kit checkpoint to write (.safetensors).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def models_import(source: Path, arch: str | None, dataset: str | None, out: Path, overwrite: bool, as_json: bool,
                  twin_options: Any = None) -> None:
    """Make a kit checkpoint of a model trained elsewhere (docs/byom.md).

    SOURCE is weights (.pt/.pth/.bin/.ckpt read with torch.load(weights_only=True), or .safetensors) with --arch, a
    torch.export program (.pt2), or an ONNX file alone (its graph rebuilt as a differentiable torch module and
    checked against ONNX Runtime). Nothing in SOURCE is executed. State what the file does not say: --num-classes or
    --classes, --input-shape, and the input it takes (--input-range, --mean, --std, --input-layout), which is folded
    into the twin so it takes [0, 1] pixels like every kit model.
    """
    from exporters.twins import import_twin
    from kit.checkpoint import save_checkpoint
    from kit.errors import UserError

    if out.suffix != ".safetensors":
        raise UserError(f"--out must end in .safetensors, got {out}")
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists: add --overwrite to replace it")
    twin = import_twin(source, twin_options)
    info = save_checkpoint(twin.model, out, twin.info)
    n_params = sum(t.numel() for t in twin.model.state_dict().values())
    doc = {"path": str(out), "source": info.source, "kind": twin.kind, "arch": info.arch_name, "parameters": n_params,
           "num_classes": info.num_classes, "input_shape": info.input_shape, "input": info.normalization,
           "dataset": info.dataset, "weights_sha256": info.weights_sha256,
           "checkpoint_sha256": info.checkpoint_sha256}
    if as_json:
        emit_json(doc)
    else:
        _print_import(source, twin, info, n_params)
    status(f"wrote {out} ({info.checkpoint_sha256})")


def _print_import(source: Path, twin: Any, info: Any, n_params: int) -> None:
    """The text summary of ``models import``: what was read, and the checkpoint it became."""
    src = info.source
    click.echo(f"imported {source} ({twin.kind}, sha256 {src['sha256'][7:19]}...) as {info.arch_name}")
    if src.get("state_dict"):
        stripped = f", prefixes {', '.join(src['prefixes_stripped'])} removed" if src.get("prefixes_stripped") else ""
        click.echo(f"state dict     {src['state_dict']}{stripped}")
    click.echo(f"parameters     {n_params:,} (tensors incl. buffers)")
    click.echo(f"input          {'x'.join(map(str, info.input_shape))}, {_convention_text(info.normalization)}")
    click.echo(f"classes        {info.num_classes}: {', '.join(info.class_names[:10])}"
               f"{' ...' if info.num_classes > 10 else ''}")
    if twin.parity is not None:
        p = twin.parity
        tol = f" (tolerance {p['tolerance']:.3g})" if p.get("tolerance") is not None else ""
        click.echo(f"vs ONNX Runtime max|dlogit| {p['max_abs_diff']:.3g}{tol}, top-1 agreement "
                   f"{p['top1_agreement']:.4f} on {p['samples']} samples of {p['samples_from']} -> {p['verdict']}")
    if info.dataset:
        click.echo(f"dataset        {info.dataset['spec']} ({info.dataset['fingerprint']})")


def _convention_text(norm: dict[str, Any]) -> str:
    from kit.convention import InputConvention

    folded = InputConvention.from_folded(norm)
    return "pixels in [0, 1]" if folded is None else f"takes {folded} (folded in: the twin takes pixels in [0, 1])"
