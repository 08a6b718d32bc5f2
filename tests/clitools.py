"""Helpers for tests that drive the ``otkit`` command line through click's test runner."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from kit.cli import cli


def run(*args: object) -> Result:
    """``otkit ARGS...`` in-process (exceptions that are not exit statuses propagate, with their traceback)."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_user_error(result: Result, *needles: str, code: int = 2) -> str:
    """Exit status ``code``, exactly one line on stderr starting with 'Error:' and holding every needle, nothing on
    stdout, no traceback and no third-party warning anywhere; returns that line."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output and "Warning" not in result.stderr and result.stdout == ""
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def verify_without_flag(out: Path, flag_id: str, dest: Path, engine: object, twin: object) -> Result:
    """``otkit verify`` of a copy of the audit folder ``out`` (at ``dest``) whose report was edited to drop the flag
    ``flag_id`` and re-derived to pass: the forgery of a flag that follows from the files alone."""
    import json
    import shutil

    from evaluators.recompute import rederive

    shutil.copytree(out, dest)
    doc = json.loads((out / "report.json").read_text())
    doc["checks"] = [c for c in doc["checks"] if c["id"] != flag_id]
    again = rederive(doc)
    doc.update(verdict=again["verdict"], status=again["status"], gates=again["gates"])
    (dest / "report.json").write_text(json.dumps(doc))
    return CliRunner().invoke(cli, ["-q", "verify", str(dest), "--engine", str(engine), "--twin", str(twin),
                                    "--waive", "adversarials"])
