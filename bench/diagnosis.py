"""Recall and precision of the diagnosis on the labelled benchmark (tests/cases/), against a baseline.

Every case of ``tests/cases/catalog.py`` is trained under ``vanishing.watch`` and diagnosed, and
(where its label holds at init) inspected before training with ``vanishing.inspect``. Per finding
kind this prints, for ``vanishing`` and for AUTOTRAINER's published rules re-implemented here:

- recall: the share of cases that require the kind in which it was found;
- precision: of the detections of the kind, the share in cases that require it. Detections in a
  case that merely *allows* the kind (e.g. stalled layers in a vanishing-gradient net) count
  neither way; detections anywhere else are false;
- false alarms: healthy controls with any finding.

The AUTOTRAINER baseline (Zhang et al., ICSE 2021), on the raw weight gradients of one batch (the
case's first) with the model as it is then, ``|g|`` the L2 norm of a weight's gradient, first and
last weight in registration order:

- vanishing: ``|g_first| / |g_last| < 1e-3`` and ``|g_first| < 1e-4``;
- exploding: ``|g_first| / |g_last| > 70``, or NaN (in the gradients, or in a training loss);
- dying ReLU (our ``dead_units``): at least 70% of all weight-gradient entries exactly 0.
It has no rule for saturation, stalled layers or non-finite values.

Run from the repository root (about a minute on 2 cores)::

    python bench/diagnosis.py              # print the tables
    python bench/diagnosis.py --write-docs # and replace the tables in docs/diagnosis.md
    python bench/diagnosis.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from cases.catalog import CASES, Case, train  # noqa: E402
from vanishing.diagnose import KINDS  # noqa: E402

BASELINE_KINDS = ("vanishing_gradient", "exploding_gradient", "dead_units")
START, END = "<!-- bench/diagnosis.py: start -->", "<!-- bench/diagnosis.py: end -->"


def autotrainer(model, batch, loss_fn, losses=None) -> set[str]:
    """AUTOTRAINER's vanishing / exploding / dying-ReLU rules on one batch's raw gradients."""
    x, y = batch
    weights = [(n, p) for n, p in model.named_parameters() if p.dim() >= 2 and "weight" in n]
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, [p for _, p in weights], allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(p) for g, (_, p) in zip(grads, weights)]
    found = set()
    first, last = float(grads[0].double().norm()), float(grads[-1].double().norm())
    nan = not all(math.isfinite(float(g.double().norm())) for g in grads) or (
        losses is not None and not all(math.isfinite(v) for v in losses)
    )
    ratio = first / last if last > 0 else math.inf
    if nan or ratio > 70:
        found.add("exploding_gradient")
    elif ratio < 1e-3 and first < 1e-4:
        found.add("vanishing_gradient")
    entries = torch.cat([g.flatten() for g in grads])
    if float((entries == 0).double().mean()) >= 0.7:
        found.add("dead_units")
    return found


def evaluate(case: Case) -> dict:
    """Both detectors on one case, after training and (if its label holds there) at init."""
    import vanishing

    out = {
        "name": case.name,
        "family": case.family,
        "required": list(case.required),
        "allowed": list(case.allowed),
    }
    if case.at_init:
        job = case.build()
        diag = vanishing.inspect(job.model, *job.batches[0], job.loss_fn)
        out["init"] = {
            "vanishing": diag.kinds,
            "autotrainer": sorted(autotrainer(job.model, job.batches[0], job.loss_fn)),
        }
    job = case.build()
    with tempfile.TemporaryDirectory() as tmp:
        with vanishing.watch(job.model, optimizer=job.optimizer, run_dir=f"{tmp}/run") as mon:
            losses = train(job, case.steps)
            diag = mon.diagnose()
    out["trained"] = {
        "vanishing": diag.kinds,
        "autotrainer": sorted(autotrainer(job.model, job.batches[0], job.loss_fn, losses)),
    }
    return out


def table(results: list[dict], phase: str) -> str:
    """A markdown table: per kind, recall and precision of both detectors; false alarms."""
    rows = [r for r in results if phase in r]
    lines = [
        "| kind | cases | vanishing recall | vanishing precision | AUTOTRAINER recall | "
        "AUTOTRAINER precision |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for kind in KINDS:
        need = [r for r in rows if kind in r["required"]]
        cells = [kind, str(len(need))]
        for who in ("vanishing", "autotrainer"):
            if who == "autotrainer" and kind not in BASELINE_KINDS:
                cells += ["no rule", "no rule"]
                continue
            hit = sum(kind in r[phase][who] for r in need)
            false = sum(
                kind in r[phase][who] and kind not in r["required"] + r["allowed"] for r in rows
            )
            cells.append(f"{hit}/{len(need)}" if need else "-")
            cells.append(f"{hit}/{hit + false}" if hit + false else "-")
        lines.append("| " + " | ".join(cells) + " |")
    healthy = [r for r in rows if not r["required"]]
    fa = {w: sum(bool(r[phase][w]) for r in healthy) for w in ("vanishing", "autotrainer")}
    lines.append(
        f"| false alarms on healthy controls | {len(healthy)} | {fa['vanishing']} | | "
        f"{fa['autotrainer']} | |"
    )
    return "\n".join(lines)


def families(results: list[dict], who: str = "vanishing") -> str:
    """A markdown table per family for one detector (``vanishing`` or ``autotrainer``): cases,
    healthy controls, required kinds found, false alarms on healthy controls and cases outside
    their label, after training and at init. AUTOTRAINER's required kinds count only those it
    has a rule for (vanishing, exploding, dying ReLU)."""
    lines = [
        "| family | cases | healthy | required found (trained / init) | false alarms on healthy "
        "(trained / init) | outside label (trained / init) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    judged = set(BASELINE_KINDS) if who == "autotrainer" else set(KINDS)
    for fam in sorted({r.get("family", "?") for r in results}):
        rows = [r for r in results if r.get("family", "?") == fam]
        cells = [fam, str(len(rows)), str(sum(not r["required"] for r in rows))]
        found, alarms, outside = [], [], []
        for phase in ("trained", "init"):
            ph = [r for r in rows if phase in r]
            need = sum(len(set(r["required"]) & judged) for r in ph)
            hit = sum(len(set(r["required"]) & judged & set(r[phase][who])) for r in ph)
            found.append(f"{hit}/{need}" if need else "-")
            healthy = [r for r in ph if not r["required"]]
            alarms.append(f"{sum(bool(r[phase][who]) for r in healthy)}/{len(healthy)}")
            out = sum(
                not (
                    set(r["required"]) & judged
                    <= set(r[phase][who])
                    <= set(r["required"]) | set(r["allowed"])
                )
                for r in ph
            )
            outside.append(str(out))
        cells += [" / ".join(found), " / ".join(alarms), " / ".join(outside)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: families added for issue 13's recurrent stacks and mean-field nets, timed for CI's budget
TIMED = ("meanfield_", "lstm2_")


def added_seconds(results: list[dict]) -> str:
    """The wall time of the cases named in TIMED, each and in all (as this run measured it)."""
    picked = [r for r in results if any(k in r["name"] for k in TIMED) and "seconds" in r]
    if not picked:
        return "none run"
    each = ", ".join(f"{r['name']} {r['seconds']:.1f}" for r in picked)
    return f"{sum(r['seconds'] for r in picked):.1f} s in all ({each})"


def report(results: list[dict], seconds: float) -> str:
    misses = [
        f"{r['name']} ({phase}): found {r[phase]['vanishing']}, required {r['required']}"
        for r in results
        for phase in ("trained", "init")
        if phase in r
        and not (
            set(r["required"])
            <= set(r[phase]["vanishing"])
            <= set(r["required"]) | set(r["allowed"])
        )
    ]
    n_init = sum("init" in r for r in results)
    text = [
        f"{len(results)} cases ({sum(not r['required'] for r in results)} healthy controls); "
        f"torch {torch.__version__}, {seconds:.0f} s. Rerun: `python bench/diagnosis.py`.",
        "",
        f"After training ({len(results)} cases):",
        "",
        table(results, "trained"),
        "",
        f"At init, `vanishing.inspect` on one batch ({n_init} cases whose label holds at init):",
        "",
        table(results, "init"),
        "",
        "Per family (`vanishing`):",
        "",
        families(results),
        "",
        "Per family (AUTOTRAINER's rules; required kinds it has a rule for):",
        "",
        families(results, "autotrainer"),
        "",
        "Added by the recurrent and mean-field families (seconds per case, training and "
        f"inspect): {added_seconds(results)}.",
        "",
        "Cases outside their label (required kind missed, or a kind neither required nor "
        "allowed): " + ("; ".join(misses) if misses else "none."),
    ]
    return "\n".join(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write-docs", action="store_true", help="update docs/diagnosis.md")
    ap.add_argument("--json", type=Path, help="write the per-case results here")
    ap.add_argument("--cases", help="comma-separated substrings of case names to run")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)  # small models: threads only contend
    cases = CASES
    if args.cases:
        keys = args.cases.split(",")
        cases = [c for c in CASES if any(k in c.name for k in keys)]
    t0 = time.perf_counter()
    results = []
    for c in cases:
        t = time.perf_counter()
        results.append(evaluate(c))
        results[-1]["seconds"] = time.perf_counter() - t
        print(f"  {c.name}: {results[-1]['trained']['vanishing']}", file=sys.stderr, flush=True)
    text = report(results, time.perf_counter() - t0)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.write_docs:
        doc = ROOT / "docs" / "diagnosis.md"
        body = doc.read_text()
        if START not in body or END not in body:
            print(f"error: {doc} has no {START} ... {END} section", file=sys.stderr)
            return 2
        head, rest = body.split(START, 1)
        _, tail = rest.split(END, 1)
        doc.write_text(head + START + "\n" + text + "\n" + END + tail)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
