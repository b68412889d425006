"""Verified repair (issue #16): the engine, checked against independent re-runs of training.

Oracles: the user's model compared bit for bit before and after; a candidate's loss re-derived
by training the applied model (or the changed loop) again with a plain loop; the clipping
threshold re-derived from the gradient norms of a plain training loop; the verdict rules on
numbers chosen by hand.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import vanishing
from vanishing.diagnose.findings import Diagnosis, Finding, Remedy
from vanishing.repair import Candidate, Repair, repair, verdict
from vanishing.repair.engine import MARGIN

F = nn.functional


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: extra threads only contend (and the CI runners have 2 cores)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def blobs(n=256, d=16, classes=4, batch=64, seed=0):
    """Gaussian inputs labelled by a random linear teacher (learnable in a few dozen steps)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, classes, generator=g)).argmax(1)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def deep_sigmoid(depth=10, width=32, d_in=16, classes=4):
    torch.manual_seed(0)
    layers = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else width, width), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


def plain_train(model, batches, loss_fn, opt, steps, *, clip=None, lr_factor=1.0):
    """The loop repair() runs, written out without the package: per-step losses and the
    total gradient norm of each step before clipping."""
    for g in opt.param_groups:
        g["lr"] *= lr_factor
    losses, norms = [], []
    for step in range(steps):
        x, y = batches[step % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
        norms.append(float(torch.stack(grads).norm()))
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(float(loss.detach()))
    return losses, norms


def tail_mean(losses):
    k = max(1, round(0.1 * len(losses)))
    return sum(losses[-k:]) / k


def recipe_diagnosis():
    """A finding whose remedies are training-recipe changes only, so that these tests
    exercise the probe loop whatever model transformations exist (a stalled-layers finding:
    a vanishing one on a sigmoid net would bring the activation swaps too)."""
    return Diagnosis(
        [
            Finding(
                "stalled_layers",
                ["0"],
                "critical",
                "the gradient shrinks",
                remedies=[
                    Remedy("gradient_clipping", "bound each update"),
                    Remedy("lower_learning_rate", "smaller steps"),
                ],
            )
        ]
    )


def sgd(lr):
    return lambda params: torch.optim.SGD(params, lr=lr)


# ------------------------------------------------------------------ the user's model is kept
def test_user_model_and_grads_and_rng_untouched_until_apply():
    model = deep_sigmoid(depth=4)
    batches = blobs()
    x, y = batches[0]
    F.cross_entropy(model(x), y).backward()  # the user has gradients lying around
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.manual_seed(123)
    rng = torch.random.get_rng_state()
    rep = repair(
        model,
        batches,
        F.cross_entropy,
        optimizer=sgd(0.5),
        steps=20,
        diagnosis=recipe_diagnosis(),
        progress=False,
    )
    assert len(rep.candidates) == 3  # clipping, lr x0.1, lr x0.01: each trained
    assert all(c.steps_run == 20 for c in rep.candidates)
    after = model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters())
    assert torch.equal(rng, torch.random.get_rng_state())  # the global RNG is restored
    assert model.training


def test_recipe_candidates_equal_an_independent_plain_loop():
    model = deep_sigmoid(depth=4)
    batches = blobs()
    steps = 20
    rep = repair(
        model,
        batches,
        F.cross_entropy,
        optimizer=sgd(0.5),
        steps=steps,
        diagnosis=recipe_diagnosis(),
        progress=False,
    )
    # the baseline, again, with a plain loop: its loss and its early gradient norms
    base = copy.deepcopy(model)
    losses, norms = plain_train(base, batches, F.cross_entropy, sgd(0.5)(base.parameters()), steps)
    assert rep.loss_before == pytest.approx(tail_mean(losses), rel=1e-6)
    early = sorted(norms[: max(1, round(0.1 * steps))])
    threshold = float(f"{early[len(early) // 2]:.3g}")
    clip = next(c for c in rep.candidates if c.remedy == "gradient_clipping")
    assert clip.options["clip"] == threshold
    assert f"clip_grad_norm_(model.parameters(), {threshold:g})" in clip.code
    again = copy.deepcopy(model)
    losses, _ = plain_train(
        again, batches, F.cross_entropy, sgd(0.5)(again.parameters()), steps, clip=threshold
    )
    assert clip.loss_after == pytest.approx(tail_mean(losses), rel=1e-6)
    for factor in (0.1, 0.01):
        lr = next(c for c in rep.candidates if c.options.get("lr_factor") == factor)
        again = copy.deepcopy(model)
        losses, _ = plain_train(
            again,
            batches,
            F.cross_entropy,
            sgd(0.5)(again.parameters()),
            steps,
            lr_factor=factor,
        )
        assert lr.loss_after == pytest.approx(tail_mean(losses), rel=1e-6)
        assert not lr.changes_model and lr.loss_before == rep.loss_before


# ------------------------------------------------------------------ the deep sigmoid net
def test_deep_sigmoid_net_is_repaired_by_a_remedy_that_trains():
    model = deep_sigmoid()
    batches = blobs()
    steps = 60
    rep = repair(
        model,
        batches,
        F.cross_entropy,
        optimizer=sgd(0.1),
        steps=steps,
        max_candidates=4,
        every=4,  # 15 recorded steps a run: enough for the diagnosis, a quarter of the cost
        progress=False,
    )
    assert "vanishing_gradient" in [f.kind for f in rep.baseline_findings]
    best = rep.best
    assert best is not None, str(rep)
    assert best.changes_model
    assert best.loss_after < (1 - MARGIN) * rep.loss_before
    assert "vanishing_gradient" not in best.kinds_after
    # independently: apply it to a copy of the user's model and train that again, watched
    fixed = rep.apply(copy.deepcopy(model))
    assert any(
        not torch.equal(a, b)
        for a, b in zip(fixed.state_dict().values(), model.state_dict().values())
    ) or (fixed.state_dict().keys() != model.state_dict().keys() or str(fixed) != str(model))
    torch.manual_seed(rep.seed)
    opt = torch.optim.SGD(fixed.parameters(), lr=0.1)
    import tempfile

    run_dir = tempfile.mkdtemp() + "/r"
    with vanishing.watch(fixed, optimizer=opt, run_dir=run_dir, every=4) as mon:
        losses, _ = plain_train(fixed, batches, F.cross_entropy, opt, steps)
        diag = mon.diagnose()
    assert tail_mean(losses) == pytest.approx(best.loss_after, rel=1e-5)
    assert tail_mean(losses) < (1 - MARGIN) * rep.loss_before
    assert "vanishing_gradient" not in diag.kinds
    # the candidates are sorted best first
    order = {v: i for i, v in enumerate(("fixed", "improved", "no_help", "worse"))}
    ranks = [order[c.verdict] for c in rep.candidates]
    assert ranks == sorted(ranks)
    assert best.remedy in str(rep) and "fixed" in str(rep)
    # the HTML page: one row per candidate, the baseline and the candidates that helped drawn
    # through depth from the profiles the probes measured
    from vanishing.report.repair import profile_figure

    page = rep.report(tempfile.mkdtemp() + "/repair.html").read_text()
    assert f"{best.remedy}</code>" in page and page.count("<tr><td><code>") == len(rep.candidates)
    helped = [c for c in rep.candidates if c.verdict in ("fixed", "improved") and c.profile_after]
    (ax,) = profile_figure(rep).axes
    assert len(ax.get_lines()) == 1 + min(4, len(helped))
    assert list(ax.get_lines()[0].get_ydata()) == [v for v in rep.profile_before.values() if v > 0]
    # the depth axis named by the baseline's layers, as every other view names them
    from vanishing.report.names import short_names

    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == short_names([k for k, v in rep.profile_before.items() if v > 0])


# ------------------------------------------------------------------ healthy: nothing to do
def test_healthy_model_has_nothing_to_repair():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    calls = []
    rep = repair(
        model,
        blobs(),
        F.cross_entropy,
        optimizer=sgd(0.05),
        steps=20,
        progress=lambda label, done, total: calls.append(done),
    )
    assert rep.healthy and rep.candidates == [] and rep.best is None
    assert "Nothing to repair" in str(rep)
    assert len(calls) == 20  # the baseline's steps only
    # a healthy diagnosis given: nothing is trained at all
    calls.clear()
    rep = repair(
        model,
        blobs(),
        F.cross_entropy,
        steps=20,
        diagnosis=Diagnosis([]),
        progress=lambda label, done, total: calls.append(done),
    )
    assert rep.healthy and calls == []


# ------------------------------------------------------------------ apply, to_dict
@pytest.fixture(scope="module")
def recipe_repair():
    """One repair of a deep sigmoid net prompted by a training-recipe finding."""
    model = deep_sigmoid(depth=4)
    rep = repair(
        model,
        blobs(),
        F.cross_entropy,
        optimizer=sgd(0.5),
        steps=10,
        diagnosis=recipe_diagnosis(),
        progress=False,
    )
    return model, rep


def test_recipe_candidate_apply_raises_with_the_loop_change(recipe_repair):
    model, rep = recipe_repair
    clip = next(c for c in rep.candidates if c.remedy == "gradient_clipping")
    with pytest.raises(ValueError, match=r"training loop.*clip_grad_norm_"):
        rep.apply(copy.deepcopy(model), clip)
    with pytest.raises(ValueError, match="lr"):
        rep.apply(copy.deepcopy(model), next(c for c in rep.candidates if "lr_factor" in c.options))
    if rep.best is None:
        with pytest.raises(ValueError, match="no candidate fixed"):
            rep.apply(model)


def test_to_dict_round_trips_through_json(recipe_repair):
    _, rep = recipe_repair
    d = rep.to_dict()
    back = json.loads(json.dumps(d, allow_nan=False))
    assert back == d
    assert [c["remedy"] for c in back["candidates"]] == [c.remedy for c in rep.candidates]
    assert back["candidates"][0]["loss_before"] == pytest.approx(rep.loss_before)
    assert back["diagnosis"]["findings"][0]["kind"] == "stalled_layers"


# ------------------------------------------------------------------ divergence, progress
def test_diverging_candidate_is_stopped_early_and_worse():
    # least squares on inputs of std 3: SGD diverges once lr > 2 / (2 * 9) ~ 0.11; the
    # baseline's 0.02 converges, x10 (0.2) diverges and must be stopped early
    g = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(128, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    diag = Diagnosis(
        [
            Finding(
                "stalled_layers",
                [""],
                "warning",
                "slow",
                remedies=[Remedy("higher_learning_rate", "faster")],
            )
        ]
    )
    calls = []
    rep = repair(
        model,
        [(x, y)],
        F.mse_loss,
        optimizer=sgd(0.02),
        steps=60,
        diagnosis=diag,
        progress=lambda label, done, total: calls.append(label),
    )
    x10 = next(c for c in rep.candidates if c.options["lr_factor"] == 10.0)
    assert x10.diverged and x10.steps_run < 60 and x10.verdict == "worse"
    assert math.isinf(x10.loss_after)
    assert rep.candidates[-1] is x10  # worse, and sorted last
    assert len(calls) == 60 + sum(c.steps_run for c in rep.candidates)


def test_workers_give_the_same_candidates_as_one_process():
    model = deep_sigmoid(depth=3)
    kw = dict(optimizer=sgd(0.5), steps=10, diagnosis=recipe_diagnosis(), progress=False)
    one = repair(model, blobs(), F.cross_entropy, **kw)
    calls = []
    kw["progress"] = lambda label, done, total: calls.append((label, done, total))
    two = repair(model, blobs(), F.cross_entropy, workers=2, **kw)
    assert [(c.remedy, c.options, c.loss_after) for c in one.candidates] == [
        (c.remedy, c.options, c.loss_after) for c in two.candidates
    ]
    # the bar moves as each candidate finishes: K steps under its name, not all at the end
    labels = [label for label, _, _ in calls]
    assert labels[:10] == ["baseline"] * 10 and [d for _, d, _ in calls] == list(
        range(1, len(calls) + 1)
    )
    blocks = [labels[i : i + 10] for i in range(10, len(labels), 10)]
    assert len(blocks) == len(two.candidates) and all(len(set(b)) == 1 for b in blocks)
    assert sorted(b[0] for b in blocks) == sorted(f"{c.remedy} (workers)" for c in two.candidates)


# ------------------------------------------------------------------ the verdict rules
@pytest.mark.parametrize(
    "kw, expected",
    [
        # the prompting finding gone and the loss 20% lower: fixed
        (dict(loss_after=0.8, ratio_after=0.5, kinds_after=[]), "fixed"),
        # gone, but the loss only 4% lower (inside the 5% margin) and the ratio barely moved
        (dict(loss_after=0.96, ratio_after=2e-4, kinds_after=[]), "no_help"),
        # gone, loss level, ratio 1e-4 -> 1e-2: two decades closer to 1: improved
        (dict(loss_after=1.0, ratio_after=1e-2, kinds_after=[]), "improved"),
        # loss 20% lower but the finding remains: improved
        (dict(loss_after=0.8, ratio_after=1e-4, kinds_after=["vanishing_gradient"]), "improved"),
        # another finding kind (not the prompting one) after: still fixed
        (dict(loss_after=0.8, ratio_after=0.5, kinds_after=["stalled_layers"]), "fixed"),
        # loss 10% higher: worse
        (dict(loss_after=1.1, ratio_after=1e-4, kinds_after=["vanishing_gradient"]), "worse"),
        # the ratio two decades closer to 1 but the loss 10% higher: worse, not improved
        (dict(loss_after=1.1, ratio_after=1e-2, kinds_after=["vanishing_gradient"]), "worse"),
        # diverged: worse whatever else
        (dict(loss_after=math.inf, ratio_after=0.5, kinds_after=[], diverged=True), "worse"),
        # a new critical kind: worse even with a lower loss
        (
            dict(
                loss_after=0.5,
                ratio_after=0.5,
                kinds_after=["exploding_gradient"],
                critical_after=["exploding_gradient"],
            ),
            "worse",
        ),
        # the ratio overshooting past 1 by as much as it was below is no closer: not improved
        (dict(loss_after=1.0, ratio_after=1e4, kinds_after=["vanishing_gradient"]), "no_help"),
    ],
)
def test_verdict_rules(kw, expected):
    base = dict(loss_before=1.0, ratio_before=1e-4, prompted_by=["vanishing_gradient"])
    assert verdict(**base, **kw)[0] == expected


def test_verdict_against_a_diverged_baseline():
    # any finite loss is lower than a baseline that diverged
    v, why = verdict(
        loss_before=math.inf,
        loss_after=3.0,
        ratio_before=None,
        ratio_after=1.0,
        prompted_by=["non_finite"],
        kinds_after=[],
    )
    assert v == "fixed" and "non_finite gone" in why


def test_candidate_and_repair_defaults():
    c = Candidate("relu", True, loss_before=1.0, loss_after=0.5)
    assert c.kinds_after == [] and c.to_dict()["remedy"] == "relu"
    assert Repair(healthy=False, steps=5).best is None


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(steps=0), "steps must be a positive integer"),
        (dict(batches=[]), "batches is empty"),
        (dict(optimizer=3), "optimizer must be a function"),
        (dict(batches=[torch.zeros(2, 16)]), r"\(inputs, targets\) pair"),
        (dict(model="net"), "model must be a torch.nn.Module"),
        (dict(margin=2.0), "margin must be a fraction"),
        (dict(max_candidates=True), "max_candidates must be a non-negative integer"),
        (dict(seed="a"), "seed must be an integer, got 'a'"),
        (dict(diagnosis="x"), "diagnosis must be a vanishing Diagnosis"),
        (dict(batches=blobs()[:2] + [(torch.zeros(2, 16),)]), "batch 2 is a 1-tuple"),
        (
            dict(loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="none")),
            r"must return a scalar tensor, got shape \(64,\) \(reduce it",
        ),
        (dict(loss_fn=lambda out, y: float(F.cross_entropy(out, y))), "scalar tensor, got float"),
        (dict(loss_fn=lambda out, y: F.cross_entropy(out, y).detach()), "does not depend"),
        (
            dict(batches=[(torch.zeros(8, 5), torch.zeros(8, dtype=torch.long))]),
            r"training the model as given failed at step 0 \(batch 0\).*RuntimeError: mat1 and mat2",
        ),
        (
            dict(batches=blobs()[:2] + [(torch.zeros(8, 5), torch.zeros(8, dtype=torch.long))]),
            r"failed at step 2 \(batch 2\).*mat1 and mat2",
        ),
        # the optimizer's own error, not relabelled as a model/loss mismatch
        (dict(optimizer=lambda p: "sgd"), r"^optimizer\(params\) must return a torch.optim"),
    ],
)
def test_bad_input_is_one_clear_value_error(kw, match):
    args = dict(model=deep_sigmoid(depth=2), batches=blobs(), loss_fn=F.cross_entropy)
    args.update({k: v for k, v in kw.items() if k in args})
    rest = {k: v for k, v in kw.items() if k not in args}
    with pytest.raises(ValueError, match=match):
        repair(args["model"], args["batches"], args["loss_fn"], progress=False, **rest)


def test_a_numpy_integer_seed_is_a_seed():
    import numpy as np

    model = deep_sigmoid(depth=2)
    kw = dict(steps=3, diagnosis=recipe_diagnosis(), max_candidates=1, progress=False)
    a = repair(model, blobs(), F.cross_entropy, seed=np.int64(4), **kw)
    b = repair(model, blobs(), F.cross_entropy, seed=4, **kw)
    assert a.loss_before == b.loss_before and a.seed == 4


def test_a_model_without_trainable_parameters_or_that_cannot_be_copied_is_a_clear_error():
    import threading

    frozen = deep_sigmoid(depth=2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        repair(frozen, blobs(), F.cross_entropy, progress=False)
    locked = deep_sigmoid(depth=2)
    locked.lock = threading.Lock()  # a model holding something copy.deepcopy refuses
    with pytest.raises(ValueError, match=r"deep copies of the model \(copy.deepcopy\).*lock"):
        repair(locked, blobs(), F.cross_entropy, steps=2, progress=False)


# ------------------------------------------------------------------ measured learning rates
def _exploding_least_squares(remedy: str):
    """SGD at lr 1e4 on least squares, repaired with one remedy: the first step moves the
    weights by far more than their size. Returns (model, data, repair, first step by hand:
    its relative update u0, its pre-clip gradient norm, the weights before it)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    diag = Diagnosis(
        [
            Finding(
                "exploding_gradient",
                [""],
                "critical",
                "huge updates",
                remedies=[Remedy(remedy, "bound each update")],
            )
        ]
    )
    rep = repair(
        model, [(x, y)], F.mse_loss, optimizer=sgd(1e4), steps=10, diagnosis=diag, progress=False
    )
    again = copy.deepcopy(model)
    w0 = torch.cat([p.detach().flatten().clone() for p in again.parameters()])
    _, norms = plain_train(again, [(x, y)], F.mse_loss, sgd(1e4)(again.parameters()), 1)
    w1 = torch.cat([p.detach().flatten() for p in again.parameters()])
    u0 = float((w1 - w0).norm() / w0.norm())
    return model, [(x, y)], rep, (u0, norms[0], w0)


def test_lower_learning_rate_is_measured_from_the_first_update():
    # the measured factor is the power of ten bringing the first relative update to about 1e-3
    _, _, rep, (u0, _, _) = _exploding_least_squares("lower_learning_rate")
    expected = 10.0 ** math.floor(math.log10(1e-3 / u0))
    factors = [c.options["lr_factor"] for c in rep.candidates]
    assert sorted(factors, reverse=True) == [0.1, expected] and expected < 1e-2
    best = rep.best
    assert best is not None and best.options["lr_factor"] == expected
    assert "group['lr'] *=" in best.code


def test_clipping_threshold_on_an_exploding_first_step_bounds_that_step():
    # the first step's norm is already the exploded one, so its median would clip nothing
    # that matters; the threshold is the norm that makes the first relative update 1e-3
    # (SGD's update scales with the gradient): g0 * 1e-3 / u0, and clipping at it moves the
    # weights by 1e-3 of their norm (brute force: one clipped step by hand)
    model, batches, rep, (u0, g0, w0) = _exploding_least_squares("gradient_clipping")
    expected = float(f"{g0 * 1e-3 / u0:.3g}")
    clip = next(c for c in rep.candidates if c.remedy == "gradient_clipping")
    assert clip.options["clip"] == pytest.approx(expected, rel=1e-6)
    assert expected < g0 / 100  # far below the median of the (exploded) early norms
    clipped = copy.deepcopy(model)
    plain_train(clipped, batches, F.mse_loss, sgd(1e4)(clipped.parameters()), 1, clip=expected)
    w1 = torch.cat([p.detach().flatten() for p in clipped.parameters()])
    assert float((w1 - w0).norm() / w0.norm()) == pytest.approx(1e-3, rel=1e-2)


def test_optimizer_groups_follow_their_parameters_through_a_model_change():
    # batch_norm renames every layer (NAME -> NAME.0), residual renumbers the Sequential: each
    # parameter of the changed copy must still get its own group's rate (oracle: the copy's
    # unchanged tensors found by value among the user's parameters), new ones the first group's
    from vanishing.repair.engine import _copy, _optimizer_factory
    from vanishing.repair.transforms import apply_remedy

    model = deep_sigmoid(depth=4)
    head = list(model[8].parameters())
    body = [p for i in range(8) for p in model[i].parameters()]
    opt = torch.optim.SGD([{"params": head, "lr": 1e-3}, {"params": body, "lr": 0.1}])
    rate = {id(p): 1e-3 for p in head} | {id(p): 0.1 for p in body}
    make = _optimizer_factory(opt, model)
    for remedy, new in (("batch_norm", 8), ("residual", 0)):  # 4 norms x (weight, bias)
        changed = _copy(model)
        apply_remedy(changed, remedy, example_inputs=blobs()[0][0])
        got = {id(p): g["lr"] for g in make(changed).param_groups for p in g["params"]}
        inserted = 0
        for name, p in changed.named_parameters():
            same = [q for q in model.parameters() if q.shape == p.shape and torch.equal(q, p)]
            if same:
                assert got[id(p)] == rate[id(same[0])], (remedy, name)
            else:
                inserted += 1
                assert got[id(p)] == 1e-3, (remedy, name)
        assert inserted == new
    assert not any(hasattr(p, "_vanishing_repair_origin") for p in model.parameters())


def test_one_candidate_copy_is_alive_at_a_time():
    # a large model: N candidates must not mean N copies held at once (each is built when
    # probed, freed once trained); oracle: the garbage collector's count of the model's class
    import gc

    class Net(nn.Sequential):
        pass

    model = Net(*deep_sigmoid(depth=4))
    remedies = [Remedy(r, ".") for r in ("batch_norm", "he_init", "xavier_init", "layer_norm")]
    diag = Diagnosis([Finding("vanishing_gradient", ["0"], "critical", ".", remedies=remedies)])
    alive = []

    def progress(label, done, total):
        if done % 3 == 1:
            gc.collect()
            alive.append(sum(type(o) is Net for o in gc.get_objects()))

    rep = repair(model, blobs(), F.cross_entropy, steps=3, diagnosis=diag, progress=progress)
    assert len([c for c in rep.candidates if c.changes_model]) >= 4
    assert max(alive) == 2  # the user's model and the one copy being trained


def test_repair_never_runs_the_users_forward():
    # a stateful forward (a cache, a step counter) must not see repair's tracing or training
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = deep_sigmoid(depth=4)
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def forward(self, x):
            self.calls += 1
            return self.net(x)

    model = Counting()
    diag = Diagnosis(
        [
            Finding(
                "vanishing_gradient",
                ["net.0"],
                "critical",
                "shrinks",
                remedies=[Remedy("batch_norm", "."), Remedy("relu", ".")],
            )
        ]
    )
    rep = repair(model, blobs(), F.cross_entropy, steps=5, diagnosis=diag, progress=False)
    assert rep.candidates and int(model.calls) == 0


def test_parameter_groups_far_apart_get_one_learning_rate():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 1e-8}, {"params": model[2].parameters()}],
        lr=0.05,
    )
    diag = Diagnosis(
        [
            Finding(
                "stalled_layers",
                ["0"],
                "warning",
                "slow",
                remedies=[Remedy("higher_learning_rate", "faster")],
            )
        ]
    )
    rep = repair(
        model, blobs(), F.cross_entropy, optimizer=opt, steps=20, diagnosis=diag, progress=False
    )
    same = next(c for c in rep.candidates if "group_lr" in c.options)
    assert same.options["group_lr"] == 0.05 and "group['lr'] = 0.05" in same.code
    # the user's optimizer is not touched either
    assert [g["lr"] for g in opt.param_groups] == [1e-8, 0.05]
    # the equalised loop, by hand: both groups at 0.05 is plain SGD at 0.05
    again = copy.deepcopy(model)
    losses, _ = plain_train(again, blobs(), F.cross_entropy, sgd(0.05)(again.parameters()), 20)
    assert same.loss_after == pytest.approx(tail_mean(losses), rel=1e-6)


def test_a_candidate_that_cannot_train_is_worse_with_the_reason(monkeypatch):
    from vanishing.repair import transforms

    class Pair(nn.Module):  # a model whose output no longer fits the loss
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x), None

    def broken(model, remedy, **kw):
        if remedy != "relu":
            raise transforms.NotApplicable(f"{remedy}: not in this test")
        model.add_module("wrapped", Pair(model[0]))
        model.forward = lambda x: model.wrapped(x)
        return transforms.Applied(remedy, ["wrapped"], "wraps the first layer", "")

    monkeypatch.setattr(transforms, "apply_remedy", broken)
    diag = Diagnosis(
        [
            Finding(
                "vanishing_gradient",
                ["0"],
                "critical",
                "shrinks",
                remedies=[Remedy("relu", "."), Remedy("gradient_clipping", ".")],
            )
        ]
    )
    model = deep_sigmoid(depth=3)
    rep = repair(model, blobs(), F.cross_entropy, steps=10, diagnosis=diag, progress=False)
    bad = next(c for c in rep.candidates if c.remedy == "relu")
    assert bad.verdict == "worse" and bad.steps_run == 0
    assert "training failed" in bad.why and bad.error
    # it never trained: not "diverged", and the table says so
    assert not bad.diverged and not bad.diagnosed and bad.to_dict()["diverged"] is False
    row = next(line for line in str(rep).splitlines() if line.startswith("relu "))
    assert "-> failed" in row and "diverged" not in row
    assert any(c.remedy == "gradient_clipping" and c.steps_run == 10 for c in rep.candidates)
    # the other activation swaps follow the named one, and are skipped with the reason given
    assert [r for r, _ in rep.skipped] == ["selu", "elu", "gelu", "leaky_relu"]
    assert rep.skipped[0][1] == "selu: not in this test"


# ------------------------------------------------------------------ divergence, round two
def test_divergence_is_judged_against_the_same_batch():
    # a frozen model (lr 0) on two batches whose losses differ by 100x: nothing grows, so the
    # run is not diverged (its loss on batch 2 is 100x batch 1's, but equal to its own first)
    from vanishing.repair.engine import probe

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x = torch.randn(16, 4)
    with torch.no_grad():
        out = model(x)
    near, far = (x, out + 0.1), (x, out + 10.0)  # mse 0.01 and 100, by construction
    p = probe(model, [near, far], F.mse_loss, optimizer=sgd(0.0), steps=6)
    assert not p.diverged and len(p.losses) == 6
    assert p.losses[:2] == pytest.approx([0.01, 100.0], rel=1e-4)
    assert p.losses == pytest.approx([0.01, 100.0] * 3, rel=1e-4)


@pytest.mark.parametrize(
    "first_update, diverged, verdict_, expected",
    [
        # diverged after a first update 9.2x the weights: 10^floor(log10(1e-3 / 9.2)) = 1e-4
        (9.2, True, "worse", (1e-4, 1e-3)),
        # a first update of 9.2e-8: 10^floor(log10(1e-3 / 9.2e-8)) = 10^floor(4.04) = 1e4
        (9.2e-8, False, "worse", (1e4, 1e5)),
        # above the band without diverging: 10^floor(log10(1e-3 / 0.5)) = 1e-3
        (0.5, False, "worse", (1e-3, 1e-2)),
        # diverged from a modest first update: the powers would reach x1, so x0.01 and x0.1
        (0.05, True, "worse", (0.01, 0.1)),
        (None, True, "worse", (0.1, 0.01)),
        # inside the band, its loss not higher: x3 and x10; higher: nothing to try
        (0.013, False, "no_help", (3.0, 10.0)),
        (0.013, False, "improved", (3.0, 10.0)),
        (0.013, False, "worse", ()),
    ],
)
def test_round_two_rates_come_from_the_candidates_own_first_update(
    first_update, diverged, verdict_, expected
):
    from vanishing.repair.engine import Probe, _rate_factors

    p = Probe([1.0], [], None, None, {}, diverged, 0.0, first_update=first_update)
    got = _rate_factors(Candidate("orthogonal_init", True, verdict=verdict_), p)
    assert got == pytest.approx(expected, rel=1e-12)


class RecurrentNet(nn.Module):
    """A ReLU RNN read at its last step; identity x 1.3 recurrence (the gradient grows 1.3x a
    step back through time), trained at lr 1e-7: too slow for any single remedy to lower the
    loss within K steps."""

    def __init__(self, hidden=16):
        super().__init__()
        self.rnn = nn.RNN(2, hidden, batch_first=True, nonlinearity="relu")
        self.head = nn.Linear(hidden, 1)
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(1.3 * torch.eye(hidden))
            self.rnn.bias_hh_l0.zero_()
            self.rnn.bias_ih_l0.fill_(0.01)
            self.rnn.weight_ih_l0.abs_().mul_(0.01)
            self.head.weight.mul_(0.01)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1]).squeeze(-1)


def recent_sequences(n=64, T=30, batch=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, T, 2, generator=g)
    y = x[:, -1, 0] + x[:, -2, 1]  # depends on the last two steps only
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def test_round_two_repairs_a_model_change_at_its_measured_learning_rate():
    from vanishing.repair.engine import probe

    torch.manual_seed(0)
    model = RecurrentNet()
    batches = recent_sequences()
    diag = Diagnosis(
        [
            Finding(
                "exploding_gradient",
                ["rnn"],
                "warning",
                "grows through time",
                remedies=[Remedy("orthogonal_init", "."), Remedy("lstm", ".")],
            )
        ]
    )
    kw = dict(optimizer=sgd(1e-7), steps=60, diagnosis=diag, progress=False)
    single = repair(model, batches, F.mse_loss, refine=False, **kw)
    assert single.best is None and len(single.candidates) == 2
    rep = repair(model, batches, F.mse_loss, **kw)
    assert rep.candidates[-2:] != single.candidates  # round two added candidates
    best = rep.best
    assert best is not None and best.changes_model and best.options["lr_factor"] > 1e3
    assert best.label == f"{best.remedy} + lr x{best.options['lr_factor']:g}"
    assert "group['lr'] *=" in best.code
    # its factor, by hand from its own round-one run: the powers of ten putting its first
    # update just below and above 1e-3
    first = next(c for c in single.candidates if c.remedy == best.remedy).first_update
    m = 10.0 ** math.floor(math.log10(1e-3 / first))
    assert best.options["lr_factor"] in (pytest.approx(m), pytest.approx(10 * m))
    # the oracle: the same change and rate, probed on their own, give the same loss, lower
    # than the baseline's by the margin
    again = probe(
        model,
        batches,
        F.mse_loss,
        optimizer=sgd(1e-7),
        steps=60,
        remedies=(best.remedy,),
        lr_factor=best.options["lr_factor"],
    )
    assert again.loss == pytest.approx(best.loss_after, rel=1e-6)
    assert again.loss < rep.loss_before * (1 - MARGIN)
    # apply() makes the model change and says the rate is the loop's
    target = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="learning rate"):
        rep.apply(target, best)
    if best.remedy == "orthogonal_init":
        w = target.rnn.weight_hh_l0.detach()
        assert torch.allclose(w @ w.T, torch.eye(16), atol=1e-5)
    else:
        assert isinstance(target.rnn, nn.LSTM)


def test_a_worse_candidate_by_its_loss_is_not_diagnosed():
    # least squares on inputs of std 3 (as above): from lr 0.02, x10 diverges and x3 (0.06,
    # near the stability edge) oscillates to a loss far above the baseline's: both are worse
    # on the loss alone and not diagnosed; from lr 0.01, x3 converges faster and is diagnosed
    g = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(128, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    diag = Diagnosis(
        [
            Finding(
                "stalled_layers",
                [""],
                "warning",
                "slow",
                remedies=[Remedy("higher_learning_rate", ".")],
            )
        ]
    )

    def candidates(lr):
        torch.manual_seed(0)
        model = nn.Linear(8, 1)
        rep = repair(
            model, [(x, y)], F.mse_loss, optimizer=sgd(lr), steps=40, diagnosis=diag, progress=False
        )
        return rep, {c.options["lr_factor"]: c for c in rep.candidates}

    rep, by = candidates(0.02)
    assert by[10.0].diverged and not by[10.0].diagnosed and by[10.0].findings_after == []
    x3 = by[3.0]
    assert not x3.diverged and x3.steps_run == 40 and not x3.diagnosed
    assert x3.loss_after > rep.loss_before * (1 + MARGIN) and x3.verdict == "worse"
    rep, by = candidates(0.01)
    assert by[3.0].diagnosed and by[3.0].loss_after < rep.loss_before
    assert by[3.0].verdict == "fixed" and by[10.0].verdict == "worse"


def test_swaps_follow_a_depth_finding_on_a_saturating_net():
    from vanishing.repair.engine import _remedy_order, _saturating_hidden

    f = Finding(
        "vanishing_gradient",
        ["0"],
        "critical",
        "shrinks",
        remedies=[Remedy("residual", "."), Remedy("batch_norm", ".")],
    )
    dead = Finding("dead_units", ["0"], "warning", "dead", remedies=[Remedy("he_init", ".")])
    swaps = ["selu", "elu", "gelu", "leaky_relu", "relu"]
    assert [n for n, _ in _remedy_order(Diagnosis([f]))] == ["residual", "batch_norm"]
    order = _remedy_order(Diagnosis([f, dead]), saturating=True)
    assert [n for n, _ in order] == ["residual", "batch_norm", "he_init", *swaps]
    assert all(kinds == ["vanishing_gradient"] for n, kinds in order if n in swaps)
    # only the kinds measured through the activation's derivative bring the swaps
    assert [n for n, _ in _remedy_order(Diagnosis([dead]), saturating=True)] == ["he_init"]
    x = torch.randn(3, 4)
    tanh = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    relu = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1), nn.Sigmoid())
    assert _saturating_hidden(tanh, x)
    assert not _saturating_hidden(relu, x)  # the sigmoid after the output layer is its output
    assert not _saturating_hidden(nn.RNN(4, 8), torch.randn(5, 3, 4))  # tanh inside nn.RNN


class _KeywordSigmoidNet(nn.Module):
    """A forward of keyword arguments, as Hugging Face models take a batch: ``features`` and a
    0/1 ``mask`` over them."""

    def __init__(self, depth=8, width=32, d_in=16, classes=4):
        super().__init__()
        torch.manual_seed(0)
        layers = []
        for i in range(depth):
            layers += [nn.Linear(d_in if i == 0 else width, width), nn.Sigmoid()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, features, mask):
        return self.head(self.body(features * mask))


def test_mapping_inputs_are_passed_as_keyword_arguments():
    batches = [({"features": x, "mask": torch.ones_like(x)}, y) for x, y in blobs()]
    model = _KeywordSigmoidNet()
    rep = repair(
        model,
        batches,
        F.cross_entropy,
        optimizer=sgd(0.5),
        steps=20,
        diagnosis=recipe_diagnosis(),
        progress=False,
    )
    # the baseline is the loop that calls model(**inputs), written out
    base = copy.deepcopy(model)
    opt = sgd(0.5)(base.parameters())
    losses = []
    for step in range(20):
        inputs, y = batches[step % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(base(**inputs), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert rep.loss_before == pytest.approx(tail_mean(losses), rel=1e-6)
    # a model change traces the keyword forward: a norm after each of the 8 hidden layers
    from vanishing.repair.transforms import apply_remedy

    changed = copy.deepcopy(model)
    apply_remedy(changed, "batch_norm", example_inputs=batches[0][0])
    norms = [n for n, m in changed.named_modules() if isinstance(m, nn.BatchNorm1d)]
    assert norms == [f"body.{2 * i}.1" for i in range(8)]
    assert changed(**batches[0][0]).shape == (64, 4)
