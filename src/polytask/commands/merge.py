"""``polytask merge``: combine fine-tuned models of one base into one model (a file or a Hugging Face folder).

``--out`` is a folder unless it ends in ``.safetensors`` (and is not an existing folder): a name
ending in ``/``, an existing folder, or any other name gets a folder ``from_pretrained`` loads.
``--config merge.yml`` reads a mergekit-style config (:mod:`polytask.merging.mergeconfig`) instead
of ``--base``, ``--method``, ``--option`` and the models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("merge")
    def merge_cmd(
        models: Optional[list[Path]] = typer.Argument(None, help="fine-tuned models: .safetensors files, Hugging Face "
                                                                 "folders, peft adapter folders or polytask run directories"),
        base: Optional[Path] = typer.Option(None, help="the pretrained model all of them were fine-tuned from"),
        method: str = typer.Option("task-arithmetic", help="data-free merger (polytask list merger)"),
        option: Optional[list[str]] = typer.Option(None, help="merger option key=value (repeatable), e.g. --option density=0.2"),
        config: Optional[Path] = typer.Option(None, help="mergekit-style YAML (merge_method, base_model, models, parameters, "
                                                         "dtype) instead of --base/--method/--option/MODELS"),
        out: str = typer.Option(..., help="output: NAME.safetensors writes one file; any other name (or a name ending "
                                          "in /) writes a Hugging Face folder; written atomically"),
        max_shard_size: Optional[str] = typer.Option(None, help="folder output: shards of at most this size, e.g. 5GB "
                                                                "(default: the base's shards)"),
        overwrite: bool = typer.Option(False, help="replace an existing output folder"),
        threads: int = typer.Option(1, min=1, help="tensors merged at once, one torch thread each (same output for any value)"),
    ) -> None:
        """Merge fine-tuned models tensor by tensor (TIES, DARE, task arithmetic, ...) without training."""
        from polytask.commands._common import console, parse_options
        from polytask.errors import PolytaskError
        from polytask.merging import merge_files
        from polytask.merging.mergeconfig import load_merge_config

        if config is not None:
            given = [flag for flag, value in (("MODELS", models), ("--base", base), ("--option", option)) if value]
            if given:
                raise PolytaskError(f"--config names the models, base and parameters; drop {', '.join(given)}")
            plan = load_merge_config(config)
            summary = merge_files(plan.merger, plan.base, plan.models, out, out_dtype=plan.out_dtype,
                                  max_shard_size=max_shard_size, overwrite=overwrite, threads=threads,
                                  record={"method": plan.method, "config": plan.config})
        else:
            if base is None or not models:
                raise PolytaskError("pass --base BASE and the fine-tuned MODELS, or --config merge.yml")
            summary = merge_files(method, base, models, out, max_shard_size=max_shard_size, overwrite=overwrite,
                                  threads=threads, **parse_options(option, "--option"))
        console.print(f"merged {summary['models']} models with {summary['method']}: {summary['tensors']} tensors "
                      f"in {summary['seconds']:.2f} s -> {out}", highlight=False)
