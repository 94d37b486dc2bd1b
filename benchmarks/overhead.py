"""Trainer overhead: polytask's Trainer with `ew` vs a bare hand-written PyTorch loop.

Both train the same MMoE from the same initial weights on the same in-memory batches
(same permutation, same steps, Adam); the ratio of wall times comes from interleaved
repeats in one run (median), on one thread. Goal: <= 1.05x.

    python benchmarks/overhead.py [--repeats 7] [--epochs 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from _common import markdown_table, setup, timed, write_results
from polytask import ARCHITECTURES, SUITES, TrainConfig, Trainer
from polytask.trainer import seed_everything


def bare_loop(model: torch.nn.Module, suite, epochs: int, batch_size: int, seed: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = suite.train.x, suite.train.y
    n = len(suite.train)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            out = model(x[idx])
            loss = sum(torch.nn.functional.mse_loss(out[t].reshape(-1), y[t][idx]) for t in y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    env = setup(threads=1)
    suite = SUITES.create("synthetic-mmoe", num_samples=10000)
    seed_everything(0)
    init = ARCHITECTURES.create("mmoe", suite.tasks, suite.input_spec)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, progress=False, restore_best=False)

    def polytask_run() -> None:
        Trainer(copy.deepcopy(init), suite.tasks, "ew", cfg).fit(suite.train)

    def bare_run() -> None:
        bare_loop(copy.deepcopy(init), suite, args.epochs, args.batch_size, cfg.seed)

    # same numbers: both loops give identical weights
    a, b = copy.deepcopy(init), copy.deepcopy(init)
    Trainer(a, suite.tasks, "ew", cfg).fit(suite.train)
    bare_loop(b, suite, args.epochs, args.batch_size, cfg.seed)
    same = all(torch.allclose(p, q, atol=1e-5) for p, q in zip(a.parameters(), b.parameters()))
    polytask_times, bare_times = [], []
    for _ in range(args.repeats):
        bare_times.append(timed(bare_run))
        polytask_times.append(timed(polytask_run))
    ratios = [p / b for p, b in zip(polytask_times, bare_times)]
    steps = args.epochs * -(-int(len(suite.train)) // args.batch_size)
    row = {"model": "mmoe (8 experts)", "suite": "synthetic-mmoe 10k", "steps": steps,
           "bare_s_median": statistics.median(bare_times), "trainer_s_median": statistics.median(polytask_times),
           "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
           "same_weights": same}
    payload = {"env": env, "repeats": args.repeats, "result": row, "ratios": ratios}
    md = (f"# Trainer overhead vs a bare PyTorch loop\n\nthreads={env['threads']}, torch {env['torch']}, "
          f"{args.repeats} interleaved repeats, median ratio (goal <= 1.05x).\n\n" + markdown_table([row]))
    write_results("overhead", payload, md)
    print(md)


if __name__ == "__main__":
    main()
