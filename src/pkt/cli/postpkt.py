"""``pkt postpkt``: one PostPKT arm (LoRA SFT of the student with a seeking / pissa / lora init).

Settings: defaults (Seeking's paper values) < ``--config`` YAML (sections ``finetune`` and ``extract``)
< flags.
"""

from __future__ import annotations

from typing import Annotated

import typer

from pkt.align.finetune import finetune_config  # noqa: F401  (pkt kd builds its settings the same way)

# The fine-tuning flags, shared with `pkt kd` (same LoRA SFT). None = keep the --config/default value.
R = Annotated[int, typer.Option(help="LoRA rank [16].")]
Alpha = Annotated[float, typer.Option(help="LoRA alpha [16].")]
Targets = Annotated[str, typer.Option(help="Module kinds, comma-separated [q,k,v,o,gate,up,down].")]
Lr = Annotated[float, typer.Option(help="Learning rate [3e-4].")]
Epochs = Annotated[float, typer.Option(help="Epochs [3].")]
BatchSize = Annotated[int, typer.Option(help="Examples per optimizer step [64].")]
MicroBatchSize = Annotated[int, typer.Option(help="Examples per forward pass [4].")]
MaxLength = Annotated[int, typer.Option(help="Token cutoff [2048].")]
NTrain = Annotated[int, typer.Option(help="Use the first N training examples [all].")]
Style = Annotated[str, typer.Option(help="Prompt style: chat | tulu [chat].")]
TrainOnInputs = Annotated[bool, typer.Option("--train-on-inputs/--response-only",
                                             help="Train on prompt tokens too [response only].")]
Dtype = Annotated[str, typer.Option(help="Student dtype [float32].")]
Seed = Annotated[int, typer.Option(help="Seed [1].")]
ReportTo = Annotated[str, typer.Option("--report-to", help="Per-step training log: tensorboard (under --out/logs) | "
                                       "trackio | wandb | mlflow | none [tensorboard].")]
AssistantTurns = Annotated[str, typer.Option(help="Answers of a multi-turn conversation that carry the loss: "
                                             "all | last [all].")]


def postpkt(
    student: str = typer.Option(..., help="Student: embedded name, local HF directory or hub id."),
    task: str = typer.Option(None, help="Task (train split for SFT, extract split for seeking); "
                             "not needed with --data unless seeking extracts."),
    init: str = typer.Option(..., help="LoRA init: seeking | pissa | lora."),
    out: str = typer.Option(..., help="Output directory (adapter/, adapter_init/, merged/, summary.json)."),
    teacher: str = typer.Option(None, help="Teacher (seeking without --factors)."),
    factors: str = typer.Option(None, help="Reuse an extraction directory from `pkt extract sensitivity`."),
    control: str = typer.Option(None, help="Seeking control: random (random orthonormal factors with the "
                                "extracted singular values) | shuffled (extracted factors in deranged layers)."),
    config: str = typer.Option(None, "--config", help="YAML settings file (sections 'finetune', 'extract')."),
    r: R = None,
    alpha: Alpha = None,
    targets: Targets = None,
    lr: Lr = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    micro_batch_size: MicroBatchSize = None,
    max_length: MaxLength = None,
    n_train: NTrain = None,
    style: Style = None,
    train_on_inputs: TrainOnInputs = None,
    dtype: Dtype = None,
    seed: Seed = None,
    report_to: ReportTo = None,
    assistant_turns: AssistantTurns = None,
    data: str = typer.Option(None, help="Training data in place of the task's train split: chat JSONL, or a "
                             "Hugging Face dataset (save_to_disk directory or hub id) with a 'messages' column."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """PostPKT: init the student's LoRA (seeking = extracted teacher blocks; pissa; lora), fine-tune, save."""
    from pkt.dist import dist_state
    from pkt.config import load_config
    from pkt.errors import PktError
    from pkt.postpkt import SeekingConfig, run_postpkt
    from pkt.seeding import seed_everything

    if init not in ("seeking", "pissa", "lora"):
        raise PktError(f"--init {init!r}: expected seeking, pissa or lora")
    if task is None and (data is None or (init == "seeking" and factors is None)):
        raise PktError("--task is required (its train split; seeking also extracts on its extract split), "
                       "unless --data replaces the train split")
    if control is not None and (init != "seeking" or control not in ("random", "shuffled")):
        raise PktError(f"--control {control!r}: expected random or shuffled, with --init seeking")
    ft = finetune_config(config, r=r, alpha=alpha, targets=targets, lr=lr, epochs=epochs, batch_size=batch_size,
                         micro_batch_size=micro_batch_size, max_length=max_length, n_train=n_train, style=style,
                         train_on_inputs=train_on_inputs, dtype=dtype, seed=seed, report_to=report_to,
                         assistant_turns=assistant_turns)
    ex = load_config(SeekingConfig, config, section="extract", style=style, train_on_inputs=train_on_inputs)
    # The lora init's A factors come from torch's global RNG, which starts from a random seed in each process:
    # seed it (as `pkt run` does before each build) so that --seed fixes the run, whatever the process count.
    seed_everything(ft.seed)
    s = run_postpkt(teacher, student, task, init, out, ft, ex, factors_dir=factors, progress=not quiet,
                    log=lambda m: typer.echo(m, err=True), control=control, data=data)
    if not dist_state().is_main_process:  # under `accelerate launch` the other workers write and time nothing
        return
    typer.echo(f"{out}: {s['steps']} steps, final loss {s['final_loss']}, train {s['train_seconds']} s, "
               f"peak RSS {s['peak_rss_bytes'] / 2**30:.2f} GiB")


def register(root: typer.Typer) -> None:
    root.command("postpkt")(postpkt)
