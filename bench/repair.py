"""Verified repair on the labelled benchmark (tests/cases/), against AUTOTRAINER's fixed order.

For every case of ``tests/cases/catalog.py``, ``vanishing.repair`` runs on the case's model,
batches, loss and optimizer (a fresh optimizer of the same class and hyperparameters per copy)
with K steps per candidate. Per pathological case this records whether it was *repaired*, the
chosen remedy and the time; per healthy case, whether repair left it alone ("nothing to repair").

**Repaired** (one criterion for both tools): every finding kind the case requires is absent
after the candidate's K steps, no critical kind appears that the baseline did not show, and the
candidate's loss (mean of the last 10% of the K steps) is below the baseline's by the margin
(5% of the baseline loss; any finite loss beats a baseline that diverged). For ``vanishing`` the
candidate is ``rep.best`` (the first ``fixed`` one: its prompting findings gone and its loss
lower), checked against this criterion as well.

**AUTOTRAINER** (Zhang et al., "AUTOTRAINER: An Automatic DNN Training Problem Detection and
Repair System", ICSE 2021), re-implemented from its published code (github.com/shiningrain/
AUTOTRAINER, ``AutoTrainer/utils/repair.py``, ``repair_strategy('balance')``, the default):
a fixed order per problem, tried one after the other until one works:

- gradient vanish: ``selu_1, relu_1, bn_1`` (SELU with LeCun init; ReLU with He init and zero
  biases, the He init alone on a model already of ReLUs; batch norm after every dense/conv
  layer);
- gradient explode: ``selu_1, relu_1, gradient_2, tanh_1, bn_1`` (``gradient_2``: Keras'
  ``clipvalue`` drawn from U(9, 10): here value clipping at 9.5, one attempt; ``tanh_1``: there
  is no tanh transformation here, so it is skipped);
- dying ReLU: ``selu_1, bn_1, initial_3, leaky_3`` (``initial_3``: three initialisers, here He,
  LeCun, Xavier in that order instead of random draws; ``leaky_3``: LeakyReLU, ELU (the third,
  ThresholdedReLU, has no transformation here)).

AUTOTRAINER treats NaN as an exploding gradient, so ``non_finite`` cases get the exploding order;
it has no problem class for saturation or stalled layers: those get the vanishing order (their
symptom). Each attempt is one K-step probe from the same seed on the same batches, judged by the
same criterion against the same baseline; the budget is the same (at most 8 attempts of K steps).

Every case runs on one thread (the machine is shared); times are wall-clock under contention.

Run from the repository root::

    python bench/repair.py                 # K = 100; prints the tables
    python bench/repair.py --steps 200 --json out.json
    python bench/repair.py --write-docs    # and replaces the tables in docs/repair.md
    python bench/repair.py --cases sigmoid_deep_normal dead_relu_mlp_partial
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from cases.catalog import CASES, Case, train  # noqa: E402

START, END = "<!-- bench/repair.py: start -->", "<!-- bench/repair.py: end -->"
MARGIN = 0.05

#: AUTOTRAINER's steps as (label, model remedies, loop options); "balance" strategy.
SELU = ("selu_1", ("selu",), {})
RELU = ("relu_1", ("relu",), {})
BN = ("bn_1", ("batch_norm",), {})
CLIP = ("gradient_2", (), {"clip_value": 9.5})
INITIAL = [(f"initial_3 ({r})", (r,), {}) for r in ("he_init", "lecun_init", "xavier_init")]
LEAKY = [(f"leaky_3 ({r})", (r,), {}) for r in ("leaky_relu", "elu")]
AUTOTRAINER_ORDER = {
    "vanishing_gradient": [SELU, RELU, BN],
    "exploding_gradient": [SELU, RELU, CLIP, BN],  # tanh_1: no transformation, skipped
    "dead_units": [SELU, BN, *INITIAL, *LEAKY],
}
AUTOTRAINER_ORDER["non_finite"] = AUTOTRAINER_ORDER["exploding_gradient"]
AUTOTRAINER_ORDER["saturated_activations"] = AUTOTRAINER_ORDER["vanishing_gradient"]
AUTOTRAINER_ORDER["stalled_layers"] = AUTOTRAINER_ORDER["vanishing_gradient"]


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def repaired(required, baseline_loss, critical_before, loss, findings, diverged) -> bool:
    """The benchmark's one criterion (module doc)."""
    if diverged or not math.isfinite(loss):
        return False
    kinds = {f.kind for f in findings}
    critical = {f.kind for f in findings if f.severity == "critical"}
    if any(k in kinds for k in required) or (critical - critical_before):
        return False
    if not math.isfinite(baseline_loss):
        return True
    return loss < baseline_loss - MARGIN * abs(baseline_loss)


def plain_seconds(case: Case, steps: int) -> float:
    """K steps of the case's own loop, unwatched: the unit of training time."""
    job = case.build()
    start = time.perf_counter()
    train(job, steps)
    return time.perf_counter() - start


def autotrainer(case: Case, rep, steps: int) -> dict:
    """AUTOTRAINER's fixed order on the case, judged like ours; stops at the first success."""
    from vanishing.repair.engine import probe
    from vanishing.repair.transforms import NotApplicable

    order = AUTOTRAINER_ORDER[case.required[0]]
    critical_before = {f.kind for f in rep.baseline_findings if f.severity == "critical"}
    tried, seconds = [], rep.baseline_seconds  # it trains the baseline too
    for label, remedies, loop in order:
        job = case.build()
        try:
            p = probe(
                job.model,
                job.batches,
                job.loss_fn,
                optimizer=job.optimizer,
                steps=steps,
                seed=rep.seed,
                remedies=remedies,
                clip_value=loop.get("clip_value"),
            )
        except NotApplicable as e:
            if remedies != ("relu",):
                tried.append({"step": label, "skipped": str(e)})
                continue
            # AUTOTRAINER's relu_1 is He-uniform init + ReLU: on a model already of ReLUs
            # (nothing to swap) it is the re-initialisation alone
            job = case.build()
            p = probe(
                job.model,
                job.batches,
                job.loss_fn,
                optimizer=job.optimizer,
                steps=steps,
                seed=rep.seed,
                remedies=("he_init",),
            )
        seconds += p.seconds
        ok = repaired(
            case.required,
            rep.loss_before,
            critical_before,
            p.loss,
            p.diagnosis.findings,
            p.diverged,
        )
        tried.append(
            {
                "step": label,
                "loss": p.loss,
                "ok": ok,
                "kinds": sorted({f.kind for f in p.diagnosis.findings}),
            }
        )
        if ok:
            return {
                "fixed": True,
                "remedy": label,
                "loss": p.loss,
                "tried": tried,
                "attempts": sum("loss" in t for t in tried),
                "seconds": seconds,
            }
    return {
        "fixed": False,
        "remedy": None,
        "loss": None,
        "tried": tried,
        "attempts": sum("loss" in t for t in tried),
        "seconds": seconds,
    }


def timed_repair(case: Case, steps: int, **options):
    """``vanishing.repair`` on a fresh build of the case: (the Repair, its wall seconds)."""
    return timed_job_repair(case.build(), steps, **options)


def timed_job_repair(job, steps: int, **options):
    """``vanishing.repair`` on a built job (model, optimizer, batches, loss): (Repair, seconds)."""
    from vanishing.repair import repair

    start = time.perf_counter()
    rep = repair(
        job.model,
        job.batches,
        job.loss_fn,
        optimizer=job.optimizer,
        steps=steps,
        progress=False,
        **options,
    )
    return rep, time.perf_counter() - start


def evaluate(case: Case, steps: int, with_autotrainer: bool, **options) -> dict:
    rep, seconds = timed_repair(case, steps, **options)
    out = {
        "case": case.name,
        "family": case.family,
        "required": list(case.required),
        "healthy_case": case.healthy,
        "nothing_to_repair": rep.healthy,
        "baseline_kinds": sorted({f.kind for f in rep.baseline_findings}),
        "loss_before": rep.loss_before,
        "candidates": len(rep.candidates),
        "skipped": len(rep.skipped),
        "seconds": seconds,
        "unit_seconds": plain_seconds(case, steps),
        "verdicts": {c.label: c.verdict for c in rep.candidates},
        "diagnosed": sum(c.diagnosed for c in rep.candidates) + 1,
    }
    best = rep.best
    critical_before = {f.kind for f in rep.baseline_findings if f.severity == "critical"}
    out["chosen"] = None if best is None else best.label
    out["chosen_loss"] = None if best is None else best.loss_after
    out["repaired"] = bool(
        best is not None
        and not case.healthy
        and repaired(
            case.required,
            rep.loss_before,
            critical_before,
            best.loss_after,
            best.findings_after,
            best.diverged,
        )
    )
    out["applies"] = bool(rep.candidates)
    if with_autotrainer and not case.healthy:
        out["autotrainer"] = autotrainer(case, rep, steps)
    return out


def _fmt(x):
    return "-" if x is None else (f"{x:.3g}" if isinstance(x, float) else str(x))


def tables(rows: list[dict], steps: int) -> str:
    sick = [r for r in rows if not r["healthy_case"]]
    healthy = [r for r in rows if r["healthy_case"]]
    applies = [r for r in sick if r["applies"]]
    lines = [
        f"K = {steps} steps per candidate; loss = mean of the last 10% of steps; margin 5%.",
        "",
        "| case | required | baseline finds | vanishing: chosen | loss before -> after | "
        "repaired | candidates | repair s | (N+1)·K plain s | AUTOTRAINER: first success "
        "(attempts) | loss | ours >= theirs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    at_least = []
    for r in sick:
        at = r.get("autotrainer") or {}
        if at.get("fixed"):
            ok = r["repaired"] and r["chosen_loss"] <= at["loss"] + MARGIN * abs(at["loss"])
        else:
            ok = True  # AUTOTRAINER found no fix: ours is at least as good
        r["at_least_as_good"] = ok
        at_least.append(ok)
        unit = r["unit_seconds"] * (r["candidates"] + 1)
        lines.append(
            f"| {r['case']} | {', '.join(r['required'])} | {', '.join(r['baseline_kinds']) or '-'}"
            f" | {_fmt(r['chosen'])} | {_fmt(r['loss_before'])} -> {_fmt(r['chosen_loss'])} | "
            f"{'yes' if r['repaired'] else 'no'} | {r['candidates']} | {r['seconds']:.1f} | "
            f"{unit:.1f} | {_fmt(at.get('remedy'))} ({at.get('attempts', 0)}) | "
            f"{_fmt(at.get('loss'))} | {'yes' if ok else 'no'} |"
        )
    n_rep = sum(r["repaired"] for r in applies)
    n_at = sum(bool((r.get("autotrainer") or {}).get("fixed")) for r in applies)
    ratios = [
        r["seconds"] / (r["unit_seconds"] * (r["candidates"] + 1)) for r in sick if r["candidates"]
    ]
    times = [r["seconds"] for r in sick]
    changed = [r["case"] for r in healthy if not r["nothing_to_repair"]]
    recommended = [r["case"] for r in healthy if r["chosen"] is not None]
    lines += [
        "",
        "| measure | value | target |",
        "| --- | --- | --- |",
        f"| pathological cases | {len(sick)} (a remedy applies: {len(applies)}) | |",
        f"| repaired by `vanishing.repair` | {n_rep}/{len(applies)} "
        f"({n_rep / max(1, len(applies)):.0%}) of those where a remedy applies; "
        f"{sum(r['repaired'] for r in sick)}/{len(sick)} of all | >= 90% |",
        f"| repaired by AUTOTRAINER's order | {n_at}/{len(applies)} "
        f"({n_at / max(1, len(applies)):.0%}) | |",
        f"| chosen remedy at least as good as AUTOTRAINER's first success | "
        f"{sum(at_least)}/{len(sick)} ({sum(at_least) / max(1, len(sick)):.0%}) | >= 90% |",
        f"| healthy cases changed (repair did not say nothing to repair) | {len(changed)}/"
        f"{len(healthy)}{': ' + ', '.join(changed) if changed else ''} | 0 |",
        f"| healthy cases with a change recommended (a fixed candidate) | {len(recommended)}/"
        f"{len(healthy)}{': ' + ', '.join(recommended) if recommended else ''} | 0 |",
        f"| median repair time (pathological) | {statistics.median(times):.1f} s | |"
        if times
        else "| median repair time | - | |",
        f"| median repair time / ((N+1) x K plain training steps) | "
        f"{statistics.median(ratios):.2f} | <= 1 |"
        if ratios
        else "| time ratio | - | |",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="K, steps per candidate")
    parser.add_argument("--cases", nargs="*", help="only these cases (by name)")
    parser.add_argument("--no-autotrainer", action="store_true")
    parser.add_argument(
        "--workers", type=int, default=0, help="repair(workers=): candidates in N processes"
    )
    parser.add_argument("--every", type=int, help="repair(every=): record every N-th step")
    parser.add_argument(
        "--no-refine", action="store_true", help="repair(refine=False): no round two"
    )
    parser.add_argument("--json", type=Path, help="write every row as JSON here")
    parser.add_argument(
        "--write-docs", action="store_true", help="replace the tables in docs/repair.md"
    )
    args = parser.parse_args(argv)
    cases = [c for c in CASES if not args.cases or c.name in args.cases]
    rows = []
    options = {"workers": args.workers, "refine": not args.no_refine}
    if args.every is not None:
        options["every"] = args.every
    warnings.simplefilter("ignore")
    with one_thread():
        for case in cases:
            t0 = time.perf_counter()
            row = evaluate(case, args.steps, not args.no_autotrainer, **options)
            rows.append(row)
            at = row.get("autotrainer") or {}
            print(
                f"{case.name}: chosen {row['chosen']} repaired={row['repaired']} "
                f"nothing_to_repair={row['nothing_to_repair']} autotrainer={at.get('remedy')}"
                f" ({time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    text = tables(rows, args.steps)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    if args.write_docs:
        doc = ROOT / "docs" / "repair.md"
        body = doc.read_text()
        head, _, rest = body.partition(START)
        _, _, tail = rest.partition(END)
        doc.write_text(f"{head}{START}\n{text}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
