"""Per-step training-time overhead of ``vanishing`` versus other gradient monitors.

Run from the repository root::

    python bench/overhead.py                        # every model and variant
    python bench/overhead.py --models mlp --variants plain,vanishing-params,vanishing-all
    python bench/overhead.py --rounds 7 --steps 30 --json overhead.json

The comparison tools (wandb, tensorboard, cockpit) live in a separate environment,
``bench/.venv-compare`` (see ``bench/README.md``); run the script with
``bench/.venv-compare/bin/python bench/overhead.py`` to get their rows. Any variant whose
imports or set-up fail is skipped with a one-line reason, so the script also runs in the
project's own environment.

Method: for each model, every variant gets a fresh model built from the same seed, its own
optimizer and the same fixed batch. All variants of a model live in the same process and are
timed in interleaved rounds (round-robin, the order rotated each round), after a warm-up.
Each timed step is ``zero_grad; loss = lf(model(x), y); backward; step`` plus whatever the
tool does. Each block of steps ends with a flush of the tool's writer (where it has one)
and a pause (``--settle``), so that one tool's background work does not land on the next
variant's steps. The table reports the median per-step time over all rounds, and the ratio
of that median to the plain loop's; the mean is the blocks' wall time, flushes included,
over their steps, so it also carries the periodic costs that the median hides. The JSON
adds the 90th percentile and the maximum.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

SEED = 0
DEVICE = torch.device("cpu")  # --device


def _sync() -> None:
    """Wait for the GPU, so a step's time includes its kernels (no-op on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


VARIANTS: dict[str, str] = {
    "plain": "plain",
    "vanishing-params": "vanishing (gradients+updates)",
    "vanishing-all": "vanishing (all statistics)",
    "vanishing-all-every10": "vanishing (all statistics, every=10)",
    "vanishing-all-every10-low-memory": "vanishing (all statistics, every=10, low_memory)",
    "floor": "bare tensor ops of exact grad+update stats",
    "floor-fused": "bare fused kernels (torch.compile) of exact grad+update stats",
    "vanishing-params-fused": "vanishing (gradients+updates), VANISHING_FUSED=1",
    "vanishing-all-fused": "vanishing (all statistics), VANISHING_FUSED=1",
    "vanishing-params-noflush": "vanishing (gradients+updates), denormals not flushed",
    "baseline-params": "--baseline-src's vanishing (gradients+updates)",
    "baseline-all": "--baseline-src's vanishing (all statistics)",
    "baseline-all-every10": "--baseline-src's vanishing (all statistics, every=10)",
    "wandb": "wandb.watch (gradients, log_freq=1)",
    "tensorboard": "tensorboard (add_histogram grads)",
    "cockpit": "cockpit (economy)",
}
MODELS = ("mlp", "transformer")
#: only when named in --models: GPU-sized, and a small net whose steps are bound by Python
#: (the size of repair's probes and of teaching examples)
EXTRA_MODELS = ("transformer-large", "mlp-small")


class Skip(Exception):
    """A variant cannot run here; the message says why."""


# --------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """A model family, its optimizer and one fixed batch."""

    name: str
    build: Callable[[], nn.Module]
    make_opt: Callable[[nn.Module], torch.optim.Optimizer]
    x: torch.Tensor
    y: torch.Tensor

    def fresh(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(SEED)
        model = self.build().to(DEVICE)
        model.train()
        return model, self.make_opt(model)


def _mlp() -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(20):
        layers += [nn.Linear(256, 256), nn.Sigmoid()]
    layers.append(nn.Linear(256, 10))
    return nn.Sequential(*layers)


def _mlp_small() -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(32, 32)]
    for _ in range(9):
        layers += [nn.Sigmoid(), nn.Linear(32, 32)]
    layers += [nn.Sigmoid(), nn.Linear(32, 10)]
    return nn.Sequential(*layers)


class MeanPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def _transformer() -> nn.Module:
    layer = nn.TransformerEncoderLayer(
        d_model=128, nhead=4, dim_feedforward=256, dropout=0.0, batch_first=True
    )
    encoder = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
    return nn.Sequential(encoder, MeanPool(), nn.Linear(128, 10))


def _transformer_large() -> nn.Module:
    layer = nn.TransformerEncoderLayer(
        d_model=768, nhead=12, dim_feedforward=3072, dropout=0.0, batch_first=True, norm_first=True
    )
    encoder = nn.TransformerEncoder(layer, num_layers=12, enable_nested_tensor=False)
    return nn.Sequential(encoder, MeanPool(), nn.Linear(768, 10))


def make_task(name: str) -> Task:
    gen = torch.Generator().manual_seed(SEED + 1)
    if name == "mlp":
        x = torch.randn(128, 256, generator=gen).to(DEVICE)
        y = torch.randint(0, 10, (128,), generator=gen).to(DEVICE)
        return Task(name, _mlp, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), x, y)
    if name == "mlp-small":  # 11 Linear + 10 Sigmoid, width 32, batch 64
        x = torch.randn(64, 32, generator=gen).to(DEVICE)
        y = torch.randint(0, 10, (64,), generator=gen).to(DEVICE)
        return Task(name, _mlp_small, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), x, y)
    if name == "transformer":
        x = torch.randn(32, 32, 128, generator=gen).to(DEVICE)  # batch 32, seq 32, d_model 128
        y = torch.randint(0, 10, (32,), generator=gen).to(DEVICE)
        return Task(name, _transformer, lambda m: torch.optim.Adam(m.parameters()), x, y)
    if name == "transformer-large":  # 85M parameters, batch 16 x 256 tokens
        x = torch.randn(16, 256, 768, generator=gen).to(DEVICE)
        y = torch.randint(0, 10, (16,), generator=gen).to(DEVICE)
        return Task(name, _transformer_large, lambda m: torch.optim.AdamW(m.parameters()), x, y)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


# ------------------------------------------------------------------------ variants


@dataclass
class Runner:
    """One variant, set up and ready: ``step()`` runs one timed training step."""

    key: str
    step: Callable[[], None]
    close: Callable[[], None] = lambda: None
    drain: Callable[[], None] = lambda: None  # push buffered output out, end of each block
    rounds: int | None = None  # None: every round
    steps: int | None = None  # None: the common --steps
    warmup: int | None = None
    times: list[float] = field(default_factory=list)
    block_time: float = 0.0  # wall time of all blocks, drains included
    memory: Callable[[], dict] | None = None  # vanishing's Monitor.memory, read before close
    held: dict | None = None


def plain_step(model, opt, lf, x, y) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        opt.zero_grad()
        loss = lf(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def setup_plain(task: Task, tmp: Path, args) -> Runner:
    model, opt = task.fresh()
    return Runner("plain", plain_step(model, opt, nn.CrossEntropyLoss(), task.x, task.y))


def _vanishing_runner(
    key: str, stats: str, task: Task, tmp: Path, every: int = 1, **options
) -> Runner:
    try:
        import vanishing
    except Exception as exc:  # any import failure means "skip"
        raise Skip(f"import vanishing failed: {type(exc).__name__}: {exc}") from exc
    if not hasattr(vanishing, "watch"):
        raise Skip("vanishing has no watch() (package not built yet?)")
    model, opt = task.fresh()
    mon = vanishing.watch(
        model, optimizer=opt, stats=stats, every=every, run_dir=tmp / key, **options
    )
    stack = contextlib.ExitStack()
    stack.enter_context(mon)
    step = plain_step(model, opt, nn.CrossEntropyLoss(), task.x, task.y)
    return Runner(
        key,
        step,
        close=stack.close,
        drain=getattr(mon, "flush", lambda: None),
        memory=getattr(mon, "memory", None),
    )


_BASELINE: Any = None  # an older vanishing, loaded by --baseline-src as vanishing_baseline


def _load_baseline(src: Path) -> Any:
    """An older checkout's package (``src/vanishing``) importable beside this one, as
    ``vanishing_baseline``: a copy with its imports renamed, so both run in one process and are
    timed in the same interleaved rounds (a before/after comparison of the monitor itself)."""
    import importlib
    import re
    import shutil

    root = Path(tempfile.mkdtemp(prefix="vanishing-baseline-"))
    shutil.copytree(src / "vanishing", root / "vanishing_baseline")
    for py in (root / "vanishing_baseline").rglob("*.py"):
        text = re.sub(r"\bvanishing\b(?=[.\s]|$)", "vanishing_baseline", py.read_text(), flags=re.M)
        py.write_text(text)
    sys.path.insert(0, str(root))
    return importlib.import_module("vanishing_baseline")


def _baseline_runner(key: str, stats: str, task: Task, tmp: Path, every: int = 1) -> Runner:
    if _BASELINE is None:
        raise Skip("no --baseline-src given")
    model, opt = task.fresh()
    mon = _BASELINE.watch(model, optimizer=opt, stats=stats, every=every, run_dir=tmp / key)
    stack = contextlib.ExitStack()
    stack.enter_context(mon)
    step = plain_step(model, opt, nn.CrossEntropyLoss(), task.x, task.y)
    return Runner(key, step, close=stack.close, drain=mon.flush)


def setup_baseline_params(task: Task, tmp: Path, args) -> Runner:
    return _baseline_runner("baseline-params", "parameters", task, tmp)


def setup_baseline_all(task: Task, tmp: Path, args) -> Runner:
    return _baseline_runner("baseline-all", "all", task, tmp)


def setup_baseline_all_every10(task: Task, tmp: Path, args) -> Runner:
    return _baseline_runner("baseline-all-every10", "all", task, tmp, every=10)


def setup_vanishing_params(task: Task, tmp: Path, args) -> Runner:
    return _vanishing_runner("vanishing-params", "parameters", task, tmp)


def _fused_runner(key: str, stats: str, task: Task, tmp: Path) -> Runner:
    """The monitor with ``VANISHING_FUSED=1`` (kernels compiled here, in the set-up, untimed)."""
    from vanishing.stats import fused

    os.environ[fused.ENV] = "1"
    try:
        runner = _vanishing_runner(key, stats, task, tmp)
    finally:
        del os.environ[fused.ENV]
    return runner


def setup_vanishing_params_fused(task: Task, tmp: Path, args) -> Runner:
    return _fused_runner("vanishing-params-fused", "parameters", task, tmp)


def setup_vanishing_all_fused(task: Task, tmp: Path, args) -> Runner:
    return _fused_runner("vanishing-all-fused", "all", task, tmp)


def setup_vanishing_params_noflush(task: Task, tmp: Path, args) -> Runner:
    """The monitor with its flush-to-zero switched off (the A/B of that switch alone)."""
    from vanishing.stats import norms

    runner = _vanishing_runner("vanishing-params-noflush", "parameters", task, tmp)
    inner = runner.step

    class NoFlush:
        __slots__ = ("on",)

        def __enter__(self) -> bool:
            self.on = norms._flushes_denormals()
            return self.on

        def __exit__(self, *exc) -> None:
            pass

    def step() -> None:
        saved = norms.flush_denormals
        norms.flush_denormals = NoFlush  # the probes look it up at call time
        params_mod = sys.modules["vanishing.probes.params"]
        saved_p = params_mod.flush_denormals
        params_mod.flush_denormals = NoFlush
        try:
            inner()
        finally:
            norms.flush_denormals = saved
            params_mod.flush_denormals = saved_p

    runner.step = step
    return runner


def setup_vanishing_all(task: Task, tmp: Path, args) -> Runner:
    return _vanishing_runner("vanishing-all", "all", task, tmp)


def setup_vanishing_all_every10(task: Task, tmp: Path, args) -> Runner:
    return _vanishing_runner("vanishing-all-every10", "all", task, tmp, every=10)


def setup_vanishing_all_every10_low_memory(task: Task, tmp: Path, args) -> Runner:
    key = "vanishing-all-every10-low-memory"
    return _vanishing_runner(key, "all", task, tmp, every=10, low_memory=True)


def setup_floor(task: Task, tmp: Path, args) -> Runner:
    """The bare tensor work of an exact gradient + update measurement, with no bookkeeping.

    Per step: every gradient's norm (one multi-tensor norm), then, for the parameters grouped
    by size into a persistent snapshot, the change the step made (subtract in place, row
    norms) and the next snapshot (copy, row norms): three reads of the gradients/weights and
    two of the snapshot, the least a measurement of the actual update can touch with PyTorch's
    kernels. Nothing is recorded; it shows how far below ``vanishing-params`` the cost can go.
    """
    model, opt = task.fresh()
    params = [p.detach() for p in model.parameters()]
    groups: dict[int, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault(p.numel(), []).append(p.view(-1))
    snaps = {n: torch.stack(ps) for n, ps in groups.items()}
    rows = {n: list(s.unbind(0)) for n, s in snaps.items()}
    sync = DEVICE.type == "cpu"  # reading values back is free on the CPU only

    def grad_norms(*_args) -> None:
        norms = torch.stack(torch._foreach_norm([p.grad for p in model.parameters()]))
        if sync:
            norms.tolist()

    def update_norms(*_args) -> None:
        for n, ps in groups.items():
            torch._foreach_sub_(rows[n], ps)
            u = torch.linalg.vector_norm(snaps[n], dim=1)
            torch.stack(ps, out=snaps[n])
            w = torch.linalg.vector_norm(snaps[n], dim=1)
            if sync:
                u.tolist(), w.tolist()

    return _hooked_runner("floor", task, model, opt, grad_norms, update_norms)


def _hooked_runner(key: str, task: Task, model, opt, before, after) -> Runner:
    """A plain step with ``before`` / ``after`` as the optimizer's step pre / post hooks."""
    handles = [opt.register_step_pre_hook(before), opt.register_step_post_hook(after)]

    def close() -> None:
        for h in handles:
            h.remove()

    step = plain_step(model, opt, nn.CrossEntropyLoss(), task.x, task.y)
    return Runner(key, step, close=close)


def setup_floor_fused(task: Task, tmp: Path, args) -> Runner:
    """The bare fused kernels of :mod:`vanishing.stats.fused`, with no bookkeeping.

    Per step: one compiled kernel for the float64 squares of all gradients, one for the update
    (per parameter: the difference from a snapshot and the new weights' squares in one pass,
    and the snapshot refilled), each read back as one list. Compiled here, untimed.
    """
    if DEVICE.type != "cpu":
        raise Skip("the fused measurement is built for the CPU")
    try:
        from vanishing.stats import fused
    except Exception as exc:
        raise Skip(f"import vanishing.stats.fused failed: {exc}") from exc
    model, opt = task.fresh()
    params = [p.detach() for p in model.parameters()]
    try:
        grads_kernel = fused.FusedSquareNorms(params)
        update_kernel = fused.FusedUpdate(params)
    except fused.FusedUnavailable as exc:
        raise Skip(f"no fused kernels here: {exc}") from exc
    update_kernel.refill()

    def grad_norms(*_args) -> None:
        grads_kernel([p.grad for p in model.parameters()])

    def update_norms(*_args) -> None:
        update_kernel.step()

    return _hooked_runner("floor-fused", task, model, opt, grad_norms, update_norms)


def setup_wandb(task: Task, tmp: Path, args) -> Runner:
    # Offline, quiet, and every file wandb writes kept under the temp dir.
    wdir = tmp / "wandb"
    wdir.mkdir(parents=True, exist_ok=True)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        os.environ[var] = str(wdir)
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONSOLE="off")
    try:
        import wandb
    except ImportError as exc:
        raise Skip(f"import wandb failed: {exc}") from exc
    run = wandb.init(
        mode="offline",
        dir=str(wdir),
        project="vanishing-bench",
        name=f"overhead-{task.name}",
        settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
    )
    model, opt = task.fresh()
    # wandb.watch registers a tensor hook on every parameter; with log_freq=1 each hook
    # fires on every backward and computes a 64-bin histogram (min, max, histc, .tolist())
    # that it sends to the wandb service process as a partial history row.
    run.watch(model, log="gradients", log_freq=1)
    lf = nn.CrossEntropyLoss()
    inner = plain_step(model, opt, lf, task.x, task.y)

    def step() -> None:
        loss = inner()
        # Commit the row, so each step's histograms are written out rather than merged
        # into one pending row (this is how wandb.watch is used in a real loop).
        run.log({"loss": loss.item()})

    def close() -> None:
        run.unwatch(model)
        run.finish()

    return Runner("wandb", step, close=close)


def setup_tensorboard(task: Task, tmp: Path, args) -> Runner:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise Skip(f"import torch.utils.tensorboard failed: {exc}") from exc
    writer = SummaryWriter(log_dir=str(tmp / "tensorboard"))
    model, opt = task.fresh()
    lf = nn.CrossEntropyLoss()
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    counter = [0]

    def step() -> None:
        opt.zero_grad()
        loss = lf(model(task.x), task.y)
        loss.backward()
        for name, p in params:
            writer.add_histogram(f"grad/{name}", p.grad, counter[0])
        opt.step()
        counter[0] += 1

    return Runner("tensorboard", step, close=writer.close, drain=writer.flush)


def setup_cockpit(task: Task, tmp: Path, args) -> Runner:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pkg_resources deprecation, from cockpit
            from backpack import extend
            from cockpit import Cockpit
            from cockpit.utils.configuration import configuration
    except ImportError as exc:
        raise Skip(f"import cockpit/backpack failed: {exc}") from exc
    model, opt = task.fresh()
    unsupported = sorted(
        {type(m).__name__ for m in model.modules() if isinstance(m, UNSUPPORTED_BY_BACKPACK)}
    )
    if unsupported:
        raise Skip(
            "BackPACK has no per-sample-gradient extension for "
            + ", ".join(unsupported)
            + " (cockpit's economy quantities need one)"
        )
    model = extend(model)
    lf = extend(nn.CrossEntropyLoss(reduction="mean"))
    individual_lf = nn.CrossEntropyLoss(reduction="none")
    ck = Cockpit(model.parameters(), quantities=configuration("economy"))
    global_step = [0]

    def step() -> None:
        opt.zero_grad()
        out = model(task.x)
        loss = lf(out, task.y)
        losses = individual_lf(out, task.y)
        info = {
            "batch_size": task.x.shape[0],
            "individual_losses": losses,
            "loss": loss,
            "optimizer": opt,
        }
        with ck(global_step[0], info=info):
            loss.backward(create_graph=ck.create_graph(global_step[0]))
        opt.step()
        global_step[0] += 1

    return Runner("cockpit", step, rounds=args.cockpit_rounds, steps=args.cockpit_steps, warmup=1)


# Modules with parameters for which BackPACK 1.7 has no BatchGrad extension: Cockpit's
# per-sample quantities (GradHist1d, the tests) then fail inside backward().
UNSUPPORTED_BY_BACKPACK = (nn.LayerNorm, nn.MultiheadAttention)


SETUPS: dict[str, Callable[[Task, Path, argparse.Namespace], Runner]] = {
    "plain": setup_plain,
    "vanishing-params": setup_vanishing_params,
    "vanishing-all": setup_vanishing_all,
    "vanishing-all-every10": setup_vanishing_all_every10,
    "vanishing-all-every10-low-memory": setup_vanishing_all_every10_low_memory,
    "floor": setup_floor,
    "floor-fused": setup_floor_fused,
    "vanishing-params-fused": setup_vanishing_params_fused,
    "vanishing-all-fused": setup_vanishing_all_fused,
    "vanishing-params-noflush": setup_vanishing_params_noflush,
    "baseline-params": setup_baseline_params,
    "baseline-all": setup_baseline_all,
    "baseline-all-every10": setup_baseline_all_every10,
    "wandb": setup_wandb,
    "tensorboard": setup_tensorboard,
    "cockpit": setup_cockpit,
}


# ------------------------------------------------------------------------- driver


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def bench_model(task: Task, keys: list[str], tmp: Path, args) -> list[dict]:
    runners: list[Runner] = []
    rows: list[dict] = []
    try:
        for key in keys:
            try:
                runner = SETUPS[key](task, tmp, args)
            except Skip as exc:
                print(f"skip {task.name} / {key}: {exc}", flush=True)
                rows.append(_row(task.name, key, skipped=str(exc)))
                continue
            except Exception as exc:  # report it and go on with the rest
                print(f"skip {task.name} / {key}: set-up failed: {_first_line(exc)}", flush=True)
                rows.append(_row(task.name, key, skipped=f"set-up failed: {_first_line(exc)}"))
                continue
            try:
                for _ in range(args.warmup if runner.warmup is None else runner.warmup):
                    runner.step()
            except Exception as exc:
                print(f"skip {task.name} / {key}: warm-up failed: {_first_line(exc)}", flush=True)
                rows.append(_row(task.name, key, skipped=f"warm-up failed: {_first_line(exc)}"))
                _close(runner)
                continue
            runners.append(runner)

        for r in range(args.rounds):
            shift = r % max(len(runners), 1)
            for runner in runners[shift:] + runners[:shift]:
                if not _takes_part(runner, r, args.rounds):
                    continue
                start = time.perf_counter()
                _sync()
                for _ in range(runner.steps or args.steps):
                    t0 = time.perf_counter()
                    runner.step()
                    _sync()
                    runner.times.append(time.perf_counter() - t0)
                runner.drain()
                runner.block_time += time.perf_counter() - start
                # Let background work (writer threads, wandb's service process) finish
                # before the next variant's block, rather than slowing that one down.
                time.sleep(args.settle)
            print(f"  {task.name}: round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        for runner in runners:
            if runner.memory is not None:
                runner.held = runner.memory()
            _close(runner)

    plain = next((r for r in runners if r.key == "plain"), None)
    base = statistics.median(plain.times) if plain and plain.times else None
    for runner in runners:
        med = statistics.median(runner.times)
        rows.append(
            _row(
                task.name,
                runner.key,
                median_ms=med * 1e3,
                mean_ms=runner.block_time / len(runner.times) * 1e3,
                p90_ms=statistics.quantiles(runner.times, n=10)[-1] * 1e3
                if len(runner.times) > 1
                else med * 1e3,
                max_ms=max(runner.times) * 1e3,
                ratio=med / base if base else None,
                n_steps=len(runner.times),
                memory=runner.held,
            )
        )
    order = {k: i for i, k in enumerate(keys)}
    return sorted(rows, key=lambda row: order[row["key"]])


def _takes_part(runner: Runner, r: int, rounds: int) -> bool:
    """Runners with fewer rounds than the rest take part in rounds spread evenly."""
    if runner.rounds is None or runner.rounds >= rounds:
        return True
    picked = {round(i * (rounds - 1) / max(runner.rounds - 1, 1)) for i in range(runner.rounds)}
    return r in picked


def _close(runner: Runner) -> None:
    try:
        runner.close()
    except Exception as exc:
        print(f"warning: closing {runner.key} failed: {_first_line(exc)}", file=sys.stderr)


def _row(model: str, key: str, **values) -> dict:
    row = {
        "model": model,
        "key": key,
        "variant": VARIANTS[key],
        "median_ms": None,
        "mean_ms": None,
        "p90_ms": None,
        "max_ms": None,
        "ratio": None,
        "n_steps": 0,
        "skipped": None,
        "memory": None,  # Monitor.memory() after the last step (bytes)
    }
    row.update(values)
    return row


def print_table(rows: list[dict]) -> None:
    head = (
        "model",
        "variant",
        "median ms/step",
        "mean ms/step",
        "x plain",
        "steps",
        "held MB (snapshot)",
    )
    lines = []
    for row in rows:
        if row["skipped"]:
            lines.append((row["model"], row["variant"], "skipped", "", "", "", ""))
            continue
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "n/a"
        mem = row.get("memory")
        held = "" if not mem else f"{mem['held'] / 2**20:.2f} ({mem['snapshot'] / 2**20:.2f})"
        lines.append(
            (
                row["model"],
                row["variant"],
                f"{row['median_ms']:.2f}",
                f"{row['mean_ms']:.2f}",
                ratio,
                str(row["n_steps"]),
                held,
            )
        )
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines, strict=False)]
    align = ["<", "<", ">", ">", ">", ">", ">"]

    def fmt(cells) -> str:
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, align, widths, strict=False))

    print(fmt(head))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print(fmt(line))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--models",
        default=",".join(MODELS),
        help="comma list: mlp,transformer (default), transformer-large (85M parameters, for GPUs)",
    )
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma list from: {', '.join(VARIANTS)} (plain is always added)",
    )
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per round (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant (default 5)")
    p.add_argument("--cockpit-rounds", type=int, default=3, help="rounds for cockpit (3)")
    p.add_argument("--cockpit-steps", type=int, default=3, help="steps per round, cockpit (3)")
    p.add_argument(
        "--settle",
        type=float,
        default=0.5,
        help="seconds of pause after each block, for background work to finish (0.5)",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument(
        "--baseline-src",
        type=Path,
        metavar="DIR",
        help="the src/ folder of an older checkout (e.g. a git worktree): adds the variants "
        "baseline-params and baseline-all, its monitor timed beside this one",
    )
    args = p.parse_args(argv)
    if args.baseline_src is not None:
        global _BASELINE
        if not (args.baseline_src / "vanishing" / "__init__.py").is_file():
            p.error(f"--baseline-src {args.baseline_src}: no vanishing package there")
        _BASELINE = _load_baseline(args.baseline_src)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in args.model_list:
        if m not in MODELS + EXTRA_MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS + EXTRA_MODELS)}")
    keys = [v.strip() for v in args.variants.split(",") if v.strip()]
    for k in keys:
        if k not in VARIANTS:
            p.error(f"unknown variant {k!r}; choose from {', '.join(VARIANTS)}")
    args.keys = ["plain"] + [k for k in dict.fromkeys(keys) if k != "plain"]
    if min(args.rounds, args.steps, args.cockpit_rounds, args.cockpit_steps) < 1:
        p.error("--rounds, --steps, --cockpit-rounds and --cockpit-steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"python {platform.python_version()}, {platform.machine()}; "
        f"{args.rounds} rounds x {args.steps} steps "
        f"(cockpit {args.cockpit_rounds} x {args.cockpit_steps})",
        flush=True,
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5:
        print(
            f"warning: load average {load:.1f} before start; other processes on this "
            "machine will make the timings noisy",
            flush=True,
        )
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="vanishing-bench-") as tmp:
        for name in args.model_list:
            task = make_task(name)
            model_tmp = Path(tmp) / name
            model_tmp.mkdir()
            rows += bench_model(task, args.keys, model_tmp, args)
            gc.collect()
    print()
    print_table(rows)
    if args.json:
        meta = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "rounds": args.rounds,
            "steps": args.steps,
            "warmup": args.warmup,
            "cockpit_rounds": args.cockpit_rounds,
            "cockpit_steps": args.cockpit_steps,
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
