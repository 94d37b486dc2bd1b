"""Streaming merge at scale: 8 synthetic fine-tuned models of ~100M float32 parameters each.

Each model has four large tensors (2/3 of the parameters) and 256 small ones. ``ties`` and
``dare`` merge them from memory-mapped safetensors files; we report each merge's wall time as a
ratio to simply reading the nine files once (every tensor via ``safe_open``, same run, warm page
cache) and its memory as a multiple of one model's size. Peak RSS (ru_maxrss) also counts the pages
of the memory-mapped input files, which the kernel can drop at will; the last column is the
private (anonymous) memory the merge added above the process's baseline after its imports,
sampled every 5 ms: the real cost. Each measurement runs in a fresh
subprocess (peak RSS = that process's ``ru_maxrss``), with one torch thread.

    python benchmarks/merge_scale.py                 # full size (~3.6 GB of files in a temp dir)
    python benchmarks/merge_scale.py --params 2e6    # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 1


def layout(params: int) -> dict[str, tuple[int, ...]]:
    """Four large square-ish tensors holding ~2/3 of ``params`` plus 256 small ones."""
    side = max(8, int((params * 2 / 3 / 4) ** 0.5))
    shapes: dict[str, tuple[int, ...]] = {f"block{i}.weight": (side, side) for i in range(4)}
    small = max(1, (params - 4 * side * side) // 256)
    for i in range(256):
        shapes[f"layer{i}.bias" if i % 2 else f"layer{i}.norm"] = (small,)
    return shapes


def build(directory: Path, params: int, models: int) -> int:
    """Write base.safetensors and ft{i}.safetensors; returns the number of parameters per model."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    shapes = layout(params)
    base = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    save_file(base, str(directory / "base.safetensors"))
    for i in range(models):
        save_file({k: v + 0.002 * torch.randn(v.shape, generator=g) for k, v in base.items()},
                  str(directory / f"ft{i}.safetensors"))
    return sum(v.numel() for v in base.values())


def worker(task: str, directory: Path, models: int) -> dict[str, float]:
    """One measurement in this (fresh) process: read the files once, or merge them."""
    from safetensors import safe_open

    from polytask.merging import merge_files

    torch.set_num_threads(THREADS)
    files = [directory / "base.safetensors"] + [directory / f"ft{i}.safetensors" for i in range(models)]
    baseline = _status_bytes("RssAnon")
    peak_anon = [baseline]
    done = threading.Event()

    def sample() -> None:  # the kernel keeps no peak of anonymous memory: poll it
        while not done.wait(0.005):
            peak_anon[0] = max(peak_anon[0], _status_bytes("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if task == "read":
        for f in files:
            handle = safe_open(str(f), framework="pt")
            for key in handle.keys():
                handle.get_tensor(key).sum()  # touch every byte: get_tensor maps pages lazily
    else:
        merge_files(task, files[0], files[1:], directory / f"merged-{task}.safetensors")
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return {"seconds": seconds, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_anon_bytes": peak_anon[0], "baseline_anon_bytes": baseline}


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (RssAnon: private memory, not the mapped files)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure(task: str, directory: Path, models: int) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    proc = subprocess.run([sys.executable, __file__, "--worker", task, "--dir", str(directory), "--models", str(models)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"worker {task!r} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=100e6, help="parameters per model")
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--methods", default="ties,dare")
    parser.add_argument("--dir", type=Path, default=None, help="(internal/optional) where the files go")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-record", action="store_true", help="print only; do not write benchmarks/results")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.dir, args.models)))
        return
    with tempfile.TemporaryDirectory(prefix="merge-scale-", dir=args.dir) as tmp:
        directory = Path(tmp)
        t0 = time.perf_counter()
        n = build(directory, int(args.params), args.models)
        print(f"wrote base + {args.models} models of {n / 1e6:.1f}M params in {time.perf_counter() - t0:.0f} s")
        model_bytes = (directory / "base.safetensors").stat().st_size
        os.sync()  # let the writes reach the disk before timing
        measure("read", directory, args.models)  # warm the page cache
        read = measure("read", directory, args.models)
        rows = [{"task": "read 9 files", **read}]
        for method in args.methods.split(","):
            rows.append({"task": f"merge {method}", **measure(method, directory, args.models)})
    for row in rows:
        row["time_vs_read"] = row["seconds"] / read["seconds"]
        row["peak_rss_vs_model"] = row["peak_rss_bytes"] / model_bytes
        row["added_anon_vs_model"] = (row["peak_anon_bytes"] - row["baseline_anon_bytes"]) / model_bytes
    result = {"params_per_model": n, "models": args.models, "model_bytes": model_bytes, "threads": THREADS,
              "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "rows": rows}
    lines = [f"# Streaming merge at scale ({args.models} models × {n / 1e6:.1f}M float32 params, "
             f"{model_bytes / 1e6:.0f} MB each; torch {torch.__version__}, {THREADS} thread, {os.cpu_count()} cores)", "",
             "| run | seconds | time / read | peak RSS (MB) | peak RSS / model | added private memory / model |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['seconds']:.1f} | {r['time_vs_read']:.2f} | "
                     f"{r['peak_rss_bytes'] / 1e6:.0f} | {r['peak_rss_vs_model']:.2f} | {r['added_anon_vs_model']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_record:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from polytask.io import write_json, write_text

        write_json(RESULTS / "merge_scale.json", result)
        write_text(RESULTS / "merge_scale.md", text)


if __name__ == "__main__":
    main()
