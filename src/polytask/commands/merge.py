"""``polytask merge``: combine fine-tuned models of one base into one safetensors file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("merge")
    def merge_cmd(
        models: list[Path] = typer.Argument(..., help="fine-tuned models: .safetensors files, Hugging Face folders or polytask run directories"),
        base: Path = typer.Option(..., help="the pretrained model all of them were fine-tuned from"),
        method: str = typer.Option("task-arithmetic", help="data-free merger (polytask list merger)"),
        option: Optional[list[str]] = typer.Option(None, help="merger option key=value (repeatable), e.g. --option density=0.2"),
        out: Path = typer.Option(..., help="where to write the merged .safetensors (written atomically)"),
    ) -> None:
        """Merge fine-tuned models tensor by tensor (TIES, DARE, task arithmetic, ...) without training."""
        from polytask.commands._common import console, parse_options
        from polytask.merging import merge_files

        options = parse_options(option, "--option")
        summary = merge_files(method, base, models, out, **options)
        console.print(f"merged {summary['models']} models with {summary['method']}: {summary['tensors']} tensors "
                      f"in {summary['seconds']:.2f} s -> {out}", highlight=False)
