"""The `lightning-tools` command line: parse options, call the library, print. Nothing else lives here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from lightning_tools import __version__
from lightning_tools.errors import UserError


class _Group(click.Group):
    """Turns UserError (and missing files, bad archives) into one line on stderr unless --debug is given."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: no partial output was kept", err=True)
            ctx.exit(130)


def emit(data: Any, as_json: bool, text: str | None = None) -> None:
    """Print `data` as JSON (for pipelines) or `text` (for people)."""
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    elif text is not None:
        click.echo(text)


json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace an existing output.")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lightning-tools")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Fetch, verify, merge, convert, render and publish SDXL-Lightning checkpoints."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


# --- catalog / fetch (hub.py, catalog.py) ---

# --- verify / inspect (verify.py, inspect.py) ---

# --- convert (convert.py) ---

# --- merge (merge.py) ---

# --- render (render.py) ---

# --- run (recipes.py) ---

# --- publish (publish.py) ---

# --- extract (extract.py) ---

# --- demo (demo.py) ---
