"""How every command runs: one params option and one error path (exit 2, one line), shared by stages/ and the CLI.

Kept apart from clipprune.cli so a stage imports only this, not the researcher's command line and everything
its commands load (dvc.yaml's deps list what each stage imports).
"""
from __future__ import annotations

import sys

import click

from .errors import ClipPruneError

# Every DVC stage reads its sections from here (dvc.yaml declares which, so DVC knows what each depends on).
params_opt = click.option("--params", "params_path", default="params.yaml", show_default=True, help="The params file.")


def run(command: click.Command, args: list[str] | None = None) -> None:
    """Run a click command on `args` (default: sys.argv): user errors become one line on stderr ("error: ...") and
    exit status 2, never a traceback."""
    try:
        command(args=args, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:  # a bad flag or value: click's message, as one line like ours
        click.echo(f"error: {one_line(e.format_message())}", err=True)
        sys.exit(2)
    except ClipPruneError as e:
        # One line; a list of separate problems (the data prerequisites) raised as one error: one line each.
        lines = [one_line(line) for line in str(e).split("\n") if line.strip()] or [type(e).__name__]
        click.echo("\n".join([f"error: {lines[0]}", *(f"  {line}" for line in lines[1:])]), err=True)
        sys.exit(2)


def one_line(message: str) -> str:
    return " ".join(message.split())
