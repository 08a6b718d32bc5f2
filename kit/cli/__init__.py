"""The ``otkit`` command line: thin wrappers that parse, call library functions and print.

Messages for people go to stderr; results go to stdout (a table, or JSON with ``--json``).

This package holds the root group :data:`cli` (:class:`KitGroup`: one-line errors, exit statuses, Ctrl-C, warnings)
and its global options; each command group lives in its own module (``info``, ``data``, ``models``, ``train``,
``evaluate``, ``engine``, ``audit``, ``report``) as a plain click command, added to :data:`cli` below. What they share
is in :mod:`kit.cli.common`, which imports no command module; no command module imports this package's root.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

import click

from kit.cli import audit, certify, data, engine, evaluate, info, keys, models, report, spec, train
from kit.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_STATUSES,
    current_hint,
    dependency_versions,
    os_error_message,
    set_interrupt_hint,
)
from kit.errors import UserError

__all__ = ["EXIT_INTERRUPTED", "EXIT_STATUSES", "KitGroup", "cli", "dependency_versions", "main", "os_error_message",
           "set_interrupt_hint"]


class _UserFacing(click.ClickException):
    """A UserError as click shows it: ``Error: <one line>`` on stderr, exit status 2."""

    exit_code = 2


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _who() -> str:
    """``(rank N) `` in a process other than the lead of a ``torchrun`` job, so its messages say whose they are."""
    import os

    rank = os.environ.get("RANK", "0")
    return f"(rank {rank}) " if os.environ.get("WORLD_SIZE", "1") not in ("", "1") and rank != "0" else ""


class KitGroup(click.Group):
    """A click group whose every failure is one line on stderr with a documented exit status.

    :class:`kit.UserError` and operating-system errors (a full disk, a read-only folder) from any subcommand become
    ``Error: ...`` and exit status 2; a usage error is one ``Error:`` line too (click's usage banner and "Try --help"
    lines are left out), exit status 2; Ctrl-C is ``Interrupted: ...`` (with how to resume, where the command can)
    and exit status 130. Python warnings from the libraries underneath are silenced unless ``--verbose``.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as e:
            raise _UserFacing(str(e)) from e
        except OSError as e:
            raise _UserFacing(os_error_message(e)) from e

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            with warnings.catch_warnings():  # the root callback's filter lasts for this call only
                return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        set_interrupt_hint(None)
        try:
            with warnings.catch_warnings():  # the root callback's filter lasts for this call only
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            click.echo(f"Error: {_who()}{_one_line(e.format_message())}{hint}", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"Error: {_who()}{_one_line(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        except (click.exceptions.Abort, KeyboardInterrupt):
            hint = current_hint()
            tail = f"; {hint}" if hint else ""
            click.echo(f"Interrupted{tail}" if not _who() else f"Interrupted {_who().strip()}", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=KitGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
             epilog=EXIT_STATUSES)
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=info.print_version,
              help="Show the kit's version and its dependencies' versions, then exit.")
@click.option("--device", default="auto", metavar="auto|cpu|cuda[:N]", help="Where models and attacks run.")
@click.option("--seed", type=int, default=0, hidden=True,
              help="Seed for every random choice (kept for old scripts: each command takes --seed).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or status messages.")
@click.option("--verbose", "-v", is_flag=True, help="Log debugging detail to stderr.")
@click.pass_context
def cli(ctx: click.Context, device: str, seed: int, quiet: bool, verbose: bool) -> None:
    """otkit: robustness certification and deployment for image classifiers.

    Train defended networks, export them, audit deployed engines and issue AUAC robustness reports (AUACs from
    attacks: empirical upper bounds on robustness, not certificates).
    """
    from kit.runtime import check_device_spelling, set_quiet

    set_quiet(quiet)
    if not verbose:  # library warnings (torch, onnx, numpy) would sit beside our one-line messages
        warnings.simplefilter("ignore")
    logging.basicConfig(
        level=logging.DEBUG if verbose else (logging.ERROR if quiet else logging.INFO),
        format="%(message)s",
        stream=sys.stderr,
    )
    check_device_spelling(device)  # spelling only (torch is not imported here): a command that runs no model too
    ctx.obj = {"device": device, "seed": seed, "quiet": quiet}


for _command in (info.info, data.data, models.models, train.train, evaluate.evaluate, engine.export, engine.engine,
                 audit.audit, certify.certify, audit.run, report.report, report.verify, keys.keygen,
                 spec.export_spec):
    cli.add_command(_command)
del _command


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="otkit")
