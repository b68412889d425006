"""run.report(path) and mon.report(path): the HTML report from Python."""

import torch
from torch import nn

import vanishing


def _train(mon, model, opt, steps=3):
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(16, 4)).pow(2).mean().backward()
        opt.step()


def _model():
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [nn.Linear(4, 4), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(4, 1))


def test_run_report_default_and_given_path(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with vanishing.watch(model, optimizer=opt, run_dir=tmp_path / "r") as mon:
        _train(mon, model, opt)
    run = vanishing.load_run(tmp_path / "r")
    page = run.report()
    assert page == tmp_path / "r" / "report.html"
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") or text.lstrip().lower().startswith("<!doctype")
    assert "<img" in text and "<table" in text
    other = run.report(tmp_path / "out" / "deep.html")
    assert other == tmp_path / "out" / "deep.html" and "<img" in other.read_text(encoding="utf-8")


def test_monitor_report_flushes_first_and_works_after_close(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = vanishing.watch(model, optimizer=opt, run_dir=tmp_path / "r")
    _train(mon, model, opt, steps=2)  # nothing flushed yet: report() flushes
    page = mon.report()
    assert page == mon.run_dir / "report.html"
    assert "<img" in page.read_text(encoding="utf-8")
    assert len(vanishing.load_run(mon.run_dir).steps) == 2
    _train(mon, model, opt, steps=2)
    mon.close()
    again = mon.report(tmp_path / "after.html")
    assert again == tmp_path / "after.html" and "<img" in again.read_text(encoding="utf-8")
    assert len(vanishing.load_run(mon.run_dir).steps) == 4
