"""One way to name a layer in every view: its qualified module name, shortened the same way.

The diagnosis quotes layers by their qualified module names (as ``model.named_modules()``
gives them: ``'0'``, ``'encoder.layer.3.attention.self.query'``); the tables, plot axes,
legends and terminal views use the same names, through :func:`short_names`, so that a name
read in one place is found in the others. A parameter of a module that is not its plain
``weight`` (an LSTM's ``weight_hh_l1``, attention's ``in_proj_weight``) is named as in
``model.named_parameters()``: ``lstm.weight_hh_l1`` (:func:`param_label`).

Long names are shortened by dropping what they all share (the leading components common to
every name) and, only where a length limit asks for it, leading components up to a name's last block index; that index and what follows it are never
dropped, and two names never end up
with the same label.

Example:
    >>> from vanishing.report.names import short_names
    >>> short_names(["encoder.layers.0.self_attn.out_proj", "encoder.layers.1.self_attn.out_proj"])
    ['0.self_attn.out_proj', '1.self_attn.out_proj']
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ELLIPSIS", "ROOT", "common_prefix", "short_names", "param_label"]

#: Marks where components were dropped from a name.
ELLIPSIS = "…"
#: The label of the model itself (module name ``""``: parameters registered on the root).
ROOT = "(root)"


def _parts(name: str) -> list[str]:
    return str(name).split(".") if name else []


def common_prefix(names: Sequence[str]) -> str:
    """The leading dotted components that every name shares and that leave every name at
    least its last component (``""`` when there are none or only one name).

    Example:
        >>> from vanishing.report.names import common_prefix
        >>> common_prefix(["bert.encoder.layer.0.output.dense", "bert.encoder.layer.11.output.dense"])
        'bert.encoder.layer'
        >>> common_prefix(["0", "2", "4"]), common_prefix(["enc.fc"])
        ('', '')
    """
    split = [_parts(n) for n in names]
    if len(split) < 2 or any(not p for p in split):
        return ""
    shared = []
    for column in zip(*(p[:-1] for p in split)):
        if len(set(column)) != 1:
            break
        shared.append(column[0])
    return ".".join(shared)


def _candidates(parts: list[str]) -> list[str]:
    """Ever shorter labels of one name, the full one first: leading components dropped one at a
    time, never its last block index (a component of digits) nor anything after it; a name
    without a block index keeps at least its last two components. What follows the last index
    is what tells a block's modules apart (``attention.self.query``), so it always stays."""
    digits = [i for i, part in enumerate(parts) if part.isdigit()]
    stop = digits[-1] if digits else len(parts) - 2
    out = [".".join(parts)]
    for k in range(1, max(stop, 0) + 1):
        out.append(ELLIPSIS + ".".join(parts[k:]))
    return out


def short_names(names: Sequence[str], limit: int | None = None) -> list[str]:
    """Labels for ``names`` (qualified module names, in the order given) that stay apart.

    The leading components shared by every name are dropped (:func:`common_prefix`; a caller
    that drops them says so, e.g. in the axis label). With ``limit``, a label still longer than
    ``limit`` characters loses further leading components (shown as ``…``) until it fits, but
    never its last block index nor what follows it (the distinguishing part), so a label can stay
    longer than ``limit``; labels that would then coincide keep components back until they
    differ. The root module (``""``) is
    ``(root)``. Names must be distinct; the labels then are too.

    Example:
        >>> from vanishing.report.names import short_names
        >>> short_names(["0", "2", "4"])
        ['0', '2', '4']
        >>> short_names(["bert.embeddings.word_embeddings", "bert.encoder.layer.0.output.dense",
        ...              "bert.encoder.layer.11.output.dense", "bert.pooler.dense"], limit=16)
        ['embeddings.word_embeddings', '…0.output.dense', '…11.output.dense', 'pooler.dense']
    """
    names = [str(n) for n in names]
    if len(set(names)) != len(names):
        raise ValueError("short_names: the names must be distinct (they are module names)")
    prefix = common_prefix([n for n in names if n])
    cut = len(_parts(prefix))
    parts = [_parts(n)[cut:] if n else [] for n in names]
    options = [_candidates(p) if p else [ROOT] for p in parts]
    if limit is None:
        chosen = [0] * len(names)
    else:
        chosen = []
        for opts in options:
            fits = [i for i, label in enumerate(opts) if len(label) <= limit]
            chosen.append(fits[0] if fits else len(opts) - 1)
    # labels that coincide step back toward their full (distinct) form, one step at a time
    while True:
        labels = [opts[i] for opts, i in zip(options, chosen)]
        seen: dict[str, list[int]] = {}
        for j, label in enumerate(labels):
            seen.setdefault(label, []).append(j)
        clashes = [js for js in seen.values() if len(js) > 1]
        if not clashes:
            return labels
        for js in clashes:
            for j in js:
                chosen[j] = max(chosen[j] - 1, 0)


def param_label(module: str, param: str) -> str:
    """The name of a module's parameter in the views: the module's name for its plain
    ``weight`` (the layer's weight matrix), ``module.param`` otherwise, as
    ``model.named_parameters()`` names it.

    Example:
        >>> from vanishing.report.names import param_label
        >>> param_label("0", "weight"), param_label("lstm", "weight_hh_l1"), param_label("", "pos")
        ('0', 'lstm.weight_hh_l1', 'pos')
    """
    if param == "weight":
        return module
    return f"{module}.{param}" if module else param
