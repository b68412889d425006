"""Which runs a page of several runs draws and details: every swept value represented, the
most informative run in full (and why), the demo's conclusion on its page."""

from __future__ import annotations

import itertools
import shutil

from vanishing.report.html import most_informative, render_collection, representative_runs


def _grid(depths, acts, seeds=(0, 1)):
    return [
        {"model.depth": d, "model.activation": a, "seed": s}
        for d, a, s in itertools.product(depths, acts, seeds)
    ]


def test_all_combinations_when_they_fit():
    grid = _grid((2, 5, 10, 20), ("sigmoid", "tanh", "relu"))
    idx, how = representative_runs(grid, limit=12)
    assert len(idx) == 12 and all(grid[i]["seed"] == 0 for i in idx)
    assert len({(grid[i]["model.depth"], grid[i]["model.activation"]) for i in idx}) == 12
    assert "all 12" in how


def test_every_swept_value_appears_when_they_do_not_fit():
    # 8 depths x 3 activations = 24 combinations, 48 runs: the old page drew "the first 12 of
    # 24 finished runs", i.e. only the shallow ones
    depths = (2, 3, 5, 8, 10, 20, 30, 50)
    grid = _grid(depths, ("sigmoid", "tanh", "relu"))
    idx, how = representative_runs(grid, limit=6)
    assert len(idx) == 6 and idx == sorted(idx)
    # brute force: what the picks must cover, from the grid itself
    for field in ("model.activation",):
        assert {grid[i][field] for i in idx} == {p[field] for p in grid}
    assert "every swept value appears" not in how  # 8 depths cannot fit in 6 lines
    idx, how = representative_runs(grid, limit=8)
    for field in ("model.depth", "model.activation"):
        assert {grid[i][field] for i in idx} == {p[field] for p in grid}
    assert "every swept value appears" in how


def test_most_informative_is_the_clearest_problem_and_says_why():
    kinds = [[], ["vanishing_gradient"], ["exploding_gradient"], []]
    ratios = [1e-9, 1e-3, 1e5, 1.0]  # run 0 is far from 1 but healthy: findings come first
    i, why = most_informative(kinds, ratios)
    assert i == 2 and "of the 2 runs with findings" in why and "1e+05" in why
    i, why = most_informative([[], []], [0.5, 1e-2])
    assert i == 1 and why.startswith("no run has findings")
    assert most_informative([], []) is None


def test_the_collection_page_details_the_chosen_run_and_shows_the_conclusion(tmp_path):
    from vanishing.report.data import example_run

    base = tmp_path / "demo"
    shutil.copytree(example_run("rnn"), base / "a-rnn")
    shutil.copytree(example_run("mlp"), base / "b-mlp")
    (base / "conclusion.txt").write_text("First paragraph.\n\nSecond <paragraph>.\n")
    page = render_collection(base)
    assert "<h2>Conclusion</h2><p>First paragraph.</p><p>Second &lt;paragraph&gt;.</p>" in page
    # the sigmoid MLP (a textbook vanishing gradient) is detailed, not the first folder
    assert "<h2>Run in detail: b-mlp</h2>" in page and "Why this run:" in page
