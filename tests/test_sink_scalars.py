"""ScalarSelector on hand-made blocks: every expected value is computed by hand below."""

import math

import numpy as np
import pytest

from vanishing.recorder.block import Block
from vanishing.recorder.columns import BUILTIN, Column
from vanishing.sinks.scalars import ScalarSelector

NAN = float("nan")


def _layer(name, type_="Linear", params=("weight", "bias"), trainable=True, role="layer"):
    return {
        "name": name,
        "type": type_,
        "role": role,
        "num_params": 4 * len(params),
        "params": [{"name": p, "trainable": trainable} for p in params],
    }


def _act(name):
    return {"name": name, "type": "Sigmoid", "role": "activation", "num_params": 0, "params": []}


# hidden layers 0, 2, 4; output layer 6; speeds read at each hidden layer's bias
MLP = {
    "layers": [
        _layer("0"),
        _act("1"),
        _layer("2"),
        _act("3"),
        _layer("4"),
        _act("5"),
        _layer("6"),
    ]
}


def block(manifest, steps, step=None, param=None, skipped=None, extra_step=()):
    """A Block of ``steps`` with param rows for every parameter of the manifest's layers;
    ``param[column][(layer, param)]`` gives that row's values per step (NaN elsewhere)."""
    n = len(steps)
    params = [
        (layer["name"], p["name"], d)
        for d, layer in enumerate(manifest["layers"])
        for p in layer["params"]
    ]
    columns = BUILTIN + tuple(Column(c, "step", "max") for c in extra_step)
    values = {"step": {}, "param": {}, "module": {}}
    for c in columns:
        if c.level == "step":
            values["step"][c.name] = np.array((step or {}).get(c.name, [NAN] * n), dtype=float)
        elif c.level == "param":
            arr = np.full((n, len(params)), NAN)
            for key, vals in (param or {}).get(c.name, {}).items():
                j = [p[:2] for p in params].index(key)
                arr[:, j] = vals
            values["param"][c.name] = arr
    return Block(
        steps=np.array(steps, dtype=np.int64),
        times=np.zeros(n),
        skipped=np.array(skipped if skipped is not None else [0] * n, dtype=np.int64),
        columns=columns,
        values=values,
        time_profile=np.zeros((n, 0, 1)),
        time_length=np.zeros((n, 0)),
        params=params,
        modules=[],
        manifest={},
    )


def first_block():
    return block(
        MLP,
        [10, 11],
        step={"loss": [2.5, 2.25]},
        skipped=[0, 2],
        param={
            "grad_norm": {
                ("0", "bias"): [1e-3, 2e-3],
                ("2", "bias"): [1e-4, NAN],
                ("4", "bias"): [1e-1, 1e-1],
                ("6", "bias"): [1.0, 1.0],
                ("0", "weight"): [5.0, 5.0],  # not the speed: the bias is
            },
            "update_norm": {
                ("0", "weight"): [1e-3, 1e-3],
                ("2", "weight"): [1e-2, 1e-2],
                ("4", "weight"): [4e-2, 4e-2],
                ("6", "weight"): [1e-5, 1e-1],
                ("0", "bias"): [1e-9, 1e-9],  # biases do not count for the worst update ratio
            },
            "param_norm": {
                ("0", "weight"): [1.0, 1.0],
                ("2", "weight"): [2.0, 2.0],
                ("4", "weight"): [2.0, 2.0],
                ("6", "weight"): [1.0, 1.0],
                ("0", "bias"): [1.0, 1.0],
            },
        },
    )


def test_tags_and_values_computed_by_hand():
    sel = ScalarSelector()
    sel.observe_manifest(MLP)
    out = sel.scalars(first_block())
    assert [s for s, _ in out] == [10, 11]
    (_, a), (_, b) = out
    # worst hidden layer relative to the last hidden "4": "2" (1e-4 / 1e-1 = 1e-3 < 1e-2)
    assert sel.chosen == ["0", "4", "2"]
    assert a == pytest.approx(
        {
            "vanishing/loss": 2.5,
            "vanishing/first_last_ratio": 1e-3 / 1e-1,
            "vanishing/worst_update_ratio": 1e-5,  # the output layer's weight, 1e-5 / 1
            "vanishing/grad_norm/0": 1e-3,
            "vanishing/grad_norm/4": 1e-1,
            "vanishing/grad_norm/2": 1e-4,
            "vanishing/update_ratio/0": 1e-3,
            "vanishing/update_ratio/4": 2e-2,
            "vanishing/update_ratio/2": 5e-3,
        }
    )
    # step 11: layer 2's gradient not measured (omitted), 2 skipped steps, worst is now 1e-3
    assert b == pytest.approx(
        {
            "vanishing/loss": 2.25,
            "vanishing/first_last_ratio": 2e-3 / 1e-1,
            "vanishing/worst_update_ratio": 1e-3,
            "vanishing/grad_norm/0": 2e-3,
            "vanishing/grad_norm/4": 1e-1,
            "vanishing/update_ratio/0": 1e-3,
            "vanishing/update_ratio/4": 2e-2,
            "vanishing/update_ratio/2": 5e-3,
            "vanishing/skipped": 2.0,
        }
    )


def test_median_of_per_step_ratio_is_the_headline_definition():
    from vanishing.recorder.semantics import first_last_ratio

    sel = ScalarSelector()
    sel.observe_manifest(MLP)
    curve = [tags["vanishing/first_last_ratio"] for _, tags in sel.scalars(first_block())]
    assert float(np.median(curve)) == pytest.approx(first_last_ratio([1e-3, 2e-3], [1e-1, 1e-1]))


def test_chosen_layers_stay_fixed_across_blocks():
    sel = ScalarSelector()
    sel.observe_manifest(MLP)
    sel.scalars(first_block())
    # in the next block layer "2" is healthy and nothing else changes the choice
    later = block(
        MLP,
        [12],
        step={"loss": [2.0]},
        param={"grad_norm": {("0", "bias"): [1e-3], ("2", "bias"): [1.0], ("4", "bias"): [1.0]}},
    )
    (_, tags) = sel.scalars(later)[0]
    assert sel.chosen == ["0", "4", "2"]
    assert tags == pytest.approx(
        {
            "vanishing/loss": 2.0,
            "vanishing/first_last_ratio": 1e-3,
            "vanishing/grad_norm/0": 1e-3,
            "vanishing/grad_norm/4": 1.0,
            "vanishing/grad_norm/2": 1.0,
        }
    )


def test_choice_waits_for_a_block_that_has_the_hidden_layers():
    sel = ScalarSelector()
    sel.observe_manifest(MLP)
    empty = block(MLP, [0], step={"loss": [1.0]})
    assert sel.scalars(empty) == [(0, {"vanishing/loss": 1.0})]
    assert sel.chosen is None
    sel.scalars(first_block())
    assert sel.chosen == ["0", "4", "2"]


@pytest.mark.parametrize(
    "max_layers, chosen", [(0, []), (1, ["0"]), (2, ["0", "4"]), (5, ["0", "4", "2"])]
)
def test_max_layers_bounds_the_per_layer_tags(max_layers, chosen):
    sel = ScalarSelector(max_layers=max_layers, prefix="vg")
    sel.observe_manifest(MLP)
    (_, tags) = sel.scalars(first_block())[0]
    assert sel.chosen == chosen
    assert sorted(t.split("/")[2] for t in tags if t.startswith("vg/grad_norm/")) == sorted(chosen)
    assert all(t.startswith("vg/") for t in tags)


def test_a_thousand_layers_give_a_handful_of_tags():
    layers = []
    for i in range(1000):
        layers += [_layer(f"blocks.{i}.fc"), _act(f"blocks.{i}.act")]
    layers.append(_layer("head"))
    manifest = {"layers": layers}
    P = 2 * len([x for x in layers if x["params"]])
    speeds = {(f"blocks.{i}.fc", "bias"): [1.0 / (i + 1)] for i in range(1000)}
    sel = ScalarSelector()
    sel.observe_manifest(manifest)
    b = block(manifest, [0], step={"loss": [1.0]}, param={"grad_norm": speeds})
    assert b.values["param"]["grad_norm"].shape == (1, P)
    (_, tags) = sel.scalars(b)[0]
    # speeds fall with depth: the last hidden layer is the slowest (relative speed 1, the
    # others above 1), so the worst is the last itself and only two layers get tags
    assert sel.chosen == ["blocks.0.fc", "blocks.999.fc"]
    assert len(tags) <= 4 + 2 * 3 + 3  # the bound of the module docstring
    assert tags["vanishing/first_last_ratio"] == pytest.approx(1.0 / (1.0 / 1000))


def test_weight_update_ratio_skips_frozen_and_normalisation_parameters():
    manifest = {
        "layers": [
            _layer("0"),
            _layer("1", type_="LayerNorm"),
            _layer("2", trainable=False),
            _layer("3"),
        ]
    }
    b = block(
        manifest,
        [0],
        param={
            "update_norm": {("0", "weight"): [3e-3], ("1", "weight"): [1e-9], ("2", "weight"): [0]},
            "param_norm": {("0", "weight"): [1.0], ("1", "weight"): [1.0], ("2", "weight"): [1.0]},
        },
    )
    sel = ScalarSelector()
    sel.observe_manifest(manifest)
    (_, tags) = sel.scalars(b)[0]
    assert tags["vanishing/worst_update_ratio"] == pytest.approx(3e-3)


def test_optional_step_columns_and_zero_param_norm():
    b = block(
        MLP,
        [0],
        step={
            "loss": [1.0],
            "grad_norm_backward": [4.0],
            "grad_norm_step": [1.0],
            "amp_scale": [NAN],
        },
        extra_step=("grad_norm_backward", "grad_norm_step", "amp_scale"),
        param={"update_norm": {("0", "weight"): [1.0]}, "param_norm": {("0", "weight"): [0.0]}},
    )
    sel = ScalarSelector()
    sel.observe_manifest(MLP)
    (_, tags) = sel.scalars(b)[0]
    assert tags == {
        "vanishing/loss": 1.0,
        "vanishing/grad_norm_backward": 4.0,
        "vanishing/grad_norm_step": 1.0,
    }  # amp_scale NaN: omitted; update ratio over a zero norm: not a number, omitted


def test_empty_block_carries_a_manifest():
    sel = ScalarSelector()
    b = block(MLP, [])
    b.manifest = MLP
    assert sel.scalars(b) == []
    assert sel.hidden == ["0", "2", "4"]


def test_infinite_ratio_is_omitted():
    b = block(MLP, [0], param={"grad_norm": {("0", "bias"): [1.0], ("4", "bias"): [0.0]}})
    sel = ScalarSelector()
    sel.observe_manifest(MLP)
    (_, tags) = sel.scalars(b)[0]
    assert "vanishing/first_last_ratio" not in tags
    assert not any(isinstance(v, float) and math.isnan(v) for v in tags.values())
