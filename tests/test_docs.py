"""docs/cli.md holds the help of every command; this test keeps it in step with the code.

Regenerate with ``MAILKIT_UPDATE_DOCS=1 make pytest PYTEST_ARGS=tests/test_docs.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import click
from click.testing import CliRunner

from mailkit.cli import cli

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    for name in sorted(group.commands):
        command = group.commands[name]
        if isinstance(command, click.Group):
            found += _commands(command, (*path, name))
        else:
            found.append((*path, name))
    return found


def build_cli_reference() -> str:
    runner = CliRunner()
    parts = [
        "# The `mailkit` command\n",
        "Generated from the command's own help by `tests/test_docs.py`; do not edit by hand.\n",
    ]
    for path in _commands(cli):
        result = runner.invoke(cli, [*path, "--help"], prog_name="mailkit", terminal_width=100)
        assert result.exit_code == 0, result.output
        title = " ".join(("mailkit", *path))
        parts.append(f"## {title}\n\n```\n{result.output.rstrip()}\n```\n")
    return "\n".join(parts)


def test_cli_reference_is_current() -> None:
    expected = build_cli_reference()
    if os.environ.get("MAILKIT_UPDATE_DOCS"):
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(expected, encoding="utf-8")
    assert DOC.read_text(encoding="utf-8") == expected, (
        "docs/cli.md is out of date: run MAILKIT_UPDATE_DOCS=1 make pytest "
        "PYTEST_ARGS=tests/test_docs.py"
    )


def test_readme_mentions_every_top_level_command() -> None:
    readme = (DOC.parent.parent / "README.md").read_text(encoding="utf-8")
    for name in cli.commands:
        assert f"mailkit {name}" in readme, f"README does not show `mailkit {name}`"
