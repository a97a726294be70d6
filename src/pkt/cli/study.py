"""``pkt study NAME ARGS``: the post-hoc analyses of finished studies (:mod:`pkt.studies`).

Each analysis keeps its own argument parser (``pkt study NAME --help``), so this module only maps a command
name to its module and hands it the rest of the command line.
"""

from __future__ import annotations

import typer

# command -> (module under pkt.studies, one-line help); modules are imported only when their command runs
COMMANDS = {
    "compare": ("compare_studies", "The same arm in two studies (a study and its control), paired per seed "
                                   "and question."),
    "compare-predictions": ("compare_predictions", "Two code evaluations compared question by question: failures "
                                                   "by kind and output style; digests and tables of them."),
    "compare-records": ("compare_records", "Two evaluation records (or digests) on the items both scored, "
                                           "with McNemar's p."),
    "table": ("results_table", "The short per-task table docs/results.md quotes, from a study's results.json."),
    "gsm8k-first-answer": ("gsm8k_first_answer", "A study's GSM8K outputs scored at their first stated answer "
                                                 "beside the last number."),
    "adapter-update": ("adapter_update", "How far fine-tuning moved the student: ‖ΔW‖/‖W‖ of saved adapters."),
    "representation-depth": ("representation_depth", "Teacher x student representation similarity by student "
                                                     "depth, from an analysis record."),
    "pilot": ("pilot", "The pilot curve: LoRA by training budget, lr chosen on held-out data, the chosen build "
                       "against the student on the test subset (run, --dry-run, --report)."),
    "steps-saved": ("steps_saved", "Held-out loss by optimizer step of laten-lora and lora on the same batches, and "
                                   "the steps each takes to reach LoRA's final held-out loss (run, --dry-run, "
                                   "--report)."),
    "laten-dose": ("laten_dose", "LaTen's dose-response: held-out loss by hypernetwork step, schedule, transfer rate "
                                 "and penalty; the point chosen on held-out data, tested over seeds (run, --dry-run, "
                                 "--report)."),
}

app = typer.Typer(help="Analyses of finished studies, as docs/results.md quotes them (pkt study NAME --help).",
                  no_args_is_help=True)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="study")


def _command(name: str, module: str, help_text: str) -> None:
    def run(ctx: typer.Context) -> None:
        import importlib

        code = importlib.import_module(f"pkt.studies.{module}").main(list(ctx.args), prog=f"pkt study {name}")
        raise typer.Exit(code or 0)

    # --help and every other argument go to the analysis' own parser
    app.command(name, help=help_text, context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
                add_help_option=False)(run)


for _name, (_module, _help) in COMMANDS.items():
    _command(_name, _module, _help)
