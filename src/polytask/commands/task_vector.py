"""``polytask task-vector``: extract, apply, add and compare task vectors τ = θ_ft − θ_0 (see
:mod:`polytask.merging.vectors`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

tv_app = typer.Typer(no_args_is_help=True, help="Task vectors τ = θ_ft − θ_0: extract, apply (negative scale "
                                                "forgets), add, and compare (norms, cosine similarities).")

SCALE_HELP = "scale of each task vector (repeat once per vector, or give one for all); negative forgets"


@tv_app.command("extract")
def extract_cmd(
    finetuned: Path = typer.Argument(..., help="fine-tuned model: .safetensors, Hugging Face folder, peft adapter "
                                               "folder or polytask run"),
    base: Path = typer.Option(..., help="the model it was fine-tuned from"),
    out: Path = typer.Option(..., help="the task vector, NAME.safetensors (written atomically)"),
) -> None:
    """Write the task vector of a fine-tuned model: τ = θ_ft − θ_0 of every floating-point tensor."""
    from polytask.commands._common import console
    from polytask.merging.vectors import extract_task_vector

    s = extract_task_vector(base, finetuned, out)
    console.print(f"wrote {s['out']}: {s['tensors']} tensors, {s['parameters']:,} entries", highlight=False)


@tv_app.command("apply")
def apply_cmd(
    vectors: list[Path] = typer.Argument(..., help="task-vector files"),
    base: Path = typer.Option(..., help="the model the vectors were extracted from"),
    out: str = typer.Option(..., help="NAME.safetensors writes one file; any other name a Hugging Face folder"),
    scale: Optional[list[float]] = typer.Option(None, help=SCALE_HELP),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
) -> None:
    """Write θ_0 + Σ s_i τ_i (a negative scale removes what a task taught)."""
    from polytask.commands._common import console
    from polytask.merging.vectors import apply_task_vectors

    s = apply_task_vectors(base, vectors, out, scale, overwrite=overwrite)
    console.print(f"applied {s['models']} task vectors to the base: {s['tensors']} tensors -> {out}", highlight=False)


@tv_app.command("add")
def add_cmd(
    vectors: list[Path] = typer.Argument(..., help="task-vector files"),
    out: Path = typer.Option(..., help="the sum, NAME.safetensors"),
    scale: Optional[list[float]] = typer.Option(None, help=SCALE_HELP),
) -> None:
    """Write Σ s_i τ_i as one task vector."""
    from polytask.commands._common import console
    from polytask.merging.vectors import add_task_vectors

    s = add_task_vectors(vectors, out, scale)
    console.print(f"wrote {s['out']}: the sum of {len(vectors)} task vectors", highlight=False)


@tv_app.command("stats")
def stats_cmd(
    inputs: list[Path] = typer.Argument(..., help="task-vector files, or fine-tuned models with --base"),
    base: Optional[Path] = typer.Option(None, help="compare the task vectors of fine-tuned models against this base"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write norms and cosines to this JSON file"),
) -> None:
    """Print each task vector's L2 norm and the pairwise cosine similarities."""
    from rich.markup import escape
    from rich.table import Table

    from polytask.commands._common import console
    from polytask.io import write_json
    from polytask.merging.vectors import task_vector_stats, vectors_of

    stats = task_vector_stats(vectors_of(inputs, base))
    table = Table(title="task vectors: L2 norm and cosine similarity")
    table.add_column("task vector")
    table.add_column("norm", justify="right")
    for i in range(len(stats["labels"])):
        table.add_column(str(i + 1), justify="right")
    for i, (label, norm, row) in enumerate(zip(stats["labels"], stats["norms"], stats["cosine"])):
        table.add_row(f"{i + 1} {escape(label)}", f"{norm:.4g}", *[f"{c:+.3f}" for c in row])
    console.print(table)
    if json_out is not None:
        write_json(json_out, stats)


def register(app: typer.Typer) -> None:
    app.add_typer(tv_app, name="task-vector")
