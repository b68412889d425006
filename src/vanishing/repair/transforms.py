"""Model-changing remedies as real transformations of an arbitrary ``nn.Module`` (issue #16).

:func:`apply_remedy` changes a model IN PLACE for one remedy of the contract's vocabulary and
returns an :class:`Applied` (what changed, in words and as a runnable snippet), or raises
:class:`NotApplicable` with a one-line reason. The repair engine calls it on a deep copy.

=====================  ===============================================================
remedy                 what it does
=====================  ===============================================================
he_init                Linear/Conv: N(0, gain / sqrt(fan_in)), gain of the following act.
xavier_init            Linear/Conv: U(+-gain sqrt(6 / (fan_in + fan_out)))
lecun_init             Linear/Conv: N(0, 1 / sqrt(fan_in)) (gain 1: SELU's fixed point)
orthogonal_init        Linear/Conv: orthogonal with the gain; RNNs: orthogonal weight_hh
relu, leaky_relu, ...  swap saturating (and, except for relu, ReLU) activation modules
batch_norm/layer_norm  insert a norm after each hidden Linear/Conv, before its activation
residual               wrap runs of same-shape blocks of a Sequential as ``Residual``
zero_init_residual     zero the last norm/Linear of each residual branch (Fixup/ReZero)
pre_layer_norm         ``norm_first=True`` on torch's Transformer layers
forget_gate_bias       LSTM forget-gate bias ``value`` (bias_ih slice [H:2H]; bias_hh 0)
lstm / gru             replace nn.RNN modules by nn.LSTM / nn.GRU of the same sizes
=====================  ===============================================================

The activation that follows a layer is read off the forward execution order, recorded with
forward pre-hooks on ``example_inputs`` by the monitor's :class:`~vanishing.monitor.layout.Layout`
(so a model that registers its modules in another order than it runs them is read right);
without ``example_inputs`` the registration order (``model.named_modules()``) stands in for it,
which is right for ``nn.Sequential``. Activations called as functions inside a ``forward``
(``torch.tanh(x)``) are invisible to both; the ``activation=`` option names them.

``example_inputs`` is the inputs of one batch, called as ``model(example_inputs)`` (as the
repair engine's training loop calls the model on the ``inputs`` of each ``(inputs, targets)``).
Tracing runs in eval mode under ``no_grad`` (no BatchNorm statistics are updated) and restores
each module's training flag.

Details a user of the result should know:

- The init remedies touch Linear and Conv1d/2d/3d weights (biases zeroed) and nothing else
  (embeddings, norms, attention's in_proj keep theirs); only ``orthogonal_init`` re-initialises
  recurrent layers (orthogonal ``weight_hh`` and Xavier ``weight_ih`` per gate block). Layers
  whose weights the user chose are kept and named in the description: frozen ones, one whose
  weight is tied to another module's (an output layer sharing the embedding), and those under
  the hook-based ``torch.nn.utils.weight_norm``/``spectral_norm``. A parametrized weight
  (``parametrizations.weight_norm``) gets the init through its ``right_inverse``; one whose
  parametrization does not give the assigned weight back (spectral norm) is kept.
- Activation swaps skip the activation after the output layer (the last Linear/Conv in forward
  order): it is the model's output map (probabilities for a BCE loss), not a hidden layer. They
  re-initialise the layers just before each swapped module with the new activation's init.
- ``batch_norm``/``layer_norm`` replace layer ``NAME`` by ``nn.Sequential(layer, norm)``: the
  layer becomes ``NAME.0`` and the norm ``NAME.1``. LayerNorm after a conv is
  ``nn.GroupNorm(1, C)`` (LayerNorm over (C, H, W) with per-channel affine parameters).
  BatchNorm1d after a Linear whose output is not (batch, features) would normalise the wrong
  axis: that layer is skipped (layer_norm fits it).
- ``residual`` decides from the traced shapes: in each plain ``nn.Sequential``, a block starts
  at each child that owns weights (norms excepted) and takes the parameter-free children and
  norms after it; a block is same-shape when every call of each of its modules returns the
  shape it was given; two or more consecutive same-shape blocks (not the one holding the output
  layer) are each wrapped as :class:`Residual` (``NAME.block.*``; a numbered Sequential is
  renumbered, a named one keeps the first key of each block). A model that already holds a
  residual block (a module class named ``Residual``, ``BasicBlock``, ``Bottleneck``,
  ``TransformerEncoderLayer`` or ``TransformerDecoderLayer``) is not changed.
- ``lstm`` makes the layer return ``(output, (h, c))``: ``out, _ = self.rnn(x)`` works
  unchanged, code that reads ``h`` gets the ``(h, c)`` tuple, and passing an initial state
  ``h0`` fails (the forward is re-run on ``example_inputs`` and the remedy is NotApplicable).
  ``gru`` keeps ``(output, h)``. ``nn.RNNCell`` is not replaced.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from vanishing.repair.transforms import apply_remedy
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 1))
    >>> done = apply_remedy(model, "relu", example_inputs=torch.randn(2, 4))
    >>> done.layers, type(model[1]).__name__
    (['1'], 'ReLU')
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vanishing import activations
from vanishing.diagnose.findings import REMEDIES
from vanishing.modules import RESIDUAL_MODULES, call_model
from vanishing.monitor.layout import Layout
from vanishing.recorder.semantics import is_normalization

__all__ = [
    "MODEL_REMEDIES",
    "Applied",
    "NotApplicable",
    "Residual",
    "apply_remedy",
    "describe_activations",
]


class NotApplicable(Exception):
    """A transformation cannot apply to this model; ``str(e)`` is the one-line reason (shown
    to the user).

    Example:
        >>> from torch import nn
        >>> from vanishing.repair.transforms import NotApplicable, apply_remedy
        >>> try:
        ...     apply_remedy(nn.Linear(2, 2), "forget_gate_bias")
        ... except NotApplicable as e:
        ...     print(e)
        no nn.LSTM or nn.LSTMCell in the model (nn.GRU and nn.RNN have no forget gate)
    """


@dataclass(frozen=True)
class Applied:
    """What :func:`apply_remedy` did to a model.

    Attributes:
        remedy: the remedy name (the contract's vocabulary, ``vanishing.diagnose.findings``).
        layers: qualified names (as in ``model.named_modules()`` after the change) of the
            modules that were changed or inserted.
        description: one line saying what changed.
        code: a short runnable snippet that makes the same change to a user's ``model``
            (with the same ``torch.manual_seed`` it draws the same weights).

    Example:
        >>> from torch import nn
        >>> from vanishing.repair.transforms import apply_remedy
        >>> model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> done = apply_remedy(model, "he_init")
        >>> done.layers
        ['0', '2']
        >>> done.description  # doctest: +NORMALIZE_WHITESPACE
        'He init (Kaiming normal, fan_in, std = gain / sqrt(fan_in)) of 2 layers:
         0 (relu, gain 1.414), 2 (linear, gain 1); biases zeroed'
    """

    remedy: str
    layers: list[str]
    description: str
    code: str


class Residual(nn.Module):
    """A residual connection around a block: ``forward(x) = x + block(x)``.

    The block must map its input to an output of the same shape (``residual`` only wraps such
    blocks, found by tracing).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from vanishing.repair.transforms import Residual
        >>> r = Residual(nn.Sequential(nn.Linear(3, 3), nn.Tanh()))
        >>> x = torch.randn(2, 3)
        >>> torch.equal(r(x), x + r.block(x))
        True
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


# ------------------------------------------------------------------------------ model facts
_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_RECURRENT = (nn.RNNBase, nn.RNNCellBase)
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
# Known residual blocks by class name (torchvision's, ours, torch's Transformer layers, Hugging
# Face's blocks): a model holding one already has residual structure, so ``residual`` does not
# add more.
_RESIDUAL_CLASSES = ("Residual", "BasicBlock", "Bottleneck", *RESIDUAL_MODULES)


def _is_weight_layer(m: nn.Module) -> bool:
    return isinstance(m, _WEIGHT_LAYERS)


def _is_norm(m: Any) -> bool:
    """A normalisation layer: torch's, or a model's own by its class name (``nn.RMSNorm``,
    Hugging Face's ``LlamaRMSNorm``, ``T5LayerNorm``: one definition, ``is_normalization``)."""
    return isinstance(m, _NORMS) or (
        isinstance(m, nn.Module) and is_normalization(type(m).__name__)
    )


def _out_shape(out: Any) -> tuple | None:
    if isinstance(out, Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return tuple(out[0].shape)  # an RNN's (output, state): the output
    if isinstance(out, Mapping):  # a Hugging Face ModelOutput: its first field (the logits)
        first = next((v for v in out.values() if isinstance(v, Tensor)), None)
        return tuple(first.shape) if first is not None else None
    return None


class _Trace:
    """One forward pass on ``example_inputs``: the forward order of the modules, every call
    (repeats included) with its input and output shapes, the modules that ran, and the
    model's output shape. Without inputs: registration order, no shapes."""

    def __init__(self, model: nn.Module, example_inputs: Any = None) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self.out_shape: dict[str, tuple | None] = {}
        self.calls: dict[int, list[tuple]] = {}  # id(module) -> (input, output) shape per call
        self.sequence: list[str] = []  # every module call in order, repeats included
        self.traced = example_inputs is not None
        self.output_shape: tuple | None = None
        self.every = dict(model.named_modules(remove_duplicate=False))  # aliases too
        if not self.traced:
            self.order = list(self.modules)
            # registration order, each registration of a reused module in its place
            self.sequence = list(self.every)
            self.ran = set(self.order)
            return
        layout = Layout(model)
        hooks = []
        for name, m in self.modules.items():
            hooks.append(m.register_forward_pre_hook(self._pre(layout, name)))
            hooks.append(m.register_forward_hook(self._post(name)))
        try:
            out = _run(model, example_inputs, what="tracing the forward on example_inputs")
        finally:
            for h in hooks:
                h.remove()
        layout.finish_discovery()
        self.output_shape = _out_shape(out)
        self.ran = set(layout.ran)
        # modules that neither ran nor are layout rows (parameter-free containers) go last
        self.order = layout.order + [n for n in self.modules if n not in set(layout.order)]

    def _pre(self, layout: Layout, name: str) -> Callable:
        def hook(module, args):
            layout.module_started(name)
            self.sequence.append(name)

        return hook

    def _post(self, name: str) -> Callable:
        def hook(module, args, out):
            shape_in = tuple(args[0].shape) if args and isinstance(args[0], Tensor) else None
            self.calls.setdefault(id(module), []).append((shape_in, _out_shape(out)))
            if name not in self.out_shape:
                self.out_shape[name] = _out_shape(out)

        return hook

    def weight_layers(self) -> list[str]:
        """Linear/Conv layers in forward order (those that ran, when traced: a Linear used
        functionally by its parent, like nn.MultiheadAttention's out_proj, cannot be wrapped)."""
        return [n for n in self.order if _is_weight_layer(self.modules[n])]

    def following(self) -> dict[str, nn.Module | None]:
        """Each Linear/Conv/recurrent layer's following activation module (None when the next
        layer comes first or nothing follows). Read off every call, repeats included: one
        activation module reused after several layers (``self.act`` called three times)
        follows each of them; the forward order of first calls would credit only the first."""
        result: dict[str, nn.Module | None] = {}
        pending: str | None = None
        for name in self.sequence:
            m = self.every[name]
            if _is_weight_layer(m) or isinstance(m, _RECURRENT):
                if pending is not None:
                    result.setdefault(pending, None)
                pending = name
            elif pending is not None and activations.for_module(m) is not None:
                result.setdefault(pending, m)
                pending = None
        if pending is not None:
            result.setdefault(pending, None)
        return {n: a for n, a in result.items() if n in self.modules}  # aliases dropped


def _run(model: nn.Module, inputs: Any, *, what: str) -> Any:
    """The model's output on ``inputs`` in eval mode without gradients (no BatchNorm update),
    the training flags restored; a failing forward is :class:`NotApplicable`."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return call_model(model, inputs)
    except Exception as e:  # noqa: BLE001 -- any failure of a user's forward is the reason
        raise NotApplicable(f"{what} fails: {type(e).__name__}: {e}".splitlines()[0]) from e
    finally:
        for m, flag in flags.items():
            m.training = flag


def _check_forward(model: nn.Module, inputs: Any, before: tuple | None, remedy: str) -> None:
    """After a structural change: the forward still runs and its output shape is unchanged."""
    if inputs is None:
        return
    after = _out_shape(_run(model, inputs, what=f"after {remedy}, the forward"))
    if before is not None and after != before:
        raise NotApplicable(f"after {remedy}, the output shape is {after}, not {before}")


def _kind(module: nn.Module | None) -> str | None:
    entry = activations.for_module(module) if module is not None else None
    return entry.kind if entry is not None else None


def _gain(kind: str | None, module: nn.Module | None = None) -> float:
    """The init gain that keeps the variance of signals through activation ``kind``
    (``torch.nn.init.calculate_gain`` where it knows the activation, the registry's
    ``init_gain`` otherwise)."""
    if kind is None or kind == "linear":
        return 1.0
    if kind in ("sigmoid", "tanh", "relu"):
        return float(nn.init.calculate_gain(kind))
    if kind == "leaky_relu":
        slope = getattr(module, "negative_slope", activations.get(kind).negative_slope)
        return float(nn.init.calculate_gain("leaky_relu", slope))
    if kind == "prelu":
        w = getattr(module, "weight", None)
        slope = float(w.detach().mean()) if w is not None else activations.get(kind).negative_slope
        return float(nn.init.calculate_gain("leaky_relu", slope))
    if kind == "selu":
        # torch's calculate_gain("selu") is 3/4, which gives up self-normalisation; SELU's
        # fixed point needs variance 1/fan_in (torch's own docs say to use "linear")
        return 1.0
    return float(activations.get(kind).init_gain)


def _device_dtype(m: nn.Module) -> dict:
    p = next(m.parameters(), None)
    return {} if p is None else {"device": p.device, "dtype": p.dtype}


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, key = name.rpartition(".")
    return model.get_submodule(parent), key


def _registrations(model: nn.Module, targets: set[int]) -> list[str]:
    """Every qualified name under which a module in ``targets`` (ids) is registered (a module
    registered twice is replaced in both places)."""
    return [
        n for n, m in model.named_modules(remove_duplicate=False) if id(m) in targets and n != ""
    ]


def _names_list(names: list[str]) -> str:
    return "[" + _wrapped([f'"{n}"' for n in names]) + "]"


def _dict_literal(entries: dict[str, float]) -> str:
    return "{" + _wrapped([f'"{k}": {v!r}' for k, v in entries.items()]) + "}"


def _wrapped(parts: list[str]) -> str:
    """``parts`` joined by commas, on one line when short, else one indented run per line
    (the inside of a bracket in a generated snippet)."""
    lines, line = [], ""
    for p in parts:
        if line and len(line) + len(p) > 80:
            lines.append(line.rstrip())
            line = ""
        line += p + ", "
    lines.append(line.rstrip(", "))
    if len(lines) == 1:
        return lines[0]
    return "\n    " + "\n    ".join(lines) + "\n"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _summary(labels: list[str], limit: int = 4) -> str:
    shown = ", ".join(labels[:limit])
    return shown + (f", ... ({len(labels) - limit} more)" if len(labels) > limit else "")


# ------------------------------------------------------------------------------ re-init
_SCHEMES = {
    "he_init": "He init (Kaiming normal, fan_in, std = gain / sqrt(fan_in))",
    "xavier_init": "Xavier init (Glorot uniform, bound = gain * sqrt(6 / (fan_in + fan_out)))",
    "lecun_init": "LeCun init (normal, std = 1 / sqrt(fan_in))",
    "orthogonal_init": "orthogonal init (W W^T = gain^2 I)",
}


def _gain_plan(
    model: nn.Module, trace: _Trace, activation: str | None
) -> tuple[dict[str, float], dict[str, str]]:
    """Per Linear/Conv layer (in ``named_modules`` order): its gain and the kind it is for.
    The output layer (the last in forward order) is linear; ``activation`` stands in where no
    activation module follows a hidden layer (a functional one)."""
    follow = trace.following()
    layers = [n for n, m in model.named_modules() if _is_weight_layer(m)]
    ordered = trace.weight_layers()
    last = ordered[-1] if ordered else None
    gains, kinds = {}, {}
    for name in layers:
        act = follow.get(name)
        kind = _kind(act)
        if kind is None and activation is not None and name != last:
            kind = activation
        gains[name] = _gain(kind, act)
        kinds[name] = kind or "linear"
    return gains, kinds


def _fan_in(w: Tensor) -> int:
    return w[0].numel()  # in_features (x the kernel's size): torch's fan_in


def _kept_layers(model: nn.Module, names: list[str]) -> dict[str, str]:
    """The layers of ``names`` whose weight a re-init must not touch, each with the reason:
    frozen (``requires_grad=False``: a pretrained backbone), tied to another module's weight
    (a language model's output layer shares the embedding's), or under an old-style
    ``torch.nn.utils.weight_norm``/``spectral_norm`` hook (its weight is recomputed from other
    parameters at every forward), or under a parametrization that does not take an assigned
    weight (:func:`_takes_assigned_weight`). Decided before anything is drawn, so the snippet,
    which skips the same layers, draws the same weights."""
    from torch.nn.utils import parametrize

    owners: dict[int, list[str]] = {}
    for n, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), []).append(n)
    mods = dict(model.named_modules())
    kept = {}
    for name in names:
        m = mods[name]
        hooks = [type(h).__name__ for h in m._forward_pre_hooks.values()]
        if "WeightNorm" in hooks or "SpectralNorm" in hooks:
            which = "weight_norm" if "WeightNorm" in hooks else "spectral_norm"
            kept[name] = f"old-style torch.nn.utils.{which} hook"
            continue
        para = parametrize.is_parametrized(m, "weight")
        sources = list(m.parametrizations.weight.parameters()) if para else [m.weight]
        if _frozen([*sources, getattr(m, "bias", None)]):
            kept[name] = "frozen"
            continue
        # owners outside the layer (its own parametrizations hold weight_norm's originals;
        # everything is inside the root)
        tied = sorted(
            o or "(model)"
            for o in {o for p in sources for o in owners.get(id(p), [])}
            if name and o != name and not o.startswith(name + ".")
        )
        if tied:
            kept[name] = f"weight tied to {_summary(tied, 2)}"
            continue
        if para and not _takes_assigned_weight(m):
            kinds = ", ".join(type(q).__name__ for q in m.parametrizations.weight)
            kept[name] = f"its weight parametrization ({kinds}) does not take an assigned weight"
    return kept


def _frozen(params) -> bool:
    """Whether any of ``params`` (None entries skipped) is frozen: the user keeps it."""
    return any(p is not None and not p.requires_grad for p in params)


def _takes_assigned_weight(m: nn.Module) -> bool:
    """Whether assigning ``m.weight = w`` makes the forward's weight ``w`` (weight_norm: yes,
    through its right_inverse; orthogonal, spectral norm: no). Tried on a copy with a weight of
    its own random source, so that the layer itself, its buffers (power-iteration vectors) and
    the re-init's random stream are left alone."""
    import copy

    trial = copy.deepcopy(m)
    w = trial.weight
    g = torch.Generator().manual_seed(0)
    target = torch.randn(w.shape, generator=g, dtype=torch.float64).mul_(0.1)
    target = target.to(device=w.device, dtype=w.dtype)
    try:
        with torch.no_grad():
            trial.weight = target
            return bool(torch.allclose(trial.weight, target, rtol=1e-4, atol=1e-6))
    except Exception:  # noqa: BLE001 - no right_inverse, or one that rejects it
        return False


def _init_layer(m: nn.Module, scheme: str, gain: float, generator) -> None:
    """Re-initialise ``m`` in place: its weight, and its bias to zero (a layer
    :func:`_kept_layers` passed)."""
    from torch.nn.utils import parametrize

    para = parametrize.is_parametrized(m, "weight")
    # a parametrized weight (weight_norm) is computed at each access: the init is drawn into a
    # tensor of its shape and assigned, which sets the originals through right_inverse
    w = torch.empty_like(m.weight) if para else m.weight
    _draw(w, scheme, gain, generator)
    if para:
        m.weight = w
    if m.bias is not None:
        nn.init.zeros_(m.bias)


def _draw(w: Tensor, scheme: str, gain: float, generator) -> None:
    if scheme == "he_init":
        nn.init.normal_(w, 0.0, gain / math.sqrt(_fan_in(w)), generator=generator)
    elif scheme == "lecun_init":
        nn.init.normal_(w, 0.0, 1 / math.sqrt(_fan_in(w)), generator=generator)
    elif scheme == "xavier_init":
        nn.init.xavier_uniform_(w, gain=gain, generator=generator)
    else:
        nn.init.orthogonal_(w, gain=gain, generator=generator)


_LAYER_CODE = {
    "he_init": "nn.init.normal_(m.weight, 0.0, gain[name] / math.sqrt(m.weight[0].numel()))",
    "lecun_init": "nn.init.normal_(m.weight, 0.0, 1 / math.sqrt(m.weight[0].numel()))",
    "xavier_init": "nn.init.xavier_uniform_(m.weight, gain=gain[name])",
    "orthogonal_init": "nn.init.orthogonal_(m.weight, gain=gain[name])",
}


def _reinit(
    model: nn.Module, scheme: str, gains: dict[str, float], generator
) -> tuple[list[str], str, dict[str, str]]:
    """Re-initialise the layers named in ``gains`` (in that order) but those that must keep
    their weights (:func:`_kept_layers`); the names re-initialised, the code, and the kept
    layers with their reasons."""
    from torch.nn.utils import parametrize

    mods = dict(model.named_modules())
    kept = _kept_layers(model, list(gains))
    with torch.no_grad():
        for name, g in gains.items():
            if name not in kept:
                _init_layer(mods[name], scheme, g, generator)
    gains = {n: g for n, g in gains.items() if n not in kept}
    if not gains:
        return [], "", kept
    para = any(parametrize.is_parametrized(mods[n], "weight") for n in gains)
    if scheme == "lecun_init":
        head = f"layers = {_names_list(list(gains))}\n"
        loop = "for name, m in model.named_modules():\n    if name in layers:\n"
    else:
        head = f"gain = {_dict_literal(gains)}  # the gain of the activation after each layer\n"
        loop = "for name, m in model.named_modules():\n    if name in gain:\n"
    if para:
        # weight_norm'ed layers: drawn apart, assigned through the parametrization
        code = (
            "import math\nimport torch\nfrom torch import nn\n"
            "from torch.nn.utils import parametrize\n"
            + head
            + loop
            + '        para = parametrize.is_parametrized(m, "weight")\n'
            + "        w = torch.empty_like(m.weight) if para else m.weight\n"
            + f"        {_LAYER_CODE[scheme].replace('m.weight', 'w')}\n"
            + "        if para:\n"
            + "            with torch.no_grad():\n"
            + "                m.weight = w  # sets the parametrization's originals\n"
        )
    else:
        code = (
            "import math\nfrom torch import nn\n" + head + loop + f"        {_LAYER_CODE[scheme]}\n"
        )
    code += "        if m.bias is not None:\n            nn.init.zeros_(m.bias)\n"
    return list(gains), code, kept


def _kept_text(kept: dict[str, str]) -> str:
    return "kept " + _summary([f"{n or '(model)'} ({why})" for n, why in kept.items()])


def _recurrent_orthogonal(model: nn.Module, generator) -> tuple[list[str], str]:
    """Orthogonal recurrent weights (each gate's H x H block), Xavier input weights (each
    gate's block), zero biases, for every RNN/LSTM/GRU (and cell) module."""
    # a frozen recurrent layer (pretrained) keeps its weights
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, _RECURRENT) and not _frozen(m.parameters())
    ]
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name in names:
            m = mods[name]
            for pname, p in m.named_parameters(recurse=False):
                gates = p.shape[0] // m.hidden_size if p.dim() == 2 else 1
                if pname.startswith("weight_hh"):
                    for w in p.detach().chunk(gates):
                        nn.init.orthogonal_(w, generator=generator)
                elif pname.startswith("weight_ih"):
                    for w in p.detach().chunk(gates):
                        nn.init.xavier_uniform_(w, generator=generator)
                elif pname.startswith("bias"):
                    nn.init.zeros_(p)
    code = (
        "\nfor name in " + _names_list(names) + ":  # recurrent layers\n"
        "    m = model.get_submodule(name)\n"
        "    for pname, p in m.named_parameters(recurse=False):\n"
        "        gates = p.shape[0] // m.hidden_size if p.dim() == 2 else 1  # LSTM 4, GRU 3\n"
        '        if pname.startswith("weight_hh"):\n'
        "            for w in p.detach().chunk(gates):\n"
        "                nn.init.orthogonal_(w)\n"
        '        elif pname.startswith("weight_ih"):\n'
        "            for w in p.detach().chunk(gates):\n"
        "                nn.init.xavier_uniform_(w)\n"
        '        elif pname.startswith("bias"):\n'
        "            nn.init.zeros_(p)\n"
    )
    return names, code


def _gain_label(kind: str, g: float) -> str:
    return f"{kind}, gain {g:.4g}"


def _init_remedy(scheme: str):
    def apply(
        model: nn.Module, *, example_inputs=None, generator=None, activation: str | None = None
    ) -> Applied:
        if (
            activation is not None
            and activation != "linear"
            and activation not in activations.kinds()
        ):
            raise ValueError(
                f"activation must be 'linear' or one of {activations.kinds()}, got {activation!r}"
            )
        trace = _Trace(model, example_inputs)
        gains, kinds = _gain_plan(model, trace, activation)
        recurrent = [n for n, m in model.named_modules() if isinstance(m, _RECURRENT)]
        if not gains and not (recurrent and scheme == "orthogonal_init"):
            extra = "; recurrent layers take orthogonal_init" if recurrent else ""
            raise NotApplicable(f"no nn.Linear or nn.Conv1d/2d/3d layer to re-initialise{extra}")
        layers, code, kept = _reinit(model, scheme, gains, generator) if gains else ([], "", {})
        if gains and not layers and not (recurrent and scheme == "orthogonal_init"):
            raise NotApplicable(f"no Linear/Conv layer may be re-initialised: {_kept_text(kept)}")
        if scheme == "lecun_init":
            labels = list(layers)
        else:
            labels = [f"{n or '(model)'} ({_gain_label(kinds[n], gains[n])})" for n in layers]
        parts = [f"{_SCHEMES[scheme]} of {_plural(len(layers), 'layer')}"]
        if labels:
            parts[0] += ": " + _summary(labels)
        if kept:
            parts.append(_kept_text(kept))
        if scheme == "orthogonal_init" and recurrent:
            rnames, rcode = _recurrent_orthogonal(model, generator)
            if rnames:
                layers += rnames
                code = (code or "from torch import nn\n") + rcode
                parts.append(
                    f"orthogonal recurrent / Xavier input weights per gate of {_summary(rnames)}"
                )
            frozen = {n: "frozen" for n in recurrent if n not in rnames}
            if frozen:
                parts.append(_kept_text(frozen))
            if not layers:
                raise NotApplicable(f"every layer is frozen or tied: {'; '.join(parts[1:])}")
        elif recurrent:
            parts.append(f"recurrent layers left as they are ({_summary(recurrent)})")
        parts.append("biases zeroed")
        return Applied(scheme, layers, "; ".join(parts), code)

    return apply


# ------------------------------------------------------------------------------ activations
def _swap_sources(target: str) -> tuple[str, ...]:
    """The kinds a swap to ``target`` replaces: the saturating ones (flat tails both sides)
    and, for the ReLU variants that keep a gradient for z < 0, ReLU itself (dead units)."""
    # read now, not at import: a saturating kind registered later is swapped too
    sources = {a.kind for a in activations.registered() if a.tails == "both"}
    if target != "relu":
        sources |= {"relu", "relu6"}
    sources.discard(target)
    return tuple(k for k in activations.kinds() if k in sources)


def _swap_remedy(target: str):
    def apply(
        model: nn.Module,
        *,
        example_inputs=None,
        generator=None,
        to: str | None = None,
        reinit: bool = True,
    ) -> Applied:
        if to is not None and to != target:
            raise ValueError(f"remedy {target!r} swaps to {target!r}; got to={to!r}")
        sources = _swap_sources(target)
        trace = _Trace(model, example_inputs)
        ordered = trace.weight_layers()
        position = {n: i for i, n in enumerate(trace.order)}
        last = position[ordered[-1]] if ordered else math.inf
        # the activation after the output layer is the model's output map (probabilities for
        # a BCE loss, a bounded regression target): not a gradient-flow problem, kept
        found = {
            n: m
            for n, m in trace.modules.items()
            if _kind(m) in sources and position.get(n, -1) <= last
        }
        if not found:
            present = sorted({_kind(m) for m in trace.modules.values() if _kind(m)} & set(sources))
            if present:
                raise NotApplicable(
                    f"the only {'/'.join(present)} module follows the output layer (kept)"
                )
            raise NotApplicable(
                f"no {'/'.join(sources)} activation module in the model; activations called as "
                "functions inside forward (torch.sigmoid, F.tanh) cannot be swapped"
            )
        follow = trace.following()
        swapped_ids = {id(m) for m in found.values()}
        names = _registrations(model, swapped_ids)
        cls = activations.get(target).module_class()
        replaced: dict[int, nn.Module] = {}  # old module -> its (first) replacement
        for name in names:
            parent, key = _parent(model, name)
            fresh = cls().to(**_device_dtype(parent))
            replaced.setdefault(id(getattr(parent, key)), fresh)
            setattr(parent, key, fresh)
        old = sorted({_kind(m) for m in found.values()})
        desc = f"{'/'.join(old)} -> {target} in {_plural(len(names), 'module')}: {_summary(names)}"
        code = f"from torch import nn\nfor name in {_names_list(names)}:\n"
        if list(fresh.parameters()):  # PReLU's slope: on the model's device, in its dtype
            code += (
                f"    model.set_submodule(name, nn.{cls.__name__}().to(next(model.parameters())))\n"
            )
        else:
            code += f"    model.set_submodule(name, nn.{cls.__name__}())\n"
        # the old init was for the old activation: re-initialise each layer followed by a
        # swapped module with the init of the new one (the registry's init_remedy: He for the
        # ReLU family, LeCun for SELU), in named_modules order like the snippet
        after = {
            n: replaced[id(a)] for n, a in follow.items() if a is not None and id(a) in replaced
        }
        gains = {n: _gain(target, after[n]) for n, _ in model.named_modules() if n in after}
        if reinit and gains:
            scheme = activations.get(target).init_remedy
            done, init_code, kept = _reinit(model, scheme, gains, generator)
            if done:
                code += f"# the old init was for {'/'.join(old)}: re-initialise for {target}\n"
                code += init_code.replace("from torch import nn\n", "")
                name = _SCHEMES[scheme].split(" (")[0]
                desc += f"; {name} of the {_plural(len(done), 'layer')} before them, biases zeroed"
            if kept:
                desc += f"; {_kept_text(kept)}"
        return Applied(target, names, desc, code)

    return apply


# ------------------------------------------------------------------------------ norms
_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _inside(model: nn.Module, name: str, kinds: tuple) -> str | None:
    """The class name of the nearest ancestor of ``name`` that is one of ``kinds``, or None."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        m = model.get_submodule(".".join(parts[:i]))
        if isinstance(m, kinds):
            return type(m).__name__
    return None


def _norm_for(layer: nn.Module, kind: str, out_shape: tuple | None) -> nn.Module | str:
    """The norm to put after ``layer`` (or why none fits)."""
    if isinstance(layer, nn.Linear):
        n = layer.out_features
        if kind == "layer_norm":
            return nn.LayerNorm(n)
        if out_shape is not None and len(out_shape) != 2:
            return f"output {out_shape} is not (batch, features)"
        return nn.BatchNorm1d(n)
    c = layer.out_channels
    if kind == "layer_norm":
        # LayerNorm over (C, H, W) of a conv output, with per-channel affine parameters
        return nn.GroupNorm(1, c)
    norms = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}
    return norms[_conv_base(layer)](c)


def _conv_base(layer: nn.Module) -> type:
    for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        if isinstance(layer, cls):
            return cls
    raise TypeError(type(layer).__name__)


def _norm_code(norm: nn.Module) -> str:
    if isinstance(norm, nn.GroupNorm):
        return f"nn.GroupNorm(1, {norm.num_channels})"
    if isinstance(norm, nn.LayerNorm):
        return f"nn.LayerNorm({norm.normalized_shape[0]})"
    return f"nn.{type(norm).__name__}({norm.num_features})"


def _norm_remedy(kind: str):
    def apply(model: nn.Module, *, example_inputs=None, generator=None) -> Applied:
        trace = _Trace(model, example_inputs)
        ordered = trace.weight_layers()
        if not ordered:
            raise NotApplicable("no nn.Linear or nn.Conv1d/2d/3d layer to normalise")
        mods = trace.modules
        position = {n: i for i, n in enumerate(trace.order)}
        hidden = ordered[:-1]  # not after the output layer
        plan: list[tuple[str, nn.Module]] = []
        skipped: list[str] = []
        for name in hidden:
            if name == "" or name not in trace.ran:
                continue  # the root, or used functionally by its parent (MHA's out_proj)
            inside = _inside(model, name, _TRANSFORMER_LAYERS + (nn.MultiheadAttention,))
            if inside is not None:
                # torch's Transformer layers read their Linears' weights directly (the fast
                # path) and normalise by design: pre_layer_norm is their remedy
                skipped.append(f"{name} (inside {inside})")
                continue
            nxt = next(
                (
                    mods[n]
                    for n in trace.order[position[name] + 1 :]
                    if not list(mods[n].children())
                ),
                None,
            )
            if _is_norm(nxt):
                skipped.append(f"{name} (already normalised)")
                continue
            norm = _norm_for(mods[name], kind, trace.out_shape.get(name))
            if isinstance(norm, str):
                skipped.append(f"{name} ({norm})")
                continue
            plan.append((name, norm.to(**_device_dtype(mods[name]))))
        if not plan:
            why = f": {_summary(skipped)}" if skipped else ""
            raise NotApplicable(f"no hidden Linear/Conv layer to put a {kind} after{why}")
        for name, norm in plan:
            parent, key = _parent(model, name)
            setattr(parent, key, nn.Sequential(mods[name], norm))
        _check_forward(model, example_inputs, trace.output_shape, kind)
        inserted = [f"{n}.1" for n, _ in plan]
        what = "BatchNorm" if kind == "batch_norm" else "LayerNorm"
        desc = (
            f"{what} after {_plural(len(plan), 'hidden layer')} (each layer NAME becomes "
            f"NAME.0, its norm NAME.1): {_summary([n for n, _ in plan])}"
        )
        if skipped:
            desc += f"; skipped {_summary(skipped)}"
        pairs = _wrapped([f'("{n}", {_norm_code(m)})' for n, m in plan])
        code = (
            "from torch import nn\n"
            f"for name, norm in [{pairs}]:\n"
            "    layer = model.get_submodule(name)  # the norm on the layer's device and dtype\n"
            "    model.set_submodule(name, nn.Sequential(layer, norm.to(layer.weight)))\n"
        )
        return Applied(kind, inserted, desc, code)

    return apply


# ------------------------------------------------------------------------------ residual
def _residual_blocks(model: nn.Module) -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if any(c.__name__ in _RESIDUAL_CLASSES for c in type(m).__mro__)
    ]


def _owns_weights(m: nn.Module) -> bool:
    return not _is_norm(m) and next(m.parameters(), None) is not None


def _residual(model: nn.Module, *, example_inputs=None, generator=None) -> Applied:
    if example_inputs is None:
        raise NotApplicable("residual needs example_inputs to find same-shape blocks by tracing")
    existing = _residual_blocks(model)
    if existing:
        name = existing[0] or "(model)"
        kind = type(model.get_submodule(existing[0])).__name__
        raise NotApplicable(f"the model already has residual structure ({kind} at {name})")
    trace = _Trace(model, example_inputs)
    ordered = trace.weight_layers()
    output = ordered[-1] if ordered else None
    # the module of the Sequential that holds the output layer (it may be nested in it)
    holders = (
        {output} | {output.rsplit(".", i)[0] for i in range(output.count(".") + 1)}
        if output
        else set()
    )
    plans = []  # (seq name, [(key, module) | ("res", [(key, module), ...])])
    for sname, seq in trace.modules.items():
        if type(seq) is not nn.Sequential:
            continue
        items = list(seq._modules.items())
        # a block starts at each child that owns weights; activations, norms, dropout join it
        blocks: list[list[tuple[str, nn.Module]]] = []
        head: list[tuple[str, nn.Module]] = []
        for key, child in items:
            if _owns_weights(child):
                blocks.append([(key, child)])
            elif blocks:
                blocks[-1].append((key, child))
            else:
                head.append((key, child))

        def same_shape(block, sname=sname) -> bool:
            # every call of every module of the block maps its input shape to itself (a
            # module registered twice, like one nn.Tanh reused, is judged on all its calls)
            if any(_join(sname, k) in holders for k, _ in block):
                return False  # the output layer
            calls = [trace.calls.get(id(m)) for _, m in block]
            return all(c and all(i is not None and i == o for i, o in c) for c in calls)

        flags = [same_shape(b) for b in blocks]
        wrap = [False] * len(blocks)
        i = 0
        while i < len(blocks):  # runs of >= 2 consecutive same-shape blocks
            j = i
            while j < len(blocks) and flags[j]:
                j += 1
            if j - i >= 2:
                wrap[i:j] = [True] * (j - i)
            i = max(j, i + 1)
        if not any(wrap):
            continue
        entries: list = list(head)
        for b, w in zip(blocks, wrap, strict=True):
            entries.extend([("res", b)] if w else b)
        plans.append((sname, seq, entries))
    if not plans:
        raise NotApplicable(
            "no run of two or more consecutive same-shape blocks in an nn.Sequential "
            "(a block: a layer with weights and the activations/norms after it)"
        )
    code = "from torch import nn\nfrom vanishing.repair.transforms import Residual\n"
    # innermost first (reversed pre-order): an outer Sequential's names stay valid meanwhile
    for sname, seq, entries in reversed(plans):
        numeric = all(k.isdigit() for k, _ in seq._modules.items())
        pos = {k: i for i, k in enumerate(seq._modules)}  # list(seq) positions
        new: list[tuple[str, nn.Module]] = []
        exprs: list[str] = []
        ref = f'model.get_submodule("{sname}")' if sname else "model"
        for e in entries:
            if e[0] == "res":
                block = e[1]
                key = str(len(new)) if numeric else block[0][0]
                inner = (
                    nn.Sequential(*[m for _, m in block])
                    if numeric
                    else nn.Sequential(OrderedDict(block))
                )
                new.append((key, Residual(inner)))
                if numeric:
                    exprs.append(
                        "Residual(nn.Sequential("
                        + ", ".join(f"c[{pos[k]}]" for k, _ in block)
                        + "))"
                    )
                else:
                    inner_code = ", ".join(f'("{k}", c["{k}"])' for k, _ in block)
                    exprs.append(f'("{key}", Residual(nn.Sequential(OrderedDict([{inner_code}]))))')
            else:
                key = str(len(new)) if numeric else e[0]
                new.append((key, e[1]))
                exprs.append(f"c[{pos[e[0]]}]" if numeric else f'("{key}", c["{e[0]}"])')
        seq._modules.clear()
        for key, m in new:
            seq.add_module(key, m)
        if numeric:
            code += f"c = list({ref})\n"
            built = "nn.Sequential(" + ", ".join(exprs) + ")"
        else:
            if not code.startswith("from collections"):
                code = "from collections import OrderedDict\n" + code
            code += f"c = dict({ref}.named_children())\n"
            built = "nn.Sequential(OrderedDict([" + ", ".join(exprs) + "]))"
        code += f"model = {built}\n" if not sname else f'model.set_submodule("{sname}", {built})\n'
    layers = [n for n, m in model.named_modules() if isinstance(m, Residual)]
    _check_forward(model, example_inputs, trace.output_shape, "residual")
    desc = (
        f"x + f(x) around {_plural(len(layers), 'same-shape block')} (their modules move to "
        f"NAME.block.*, the Sequential renumbered): {_summary(layers)}"
    )
    return Applied("residual", layers, desc, code)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _zero_targets(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(block, parameter names to zero) for each recognised residual block."""
    targets = []
    for name, m in model.named_modules():
        pre = f"{name}." if name else ""
        cls = {c.__name__ for c in type(m).__mro__}
        if isinstance(m, Residual):
            subs = list(m.block.named_modules())
            norms = [n for n, s in subs if _is_norm(s) and getattr(s, "weight", None) is not None]
            lins = [n for n, s in subs if _is_weight_layer(s)]
            last = norms[-1] if norms else lins[-1] if lins else None
            if last is None:
                continue
            sub = _join(pre + "block", last)
            bias = not norms and m.block.get_submodule(last).bias is not None
            params = [f"{sub}.weight"] + ([f"{sub}.bias"] if bias else [])
            targets.append((name, params))
        elif isinstance(m, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer):
            subs = ["self_attn.out_proj", "linear2"]
            if isinstance(m, nn.TransformerDecoderLayer):
                subs.insert(1, "multihead_attn.out_proj")
            params = [
                f"{pre}{s}.{p}"
                for s in subs
                for p in ("weight", "bias")
                if getattr(m.get_submodule(s), p, None) is not None
            ]
            targets.append((name, params))
        elif "Bottleneck" in cls and _is_norm(getattr(m, "bn3", None)):
            targets.append((name, [f"{pre}bn3.weight"]))
        elif "BasicBlock" in cls and _is_norm(getattr(m, "bn2", None)):
            targets.append((name, [f"{pre}bn2.weight"]))
    return targets


def _zero_init_residual(model: nn.Module, *, example_inputs=None, generator=None) -> Applied:
    targets = _zero_targets(model)
    if not targets:
        raise NotApplicable(
            "no residual block found (recognised: vanishing's Residual, torchvision-style "
            "BasicBlock/Bottleneck, nn.TransformerEncoderLayer/DecoderLayer)"
        )
    params = [p for _, ps in targets for p in ps]
    with torch.no_grad():
        for p in params:
            model.get_parameter(p).zero_()
    names = [n or "(model)" for n, _ in targets]
    desc = (
        f"zero init of the last layer of each residual branch ({_plural(len(targets), 'block')}: "
        f"{_summary(names)}), so each block starts as the identity"
    )
    code = (
        "import torch\nwith torch.no_grad():\n"
        f"    for name in {_names_list(params)}:\n"
        "        model.get_parameter(name).zero_()\n"
    )
    return Applied("zero_init_residual", [p.rpartition(".")[0] for p in params], desc, code)


# ------------------------------------------------------------------------------ transformers
def _pre_layer_norm(
    model: nn.Module, *, example_inputs=None, generator=None, final_norm: bool = True
) -> Applied:
    kinds = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    layers = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    if not layers:
        raise NotApplicable(
            "no nn.TransformerEncoderLayer or nn.TransformerDecoderLayer (norm_first applies "
            "to torch's Transformer layers only)"
        )
    post = [n for n in layers if not model.get_submodule(n).norm_first]
    if not post:
        raise NotApplicable(
            f"every Transformer layer is already pre-LN ({_plural(len(layers), 'layer')})"
        )
    for n in post:
        model.get_submodule(n).norm_first = True
    # a pre-LN stack's output is the un-normalised residual stream: the stack needs a final
    # LayerNorm (Xiong et al. 2020); torch's containers take it as their ``norm``
    added = []
    stacks = (nn.TransformerEncoder, nn.TransformerDecoder)
    for n, m in model.named_modules():
        if isinstance(m, stacks):
            if isinstance(m, nn.TransformerEncoder):
                m.use_nested_tensor = False  # what its __init__ decides for norm_first layers
            first = m.layers[0]
            if final_norm and m.norm is None and first.norm_first:
                m.norm = nn.LayerNorm(first.linear1.in_features, eps=first.norm1.eps).to(
                    **_device_dtype(first)
                )
                added.append(f"{n}.norm" if n else "norm")
    desc = f"norm_first=True (pre-LN) in {_plural(len(post), 'layer')}: {_summary(post)}"
    code = (
        "from torch import nn\nfor m in model.modules():\n"
        "    if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):\n"
        "        m.norm_first = True\n"
    )
    if added:
        desc += f"; final LayerNorm added at {_summary(added)}"
        code += (
            "for m in model.modules():\n"
            "    stack = isinstance(m, (nn.TransformerEncoder, nn.TransformerDecoder))\n"
            "    if stack and m.norm is None:\n"
            "        first = m.layers[0]\n"
            "        norm = nn.LayerNorm(first.linear1.in_features, eps=first.norm1.eps)\n"
            "        m.norm = norm.to(first.linear1.weight)  # its device and dtype\n"
            "        m.use_nested_tensor = False\n"
        )
    return Applied("pre_layer_norm", post + added, desc, code)


# ------------------------------------------------------------------------------ recurrent
def _forget_gate_bias(
    model: nn.Module, *, example_inputs=None, generator=None, value: float = 1.0
) -> Applied:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"value must be a finite number, got {value!r}")
    found = [n for n, m in model.named_modules() if isinstance(m, nn.LSTM | nn.LSTMCell)]
    if not found:
        raise NotApplicable(
            "no nn.LSTM or nn.LSTMCell in the model (nn.GRU and nn.RNN have no forget gate)"
        )
    names = [n for n in found if model.get_submodule(n).bias]
    if not names:
        raise NotApplicable(f"the LSTMs have no biases (bias=False): {_summary(found)}")
    with torch.no_grad():
        for n in names:
            m = model.get_submodule(n)
            h = m.hidden_size
            for pname, p in m.named_parameters(recurse=False):
                # PyTorch's gate order is (input, forget, cell, output): forget is [H:2H];
                # the gate sees bias_ih + bias_hh, so their sum is ``value``
                if pname.startswith("bias_ih"):
                    p[h : 2 * h] = value
                elif pname.startswith("bias_hh"):
                    p[h : 2 * h] = 0.0
    desc = (
        f"forget-gate bias {value:g} (bias_ih[H:2H] = {value:g}, bias_hh[H:2H] = 0) "
        f"in {_summary(names)}"
    )
    code = (
        "import torch\nwith torch.no_grad():\n"
        f"    for name in {_names_list(names)}:\n"
        "        m = model.get_submodule(name)\n"
        "        h = m.hidden_size  # gates (input, forget, cell, output): forget is [h:2h]\n"
        "        for pname, p in m.named_parameters(recurse=False):\n"
        '            if pname.startswith("bias_ih"):\n'
        f"                p[h : 2 * h] = {float(value)!r}\n"
        '            elif pname.startswith("bias_hh"):\n'
        "                p[h : 2 * h] = 0.0\n"
    )
    return Applied("forget_gate_bias", names, desc, code)


def _rnn_args(m: nn.RNN) -> tuple[list, dict]:
    args = [m.input_size, m.hidden_size]
    kw = {}
    defaults = {
        "num_layers": 1,
        "bias": True,
        "batch_first": False,
        "dropout": 0.0,
        "bidirectional": False,
    }
    for k, d in defaults.items():
        v = getattr(m, k)
        if v != d:
            kw[k] = v
    return args, kw


def _gated_remedy(target: str):
    cls = nn.LSTM if target == "lstm" else nn.GRU

    def apply(model: nn.Module, *, example_inputs=None, generator=None) -> Applied:
        found = {id(m): m for _, m in model.named_modules() if type(m) is nn.RNN}
        if not found:
            cells = [n for n, m in model.named_modules() if type(m) is nn.RNNCell]
            why = (
                f" (nn.RNNCell at {_summary(cells)} is not swapped: its caller's state differs)"
                if cells
                else ""
            )
            raise NotApplicable(f"no nn.RNN module in the model{why}")
        before = (
            _out_shape(_run(model, example_inputs, what="the forward"))
            if example_inputs is not None
            else None
        )
        new = {}
        for key, m in found.items():
            args, kw = _rnn_args(m)
            fresh = cls(*args, **kw, **_device_dtype(m))
            if generator is not None:
                # torch's own init, U(-1/sqrt(H), 1/sqrt(H)) for every parameter in order,
                # redrawn from the generator
                bound = 1.0 / math.sqrt(fresh.hidden_size)
                with torch.no_grad():
                    for p in fresh.parameters():
                        nn.init.uniform_(p, -bound, bound, generator=generator)
            new[key] = (fresh, args, kw)
        names = _registrations(model, set(found))
        specs = {}
        for name in names:
            parent, key = _parent(model, name)
            fresh, args, kw = new[id(getattr(parent, key))]
            specs[name] = (args, kw)
            setattr(parent, key, fresh)
        _check_forward(model, example_inputs, before, target)
        state = "(output, (h, c))" if target == "lstm" else "(output, h)"
        desc = (
            f"nn.RNN -> nn.{cls.__name__} of the same sizes in {_summary(names)}; "
            f"it returns {state}"
            + (": `out, _ = rnn(x)` works, code using h must take h[0]" if target == "lstm" else "")
        )
        lines = ["from torch import nn"]
        for name in names:
            args, kw = specs[name]
            a = ", ".join([*map(str, args), *(f"{k}={v!r}" for k, v in kw.items())])
            # drawn on the old layer's device and in its dtype (as the probe drew them)
            lines.append(f'w = model.get_submodule("{name}").weight_ih_l0')
            lines.append(
                f'model.set_submodule("{name}", nn.{cls.__name__}({a}, device=w.device, '
                "dtype=w.dtype))"
            )
        return Applied(target, names, desc, "\n".join(lines) + "\n")

    return apply


# ------------------------------------------------------------------------------ public
_REMEDIES: dict[str, Callable[..., Applied]] = {
    "he_init": _init_remedy("he_init"),
    "xavier_init": _init_remedy("xavier_init"),
    "lecun_init": _init_remedy("lecun_init"),
    "orthogonal_init": _init_remedy("orthogonal_init"),
    **{k: _swap_remedy(k) for k in ("relu", "leaky_relu", "prelu", "elu", "selu", "gelu")},
    "batch_norm": _norm_remedy("batch_norm"),
    "layer_norm": _norm_remedy("layer_norm"),
    "residual": _residual,
    "forget_gate_bias": _forget_gate_bias,
    "lstm": _gated_remedy("lstm"),
    "gru": _gated_remedy("gru"),
    "pre_layer_norm": _pre_layer_norm,
    "zero_init_residual": _zero_init_residual,
}

#: The remedy names :func:`apply_remedy` handles (model transformations).
MODEL_REMEDIES: tuple[str, ...] = tuple(_REMEDIES)

_OPTIONS = {
    **dict.fromkeys(("he_init", "xavier_init", "lecun_init", "orthogonal_init"), ("activation",)),
    **dict.fromkeys(("relu", "leaky_relu", "prelu", "elu", "selu", "gelu"), ("to", "reinit")),
    "forget_gate_bias": ("value",),
    "pre_layer_norm": ("final_norm",),
}


def apply_remedy(
    model: nn.Module,
    remedy: str,
    *,
    example_inputs: Any = None,
    generator: torch.Generator | None = None,
    **options: Any,
) -> Applied:
    """Transform ``model`` IN PLACE (the caller passes a deep copy) for ``remedy``; raise
    :class:`NotApplicable` with a reason.

    Args:
        model: any ``nn.Module``; submodules may be replaced (``setattr`` on their parents).
        remedy: one of :data:`MODEL_REMEDIES`.
        example_inputs: one batch of inputs (see the module docstring), for the forward order
            and shapes; ``residual`` needs it, the others read registration order without it.
        generator: the random source of new weights (the global RNG when None).
        **options: ``activation=`` (the init remedies: the kind assumed after hidden layers
            where no activation module follows), ``reinit=False`` (activation swaps: keep the
            old init), ``value=`` (``forget_gate_bias``, default 1.0), ``final_norm=False``
            (``pre_layer_norm``: add no final LayerNorm to torch's encoder/decoder stacks).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from vanishing.repair.transforms import apply_remedy
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
        ...                       nn.Linear(8, 1))
        >>> done = apply_remedy(model, "batch_norm", example_inputs=torch.randn(5, 4))
        >>> done.layers, [type(m).__name__ for m in model[0]]
        (['0.1', '2.1'], ['Linear', 'BatchNorm1d'])
        >>> print(done.code, end="")
        from torch import nn
        for name, norm in [("0", nn.BatchNorm1d(8)), ("2", nn.BatchNorm1d(8))]:
            layer = model.get_submodule(name)  # the norm on the layer's device and dtype
            model.set_submodule(name, nn.Sequential(layer, norm.to(layer.weight)))
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if remedy not in REMEDIES:
        raise ValueError(f"unknown remedy {remedy!r}; expected one of {MODEL_REMEDIES}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    fn = _REMEDIES.get(remedy)
    if fn is None:
        raise NotApplicable(f"{remedy} is a training-recipe change, not a model transformation")
    allowed = _OPTIONS.get(remedy, ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = ", ".join(allowed) if allowed else "no options"
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {remedy}; it takes {takes}")
    return fn(model, example_inputs=example_inputs, generator=generator, **options)


def describe_activations(model: nn.Module, example_inputs: Any = None) -> dict[str, str]:
    """Each Linear/Conv/recurrent layer -> the kind of the activation module that follows it
    in forward order (``"linear"`` when none does: the output layer, or an activation called
    as a function inside ``forward``). Without ``example_inputs``, registration order.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from vanishing.repair.transforms import describe_activations
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))
        >>> describe_activations(net, torch.randn(3, 2))
        {'0': 'tanh', '3': 'linear'}
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    follow = _Trace(model, example_inputs).following()
    return {n: _kind(a) or "linear" for n, a in follow.items()}
