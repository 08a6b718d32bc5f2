"""The README's CLI tour is run, line by line, so the docs cannot drift from the code."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from click.testing import CliRunner

from kit.cli import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[list[str]]:
    text = README.read_text()
    block = re.search(r"<!-- readme-commands.*?-->\s*```sh\n(.*?)```", text, re.S)
    assert block, "README.md lost its readme-commands block"
    cmds = [shlex.split(line.split("#")[0]) for line in block.group(1).splitlines() if line.strip()]
    assert all(c[0] == "otkit" for c in cmds)
    return [c[1:] for c in cmds]


def test_readme_opens_with_the_two_commands():
    first_block = re.search(r"```sh\n(.*?)```", README.read_text(), re.S).group(1)
    assert [line.split()[:2] for line in first_block.splitlines()] == [["make", "demo"], ["make", "test"]]


def test_readme_commands_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    commands = readme_commands()
    assert len(commands) >= 6
    for args in commands:
        result = runner.invoke(cli, ["--quiet", *args], catch_exceptions=False)
        assert result.exit_code == 0, f"otkit {' '.join(args)}\n{result.output}"
    assert (tmp_path / "m.safetensors").exists()
