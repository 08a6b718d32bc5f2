"""``otkit evaluate``: accuracy-vs-epsilon curves and AUAC of a checkpoint under attack, with validity checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from kit.cli.common import (
    AliasOption,
    ListedOption,
    arch_option,
    attack_names,
    command_device,
    command_seed,
    emit_json,
    option_given,
    seed_option,
    status,
    table,
    twin_import_options,
)


def load_model_and_data(ckpt: Path, spec: str | None, split: str, samples: int, seed: int, device: Any, *,
                        arch: str | None = None, twin_options: Any = None, notice: bool = True):
    """The twin and the evaluation tensors, after checking that they fit each other.

    ``spec`` None: the dataset the checkpoint records (as ``otkit audit`` does). ``arch``: the user's ``--arch`` for a
    file architecture (:func:`kit.checkpoint.load_twin`). The model may be anything ``otkit models import`` takes,
    imported on the fly with ``twin_options`` (:func:`exporters.twins.load_any_twin`)."""
    from exporters.checkpoint import fitting_dataset
    from exporters.twins import TwinOptions, load_any_twin, source_kind
    from kit.errors import UserError

    options = twin_options if twin_options is not None else TwinOptions(arch=arch)
    kind = source_kind(ckpt)
    if kind == "checkpoint":
        twin = load_any_twin(ckpt, device, options, kind=kind)
        spec = twin.info.data_spec(spec, str(ckpt))
        ds = fitting_dataset(spec, split, twin.info.input_shape, twin.info.num_classes, str(ckpt), samples, seed,
                             notice=notice)
        return twin.model, twin.info, ds
    spec = spec or options.dataset
    if not spec:
        raise UserError(f"{ckpt} records no dataset: give --data SPEC")
    from kit.data import load_dataset

    ds = load_dataset(spec, split, seed=0).subset(samples, seed=seed, notice=notice)
    twin = load_any_twin(ckpt, device, options, samples=ds.x, kind=kind)  # the examples evaluated check an ONNX twin
    ds.require_fit(twin.info.input_shape, twin.info.num_classes, str(ckpt))
    return twin.model, twin.info, ds


@click.command()
@click.option("--twin", "--model", "ckpt", cls=AliasOption, required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="The model evaluated: a kit checkpoint, or weights / a .pt2 program / an ONNX file trained "
                   "elsewhere with the flags below (docs/byom.md).")
@click.option("--data", "data_spec", default=None,
              help="Dataset spec (otkit data --help); default: the one the checkpoint was trained on.")
@click.option("--split", type=click.Choice(["test", "train"]), default="test")
@click.option("--attack", "attacks", multiple=True, required=True, metavar="NAME[@EPS_MAX][:KEY=VALUE,...]", cls=ListedOption,
              listed=attack_names, help="Attack, repeatable; NAME@EPS_MAX overrides --eps-max for it, :key=value,... "
              "sets the attack's own parameters (steps, restarts, ...); autoattack / autoattack-l2 run AutoAttack's "
              "four attacks (APGD-CE, APGD-T, FAB-T, Square).")
@click.option("--eps-max", type=float, default=None, help="Largest epsilon of the curves, in [0, 1] pixel units.")
@click.option("--samples", type=click.IntRange(min=1), default=500, help="Test examples evaluated (seeded subset).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256)
@click.option("--rungs", type=click.IntRange(min=1), default=8, help="Ladder radii of the minimum-epsilon search.")
@click.option("--checks/--no-checks", default=True, help="Run the validity checks (docs/checks.md).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for curves.json and curves.png.")
@seed_option
@click.option("--json", "as_json", is_flag=True, help="Print curves.json to stdout instead of a table.")
@arch_option
@twin_import_options
@click.pass_context
def evaluate(ctx: click.Context, ckpt: Path, data_spec: str | None, split: str, attacks: tuple[str, ...],
             eps_max: float | None, samples: int, batch_size: int, rungs: int, checks: bool, out: Path,
             seed: int | None, as_json: bool, arch: str | None = None, twin_options: Any = None) -> None:
    """Accuracy-vs-epsilon curves and AUAC of a checkpoint under attack, with validity checks.

    The AUACs come from attacks: empirical upper bounds on robustness, not certificates.
    """
    import torch

    from evaluators.evaluate import AttackRequest, check_radii, write_outputs
    from evaluators.evaluate import evaluate as run_evaluation

    requests = AttackRequest.parse_all(attacks, eps_max)  # validate everything before any work
    device = command_device(ctx)
    seed = command_seed(ctx, seed)
    model, info, ds = load_model_and_data(ckpt, data_spec, split, samples, seed, device, arch=arch,
                                          twin_options=twin_options, notice=option_given(ctx, "samples"))
    check_radii(requests, info.input_shape)
    data_spec = ds.spec
    torch.manual_seed(seed)
    doc = run_evaluation(model, ds.x.to(device), ds.y.to(device), requests, seed=seed, batch_size=batch_size,
                         rungs=rungs, checks=checks)
    doc = {"schema": doc.pop("schema"),
           "model": {"path": str(ckpt), "weights_sha256": info.weights_sha256, "arch": info.arch_name,
                     "defense": info.defense},
           "data": {"spec": data_spec, "split": split, "fingerprint": ds.fingerprint, "n": len(ds)}, **doc}
    json_path, png_path = write_outputs(doc, out, title=f"{info.arch_name} ({info.defense}) on {data_spec}")
    if as_json:
        emit_json(doc)
    else:
        _print_curves(doc)
    status(f"wrote {json_path} and {png_path}")


def _print_curves(doc: dict[str, Any]) -> None:
    """The text summary of ``otkit evaluate``: one row per attack and combined threat model, then the checks."""
    rows = [{"attack": r["name"], "norm": r["norm"], "eps_max": f"{r['eps_max']:.4g}",
             "clean": f"{r['accuracy'][0]:.4f}", "AUAC": f"{r['auac']:.4f}",
             "95% CI": f"[{r['auac_ci'][0]:.4f}, {r['auac_ci'][1]:.4f}]",
             "fwd/ex": f"{r['passes']['forward_per_example']:.1f}",
             "bwd/ex": f"{r['passes']['backward_per_example']:.1f}"} for r in doc["attacks"]]
    rows += [{"attack": c["name"], "norm": c["norm"], "eps_max": f"{c['eps_max']:.4g}", "clean": f"{c['accuracy'][0]:.4f}",
              "AUAC": f"{c['auac']:.4f}", "95% CI": f"[{c['auac_ci'][0]:.4f}, {c['auac_ci'][1]:.4f}]"}
             for c in doc["combined"]]
    click.echo(table(rows, ["attack", "norm", "eps_max", "clean", "AUAC", "95% CI", "fwd/ex", "bwd/ex"]))
    click.echo("(AUACs from attacks: empirical upper bounds on robustness, not certificates)")
    if doc["checks"]:
        click.echo("\nchecks (see docs/checks.md):")
        for f in doc["checks"]:
            click.echo(f"  [{f['severity']}] {f['id']} ({f['attack'] or 'model'}): {f['message']}")
    else:
        click.echo("\nchecks: none raised")
