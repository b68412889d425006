"""Probes: one small object per signal, composed by the monitor (see :mod:`vanishing.probes.base`).

The built-in probes: :class:`~vanishing.probes.loss.LossProbe` (loss, non-finite losses,
backward passes), :class:`~vanishing.probes.params.ParamProbe` (gradient, weight and update
norms per parameter), :class:`~vanishing.probes.errors.ErrorSignalProbe` (dLoss/d(output) per
layer), :class:`~vanishing.probes.activations.ActivationProbe` and
:class:`~vanishing.probes.temporal.TemporalProbe` (recurrent layers, through time); opt-in,
:class:`ClippingProbe` (the total gradient norm before and after the loop's clipping). A probe of
your own subclasses :class:`Probe`, declares its :class:`Column` s and is passed as
``vanishing.watch(..., probes=[...])``.
"""

from vanishing.probes.base import Probe, ProbeContext
from vanishing.probes.clipping import ClippingProbe
from vanishing.recorder.columns import Column

__all__ = ["Probe", "ProbeContext", "Column", "ClippingProbe"]
