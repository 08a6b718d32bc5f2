"""Helpers for tests that drive the ``otkit`` command line through click's test runner."""

from __future__ import annotations

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
