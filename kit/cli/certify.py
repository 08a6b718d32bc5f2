"""``otkit certify``: certify a deployed engine by randomized smoothing (docs/certify.md).

A plain click command; ``kit.cli`` adds it to the ``otkit`` group.
"""

from __future__ import annotations

import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import Any

import click

from kit.cli.common import (
    CI,
    PROVIDERS,
    ListedOption,
    arch_option,
    ci_options,
    command_device,
    command_seed,
    command_world,
    dependency_versions,
    emit_json,
    engine_input_option,
    flag_ids,
    lead_lock,
    publish_ci,
    seed_option,
    set_interrupt_hint,
    sign_key_option,
    status,
    table,
    twin_import_options,
)

CERTIFY_EXIT = """\b
Exit statuses:
  0  certified: every gate holds and no error flag was raised
  1  fail: a --min-certified-auac gate failed, or an error flag (an attack beat a
     certified radius: certificate-violated; randomised engine outputs)
  2  usage or input error, --out in use by another run, or a refused write; no
     certificate is written and nothing on disk changes
  130 interrupted (Ctrl-C): finished batches are kept, --resume continues"""


class SmoothingKind(str, Enum):
    GAUSSIAN = "gaussian"
    WASSERSTEIN = "wasserstein"


def print_certificate(doc: dict[str, Any]) -> None:
    """The certificate's one-screen summary on stdout."""
    sm, c, e, d = doc["smoothing"], doc["certified"], doc["engine"], doc["data"]
    click.echo(f"engine {e['path']} [{e['format']}, {e['precision']}] on {d['n']} examples of {d['spec']}: "
               f"{sm['kind']} smoothing, sigma {sm['sigma']:g}, n0 {sm['n0']}, n {sm['n']}, alpha {sm['alpha']:g}")
    click.echo(f"smoothed accuracy {c['smoothed_accuracy']:.4f} and abstentions {c['abstain_rate']:.4f} on these examples "
               f"(CERTIFY's predictions, each right with probability at least {1 - sm['alpha']:g}); the largest radius "
               f"n = {sm['n']} samples can certify is {sm['max_radius']:.4g}\n")
    from evaluators.render import certificate_rows

    rows = certificate_rows(doc)
    click.echo(table(rows, list(rows[0])))
    a = doc.get("attack")
    click.echo(f"\ncertified AUAC {c['auac']:.4f} up to radius {c['r_max']:.4g}: a certified lower bound, each radius "
               f"at confidence {1 - sm['alpha']:g}")
    if a:
        click.echo(f"attack AUAC {a['auac']:.4f} ({a['name']} on the smoothed engine): an empirical upper bound from "
                   "attacks")
    for g in doc["gates"]:
        click.echo(f"gate: certified AUAC {g['certified_auac']:.4f} >= {g['min_certified_auac']:g}: "
                   f"{'passed' if g['passed'] else 'FAILED'}")
    if doc["checks"]:
        click.echo("\nchecks (see docs/checks.md):")
        for f in doc["checks"]:
            click.echo(f"  [{f['severity']}] {f['id']} ({f['attack'] or 'model'}): {f['message']}")
    click.echo(f"\nstatus: {doc['status']}")


@click.command(epilog=CERTIFY_EXIT)
@click.option("--engine", "engine_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The deployed artifact: .onnx (fp32/fp16/int8) or a TensorRT .engine (or a checkpoint).")
@click.option("--twin", "twin_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="The PyTorch model the engine was exported from (optional): its gradients drive the attack on the "
                   "smoothed engine, whose curve is shown beside the certificate; it also names the dataset.")
@click.option("--data", "data_spec", default=None, help="Dataset spec (default: the twin's; required without --twin).")
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--smoothing", type=click.Choice([k.value for k in SmoothingKind]), default="gaussian",
              show_default=True, help="gaussian: L2 radii; wasserstein: Laplace noise on pixel flows, Wasserstein "
              "radii in the kit's unit-mass units.")
@click.option("--sigma", type=float, required=True, help="Noise level (standard deviation of the noise).")
@click.option("--n0", type=click.IntRange(min=1), default=100, show_default=True,
              help="Noise samples that choose the class.")
@click.option("--n", "--noise-samples", "n", type=click.IntRange(min=1), default=None,
              show_default="100000 on CUDA, 10000 on CPU",
              help="Noise samples that certify it (--noise-samples under torchrun, whose parser takes --n).")
@click.option("--alpha", type=float, default=0.001, show_default=True,
              help="Each radius is wrong with probability at most alpha.")
@click.option("--samples", type=click.IntRange(min=1), default=100, show_default=True,
              help="Examples certified (seeded subset).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Examples per resumable batch.")
@click.option("--noise-batch", type=click.IntRange(min=1), default=None, show_default="the engine's max batch",
              help="Noisy copies per engine call.")
@click.option("--r-max", type=float, default=None, show_default="the largest radius --n can certify",
              help="Largest radius of the certified curve and its AUAC.")
@click.option("--min-certified-auac", type=float, default=None, metavar="VALUE",
              help="Release gate: fail when the certified AUAC is below VALUE.")
@click.option("--attack/--no-attack", "attack", default=True, show_default=True,
              help="With --twin, attack the smoothed engine (SmoothAdv, twin's gradients over noise, judged by the "
                   "engine's smoothed prediction) for the upper-bound curve and the certificate-violated check.")
@click.option("--attack-n", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Noise samples of the smoothed prediction that judges each attack candidate.")
@click.option("--provider", "providers", multiple=True, type=click.Choice(PROVIDERS),
              help="ONNX Runtime provider (repeatable; default: the --device's).")
@click.option("--allow-flag", "allowed_flags", multiple=True, metavar="ID", cls=ListedOption, listed=flag_ids,
              help="Let an error-level flag pass (repeatable; recorded; docs/checks.md).")
@click.option("--resume", is_flag=True, help="Continue an interrupted certificate in --out.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for certificate.json, certificate.md, certificate.html, certified.png.")
@seed_option
@click.option("--json", "as_json", is_flag=True, help="Print certificate.json to stdout instead of the summary.")
@sign_key_option
@ci_options
@arch_option
@engine_input_option
@twin_import_options
@click.pass_context
def certify(ctx: click.Context, engine_path: Path, twin_path: Path | None, data_spec: str | None, split: str,
            smoothing: str, sigma: float, n0: int, n: int | None, alpha: float, samples: int, batch_size: int,
            noise_batch: int | None, r_max: float | None, min_certified_auac: float | None, attack: bool,
            attack_n: int, providers: tuple[str, ...], allowed_flags: tuple[str, ...], resume: bool, out: Path,
            seed: int | None, as_json: bool, sign_key: Any = None, ci: CI = CI.NONE, junit: Path | None = None,
            arch: str | None = None, engine_input: Any = None, twin_options: Any = None) -> None:
    """Certify a deployed engine by randomized smoothing: provable radii, computed on the engine itself.

    The certified accuracy curve and AUAC are lower bounds on the smoothed engine's robustness (each radius holds with
    probability at least 1 - alpha). With --twin, the smoothed engine is also attacked: that curve is an empirical
    upper bound, and the report shows both. docs/certify.md explains the method and every field.
    """
    import torch

    from evaluators.certificate import write_certificate
    from evaluators.certify import CertifyConfig, default_n, finish, load_certify_inputs, run_certify

    seed = command_seed(ctx, seed)
    world = command_world()  # under torchrun: this process's rank (docs/distributed.md)
    device = command_device(ctx)
    cfg = CertifyConfig(smoothing=smoothing, sigma=sigma, n=n if n is not None else default_n(device), n0=n0,
                        alpha=alpha, noise_batch=noise_batch, batch_size=batch_size, seed=seed, r_max=r_max,
                        min_certified_auac=min_certified_auac, allowed_flags=allowed_flags, attack=attack,
                        attack_n=attack_n)
    command = shlex.join(["otkit", *sys.argv[1:]])
    with lead_lock(out, command):
        inputs = load_certify_inputs(engine_path, twin_path, data_spec, split, samples, seed, device, providers,
                                     arch=arch, twin_options=twin_options if twin_path is not None else None,
                                     engine_input=engine_input)
        torch.manual_seed(seed)
        set_interrupt_hint(f"finished batches are kept in {out}: add --resume to the same command to continue")
        doc = run_certify(inputs, cfg, out, resume=resume, versions=dependency_versions(), command=command,
                          world=world)
        if doc is None:  # another process's batches are done: the lead writes the certificate
            return
        paths = write_certificate(doc, out)
        if sign_key is not None:
            from evaluators.attestation import sign_folder

            paths.append(sign_folder(out, sign_key, "certificate"))
        finish(out)
    if as_json:
        emit_json(doc)
    else:
        print_certificate(doc)
    status(f"wrote {', '.join(str(p) for p in paths)}")
    publish_ci(ci, junit, [(f"certificate of {engine_path.name}", doc, (out / "certificate.md").read_text("utf-8"),
                            out)], as_json)
    if doc["status"] != "pass":
        ctx.exit(1)
