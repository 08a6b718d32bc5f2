"""``otkit models``: the model zoo (``models list``) and what a checkpoint holds (``models show``)."""

from __future__ import annotations

from pathlib import Path

import click

from kit.cli.common import emit_json, table


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
        ("defense", info.defense),
        ("dataset", f"{info.dataset.get('spec')} ({info.dataset.get('fingerprint')})"),
        ("epochs", f"{tc.get('epochs_done', '?')} of {tc.get('epochs', '?')}"),
        ("weights", info.weights_sha256),
        ("kit version", info.kit_version),
        ("created", info.created),
    ]
    for k, v in rows:
        click.echo(f"{k:<14}{v}")
