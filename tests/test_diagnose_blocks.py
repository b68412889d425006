"""Depth compares like with like: repeated blocks, roles, tied output layers (no training)."""

from vanishing.recorder.semantics import hidden_layers, layer_placement, repeated_blocks


def _layer(name, kind="Linear", params=4, shared=()):
    return {
        "name": name,
        "role": "layer",
        "type": kind,
        "num_params": params,
        "params": [{"name": "weight", "shared_with": list(shared)}] if params else [],
    }


def test_a_tied_output_layer_is_still_the_output_layer():
    # GPT-2: lm_head's weight is recorded under the token embedding, so its row has 0 params
    info = [
        _layer("wte", "Embedding", shared=["lm_head.weight"]),
        _layer("h.0.mlp.c_fc"),
        _layer("h.0.mlp.c_proj"),
        _layer("h.1.mlp.c_fc"),
        _layer("h.1.mlp.c_proj"),
        _layer("lm_head", params=0),
    ]
    assert hidden_layers(info) == [
        "h.0.mlp.c_fc",
        "h.0.mlp.c_proj",
        "h.1.mlp.c_fc",
        "h.1.mlp.c_proj",
    ]
    assert layer_placement(info)["lm_head"] == "tied"


def test_roles_across_blocks_and_placement_by_role():
    names = [
        "",
        "emb",
        "enc.layer.0.q",
        "enc.layer.0.ffn",
        "enc.layer.1.q",
        "enc.layer.1.ffn",
        "enc.layer.2.q",
        "enc.layer.2.ffn",
        "pooler",
        "classifier",
    ]
    blocks = repeated_blocks(names)
    assert blocks["enc.layer.2.q"] == ("enc.layer.2", 2, "enc.layer.*.q")
    info = [_layer(n, "Embedding" if n == "emb" else "Linear") for n in names]
    place = layer_placement(info)
    assert place[""] == "root" and place["emb"] == "embedding"
    assert place["pooler"] == place["classifier"] == "head"
    assert place["enc.layer.1.ffn"] == "block"
    # a Sequential's final Linear after numbered blocks is not one of them
    assert "10" not in repeated_blocks([f"{i}.0" for i in range(10)] + ["10"])
    assert repeated_blocks(["0", "2", "4"]) == {}
