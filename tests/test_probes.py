"""The update tracker's two strategies (grouped on the CPU, foreach elsewhere) agree with brute force."""

import pytest
import torch

from vanishing.probes.params import UpdateTracker


def _params():
    torch.manual_seed(0)
    shapes = [(16, 8), (8,), (16, 8), (8,), (3, 16), (3,), (5, 5, 2)]
    return [torch.nn.Parameter(torch.randn(s)) for s in shapes]


@pytest.mark.parametrize("grouped", [True, False])
def test_update_tracker_matches_brute_force_over_several_steps(grouped):
    params = _params()
    tracker = UpdateTracker(params)
    if not grouped:  # the path GPUs take, forced on the CPU
        tracker = UpdateTracker.__new__(UpdateTracker)
        tracker.params, tracker.grouped, tracker.fused = params, False, None
        tracker._snapshot = [torch.empty_like(p) for p in params]
    assert tracker.grouped is grouped
    opt = torch.optim.Adam(params, lr=0.1)
    for step in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        before = [p.detach().clone() for p in params]
        wnorm = tracker.before_step()
        opt.step()
        unorm = tracker.after_step()
        assert wnorm.tolist() == pytest.approx([b.double().norm().item() for b in before], rel=1e-6)
        expected = [(p.detach() - b).double().norm().item() for p, b in zip(params, before)]
        assert unorm.tolist() == pytest.approx(expected, rel=1e-5)
        if step == 1:
            with torch.no_grad():
                params[0].mul_(0.5)  # changed between steps: not part of the next update


def test_grouped_tracker_reuses_the_snapshot_only_while_weights_are_untouched():
    params = _params()
    tracker = UpdateTracker(params)
    tracker.before_step()
    with torch.no_grad():
        params[2].add_(1.0)
    tracker.after_step()  # the snapshot is now the weights after this "step"
    with torch.no_grad():
        params[2].add_(5.0)  # outside any step: version counter moves
    tracker.before_step()
    with torch.no_grad():
        params[2].add_(2.0)
    unorm = tracker.after_step()
    assert unorm[2].item() == pytest.approx(2.0 * params[2].numel() ** 0.5, rel=1e-6)
    assert unorm[0].item() == 0.0


def test_non_contiguous_parameters_fall_back_to_foreach():
    p = torch.nn.Parameter(torch.randn(4, 6).t())
    tracker = UpdateTracker([p])
    assert not tracker.grouped
    assert tracker.before_step().tolist() == pytest.approx([p.detach().double().norm().item()])


def test_tiny_updates_of_zero_initialised_weights_are_not_read_as_zero():
    # A zero bias nudged by 1e-25 (a vanishing gradient's update): the change squares to
    # ~1e-50, below float32's range, so a float32 norm says 0; the tracker redoes it in float64.
    bias = torch.nn.Parameter(torch.zeros(20))
    weight = torch.nn.Parameter(torch.randn(20))
    tracker = UpdateTracker([bias, weight])
    for _ in range(3):
        before = bias.detach().clone()
        tracker.before_step()
        with torch.no_grad():
            bias.sub_(torch.full((20,), 1e-25))
        unorm = tracker.after_step()
        expected = (bias.detach().double() - before.double()).norm().item()
        assert expected > 0 and unorm[0].item() == pytest.approx(expected, rel=1e-6)
        assert unorm[1].item() == 0.0  # an untouched weight still reads exactly 0
