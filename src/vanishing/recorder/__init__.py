"""Run directories: the schema, the writer that appends flushed blocks, the reader, and what the
records mean (:mod:`vanishing.recorder.semantics`)."""

from vanishing.recorder.errors import RunError
from vanishing.recorder.reader import Run, load_run
from vanishing.recorder.schema import SCHEMA_VERSION

__all__ = ["Run", "RunError", "load_run", "SCHEMA_VERSION"]
