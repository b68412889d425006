"""Run directories: the schema, the writer that appends flushed blocks, and the reader."""

from vanishing.recorder.reader import Run, load_run
from vanishing.recorder.schema import SCHEMA_VERSION

__all__ = ["Run", "load_run", "SCHEMA_VERSION"]
