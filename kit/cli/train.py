"""``otkit train``: train a (defended) network, a checkpoint every epoch, resumable (docs/train.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from kit.cli.common import DEFENSE_NAMES, LazyChoice, command_device, emit_json, set_interrupt_hint
from kit.errors import UserError


def parse_params(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``("eps=0.1", "norm=linf")`` -> ``{"eps": 0.1, "norm": "linf"}``: each value is read as JSON, else kept as text."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"expected KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _defense_names() -> list[str]:
    from kit.defenses import list_defenses

    return list_defenses()


#: ``train`` options that set a TrainConfig field of the same meaning: click parameter name -> field name.
_TRAIN_FIELDS = {"defense": "defense", "arch": "arch", "data_spec": "data", "epochs": "epochs",
                 "batch_size": "batch_size", "optimizer": "optimizer", "lr": "lr", "momentum": "momentum",
                 "weight_decay": "weight_decay", "schedule": "schedule", "eval_samples": "eval_samples",
                 "eval_adv_samples": "eval_adv_samples", "augment": "augment", "amp": "amp"}


def _given(ctx: click.Context | None, name: str) -> bool:
    """Whether option ``name`` of ``ctx`` was set by the user (command line or environment), not by its default."""
    from click.core import ParameterSource

    if ctx is None:
        return False
    return ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)


def _train_config(ctx: click.Context, values: dict[str, Any], config: Path | None,
                  params: tuple[str, ...]):  # noqa: ANN202  (TrainConfig is imported lazily)
    """The run's TrainConfig: options given on the command line, else the ``--config`` file's ``[train]`` table, else
    the defaults. ``--param`` pairs override the file's ``[train.defense_params]`` key by key; the training seed is
    ``train --seed``, else the global ``--seed`` if given, else the file's ``seed``, else the global default."""
    from kit.defenses.trainer import TrainConfig, load_train_config

    resolved = load_train_config(config) if config is not None else {}
    for name, fld in _TRAIN_FIELDS.items():
        if _given(ctx, name):
            resolved[fld] = values[name]
    resolved["defense_params"] = {**resolved.get("defense_params", {}), **parse_params(params)}
    if values["seed"] is not None:
        resolved["seed"] = values["seed"]
    elif _given(ctx.parent, "seed") or "seed" not in resolved:
        resolved["seed"] = ctx.obj["seed"]
    return TrainConfig.from_dict(resolved, "train options")


@click.command()
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TOML file whose [train] table sets any training option (docs/train.md); options given here win.")
@click.option("--defense", default="standard", type=LazyChoice(_defense_names, shown=DEFENSE_NAMES),
              help="Training objective.")
@click.option("--arch", default="cnn-small", help="Zoo name (otkit models list) or path/to/file.py:ClassOrFactory.")
@click.option("--data", "data_spec", default="digits", help="Dataset spec (otkit data --help).")
@click.option("--epochs", type=click.IntRange(min=1), default=10)
@click.option("--batch-size", type=click.IntRange(min=1), default=64)
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd")
@click.option("--lr", type=float, default=0.05, help="Peak learning rate.")
@click.option("--momentum", type=float, default=0.9, help="SGD momentum.")
@click.option("--weight-decay", type=float, default=5e-4)
@click.option("--schedule", type=click.Choice(["constant", "multistep", "cosine"]), default="cosine")
@click.option("--augment", type=click.Choice(["auto", "none", "crop-flip"]), default="auto",
              help="Random crop + horizontal flip; auto: crop-flip for 3-channel images, none for greyscale.")
@click.option("--amp/--no-amp", default=False, help="Mixed precision (CUDA only; on a CPU: a warning, float32).")
@click.option("--eval-samples", type=click.IntRange(min=1), default=1000,
              help="Held-out test examples scored each epoch.")
@click.option("--eval-adv-samples", type=click.IntRange(min=0), default=128,
              help="Of those, how many are attacked each epoch with the defense's adversary (0: none).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Defense parameter, repeatable (e.g. --param eps=0.1); VALUE is read as JSON, else as text.")
@click.option("--seed", type=int, default=None, show_default="0", help="Seed for every random choice of training.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a line of text.")
@click.option("--resume", is_flag=True, help="Continue from OUT's .resume.pt state (raise --epochs to train longer).")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT (without --resume or --overwrite, an existing "
              "OUT is an error).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Checkpoint (.safetensors).")
@click.pass_context
def train(ctx: click.Context, config: Path | None, params: tuple[str, ...], resume: bool, overwrite: bool, out: Path,
          as_json: bool, **values: Any) -> None:
    """Train a (defended) network and write a checkpoint every epoch."""
    from kit.defenses.trainer import sidecar
    from kit.defenses.trainer import train as run_training

    cfg = _train_config(ctx, values, config, params)
    quiet = ctx.obj["quiet"]
    resume_state = sidecar(out, "resume.pt")
    set_interrupt_hint(lambda: f"every finished epoch is saved in {out}: add --resume to the same command to continue"
                       if resume_state.exists() else None)

    def on_epoch(rec: dict[str, Any]) -> None:
        if not quiet:
            adv = f"  adv acc {rec['test_adv_acc']:.4f} (first {rec['test_adv_n']})" if "test_adv_acc" in rec else ""
            click.echo(f"epoch {rec['epoch']:>3}/{cfg.epochs}  loss {rec['loss']:.4f}  "
                       f"held-out acc {rec['test_acc']:.4f}{adv}  {rec['seconds']:.1f}s", err=True)

    result = run_training(cfg, out, device=command_device(ctx), resume=resume, overwrite=overwrite, on_epoch=on_epoch)
    doc = {"checkpoint": str(result.path), "weights_sha256": result.info.weights_sha256,
           "epochs": len(result.history) and result.history[-1]["epoch"],
           "test_acc": result.final.get("test_acc"), "test_adv_acc": result.final.get("test_adv_acc")}
    if as_json:
        emit_json(doc)
        return
    adv = "" if doc["test_adv_acc"] is None else f", held-out adversarial accuracy {doc['test_adv_acc']:.4f}"
    acc = "n/a" if doc["test_acc"] is None else f"{doc['test_acc']:.4f}"
    click.echo(f"{doc['checkpoint']}: {doc['epochs']} epochs, held-out accuracy {acc}{adv}, "
               f"weights {doc['weights_sha256']}")
