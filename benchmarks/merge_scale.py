"""Streaming merge at scale: 8 synthetic fine-tuned models of ~100M float32 parameters each.

Each model has four large tensors (2/3 of the parameters) and 256 small ones. ``ties`` and
``dare`` merge them from memory-mapped safetensors files; we report each merge's wall time as a
ratio to simply reading the nine files once (every tensor via ``safe_open``, same run, warm page
cache) and its memory as a multiple of one model's size. Peak RSS (ru_maxrss) also counts the pages
of the memory-mapped input files, which the kernel can drop at will; the last column is the
private (anonymous) memory the merge added above the process's baseline after its imports,
sampled every 5 ms: the real cost. Each measurement runs in a fresh
subprocess (peak RSS = that process's ``ru_maxrss``), with one torch thread.

Baseline ``load-all ties``: the common single-route recipe (load all N+1 state dicts, an [N, D]
task-vector matrix, each row's largest ``density`` = 0.2 fraction via ``kthvalue``, sign election,
disjoint mean). It trims each whole task vector (the paper's definition) where ours trims tensor
by tensor, so the two merged models differ; the row shows what that approach costs in time and memory.

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
NOTES = [
    "- `merge ties` / `merge dare`: `polytask.merging.merge_files` streaming from memory-mapped files, tensor by tensor, in blocks of 65,536 entries per model; bit-identical to the whole-tensor definitions (kthvalue thresholds, bool masks, one Bernoulli draw of the full tensor) — see `test_blocked_merge_equals_reference_definition_bit_for_bit`.",
    "- `load-all ties`: every state dict loaded, task vectors flattened into an [N, D] matrix, global top-20% per row by `torch.kthvalue`, sign election, disjoint mean (rows trimmed/averaged one at a time; the reference code's whole-matrix version needs several more [N, D] temporaries). It trims each whole task vector, ours each tensor, so the merged weights differ.",
    "- Added private memory of the streaming merges is the merged model itself (kept until it is written) plus one tensor-sized scratch buffer and the [N, 65536] block.",
    "- Where the time goes (one thread, measured on this box under similar load): DARE draws one float per entry from torch's seeded mt19937 generator (`torch.rand`, ~10 ns/entry here, ~8 s for the 800M draws), kept so the drops stay identical to drawing each whole tensor at once; TIES needs an exact per-tensor top-k: one |δ| pass plus an in-place introselect (`numpy.partition`, ~4.5 ns/entry vs ~35-48 ns for `torch.kthvalue`) per model per tensor, then one blocked pass for trim + sign election + disjoint mean.",
]


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
    if task == "load-all ties":
        load_all_ties(files, directory / "merged-load-all.safetensors")
    elif task == "read":
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


def load_all_ties(files: list[Path], out: Path, density: float = 0.2, lam: float = 1.0) -> None:
    """The common single-route recipe (TIES' reference code, FusionBench, mergekit-style scripts): load
    every state dict, flatten the task vectors into an [N, D] matrix, keep the largest ``density`` fraction of
    each row by ``kthvalue``, elect signs with a sum over rows, disjoint mean. Rows are trimmed and averaged
    one at a time (the reference does it on the whole matrix at once, which needs several more [N, D]
    temporaries)."""
    from safetensors.torch import load_file, save_file

    states = [load_file(str(f)) for f in files]
    keys = list(states[0])
    flat_base = torch.cat([states[0][key].reshape(-1) for key in keys])
    tv = torch.empty(len(states) - 1, flat_base.numel())
    for row, state in zip(tv, states[1:]):
        torch.cat([state[key].reshape(-1) for key in keys], out=row).sub_(flat_base)
    n = tv.shape[1]
    for row in tv:
        mag = row.abs()
        row.mul_(mag >= mag.kthvalue(n - round(density * n) + 1).values)
        del mag
    elected = tv.sum(0).sign_()
    total, count = torch.zeros(n), torch.zeros(n)
    for row in tv:
        agree = (row * elected) > 0
        total += row * agree
        count += agree
    merged = total.div_(count.clamp_(min=1.0)).mul_(lam).add_(flat_base)
    sizes = [states[0][key].numel() for key in keys]
    save_file({key: part.view(states[0][key].shape) for key, part in zip(keys, merged.split(sizes))}, str(out))


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (RssAnon: private memory, not the mapped files)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _meminfo_bytes(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
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
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the load-everything TIES baseline")
    parser.add_argument("--dir", type=Path, default=None, help="(internal/optional) where the files go")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-record", action="store_true", help="print only; do not write benchmarks/results")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.dir, args.models)))
        return
    with tempfile.TemporaryDirectory(prefix="merge-scale-", dir=args.dir) as tmp:
        directory = Path(tmp)
        load = os.getloadavg()
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
        need = (2 * args.models + 6) * model_bytes  # loaded models + [N, D] matrix + row temporaries
        if args.baseline and _meminfo_bytes("MemAvailable") > 1.3 * need:
            rows.append({"task": "load-all ties", **measure("load-all ties", directory, args.models)})
        elif args.baseline:
            print(f"skipping the load-all baseline: it needs ~{need / 1e9:.1f} GB and less is available")
    for row in rows:
        row["time_vs_read"] = row["seconds"] / read["seconds"]
        row["peak_rss_vs_model"] = row["peak_rss_bytes"] / model_bytes
        row["added_anon_vs_model"] = (row["peak_anon_bytes"] - row["baseline_anon_bytes"]) / model_bytes
    result = {"params_per_model": n, "models": args.models, "model_bytes": model_bytes, "threads": THREADS,
              "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "loadavg_at_start": load[0], "block": 1 << 16, "rows": rows}
    lines = [f"# Streaming merge at scale ({args.models} models × {n / 1e6:.1f}M float32 params, "
             f"{model_bytes / 1e6:.0f} MB each; torch {torch.__version__}, {THREADS} thread, {os.cpu_count()} cores)", "",
             "| run | seconds | time / read | peak RSS (MB) | peak RSS / model | added private memory / model |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['seconds']:.1f} | {r['time_vs_read']:.2f} | "
                     f"{r['peak_rss_bytes'] / 1e6:.0f} | {r['peak_rss_vs_model']:.2f} | {r['added_anon_vs_model']:.2f} |")
    lines += ["", f"Load average when the run started: {load[0]:.1f} (1 min), on {os.cpu_count()} cores shared with "
              "other jobs; ratios are taken within this one run.", "", *NOTES]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_record:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from polytask.io import write_json, write_text

        write_json(RESULTS / "merge_scale.json", result)
        write_text(RESULTS / "merge_scale.md", text)


if __name__ == "__main__":
    main()
