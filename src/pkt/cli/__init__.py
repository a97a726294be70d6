"""The ``pkt`` command: a thin layer that parses, validates and calls the library.

Each command group lives in its own module and registers a Typer sub-app here. Any
:class:`pkt.errors.PktError` becomes one line on stderr and exit status 2 (no traceback).

Settings come from defaults < a YAML file (``--config``) < flags. Commands with a settings class read the
file through :func:`pkt.config.load_config`; the others take :func:`config_option`, which hands the file's
section to click as the command's ``default_map``, so a value from the file is converted and checked exactly
as the same flag would be, and a flag given on the command line still wins.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from pkt.errors import PktError

app = typer.Typer(
    help="Cross-scale parametric knowledge transfer between LLMs (PostPKT, PrePKT, baselines, eval, analysis).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def config_option(section: str):
    """A ``--config FILE`` option: the YAML file's ``section`` sets any of the command's options by name
    (``batch_size`` or ``batch-size``); options given on the command line override it."""

    def load(ctx: typer.Context, value: Path | None) -> Path | None:
        if value is None or ctx.resilient_parsing:
            return value
        from pkt.config import read_yaml

        data = read_yaml(value)
        if section not in data:
            raise PktError(f"{value}: no '{section}:' section (the settings of this command)")
        found = data[section] or {}
        if not isinstance(found, dict):
            raise PktError(f"{value}: '{section}:' must be a mapping of settings")
        params = {p.name: p for p in ctx.command.params if p.name != "config"}
        defaults = {}
        for key, v in found.items():
            name = str(key).replace("-", "_")
            if name not in params:
                raise PktError(f"{value}: {section}.{key}: unknown setting (expected one of {', '.join(params)})")
            # a repeatable option given one value in YAML is a one-item list, not a string's characters
            v = [v] if getattr(params[name], "multiple", False) and isinstance(v, str) else v
            try:  # checked here, so that the error names the file and the key rather than the flag
                params[name].process_value(ctx, v)
            except typer.BadParameter as e:
                raise PktError(f"{value}: {section}.{key}: {e.message}") from None
            defaults[name] = v
        ctx.default_map = {**(ctx.default_map or {}), **defaults}
        return value

    return typer.Option(None, "--config", is_eager=True, callback=load,
                        help=f"YAML file whose '{section}:' section sets any of these options by name "
                             "(flags given here override it).")


def _register() -> None:
    # Imported here so `pkt --help` stays fast and each group stays in its own file.
    from pkt.cli import data, models

    app.add_typer(models.app, name="models")
    app.add_typer(data.app, name="data")
    for mod in ("extract", "postpkt", "kd", "laten", "evaluate", "analyze", "run", "report", "study"):
        try:
            module = __import__(f"pkt.cli.{mod}", fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != f"pkt.cli.{mod}":
                raise
            continue
        module.register(app)


def main() -> None:
    _register()
    try:
        app()
    except PktError as e:
        print(f"pkt: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("pkt: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
