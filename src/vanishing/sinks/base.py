"""The sink protocol: three methods, called by the monitor in order."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Sink(Protocol):
    """Where flushed blocks go.

    ``open(manifest)`` once when the monitor starts (the manifest as then known: layers in
    registration order, forward order not yet seen); ``write(block)`` at every flush, with
    ``block.manifest`` the run's manifest when it changed since the last write (else empty; the
    last block of a run may hold no steps and carries the final manifest); ``close()`` once,
    after the last write. A
    sink that raises is reported in a warning; the monitor and the other sinks carry on.
    """

    def open(self, manifest: dict[str, Any]) -> None: ...

    def write(self, block: Any) -> None: ...

    def close(self) -> None: ...
