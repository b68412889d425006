"""The run directory: manifest.json and Parquet parts (docs/run-format.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vanishing.recorder.block import Block, block_to_tables
from vanishing.recorder.writer import RunWriter, atomic_write_bytes


class ParquetSink:
    """Owns one run directory: the monitor's records and the files experiments add beside them
    (``config.json``, ``eval.parquet``, ``summary.json``), each written atomically.

    Example:
        >>> import tempfile
        >>> from vanishing.sinks import ParquetSink
        >>> sink = ParquetSink(tempfile.mkdtemp() + "/run")
        >>> sink.open({"schema_version": 1, "layers": []})
        >>> sink.write_json("summary.json", {"status": "completed"})
        >>> sorted(p.name for p in sink.run_dir.iterdir())
        ['manifest.json', 'metrics', 'steps', 'summary.json', 'temporal']
    """

    def __init__(self, run_dir: str | os.PathLike, mode: str = "new") -> None:
        self.run_dir = Path(run_dir)
        self.mode = mode  # "new", "overwrite" or "resume" (see RunWriter)
        self._writer: RunWriter | None = None

    def open(self, manifest: dict[str, Any]) -> None:
        """Create the run directory (by ``mode``: refused when it already holds a run,
        replacing it, or continuing it) and write its manifest."""
        self._writer = RunWriter(self.run_dir, self.mode)
        self._writer.write_manifest(manifest)

    def write(self, block: Block) -> None:
        if block.n:
            self._writer.write_block(block_to_tables(block))
        if block.manifest:  # the parts first: a manifest never names steps that are not there
            self._writer.write_manifest(block.manifest)

    def close(self) -> None:
        pass

    def write_json(self, name: str, obj: Any) -> None:
        """``obj`` as ``name`` in the run directory (atomic: never a torn file)."""
        atomic_write_bytes(self.run_dir / name, json.dumps(obj, indent=2, default=str).encode())

    def write_bytes(self, name: str, data: bytes) -> None:
        """``data`` as ``name`` in the run directory (atomic)."""
        atomic_write_bytes(self.run_dir / name, data)
