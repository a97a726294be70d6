"""``pkt report DIR``: a study's results.{md,csv,json}, figures and report.html rebuilt from its records alone.

DIR is a records directory (``study.json`` + ``stages/*.json``: ``records:`` of a study config, committed as the
stages finish) or a ``pkt run`` output directory. Nothing is trained, evaluated or loaded: a study run on one
machine is reported on any other (:mod:`pkt.experiment.records`).
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        src: Path = typer.Argument(..., metavar="DIR", help="Records directory (study.json + stages/*.json) or a "
                                                            "pkt run output directory."),
        out: Path = typer.Option(None, "--out", "-o", help="Where the results and report go (default: DIR)."),
    ) -> None:
        """Rebuild results.md/csv/json, the figures and report.html from a study's stage records.

        results.md is a function of the records alone (no timestamps, no paths), so the same records give the
        same bytes on any machine.
        """
        from pkt.experiment.records import rebuild
        from pkt.io import check_output_dir

        out_dir = out or src
        if src.is_dir():
            check_output_dir(out_dir)
        result = rebuild(src, out_dir)
        typer.echo((out_dir / "results.md").read_text(encoding="utf-8"), nl=False)
        typer.echo(f"report: {out_dir / 'report.html'} ({len(result['rows'])} rows, {len(result['files'])} files)")
