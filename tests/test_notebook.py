"""Rich display in Jupyter (vanishing.report.notebook) and the example notebook, executed."""

import base64
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

import vanishing
import vanishing.plots
from vanishing import Diagnosis, Finding, Remedy
from vanishing.experiments.sweep import SweepStore, plan_sweep
from vanishing.report import notebook
from vanishing.report.data import example_run

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "notebook.ipynb"
HOSTILE = "<script>alert(1)</script>"
PNG = re.compile(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _no_raw_markup(page):
    assert "<script" not in page.lower() and "<style" not in page.lower()
    assert "<link" not in page.lower() and "url(" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page, re.I)


def _pngs(page):
    found = [base64.b64decode(m) for m in PNG.findall(page)]
    assert all(p[:4] == b"\x89PNG" for p in found)
    return found


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """A recorded run whose hidden layers are named like markup."""
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            [
                (HOSTILE, nn.Linear(4, 8)),
                ("act&1", nn.Sigmoid()),
                ('"quoted"', nn.Linear(8, 8)),
                ("act2", nn.Sigmoid()),
                ("out", nn.Linear(8, 2)),
            ]
        )
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run_dir = tmp_path_factory.mktemp("hostile") / "run"
    with vanishing.watch(model, optimizer=opt, run_dir=run_dir):
        for _ in range(4):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(
                model(torch.randn(16, 4)), torch.randint(0, 2, (16,))
            )
            loss.backward()
            opt.step()
    return vanishing.load_run(run_dir)


def _finding(**kw):
    args = dict(
        kind="vanishing_gradient",
        layers=[HOSTILE, "fc2"],
        severity="critical",
        message=f"{HOSTILE} gets 1e-5 of the gradient",
        evidence={"ratio": 1e-5, "slope": float("nan")},
        remedies=[Remedy("relu", f"mean sigmoid'(z) of {HOSTILE} is 0.2")],
        cause="activation derivative <b>",
    )
    args.update(kw)
    return Finding(**args)


# ---- the *_html functions -----------------------------------------------------------------------


def test_finding_html_shows_everything_escaped():
    page = notebook.finding_html(_finding())
    _no_raw_markup(page)
    assert "vanishing_gradient" in page and "critical" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "fc2" in page and "relu" in page and "ratio" in page and "1e-05" in page
    assert "activation derivative &lt;b&gt;" in page
    assert page == _finding()._repr_html_()


def test_finding_html_caps_long_layer_lists():
    page = notebook.finding_html(_finding(layers=[f"l{i}" for i in range(30)], severity="warning"))
    assert "l11" in page and "l12" not in page and "(+18)" in page


def test_diagnosis_html_verdict_findings_and_plot():
    run = vanishing.load_run(example_run())
    diag = run.diagnose()
    page = notebook.diagnosis_html(diag, run)
    _no_raw_markup(page)
    assert "2 problems" in page and "critical" in page
    for kind in diag.kinds:
        assert kind in page
    for layer in diag.findings[0].layers:
        assert f"{layer}" in page
    for note in diag.notes:
        assert note in page
    assert len(_pngs(page)) == 1
    # _repr_html_ is the same page; without a run, no plot
    assert diag._repr_html_() == notebook.diagnosis_html(diag)
    alone = Diagnosis(findings=diag.findings, notes=diag.notes)
    assert "<img" not in alone._repr_html_() and "2 problems" in alone._repr_html_()


def test_diagnosis_html_healthy_and_hostile():
    healthy = notebook.diagnosis_html(Diagnosis(findings=[], notes=[f"note {HOSTILE}"]))
    assert "healthy" in healthy and "No gradient-flow problems found." in healthy
    _no_raw_markup(healthy)
    page = notebook.diagnosis_html(Diagnosis(findings=[_finding(), _finding(severity="warning")]))
    _no_raw_markup(page)
    assert "2 problems" in page and page.count("&lt;script&gt;") >= 2


def test_run_html_layers_plot_and_summary():
    run = vanishing.load_run(example_run())
    page = notebook.run_html(run)
    _no_raw_markup(page)
    for name in run.layers:
        assert f"<code>{name}</code>" in page
    assert "Sequential" in page and "20 (steps 0..19)" in page
    assert "first / last hidden layer" in page
    (png,) = _pngs(page)
    assert len(png) < 150_000  # small: the notebook keeps every output
    # a path and a Run give the same page
    assert notebook.run_html(example_run()) == page


def test_run_html_escapes_layer_names(hostile_run):
    page = notebook.run_html(hostile_run)
    _no_raw_markup(page)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "act&amp;1" in page and "&quot;quoted&quot;" in page
    assert len(_pngs(page)) == 1
    diag_page = notebook.diagnosis_html(hostile_run.diagnose(), hostile_run)
    _no_raw_markup(diag_page)


def test_run_html_of_a_run_without_steps(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    with vanishing.watch(model, run_dir=tmp_path / "empty"):
        pass
    page = notebook.run_html(tmp_path / "empty")
    assert "no steps recorded" in page and "<img" not in page


def _sweep(tmp_path, run_dir):
    d = tmp_path / "sweep"
    d.mkdir()
    runs = plan_sweep({"model": {"depth": [2, 4]}, "name": ["sigmoid", HOSTILE]})
    store = SweepStore(d / "sweep.sqlite")
    store.add(runs)
    for i, r in enumerate(runs[:3]):
        (d / r.run_dir).parent.mkdir(exist_ok=True)
        (d / r.run_dir).symlink_to(run_dir, target_is_directory=True)
        store.finish(
            r.key,
            {
                "status": "completed",
                "test_metric": 0.5 + i / 10,
                "first_last_ratio": 10.0 ** -(i + 1),
                "kinds": ["vanishing_gradient"] if i else [],
            },
        )
    store.close()
    return d, runs


def test_sweep_html_and_display_object(tmp_path):
    d, runs = _sweep(tmp_path, example_run())
    page = notebook.sweep_html(d)
    _no_raw_markup(page)
    assert "3 completed, 1 pending" in page
    assert "model.depth" in page and "name" in page
    assert "&lt;script&gt;" in page and "healthy" in page and "vanishing_gradient" in page
    for r in runs:
        assert r.key in page
    assert len(_pngs(page)) == 1  # first/last ratio vs depth
    sweep = notebook.Sweep(d)
    assert [r["key"] for r in sweep.rows] == [r.key for r in runs]
    assert sweep._repr_html_() == page and "runs=4" in repr(sweep)
    with pytest.raises(ValueError, match="not a sweep directory"):
        notebook.Sweep(tmp_path / "nothing")


def test_public_plots_module():
    names = vanishing.plots.__all__
    assert len(names) == len(set(names))
    for name in names:
        fn = getattr(vanishing.plots, name)
        assert fn.__module__ == "vanishing.plots"
        assert ">>>" in (fn.__doc__ or ""), name
    fig = vanishing.plots.depth_profile(vanishing.load_run(example_run()))
    assert fig.axes[0].get_yscale() == "log"


# ---- the example notebook -----------------------------------------------------------------------


def _kernel_or_skip():
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        pytest.skip(
            "no 'python3' Jupyter kernelspec; install one with "
            "`python -m ipykernel install --sys-prefix`"
        )


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    _kernel_or_skip()
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    cwd = tmp_path_factory.mktemp("notebook")
    NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(cwd)}}
    ).execute()
    return {tag: cell for cell in nb.cells for tag in cell.metadata.get("tags", [])}, nb


def _html(cell):
    (result,) = [o for o in cell.outputs if o.output_type == "execute_result"]
    assert "text/html" in result.data, list(result.data)
    return result.data["text/html"]


@pytest.mark.slow
def test_notebook_runs_without_errors(executed):
    _, nb = executed
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code)
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, [f"{o.ename}: {o.evalue}" for o in errors]


@pytest.mark.slow
def test_notebook_run_cell_is_rich(executed):
    cells, _ = executed
    page = _html(cells["run"])
    for name in ("hidden1", "act1", "hidden8", "output"):
        assert f"<code>{name}</code>" in page
    assert "data:image/png;base64," in page


@pytest.mark.slow
def test_notebook_diagnosis_and_plots(executed):
    cells, _ = executed
    page = _html(cells["diagnosis"])
    assert "vanishing_gradient" in page and "hidden1" in page
    remedy = _html(cells["remedy"])
    assert "vanishing.Diagnosis" in remedy
    for tag in ("depth_profile", "compare"):
        (result,) = [o for o in cells[tag].outputs if o.output_type == "execute_result"]
        assert "image/png" in result.data
