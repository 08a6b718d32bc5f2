"""``otkit data``: the datasets the kit reads, and ``otkit data inspect SPEC``."""

from __future__ import annotations

import click

from kit.cli.common import command_seed, emit_json, seed_option, table


@click.group()
def data() -> None:
    """Datasets: digits (embedded), mnist:DIR, fashion-mnist:DIR, cifar10:DIR, cifar100:DIR, npz:FILE, folder:DIR."""


@data.command("inspect")
@click.argument("spec")
@seed_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def data_inspect(ctx: click.Context, spec: str, seed: int | None, as_json: bool) -> None:
    """Size, shape, classes and fingerprint of each split of SPEC."""
    from kit.data import load_dataset

    rows = []
    for split in ("train", "test"):
        ds = load_dataset(spec, split, seed=command_seed(ctx, seed))
        rows.append({
            "split": split, "n": len(ds), "shape": "x".join(map(str, ds.input_shape)), "classes": ds.num_classes,
            "fingerprint": ds.fingerprint, "class_names": list(ds.class_names),
        })
    if as_json:
        emit_json({"spec": spec, "splits": rows})
        return
    click.echo(table(rows, ["split", "n", "shape", "classes", "fingerprint"]))
    names = rows[0]["class_names"]
    click.echo(f"class names: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")
