"""Gradient weighting speed against the real peer libraries: polytask vs LibMTL 1.1.5 and TorchJD.

Four cases, each the same model, the same batch (128 samples), the same per-task losses (each task
kind's own loss, batch mean) and SGD in every library, one thread:

- ``synthetic``: polytask's ``shared-bottom`` (dense input 64, shared bottom 256-256, one 32-unit
  tower per task; 82k shared parameters), T = 2, 3, 4, 8, 16 regression tasks on random data
  (3: LibMTL 1.1.5's CAGrad runs only there, its objective reshapes the weights to (1, 3));
- ``wide``: the same with a 1024-1024 shared bottom (1.1M shared parameters), T = 4 and 8, where
  the products, not Python, dominate;
- ``digits-hps`` and ``digits-mmoe``: the digits-multi suite (4 tasks: digit 10-way, parity and
  large binary, ink regression; its first 128 training images flattened to 64 inputs, as
  benchmarks/controllable.py does, so the shared part is dense) with ``shared-bottom`` (256-256,
  towers 32) and ``mmoe`` (8 experts of 64 units, one gate per task, towers 32; the experts are the
  shared part, gates and towers task-specific, as in LibMTL's MMoE).

Every configuration is its own copy of the same initial model and trains for ``--steps`` steps
per round (a quarter of them for ``wide``); rounds interleave all configurations of one case and
T (each round starting one configuration later), and we report the median ms/step over the rounds (and its range).

- ``polytask``: ``WEIGHTINGS.create(name)`` + ``GradContext(model, mode)`` (the Trainer's path; a
  ``rep`` method's forward runs inside ``representation_cut()``); ``ew`` is the baseline every
  ratio "/ ew" divides by. Learned weights (UW, GradNorm, IMTL's scales) are in the optimiser.
- ``libmtl``: LibMTL's own weighting classes (EW, PCGrad, MGDA with ``mgda_gn="none"``, CAGrad with
  ``calpha=0.4, rescale=1``, IMTL, GradVac with ``beta=0.5``, GradNorm with ``alpha=1.5``, GradDrop
  with ``leak=0``, UW) mixed into a minimal host that supplies what LibMTL's model class would
  (``task_num``, ``device``, ``rep_grad``, ``get_share_params``, ``zero_grad_share_params``,
  ``epoch = 1`` and ``train_loss_buffer`` = the first losses for GradNorm; for GradDrop,
  ``rep_grad=True`` and LibMTL's HPS forward: one detached copy of the shared representation per
  task, ``self.rep``/``self.rep_tasks``, built here for hard sharing only). The PyPI release
  1.1.5 has no UPGrad, Aligned-MTL, FairGrad, Nash-MTL, MoCo or DB-MTL.
- ``torchjd``: ``autojac.mtl_backward`` on the shared features (the tensors the task side reads:
  polytask's ``boundary``/``cut`` inputs), then ``jac_to_grad`` with the aggregator (UPGrad, MGDA,
  DualProj, ConFIG, PCGrad, CAGrad(c=0.4), IMTLG, GradVac(beta=0.5), AlignedMTL, FairGrad(alpha=1),
  NashMTL(max_norm=1, optim_niter=20), Mean for ``ew``, Random for ``rlw``). TorchJD's GradDrop is
  left out: it drops on the shared parameters' Jacobian, polytask and LibMTL on the representation;
- ``torchjd-autogram``: TorchJD's Gramian path, ``autogram.Engine`` on the shared modules, the
  matching ``*Weighting`` on its Gramian, and one backward of the weighted losses.

A plot of ms/step against T per method and library (``synthetic``) goes to
``results/weighting_peers.png``.

The methods do the same work up to each library's conventions (e.g. LibMTL gives the task
heads sum_t grad L_t under MGDA, polytask alpha-weighted ones; TorchJD's UPGrad regularises its
QP; polytask's RLW and ``ew`` are loss weightings, one backward, where TorchJD's Random and Mean
aggregate the Jacobian): this measures speed, not equality of updates. Needs a separate
environment (never the project's .venv); one that reuses the project's packages (torch stays the
same build):

    python3 -m venv /tmp/bench-venv
    echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \\
        > /tmp/bench-venv/lib/python3.11/site-packages/project.pth
    /tmp/bench-venv/bin/pip install --no-deps libmtl==1.1.5
    /tmp/bench-venv/bin/pip install "torch==2.13.*" torchjd cvxpy ecos
    OMP_NUM_THREADS=1 /tmp/bench-venv/bin/python benchmarks/weighting_peers.py [--repeats 5] [--steps 10]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import time
import types
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from _common import RESULTS, markdown_table, setup, write_results
import polytask.weighting  # noqa: F401
from polytask.registry import ARCHITECTURES, SUITES, WEIGHTINGS
from polytask.tasks import InputSpec, Task
from polytask.weighting.base import GradContext

BATCH = 128
POLYTASK = {"ew": {}, "pcgrad": {}, "mgda": {"mode": "params", "normalization": "none"},
            "cagrad": {"c": 0.4}, "imtl": {"mode": "params"}, "gradvac": {"beta": 0.5},
            "gradnorm": {"alpha": 1.5}, "graddrop": {"leak": 0.0}, "uw": {}, "rlw": {}, "aligned-mtl": {},
            "fairgrad": {}, "nash-mtl": {}, "upgrad": {}, "dualproj": {}, "config": {}}
LIBMTL = {"ew": ("EW", {}), "pcgrad": ("PCGrad", {}), "mgda": ("MGDA", {"mgda_gn": "none"}),
          "cagrad": ("CAGrad", {"calpha": 0.4, "rescale": 1}), "imtl": ("IMTL", {}),
          "gradvac": ("GradVac", {"beta": 0.5}), "gradnorm": ("GradNorm", {"alpha": 1.5}),
          "graddrop": ("GradDrop", {"leak": 0.0}), "uw": ("UW", {})}
TORCHJD = ["ew", "rlw", "upgrad", "mgda", "dualproj", "config", "pcgrad", "cagrad", "imtl", "gradvac", "aligned-mtl",
           "fairgrad", "nash-mtl"]
AUTOGRAM = ["upgrad", "mgda", "dualproj", "pcgrad", "cagrad", "imtl", "gradvac", "aligned-mtl", "fairgrad"]
LIBRARIES = ("polytask", "libmtl", "torchjd", "torchjd-autogram")

Step = Callable[[], None]


@dataclass
class Case:
    """One model, batch and set of tasks every library trains on."""

    name: str
    tasks: list[Task]
    model: nn.Module
    x: Tensor
    y: dict[str, Tensor]
    shared_modules: list[str]   # attributes of the model holding its shared parameters (autogram's Engine)
    steps_factor: float = 1.0

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def loss_list(self, out: dict[str, Tensor]) -> list[Tensor]:
        return [t.loss(out[t.name], self.y[t.name]).mean() for t in self.tasks]

    def losses(self, out: dict[str, Tensor]) -> Tensor:
        return torch.stack(self.loss_list(out))


def synthetic(t: int, bottom: list[int], name: str, steps_factor: float = 1.0) -> Case:
    gen = torch.Generator().manual_seed(t)
    x, y = torch.randn(BATCH, 64, generator=gen), torch.randn(BATCH, t, generator=gen)
    tasks = [Task(f"t{i}", "regression") for i in range(t)]
    torch.manual_seed(0)
    model = ARCHITECTURES.create("shared-bottom", tasks, InputSpec("dense", dim=64), bottom=bottom, tower=[32])
    return Case(name, tasks, model, x, {f"t{i}": y[:, i] for i in range(t)}, ["bottom"], steps_factor)


def digits(arch: str) -> Case:
    suite = SUITES.create("digits-multi")
    x = suite.train.x[:BATCH].flatten(1)
    y = {k: v[:BATCH] for k, v in suite.train.y.items()}
    torch.manual_seed(0)
    spec = InputSpec("dense", dim=x.shape[1])
    if arch == "mmoe":
        model = ARCHITECTURES.create("mmoe", suite.tasks, spec, num_experts=8, expert=[64], tower=[32])
        return Case("digits-mmoe", suite.tasks, model, x, y, ["experts"])
    model = ARCHITECTURES.create("shared-bottom", suite.tasks, spec, bottom=[256, 256], tower=[32])
    return Case("digits-hps", suite.tasks, model, x, y, ["bottom"])


def polytask_step(case: Case, model: nn.Module, name: str) -> Step:
    weighting = WEIGHTINGS.create(name, case.names, **POLYTASK[name])
    ctx = GradContext(model, weighting.mode) if weighting.mode != "none" else None
    opt = torch.optim.SGD(list(model.parameters()) + list(weighting.parameters()), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if ctx is not None:
            ctx.reset()
        if weighting.mode == "rep":
            with model.representation_cut():
                out = model(case.x)
        else:
            out = model(case.x)
        weighting.backward(case.losses(out), ctx)
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


def libmtl_step(case: Case, model: nn.Module, name: str) -> Step:
    lw = import_libmtl_weighting()

    cls_name, kwargs = LIBMTL[name]
    shared = list(model.shared_parameters())
    rep_grad = name == "graddrop"
    if rep_grad and not hasattr(model, "bottom"):
        raise NotImplementedError("LibMTL's GradDrop needs its rep_grad forward, built here for hard sharing only")
    with torch.no_grad():
        first = case.losses(model(case.x)).numpy()

    class Host(getattr(lw, cls_name)):  # what LibMTL's MTLmodel (architecture + weighting) supplies
        def __init__(self) -> None:
            super().__init__()
            self.task_num, self.task_name, self.device, self.rep_grad = len(case.tasks), case.names, \
                torch.device("cpu"), rep_grad
            self.epoch, self.train_loss_buffer = 1, first[:, None].astype(np.float64)

        def get_share_params(self):  # type: ignore[no-untyped-def]
            return iter(shared)

        def zero_grad_share_params(self) -> None:  # encoder.zero_grad() as in the torch 1.x LibMTL targets
            for p in shared:
                if p.grad is not None:
                    p.grad.zero_()

    host = Host()
    host.init_param()
    opt = torch.optim.SGD(list(model.parameters()) + list(host.parameters()), lr=1e-3)

    def forward() -> dict[str, Tensor]:
        if not rep_grad:
            return model(case.x)
        host.rep = model.bottom(model.backbone(case.x))   # LibMTL's HPS forward with rep_grad=True
        host.rep_tasks = {t: host.rep.detach().clone().requires_grad_(True) for t in case.names}
        return {t: model.heads[t](host.rep_tasks[t]) for t in case.names}

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        host.backward(case.losses(forward()), **kwargs)
        opt.step()
    return step


def capture_features(model: nn.Module, store: list[Tensor]) -> None:
    """Record the tensors the task side reads (what polytask's ``boundary``/``cut`` mark) in ``store``."""
    boundary, cut = model.boundary, model.cut
    model.boundary = lambda rep: (store.append(rep), boundary(rep))[1]   # type: ignore[method-assign]
    model.cut = lambda parts: (store.extend(p for p in parts if p.requires_grad), cut(parts))[1]   # type: ignore


def torchjd_step(case: Case, model: nn.Module, name: str) -> Step:
    from torchjd import aggregation as agg
    from torchjd.autojac import jac_to_grad, mtl_backward

    t = len(case.tasks)
    aggregator = {"ew": agg.Mean, "rlw": agg.Random, "upgrad": agg.UPGrad, "mgda": agg.MGDA, "dualproj": agg.DualProj,
                  "config": agg.ConFIG, "pcgrad": agg.PCGrad, "cagrad": lambda: agg.CAGrad(c=0.4), "imtl": agg.IMTLG,
                  "gradvac": lambda: agg.GradVac(beta=0.5), "aligned-mtl": agg.AlignedMTL,
                  "fairgrad": lambda: agg.FairGrad(alpha=1.0),
                  "nash-mtl": lambda: agg.NashMTL(n_tasks=t, max_norm=1.0, update_weights_every=1, optim_niter=20),
                  }[name]()
    shared = list(model.shared_parameters())
    heads = [list(model.task_parameters(n)) for n in case.names]
    features: list[Tensor] = []
    capture_features(model, features)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        features.clear()
        losses = case.loss_list(model(case.x))
        mtl_backward(losses, features=features, tasks_params=heads, shared_params=shared)
        jac_to_grad(shared, aggregator)
        opt.step()
    return step


def autogram_step(case: Case, model: nn.Module, name: str) -> Step:
    """TorchJD's Gramian path: ``autogram.Engine`` on the shared modules, a Gramian weighting, then one
    backward of the weighted losses (every parameter gets sum_t w_t grad L_t)."""
    from torchjd import aggregation as agg
    from torchjd.autogram import Engine

    weighting = {"upgrad": agg.UPGradWeighting, "mgda": agg.MGDAWeighting, "dualproj": agg.DualProjWeighting,
                 "pcgrad": agg.PCGradWeighting, "cagrad": lambda: agg.CAGradWeighting(c=0.4),
                 "imtl": agg.IMTLGWeighting, "gradvac": lambda: agg.GradVacWeighting(beta=0.5),
                 "aligned-mtl": agg.AlignedMTLWeighting, "fairgrad": lambda: agg.FairGradWeighting(alpha=1.0)}[name]()
    engine = Engine(*(getattr(model, m) for m in case.shared_modules), batch_dim=None)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        losses = case.losses(model(case.x))
        losses.backward(weighting(engine.compute_gramian(losses)))
        opt.step()
    return step


MAKERS = {"polytask": (polytask_step, POLYTASK), "libmtl": (libmtl_step, LIBMTL), "torchjd": (torchjd_step, TORCHJD),
          "torchjd-autogram": (autogram_step, AUTOGRAM)}
NOTES = {("libmtl", "cagrad"): " (LibMTL 1.1.5's CAGrad objective reshapes the weights to (1, 3): 3 tasks only)"}


def run(case: Case, repeats: int, steps: int) -> list[dict[str, Any]]:
    steps = max(1, round(steps * case.steps_factor))
    t = len(case.tasks)
    configs: dict[tuple[str, str], Step] = {}
    failed: dict[tuple[str, str], str] = {}
    for lib in LIBRARIES:
        make, names = MAKERS[lib]
        for name in names:
            try:
                step = make(case, copy.deepcopy(case.model), name)
                step()
                configs[lib, name] = step
            except Exception as err:  # a peer that cannot run this case is reported, not timed
                failed[lib, name] = f"{type(err).__name__}: {str(err).splitlines()[0][:90]}{NOTES.get((lib, name), '')}"
    times: dict[tuple[str, str], list[float]] = {k: [] for k in configs}
    keys = list(configs)
    for round_ in range(repeats + 1):   # round 0 warms up; each round starts one configuration later
        for key in keys[round_ % len(keys):] + keys[:round_ % len(keys)]:
            step = configs[key]
            start = time.perf_counter()
            for _ in range(steps):
                step()
            if round_:
                times[key].append((time.perf_counter() - start) / steps * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for (lib, name), v in times.items():
        ours = med.get(("polytask", name))
        rows.append({"case": case.name, "T": t, "library": lib, "method": name, "ms_per_step": med[lib, name],
                     "min_ms": min(v), "max_ms": max(v), "per_polytask_ew": med[lib, name] / med["polytask", "ew"],
                     "peer_over_polytask": med[lib, name] / ours if lib != "polytask" and ours else None})
    rows += [{"case": case.name, "T": t, "library": lib, "method": name, "error": msg} for (lib, name), msg in failed.items()]
    print(f"{case.name} T={t}: {len(configs)} timed, {len(failed)} failed, load {os.getloadavg()[0]:.2f}", flush=True)
    return rows


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per case, T >= 4 and method: each peer's ms/step over polytask's (> 1: polytask is faster)."""
    out: dict[tuple[str, int, str], dict[str, Any]] = {}
    for r in rows:
        if r["T"] < 4 or r["library"] == "polytask" or r["method"] not in POLYTASK:
            continue
        row = out.setdefault((r["case"], r["T"], r["method"]), {"case": r["case"], "T": r["T"], "method": r["method"]})
        row[r["library"]] = "error" if "error" in r else r["peer_over_polytask"]
    return list(out.values())


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Median ms/step against T (synthetic case), one panel per method, one line per library."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from polytask.io import atomic_path

    timed = [r for r in rows if "ms_per_step" in r and r["case"] == "synthetic"]
    methods = [m for m in POLYTASK if m != "ew"]
    fig, axes = plt.subplots(4, 4, figsize=(16, 13), sharex=True)
    axes.flat[-1].axis("off")
    for ax, method in zip(axes.flat, methods):
        for lib, color in zip(LIBRARIES, ("tab:blue", "tab:orange", "tab:green", "tab:red")):
            pts = sorted((r["T"], r["ms_per_step"]) for r in timed if r["library"] == lib and r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), marker="o", color=color, label=lib)
        ew = sorted((r["T"], r["ms_per_step"]) for r in timed if r["library"] == "polytask" and r["method"] == "ew")
        ax.plot(*zip(*ew), color="gray", linestyle=":", label="polytask ew")
        ax.set_title(method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    axes.flat[0].legend(fontsize=8)
    fig.supxlabel("tasks T (synthetic hard-sharing MLP)")
    fig.supylabel("ms per step (median)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 3, 4, 8, 16], help="T of the synthetic case")
    parser.add_argument("--wide-tasks", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--cases", nargs="+", default=["synthetic", "wide", "digits-hps", "digits-mmoe"])
    args = parser.parse_args()
    env = {**setup(1), "libmtl": version("LibMTL"), "torchjd": version("torchjd"),
           "loadavg_start": os.getloadavg()[0]}
    cases = {"synthetic": lambda: [synthetic(t, [256, 256], "synthetic") for t in args.tasks],
             "wide": lambda: [synthetic(t, [1024, 1024], "wide", 0.25) for t in args.wide_tasks],
             "digits-hps": lambda: [digits("hps")], "digits-mmoe": lambda: [digits("mmoe")]}
    start = time.perf_counter()
    rows = [r for c in args.cases for case in cases[c]() for r in run(case, args.repeats, args.steps)]
    env["loadavg_end"] = os.getloadavg()[0]
    env["minutes"] = (time.perf_counter() - start) / 60
    shown = [{**r, "peer_over_polytask": "" if r.get("peer_over_polytask") is None else r["peer_over_polytask"]}
             for r in rows]
    md = (f"# Gradient weighting speed vs LibMTL {env['libmtl']} and TorchJD {env['torchjd']}\n\n"
          f"`benchmarks/weighting_peers.py --repeats {args.repeats} --steps {args.steps}`: cases and libraries "
          f"as in the script's docstring (batch {BATCH}), one thread (torch {env['torch']}), interleaved rounds, "
          f"median ms/step (range over rounds). `peer_over_polytask` > 1: the peer is slower than polytask's "
          f"same-named method. Load average {env['loadavg_start']:.2f} at start, {env['loadavg_end']:.2f} at end "
          f"(a shared 2-core machine); {env['minutes']:.1f} min.\n\n"
          "## Peer / polytask at T >= 4 (> 1: polytask faster)\n\n"
          + markdown_table(summary(rows), ["case", "T", "method", "libmtl", "torchjd", "torchjd-autogram"])
          + "\n## All rows\n\n"
          + markdown_table(shown, ["case", "T", "library", "method", "ms_per_step", "min_ms", "max_ms",
                                   "per_polytask_ew", "peer_over_polytask", "error"]))
    if "synthetic" in args.cases:
        plot(rows, str(RESULTS / "weighting_peers.png"))
        md += "\n![ms/step against T](weighting_peers.png)\n"
    write_results("weighting_peers", {"env": env, "args": vars(args), "rows": rows}, md)
    print(md)


if __name__ == "__main__":
    main()
