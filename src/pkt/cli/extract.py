"""``pkt extract sensitivity``: Seeking's teacher-parameter extraction (sensitivity → layers → blocks → SVD).

Writes ``factors.safetensors`` + ``manifest.json`` into ``--out`` (atomically). Settings: defaults <
``--config`` YAML (section ``extract``) < flags.
"""

from __future__ import annotations

import typer

app = typer.Typer(help="Extract task-specific teacher parameters.", no_args_is_help=True)


@app.command("sensitivity")
def sensitivity(
    teacher: str = typer.Option(..., help="Teacher: embedded name, local HF directory or hub id."),
    student: str = typer.Option(..., help="Student (only its architecture is read here)."),
    task: str = typer.Option(..., help="Task whose seed split drives the sensitivity (gsm8k, mmlu, ...)."),
    out: str = typer.Option(..., help="Output directory (factors.safetensors, manifest.json)."),
    config: str = typer.Option(None, "--config", help="YAML settings file (section 'extract')."),
    split: str = typer.Option(None, help="Seed split [extract]."),
    n_samples: int = typer.Option(None, help="Number of seed samples [32]."),
    rank: int = typer.Option(None, help="SVD rank r [16]."),
    structure: str = typer.Option(None, help="Block structure: submatrix | rowcol | neuron | random [submatrix]."),
    layers: str = typer.Option(None, help="Layer selection: score | random | first | last [score]."),
    targets: str = typer.Option(None, help="Module kinds, comma-separated [q,k,v,o,gate,up,down]; "
                                           "embed/lm_head need identical vocabularies."),
    style: str = typer.Option(None, help="Prompt style: chat | tulu [chat]."),
    train_on_inputs: bool = typer.Option(None, "--train-on-inputs/--response-only",
                                         help="Score the prompt tokens too [response only]."),
    max_length: int = typer.Option(None, help="Token cutoff per sample [1024]."),
    dtype: str = typer.Option(None, help="Teacher weight dtype: float32 | bfloat16 | float16 [float32]."),
    device: str = typer.Option(None, help="Teacher device: cpu | cuda | cuda:N | auto [cpu]."),
    accum_device: str = typer.Option(None, help="Where the fp32 accumulators live [beside the weights]."),
    seed: int = typer.Option(None, help="Seed for the random strategies [0]."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Sensitivity-based extraction (Seeking): |θ·∂L/∂θ| on seed samples → top layers → blocks → rank-r factors."""
    from pkt.config import load_config
    from pkt.postpkt import SeekingConfig, run_extraction

    cfg = load_config(
        SeekingConfig, config, section="extract", split=split, n_samples=n_samples, rank=rank, structure=structure,
        layers=layers, targets=targets.split(",") if targets else None, style=style, train_on_inputs=train_on_inputs,
        max_length=max_length, dtype=dtype, device=device, accum_device=accum_device, seed=seed,
    )
    m = run_extraction(teacher, student, task, cfg, out, progress=not quiet, log=lambda s: typer.echo(s, err=True))
    gib = 2**30
    typer.echo(
        f"{out}: {len(m['blocks'])} blocks from teacher layers {m['teacher_layers']}\n"
        f"seconds {m['seconds']}; teacher weights {m['teacher_weight_bytes'] / gib:.2f} GiB, "
        f"peak RSS {m['peak_rss_bytes'] / gib:.2f} GiB ({m['peak_rss_bytes'] / m['teacher_weight_bytes']:.2f}x)"
    )


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="extract")
