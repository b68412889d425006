"""The monitor: ``vanishing.watch`` and its parts (events, layout, buffer; probes and sinks
live in :mod:`vanishing.probes` and :mod:`vanishing.sinks`)."""

from vanishing.monitor.monitor import Monitor, WatchError, watch

__all__ = ["Monitor", "WatchError", "watch"]
