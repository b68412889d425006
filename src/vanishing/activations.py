"""The activation registry: everything the package knows about each activation function.

One :class:`Activation` entry per *kind* (the name written into recorded runs). An entry says
which module classes are that kind (by class name, so third-party classes need no import),
how to compute its derivative ``phi'`` from the input ``z`` and/or the output ``y``, the bound
of ``|phi'|``, its flat tails and whether its units can die, and what to recommend for it: the
init gain that suits it and the remedy names (see ``docs`` / the remedy vocabulary).

=============  ===========================================  ===============  =====  =========
kind           phi'(z)                                       max |phi'|       tails  can die
=============  ===========================================  ===============  =====  =========
sigmoid        y (1 - y)                                     1/4              both   no
tanh           1 - y^2                                       1                both   no
softsign       (1 - |y|)^2 = 1 / (1 + |z|)^2                 1                both   no
hardtanh       1 if min < z < max else 0                     1                both   no
relu           1 if z > 0 else 0                             1                none   yes
relu6          1 if 0 < z < 6 else 0                         1                both   yes
leaky_relu     1 if z > 0 else a                             max(1, |a|)      none   yes
prelu          1 if z > 0 else a (per channel)               max(1, |a|)      none   yes
elu            1 if z > 0 else y + alpha                     max(1, alpha)    lower  yes
selu           s if z > 0 else y + s alpha                   s alpha          lower  yes
gelu           Phi(z) + z phi(z)  (or the tanh form)         1.1289 (1.1290)  lower  no
silu           sigmoid(z) (1 + z (1 - sigmoid(z)))           1.0998           lower  no
quick_gelu     s (1 + 1.702 z (1 - s)), s=sigmoid(1.702z)    1.0998           lower  no
=============  ===========================================  ===============  =====  =========

The statistics themselves (:mod:`vanishing.stats.activations`) are pure: they take what an
entry declares (:meth:`Activation.stat_options`) as arguments. Nothing here imports torch at
import time; the derivatives import it when they run.

Example:
    >>> from torch import nn
    >>> from vanishing import activations
    >>> act = activations.for_module(nn.LeakyReLU(0.2))
    >>> act.kind, act.max_derivative(nn.LeakyReLU(-3.0)), act.init_remedy
    ('leaky_relu', 3.0, 'he_init')
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "Activation",
    "UNMEASURED",
    "buildable_kinds",
    "for_module",
    "get",
    "kinds",
    "register",
    "registered",
    "unmeasured",
    "unregister",
]

Tails = Literal["none", "lower", "both"]

_SELU_ALPHA = 1.6732632423543772
_SELU_SCALE = 1.0507009873554805


def _no_params(module: Any) -> dict:
    return {}


@dataclass(frozen=True)
class Activation:
    """One activation kind and everything the package knows about it.

    Attributes:
        kind: the name recorded in runs (``"tanh"``); unique in the registry.
        classes: names of the module classes of this kind; a module matches when one of the
            classes in its ``type(module).__mro__`` has one of these names, so subclasses match.
        derivative: ``derivative(z, y, **params) -> Tensor | None``, ``phi'`` elementwise from
            the input ``z`` and/or the output ``y`` (either may be None), laid out as the
            module sees them (batch first, channels at dim 1); None when what it needs is
            missing (the input of an in-place GELU).
        bound: ``max |phi'|``, a number or a function of the params (see :meth:`max_derivative`).
        read_params: ``module -> dict``, the options ``derivative`` and ``bound`` depend on.
        input_needed: True when ``phi'`` cannot be read off the output (or a function of params).
        output_derivative: optional fast path ``(y, out) -> Tensor``: ``phi'`` from the output
            alone, written into ``out``; when given, the statistics use it instead of
            ``derivative`` (it must agree with it).
        tails: where ``phi'`` flattens to 0: ``"none"``, ``"lower"`` (z -> -inf) or ``"both"``;
            the saturated share is measured only when there is a tail.
        can_die: a unit whose input is <= 0 for every example passes (almost) no gradient; the
            dead share is measured only for these.
        signed: ``phi'`` can be negative, so saturation compares ``|phi'|``.
        init_gain: the weight gain ``std(W) * sqrt(fan_in)`` a careful init gives for it.
        init_remedy: the init remedy that suits it (``"he_init"``, ``"xavier_init"``, ...).
        remedy: the remedy name that recommends switching to it, or None.
        builder: dotted path of the module class experiments build for it (``"torch.nn.Tanh"``),
            or None when it is not an experiment choice.
        binary_derivative: ``phi'`` is 0 or 1 everywhere (ReLU, ReLU6, hardtanh): its RMS is
            ``sqrt(mean(phi'))``, and a unit of it that dies passes no gradient at all.
        negative_slope: the slope on the off side (z < 0) of the module built with its
            defaults (``nn.LeakyReLU``'s 0.01, ``nn.PReLU``'s initial 0.25): He init's ``a``.

    Example:
        >>> import math, torch
        >>> from vanishing.activations import Activation
        >>> square = Activation("square", ("Square",), derivative=lambda z, y: 2 * z,
        ...                     bound=math.inf, input_needed=True, signed=True)
        >>> square.derivative(torch.tensor([3.0]), None).tolist()
        [6.0]
    """

    kind: str
    classes: tuple[str, ...]
    derivative: Callable[..., Any]
    bound: float | Callable[[Mapping[str, Any]], float]
    read_params: Callable[[Any], dict] = _no_params
    input_needed: bool | Callable[[Mapping[str, Any]], bool] = False
    output_derivative: Callable[[Any, Any], Any] | None = None
    tails: Tails = "none"
    can_die: bool = False
    signed: bool = False
    init_gain: float = 1.0
    init_remedy: str = "xavier_init"
    remedy: str | None = None
    builder: str | None = None
    binary_derivative: bool = False
    negative_slope: float = 0.0

    def __post_init__(self) -> None:
        if not self.kind:
            raise ValueError("an activation needs a non-empty kind")
        if isinstance(self.classes, str):
            raise TypeError(f"classes of {self.kind!r} must be a tuple of class names")
        object.__setattr__(self, "classes", tuple(self.classes))
        if self.tails not in ("none", "lower", "both"):
            raise ValueError(f"tails of {self.kind!r} must be 'none', 'lower' or 'both'")

    def params(self, module: Any = None) -> dict:
        """The options of ``module`` that the derivative and bound depend on ({} for None).

        Example:
            >>> from torch import nn
            >>> from vanishing.activations import get
            >>> get("elu").params(nn.ELU(0.5)), get("tanh").params(nn.Tanh())
            ({'alpha': 0.5}, {})
        """
        return {} if module is None else self.read_params(module)

    def max_derivative(self, module: Any = None) -> float:
        """``max |phi'|`` for ``module``'s options (the defaults without one).

        Example:
            >>> from torch import nn
            >>> from vanishing.activations import get
            >>> get("sigmoid").max_derivative(), get("elu").max_derivative(nn.ELU(2.0))
            (0.25, 2.0)
        """
        if callable(self.bound):
            return float(self.bound(self.params(module)))
        return float(self.bound)

    def needs_input(self, module: Any = None) -> bool:
        """Whether ``phi'`` needs the input ``z`` (it cannot be read off the output).

        Example:
            >>> from torch import nn
            >>> from vanishing.activations import get
            >>> get("gelu").needs_input(), get("tanh").needs_input()
            (True, False)
            >>> get("leaky_relu").needs_input(nn.LeakyReLU(-0.5))  # the output's sign flips
            True
        """
        if callable(self.input_needed):
            return bool(self.input_needed(self.params(module)))
        return bool(self.input_needed)

    def stat_options(self, module: Any = None) -> dict:
        """The keyword arguments of :func:`vanishing.stats.activations.summarize` (and its
        stacked and in-place variants) for ``module``: derivative, params, bound and flags.

        Example:
            >>> import torch
            >>> from vanishing.activations import get
            >>> from vanishing.stats.activations import summarize
            >>> y = torch.sigmoid(torch.zeros(4, 3))
            >>> summarize(None, y, **get("sigmoid").stat_options())[2].item()   # mean phi'
            0.25
        """
        params = self.params(module)
        return {
            "derivative": self.derivative,
            "output_derivative": self.output_derivative,
            "params": params,
            "bound": self.max_derivative(module),
            "saturates": self.tails != "none",
            "signed": self.signed,
            "can_die": self.can_die,
        }

    def module_class(self) -> type:
        """The module class experiments build for this kind (imported now).

        Example:
            >>> from vanishing.activations import get
            >>> get("tanh").module_class()
            <class 'torch.nn.modules.activation.Tanh'>
        """
        if self.builder is None:
            raise ValueError(f"activation {self.kind!r} has no module class to build")
        module, _, name = self.builder.rpartition(".")
        return getattr(importlib.import_module(module), name)


_REGISTRY: dict[str, Activation] = {}
_BY_CLASS: dict[str, str] = {}  # class name -> kind


def register(activation: Activation, *, replace: bool = False) -> Activation:
    """Add an activation to the registry (the monitor then measures modules of its classes).

    A kind or class name already registered is an error unless ``replace=True`` (which first
    removes the entry of the same kind). Returns the entry.

    Example:
        >>> import math, torch
        >>> from torch import nn
        >>> from vanishing import activations
        >>> def mish_derivative(z, y):
        ...     if z is None:
        ...         return None
        ...     t = torch.tanh(nn.functional.softplus(z))
        ...     return t + z * torch.sigmoid(z) * (1 - t * t)
        >>> _ = activations.register(activations.Activation(
        ...     "mish", ("Mish",), derivative=mish_derivative, bound=1.0886,
        ...     input_needed=True, tails="lower", signed=True, init_gain=math.sqrt(2),
        ...     init_remedy="he_init"))
        >>> activations.for_module(nn.Mish()).kind
        'mish'
        >>> _ = activations.unregister("mish")
    """
    if not isinstance(activation, Activation):
        raise TypeError(f"register() takes an Activation, got {type(activation).__name__}")
    old = _REGISTRY.get(activation.kind)
    if old is not None and not replace:
        raise ValueError(f"activation kind {activation.kind!r} is already registered")
    taken = {
        name: _BY_CLASS[name]
        for name in activation.classes
        if _BY_CLASS.get(name, activation.kind) != activation.kind
    }
    if taken:
        name, kind = next(iter(taken.items()))
        raise ValueError(f"class {name!r} is already registered as activation {kind!r}")
    if old is not None:
        unregister(old.kind)
    _REGISTRY[activation.kind] = activation
    _BY_CLASS.update(dict.fromkeys(activation.classes, activation.kind))
    return activation


def unregister(kind: str) -> Activation:
    """Remove an activation from the registry; returns its entry.

    Example:
        >>> from vanishing import activations
        >>> cube = activations.Activation("cube", ("Cube",), lambda z, y: 3 * z * z, bound=1e9)
        >>> _ = activations.register(cube)
        >>> activations.unregister("cube") is cube, "cube" in activations.kinds()
        (True, False)
    """
    activation = get(kind)
    del _REGISTRY[kind]
    for name in activation.classes:
        _BY_CLASS.pop(name, None)
    return activation


def get(kind: str) -> Activation:
    """The entry of an activation kind; a ``ValueError`` naming the known kinds otherwise.

    Example:
        >>> from vanishing.activations import get
        >>> get("selu").init_remedy, get("relu").remedy
        ('lecun_init', 'relu')
    """
    activation = _REGISTRY.get(kind)
    if activation is None:
        raise ValueError(f"unknown activation kind {kind!r}; expected one of {kinds()}")
    return activation


def for_module(module: Any) -> Activation | None:
    """The entry whose classes include ``module``'s class or one of its bases, else None.

    Example:
        >>> from torch import nn
        >>> from vanishing.activations import for_module
        >>> for_module(nn.ReLU6()).kind, for_module(nn.Linear(2, 2))
        ('relu6', None)
    """
    for cls in type(module).__mro__:
        kind = _BY_CLASS.get(cls.__name__)
        if kind is not None:
            return _REGISTRY[kind]
    return None


def kinds() -> tuple[str, ...]:
    """The registered kinds, in registration order.

    Example:
        >>> from vanishing.activations import kinds
        >>> kinds()[:3]
        ('sigmoid', 'tanh', 'softsign')
    """
    return tuple(_REGISTRY)


def registered() -> tuple[Activation, ...]:
    """The registered entries, in registration order.

    Example:
        >>> from vanishing.activations import registered
        >>> [a.kind for a in registered() if a.tails == "both"]
        ['sigmoid', 'tanh', 'softsign', 'hardtanh', 'relu6']
    """
    return tuple(_REGISTRY.values())


def buildable_kinds() -> tuple[str, ...]:
    """The kinds experiments can build (those with a ``builder``), in registration order.

    Example:
        >>> from vanishing.activations import buildable_kinds
        >>> buildable_kinds()
        ('sigmoid', 'tanh', 'softsign', 'relu', 'leaky_relu', 'prelu', 'elu', 'selu', 'gelu')
    """
    return tuple(a.kind for a in _REGISTRY.values() if a.builder is not None)


#: Activation classes that are recognised but not measured: no registered derivative (yet),
#: so the monitor records no activation statistics for them; a diagnosis can say so. A class
#: registered later (e.g. ``Mish`` through :func:`register`) is measured instead.
UNMEASURED: tuple[str, ...] = (
    # torch.nn
    "Mish",
    "Hardswish",
    "Hardsigmoid",
    "Softplus",
    "CELU",
    "RReLU",
    "LogSigmoid",
    "Tanhshrink",
    "Softshrink",
    "Hardshrink",
    "Threshold",
    "GLU",
    # Hugging Face transformers.activations: clipped or other formulas
    "ClippedGELUActivation",
    "MishActivation",
    "LaplaceActivation",
    "ReLUSquaredActivation",
    "XIELUActivation",
    "SqrtSoftplusActivation",
)


def unmeasured(module: Any) -> str | None:
    """The class name if ``module`` is a known activation that is not measured, else None.

    Example:
        >>> from torch import nn
        >>> from vanishing.activations import unmeasured
        >>> unmeasured(nn.Hardswish()), unmeasured(nn.ReLU()), unmeasured(nn.Linear(1, 1))
        ('Hardswish', None, None)
    """
    if for_module(module) is not None:
        return None
    for cls in type(module).__mro__:
        if cls.__name__ in UNMEASURED:
            return cls.__name__
    return None


# ---------------------------------------------------------------------------- the built-ins
# The derivatives below are the exact formulas whose results are recorded in runs: change one
# and recorded statistics change with it.


def _sigmoid_from_output(y, out=None):
    import torch

    return torch.addcmul(y, y, y, value=-1.0, out=out)  # y - y^2 in one pass


def _sigmoid(z, y):
    return _sigmoid_from_output(y if y is not None else z.sigmoid())


def _tanh_from_output(y, out=None):
    import torch

    one = torch.ones((), dtype=y.dtype, device=y.device)
    return torch.addcmul(one, y, y, value=-1.0, out=out)  # 1 - y^2 in one pass


def _tanh(z, y):
    return _tanh_from_output(y if y is not None else z.tanh())


def _softsign_from_output(y, out=None):
    import torch

    return torch.abs(y, out=out).neg_().add_(1.0).square_()


def _softsign(z, y):
    if y is not None:
        return _softsign_from_output(y)
    return (1 + z.abs()).reciprocal().square()


def _hardtanh(z, y, *, min_val=-1.0, max_val=1.0):
    x = z if z is not None else y  # clamping keeps the open interval: same test on the output
    return ((x > min_val) & (x < max_val)).to(x.dtype)


def _relu6(z, y, *, min_val=0.0, max_val=6.0):
    return _hardtanh(z, y, min_val=min_val, max_val=max_val)


def _relu(z, y):
    x = z if z is not None else y  # the sign of the output is the sign of the input
    return (x > 0).to(x.dtype)


def _leaky_relu(z, y, *, negative_slope=0.01):
    import torch

    x = z if z is not None else y  # same sign as the input unless the slope is <= 0
    return torch.where(x > 0, 1.0, negative_slope).to(x.dtype)


def _prelu(z, y, *, weight=None):
    import torch

    if z is None or weight is None:
        return None
    a = weight.detach()
    if a.numel() > 1 and a.dim() == 1 and z.dim() >= 2:
        a = a.view([1, -1] + [1] * (z.dim() - 2))  # one slope per channel, at dim 1
    return torch.where(z > 0, torch.ones_like(z), a.to(z.dtype).expand_as(z))


def _elu(z, y, *, alpha=1.0):
    import torch

    if y is None:
        return torch.where(z > 0, 1.0, alpha * torch.exp(z)).to(z.dtype)
    return torch.where(y > 0, 1.0, y + alpha).to(y.dtype)


def _selu(z, y):
    import torch

    if y is None:
        return torch.where(z > 0, _SELU_SCALE, _SELU_SCALE * _SELU_ALPHA * torch.exp(z))
    return torch.where(y > 0, _SELU_SCALE, y + _SELU_SCALE * _SELU_ALPHA).to(y.dtype)


def _gelu(z, y, *, approximate="none"):
    import torch

    if z is None:
        return None
    if approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)
        u = c * (z + 0.044715 * z.pow(3))
        t = torch.tanh(u)
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * 0.044715 * z * z)
    cdf = 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))
    return cdf + z * pdf


def _silu(z, y):
    import torch

    if z is None:
        return None
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


#: QuickGELU's slope (Hugging Face's QuickGELUActivation, CLIP's MLPs): x * sigmoid(1.702 x)
_QUICK_GELU = 1.702


def _quick_gelu(z, y):
    # d/dz z sigmoid(a z) = s + a z s (1 - s): SiLU's derivative at a z, so the same bound
    if z is None:
        return None
    return _silu(_QUICK_GELU * z, None)


def _prelu_bound(p: Mapping[str, Any]) -> float:
    w = p.get("weight")
    # host sync: at most once per layer, when the monitor first sees it
    return 1.0 if w is None else max(1.0, float(w.detach().abs().max()))


# Hugging Face GELUs in the tanh form 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), i.e.
# torch's gelu(approximate="tanh"); FastGELU writes sqrt(2/pi) as 0.7978845608 (the same to
# 1e-11, below float32 resolution). They carry no `approximate` attribute: the name says it.
_TANH_GELUS = frozenset(
    {
        "NewGELUActivation",
        "FastGELUActivation",
        "AccurateGELUActivation",
        "GELUTanh",
        "PytorchGELUTanh",
    }
)


def _gelu_params(module: Any) -> dict:
    names = {cls.__name__ for cls in type(module).__mro__}
    default = "tanh" if names & _TANH_GELUS else "none"
    return {"approximate": getattr(module, "approximate", default)}


def _clamp_params(module: Any) -> dict:
    return {"min_val": module.min_val, "max_val": module.max_val}


_HE = {"init_gain": math.sqrt(2.0), "init_remedy": "he_init"}

for _activation in (
    Activation(
        "sigmoid",
        ("Sigmoid",),
        _sigmoid,
        0.25,
        output_derivative=_sigmoid_from_output,
        tails="both",
        builder="torch.nn.Sigmoid",
    ),
    Activation(
        "tanh",
        ("Tanh",),
        _tanh,
        1.0,
        output_derivative=_tanh_from_output,
        tails="both",
        builder="torch.nn.Tanh",
    ),
    Activation(
        "softsign",
        ("Softsign",),
        _softsign,
        1.0,
        output_derivative=_softsign_from_output,
        tails="both",
        builder="torch.nn.Softsign",
    ),
    Activation(
        "hardtanh",
        ("Hardtanh",),
        _hardtanh,
        1.0,
        _clamp_params,
        tails="both",
        binary_derivative=True,
    ),
    Activation(
        "relu",
        ("ReLU",),
        _relu,
        1.0,
        can_die=True,
        binary_derivative=True,
        remedy="relu",
        builder="torch.nn.ReLU",
        **_HE,
    ),
    Activation(
        "relu6",
        ("ReLU6",),
        _relu6,
        1.0,
        _clamp_params,
        tails="both",
        can_die=True,
        binary_derivative=True,
        **_HE,
    ),
    Activation(
        "leaky_relu",
        ("LeakyReLU",),
        _leaky_relu,
        lambda p: max(1.0, abs(p.get("negative_slope", 0.01))),
        lambda m: {"negative_slope": m.negative_slope},
        input_needed=lambda p: p.get("negative_slope", 0.01) <= 0,
        can_die=True,
        signed=True,
        negative_slope=0.01,
        remedy="leaky_relu",
        builder="torch.nn.LeakyReLU",
        **_HE,
    ),
    Activation(
        "prelu",
        ("PReLU",),
        _prelu,
        _prelu_bound,
        lambda m: {"weight": m.weight},
        input_needed=True,
        can_die=True,
        signed=True,
        negative_slope=0.25,
        remedy="prelu",
        builder="torch.nn.PReLU",
        **_HE,
    ),
    Activation(
        "elu",
        ("ELU",),
        _elu,
        lambda p: max(1.0, p.get("alpha", 1.0)),
        lambda m: {"alpha": m.alpha},
        tails="lower",
        can_die=True,
        remedy="elu",
        builder="torch.nn.ELU",
    ),
    Activation(
        "selu",
        ("SELU",),
        _selu,
        _SELU_SCALE * _SELU_ALPHA,
        tails="lower",
        can_die=True,
        init_remedy="lecun_init",
        remedy="selu",
        builder="torch.nn.SELU",
    ),
    Activation(
        "gelu",
        ("GELU", "GELUActivation", *sorted(_TANH_GELUS)),
        _gelu,
        lambda p: 1.1289761 if p.get("approximate", "none") == "none" else 1.1290463,
        _gelu_params,
        input_needed=True,
        tails="lower",
        signed=True,
        remedy="gelu",
        builder="torch.nn.GELU",
        **_HE,
    ),
    Activation(
        "silu",
        # Hugging Face's SiLUActivation (ACT2FN["silu"]: Llama, Mistral, Qwen MLPs) is F.silu
        ("SiLU", "SiLUActivation"),
        _silu,
        1.0998393,
        input_needed=True,
        tails="lower",
        signed=True,
        **_HE,
    ),
    Activation(
        "quick_gelu",
        # x * sigmoid(1.702 x): Hugging Face's QuickGELUActivation (ACT2FN["quick_gelu"]), the
        # MLPs of CLIP's text and vision towers
        ("QuickGELUActivation",),
        _quick_gelu,
        1.0998393,
        input_needed=True,
        tails="lower",
        signed=True,
        **_HE,
    ),
):
    register(_activation)
del _activation
