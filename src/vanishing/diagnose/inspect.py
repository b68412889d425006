"""``vanishing.inspect``: diagnose a model before training, from one batch.

The one part of the diagnosis that drives a model: it watches one forward and backward pass
with the monitor, so it imports :mod:`vanishing.monitor` (when called), which imports only the
engine below it.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable

from vanishing.diagnose.findings import Diagnosis

__all__ = ["inspect", "DISAGREE"]

#: prediction and measurement of the first/last error-signal ratio "disagree" beyond this factor
DISAGREE = 2.0


def inspect(model, inputs, targets, loss_fn: Callable) -> Diagnosis:
    """Diagnose a model before training, from one forward and backward pass on one batch.

    The model is left exactly as it was: parameters, ``.grad``, buffers (batch-norm running
    statistics), training/eval mode and the random number generators' state.

    Example:
        >>> import torch, vanishing
        >>> from torch import nn
        >>> torch.manual_seed(0)   # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> layers = []
        >>> for _ in range(12):
        ...     layers += [nn.Linear(32, 32), nn.Sigmoid()]
        >>> model = nn.Sequential(*layers, nn.Linear(32, 4))
        >>> diag = vanishing.inspect(model, torch.randn(64, 32), torch.randint(0, 4, (64,)),
        ...                          nn.functional.cross_entropy)
        >>> diag.kinds
        ['vanishing_gradient']
    """
    import torch

    from vanishing.diagnose.engine import diagnose_run
    from vanishing.modules import _unwrap, call_model
    from vanishing.monitor import Monitor, WatchError
    from vanishing.monitor.monitor import suspended
    from vanishing.recorder.reader import load_run

    if not isinstance(model, torch.nn.Module):
        raise WatchError(f"inspect() needs a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise WatchError("loss_fn must be callable as loss_fn(model(inputs), targets)")
    root = _unwrap(model)
    grads = {id(p): p.grad for p in root.parameters()}
    buffers = {
        k: v.clone()
        for k, v in root.state_dict(keep_vars=True).items()
        if not isinstance(v, torch.nn.Parameter)
    }
    modes = {m: m.training for m in root.modules()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    with tempfile.TemporaryDirectory(prefix="vanishing-inspect-") as tmp:
        try:
            for p in root.parameters():
                p.grad = None
            root.train()
            # a model being trained under a monitor: that one hears nothing of this batch
            with suspended(model), Monitor(model, run_dir=f"{tmp}/run", flush_every=1):
                loss = loss_fn(call_model(model, inputs), targets)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise WatchError("loss_fn must return a scalar tensor")
                loss.backward()
            run = load_run(f"{tmp}/run")
            diag = diagnose_run(run, model)
            _theory_beside(diag, root, model, inputs, run)
            return diag
        finally:
            for p in root.parameters():
                p.grad = grads.get(id(p))
            with torch.no_grad():
                state = root.state_dict(keep_vars=True)
                for k, v in buffers.items():
                    state[k].copy_(v)
            for m, training in modes.items():
                m.training = training
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)


def _theory_beside(diag: Diagnosis, root, model, inputs, run) -> None:
    """Add the mean-field prediction of the gradient factors beside the measured ones.

    For a feed-forward stack of Linear/Conv layers and elementwise activations
    (:func:`vanishing.theory.predict`): a note with the predicted and measured first/last
    error-signal ratio ``||dL/dh_first|| / ||dL/dh_last||`` over the hidden layers and the
    per-layer factors of ``||dL/dh||^2``; when they differ by more than :data:`DISAGREE`, which
    assumption of the theory fails. The numbers go to ``diag.theory`` (a dict) and, when the
    diagnosis found a vanishing or exploding gradient, into that finding's evidence. Any other
    model is skipped without a note; nothing here raises (a failure costs only this note).
    """
    try:
        from vanishing import theory

        try:
            pred = theory.predict(root, inputs)
        except ValueError:
            return  # not a feed-forward stack the theory describes: nothing to say
        if len(pred.layers) < 3:
            return  # one hidden layer: no factor between hidden layers to compare
        metrics = run.metrics
        rows = metrics[(metrics["param"] == "") & metrics["error_norm"].notna()]
        first_step = rows["step"].min()
        norms = rows[rows["step"] == first_step].groupby("layer")["error_norm"].mean()
        names = [x.name for x in pred.layers]
        if any(n not in norms.index for n in names):
            return  # the run did not record every layer's error signal
        e = [float(norms[n]) for n in names]
        if not all(math.isfinite(v) and v > 0 for v in e):
            return
        measured_chi = [(a / b) ** 2 for a, b in zip(e[:-1], e[1:])]
        measured_ratio = e[0] / e[-2]
        predicted_ratio = pred.ratio
        if not (math.isfinite(predicted_ratio) and predicted_ratio > 0):
            return
        off = max(measured_ratio / predicted_ratio, predicted_ratio / measured_ratio)
        hidden = pred.layers[:-1]
        inv_width = sum(1.0 / x.width for x in hidden)
        diag.theory = {
            "predicted_ratio": predicted_ratio,
            "measured_ratio": measured_ratio,
            "disagreement": off,
            "agrees": off <= DISAGREE,
            "caveats": list(pred.caveats),
            "inverse_width_sum": inv_width,
            "layers": {
                x.name: {
                    "activation": x.activation,
                    "predicted_chi": x.chi,
                    "measured_chi": m,
                    "q": x.q,
                    "sigma_w2": x.sigma_w2,
                    "sigma_b2": x.sigma_b2,
                }
                for x, m in zip(pred.layers[:-1], measured_chi)
            },
        }
        for f in diag.findings:
            if f.kind in ("vanishing_gradient", "exploding_gradient"):
                f.evidence["theory_predicted_ratio"] = float(predicted_ratio)
                f.evidence["theory_measured_ratio"] = float(measured_ratio)
        per_layer = ", ".join(
            f"{x.name} {x.chi:.3g}/{m:.3g}" for x, m in list(zip(pred.layers, measured_chi))[:6]
        ) + (" ..." if len(measured_chi) > 6 else "")
        text = (
            f"mean-field theory from the weights' actual variances (vanishing.theory.predict): "
            f"first/last hidden error-signal ratio predicted {predicted_ratio:.3g}, measured "
            f"{measured_ratio:.3g}; per-layer factor of ||dL/dh||^2 predicted/measured: {per_layer}"
        )
        if off <= DISAGREE:
            text += f" (agree within {DISAGREE:g}x)"
        else:
            text += (
                f" (disagree by {off:.3g}x > {DISAGREE:g}x: {_failed_assumption(pred, inv_width)})"
            )
        text += "; the model on the phase diagram: theory.predict(model, inputs).phase_diagram()"
        diag.notes.append(text)
    except Exception:  # noqa: BLE001 - the comparison is an extra; it never costs the diagnosis
        return


def _failed_assumption(pred, inv_width: float) -> str:
    """Which assumption of the mean-field theory the model breaks, most specific first."""
    reasons = []
    for c in pred.caveats:
        if c.startswith("normalization"):
            reasons.append("normalization layers present, which reset the scale")
        elif "residual" in c or "between modules" in c:
            reasons.append(
                "residual connections or operations outside modules, which the theory ignores"
            )
    # finite width: log ||dL/dh||^2 fluctuates with variance ~ 5 sum(1/width) (Hanin 2018)
    spread = math.exp(1.5 * math.sqrt(5 * inv_width))  # 3 standard deviations of log ||dL/dh||
    if inv_width > 0.05:
        reasons.append(
            f"width too small for the infinite-width limit (sum of 1/width over the layers "
            f"{inv_width:.2g}; fluctuations up to ~{spread:.2g}x expected)"
        )
    if not reasons:
        reasons.append(
            "weights or inputs far from the theory's independent Gaussian ones (e.g. trained, "
            "orthogonal or structured weights, or strongly correlated inputs)"
        )
    return "assumption that fails: " + "; ".join(reasons)
