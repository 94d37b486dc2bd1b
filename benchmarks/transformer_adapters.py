"""Task-specific parts inside a pretrained transformer, and one text-to-text model on instructions.

Part 1, ``wordnet`` definitions of six topics (noun.animal, noun.plant, noun.food, verb.motion,
verb.communication, verb.consumption; tasks part of speech, 2 classes, and topic, 6 classes) with
all-MiniLM-L6-v2 (ships offline): single-task full fine-tuning (one MiniLM per task) vs one fully
fine-tuned MiniLM shared by both tasks vs one shared LoRA adapter (``shared-bottom`` on ``minilm``
with ``finetune="lora"``) vs one LoRA adapter per task (``task-lora``) vs per-task prompt tuning
(``task-prompt``). Every row has one linear head per task on the mean-pooled states.

Part 2, ``wordnet-instruct`` (define, hypernym, antonym, reverse; MiniLM's WordPiece vocabulary)
with a tiny T5 built from ``T5Config`` (random initialisation, ``seq2seq-lm``): one model per
instruction task vs one model trained on all four; evaluation by greedy generation.

Per row: trainable parameters, the median time of one training step (forward, backward, Adam) on
a fixed batch, measured in interleaved rounds so every row sees the same machine load (single-task:
the sum over its per-task models), test metrics and Δm (in %, vs the single-task row). One thread.

    python benchmarks/transformer_adapters.py            # ~7 min on a lightly loaded 2-core machine
    python benchmarks/transformer_adapters.py --quick    # smaller subsets, fewer epochs: ~2.5 min
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from _common import markdown_table, setup, write_results
from polytask import TrainConfig, Trainer
from polytask.metrics import delta_m, masked_task_losses
from polytask.registry import ARCHITECTURES, SUITES
from polytask.tasks import TaskSuite
from polytask.trainer import evaluate_model

FULL = {"backbone": "minilm", "backbone_options": {"finetune": "full", "cache": False}, "bottom": (), "tower": ()}
# label -> (architecture, options, learning rate)
TEXT_ROWS: dict[str, tuple[str, dict[str, Any], float]] = {
    "single-task full FT": ("shared-bottom", FULL, 1e-4),
    "shared full FT": ("shared-bottom", FULL, 1e-4),
    "shared LoRA (r=8)": ("shared-bottom", {**FULL, "backbone_options": {"finetune": "lora", "r": 8, "cache": False}},
                          1e-3),
    "task-lora (r=8 per task)": ("task-lora", {"r": 8}, 1e-3),
    "task-prompt (8 per task)": ("task-prompt", {"num_prompts": 8}, 1e-2),
}


TOPICS = ["noun.animal", "noun.plant", "noun.food", "verb.motion", "verb.communication", "verb.consumption"]


def trainable(models: list[nn.Module]) -> int:
    return sum(p.numel() for m in models for p in m.parameters() if p.requires_grad)


def train(models: list[nn.Module], suites: list[TaskSuite], lr: float, epochs: int, batch: int) -> float:
    """Fit every (model, suite) pair; returns the seconds it took."""
    start = time.perf_counter()
    for model, suite in zip(models, suites):
        cfg = TrainConfig(epochs=epochs, batch_size=batch, lr=lr, progress=False, eval_batch_size=128)
        Trainer(model, suite.tasks, "ew", cfg).fit(suite.train, suite.val)
    return time.perf_counter() - start


def step_times(rows: dict[str, tuple[list[nn.Module], list[TaskSuite]]], batch: int, rounds: int) -> dict[str, float]:
    """Median seconds of one training step per row (summed over a row's models), interleaved rounds."""
    samples: dict[str, list[float]] = {k: [] for k in rows}
    state = {}
    for label, (models, suites) in rows.items():
        state[label] = [(m, s.tasks, next(s.train.batches(batch)),
                         torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-6))
                        for m, s in zip(models, suites)]
    for _ in range(rounds):
        for label, parts in state.items():
            total = 0.0
            for model, tasks, b, opt in parts:
                model.train()
                start = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                masked_task_losses(tasks, model(b.x), b).sum().backward()
                opt.step()
                total += time.perf_counter() - start
            samples[label].append(total)
    return {k: statistics.median(v) for k, v in samples.items()}


def evaluate(models: list[nn.Module], suites: list[TaskSuite]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for model, suite in zip(models, suites):
        out.update(evaluate_model(model, suite.tasks, suite.test, batch_size=128))
    return out


def run_part(suite: TaskSuite, rows: dict[str, tuple[str, dict[str, Any], float]], epochs: int, batch: int,
             rounds: int) -> list[dict[str, Any]]:
    """Train each row (the first one is single-task: one model per task), time steps, score on test."""
    built: dict[str, tuple[list[nn.Module], list[TaskSuite]]] = {}
    seconds = {}
    for k, (label, (arch, options, lr)) in enumerate(rows.items()):
        suites = [suite.restrict([t]) for t in suite.task_names] if k == 0 else [suite]
        models = []
        for s in suites:
            torch.manual_seed(0)
            models.append(ARCHITECTURES.create(arch, s.tasks, s.input_spec, **options))
        seconds[label] = train(models, suites, lr, epochs, batch)
        built[label] = (models, suites)
        print(f"{label}: trained in {seconds[label]:.0f} s", flush=True)
    times = step_times(built, batch, rounds)
    records, base = [], None
    for label, (models, suites) in built.items():
        results = evaluate(models, suites)
        base = base or results
        record = {"model": label, "trainable params": trainable(models), "s/step": round(times[label], 3),
                  "train s": round(seconds[label]), "delta_m": round(delta_m(results, base, suite.tasks), 2)}
        record.update({f"{t}/{m}": round(v, 4) for t, r in results.items() for m, v in r.items() if m != "loss"})
        records.append(record)
        print(record, flush=True)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller subsets, fewer epochs")
    args = parser.parse_args()
    env = setup(threads=1)
    start = time.perf_counter()
    text_opts = {"subset": 240 if args.quick else 800, "seq_len": 24, "topics": TOPICS}
    text = SUITES.create("wordnet", **text_opts)
    text_epochs, batch, rounds = 1, 16, 5
    text_rows = run_part(text, TEXT_ROWS, text_epochs, batch, rounds)

    from polytask.models.arch.seq2seq_lm import save_tiny_t5

    t5_sizes = {"d_model": 64, "layers": 2, "heads": 4, "d_ff": 256}
    s2s_opts = {"per_task": 100 if args.quick else 400, "seq_len": 40, "target_len": 10}
    s2s = SUITES.create("wordnet-instruct", **s2s_opts)
    metrics = ("exact_match", "token_accuracy", "bleu")
    s2s = replace(s2s, tasks=[replace(t, metrics=metrics, main_metric="") for t in s2s.tasks])
    s2s_epochs = 2 if args.quick else 6
    with tempfile.TemporaryDirectory() as tmp:
        path = str(save_tiny_t5(f"{tmp}/t5", **t5_sizes))
        rows = {"single-task": ("seq2seq-lm", {"path": path}, 3e-3),
                "multi-task (one model)": ("seq2seq-lm", {"path": path}, 3e-3)}
        s2s_rows = run_part(s2s, rows, s2s_epochs, batch, rounds)
    seconds = time.perf_counter() - start
    md = [f"# Transformers: task-specific parts and a text-to-text model{' (quick)' if args.quick else ''}\n\n",
          f"threads={env['threads']} (torch {env['torch']}, {env['cpus']} CPUs, machine shared with other jobs); "
          f"total {seconds / 60:.1f} min; one seed (0). s/step: median of {rounds} interleaved rounds of one "
          f"training step (batch {batch}); single-task rows sum their per-task models. Δm in % vs the single-task "
          "row (higher is better).\n\n",
          f"## wordnet ({text_opts}, {text_epochs} epochs, Adam, batch {batch}) with all-MiniLM-L6-v2\n\n",
          "Learning rates: full fine-tuning 1e-4, LoRA 1e-3, prompts 1e-2 (heads train at the same rate).\n\n",
          markdown_table(text_rows),
          f"\n## wordnet-instruct ({s2s_opts}, {s2s_epochs} epochs, Adam 3e-3, batch {batch}) with a tiny T5 "
          f"({t5_sizes}, random init, MiniLM vocabulary)\n\n",
          "Test metrics from greedy generation (`generate`).\n\n",
          markdown_table(s2s_rows)]
    payload = {"env": env, "quick": args.quick, "seconds": round(seconds, 1),
               "text": {"suite": "wordnet", "options": text_opts, "epochs": text_epochs,
                        "rows": {k: [a, {kk: vv for kk, vv in o.items()}, lr] for k, (a, o, lr) in TEXT_ROWS.items()},
                        "results": text_rows},
               "seq2seq": {"suite": "wordnet-instruct", "options": s2s_opts, "epochs": s2s_epochs, "t5": t5_sizes,
                           "results": s2s_rows}}
    name = "transformer_adapters" + ("_quick" if args.quick else "")
    write_results(name, payload, "".join(md))
    print("".join(md))


if __name__ == "__main__":
    main()
