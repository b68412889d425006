"""What a run's records mean: one definition of each idea that several views of a run show.

Pure functions over a run's manifest layer list (``manifest["layers"]``, forward order) and its
tables. The command line, the sweep table, the HTML report, the terminal views, the demo, the
reproductions and the diagnosis all call these, so that a number shown in two places is the
same number:

- :func:`hidden_layers`: which layers are hidden layers;
- :func:`repeated_blocks`, :func:`layer_placement`: the repeated blocks of a model (a
  transformer's layers, a ResNet's blocks) and where every layer sits by role (embedding, root,
  stem, block, head, ...), so that depth compares like with like;
- :data:`NORMALIZATION_TYPES`, :func:`is_normalization`, :func:`is_embedding`: the module
  types that are not part of the gradient's path through depth;
- :func:`attention_score_projections`: an attention's query and key projections, whose
  gradient is bilinear in each other's weights;
- :func:`speed_source`, :func:`speed_units`: where a hidden layer's speed of learning is read,
  and the units the speed views compare (a stacked LSTM's layers apart);
- :func:`is_weight_param`, :func:`recurrent_layer_of`, :func:`param_unit`: which parameters
  are weight matrices (``weight``, ``weight_ih_l0``, ``in_proj_weight``...), which layer of a
  stacked ``nn.LSTM``/``GRU``/``RNN`` a parameter belongs to (``l0``, ``l1``, ``l0_reverse``),
  and the unit the per-parameter views group a parameter by (``rnn.l1``);
- :func:`error_source`: where a hidden layer's error signal is read (after the normalization
  that divides its own scale out);
- :func:`first_last_ratio`: the speed of learning of the first over the last unit;
- :func:`nonfinite_steps`, :func:`first_nonfinite_step`: where NaN/inf appeared.

No torch; numpy and pandas are imported where they are used.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "NORMALIZATION_TYPES",
    "EMBEDDING_MARK",
    "is_normalization",
    "is_embedding",
    "hidden_layers",
    "tied_owners",
    "repeated_blocks",
    "layer_blocks",
    "layer_placement",
    "attention_score_projections",
    "speed_source",
    "speed_units",
    "is_weight_param",
    "recurrent_layer_of",
    "param_unit",
    "error_source",
    "ratio_pairs",
    "step_ratios",
    "first_last_ratio",
    "nonfinite_steps",
    "first_nonfinite_step",
]

#: Module type names of normalisation layers (``BatchNorm1d``, ``LayerNorm``, ...): they rescale
#: activations, so their gradient is not a step of the gradient's path through depth. A type
#: name is one when it ends in one of these, optionally with a dimension (``2d``): a model's own
#: class (Hugging Face's ``LlamaRMSNorm``, ``T5LayerNorm``; ``SyncBatchNorm``,
#: ``FrozenBatchNorm2d``, ConvNeXt's ``LayerNorm2d``) is one too, while a fused layer that
#: starts with a norm and owns a projection (``LayerNormLinear``) is not.
NORMALIZATION_TYPES = (
    "BatchNorm",
    "LayerNorm",
    "GroupNorm",
    "RMSNorm",
    "InstanceNorm",
    "LocalResponseNorm",
)
#: A module type whose name contains this is an embedding (``Embedding``, ``EmbeddingBag``, a
#: model's ``PositionalEmbedding``): a lookup table that the gradient reaches but does not pass.
EMBEDDING_MARK = "Embedding"


def is_normalization(layer_type: str) -> bool:
    """Whether a module type name is a normalisation layer.

    Example:
        >>> from vanishing.recorder.semantics import is_normalization
        >>> is_normalization("BatchNorm2d"), is_normalization("LlamaRMSNorm")
        (True, True)
        >>> is_normalization("Linear"), is_normalization("LayerNormLinear")
        (False, False)
    """
    return _NORMALIZATION_NAME.search(str(layer_type)) is not None


_NORMALIZATION_NAME = re.compile(rf"(?:{'|'.join(NORMALIZATION_TYPES)})(?:[123]d)?$")


class FollowingActivation:
    """Which activation follows each layer, read off module calls in forward order: the first
    activation module that runs after a parameter-owning layer, before the next one; a
    normalisation layer in between does not end the chain (conv -> BatchNorm -> ReLU: the
    conv's activation is the ReLU, as it is the norm's), which is also how the repair's
    transformations read it (``vanishing.repair.transforms``). The monitor feeds it every call
    of its first step (a shared activation module then counts after each layer that calls
    it); the diagnosis, the manifest's forward order.

    Example:
        >>> from vanishing.recorder.semantics import FollowingActivation
        >>> follow = FollowingActivation()
        >>> for name, kind, params, t in [("conv", None, True, "Conv2d"),
        ...                               ("bn", None, True, "BatchNorm2d"),
        ...                               ("act", "relu", False, "ReLU"),
        ...                               ("fc", None, True, "Linear")]:
        ...     follow.call(name, kind, params, t)
        >>> follow.after
        {'conv': 'relu', 'bn': 'relu'}
    """

    def __init__(self) -> None:
        self.after: dict[str, Any] = {}
        self._pending: list[str] = []  # the layer (and any norms right after it) awaiting one

    def call(self, name: str, activation: Any, owns_params: bool, layer_type: str) -> None:
        """One module call: ``activation`` is what to record for the layers before it (its
        kind or its name; None when the module is not an activation)."""
        if activation is not None:
            for layer in self._pending:
                self.after.setdefault(layer, activation)
            self._pending = []
        elif owns_params:
            if is_normalization(layer_type) and self._pending:
                self._pending.append(name)
            else:
                self._pending = [name]


def is_embedding(layer_type: str) -> bool:
    """Whether a module type name is an embedding table.

    Example:
        >>> from vanishing.recorder.semantics import is_embedding
        >>> is_embedding("EmbeddingBag"), is_embedding("PositionalEmbedding"), is_embedding("Linear")
        (True, True, False)
    """
    return EMBEDDING_MARK in str(layer_type)


def hidden_layers(layer_info: Sequence[Mapping[str, Any]]) -> list[str]:
    """The hidden layers of a run, in forward order.

    Modules of role ``layer`` that own parameters, except normalisation layers and embeddings,
    and except the last such module (the output layer). Recurrent layers are hidden layers (a
    stacked RNN's layers are its depth); the diagnosis judges them through time instead, so its
    depth profile leaves them out.

    Example:
        >>> from vanishing.recorder.semantics import hidden_layers
        >>> info = [{"name": n, "role": r, "num_params": p, "type": t}
        ...         for n, r, p, t in [("0", "layer", 40, "Linear"), ("1", "activation", 0, "Sigmoid"),
        ...                            ("2", "layer", 72, "Linear"), ("3", "layer", 16, "BatchNorm1d"),
        ...                            ("4", "layer", 9, "Linear")]]
        >>> hidden_layers(info)
        ['0', '2']
    """
    tied = tied_owners(layer_info)
    names = [
        str(layer["name"])
        for layer in layer_info
        if layer.get("role") == "layer"
        and ((layer.get("num_params") or 0) > 0 or str(layer["name"]) in tied)
        and not is_normalization(layer.get("type", ""))
        and not is_embedding(layer.get("type", ""))
    ]
    # a layer whose parameters are all tied to an earlier one (GPT-2's lm_head sharing the token
    # embedding) records nothing of its own, yet it is where it is: the output layer
    return [n for n in names[:-1] if n not in tied]


def tied_owners(layer_info: Sequence[Mapping[str, Any]]) -> set[str]:
    """Modules that own a parameter recorded under another module (tied weights), whose own
    manifest row therefore lists no parameters.

    Example:
        >>> from vanishing.recorder.semantics import tied_owners
        >>> info = [{"name": "wte", "params": [{"name": "weight", "shared_with": ["lm_head.weight"]}]},
        ...         {"name": "lm_head", "params": []}]
        >>> tied_owners(info)
        {'lm_head'}
    """
    out = set()
    for layer in layer_info:
        for p in layer.get("params", []) or []:
            for other in p.get("shared_with", []) or []:
                owner = str(other).rpartition(".")[0]
                if owner != str(layer.get("name")):
                    out.add(owner)
    return out


def repeated_blocks(
    names: Iterable[str], types: Mapping[str, str] | None = None
) -> dict[str, tuple[str, int, str]]:
    """The repeated structure of a model, from its module names: per module inside a numbered
    block, ``(block, block index, role)``. A block is a numbered child of one container
    (``encoder.layer.3``) with modules inside it; its role is the name with the block index
    replaced (``encoder.layer.*.attention.self.query``), so block 0's query is compared with
    block 3's query, not with block 0's FFN. The outermost number counts (in
    ``block.2.layer.0.q`` the block is ``block.2``); a plain ``nn.Sequential`` of layers
    (``0``, ``2``, ...) has no blocks. A container needs at least two blocks. Containers named
    alike but for a trailing number (torchvision's ResNet ``layer1`` ... ``layer4``) are the
    stages of one stack: their blocks are numbered on across the stages, and a role is a name
    inside a block (``layer*.*.conv1``).

    ``types`` (the parameter-owning layers' module types, by name: :func:`layer_blocks`
    passes them): blocks must then share a role that is such a layer of the same type, so
    ``nn.Sequential(features, classifier)`` (children ``0`` and ``3``: convs in one, Linear
    layers in the other, a ReLU at ``1`` in both) is no stack of two blocks.

    Example:
        >>> from vanishing.recorder.semantics import repeated_blocks
        >>> names = ["emb", "enc.0.attn", "enc.0.ffn", "enc.1.attn", "enc.1.ffn", "head"]
        >>> repeated_blocks(names)["enc.1.ffn"]
        ('enc.1', 1, 'enc.*.ffn')
        >>> repeated_blocks(["0", "2", "4"])
        {}
        >>> stages = ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.1.conv1"]
        >>> repeated_blocks(stages)["layer2.0.conv1"]
        ('layer2.0', 2, 'layer*.*.conv1')
    """
    groups: dict[str, dict[int, list[tuple[str, str]]]] = {}
    for name in names:
        parts = str(name).split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                prefix = ".".join(parts[:i])
                rest = ".".join(parts[i + 1 :])
                groups.setdefault(prefix, {}).setdefault(int(part), []).append((name, rest))
                break
    out: dict[str, tuple[str, int, str]] = {}
    for stack, blocks in _merge_stages(groups):
        nested = any(rest for _, members in blocks for _, rest in members)
        if len(blocks) < 2 or not nested:
            continue

        # a numbered sibling with nothing in common with the others (a Sequential's final
        # Linear after its numbered blocks) is not one of the blocks
        def keys(members):
            if types is None:
                return {r for _, r in members}
            return {(r, types[n]) for n, r in members if n in types}

        count: dict[Any, int] = {}
        for _, members in blocks:
            for key in keys(members):
                count[key] = count.get(key, 0) + 1
        blocks = [(b, m) for b, m in blocks if any(count[k] >= 2 for k in keys(m))]
        if len(blocks) < 2:
            continue
        for index, (block, members) in enumerate(blocks):
            for name, rest in members:
                role = ".".join(x for x in (stack, "*", rest) if x)
                out[name] = (block, index, role)
    return out


def layer_blocks(layer_info: Sequence[Mapping[str, Any]]) -> dict[str, tuple[str, int, str]]:
    """:func:`repeated_blocks` of a run's layers (its manifest's ``layers``), the
    parameter-owning layers' types telling blocks from unrelated numbered children.

    Example:
        >>> from vanishing.recorder.semantics import layer_blocks
        >>> info = [{"name": n, "type": t, "num_params": p} for n, t, p in [
        ...     ("0.0", "Conv2d", 8), ("0.1", "ReLU", 0), ("0.2", "Conv2d", 8),
        ...     ("3.0", "Linear", 8), ("3.1", "ReLU", 0), ("3.3", "Linear", 8)]]
        >>> layer_blocks(info)
        {}
    """
    names = [str(x["name"]) for x in layer_info]
    types = {str(x["name"]): str(x.get("type", "")) for x in layer_info if x.get("num_params")}
    return repeated_blocks(names, types)


_STAGE = re.compile(r"^(.*\D)(\d+)$")


def _merge_stages(
    groups: dict[str, dict[int, list[tuple[str, str]]]],
) -> list[tuple[str, list[tuple[str, list[tuple[str, str]]]]]]:
    """Stacks of blocks as ``(stack, [(block name, members)...])`` in block order. Containers
    named alike but for a trailing number (torchvision's ResNet ``layer1`` ... ``layer4``,
    ``stage1``, ``stage2``) are the stages of one stack, in the order of that number: a
    ResNet-18's 8 blocks are one stack of 8 (``layer*.*.conv1`` a role of each), not four
    stacks of 2 (too few to compare a role through depth). Other containers are stacks of
    their own (named by their prefix)."""
    stems: dict[str, list[tuple[int, str]]] = {}
    for prefix in groups:
        m = _STAGE.match(prefix)
        if m:
            stems.setdefault(m.group(1), []).append((int(m.group(2)), prefix))
    staged = {p: stem for stem, ps in stems.items() if len(ps) >= 2 for _, p in ps}
    out = []
    for stem, ps in stems.items():
        if len(ps) >= 2:
            blocks = [
                (f"{prefix}.{i}", groups[prefix][i])
                for _, prefix in sorted(ps)
                for i in sorted(groups[prefix])
            ]
            out.append((stem + "*", blocks))
    for prefix, by_index in groups.items():
        if prefix not in staged:
            blocks = [
                (f"{prefix}.{i}" if prefix else str(i), by_index[i]) for i in sorted(by_index)
            ]
            out.append((prefix, blocks))
    return out


def _projection(stem: str) -> re.Pattern[str]:
    # HF and torch spell an attention's projections q / q_proj / query / q_lin / to_q / wq /
    # query_proj / linear_q ...
    return re.compile(rf"^(?:to_|w_?|linear_)?(?:{stem})(?:_proj|_lin|_linear)?$")


_QUERY, _KEY, _VALUE = _projection("q|query"), _projection("k|key"), _projection("v|value")


def attention_score_projections(names: Iterable[str]) -> set[str]:
    """The query and key projections of the model's attention layers, by module name: the
    children of one module named as a query, a key and a value projection (``q_proj``,
    ``k_proj``, ``v_proj``; ``query``, ``key``, ``value``; T5's ``q``, ``k``, ``v``; ...), the
    first two returned. Their weights enter the loss only through the scores ``q . k``, so
    each one's gradient is proportional to the other's weight: at a small init (std 0.02) the
    scores are near zero and both learn orders of magnitude more slowly than the value and
    output projections under SGD, in every block alike. That is the attention's algebra, not
    a gradient lost through depth. A fused projection (GPT-2's ``c_attn``, ``in_proj_weight``,
    ``query_key_value``) carries the values too and is not one.

    Example:
        >>> from vanishing.recorder.semantics import attention_score_projections
        >>> names = ["h.0.attn.q_proj", "h.0.attn.k_proj", "h.0.attn.v_proj", "h.0.attn.o_proj",
        ...          "h.0.mlp.q", "h.0.mlp.k"]
        >>> sorted(attention_score_projections(names))
        ['h.0.attn.k_proj', 'h.0.attn.q_proj']
    """
    children: dict[str, list[str]] = {}
    for name in names:
        parent, _, child = str(name).rpartition(".")
        children.setdefault(parent, []).append(child)
    out: set[str] = set()
    for parent, kids in children.items():
        queries = [k for k in kids if _QUERY.match(k)]
        keys = [k for k in kids if _KEY.match(k)]
        if queries and keys and any(_VALUE.match(k) for k in kids):
            out |= {f"{parent}.{k}" if parent else k for k in queries + keys}
    return out


def layer_placement(layer_info: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Where each layer of a run sits, by role: ``root`` (parameters of the model itself, e.g.
    a positional table), ``embedding``, ``normalization``, ``activation``, ``recurrent``,
    ``tied`` (its parameters are recorded under another module), ``block`` (inside the model's
    main stack of repeated blocks: see :func:`repeated_blocks`; the stack with the most
    blocks), ``stem`` (before that stack), ``head`` (after it: poolers, classifiers, the output
    layer; without a stack, the output layer) and ``layer`` (a plain hidden layer of a chain).

    Example:
        >>> from vanishing.recorder.semantics import layer_placement
        >>> info = [{"name": n, "role": "layer", "num_params": 4, "type": t}
        ...         for n, t in [("emb", "Embedding"), ("enc.0.fc", "Linear"), ("enc.0.ln", "LayerNorm"),
        ...                      ("enc.1.fc", "Linear"), ("enc.1.ln", "LayerNorm"),
        ...                      ("pooler", "Linear"), ("head", "Linear")]]
        >>> sorted(set(layer_placement(info).items()))[:4]
        [('emb', 'embedding'), ('enc.0.fc', 'block'), ('enc.0.ln', 'normalization'), ('enc.1.fc', 'block')]
        >>> layer_placement(info)["pooler"], layer_placement(info)["head"]
        ('head', 'head')
    """
    names = [str(x["name"]) for x in layer_info]
    blocks = layer_blocks(layer_info)
    stacks: dict[str, set[int]] = {}
    for _block, index, role in blocks.values():
        stacks.setdefault(role.split("*")[0], set()).add(index)
    main = max(stacks, key=lambda k: len(stacks[k])) if stacks else None
    in_main = {n for n, (_b, _i, role) in blocks.items() if role.split("*")[0] == main}
    tied = tied_owners(layer_info)
    first = next((i for i, n in enumerate(names) if n in in_main), None)
    last = max((i for i, n in enumerate(names) if n in in_main), default=None)
    out: dict[str, str] = {}
    chain = []
    for i, layer in enumerate(layer_info):
        name, kind = names[i], str(layer.get("type", ""))
        if name == "":
            out[name] = "root"
        elif layer.get("role") == "activation":
            out[name] = "block" if name in in_main else "activation"
        elif is_embedding(kind):
            out[name] = "embedding"
        elif is_normalization(kind):
            out[name] = "normalization"
        elif layer.get("recurrent"):
            out[name] = "recurrent"
        elif name in tied:
            out[name] = "tied"
        elif name in in_main:
            out[name] = "block"
        elif first is not None and i < first:
            out[name] = "stem"
        elif last is not None and i > last:
            out[name] = "head"
        else:
            out[name] = "layer"
            chain.append(name)
    if main is None and chain:
        out[chain[-1]] = "head"
    if main is None and tied & set(names):  # a tied output layer is the chain's last
        last_tied = max(names.index(n) for n in tied & set(names))
        if chain and names.index(chain[-1]) < last_tied:
            out[chain[-1]] = "layer"
    return out


def _speed_param(params: Sequence[str]) -> str | None:
    # Nielsen's speed of learning is ||dC/db||; a layer without a plain ``bias`` has a bias-like
    # one (``in_proj_bias``, ``bias_ih_l0``) or, failing that, only its weight to read
    for pick in (
        lambda n: n == "bias",
        lambda n: "bias" in n,
        lambda n: n == "weight",
        lambda n: "weight" in n,
    ):
        found = [n for n in params if pick(n)]
        if found:
            return found[0]
    return params[0] if params else None


def is_weight_param(name: str) -> bool:
    """Whether a parameter is a weight matrix (or filter bank), as the weight views show them:
    ``weight``, a recurrent layer's ``weight_ih_l0``/``weight_hh_l1_reverse``, attention's
    ``in_proj_weight``, LSTM projections' ``weight_hr_l0``; not biases, not norms' scales (those
    are named ``weight`` too: callers that exclude norms check the layer's type).

    Example:
        >>> from vanishing.recorder.semantics import is_weight_param
        >>> [n for n in ["weight", "bias", "weight_ih_l0", "bias_hh_l0", "in_proj_weight"]
        ...  if is_weight_param(n)]
        ['weight', 'weight_ih_l0', 'in_proj_weight']
    """
    return name == "weight" or name.startswith("weight_") or name.endswith("_weight")


def recurrent_layer_of(name: str) -> str | None:
    """The layer of a stacked ``nn.LSTM``/``nn.GRU``/``nn.RNN`` that a parameter belongs to, from
    torch's naming (``weight_ih_l1`` -> ``"l1"``, ``bias_hh_l0_reverse`` -> ``"l0_reverse"``), or
    None for a parameter without a layer suffix.

    Example:
        >>> from vanishing.recorder.semantics import recurrent_layer_of
        >>> recurrent_layer_of("weight_hh_l1"), recurrent_layer_of("bias_ih_l0_reverse")
        ('l1', 'l0_reverse')
        >>> recurrent_layer_of("weight") is None
        True
    """
    found = _RECURRENT_SUFFIX.search(name)
    return found.group(1) if found else None


_RECURRENT_SUFFIX = re.compile(r"_(l\d+(?:_reverse)?)$")


def param_unit(layer: str, param: str) -> str:
    """The unit a parameter's statistics are grouped by in the per-parameter views (stalled
    layers, update size, weight trend): its module, or for a parameter of one layer of a
    stacked ``nn.LSTM``/``GRU``/``RNN`` the module and that layer (``rnn.l1``), so that the
    layers of a stack are judged and shown apart although torch runs them as one module.

    Example:
        >>> from vanishing.recorder.semantics import param_unit
        >>> param_unit("rnn", "weight_hh_l1"), param_unit("enc.0.attn", "in_proj_weight")
        ('rnn.l1', 'enc.0.attn')
        >>> param_unit("", "weight_ih_l0")   # an nn.LSTM watched on its own: the root module
        'l0'
    """
    sub = recurrent_layer_of(str(param))
    if sub is None:
        return str(layer)
    return f"{layer}.{sub}" if layer else sub


def error_source(layer_info: Sequence[Mapping[str, Any]], layer: str) -> str:
    """The module at whose output a hidden layer's error signal is read: the layer itself, or
    the normalization layer its output goes straight into (``Conv2d -> BatchNorm2d``,
    ``Linear -> LayerNorm``). A normalization divides its input by that input's own spread, so
    the gradient w.r.t. the layer's raw output carries ``1 / spread``: it follows the layer's
    weight scale (which the normalization makes irrelevant to the function), not the gradient's
    flow through depth; the gradient after the normalization is what flows on. (Only for a
    chain of layers: inside a residual block a normalization may follow a sum ``x + f(x)``
    rather than the layer, so the diagnosis compares those per role across blocks instead.)

    Example:
        >>> from vanishing.recorder.semantics import error_source
        >>> info = [{"name": n, "type": t} for n, t in
        ...         [("c0", "Conv2d"), ("bn0", "BatchNorm2d"), ("a0", "ReLU"), ("c1", "Conv2d"),
        ...          ("a1", "ReLU")]]
        >>> error_source(info, "c0"), error_source(info, "c1")
        ('bn0', 'c1')
    """
    names = [str(x["name"]) for x in layer_info]
    if layer not in names:
        return layer
    i = names.index(layer)
    nxt = layer_info[i + 1] if i + 1 < len(layer_info) else None
    if nxt is not None and is_normalization(str(nxt.get("type", ""))):
        return str(nxt["name"])
    return layer


def speed_source(layer_info: Sequence[Mapping[str, Any]], layer: str) -> tuple[str, str] | None:
    """Where a hidden layer's speed of learning is read: ``(module, parameter)``, or None when
    the layer has no parameter to read.

    The speed of learning is the gradient norm of the layer's ``bias`` (Nielsen's
    ``||dC/db||``); else of a bias-like parameter (``in_proj_bias``, ``bias_ih_l0``); else of
    its ``weight``; else of a weight-like one. A layer whose output goes straight into a batch
    norm is read at the norm's bias: the norm subtracts the mean, so the layer's own bias gets
    no gradient, and the norm's bias is what shifts those pre-activations; at the norm's gain
    (``weight``) when that bias gets no gradient either (the norm's output goes through an
    affine layer straight into another batch norm, which removes the shift), and at the layer's
    weight when the norm has no affine parameters. (The manifest lists modules that own
    parameters, so a ``BatchNorm(affine=False)`` is not seen, and the layer before it is read at
    its own, cancelled bias.)

    Example:
        >>> from vanishing.recorder.semantics import speed_source
        >>> lin = lambda n: {"name": n, "role": "layer", "type": "Linear", "num_params": 2,
        ...                  "params": [{"name": "weight"}, {"name": "bias"}]}
        >>> bn = {"name": "1", "role": "layer", "type": "BatchNorm1d", "num_params": 2,
        ...       "params": [{"name": "weight"}, {"name": "bias"}]}
        >>> info = [lin("0"), bn, lin("3"), lin("5")]
        >>> speed_source(info, "0"), speed_source(info, "3")
        (('1', 'bias'), ('3', 'bias'))
        >>> info = [lin("0"), bn, lin("3"), dict(bn, name="4")]  # Linear -> BN -> Linear -> BN
        >>> speed_source(info, "0"), speed_source(info, "3")
        (('1', 'weight'), ('4', 'bias'))
    """
    names = [str(x["name"]) for x in layer_info]
    if layer not in names:
        return None
    i = names.index(layer)
    params = [str(p["name"]) for p in layer_info[i].get("params", [])]
    norm = _batch_norm_after(layer_info, i)
    if norm is not None:
        own = {str(p["name"]) for p in norm.get("params", [])}
        # the norm's bias shifts the pre-activations, unless its output goes through an affine
        # layer straight into another batch norm (Linear -> BN -> Linear -> BN), which removes
        # that shift too: then only the norm's gain reaches the loss
        shift_removed = _is_affine(layer_info, i + 2) and _batch_norm_after(layer_info, i + 2)
        if "bias" in own and not shift_removed:
            return str(norm["name"]), "bias"
        if "weight" in own:
            return str(norm["name"]), "weight"
        # a norm without affine parameters (listed only when its owner gives it a parameter
        # row; torch's BatchNorm(affine=False) owns none and is not in the manifest): the
        # layer's bias gets no gradient, its weight does
        weights = [n for n in params if "bias" not in n]
        return (layer, _speed_param(weights)) if weights else None
    param = _speed_param(params)
    return (layer, param) if param is not None else None


def _batch_norm_after(layer_info: Sequence[Mapping[str, Any]], i: int) -> Mapping[str, Any] | None:
    # the module after the i-th, when it is a batch norm (SyncBatchNorm too): it subtracts the
    # batch mean of its input per channel. A LayerNorm's mean is over features, so it leaves
    # the layer's bias a gradient
    if i + 1 >= len(layer_info):
        return None
    nxt = layer_info[i + 1]
    kind = str(nxt.get("type", ""))
    return nxt if is_normalization(kind) and "BatchNorm" in kind else None


def _is_affine(layer_info: Sequence[Mapping[str, Any]], i: int) -> bool:
    # a linear map plus a bias: adding a constant to its input adds a constant to its output
    if i >= len(layer_info):
        return False
    kind = str(layer_info[i].get("type", ""))
    return kind.endswith("Linear") or kind.startswith(("Conv", "LazyConv", "LazyLinear"))


def speed_units(layer_info: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """The units whose speed of learning a run's views show and compare, in forward order, as
    ``(name, module, parameter)``: each hidden layer (:func:`hidden_layers`) read where
    :func:`speed_source` says, except that a stacked ``nn.LSTM``/``GRU``/``RNN`` (two layers or
    more) is one unit per stacked layer, named as :func:`param_unit` names it (``rnn.l0``,
    ``rnn.l1``, ``rnn.l0_reverse``) and read at that layer's own bias (``bias_ih_l1``; its
    weight when it has none). torch runs such a stack as one module, yet its layers are its
    depth: the first/last ratio of an LSTM stack is its first layer over its last. A unit whose
    parameter is frozen (``trainable`` false in the manifest: ``requires_grad=False`` or not
    given to the optimizer) is left out: it does not learn, so the first/last ratio compares
    the first and last layers that do.

    Example:
        >>> from vanishing.recorder.semantics import speed_units
        >>> rnn = {"name": "rnn", "role": "layer", "type": "LSTM", "num_params": 8,
        ...        "params": [{"name": f"{k}_{d}_l{i}"} for i in (0, 1)
        ...                   for k in ("weight", "bias") for d in ("ih", "hh")]}
        >>> head = {"name": "head", "role": "layer", "type": "Linear", "num_params": 2,
        ...         "params": [{"name": "weight"}, {"name": "bias"}]}
        >>> speed_units([rnn, head])
        [('rnn.l0', 'rnn', 'bias_ih_l0'), ('rnn.l1', 'rnn', 'bias_ih_l1')]
    """
    by_name = {str(x["name"]): x for x in layer_info}
    units: list[tuple[str, str, str]] = []
    for layer in hidden_layers(layer_info):
        params = [str(p["name"]) for p in by_name[layer].get("params", [])]
        stacked: dict[str, list[str]] = {}
        for p in params:
            sub = recurrent_layer_of(p)
            if sub is not None:
                stacked.setdefault(sub, []).append(p)
        # a stack's depth is its layers (l0, l1, ...); a bidirectional layer's reverse
        # direction (l0_reverse) runs beside its forward one, at the same depth: the speed
        # views compare the forward direction's layers
        forward = {sub: own for sub, own in stacked.items() if not sub.endswith("_reverse")}
        if len(forward) > 1:
            for own in forward.values():
                param = _speed_param(own)
                if param is not None and _learns(by_name[layer], param):
                    units.append((param_unit(layer, param), layer, param))
            continue
        src = speed_source(layer_info, layer)
        if src is not None and _learns(by_name.get(src[0], {}), src[1]):
            units.append((layer, *src))
    return units


def _learns(layer: Mapping[str, Any], param: str) -> bool:
    """Whether ``param`` of ``layer`` is trained (the manifest's ``trainable``; runs that do
    not say are taken as trained): a frozen layer has no speed of learning to compare."""
    for p in layer.get("params", []):
        if str(p.get("name")) == param:
            return bool(p.get("trainable", True))
    return True


def ratio_pairs(layer_info: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """The pairs of speed units (:func:`speed_units`) whose speeds the first/last ratio
    divides: ``[(first unit, last unit)]``; for a model whose hidden layers form a stack of
    repeated blocks (the main stack of :func:`layer_placement`: a transformer's layers, a
    ResNet's blocks), one pair per role that is in the stack's first and last blocks, in forward
    order. A transformer's layers are not a chain of like layers: its first hidden layer is the
    first block's attention and its last the last block's MLP output, whose gradients differ by
    their role (a healthy 4-block GPT-2 at init: 0.06), so each role is compared with itself,
    as the diagnosis' per-block profile does. Empty with fewer than two units.

    Example:
        >>> from vanishing.recorder.semantics import ratio_pairs
        >>> def layer(name):
        ...     return {"name": name, "role": "layer", "type": "Linear", "num_params": 2,
        ...             "params": [{"name": "weight"}, {"name": "bias"}]}
        >>> names = ["h.0.attn", "h.0.mlp", "h.1.attn", "h.1.mlp", "h.2.attn", "h.2.mlp", "head"]
        >>> ratio_pairs([layer(n) for n in names])
        [('h.0.attn', 'h.2.attn'), ('h.0.mlp', 'h.2.mlp')]
        >>> ratio_pairs([layer(n) for n in ["0", "2", "4", "6"]])
        [('0', '4')]
    """
    units = [name for name, _, _ in speed_units(layer_info)]
    if len(units) < 2:
        return []
    placement = layer_placement(layer_info)
    blocks = layer_blocks(layer_info)
    roles: dict[str, dict[int, str]] = {}
    for unit in units:
        if unit in blocks and placement.get(unit) == "block":
            _block, index, role = blocks[unit]
            roles.setdefault(role, {}).setdefault(index, unit)
    indices = sorted({i for by_index in roles.values() for i in by_index})
    if len(indices) >= 2:
        first, last = indices[0], indices[-1]
        pairs = [(m[first], m[last]) for m in roles.values() if first in m and last in m]
        if pairs:
            order = {u: i for i, u in enumerate(units)}
            return sorted(pairs, key=lambda pair: order[pair[0]])
    return [(units[0], units[-1])]


def step_ratios(first: Sequence[Any], last: Sequence[Any]) -> Any:
    """Per step, the ratio the first/last ratio is the median of: ``first[k] / last[k]`` for
    each pair ``k`` of :func:`ratio_pairs` (equal-length arrays of speeds per step), and of
    several pairs their median. Ratios that are not finite (a layer not recorded, NaN/inf, a
    zero last speed) are left out; NaN at a step where none is left.

    Example:
        >>> from vanishing.recorder.semantics import step_ratios
        >>> step_ratios([[1.0, 2.0], [4.0, 1.0], [8.0, 0.0]], [[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]]).tolist()
        [4.0, 1.5]
    """
    import numpy as np

    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.asarray(first, dtype=float).reshape(len(first), -1) / np.asarray(
            last, dtype=float
        ).reshape(len(last), -1)
    r = np.where(np.isfinite(r), r, np.nan)
    if r.shape[0] == 1:
        return r[0]
    out = np.full(r.shape[1], np.nan)
    known = ~np.isnan(r).all(axis=0)
    out[known] = np.nanmedian(r[:, known], axis=0)
    return out


def first_last_ratio(first: Any, last: Any, *, steps: Iterable[int] | None = None) -> float | None:
    """The speed of learning of the first hidden layer over that of the last hidden layer.

    Definition: the median, over the recorded steps, of that step's ratio
    ``speed(first hidden layer) / speed(last hidden layer)`` (speeds as :func:`speed_source`
    says). Steps where the ratio is not a finite number (a layer not recorded at that step,
    NaN/inf, a last layer with zero gradient) are left out; None when no step is left. Each
    step's ratio compares the two layers on the same batch and weights, so a noisy batch moves
    both; the median keeps one spike from moving the result. Far below 1: the first layers learn
    far more slowly than the last (a vanishing gradient); far above 1: an exploding one.

    ``first`` and ``last``: the two layers' speeds per step, as pandas Series indexed by step
    (aligned on it) or as equal-length sequences (index = position). ``steps``: only these
    steps (default: every recorded one), e.g. ``[0]`` for the ratio at initialisation.

    Example:
        >>> from vanishing.recorder.semantics import first_last_ratio
        >>> first_last_ratio([1e-3, 2e-3, 4e-3], [1.0, 1.0, 2.0])   # ratios 1e-3, 2e-3, 2e-3
        0.002
        >>> first_last_ratio([1e-3, 2e-3, 4e-3], [1.0, 1.0, 2.0], steps=[0])
        0.001
        >>> first_last_ratio([1.0, float("nan")], [0.0, 1.0]) is None
        True
    """
    import numpy as np
    import pandas as pd

    a = first if isinstance(first, pd.Series) else pd.Series(np.asarray(first, dtype=float))
    b = last if isinstance(last, pd.Series) else pd.Series(np.asarray(last, dtype=float))
    # a speed table's two columns share one index of distinct steps: nothing to merge
    if not (a.index.is_unique and a.index.equals(b.index)):
        a, b = a.groupby(level=0).mean(), b.groupby(level=0).mean()  # one value per step
        a, b = a.align(b, join="inner")
    if steps is not None:
        keep = a.index.isin(list(steps))
        a, b = a[keep], b[keep]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = a.to_numpy(dtype=float) / b.to_numpy(dtype=float)
    ratio = ratio[np.isfinite(ratio)]
    return float(np.median(ratio)) if len(ratio) else None


_NONFINITE_COLUMNS = ("loss_nonfinite", "grad_nonfinite", "param_nonfinite")


def nonfinite_steps(steps: Any) -> list[int]:
    """The recorded steps with NaN/inf in the loss, a gradient or a weight, ascending.

    ``steps``: a run's ``steps`` table (a DataFrame with ``step`` and the ``*_nonfinite``
    counts; a column a run did not record counts as zero).

    Example:
        >>> import pandas as pd
        >>> from vanishing.recorder.semantics import nonfinite_steps
        >>> s = pd.DataFrame({"step": [0, 1, 2, 3], "loss_nonfinite": [0, 0, 1, 1],
        ...                   "grad_nonfinite": [0, 3, 0, 0], "param_nonfinite": [0, 0, 0, 0]})
        >>> nonfinite_steps(s)
        [1, 2, 3]
    """
    import numpy as np

    if steps is None or len(steps) == 0:
        return []
    # NumPy, not pandas: the diagnosis asks this of every run it reads, and a pandas
    # operation costs ~0.1 ms whatever the size (a NaN count compares False: not a hit)
    bad = np.zeros(len(steps), dtype=bool)
    for column in _NONFINITE_COLUMNS:
        if column in steps:
            bad |= steps[column].to_numpy(dtype=float, na_value=np.nan) > 0
    return sorted(int(s) for s in steps["step"].to_numpy()[bad])


def first_nonfinite_step(steps: Any) -> int | None:
    """The first recorded step with NaN/inf in the loss, a gradient or a weight (None if none);
    the diagnosis judges the other kinds only on the steps before it.

    Example:
        >>> import pandas as pd
        >>> from vanishing.recorder.semantics import first_nonfinite_step
        >>> s = pd.DataFrame({"step": [0, 1, 2], "loss_nonfinite": [0, 0, 1],
        ...                   "grad_nonfinite": [0, 0, 2], "param_nonfinite": [0, 0, 0]})
        >>> first_nonfinite_step(s), first_nonfinite_step(s[s.step < 2])
        (2, None)
    """
    bad = nonfinite_steps(steps)
    return bad[0] if bad else None
