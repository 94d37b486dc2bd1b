"""The cheap merges against their floor: a plain state-dict loop in memory, reading the files when streaming.

In memory (``--memory-params``, default 10.5M per model, 8 models, float32): polytask ``average`` and
``task-arithmetic`` (``Merger.merge``, 1 and 2 threads) against the plain in-place loop a user would write
(``acc = sd_1[k].clone(); acc += sd_t[k] ...; acc /= n`` and ``acc = zeros; acc += sd_t[k]; acc -= base[k] ...;
base[k] + λ·acc``), one torch thread per Python thread.

Streamed (``--file-params`` per model, ``--dtype``): ``merge_files`` from memory-mapped safetensors to one
``.safetensors`` output, for average, task arithmetic, TIES and DARE, each time ÷ reading the nine files
once (every tensor via ``safe_open`` and summed, warm page cache), each merge writing a new output
(the previous one is removed untimed), and the private (anonymous) memory the merge added, sampled
every 5 ms, ÷ one model's size (in this process after the timed rounds: a lower bound). Then each
method's peak RSS in a fresh process (VmHWM, the input pages it maps included) for N = 2, 4, 8 models.

Repeats are interleaved (every variant once per round) and medians reported; ratios come from the same run.

    python benchmarks/merge_floor.py                                 # 8 x 10.5M in memory, 8 x 50M fp32 files
    python benchmarks/merge_floor.py --file-params 3e8 --dtype bf16  # the issue's 8 x ~300M bf16 case (~5.4 GB)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = 8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def layout(params: int) -> dict[str, tuple[int, ...]]:
    """A transformer-like mix: square matrices holding ~95% of ``params``, plus 64 vectors."""
    side = 1024 if params < 5e7 else 2048
    big = max(1, int(params * 0.95) // (side * side))
    shapes: dict[str, tuple[int, ...]] = {f"layer{i}.weight": (side, side) for i in range(big)}
    small = max(1, (params - big * side * side) // 64)
    shapes |= {f"layer{i}.norm": (small,) for i in range(64)}
    return shapes


def state_dicts(params: int, dtype: torch.dtype) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(0)
    base = {k: (torch.randn(s, generator=g) * 0.05) for k, s in layout(params).items()}
    fts = [{k: (v + 0.002 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
           for _ in range(MODELS)]
    return {k: v.to(dtype) for k, v in base.items()}, fts


def plain_average(base: dict, fts: list[dict]) -> dict:
    out = {}
    for k in base:
        acc = fts[0][k].clone()
        for sd in fts[1:]:
            acc += sd[k]
        out[k] = acc.div_(len(fts))
    return out


def plain_task_arithmetic(base: dict, fts: list[dict], lam: float = 0.3) -> dict:
    out = {}
    for k, b in base.items():
        acc = torch.zeros_like(b)
        for sd in fts:
            acc += sd[k]
            acc -= b
        out[k] = acc.mul_(lam).add_(b)
    return out


def rounds(variants: dict[str, Callable[[], object]], repeats: int,
           before: Callable[[], object] = lambda: None) -> dict[str, list[float]]:
    """Seconds of each variant, ``repeats`` interleaved rounds (one warm-up round dropped); ``before`` runs
    untimed ahead of each call (e.g. removing the previous output)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(repeats + 1):
        for name, fn in variants.items():
            gc.collect()
            before()
            start = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - start)
    return times


def anon_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def added_private_memory(fn: Callable[[], object]) -> int:
    """Peak anonymous memory above the level before ``fn``, sampled every 5 ms."""
    gc.collect()
    before = anon_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], anon_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    fn()
    done.set()
    sampler.join()
    return peak[0] - before


def in_memory(params: int, repeats: int) -> list[dict]:
    from polytask import MERGERS

    base, fts = state_dicts(params, torch.float32)
    avg, ta = MERGERS.create("average"), MERGERS.create("task-arithmetic")
    variants = {
        "plain loop average": lambda: plain_average(base, fts),
        "polytask average, 1 thread": lambda: avg.merge(base, fts),
        "polytask average, 2 threads": lambda: avg.merge(base, fts, threads=2),
        "plain loop task-arithmetic": lambda: plain_task_arithmetic(base, fts),
        "polytask task-arithmetic, 1 thread": lambda: ta.merge(base, fts),
        "polytask task-arithmetic, 2 threads": lambda: ta.merge(base, fts, threads=2),
    }
    times = rounds(variants, repeats)
    rows = []
    for name, values in times.items():
        floor = "plain loop average" if "average" in name else "plain loop task-arithmetic"
        rows.append({"variant": name, "median_s": statistics.median(values),
                     "vs_plain_loop": statistics.median(values) / statistics.median(times[floor]),
                     "runs_s": values})
    return rows


def streamed(params: int, dtype_name: str, repeats: int, threads: tuple[int, ...], directory: Path) -> tuple[list[dict], int]:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from polytask.merging import merge_files

    base, fts = state_dicts(params, DTYPES[dtype_name])
    files = [directory / "base.safetensors"] + [directory / f"ft{i}.safetensors" for i in range(MODELS)]
    for path, sd in zip(files, [base, *fts]):
        save_file(sd, str(path))
    model_bytes = sum(v.numel() * v.element_size() for v in base.values())
    del base, fts

    def read() -> None:
        for f in files:
            handle = safe_open(str(f), framework="pt")
            for key in handle.keys():
                handle.get_tensor(key).sum()  # touch every byte: get_tensor maps the file's pages lazily

    methods = {"average": {}, "task-arithmetic": {}, "ties": {"density": 0.2}, "dare": {"density": 0.5}}
    variants: dict[str, Callable[[], object]] = {"read the nine files once": read}
    for method, options in methods.items():
        for n in threads:
            variants[f"{method}, {n} thread{'s' if n > 1 else ''}"] = (
                lambda m=method, o=options, n=n: merge_files(m, files[0], files[1:], directory / "out.safetensors",
                                                              overwrite=True, threads=n, **o))
    out = directory / "out.safetensors"
    times = rounds(variants, repeats, before=lambda: out.unlink(missing_ok=True))  # a new output, as a user writes
    read_s = statistics.median(times["read the nine files once"])
    rows = []
    for name, values in times.items():
        memory = added_private_memory(variants[name])
        rows.append({"variant": name, "median_s": statistics.median(values),
                     "vs_read_once": statistics.median(values) / read_s,
                     "added_private_memory_vs_one_model": memory / model_bytes, "runs_s": values})
    peaks = [{"method": method, "models": n, **fresh_peak_rss(method, options, files[0], files[1:n + 1], directory)}
             for method, options in methods.items() for n in (2, 4, MODELS)]
    for row in peaks:
        row["peak_vs_one_model"] = row["peak_bytes"] / model_bytes
        row["added_vs_one_model"] = (row["peak_bytes"] - row["baseline_bytes"]) / model_bytes
    return rows, peaks, model_bytes


PEAK_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from polytask.merging import merge_files
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
method, options, base, models, out = json.loads(sys.argv[1])
baseline = hwm()
merge_files(method, base, models, out, **options)
print(json.dumps({"baseline_bytes": baseline, "peak_bytes": hwm()}))
"""


def fresh_peak_rss(method: str, options: dict, base: Path, models: list[Path], directory: Path) -> dict:
    """Peak RSS (VmHWM: anonymous and file-backed pages) of one merge in a fresh process, and that process's
    peak after its imports (the baseline), in bytes."""
    out = directory / "peak.safetensors"
    out.unlink(missing_ok=True)
    args = json.dumps([method, options, str(base), [str(m) for m in models], str(out)])
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, args], capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    out.unlink(missing_ok=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-params", type=float, default=10.5e6)
    parser.add_argument("--file-params", type=float, default=5e7)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--file-repeats", type=int, default=3)
    parser.add_argument("--name", default="merge_floor")
    args = parser.parse_args()
    torch.set_num_threads(1)
    memory_rows = in_memory(int(args.memory_params), args.repeats) if args.memory_params else []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        file_rows, peak_rows, model_bytes = (streamed(int(args.file_params), args.dtype, args.file_repeats, (1, 2), Path(tmp))
                                             if args.file_params else ([], [], 0))
    load = os.getloadavg()
    result = {"settings": {**vars(args), "models": MODELS, "torch_threads_per_python_thread": torch.get_num_threads(),
                           "torch": torch.__version__, "cpu_count": os.cpu_count(), "machine": platform.processor(),
                           "load_average_after": load, "model_bytes": model_bytes},
              "in_memory": memory_rows, "streamed": file_rows, "fresh_process_peak_rss": peak_rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# {args.name}", "", f"Settings: {json.dumps(result['settings'])}", ""]
    if memory_rows:
        lines += [f"## {MODELS} x {args.memory_params / 1e6:.1f}M float32 parameters in memory "
                  f"(median of {args.repeats} interleaved rounds)", "",
                  "| variant | median s | ÷ plain loop |", "|---|---|---|"]
        lines += [f"| {r['variant']} | {r['median_s']:.3f} | {r['vs_plain_loop']:.2f} |" for r in memory_rows]
        lines.append("")
    if file_rows:
        lines += [f"## Streamed: {MODELS} + 1 files of {args.file_params / 1e6:.0f}M {args.dtype} parameters "
                  f"(median of {args.file_repeats} interleaved rounds, warm page cache)", "",
                  "| variant | median s | ÷ read once | added private memory ÷ one model |", "|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['median_s']:.2f} | {r['vs_read_once']:.2f} | "
                  f"{r['added_private_memory_vs_one_model']:.2f} |" for r in file_rows]
        lines += ["", "Peak RSS of each merge in a fresh process (VmHWM, the mapped input pages included), ÷ one "
                  "model; 'above baseline' subtracts the process's peak after its imports (torch alone is ~300 MB).", "",
                  "| method | N models | peak RSS ÷ one model | above baseline ÷ one model |", "|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['models']} | {r['peak_vs_one_model']:.2f} | {r['added_vs_one_model']:.2f} |"
                  for r in peak_rows]
    lines += ["", f"Load average after the run (1, 5, 15 min): {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}"]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
