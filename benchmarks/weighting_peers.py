"""Gradient weighting speed against the real peer libraries: polytask vs LibMTL 1.1.5 and TorchJD.

Same hard-sharing MLP (polytask's ``shared-bottom``: dense input 64, shared bottom 256-256,
one 32-unit tower per task; 82k shared parameters), same batches (128 samples), same per-task
MSE losses, SGD, one thread, for T = 2, 3, 4, 8, 16 regression tasks (3: LibMTL 1.1.5's CAGrad runs
only there, its objective is hard-coded to 3 tasks). Every configuration is its own
copy of the same initial model and trains for ``--steps`` steps per round; rounds interleave
all configurations of one T, and we report the median ms/step over the rounds (and its range).

- ``polytask``: ``WEIGHTINGS.create(name)`` + ``GradContext(model, "params")`` (the Trainer's path);
  ``ew`` is the baseline every ratio "/ ew" divides by.
- ``libmtl``: LibMTL's own weighting classes (EW, PCGrad, MGDA with ``mgda_gn="none"``,
  CAGrad with ``calpha=0.4, rescale=1``, IMTL, GradVac with ``beta=0.5``) mixed into a minimal host that supplies what LibMTL's
  model class would (``task_num``, ``device``, ``rep_grad=False``, ``get_share_params``,
  ``zero_grad_share_params``). The PyPI release 1.1.5 has no UPGrad.
- ``torchjd``: ``autojac.mtl_backward`` on the shared features, then ``jac_to_grad`` with the
  aggregator (UPGrad, MGDA, DualProj, ConFIG, PCGrad, CAGrad(c=0.4), IMTLG, GradVac(beta=0.5),
  AlignedMTL, FairGrad(alpha=1));
- ``torchjd-autogram``: TorchJD's Gramian path, ``autogram.Engine`` on the shared bottom, the
  matching ``*Weighting`` on its Gramian, and one backward of the weighted losses.

A plot of ms/step against T per method and library goes to ``results/weighting_peers.png``.

The methods do the same work up to each library's conventions (e.g. LibMTL gives the task
heads sum_t grad L_t under MGDA, polytask alpha-weighted ones; TorchJD's UPGrad regularises its
QP): this measures speed, not equality of updates. Needs a separate environment (never the
project's .venv):

    python3 -m venv /tmp/bench-venv && /tmp/bench-venv/bin/pip install "torch==2.13.*" numpy scipy
    /tmp/bench-venv/bin/pip install --no-deps libmtl==1.1.5
    /tmp/bench-venv/bin/pip install "torch==2.13.*" torchjd qpsolvers quadprog cvxpy clarabel
    /tmp/bench-venv/bin/pip install --no-deps -e . && /tmp/bench-venv/bin/pip install pyyaml safetensors \
        torchmetrics typer rich matplotlib scikit-learn pandas
    OMP_NUM_THREADS=1 /tmp/bench-venv/bin/python benchmarks/weighting_peers.py [--repeats 7] [--steps 20]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import types
import statistics
import time
from importlib.metadata import version
from typing import Any, Callable

import torch
import torch.nn.functional as F

from _common import RESULTS, markdown_table, setup, write_results
import polytask.weighting  # noqa: F401
from polytask.registry import ARCHITECTURES, WEIGHTINGS
from polytask.tasks import InputSpec, Task
from polytask.weighting.base import GradContext

DIM, BATCH, BOTTOM, TOWER = 64, 128, [256, 256], [32]
POLYTASK = {"ew": {}, "pcgrad": {}, "mgda": {"mode": "params", "normalization": "none"},
            "cagrad": {"c": 0.4}, "imtl": {"mode": "params"}, "gradvac": {"beta": 0.5}, "aligned-mtl": {},
            "fairgrad": {}, "nash-mtl": {}, "upgrad": {}, "dualproj": {}, "config": {}}
LIBMTL = {"ew": ("EW", {}), "pcgrad": ("PCGrad", {}), "mgda": ("MGDA", {"mgda_gn": "none"}),
          "cagrad": ("CAGrad", {"calpha": 0.4, "rescale": 1}), "imtl": ("IMTL", {}),
          "gradvac": ("GradVac", {"beta": 0.5})}
TORCHJD = ["upgrad", "mgda", "dualproj", "config", "pcgrad", "cagrad", "imtl", "gradvac", "aligned-mtl", "fairgrad"]
AUTOGRAM = ["upgrad", "mgda", "dualproj", "pcgrad", "cagrad", "imtl", "gradvac", "aligned-mtl", "fairgrad"]

Step = Callable[[], None]


def make_model(t: int) -> torch.nn.Module:
    torch.manual_seed(0)
    tasks = [Task(f"t{i}", "regression") for i in range(t)]
    return ARCHITECTURES.create("shared-bottom", tasks, InputSpec("dense", dim=DIM), bottom=BOTTOM, tower=TOWER)


def task_losses(out: dict[str, torch.Tensor], y: torch.Tensor) -> list[torch.Tensor]:
    return [F.mse_loss(out[f"t{i}"].squeeze(-1), y[:, i]) for i in range(y.shape[1])]


def polytask_step(model: torch.nn.Module, name: str, x: torch.Tensor, y: torch.Tensor) -> Step:
    weighting = WEIGHTINGS.create(name, [f"t{i}" for i in range(y.shape[1])], **POLYTASK[name])
    ctx = GradContext(model, weighting.mode) if weighting.mode != "none" else None
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if ctx is not None:
            ctx.reset()
        weighting.backward(torch.stack(task_losses(model(x), y)), ctx)
        opt.step()
    return step


def import_libmtl_weighting() -> Any:
    """LibMTL.weighting. LibMTL's package __init__ imports its ResNets, which import
    ``torchvision.models.utils.load_state_dict_from_url`` (gone from torchvision; it was
    torch.hub's function): without torchvision installed we provide that one name."""
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        for mod in ("torchvision", "torchvision.models", "torchvision.models.utils"):
            sys.modules.setdefault(mod, types.ModuleType(mod))
        sys.modules["torchvision.models.utils"].load_state_dict_from_url = torch.hub.load_state_dict_from_url
    import LibMTL.weighting

    return LibMTL.weighting


def libmtl_step(model: torch.nn.Module, name: str, x: torch.Tensor, y: torch.Tensor) -> Step:
    lw = import_libmtl_weighting()

    cls_name, kwargs = LIBMTL[name]
    shared = list(model.shared_parameters())
    t = y.shape[1]

    class Host(getattr(lw, cls_name)):  # what LibMTL's MTLmodel (architecture + weighting) supplies
        def __init__(self) -> None:
            super().__init__()
            self.task_num, self.device, self.rep_grad = t, torch.device("cpu"), False

        def get_share_params(self):  # type: ignore[no-untyped-def]
            return iter(shared)

        def zero_grad_share_params(self) -> None:  # encoder.zero_grad() as in the torch 1.x LibMTL targets
            for p in shared:
                if p.grad is not None:
                    p.grad.zero_()

    host = Host()
    host.init_param()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        host.backward(torch.stack(task_losses(model(x), y)), **kwargs)
        opt.step()
    return step


def torchjd_step(model: torch.nn.Module, name: str, x: torch.Tensor, y: torch.Tensor) -> Step:
    from torchjd import aggregation as agg
    from torchjd.autojac import jac_to_grad, mtl_backward

    aggregator = {"upgrad": agg.UPGrad, "mgda": agg.MGDA, "dualproj": agg.DualProj, "config": agg.ConFIG,
                  "pcgrad": agg.PCGrad, "cagrad": lambda: agg.CAGrad(c=0.4), "imtl": agg.IMTLG,
                  "gradvac": lambda: agg.GradVac(beta=0.5), "aligned-mtl": agg.AlignedMTL,
                  "fairgrad": lambda: agg.FairGrad(alpha=1.0)}[name]()
    shared = list(model.shared_parameters())
    heads = [list(model.heads[f"t{i}"].parameters()) for i in range(y.shape[1])]
    features: list[torch.Tensor] = []
    model.bottom.register_forward_hook(lambda _m, _i, out: features.append(out))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        features.clear()
        losses = task_losses(model(x), y)
        mtl_backward(losses, features=features[0], tasks_params=heads, shared_params=shared)
        jac_to_grad(shared, aggregator)
        opt.step()
    return step


def autogram_step(model: torch.nn.Module, name: str, x: torch.Tensor, y: torch.Tensor) -> Step:
    """TorchJD's Gramian path: ``autogram.Engine`` on the shared bottom, a Gramian weighting, then one
    backward of the weighted losses (every parameter gets sum_t w_t grad L_t)."""
    from torchjd import aggregation as agg
    from torchjd.autogram import Engine

    weighting = {"upgrad": agg.UPGradWeighting, "mgda": agg.MGDAWeighting, "dualproj": agg.DualProjWeighting,
                 "pcgrad": agg.PCGradWeighting, "cagrad": lambda: agg.CAGradWeighting(c=0.4),
                 "imtl": agg.IMTLGWeighting, "gradvac": lambda: agg.GradVacWeighting(beta=0.5),
                 "aligned-mtl": agg.AlignedMTLWeighting, "fairgrad": lambda: agg.FairGradWeighting(alpha=1.0)}[name]()
    engine = Engine(model.bottom, batch_dim=None)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        losses = torch.stack(task_losses(model(x), y))
        losses.backward(weighting(engine.compute_gramian(losses)))
        opt.step()
    return step


def run(t: int, repeats: int, steps: int) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(t)
    x, y = torch.randn(BATCH, DIM, generator=gen), torch.randn(BATCH, t, generator=gen)
    base = make_model(t)
    makers = {"polytask": (polytask_step, POLYTASK), "libmtl": (libmtl_step, LIBMTL),
              "torchjd": (torchjd_step, TORCHJD), "torchjd-autogram": (autogram_step, AUTOGRAM)}
    configs: dict[tuple[str, str], Step] = {}
    failed: dict[tuple[str, str], str] = {}
    for lib, (make, names) in makers.items():
        for name in names:
            try:
                step = make(copy.deepcopy(base), name, x, y)
                step()
                configs[lib, name] = step
            except Exception as err:  # a peer that cannot run this case is reported, not timed
                failed[lib, name] = f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
    times: dict[tuple[str, str], list[float]] = {k: [] for k in configs}
    for round_ in range(repeats + 1):   # round 0 warms up
        for key, step in configs.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            if round_:
                times[key].append((time.perf_counter() - start) / steps * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for (lib, name), v in times.items():
        ours = med.get(("polytask", name))
        rows.append({"T": t, "library": lib, "method": name, "ms_per_step": med[lib, name],
                     "min_ms": min(v), "max_ms": max(v), "per_polytask_ew": med[lib, name] / med["polytask", "ew"],
                     "peer_over_polytask": med[lib, name] / ours if lib != "polytask" and ours else None})
    rows += [{"T": t, "library": lib, "method": name, "error": msg} for (lib, name), msg in failed.items()]
    return rows


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Median ms/step against T, one panel per method, one line per library."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from polytask.io import atomic_path

    timed = [r for r in rows if "ms_per_step" in r]
    methods = [m for m in POLYTASK if m != "ew"]
    fig, axes = plt.subplots(3, 4, figsize=(16, 10), sharex=True)
    axes.flat[-1].axis("off")
    for ax, method in zip(axes.flat, methods):
        for lib, color in (("polytask", "tab:blue"), ("libmtl", "tab:orange"), ("torchjd", "tab:green"),
                           ("torchjd-autogram", "tab:red")):
            pts = sorted((r["T"], r["ms_per_step"]) for r in timed if r["library"] == lib and r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), marker="o", color=color, label=lib)
        ew = sorted((r["T"], r["ms_per_step"]) for r in timed if r["library"] == "polytask" and r["method"] == "ew")
        ax.plot(*zip(*ew), color="gray", linestyle=":", label="polytask ew")
        ax.set_title(method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    axes.flat[0].legend(fontsize=8)
    fig.supxlabel("tasks T")
    fig.supylabel("ms per step (median)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 3, 4, 8, 16])
    args = parser.parse_args()
    env = {**setup(1), "libmtl": version("LibMTL"), "torchjd": version("torchjd"),
           "loadavg_start": os.getloadavg()[0]}
    rows = [r for t in args.tasks for r in run(t, args.repeats, args.steps)]
    env["loadavg_end"] = os.getloadavg()[0]
    shown = [{**r, "peer_over_polytask": "" if r.get("peer_over_polytask") is None else r["peer_over_polytask"]}
             for r in rows]
    md = (f"# Gradient weighting speed vs LibMTL {env['libmtl']} and TorchJD {env['torchjd']}\n\n"
          f"`benchmarks/weighting_peers.py --repeats {args.repeats} --steps {args.steps}`: hard-sharing MLP "
          f"(shared bottom {BOTTOM}, towers {TOWER}, input {DIM}, batch {BATCH}), one thread "
          f"(torch {env['torch']}), interleaved rounds, median ms/step (range over rounds). "
          f"`peer_over_polytask` > 1: the peer is slower than polytask's same-named method. Load average "
          f"{env['loadavg_start']:.2f} at start, {env['loadavg_end']:.2f} at end (a shared machine).\n\n"
          + markdown_table(shown, ["T", "library", "method", "ms_per_step", "min_ms", "max_ms", "per_polytask_ew",
                                   "peer_over_polytask", "error"]))
    plot(rows, str(RESULTS / "weighting_peers.png"))
    md += "\n![ms/step against T](weighting_peers.png)\n"
    write_results("weighting_peers", {"env": env, "args": vars(args), "rows": rows}, md)
    print(md)


if __name__ == "__main__":
    main()
