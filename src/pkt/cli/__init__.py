"""The ``pkt`` command: a thin layer that parses, validates and calls the library.

Each command group lives in its own module and registers a Typer sub-app here. Any
:class:`pkt.errors.PktError` becomes one line on stderr and exit status 2 (no traceback).
"""

from __future__ import annotations

import sys

import typer

from pkt.errors import PktError

app = typer.Typer(
    help="Cross-scale parametric knowledge transfer between LLMs (PostPKT, PrePKT, baselines, eval, analysis).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    # Imported here so `pkt --help` stays fast and each group stays in its own file.
    from pkt.cli import data, models

    app.add_typer(models.app, name="models")
    app.add_typer(data.app, name="data")
    for mod in ("extract", "postpkt", "kd", "laten", "evaluate", "analyze", "run", "report"):
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
