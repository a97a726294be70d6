"""``pkt data tasks | validate FILE | show TASK SPLIT``."""

from __future__ import annotations

import typer

app = typer.Typer(help="PKT splits and benchmark data: list tasks, validate files, show examples.",
                  no_args_is_help=True)


@app.command()
def tasks() -> None:
    """List the registered tasks."""
    from pkt.data.tasks import TASKS

    for t in TASKS.values():
        typer.echo(f"{t.name:10s} {t.description} (splits: pkt_splits/{t.split_dir}/; hub: {t.hub_id})")


@app.command()
def validate(paths: list[str] = typer.Argument(..., help="Chat-messages JSONL files."),
             conversations: bool = typer.Option(False, "--conversations", help="Check training data for --data "
                                                "(system turn, multi-turn) instead of the two-turn PKT-split format.")
             ) -> None:
    """Check that files are valid chat-messages JSONL (errors name file and line)."""
    from pkt.data.jsonl import read_chat_jsonl

    for p in paths:
        if conversations:
            from pkt.data.chat import read_conversations

            typer.echo(f"{p}: {len(read_conversations(p))} conversations OK")
        else:
            typer.echo(f"{p}: {len(read_chat_jsonl(p))} examples OK")


@app.command()
def show(task: str, split: str = typer.Argument("extract", help="extract | align | train"),
         n: int = typer.Option(1, help="How many examples."),
         model: str = typer.Option(None, help="Render with this model's tokenizer (chat style) and count tokens."),
         style: str = typer.Option("chat", help="Prompt style: chat | tulu.")) -> None:
    """Print examples of a PKT split, optionally rendered and tokenised for a model."""
    from pkt.data.tasks import load_split

    rows = load_split(task, split)
    typer.echo(f"{task}/{split}: {len(rows)} examples")
    tok = None
    if model:
        from pkt.models.load import load_tokenizer

        tok = load_tokenizer(model)
    for ex in rows[:n]:
        if tok is None:
            typer.echo(f"--- user ---\n{ex.user}\n--- assistant ---\n{ex.assistant}")
        else:
            from pkt.data.chat import render, tokenize_example

            prompt, response = render(ex, tok, style)
            feats = tokenize_example(ex, tok, style)
            n_resp = sum(1 for x in feats["labels"] if x != -100)
            typer.echo(f"--- prompt ---\n{prompt}--- response ---\n{response}\n--- {len(feats['input_ids'])} tokens, "
                       f"{n_resp} labelled ---")


@app.command()
def prepare(out: str = typer.Option(None, help="Data directory to write [$PKT_HOME/data]."),
            force: bool = typer.Option(False, help="Replace an existing directory not written by this command.")) -> None:
    """Download the data directory once (PKT splits, GSM8K, MMLU, MBPP) with sha256 checks; then run offline."""
    from pathlib import Path

    from pkt.data.prepare import prepare as run_prepare
    from pkt.settings import pkt_home

    root = Path(out) if out else pkt_home() / "data"
    digests = run_prepare(root, force=force, log=lambda m: typer.echo(m, err=True))
    typer.echo(f"{root}: {len(digests)} files, sha256 recorded in SHA256SUMS; use it with PKT_DATA_DIR={root}")


@app.command()
def verify(path: str = typer.Argument(..., help="A directory written by `pkt data prepare`.")) -> None:
    """Check a prepared data directory against its SHA256SUMS (offline)."""
    from pkt.data.prepare import verify as run_verify

    typer.echo(f"{path}: {len(run_verify(path))} files OK")
