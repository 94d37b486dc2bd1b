"""Weighting speed: time per training step and peak memory of every loss/gradient balancing method.

Same MMoE (8 experts, 4 regression tasks, dense input), same batches, SGD, one thread:
a bare PyTorch loop (sum of losses, backward, step), ``ew``, and every weighting (both
gradient sources where a method has both). Gradient methods run three ways:

- ``polytask``: the default ``GradContext`` (on CPU one ``autograd.grad`` pass per task from that
  task's own loss, so no further backward pass is needed; methods whose weights depend on the Gram
  matrix alone take it from ``GradContext.gramian``, ``weighting/_gramian.py``, which never forms G);
- ``batched``: one batched vector-Jacobian product for all T tasks (``is_grads_batched``);
- ``libmtl``: LibMTL's recipe re-created here: per task ``loss.backward(retain_graph=True)``,
  copy every shared parameter's ``.grad`` into a row of G and zero it (task-specific
  gradients accumulate), then write the combined gradient back parameter by parameter.

Time: interleaved repeats (every configuration once per round), median of the rounds.
Memory: each configuration runs alone in a fresh subprocess; we report the peak resident
set size during the steps minus the RSS just before the first step (Linux VmHWM - VmRSS,
so it counts everything the steps allocate: activations, per-task gradients, optimizer
state), in MiB.

    python benchmarks/weighting_speed.py [--repeats 7] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from _common import RESULTS, markdown_table, setup, write_results
import polytask.weighting  # noqa: F401
from polytask.metrics import masked_task_losses
from polytask.registry import ARCHITECTURES, WEIGHTINGS
from polytask.tasks import Batch, InputSpec, Task
from polytask.weighting.base import GradContext

T, DIM, BATCH, EXPERTS, N_BATCHES = 4, 128, 256, 8, 4
LOSS_ONLY = [n for n in WEIGHTINGS.names() if WEIGHTINGS.get(n).grad_source == "none"]  # losses only
ONE_MODE = {"graddrop": "rep", "db-mtl": "params"}
OPTIONS = {"stch": {"warmup_epochs": 0}}   # time the scalarization, not its warm-up


class LibMTLContext(GradContext):
    """LibMTL's per-task gradient loop (``_compute_grad(mode='backward')`` + ``_reset_grad``)."""

    def task_grads(self, losses: torch.Tensor) -> torch.Tensor:
        if self.mode == "rep":
            return super().task_grads(losses)
        rows = []
        for i in range(losses.shape[0]):
            losses[i].backward(retain_graph=True)
            row = torch.zeros(sum(p.numel() for p in self.shared))
            offset = 0
            for p in self.shared:
                n = p.numel()
                if p.grad is not None:
                    row[offset:offset + n].copy_(p.grad.reshape(-1))
                    p.grad.zero_()
                offset += n
            rows.append(row)
        self.grads = torch.stack(rows)
        return self.grads

    def apply(self, losses: torch.Tensor, weights: torch.Tensor | None = None,
              shared_grad: torch.Tensor | None = None) -> None:
        if self.mode == "rep":
            return super().apply(losses, weights, shared_grad)
        w = torch.ones_like(losses) if weights is None else weights.detach()
        g = w @ self.grads if shared_grad is None else shared_grad
        offset = 0
        for p in self.shared:
            n = p.numel()
            p.grad = g[offset:offset + n].reshape(p.shape).clone()
            offset += n


def configs() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"name": "torch"}] + [{"name": n} for n in LOSS_ONLY]
    for name in WEIGHTINGS.names():
        if name in LOSS_ONLY:
            continue
        modes = [ONE_MODE[name]] if name in ONE_MODE else ["params", "rep"]
        for mode in modes:
            for path in ("polytask", "batched", "libmtl"):
                out.append({"name": name, "mode": mode, "path": path})
    return out


def label(cfg: dict[str, Any]) -> str:
    if "mode" not in cfg:
        return cfg["name"]
    path = cfg["path"]
    return f"{cfg['name']}[{cfg['mode']}{'' if path == 'polytask' else ', ' + path}]"


def build(cfg: dict[str, Any]) -> Any:
    """Model, optimizer, batches and a ``step()`` closure for one configuration."""
    torch.manual_seed(0)
    tasks = [Task(f"t{i}", "regression") for i in range(T)]
    model = ARCHITECTURES.create("mmoe", tasks, InputSpec("dense", dim=DIM), num_experts=EXPERTS,
                                 expert=[128, 64], tower=[32])
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(N_BATCHES):
        x = torch.randn(BATCH, DIM, generator=g)
        y = {t.name: torch.randn(BATCH, generator=g) for t in tasks}
        batches.append(Batch(x, y, {t.name: torch.ones(BATCH, dtype=torch.bool) for t in tasks}))
    if cfg["name"] == "torch":
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def bare(batch: Batch) -> None:
            out = model(batch.x)
            loss = sum(torch.nn.functional.mse_loss(out[t.name].reshape(-1), batch.y[t.name]) for t in tasks)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return bare, batches
    options = dict(OPTIONS.get(cfg["name"], {}))
    if "mode" in cfg and cfg["name"] not in ONE_MODE:
        options["mode"] = cfg["mode"]
    weighting = WEIGHTINGS.create(cfg["name"], [t.name for t in tasks], **options)
    ctx = None
    if weighting.mode != "none":
        ctx = (LibMTLContext(model, weighting.mode) if cfg["path"] == "libmtl" else
               GradContext(model, weighting.mode, task_chunk=T if cfg["path"] == "batched" else None))
    cut = model.representation_cut if weighting.mode == "rep" else nullcontext
    opt = torch.optim.SGD(list(model.parameters()) + list(weighting.parameters()), lr=1e-3)

    def step(batch: Batch) -> None:
        opt.zero_grad(set_to_none=True)
        if ctx is not None:
            ctx.reset()
        with cut():
            losses = masked_task_losses(tasks, model(batch.x), batch)
        weighting.backward(losses, ctx)
        opt.step()

    return step, batches


def run_steps(step: Any, batches: list[Batch], n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        step(batches[i % len(batches)])
    return (time.perf_counter() - start) / n


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_child(cfg: dict[str, Any], steps: int) -> None:
    torch.set_num_threads(1)
    step, batches = build(cfg)
    Path("/proc/self/clear_refs").write_text("5")    # reset the peak-RSS mark
    before = _status("VmRSS:")
    for i in range(steps):
        step(batches[i % len(batches)])
    print(json.dumps({"peak_mib": (_status("VmHWM:") - before) / 2 ** 20}))


def measure_memory(cfg: dict[str, Any], steps: int) -> float:
    cmd = [sys.executable, __file__, "--memory-child", json.dumps(cfg), "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
    if proc.returncode != 0:
        raise RuntimeError(f"memory run of {label(cfg)} failed:\n{proc.stderr}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"])


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["config"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.28 * len(rows) + 1.5), sharey=True)
    colors = ["tab:gray" if "libmtl" in n else "tab:orange" if "batched" in n else "tab:blue" for n in names]
    axes[0].barh(names, [r["ms_per_step"] for r in rows], color=colors)
    axes[0].set_xlabel("ms per step (median; blue = polytask, orange = batched VJP, grey = LibMTL's loop)")
    axes[1].barh(names, [r["peak_mib"] for r in rows], color=colors)
    axes[1].set_xlabel("peak RSS increase during steps (MiB)")
    axes[0].invert_yaxis()
    fig.suptitle(f"MMoE {EXPERTS} experts, T={T}, batch {BATCH}, 1 thread")
    fig.tight_layout()
    from polytask.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(json.loads(args.memory_child), args.steps)
        return
    env = setup(threads=1)
    cfgs = configs()
    built = {label(c): build(c) for c in cfgs}
    for step, batches in built.values():   # warm-up (first-call allocations, lazy imports)
        run_steps(step, batches, 3)
    times: dict[str, list[float]] = {k: [] for k in built}
    for _ in range(args.repeats):
        for key, (step, batches) in built.items():
            times[key].append(run_steps(step, batches, args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for cfg in cfgs:
        key = label(cfg)
        row = {"config": key, "ms_per_step": 1e3 * med[key], "vs_torch": med[key] / med["torch"],
               "vs_ew": med[key] / med["ew"], "peak_mib": measure_memory(cfg, args.steps)}
        if cfg.get("path") == "polytask":
            row["libmtl_over_polytask"] = med[label({**cfg, "path": "libmtl"})] / med[key]
            row["batched_over_polytask"] = med[label({**cfg, "path": "batched"})] / med[key]
        rows.append(row)
    payload = {"env": env, "setup": {"tasks": T, "input_dim": DIM, "batch": BATCH, "experts": EXPERTS,
                                     "expert": [128, 64], "tower": [32], "optimizer": "SGD",
                                     "steps_per_round": args.steps, "rounds": args.repeats,
                                     "memory": "peak RSS (VmHWM) minus RSS before the first step, fresh subprocess"},
               "rows": rows}
    md = ["# Weighting speed\n",
          f"MMoE ({EXPERTS} experts [128, 64], towers [32]) on dense input dim {DIM}, T={T} regression tasks, "
          f"batch {BATCH}, SGD; torch {env['torch']}, {env['threads']} thread, {env['cpus']} CPUs. "
          f"Median over {args.repeats} interleaved rounds of {args.steps} steps. "
          "`[params]`/`[rep]`: per-task gradients of the shared parameters / shared representation; "
          "`, batched`: one batched vector-Jacobian product for all tasks; `, libmtl`: LibMTL's per-task "
          "`.backward()` + copy loop. `libmtl_over_polytask` > 1 means polytask's default path is faster. "
          "peak_mib: peak RSS increase over the steps, each configuration alone in a fresh process.\n",
          markdown_table(rows, ["config", "ms_per_step", "vs_torch", "vs_ew", "libmtl_over_polytask", "batched_over_polytask", "peak_mib"]),
          "\n![bars](weighting_speed.png)\n"]
    write_results("weighting_speed", payload, "\n".join(md))
    plot(rows, RESULTS / "weighting_speed.png")
    print("\n".join(md))


if __name__ == "__main__":
    main()
